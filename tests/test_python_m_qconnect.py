"""``python3 -m qconnect`` is the ``qconnect`` command."""

import subprocess
import sys
from pathlib import Path

from qconnect import __version__


def test_python_m_qconnect_runs_the_front_door(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qconnect", "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, f"qconnect {__version__}\n")


def test_python_m_qconnect_reports_a_wrong_command_line_with_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qconnect", "no-such-command"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "no-such-command" in result.stderr
