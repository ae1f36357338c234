"""Every unit ``persist add`` can generate passes the real ``systemd-analyze verify``.

System units are verified with ``--root`` (executables are looked up inside
the tree, so the tree holds real files there); user units with ``--user``
(no ``--root`` there in systemd 252, so their executables are real host
files). verify exits 0 on mere warnings, so any output at all is a failure.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.persist_tree import (
    fake_executable,
    install_analyze_support,
    make_qube_tree,
    run_persist,
)

SYSTEM_UNITS = "usr/local/lib/systemd/system"
USER_UNITS = "home/user/.config/systemd/user"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def verify_system(tree: Path, files: list[Path]) -> subprocess.CompletedProcess[str]:
    seen = ["/" + str(path.relative_to(tree)) for path in files]
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={tree}", "--man=no", *seen],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def verify_user(tmp_path: Path, files: list[Path]) -> subprocess.CompletedProcess[str]:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(
        ["systemd-analyze", "--user", "verify", "--man=no", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        check=False,
    )


def unit_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir() if path.is_file())


def test_every_system_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tree = make_qube_tree(tmp_path / "qube")
    install_analyze_support(tree)
    fake_executable(tree / "usr/bin/qrexec-client-vm")
    fake_executable(tree / "usr/local/bin/qvm-connect-tcp")
    shutil.copy("/usr/bin/socat", tree / "usr/bin/socat")
    root = ["--root", str(tree), "--system"]
    for spec, extra in [
        ("444::444", ["--relay", "handoff", "--persistence", "rw-only"]),
        ("[::1]:22:@dispvm:my-dvm:22", ["--relay", "socat", "--max-connections", "128"]),
        ("0.0.0.0:8080:web:80", ["--relay", "handoff", "--persistence", "full"]),
        ("[fe80::1]:5432:db:5432", ["--mode", "daemon"]),
        ("23:@dispvm:23", ["--mode", "daemon", "--persistence", "full"]),
    ]:
        extra += (
            ["--qvm-connect-tcp", "/usr/local/bin/qvm-connect-tcp"] if "daemon" in extra else []
        )
        run_persist("add", spec, *root, *extra, check=True)
    files = unit_files(tree / SYSTEM_UNITS)
    assert len(files) == 3 * 2 + 2 + 1  # per-connection pairs, daemon sockets, shared service
    result = verify_system(tree, files)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_every_user_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tree = make_qube_tree(tmp_path / "qube")
    qrexec_client_vm = str(fake_executable(tmp_path / "bin" / "qrexec-client-vm"))
    client = str(Path(sys.executable).parent / "qvm-connect-tcp")
    root = ["--root", str(tree), "--user", "--qrexec-client-vm", qrexec_client_vm]
    run_persist("add", "8080:web:80", *root, "--relay", "handoff", check=True)
    run_persist("add", "[::1]:8443::443", *root, "--relay", "socat", check=True)
    run_persist("add", "[::1]:9000:@dispvm:x:22", "--root", str(tree), "--user",
                "--mode", "daemon", "--qvm-connect-tcp", client, check=True)  # fmt: skip
    files = unit_files(tree / USER_UNITS)
    assert len(files) == 2 * 2 + 1 + 1
    result = verify_user(tmp_path, files)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_verify_check_does_catch_a_broken_unit(tmp_path: Path) -> None:
    """The checks above can fail: a bad value or a missing executable is reported."""
    tree = make_qube_tree(tmp_path / "qube")
    install_analyze_support(tree)
    fake_executable(tree / "usr/bin/qrexec-client-vm")
    run_persist("add", "444::444", "--root", str(tree), "--relay", "handoff",
                "--persistence", "full", check=True)  # fmt: skip
    files = unit_files(tree / SYSTEM_UNITS)
    assert verify_system(tree, files).stderr == ""
    socket = next(path for path in files if path.suffix == ".socket")
    socket.write_text(socket.read_text().replace("Accept=yes", "Accept=perhaps"))
    assert "socket cannot be started" in verify_system(tree, files).stderr
    (tree / "usr/bin/qrexec-client-vm").unlink()
    socket.write_text(socket.read_text().replace("Accept=perhaps", "Accept=yes"))
    broken = verify_system(tree, files)
    assert broken.returncode != 0 and "qrexec-client-vm" in broken.stderr
