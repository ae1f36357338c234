"""qvm-connect-tcp refuses what the original misreads: one line, non-zero exit, nothing bound."""

import subprocess
import sys

import pytest

from tests.client_world import free_port


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
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qvm-connect-tcp: error: ")
    assert named in lines[0]


def test_no_spec_says_what_is_expected() -> None:
    result = run_client()
    assert result.returncode == 1
    assert "no binding given" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--bind", "nowhere", "8080:web:80"], "'nowhere'"),
        (["--max-connections", "0", "8080:web:80"], "--max-connections 0"),
        (["--max-connections", "500", "8080:web:80"], "--max-connections 500"),
        (["--grace", "-1", "8080:web:80"], "--grace -1"),
        (["--systemd", "8080:web:80"], "give no SPEC"),
    ],
)
def test_invalid_options_are_one_clear_line(args: list[str], named: str) -> None:
    result = run_client(*args)
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert named in result.stderr


def test_missing_qrexec_client_vm_says_where_to_run_it() -> None:
    # a port nothing uses: a fixed one (8080) may be another program's on this host
    result = subprocess.run(
        [sys.executable, "-m", "qconnect.client.cli", f"{free_port()}:web:80"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert "qrexec-client-vm not found on PATH" in result.stderr
