"""``qconnect persist`` over a --root tree: round trips, idempotence, conflicts, refusals."""

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from qconnect.core.errors import TreeError
from qconnect.core.install import rclocal
from qconnect.core.install.tree import Tree
from qconnect.core.spec import parse_spec
from qconnect.persist.cli import install_and_start
from qconnect.persist.install import AddRequest, Persistence, UnitPaths
from qconnect.persist.render import Binding, Mode, Scope, load_templates
from tests.cli_refusals import assert_one_refusal
from tests.persist_tree import (
    RC_LOCAL_OF_THE_USER,
    fake_executable,
    make_qube_tree,
    persist_env,
    run_persist,
    snapshot,
)

USER_UNITS = "home/user/.config/systemd/user"
SYSTEM_UNITS = "usr/local/lib/systemd/system"
SYSTEM_WANTS = "etc/systemd/system/sockets.target.wants"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_qube_tree(tmp_path / "qube")


@pytest.fixture
def qrexec_client_vm(tmp_path: Path) -> str:
    """A real executable that answers --help like a current qrexec-client-vm."""
    path = tmp_path / "bin" / "qrexec-client-vm"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\necho '  --use-stdin-socket - use fd 0 for both directions'\n")
    path.chmod(0o755)
    return str(path)


def add(tree: Path, spec: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_persist("add", spec, "--root", str(tree), *args)


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], *words: str, code: int = 1
) -> None:
    """One line naming ``words``: 1 for what could not be done, 2 for a wrong command line."""
    assert_one_refusal(result.returncode, result.stderr, code, *words)


def test_add_list_remove_round_trip_restores_the_tree_exactly(
    tree: Path, qrexec_client_vm: str
) -> None:
    before = snapshot(tree)
    qcv = ["--qrexec-client-vm", qrexec_client_vm]
    add(tree, "8080:web:80", *qcv).check_returncode()
    add(tree, "[::1]:8443:@default:443", "--relay", "socat", *qcv).check_returncode()
    add(tree, "9000:@dispvm:dvm:22", "--mode", "daemon").check_returncode()
    add(tree, "444::444", "--persistence", "rw-only", *qcv).check_returncode()
    add(tree, "127.0.0.2:22:work:22", "--persistence", "full", *qcv).check_returncode()
    add(tree, "23:work:23", "--mode", "daemon", "--persistence", "rw-only").check_returncode()

    listing = run_persist("list", "--root", str(tree), check=True).stdout.splitlines()
    assert listing[0].split() == ["BINDING", "MODE", "SCOPE", "AT-BOOT", "STATE"]
    rows = {line.split()[0]: line.split()[1:] for line in listing[1:]}
    assert rows == {
        "127.0.0.1:444:@default:444": ["per-connection", "system", "rc.local", "-"],
        "127.0.0.1:23:work:23": ["daemon", "system", "rc.local", "-"],
        "127.0.0.2:22:work:22": ["per-connection", "system", "enabled", "-"],
        "127.0.0.1:8080:web:80": ["per-connection", "user", "enabled", "-"],
        "127.0.0.1:9000:@dispvm:dvm:22": ["daemon", "user", "enabled", "-"],
        "[::1]:8443:@default:443": ["per-connection", "user", "enabled", "-"],
    }
    rc_local = (tree / "rw/config/rc.local").read_bytes()
    assert rc_local.startswith(RC_LOCAL_OF_THE_USER[:-7])  # the user's lines, then ours
    assert rc_local.endswith(b"# END qconnect persist\nexit 0\n")
    assert snapshot(tree) != before

    run_persist("remove", "8080:web:80", "--root", str(tree), check=True)
    run_persist("remove", "444::444", "--system", "--root", str(tree), check=True)
    run_persist("remove", "--all", "--user", "--root", str(tree), check=True)
    assert "rw/config/rc.local" in snapshot(tree)
    run_persist("remove", "--all", "--root", str(tree), check=True)
    assert snapshot(tree) == before


def test_round_trip_without_an_rc_local_deletes_the_one_it_created(
    tmp_path: Path, qrexec_client_vm: str
) -> None:
    tree = make_qube_tree(tmp_path / "qube", rc_local=None)
    before = snapshot(tree)
    add(tree, "444::444", "--persistence", "rw-only", "--qrexec-client-vm", qrexec_client_vm)
    rc_local = tree / "rw/config/rc.local"
    assert rc_local.read_text().startswith("#!/bin/sh\n# BEGIN qconnect persist")
    assert rc_local.stat().st_mode & 0o777 == 0o755  # Qubes runs it only if executable
    run_persist("remove", "444::444", "--root", str(tree), check=True)
    assert snapshot(tree) == before


def test_the_same_add_twice_changes_nothing(tree: Path, qrexec_client_vm: str) -> None:
    args = ["--persistence", "rw-only", "--qrexec-client-vm", qrexec_client_vm]
    first = add(tree, "[::1]:443:web:443", *args)
    assert first.returncode == 0, first.stderr
    assert "wrote" in first.stdout
    after_first = snapshot(tree)
    mtimes = {p: p.lstat().st_mtime_ns for p in tree.rglob("*")}
    second = add(tree, "[::1]:443:web:443", *args)
    assert second.returncode == 0, second.stderr
    assert "already persisted" in second.stdout and "wrote" not in second.stdout
    assert snapshot(tree) == after_first
    assert {p: p.lstat().st_mtime_ns for p in tree.rglob("*")} == mtimes


def test_other_settings_are_refused_unless_replace(tree: Path, qrexec_client_vm: str) -> None:
    qcv = ["--qrexec-client-vm", qrexec_client_vm]
    add(tree, "8080:web:80", *qcv).check_returncode()
    before = snapshot(tree)
    refused = add(tree, "8080:web:80", "--max-connections", "8", *qcv)
    assert_one_line_error(refused, "already persisted with different settings", "--replace")
    assert snapshot(tree) == before

    replaced = add(tree, "8080:web:80", "--mode", "daemon", "--replace")
    assert replaced.returncode == 0, replaced.stderr
    socket = (tree / USER_UNITS / "qconnect-bind-127.0.0.1-8080-web-80.socket").read_text()
    assert "Accept=no" in socket
    assert not (tree / USER_UNITS / "qconnect-bind-127.0.0.1-8080-web-80@.service").exists()
    assert (tree / USER_UNITS / "qconnect-bindings.service").exists()


def test_a_second_binding_on_the_same_address_is_refused(tree: Path, qrexec_client_vm: str) -> None:
    qcv = ["--qrexec-client-vm", qrexec_client_vm]
    add(tree, "8080:web:80", *qcv).check_returncode()
    before = snapshot(tree)
    assert_one_line_error(add(tree, "8080:work:80", *qcv), "already does", "--replace")
    assert_one_line_error(add(tree, "0.0.0.0:8080:work:80", *qcv), "already does")
    assert snapshot(tree) == before
    exposed = add(tree, "0.0.0.0:8081:work:80", *qcv)
    assert "warning: 0.0.0.0 is not a loopback address" in exposed.stdout
    add(tree, "8080:work:80", "--replace", *qcv).check_returncode()
    names = sorted(os.listdir(tree / USER_UNITS))
    assert names == [
        "qconnect-bind-0.0.0.0-8081-work-80.socket",
        "qconnect-bind-0.0.0.0-8081-work-80@.service",
        "qconnect-bind-127.0.0.1-8080-work-80.socket",
        "qconnect-bind-127.0.0.1-8080-work-80@.service",
        "sockets.target.wants",
    ]


def test_a_file_it_did_not_generate_is_never_overwritten(tree: Path, qrexec_client_vm: str) -> None:
    units = tree / USER_UNITS
    units.mkdir(parents=True)
    (units / "qconnect-bind-127.0.0.1-8080-web-80@.service").write_text("[Service]\n# mine\n")
    before = snapshot(tree)
    result = add(tree, "8080:web:80", "--qrexec-client-vm", qrexec_client_vm)
    assert_one_line_error(result, "refusing to overwrite", "did not generate")
    assert snapshot(tree) == before


def test_privileged_ports_need_the_system_manager(tree: Path, qrexec_client_vm: str) -> None:
    before = snapshot(tree)
    result = add(tree, "80:web:80", "--user", "--qrexec-client-vm", qrexec_client_vm)
    assert_one_line_error(result, "local port 80", "--system", code=2)
    assert snapshot(tree) == before
    default = add(
        tree, "80:web:80", "--persistence", "full", "--qrexec-client-vm", qrexec_client_vm
    )
    assert default.returncode == 0, default.stderr
    assert (tree / SYSTEM_UNITS / "qconnect-bind-127.0.0.1-80-web-80.socket").exists()


@pytest.mark.parametrize(
    ("args", "words", "code"),
    [
        (["add", "8080"], ["invalid binding '8080'"], 2),
        (["add", "8080:web:0x50"], ["invalid remote port '0x50'"], 2),
        (["add", "8080:bad name:80"], ["invalid qube name"], 2),
        (["add", "8080:web:80", "--max-connections", "500"], ["--max-connections", "'500'"], 2),
        (["add", "8080:web:80", "--mode", "daemon", "--relay", "socat"], ["per-connection"], 2),
        (["add", "8080:web:80", "--qrexec-client-vm", "rel/path"], ["rel/path"], 2),
        (["add", "8080:web:80", "--qrexec-client-vm", "/nonexistent/q"], ["/nonexistent/q"], 1),
        (["remove", "8080:web:80"], ["no binding 127.0.0.1:8080:web:80 is persisted"], 1),
        (["show", "8080:web:80"], ["no binding"], 1),
    ],
)
def test_bad_input_is_one_clear_line_and_changes_nothing(
    tree: Path, args: list[str], words: list[str], code: int
) -> None:
    before = snapshot(tree)
    assert_one_line_error(run_persist(*args, "--root", str(tree)), *words, code=code)
    assert snapshot(tree) == before


def test_a_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    result = run_persist("list", "--root", str(tmp_path / "nope"))
    assert_one_line_error(result, "invalid --root")


def test_a_symlinked_rc_local_is_neither_read_nor_written(
    tree: Path, qrexec_client_vm: str
) -> None:
    (tree / "rw/config/rc.local").rename(tree / "rw/config/rc.local.real")
    (tree / "rw/config/rc.local").symlink_to("rc.local.real")
    before = snapshot(tree)
    result = add(
        tree, "444::444", "--persistence", "rw-only", "--qrexec-client-vm", qrexec_client_vm
    )
    assert_one_line_error(result, "rc.local", "symbolic link", code=1)
    assert snapshot(tree) == before


@pytest.mark.parametrize("failing", ["rc.local", "qconnect-bind-", "sockets.target.wants"])
def test_a_failure_half_way_undoes_every_earlier_step(
    tree: Path, failing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whichever step fails, every file and directory the earlier steps made is taken back."""
    (tree / "rw/config/rc.local").write_text(
        "#!/bin/sh\n" + "".join(rclocal.render_block(["qconnect-bind-old.socket"]))
    )
    before = snapshot(tree)
    real_write, real_symlink = Tree.write, Tree.symlink

    def write(self: Tree, path: Path, data: bytes, mode: int) -> None:
        if failing in str(path) and (tree / "usr/local/lib/systemd").exists():
            raise TreeError(f"cannot write {path}: injected failure")
        real_write(self, path, data, mode)

    def symlink(self: Tree, path: Path, target: str) -> None:
        if failing in str(path):
            raise TreeError(f"cannot link {path}: injected failure")
        real_symlink(self, path, target)

    monkeypatch.setattr(Tree, "write", write)
    monkeypatch.setattr(Tree, "symlink", symlink)
    binding = Binding(parse_spec("444::444"), Scope.SYSTEM, Mode.PER_CONNECTION)
    layout = UnitPaths(root=tree, config_home=PurePosixPath("/home/user/.config"))
    request = AddRequest(binding, Persistence.FULL if "wants" in failing else Persistence.RW_ONLY,
                         None)  # fmt: skip
    with pytest.raises(TreeError, match="injected failure; nothing was changed"):
        install_and_start(layout, request, load_templates(), lambda _layout, _scope: None)
    assert snapshot(tree) == before


@pytest.fixture
def world_readable_tree() -> Iterator[Path]:
    """A tree another user can reach (pytest's tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="qconnect-persist-"))
    base.chmod(0o755)
    try:
        yield make_qube_tree(base / "qube")
    finally:
        shutil.rmtree(base)


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def reachable_by_others(path: Path) -> bool:
    """Whether a user with no rights of its own can execute ``path`` (every parent searchable)."""
    path = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


def nobody_python() -> str:
    """An interpreter ``nobody`` can run: the checkout, and so its venv, may sit in a 0700 home."""
    for candidate in (sys.executable, getattr(sys, "_base_executable", ""), "/usr/bin/python3"):
        if candidate and Path(candidate).exists() and reachable_by_others(Path(candidate)):
            return candidate
    pytest.skip("no Python interpreter that user nobody can reach")


def run_as_nobody(base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``qconnect persist ARGS`` as nobody, from a copy of the package under ``base``.

    ``base`` is world-readable; the copy keeps this test independent of where the
    checkout lives (`persist` needs only the standard library).
    """
    package = base / "pythonpath" / "qconnect"
    if not package.exists():  # a source checkout's layout: the package and its templates
        for name in ("qconnect", "systemd-units", "rpc-services"):
            source = Path(__file__).parents[1] / name
            shutil.copytree(
                source, package.parent / name, ignore=shutil.ignore_patterns("__pycache__")
            )
    return subprocess.run(
        [*NOBODY, nobody_python(), "-m", "qconnect.cli", "persist", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env={**os.environ, "HOME": "/home/user", "PYTHONPATH": str(package.parent)},
        check=False,
    )


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_unwritable_places_give_a_clear_error_and_no_half_written_binding(
    world_readable_tree: Path, qrexec_client_vm: str, tmp_path: Path
) -> None:
    tree = world_readable_tree
    tool = fake_executable(tree.parent / "bin" / "qrexec-client-vm")
    before = snapshot(tree)
    whole = run_as_nobody(tree.parent, "add", "8080:web:80", "--root", str(tree),
                          "--relay", "handoff", "--qrexec-client-vm", str(tool))  # fmt: skip
    assert_one_line_error(whole, "Permission denied", "nothing was changed", code=1)
    assert snapshot(tree) == before

    # Units may be written, rc.local may not: the units written first are taken back.
    (tree / "usr/local/lib").chmod(0o777)
    before = snapshot(tree)
    half = run_as_nobody(tree.parent, "add", "444::444", "--root", str(tree),
                         "--persistence", "rw-only", "--relay", "handoff",
                         "--qrexec-client-vm", str(tool))  # fmt: skip
    assert_one_line_error(half, "rc.local", "Permission denied", "nothing was changed", code=1)
    assert snapshot(tree) == before


def test_the_boot_link_is_the_one_systemctl_enable_makes(
    tree: Path, tmp_path: Path, qrexec_client_vm: str
) -> None:
    add(tree, "127.0.0.2:22:work:22", "--persistence", "full", "--qrexec-client-vm",
        qrexec_client_vm).check_returncode()  # fmt: skip
    name = "qconnect-bind-127.0.0.2-22-work-22.socket"
    ours = os.readlink(tree / SYSTEM_WANTS / name)

    reference = tmp_path / "reference"
    (reference / SYSTEM_UNITS).mkdir(parents=True)
    shutil.copy(tree / SYSTEM_UNITS / name, reference / SYSTEM_UNITS / name)
    subprocess.run(
        ["systemctl", f"--root={reference}", "enable", name],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert os.readlink(reference / SYSTEM_WANTS / name) == ours


def test_show_prints_the_unit_files_and_where_they_start(tree: Path, qrexec_client_vm: str) -> None:
    add(tree, "444::444", "--persistence", "rw-only", "--mode", "daemon").check_returncode()
    shown = run_persist("show", "444::444", "--root", str(tree), check=True).stdout
    assert f"# {tree / SYSTEM_UNITS}/qconnect-bind-127.0.0.1-444-\\x40default-444.socket" in shown
    assert "FileDescriptorName=@default+444" in shown
    assert f"# {tree / SYSTEM_UNITS}/qconnect-bindings.service" in shown
    assert "rc.local starts qconnect-bind-127.0.0.1-444-\\x40default-444.socket at boot" in shown


def test_replacing_the_last_daemon_mode_binding_takes_its_service_away(
    tree: Path, qrexec_client_vm: str
) -> None:
    before = snapshot(tree)
    add(tree, "8080:web:80", "--mode", "daemon").check_returncode()
    add(tree, "8081:web:81", "--mode", "daemon").check_returncode()
    qcv = ["--qrexec-client-vm", qrexec_client_vm]
    add(tree, "8080:web:80", "--replace", *qcv).check_returncode()
    assert (tree / USER_UNITS / "qconnect-bindings.service").exists()  # 8081 still needs it
    add(tree, "8081:web:81", "--replace", *qcv).check_returncode()
    assert not (tree / USER_UNITS / "qconnect-bindings.service").exists()
    run_persist("remove", "--all", "--root", str(tree), check=True)
    assert snapshot(tree) == before


def test_concurrent_adds_each_keep_their_line_in_rc_local(
    tree: Path, qrexec_client_vm: str
) -> None:
    """The lock serialises read-modify-write: no add loses another's rc.local entry."""
    ports = [441, 442, 443, 445, 446, 447]
    common = ["--root", str(tree), "--persistence", "rw-only", "--relay", "handoff"]
    common += ["--qrexec-client-vm", qrexec_client_vm]
    command = [sys.executable, "-m", "qconnect.cli", "persist", "add"]
    processes = [
        subprocess.Popen(
            [*command, f"{port}::{port}", *common],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=persist_env(),
        )
        for port in ports
    ]
    for process in processes:
        _out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
    text = (tree / "rw/config/rc.local").read_text()
    assert rclocal.units_in_block(text) == sorted(
        f"qconnect-bind-127.0.0.1-{port}-\\x40default-{port}.socket" for port in ports
    )


@pytest.mark.parametrize(
    "command",
    [
        ["list"],
        ["remove", "--all"],
        ["add", "444::444", "--persistence", "rw-only", "--relay", "handoff"],
    ],
)
def test_a_hand_edited_rc_local_block_is_one_line_naming_the_file_and_line(
    tree: Path, command: list[str]
) -> None:
    rc_local = tree / "rw/config/rc.local"
    block = "".join(rclocal.render_block(["qconnect-bind-a.socket"]))
    rc_local.write_text("#!/bin/sh\n" + block.replace(" qconnect-bind-a.socket", " 'x \x1b[2J"))
    before = snapshot(tree)
    result = run_persist(*command, "--root", str(tree))
    assert_one_line_error(result, f"{rc_local}:8: cannot read qconnect's line", "\\x1b[2J")
    assert snapshot(tree) == before
