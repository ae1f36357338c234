"""service install in a template or standalone qube: /etc, tmpfiles.d into /run, real tools.

The template layout only works if systemd-tmpfiles really recreates our
/run entries at every boot and systemd accepts the units, so both are run
for real on a --root tree; the package's own files (the stock symlink and
rpc-config) must come out of every round trip untouched.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qconnect.cli import main
from qconnect.core.errors import ServiceError
from qconnect.core.persistence import Persistence, detect_persistence
from qconnect.loopback.machine import Machine
from qconnect.service.install import (
    RPC_CONFIG,
    RUN_RPC_CONFIG,
    RUN_SERVICE,
    RUN_SERVICE_TARGET,
    TEMPLATE_EXEC,
    TEMPLATE_MANIFEST,
    TMPFILES,
    WANTS_LINK,
    Layout,
    install,
    layout_for,
    render_tmpfiles,
    tmpfiles_argument,
    uninstall,
    unreachable_from_app_qubes,
)
from tests.cli_refusals import refusal_lines
from tests.persist_tree import fake_executable, install_analyze_support, snapshot

UNITS = Path("etc/systemd/system")
SOCKET_UNIT = UNITS / "qconnect-connecttcp.socket"
SERVICE_UNIT = UNITS / "qconnect-connecttcp.service"
STOCK_LINK = Path("etc/qubes-rpc/qubes.ConnectTCP")
STOCK_CONFIG = Path("etc/qubes/rpc-config/qubes.ConnectTCP")

needs_tmpfiles = pytest.mark.skipif(
    shutil.which("systemd-tmpfiles") is None, reason="needs systemd-tmpfiles"
)


def template_tree(root: Path) -> Path:
    """A template's root: the package's stock service and a few files of the admin's own."""
    (root / STOCK_LINK).parent.mkdir(parents=True)
    (root / STOCK_LINK).symlink_to("/dev/tcp/127.0.0.1")
    (root / STOCK_CONFIG).parent.mkdir(parents=True)
    (root / STOCK_CONFIG).write_text("skip-service-descriptor=true\nexit-on-service-eof=true\n")
    (root / UNITS / "sockets.target.wants").mkdir(parents=True)
    (root / UNITS / "admins-own.service").write_text("[Service]\nExecStart=/bin/true\n")
    (root / "etc/tmpfiles.d").mkdir()
    (root / "etc/tmpfiles.d/admins-own.conf").write_text("d /run/admin 0755 root root -\n")
    return root


def cli(*args: str) -> int:
    return main(["service", *args])


def tmpfiles_create(tree: Path) -> None:
    """What systemd-tmpfiles-setup.service does at boot, on the tree's own tmpfiles.d files."""
    subprocess.run(
        ["systemd-tmpfiles", f"--root={tree}", "--create", str(tree / TMPFILES)],
        capture_output=True,
        timeout=30,
        check=True,
    )


def test_template_socket_install_keeps_everything_in_etc_and_enables_the_socket(
    tmp_path: Path,
) -> None:
    tree = template_tree(tmp_path / "tree")
    assert cli("install", "--socket", "--layout", "template", "--root", str(tree)) == 0
    exe = tree / TEMPLATE_EXEC
    assert os.access(exe, os.X_OK) and exe.read_text().startswith(f"#!{sys.executable} -IS\n")
    # Exactly the link `systemctl enable` writes for WantedBy=sockets.target.
    assert os.readlink(tree / WANTS_LINK) == "/etc/systemd/system/qconnect-connecttcp.socket"
    socket_unit = (tree / SOCKET_UNIT).read_text()
    assert "ListenStream=/run/qubes-rpc/qubes.ConnectTCP\n" in socket_unit
    assert "ExecStartPre=rm -f /run/qubes-rpc/qubes.ConnectTCP\n" in socket_unit
    assert "--layout template" in socket_unit
    assert (
        f"ExecStart={sys.executable} -m qconnect.cli service run\n"
        in (tree / SERVICE_UNIT).read_text()
    )
    # /run as systemd-tmpfiles leaves it at boot, written now.
    assert (tree / RUN_RPC_CONFIG).read_text() == RPC_CONFIG
    assert os.readlink(tree / RUN_SERVICE) == RUN_SERVICE_TARGET
    assert (tree / RUN_SERVICE).resolve() == exe.resolve()
    # Nothing where an app qube keeps things, and the package's files untouched.
    assert not (tree / "usr").exists() and not (tree / "rw").exists()
    assert os.readlink(tree / STOCK_LINK) == "/dev/tcp/127.0.0.1"
    assert (tree / STOCK_CONFIG).read_text().startswith("skip-service-descriptor=true")


@needs_tmpfiles
@pytest.mark.parametrize("form", ["socket", "exec"])
def test_systemd_tmpfiles_recreates_the_rpc_config_and_the_link_at_boot(
    tmp_path: Path, form: str
) -> None:
    tree = template_tree(tmp_path / "tree")
    install(tree, form, layout=Layout.TEMPLATE)
    installed = snapshot(tree / "run")
    shutil.rmtree(tree / "run")  # a reboot: /run is a fresh tmpfs
    tmpfiles_create(tree)
    assert snapshot(tree / "run") == installed
    assert (tree / RUN_RPC_CONFIG).read_bytes() == RPC_CONFIG.encode()
    assert (tree / RUN_RPC_CONFIG).stat().st_mode & 0o777 == 0o644
    assert (tree / RUN_SERVICE).resolve() == (tree / TEMPLATE_EXEC).resolve()


@needs_tmpfiles
def test_tmpfiles_argument_survives_escapes_and_specifiers(tmp_path: Path) -> None:
    """The escaping is checked against systemd-tmpfiles itself, not against our idea of it."""
    text = "back\\slash 100% %n \\n literal\n  indented # not a comment\nlast line\n"
    conf = tmp_path / "t.conf"
    conf.write_text(f"f+ /run/probe 0644 - - - {tmpfiles_argument(text)}\n")
    subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(conf)],
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert (tmp_path / "run/probe").read_text() == text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_template_units_pass_systemd_analyze_verify_in_the_tree(tmp_path: Path) -> None:
    tree = template_tree(tmp_path / "tree")
    install_analyze_support(tree)
    # verify --root looks up every Exec*= program inside the tree.
    for program in ("usr/bin/rm", "usr/bin/systemd-tmpfiles", sys.executable.lstrip("/")):
        fake_executable(tree / program)
    install(tree, "socket", layout=Layout.TEMPLATE)

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["systemd-analyze", "verify", f"--root={tree}", "--man=no",
             f"/{SOCKET_UNIT}", f"/{SERVICE_UNIT}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    result = verify()
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # The check is real: without rm in the tree the socket's ExecStartPre fails it.
    (tree / "usr/bin/rm").unlink()
    broken = verify()
    assert broken.returncode != 0 and "rm" in broken.stderr


@needs_tmpfiles
@pytest.mark.parametrize("form", ["socket", "exec"])
def test_round_trip_leaves_the_template_byte_for_byte_as_before(tmp_path: Path, form: str) -> None:
    tree = template_tree(tmp_path / "tree")
    before = snapshot(tree)
    assert cli("install", f"--{form}", "--layout", "template", "--root", str(tree)) == 0
    first = snapshot(tree)
    # Idempotent: again, the same tree (the manifest records the same paths).
    assert cli("install", f"--{form}", "--layout", "template", "--root", str(tree)) == 0
    assert snapshot(tree) == first
    tmpfiles_create(tree)  # a boot in between changes nothing we do not own
    assert cli("uninstall", "--root", str(tree)) == 0
    assert snapshot(tree) == before


def test_switching_layout_leaves_one_set_of_files(tmp_path: Path) -> None:
    tree = template_tree(tmp_path / "tree")
    before = snapshot(tree)
    install(tree, "socket", layout=Layout.APP_QUBE)
    assert (tree / "usr/local/etc/qubes-rpc/qubes.ConnectTCP").exists()
    install(tree, "socket", layout=Layout.TEMPLATE)
    assert not (tree / "usr").exists() and not (tree / "rw").exists()
    install(tree, "exec", layout=Layout.TEMPLATE)
    assert not (tree / SOCKET_UNIT).exists() and not os.path.lexists(tree / WANTS_LINK)
    assert [manifest.layout for manifest in uninstall(tree)] == ["template"]
    assert snapshot(tree) == before


@pytest.mark.parametrize(
    ("layout", "path", "make"),
    [
        ("app-qube", Path("usr/local/etc/qubes-rpc/qubes.ConnectTCP"), "file"),
        ("app-qube", Path("usr/local/etc/qubes/rpc-config/qubes.ConnectTCP"), "file"),
        ("app-qube", Path("usr/local/lib/systemd/system/qconnect-connecttcp.socket"), "link"),
        ("template", TEMPLATE_EXEC, "file"),
        ("template", TMPFILES, "file"),
        ("template", WANTS_LINK, "link"),
        ("template", RUN_SERVICE, "link"),
        ("template", RUN_RPC_CONFIG, "file"),
    ],
)
def test_install_refuses_to_replace_what_it_did_not_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str, path: Path, make: str
) -> None:
    tree = template_tree(tmp_path / "tree")
    (tree / path).parent.mkdir(parents=True, exist_ok=True)
    if make == "file":
        (tree / path).write_text("#!/bin/sh\nexec the-admins-own\n")
    else:
        (tree / path).symlink_to("/somewhere/else")
    before = snapshot(tree)
    assert cli("install", "--socket", "--layout", layout, "--root", str(tree)) == 1
    assert capsys.readouterr().err == (
        f"qconnect: error: refusing to replace {tree / path}: not installed by qconnect\n"
    )
    assert snapshot(tree) == before


def test_with_root_the_layout_must_be_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("install", "--root", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert refusal_lines(err) == [
        "qconnect service install: error: with --root, give --layout app-qube or --layout "
        "template: "
        "the kind of qube a tree belongs to cannot be detected"
    ]
    assert err.startswith("usage: qconnect service install ")
    assert snapshot(tmp_path) == {}


def fake_qubesdb(tmp_path: Path, answer: str | None) -> dict[str, str]:
    """An environment whose qubesdb-read answers ``/qubes-vm-persistence`` with ``answer``."""
    bin_dir = tmp_path / "fake-bin"
    script = (
        "#!/bin/sh\nexit 2\n"
        if answer is None
        else f'#!/bin/sh\n[ "$1" = /qubes-vm-persistence ] || exit 1\necho {answer}\n'
    )
    fake = bin_dir / "qubesdb-read"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(script)
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("rw-only", Persistence.RW_ONLY),
        ("full", Persistence.FULL),
        ("none", Persistence.NONE),
        ("nonsense", Persistence.FULL),
        (None, Persistence.FULL),  # qubesdb-read fails: not a qube
    ],
)
def test_persistence_is_read_from_qubesdb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: str | None, expected: Persistence
) -> None:
    monkeypatch.setenv("PATH", fake_qubesdb(tmp_path, answer)["PATH"])
    assert detect_persistence() is expected


def test_each_persistence_gets_its_layout(tmp_path: Path) -> None:
    assert layout_for(Persistence.RW_ONLY, tmp_path) is Layout.APP_QUBE
    assert layout_for(Persistence.FULL, tmp_path) is Layout.TEMPLATE
    # An app qube whose template installed the service: the template's copy runs here.
    install(tmp_path, "exec", layout=Layout.TEMPLATE)
    assert (tmp_path / TEMPLATE_MANIFEST).exists()
    with pytest.raises(ServiceError, match="has the service from its template"):
        layout_for(Persistence.RW_ONLY, tmp_path)
    assert layout_for(Persistence.FULL, tmp_path) is Layout.TEMPLATE  # the template itself


def test_a_disposable_is_refused_in_one_line_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real command line at /, in a child process, with qubesdb saying "none"."""
    env = fake_qubesdb(tmp_path, "none")
    # This command runs on the real /: make sure first that it will see a disposable.
    monkeypatch.setenv("PATH", env["PATH"])
    assert detect_persistence() is Persistence.NONE
    result = subprocess.run(
        [sys.executable, "-m", "qconnect.cli", "service", "install", "--socket"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == (
        "qconnect: error: this is a disposable qube: nothing installed in it survives its "
        "shutdown; install the service in its disposable template (or in that one's "
        "template) instead\n"
    )
    assert not Path("/", TEMPLATE_MANIFEST).exists()
    assert not Path("/usr/local/etc/qconnect/service-install.json").exists()


def test_tmpfiles_file_says_what_made_it_and_how_to_remove_it() -> None:
    text = render_tmpfiles("qconnect service install --exec --layout template")
    lines = text.splitlines()
    assert lines[0] == "# Generated by `qconnect service install --exec --layout template`."
    assert lines[1] == "# Remove with `qconnect service uninstall`."
    entries = [line for line in lines if not line.startswith("#")]
    assert [line.split()[:2] for line in entries] == [
        ["f+", "/run/qubes/rpc-config/qubes.ConnectTCP"],
        ["L+", "/run/qubes-rpc/qubes.ConnectTCP"],
    ]


# --- end to end through the loopback qrexec ------------------------------------


@pytest.fixture
def web() -> Iterator[Machine]:
    """Qube "work" calls qube "web", which has the stock service of today's Qubes.

    The machine lives in a short directory: the socket's path inside web's
    root must fit a unix socket address (108 bytes), which pytest's tmp_path
    does not leave room for.
    """
    with tempfile.TemporaryDirectory(prefix="qc-tmpl-") as directory:
        yield Machine.create(
            Path(directory) / "m", ["work", "web"], policy=["qubes.ConnectTCP * work web allow"]
        )


def call_an_upper_echo(web: Machine, host: str) -> tuple[int, "subprocess.CompletedProcess[bytes]"]:
    """Call qubes.ConnectTCP from work to web, to a one-shot server on ``host`` that answers
    what it read in capitals: (its port, the call's outcome)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as server:
        server.bind((host, 0))
        server.listen(1)
        port: int = server.getsockname()[1]

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
                conn.sendall(data.upper())

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        result = web.run(
            "work", web.call_argv("web", f"qubes.ConnectTCP+{port}"),
            input=b"hello", capture_output=True, timeout=60,
        )  # fmt: skip
        thread.join(20)
    return port, result


@needs_tmpfiles
def test_a_call_reaches_the_executable_systemd_tmpfiles_linked_into_run(web: Machine) -> None:
    root = web.root_dir("web")
    install(root, "exec", layout=Layout.TEMPLATE)
    shutil.rmtree(root / "run")
    tmpfiles_create(root)  # the boot: only systemd-tmpfiles puts the service in place
    # On [::1] only: the stock /dev/tcp/127.0.0.1 cannot reach it, our executable can.
    _port, result = call_an_upper_echo(web, "::1")
    assert (result.returncode, result.stdout) == (0, b"HELLO"), result.stderr


@needs_tmpfiles
@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate"
)
def test_a_call_reaches_the_socket_service_with_the_tmpfiles_rpc_config(
    web: Machine, tmp_path: Path
) -> None:
    """The descriptor reaches the service only if our /run rpc-config beats the stock one."""
    root = web.root_dir("web")
    install(root, "socket", layout=Layout.TEMPLATE)
    shutil.rmtree(root / "run")
    tmpfiles_create(root)
    # What the socket unit does: its ExecStartPre takes the link away, then it binds.
    (root / RUN_SERVICE).unlink()
    process = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(root / RUN_SERVICE),
         sys.executable, "-m", "qconnect.cli", "service", "run",
         "--socket", str(tmp_path / "unused.sock"), "--allow-file", str(tmp_path / "no.allow")],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for _ in range(100):  # it binds before it starts the service
            if (root / RUN_SERVICE).is_socket():
                break
            subprocess.run(["sleep", "0.1"], check=True)
        port, result = call_an_upper_echo(web, "127.0.0.1")
    finally:
        process.terminate()
        err = process.communicate(timeout=30)[1]
    assert result.stdout == b"HELLO", (result.stderr, err)
    assert f"call from work to 127.0.0.1:{port}" in err


@pytest.mark.parametrize(
    ("answer", "option", "expected", "warning"),
    [
        ("rw-only", None, Layout.APP_QUBE, ""),
        ("full", None, Layout.TEMPLATE, ""),
        ("rw-only", "app-qube", Layout.APP_QUBE, ""),
        ("rw-only", "template", Layout.TEMPLATE, "this is an app qube: its /etc comes from"),
        ("full", "app-qube", Layout.APP_QUBE, "this is a template or standalone qube"),
        ("none", "template", Layout.TEMPLATE, "this is a disposable qube: the installation"),
    ],
)
def test_the_command_line_detects_the_layout_and_warns_when_told_otherwise(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    answer: str,
    option: str | None,
    expected: Layout,
    warning: str,
) -> None:
    """The layout choice of ``service install`` on a live qube (choosing writes nothing)."""
    from qconnect.service.cli import _layout

    monkeypatch.setenv("PATH", fake_qubesdb(tmp_path, answer)["PATH"])
    assert _layout(option, live=True) is expected
    err = capsys.readouterr().err
    assert err.startswith(f"qconnect: warning: {warning}") if warning else err == ""


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="needs systemctl")
def test_the_wants_link_is_exactly_what_systemctl_enable_makes(tmp_path: Path) -> None:
    """systemctl --root works offline: it sees the socket enabled, and its own enable and
    disable reproduce and remove exactly our link."""
    tree = template_tree(tmp_path / "tree")
    install(tree, "socket", layout=Layout.TEMPLATE)

    def systemctl(*words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["systemctl", f"--root={tree}", *words, "qconnect-connecttcp.socket"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    assert systemctl("is-enabled").stdout.strip() == "enabled"
    ours = os.readlink(tree / WANTS_LINK)
    assert systemctl("disable").returncode == 0
    assert not os.path.lexists(tree / WANTS_LINK)
    assert systemctl("enable").returncode == 0
    assert os.readlink(tree / WANTS_LINK) == ours


@needs_tmpfiles
def test_the_socket_unit_stop_command_puts_the_link_back_in_place_of_the_dead_socket() -> None:
    """ExecStopPost, run as written in the unit (with --root added to reach the tree)."""
    # A short tree: the socket's path in it must fit a unix socket address.
    with tempfile.TemporaryDirectory(prefix="qc-stop-") as directory:
        tree = template_tree(Path(directory))
        install(tree, "socket", layout=Layout.TEMPLATE)
        lines = (tree / SOCKET_UNIT).read_text().splitlines()
        assert "RemoveOnStop=no" in lines
        (stop_post,) = [line.split("=", 1)[1] for line in lines if line.startswith("ExecStopPost=")]
        program, *arguments = stop_post.removeprefix("-").split()
        # The stopped socket: its file is still there, dead; the admin changed the rpc-config.
        (tree / RUN_SERVICE).unlink()
        with socket.socket(socket.AF_UNIX) as dead:
            dead.bind(str(tree / RUN_SERVICE))
        (tree / RUN_RPC_CONFIG).write_text("changed by the admin since boot\n")
        # A config file named on the command line is not looked up under --root.
        arguments = [str(tree) + word if word == f"/{TMPFILES}" else word for word in arguments]
        subprocess.run([program, f"--root={tree}", *arguments], timeout=30, check=True)
        assert os.readlink(tree / RUN_SERVICE) == RUN_SERVICE_TARGET
        assert (tree / RUN_RPC_CONFIG).read_text() == "changed by the admin since boot\n"


def test_what_a_templates_app_qubes_would_miss_is_named() -> None:
    assert unreachable_from_app_qubes("/usr/bin/python3", ["/usr/lib/python3/dist-packages"]) == []
    assert unreachable_from_app_qubes("/opt/qconnect/bin/python", ["/opt/qconnect/lib"]) == []
    assert unreachable_from_app_qubes(
        "/usr/bin/python3", ["/usr/local/lib/python3.11/dist-packages", "/usr/lib/python3"]
    ) == ["/usr/local/lib/python3.11/dist-packages"]
    assert unreachable_from_app_qubes("/home/user/venv/bin/python", []) == [
        "/home/user/venv/bin/python"
    ]
    assert unreachable_from_app_qubes("/rw/../usr/local/bin/python3", []) != []
    assert unreachable_from_app_qubes("/usr/localized/python3", []) == []


def test_a_template_install_warns_when_qconnect_lives_where_app_qubes_cannot_see_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import qconnect.service.install as install_module

    site = "/usr/local/lib/python3.11/dist-packages"
    monkeypatch.setattr(install_module, "_search_path", lambda: [site])
    assert cli("install", "--exec", "--layout", "template", "--root", str(tmp_path)) == 0
    err = capsys.readouterr().err
    assert err == (
        f"qconnect: warning: the service runs from {site}, which a template's app qubes do "
        "not get (a standalone qube does): install qconnect under /usr or /opt in the template\n"
    )
    assert cli("install", "--exec", "--layout", "app-qube", "--root", str(tmp_path)) == 0
    assert capsys.readouterr().err == ""  # an app qube keeps its /usr/local


def test_layout_with_rpc_dir_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("install", "--rpc-dir", str(tmp_path), "--layout", "template") == 2
    assert refusal_lines(capsys.readouterr().err) == [
        "qconnect service install: error: --layout goes with a whole install, not with --rpc-dir"
    ]
    assert snapshot(tmp_path) == {}


def test_a_manifest_from_before_layouts_is_still_uninstalled(tmp_path: Path) -> None:
    install(tmp_path, "exec", layout=Layout.APP_QUBE)
    manifest = tmp_path / "usr/local/etc/qconnect/service-install.json"
    old = json.loads(manifest.read_text())
    del old["layout"], old["links"]
    manifest.write_text(json.dumps(old))
    assert [item.layout for item in uninstall(tmp_path)] == ["app-qube"]
    assert snapshot(tmp_path) == {}


def test_a_template_install_does_not_depend_on_rc_local(tmp_path: Path) -> None:
    """The template layout has nothing in rc.local: a link there (even out of the tree) is left."""
    tree = template_tree(tmp_path / "tree")
    (tree / "rw/config").mkdir(parents=True)
    (tree / "rw/config/rc.local").symlink_to("/etc/shadow")
    assert cli("install", "--socket", "--layout", "template", "--root", str(tree)) == 0
    assert cli("uninstall", "--root", str(tree)) == 0
    assert os.readlink(tree / "rw/config/rc.local") == "/etc/shadow"
