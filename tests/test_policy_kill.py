"""A policy edit killed by SIGKILL between writing and renaming leaves the old file intact."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from qconnect.demo import DEFAULT_POLICY, SAMPLE_QUBES
from qconnect.policy.evaluate import evaluate_call
from qconnect.policy.system_info import SystemInfo

# The editor in a child process whose os.rename first stops the process: the
# new content is then written and fsynced to a temporary file, and the rename
# that would publish it has not happened. The parent kills it right there.
CHILD = """
import os, signal, sys
real_rename = os.rename
def rename_after_stop(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGSTOP)
    real_rename(*args, **kwargs)
os.rename = rename_after_stop
from qconnect.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_between_write_and_rename_keeps_the_old_policy(tmp_path: Path) -> None:
    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir()
    (policy_dir / "90-default.policy").write_text(DEFAULT_POLICY)
    qubes = tmp_path / "qubes.json"
    qubes.write_text(json.dumps({"domains": SAMPLE_QUBES}))
    system = SystemInfo.load(qubes)
    base = [sys.executable, "-m", "qconnect.cli", "policy"]
    options = ["--policy-dir", str(policy_dir), "--qubes", str(qubes)]
    subprocess.run(
        [*base, "allow", "untrusted", "--port", "444", "--target", "mytcp-service", *options],
        check=True,
        capture_output=True,
        timeout=60,
    )
    ours = policy_dir / "30-qconnect.policy"
    old = ours.read_bytes()

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "policy", "deny", "untrusted", "--port", "444", *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _, status = os.waitpid(child.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), "the editor ended before reaching its rename"
        (temporary,) = policy_dir.glob(".30-qconnect.policy.*.tmp")
        assert b"untrusted @anyvm deny" in temporary.read_bytes()  # the new content, written
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.returncode is None:
            child.kill()
            child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    assert ours.read_bytes() == old
    resolution = evaluate_call(
        policy_dir,
        system,
        source="untrusted",
        target="mytcp-service",
        service="qubes.ConnectTCP",
        argument="+444",
    )
    assert (resolution.action, resolution.rule) == ("allow", "30-qconnect.policy:6")

    # the lock died with the process: the next edit goes through and sweeps the leftover
    subprocess.run(
        [*base, "deny", "untrusted", "--port", "444", *options],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert b"untrusted @anyvm deny" in ours.read_bytes()
    assert not list(policy_dir.glob(".30-qconnect.policy.*.tmp"))
