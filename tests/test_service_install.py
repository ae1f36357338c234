"""install/uninstall: the right files in the right places, reversed exactly, units verified."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qconnect.cli import main
from qconnect.service.install import (
    BLOCK_BEGIN,
    RC_LOCAL,
    add_block,
    install,
    render_units,
    uninstall,
)


def _tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under root with its mode and content: the state to compare."""
    state = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        content = path.read_bytes() if path.is_file() else b""
        state[str(path.relative_to(root))] = (info.st_mode, content)
    return state


def test_socket_install_puts_files_where_an_app_qube_keeps_them(tmp_path: Path) -> None:
    assert (
        main(["service", "install", "--socket", "--layout", "app-qube", "--root", str(tmp_path)])
        == 0
    )
    local = tmp_path / "usr/local"
    exe = local / "etc/qubes-rpc/qubes.ConnectTCP"
    assert os.access(exe, os.X_OK)
    assert exe.read_text().startswith(f"#!{sys.executable} -IS\n")
    config = (local / "etc/qubes/rpc-config/qubes.ConnectTCP").read_text()
    assert "skip-service-descriptor=false\n" in config and "exit-on-service-eof=false\n" in config
    socket_unit = (local / "lib/systemd/system/qconnect-connecttcp.socket").read_text()
    assert "ListenStream=/run/qubes-rpc/qubes.ConnectTCP\n" in socket_unit
    assert "Accept=no\n" in socket_unit
    service_unit = (local / "lib/systemd/system/qconnect-connecttcp.service").read_text()
    assert f"ExecStart={sys.executable} -m qconnect.cli service run\n" in service_unit
    rc_local = (tmp_path / RC_LOCAL).read_text()
    assert rc_local.startswith("#!/bin/sh\n") and "systemctl --no-block start" in rc_local
    assert os.access(tmp_path / RC_LOCAL, os.X_OK)


def test_uninstall_restores_the_tree_exactly_keeping_the_users_rc_local(tmp_path: Path) -> None:
    (tmp_path / "rw/config").mkdir(parents=True)
    (tmp_path / RC_LOCAL).write_text("#!/bin/sh\necho mine\n")
    (tmp_path / "usr/local/etc").mkdir(parents=True)
    before = _tree(tmp_path)
    install(tmp_path, "socket")
    assert "echo mine\n" in (tmp_path / RC_LOCAL).read_text()
    install(tmp_path, "socket")  # again: replaces, never duplicates
    assert (tmp_path / RC_LOCAL).read_text().count(BLOCK_BEGIN) == 1
    assert main(["service", "uninstall", "--root", str(tmp_path)]) == 0
    assert _tree(tmp_path) == before


def test_switching_forms_leaves_one_set_of_files(tmp_path: Path) -> None:
    install(tmp_path, "socket")
    manifest = install(tmp_path, "exec")
    assert manifest.form == "exec" and not (tmp_path / RC_LOCAL).exists()
    assert not (tmp_path / "usr/local/lib/systemd").exists()
    assert (tmp_path / "usr/local/etc/qubes-rpc/qubes.ConnectTCP").exists()
    uninstall(tmp_path)
    assert _tree(tmp_path) == {}


def test_uninstall_with_nothing_installed_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["service", "uninstall", "--root", str(tmp_path)]) == 0
    assert "no qconnect service installed" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_rendered_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = render_units("qconnect service install --socket")
    for name, text in units.items():
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / name) for name in units)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # The check is real: the same units with a broken ExecStart fail it.
    service = units["qconnect-connecttcp.service"]
    broken = service.replace(f"ExecStart={sys.executable}", "ExecStart=relative/python")
    (tmp_path / "qconnect-connecttcp.service").write_text(broken)
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / name) for name in units)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0


def test_install_into_rpc_dir_replaces_the_stock_symlink(tmp_path: Path) -> None:
    rpc, config = tmp_path / "rpc", tmp_path / "rpc-config"
    rpc.mkdir()
    (rpc / "qubes.ConnectTCP").symlink_to("/dev/tcp/127.0.0.1")
    assert main(["service", "install", "--rpc-dir", str(rpc), "--rpc-config-dir", str(config)]) == 0
    exe = rpc / "qubes.ConnectTCP"
    assert not exe.is_symlink() and os.access(exe, os.X_OK)
    assert "skip-service-descriptor=false" in (config / "qubes.ConnectTCP").read_text()


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate"
)
def test_socket_activated_service_notifies_ready_and_serves(tmp_path: Path) -> None:
    path = tmp_path / "qubes.ConnectTCP"
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, socket.socket() as server:
        notify.bind(str(notify_path))
        notify.settimeout(20)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        process = subprocess.Popen(
            [
                "systemd-socket-activate",
                "-l",
                str(path),
                f"--setenv=NOTIFY_SOCKET={notify_path}",
                sys.executable,
                "-m",
                "qconnect.cli",
                "service",
                "run",
                "--socket",
                str(tmp_path / "unused.sock"),
                "--allow-file",
                str(tmp_path / "no.allow"),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            for _ in range(50):  # systemd-socket-activate binds before it starts us
                if path.exists():
                    break
                subprocess.run(["sleep", "0.1"], check=True)
            with socket.socket(socket.AF_UNIX) as caller:
                caller.connect(str(path))
                caller.sendall(f"qubes.ConnectTCP+{port} work\0ping".encode())
                caller.shutdown(socket.SHUT_WR)
                conn, _ = server.accept()
                with conn:
                    assert conn.recv(10) == b"ping"
                    conn.sendall(b"pong")
                assert caller.recv(10) == b"pong"
            messages = b""
            while b"READY=1" not in messages:
                messages += notify.recv(4096)
            assert not (tmp_path / "unused.sock").exists()  # it used systemd's socket
            watchdog = threading.Timer(20, process.kill)
            watchdog.start()
            assert process.stderr is not None
            err = ""
            while "call from work" not in err and (line := process.stderr.readline()):
                err += line
            watchdog.cancel()
        finally:
            process.terminate()
            err += process.communicate(timeout=20)[1]
    assert f"call from work to 127.0.0.1:{port}: 4 bytes in, 4 bytes out" in err
    assert "listening on socket from systemd" in err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("file", "refusing to replace {path}: it exists and is not a socket"),
        ("parent-file", "cannot listen on {path}: {path.parent} is not a directory"),
    ],
)
def test_service_run_with_an_unusable_socket_path_fails_in_one_line(
    tmp_path: Path, make: str, message: str
) -> None:
    if make == "file":
        path = tmp_path / "qubes.ConnectTCP"
        path.write_text("not a socket")
    else:
        (tmp_path / "plain").write_text("")
        path = tmp_path / "plain" / "qubes.ConnectTCP"
    result = subprocess.run(
        [sys.executable, "-m", "qconnect.cli", "service", "run", "--socket", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1  # it could not be done: the command line was fine
    assert result.stderr == f"qconnect: error: {message.format(path=path)}\n"


def test_missing_source_files_are_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import qconnect.service.install as install_module

    monkeypatch.setattr(install_module, "SERVICE_SOURCE", tmp_path / "gone" / "qubes.ConnectTCP")
    root = tmp_path / "root"
    root.mkdir()
    assert main(["service", "install", "--exec", "--layout", "app-qube", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"qconnect: error: cannot read {tmp_path}/gone/qubes.ConnectTCP: ")
    assert err.count("\n") == 1
    assert _tree(root) == {}  # nothing half-written


def test_service_help_and_the_installers_import_no_trio(tmp_path: Path) -> None:
    """`qconnect service --help` and both installers stay on the standard library."""
    code = (
        "import sys\n"
        "from qconnect.cli import build_parser\n"
        "build_parser(['service', '--help'])\n"
        "import qconnect.service.cli, qconnect.service.install, qconnect.persist.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'outcome')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_the_defaults_help_shows_are_the_ones_the_daemon_uses() -> None:
    from qconnect.service import daemon, defaults

    names = [name for name in vars(defaults) if name.startswith("DEFAULT_")]
    assert len(names) == 5
    # Each the daemon uses is the one --help shows (it imports them from defaults).
    used = [name for name in names if hasattr(daemon, name)]
    assert len(used) == 4  # all but DEFAULT_SOCKET, which only the command line reads
    for name in used:
        assert getattr(daemon, name) == getattr(defaults, name), name


# The first lines of each file an earlier qconnect (main before the one install
# engine) wrote, as it wrote them: they must still be recognised as ours.
_EARLIER_FILES = {
    "usr/local/etc/qubes-rpc/qubes.ConnectTCP": '#!/usr/bin/python3 -IS\n"""qubes.ConnectTCP, '
    "executable form: connect the caller to 127.0.0.1:PORT or [::1]:PORT.\n",
    "usr/local/etc/qubes/rpc-config/qubes.ConnectTCP": "# Generated by qconnect service install; "
    "remove with: qconnect service uninstall\nskip-service-descriptor=false\n",
    "usr/local/lib/systemd/system/qconnect-connecttcp.socket": "# Generated by `qconnect service "
    "install --socket --layout app-qube --root /old`.\n# Remove with `qconnect service uninstall"
    " --root /old`.\n[Socket]\nListenStream=/run/qubes-rpc/qubes.ConnectTCP\n",
    "usr/local/lib/systemd/system/qconnect-connecttcp.service": "# Generated by `qconnect service "
    "install --socket --layout app-qube`.\n# Remove with `qconnect service uninstall`.\n"
    "[Service]\n",
}
_EARLIER_MANIFEST = {
    "form": "socket",
    "layout": "app-qube",
    "files": list(_EARLIER_FILES),
    "links": {},
    "directories": [
        "usr", "usr/local", "usr/local/etc", "usr/local/etc/qubes-rpc", "usr/local/etc/qubes",
        "usr/local/etc/qubes/rpc-config", "usr/local/lib", "usr/local/lib/systemd",
        "usr/local/lib/systemd/system", "usr/local/etc/qconnect",
    ],
    "rc_local_created": False,
    "rc_local_block": True,
}  # fmt: skip


def _earlier_install(root: Path, *, manifest: bool) -> None:
    for relative, text in _EARLIER_FILES.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    rc_local = root / RC_LOCAL
    rc_local.write_text(add_block(rc_local.read_text()))
    if manifest:
        path = root / "usr/local/etc/qconnect/service-install.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(_EARLIER_MANIFEST, indent=2) + "\n")


def test_an_earlier_install_is_removed_exactly(tmp_path: Path) -> None:
    (tmp_path / RC_LOCAL).parent.mkdir(parents=True)
    (tmp_path / RC_LOCAL).write_text("#!/bin/sh\necho mine\n")
    before = _tree(tmp_path)
    _earlier_install(tmp_path, manifest=True)
    assert main(["service", "uninstall", "--root", str(tmp_path)]) == 0
    assert _tree(tmp_path) == before


def test_files_an_earlier_install_wrote_are_replaced_not_refused(tmp_path: Path) -> None:
    (tmp_path / RC_LOCAL).parent.mkdir(parents=True)
    (tmp_path / RC_LOCAL).write_text("#!/bin/sh\necho mine\n")
    _earlier_install(tmp_path, manifest=False)
    argv = ["service", "install", "--socket", "--layout", "app-qube", "--root", str(tmp_path)]
    assert main(argv) == 0
    assert (tmp_path / RC_LOCAL).read_text().count(BLOCK_BEGIN) == 1
    for relative in _EARLIER_FILES:
        assert (tmp_path / relative).read_text() != _EARLIER_FILES[relative]
