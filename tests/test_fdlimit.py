"""The open-file limit every daemon raises at its start, in a process of its own.

Each case runs in a fresh interpreter whose limits are set first (as
systemd's LimitNOFILE or prlimit would), so this test process keeps its own.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent

# Sets the limits, raises them, then opens descriptors up to the new soft limit.
PROGRAM = """
import json, os, resource, sys
soft, hard = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
from qconnect.core.fdlimit import raise_open_file_limit
returned = raise_open_file_limit()
in_force = resource.getrlimit(resource.RLIMIT_NOFILE)
opened = []
try:
    while len(opened) < hard:
        opened.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
highest = max(opened)
print(json.dumps({"returned": returned, "in_force": in_force, "highest": highest}))
"""


def _raised(soft: int, hard: int) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(soft), str(hard)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=PROJECT,
    )
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def test_the_soft_limit_is_raised_to_the_hard_one_and_descriptors_can_be_had() -> None:
    answer = _raised(64, 512)
    assert answer["returned"] == 512
    assert answer["in_force"] == [512, 512]
    assert answer["highest"] == 511  # descriptors up to the new limit, not the old 64


@pytest.mark.parametrize("limit", [64, 300])
def test_a_soft_limit_already_at_the_hard_one_is_left_alone(limit: int) -> None:
    answer = _raised(limit, limit)
    assert answer["returned"] == limit
    assert answer["in_force"] == [limit, limit]
    assert answer["highest"] == limit - 1
