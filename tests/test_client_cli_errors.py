"""qvm-connect-tcp refuses what the original misreads: one line, non-zero exit, nothing bound."""

import subprocess
import sys

import pytest

from tests.cli_refusals import assert_one_refusal


def run_client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qconnect.client.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("8080", "'8080'"),  # the original calls a qube named "8080"
        ("1:2:3:4:5", "'1:2:3:4:5'"),
        ("8080:web:0", "'0'"),
        ("8080:web:65536", "'65536'"),
        ("8080:web:080", "'080'"),
        ("0x50:web:80", "'0x50'"),  # the original's shell arithmetic accepts this
        ("8080:web:1e2", "'1e2'"),
        ("8080:web:", "PORT is missing"),
        ("8080:we b:80", "'we b'"),
        ("8080:web$x:80", "'web@x'"),
        ("8080:../x:80", "'../x'"),
        ("999.1.1.1:8080:web:80", "'999.1.1.1'"),
        ("example.com:8080:web:80", "'example.com'"),
    ],
)
def test_invalid_spec_is_one_clear_line(spec: str, named: str) -> None:
    result = run_client(spec)
    assert result.stdout == ""
    line = assert_one_refusal(result.returncode, result.stderr, 2, named)
    assert line.startswith("qvm-connect-tcp: error: argument SPEC: ")


def test_no_spec_is_a_wrong_command_line_like_a_bad_spec() -> None:
    result = run_client()
    assert_one_refusal(result.returncode, result.stderr, 2, "no binding given")
    assert result.stderr.startswith("usage: qvm-connect-tcp ")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--bind", "nowhere", "8080:web:80"], "argument --bind: invalid bind address 'nowhere'"),
        (["--max-connections", "0", "8080:web:80"], "--max-connections: invalid number '0'"),
        (["--max-connections", "500", "8080:web:80"], "--max-connections: invalid number '500'"),
        (["--grace", "-1", "8080:web:80"], "--grace: invalid duration '-1'"),
        (["--systemd", "8080:web:80"], "give no SPEC"),
        (["8080:web:80", "9090:db:90", "8080:x:1"], "local port 127.0.0.1:8080 given twice"),
    ],
)
def test_invalid_options_are_one_clear_line_and_exit_2(args: list[str], named: str) -> None:
    result = run_client(*args)
    assert_one_refusal(result.returncode, result.stderr, 2, named)


def test_missing_qrexec_client_vm_says_where_to_run_it_before_binding() -> None:
    # Port 1 (privileged, surely unused): were it bound first, this unprivileged
    # run would fail on the bind or the sudo, not on the missing program.
    result = subprocess.run(
        [sys.executable, "-m", "qconnect.client.cli", "1:web:80"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert_one_refusal(result.returncode, result.stderr, 1, "qrexec-client-vm not found on PATH")
