"""The qconnect front door: user mistakes become one line and an exit code, never a traceback."""

import subprocess
import sys


def run_qconnect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qconnect.cli", *args], capture_output=True, text=True, timeout=30
    )


def test_version() -> None:
    result = run_qconnect("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("qconnect ")


def test_unknown_subcommand_is_a_usage_error() -> None:
    result = run_qconnect("frobnicate")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "frobnicate" in result.stderr
