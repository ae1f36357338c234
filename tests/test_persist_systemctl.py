"""Telling a running systemd: what is called, in which order, and the undo when it refuses.

PID 1 here is not systemd, so a running manager is the one thing these tests
stand in for: a small ``systemctl`` script that records its command lines and
answers like systemd does. The real systemctl is used where it can answer
(that no manager runs here).
"""

import os
import shutil
from pathlib import Path, PurePosixPath

import pytest

from qconnect.core.errors import PersistError
from qconnect.core.install.systemctl import Systemd
from qconnect.core.spec import parse_spec
from qconnect.persist.cli import install_and_start, remove_and_stop
from qconnect.persist.install import AddRequest, Persistence, UnitPaths
from qconnect.persist.render import Binding, Mode, Scope, load_templates
from tests.persist_tree import make_qube_tree, run_persist, snapshot

SOCKET = "qconnect-bind-127.0.0.1-8080-web-80.socket"


def fake_systemctl(directory: Path, *, state: str = "running", failing: str = "") -> Path:
    """A systemctl that logs each call to calls.log; ``failing`` names a verb that fails."""
    log = directory / "calls.log"
    script = directory / "systemctl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        '[ "$1" = --user ] && shift\n'
        'case "$1" in\n'
        f"  is-system-running) echo {state}; [ {state} = offline ] && exit 1; exit 0;;\n"
        "  show) printf 'active\\nlistening\\n'; exit 0;;\n"
        f'  {failing or "no-such-verb"}) echo "Job for $2 failed: Address already in use" >&2;'
        " exit 1;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    return script


def calls(directory: Path) -> list[str]:
    return (directory / "calls.log").read_text().splitlines()


def layout_of(tree: Path) -> UnitPaths:
    return UnitPaths(root=tree, config_home=PurePosixPath("/home/user/.config"))


def request(spec: str, mode: Mode = Mode.PER_CONNECTION) -> AddRequest:
    binding = Binding(parse_spec(spec), Scope.USER, mode)
    client = "/usr/local/bin/qvm-connect-tcp" if mode is Mode.DAEMON else None
    return AddRequest(binding, Persistence.RW_ONLY, client)


def test_add_reloads_then_starts_the_socket(tmp_path: Path) -> None:
    tree = make_qube_tree(tmp_path / "qube")
    manager = Systemd(Scope.USER, str(fake_systemctl(tmp_path)))
    _plan, report, told = install_and_start(
        layout_of(tree), request("8080:web:80"), load_templates(), lambda _l, _s: manager
    )
    assert told and report
    assert calls(tmp_path) == ["--user daemon-reload", f"--user start {SOCKET}"]


def test_a_daemon_mode_add_restarts_the_client_so_it_takes_the_new_socket(tmp_path: Path) -> None:
    tree = make_qube_tree(tmp_path / "qube")
    manager = Systemd(Scope.USER, str(fake_systemctl(tmp_path)))
    install_and_start(
        layout_of(tree), request("8080:web:80", Mode.DAEMON), load_templates(), lambda *_: manager
    )
    assert calls(tmp_path)[-1] == "--user try-restart qconnect-bindings.service"


def test_when_systemd_refuses_the_socket_every_file_is_put_back(tmp_path: Path) -> None:
    tree = make_qube_tree(tmp_path / "qube")
    before = snapshot(tree)
    manager = Systemd(Scope.USER, str(fake_systemctl(tmp_path, failing="start")))
    with pytest.raises(PersistError, match="Address already in use; the files were put back"):
        install_and_start(
            layout_of(tree), request("8080:web:80"), load_templates(), lambda *_: manager
        )
    assert snapshot(tree) == before
    assert calls(tmp_path) == [
        "--user daemon-reload",
        f"--user start {SOCKET}",
        "--user daemon-reload",  # systemd forgets the units again
    ]


def test_remove_stops_before_deleting_and_reloads_after(tmp_path: Path) -> None:
    tree = make_qube_tree(tmp_path / "qube")
    before = snapshot(tree)
    install_and_start(layout_of(tree), request("8080:web:80"), load_templates(), lambda *_: None)
    manager = Systemd(Scope.USER, str(fake_systemctl(tmp_path)))
    chosen, _report, told = remove_and_stop(
        layout_of(tree), "8080:web:80", False, None, lambda *_: manager
    )
    assert told and [str(item.spec) for item in chosen] == ["127.0.0.1:8080:web:80"]
    assert calls(tmp_path) == [f"--user stop {SOCKET}", "--user daemon-reload"]
    assert snapshot(tree) == before


def test_manager_state_and_reachability_are_read_from_systemctl(tmp_path: Path) -> None:
    for state, reachable in [("running", True), ("degraded", True), ("offline", False)]:
        directory = tmp_path / state
        directory.mkdir()
        manager = Systemd(Scope.SYSTEM, str(fake_systemctl(directory, state=state)))
        assert manager.reachable() is reachable
    assert manager.state(SOCKET) == "active (listening)"
    assert not Systemd(Scope.SYSTEM, str(tmp_path / "no-systemctl")).reachable()


@pytest.mark.skipif(
    shutil.which("systemctl") is None or os.path.exists("/run/systemd/system"),
    reason="needs systemctl on a host where systemd is not running",
)
def test_without_a_running_systemd_the_command_says_it_did_not_tell_it(tmp_path: Path) -> None:
    assert not Systemd(Scope.SYSTEM).reachable()
    assert not Systemd(Scope.USER).reachable()
    tree = make_qube_tree(tmp_path / "qube")
    result = run_persist(
        "add", "8080:web:80", "--root", str(tree), "--relay", "handoff", check=True
    )
    assert "systemd: not told (--root given)" in result.stdout
    assert "systemctl --user start qconnect-bind-127.0.0.1-8080-web-80.socket" in result.stdout
