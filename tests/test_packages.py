"""The native packages: built from a copy of the tree, unpacked, and run as a distribution would.

The .deb is run with Debian's own ``/usr/bin/python3`` and Debian's
python3-trio and python3-systemd (not the venv's), from the files
``dpkg -x`` unpacked; the RPMs are unpacked with rpm2cpio and cpio. Every
build goes to a temporary directory: the checkout is never written to.
"""

import argparse
import ast
import functools
import gzip
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qconnect import __version__, cli
from qconnect.client import cli as client_cli
from qconnect.client.outcome import policy_allow_command
from qconnect.loopback.machine import Machine
from tests.client_world import free_port

SOURCE = Path(__file__).resolve().parent.parent
BUILD = SOURCE / "packaging" / "build.sh"
DEBIAN_PYTHON = "/usr/bin/python3"
DEB_SITE = Path("usr/lib/python3/dist-packages")

#: Building a package copies the tree and runs the distribution's tools: a few
#: seconds, much more on a loaded 2-core machine.
BUILD_TIMEOUT = 180
RUN_TIMEOUT = 60

#: What setup installs for these tests (one apt command).
APT_HINT = (
    "apt-get install dpkg-dev debhelper dh-python lintian rpm rpm2cpio cpio mandoc "
    "python3-trio python3-systemd"
)


def _missing(*commands: str) -> list[str]:
    return [command for command in commands if shutil.which(command) is None]


def _debian_python_lacks() -> str | None:
    """Why Debian's python3 cannot run the package here, or None."""
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        return f"{DEBIAN_PYTHON} is missing"
    probe = subprocess.run(
        [DEBIAN_PYTHON, "-I", "-c", "import trio, systemd.journal"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    if probe.returncode != 0:
        return f"Debian's python3-trio or python3-systemd is missing ({APT_HINT})"
    return None


def _build(kind: str, out: Path) -> list[Path]:
    result = subprocess.run(
        [str(BUILD), kind, str(out)], capture_output=True, text=True, timeout=BUILD_TIMEOUT
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [Path(line) for line in result.stdout.split()]


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = _missing("dpkg-buildpackage", "dpkg-deb", "dh", "dh_python3")
    if missing:
        pytest.skip(f"cannot build the .deb without {' '.join(missing)} ({APT_HINT})")
    reason = _debian_python_lacks()
    if reason:
        pytest.skip(reason)
    (package,) = _build("deb", tmp_path_factory.mktemp("deb"))
    assert package.name == f"qconnect_{__version__}_all.deb"
    return package


@pytest.fixture(scope="module")
def deb_root(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deb-root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=RUN_TIMEOUT)
    return root


def _unpacked_env(root: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Debian's python3 finds qconnect in the unpacked tree, trio where apt put it."""
    env = dict(os.environ if base is None else base)
    for name in ("VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(root / DEB_SITE)
    env["PATH"] = os.pathsep.join([str(root / "usr/bin"), "/usr/bin", "/bin"])
    return env


def _run_unpacked(root: Path, command: str, *args: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [DEBIAN_PYTHON, str(root / "usr/bin" / command), *args],
        capture_output=True,
        text=True,
        env=_unpacked_env(root),
        cwd=root,
        timeout=RUN_TIMEOUT,
    )


def test_deb_holds_commands_service_units_man_pages_and_completion(deb_root: Path) -> None:
    files = {str(p.relative_to(deb_root)) for p in deb_root.rglob("*") if not p.is_dir()}
    expected = {
        "usr/bin/qconnect",
        "usr/bin/qvm-connect-tcp",
        "usr/lib/qconnect/qubes.ConnectTCP",
        "lib/systemd/system/qconnect-connecttcp.socket",
        "lib/systemd/system/qconnect-connecttcp.service",
        "usr/lib/tmpfiles.d/qconnect-connecttcp.conf",
        "usr/share/man/man1/qconnect.1.gz",
        "usr/share/man/man1/qvm-connect-tcp.1.gz",
        "usr/share/bash-completion/completions/qconnect",
        "usr/share/bash-completion/completions/qvm-connect-tcp",
        "usr/share/qconnect/rpc-services/qubes.ConnectTCP",
        f"{DEB_SITE}/qconnect/service/daemon.py",
        f"{DEB_SITE}/qconnect/client/cli.py",
    }
    assert expected <= files
    # Never the stock service's paths: those are qubes-core-agent-networking's.
    assert not any(f.startswith(("etc/qubes-rpc", "etc/qubes/rpc-config")) for f in files)
    assert not any("__pycache__" in f for f in files)
    for command in ("qconnect", "qvm-connect-tcp"):
        first = (deb_root / "usr/bin" / command).read_text().split("\n", 1)[0]
        assert first == f"#!{DEBIAN_PYTHON}"
    tmpfiles = (deb_root / "usr/lib/tmpfiles.d/qconnect-connecttcp.conf").read_text()
    assert "L+ /run/qubes-rpc/qubes.ConnectTCP - - - - /usr/lib/qconnect/qubes.ConnectTCP" in (
        tmpfiles
    )
    assert "skip-service-descriptor=false" in tmpfiles


def test_deb_depends_on_debians_trio_and_diverts_qubes_client(deb: Path, tmp_path: Path) -> None:
    fields = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Depends", "Recommends", "Version", "Architecture"],
        capture_output=True,
        text=True,
        check=True,
        timeout=RUN_TIMEOUT,
    ).stdout
    assert re.search(r"Depends:.*python3-trio \(>= 0\.22\)", fields)
    assert re.search(r"Depends:.*python3-systemd", fields)
    assert "Recommends: socat" in fields
    assert f"Version: {__version__}" in fields and "Architecture: all" in fields
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True, timeout=RUN_TIMEOUT)
    divert = "--divert /usr/bin/qvm-connect-tcp.qubes /usr/bin/qvm-connect-tcp"
    preinst = (control / "preinst").read_text()
    postrm = (control / "postrm").read_text()
    assert f"dpkg-divert --package qconnect --add --rename \\\n        {divert}" in preinst
    assert f"dpkg-divert --package qconnect --remove --rename \\\n        {divert}" in postrm
    for script in ("preinst", "postrm", "prerm", "postinst"):
        check = subprocess.run(["sh", "-n", str(control / script)], capture_output=True)
        assert check.returncode == 0, (script, check.stderr)


def test_lintian_reports_nothing_but_the_written_overrides(deb: Path) -> None:
    if _missing("lintian"):
        pytest.skip(f"lintian is not installed ({APT_HINT})")
    result = subprocess.run(
        ["lintian", "--fail-on", "error,warning,info,pedantic", "-I", "--pedantic", str(deb)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert result.returncode == 0 and result.stdout == "", result.stdout


def test_unpacked_deb_runs_with_debians_python_and_trio(deb_root: Path) -> None:
    help_text = _run_unpacked(deb_root, "qvm-connect-tcp", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert help_text.stdout.startswith("usage: qvm-connect-tcp")
    version = _run_unpacked(deb_root, "qconnect", "--version")
    assert (version.returncode, version.stdout) == (0, f"qconnect {__version__}\n")
    where = subprocess.run(
        [
            DEBIAN_PYTHON,
            "-c",
            "import qconnect.client.server, qconnect.service.daemon, trio, systemd;"
            "print(qconnect.__file__, trio.__file__, systemd.__file__)",
        ],
        capture_output=True,
        text=True,
        env=_unpacked_env(deb_root),
        cwd=deb_root,  # not the checkout: -c puts the working directory on sys.path
        timeout=RUN_TIMEOUT,
    )
    assert where.returncode == 0, where.stderr
    ours, trio_file, systemd_file = where.stdout.split()
    assert Path(ours).is_relative_to(deb_root)
    assert trio_file.startswith("/usr/lib/python3/dist-packages/")
    assert systemd_file.startswith("/usr/lib/python3/dist-packages/")


def test_unpacked_deb_serves_a_whole_loopback_call(
    deb_root: Path, tmp_path: Path, echo_server: int
) -> None:
    """Client, loopback qrexec and socket service all from the .deb, on Debian's python3."""
    machine_dir = tmp_path / "m"
    policy = f"qubes.ConnectTCP +{echo_server} work @default allow target=web"
    init = _run_unpacked(
        deb_root, "qconnect", "loopback", "init", str(machine_dir),
        "--qube", "work", "--qube", "web", "--policy", policy,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    machine = Machine(machine_dir)
    # web's socket service, as qconnect's own rpc-config asks qrexec to use it.
    (machine.rpc_config_dir("web") / "qubes.ConnectTCP").write_text(
        "skip-service-descriptor=false\nexit-on-service-eof=false\nexit-on-client-eof=false\n"
    )
    socket_path = machine.rpc_dir("web") / "qubes.ConnectTCP"
    service_log = tmp_path / "service.log"
    with service_log.open("w") as log:
        service = subprocess.Popen(
            [DEBIAN_PYTHON, str(deb_root / "usr/bin/qconnect"), "service", "run",
             "--socket", str(socket_path), "-v"],
            env=_unpacked_env(deb_root), stdout=log, stderr=subprocess.STDOUT, cwd=deb_root,
        )  # fmt: skip
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = machine.env_for("work", _unpacked_env(deb_root))
    env["XDG_RUNTIME_DIR"] = str(runtime)
    env.pop("NOTIFY_SOCKET", None)
    local_port = free_port()
    try:
        # READY=1 from the service says it listens; until then qrexec finds no socket.
        deadline_check = subprocess.run(
            [DEBIAN_PYTHON, "-c", _WAIT_FOR_SOCKET, str(socket_path), str(service.pid)],
            capture_output=True, text=True, timeout=RUN_TIMEOUT,
        )  # fmt: skip
        assert deadline_check.returncode == 0, service_log.read_text()
        client = subprocess.run(
            [DEBIAN_PYTHON, str(deb_root / "usr/bin/qvm-connect-tcp"),
             f"{local_port}::{echo_server}"],
            capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT, cwd=deb_root,
        )  # fmt: skip
        assert client.returncode == 0, client.stderr
        try:
            exchange = subprocess.run(
                [DEBIAN_PYTHON, "-c", _EXCHANGE, str(local_port)],
                input=b"hello through the .deb\n", capture_output=True, timeout=RUN_TIMEOUT,
            )  # fmt: skip
            assert exchange.stdout == b"hello through the .deb\n", exchange.stderr
        finally:
            stop = subprocess.run(
                [DEBIAN_PYTHON, str(deb_root / "usr/bin/qconnect"), "stop", "--all"],
                capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT, cwd=deb_root,
            )  # fmt: skip
            assert stop.returncode == 0, stop.stderr
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(RUN_TIMEOUT)
    assert f"call from work to 127.0.0.1:{echo_server}" in service_log.read_text()


#: Wait (by polling the file system, the only event there is) for the service's socket.
_WAIT_FOR_SOCKET = """
import os, stat, sys, time
path, pid = sys.argv[1], int(sys.argv[2])
end = time.monotonic() + 60
while time.monotonic() < end:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            sys.exit(0)
    except FileNotFoundError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the service exited")
    time.sleep(0.05)
sys.exit("no socket")
"""

#: Send stdin, then EOF, and print all that comes back until EOF.
_EXCHANGE = """
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30) as s:
    s.sendall(sys.stdin.buffer.read())
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
sys.stdout.buffer.write(data)
"""


# --- man pages: the shipped page and --help agree on every option -----------------------

_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][A-Za-z0-9-]*)")


def _help_options(help_text: str) -> set[str]:
    """Option names in the options section of an argparse --help text (not -h/--help)."""
    options = set()
    in_options = False
    for line in help_text.splitlines():
        if line and not line.startswith(" "):
            in_options = line.rstrip(":") in ("options", "optional arguments")
            continue
        if in_options:
            match = re.match(r"^  (-\S.*?)(?:  |$)", line)
            if match:
                options.update(_OPTION.findall(match.group(1)))
    return options - {"-h", "--help"}


def _help_subcommands(help_text: str) -> list[str]:
    """Subcommand names listed under ``positional arguments`` (argparse's layout)."""
    names = []
    lines = help_text.splitlines()
    for index, line in enumerate(lines):
        if re.fullmatch(r"  (COMMAND|ACTION)", line):
            for entry in lines[index + 1 :]:
                if not entry.startswith("    "):
                    break
                match = re.match(r"^    ([a-z][a-z0-9-]*)(?:\s|$)", entry)
                if match:
                    names.append(match.group(1))
    return names


def _live_help(argv: list[str], *, prog: str = "qconnect") -> str:
    """``--help`` of the live parsers in this checkout (what other changes make them)."""
    return _live_help_cached(tuple(argv), prog)


@functools.cache
def _live_help_cached(argv: tuple[str, ...], prog: str) -> str:
    # In process: the same parser objects and format_help() that --help prints.
    if prog == "qvm-connect-tcp":
        assert argv == ()
        return client_cli.build_parser().format_help()
    parser = cli.build_parser(list(argv))
    for word in argv:
        (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = subparsers.choices[word]
    return parser.format_help()


def _page_sections(page: str) -> dict[str, str]:
    """A man page's ``.SS "qconnect persist add"`` sections, by command words."""
    sections: dict[str, str] = {}
    name = None
    for line in page.splitlines():
        match = re.fullmatch(r'\.SS "(.*)"', line)
        if match:
            name = match.group(1).replace("\\-", "-")
            sections[name] = ""
        elif line.startswith(".SH"):
            name = None
        elif name is not None:
            sections[name] += line + "\n"
    return sections


def _page_options(section: str) -> set[str]:
    """Options named in a section's ``.TP`` headings."""
    lines = section.splitlines()
    headings = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line == ".TP"]
    text = re.sub(r"\\f[BIRP]", "", "\n".join(headings)).replace("\\-", "-")
    return set(_OPTION.findall(text))


def _command_tree(prog: str) -> Iterator[list[str]]:
    """Every command's words, found by reading --help from the top (as a user would)."""
    pending: list[list[str]] = [[]]
    while pending:
        words = pending.pop(0)
        yield words
        for name in _help_subcommands(_live_help(words, prog=prog)):
            pending.append([*words, name])


def _read_page(path: Path) -> str:
    data = path.read_bytes()
    return (gzip.decompress(data) if path.suffix == ".gz" else data).decode()


def test_man_page_sections_disagreeing_with_help_are_found() -> None:
    """The comparison itself: an option missing from a page, or extra in it, is seen."""
    help_text = (
        "usage: x\n\noptions:\n  -h, --help  show\n  -f, --foreground  stay\n  --bind ADDR  where\n"
    )
    page = ".TP\n\\fB\\-f\\fR, \\fB\\-\\-foreground\\fR\nstay\n"
    assert _help_options(help_text) == {"-f", "--foreground", "--bind"}
    assert _page_options(page) == {"-f", "--foreground"}


@pytest.mark.parametrize("prog", ["qconnect", "qvm-connect-tcp"])
def test_shipped_man_page_lists_exactly_the_options_of_every_help(
    deb_root: Path, prog: str
) -> None:
    page = _read_page(deb_root / f"usr/share/man/man1/{prog}.1.gz")
    sections = _page_sections(page)
    for words in _command_tree(prog):
        name = " ".join([prog, *words])
        assert name in sections, f"{prog}(1) has no section for {name!r}"
        help_options = _help_options(_live_help(words, prog=prog))
        assert _page_options(sections[name]) == help_options, name


def test_shipped_man_pages_are_clean_for_mandoc_and_groff(deb_root: Path) -> None:
    pages = sorted((deb_root / "usr/share/man/man1").glob("*.1.gz"))
    assert len(pages) == 2
    for path in pages:
        page = _read_page(path)
        if not _missing("mandoc"):
            lint = subprocess.run(
                ["mandoc", "-T", "lint", "-W", "warning"], input=page, capture_output=True,
                text=True, timeout=RUN_TIMEOUT,
            )  # fmt: skip
            assert (lint.returncode, lint.stdout) == (0, ""), lint.stdout
        if not _missing("groff"):
            groff = subprocess.run(
                ["groff", "-ww", "-man", "-Tutf8", "-z"], input=page, capture_output=True,
                text=True, timeout=RUN_TIMEOUT, env={**os.environ, "LC_ALL": "C.UTF-8"},
            )  # fmt: skip
            assert (groff.returncode, groff.stderr) == (0, ""), groff.stderr


# --- RPMs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rpm_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    missing = _missing("rpmbuild", "rpm2cpio", "cpio")
    if missing:
        pytest.skip(f"cannot build or unpack RPMs without {' '.join(missing)} ({APT_HINT})")
    out = tmp_path_factory.mktemp("rpm")
    packages = _build("rpm", out)
    roots = {}
    for package in packages:
        name = package.name.removesuffix(f"-{__version__}-1.noarch.rpm")
        root = tmp_path_factory.mktemp(f"{name}-root")
        cpio = subprocess.run(
            f"rpm2cpio {shlex.quote(str(package))} | cpio -idm --quiet",
            shell=True, cwd=root, capture_output=True, text=True, timeout=RUN_TIMEOUT,
        )  # fmt: skip
        assert cpio.returncode == 0, cpio.stderr
        roots[name] = root
    assert set(roots) == {"qconnect", "qconnect-dom0"}
    return roots


def _file_list(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


def test_template_rpm_leaves_qubes_paths_alone_and_puts_its_client_first(
    rpm_roots: dict[str, Path],
) -> None:
    root = rpm_roots["qconnect"]
    files = _file_list(root)
    assert {
        "usr/bin/qconnect",
        "usr/libexec/qconnect/bin/qvm-connect-tcp",
        "etc/profile.d/qconnect.sh",
        "usr/lib/qconnect/qubes.ConnectTCP",
        "usr/lib/systemd/system/qconnect-connecttcp.socket",
        "usr/lib/systemd/system/qconnect-connecttcp.service",
        "usr/lib/tmpfiles.d/qconnect-connecttcp.conf",
        "usr/share/man/man1/qconnect.1",
        "usr/share/man/man1/qvm-connect-tcp.1",
        "usr/share/bash-completion/completions/qvm-connect-tcp",
    } <= files
    # Qubes' own files (qubes-core-agent-networking) are never in the package.
    assert "usr/bin/qvm-connect-tcp" not in files
    assert not any(f.startswith(("etc/qubes-rpc", "etc/qubes/")) for f in files)
    assert any(
        re.fullmatch(r"usr/lib/python3\.\d+/site-packages/qconnect/cli\.py", f) for f in files
    )
    profile = (root / "etc/profile.d/qconnect.sh").read_text()
    path = subprocess.run(
        ["sh", "-c", 'PATH=/usr/bin:/bin; . "$1"; . "$1"; echo "$PATH"', "sh",
         str(root / "etc/profile.d/qconnect.sh")],
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert path.stdout == "/usr/libexec/qconnect/bin:/usr/bin:/bin\n", profile


def _imported_top_level(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


#: What dom0 itself ships that the policy tool may use (optionally, guarded): Qubes'
#: Admin API client, for a dom0 user without root.
DOM0_OWN = {"qubesadmin"}


def test_dom0_rpm_is_policy_only_on_the_standard_library(
    rpm_roots: dict[str, Path], tmp_path: Path
) -> None:
    root = rpm_roots["qconnect-dom0"]
    files = _file_list(root)
    assert {
        "usr/bin/qconnect",
        "usr/share/man/man1/qconnect.1",
        "usr/share/bash-completion/completions/qconnect",
    } <= files
    lib = root / "usr/share/qconnect-dom0"
    modules = {
        ".".join(p.relative_to(lib).with_suffix("").parts).removesuffix(".__init__")
        for p in lib.rglob("*.py")
    }
    for path in [*lib.rglob("*.py"), root / "usr/bin/qconnect"]:
        for name in _imported_top_level(path):
            top = name.split(".")[0]
            assert top in DOM0_OWN or top in sys.stdlib_module_names or name in modules, (
                path,
                name,
            )
    assert not any(f.endswith(("trio", "daemon.py", "loopback")) for f in files)
    # The front door works from the unpacked files, in isolated mode, with no
    # site-packages at all (-I -S): only the standard library is there.
    front = (root / "usr/bin/qconnect").read_text().replace("/usr/share/qconnect-dom0", str(lib))
    (tmp_path / "qconnect").write_text(front)
    run = [DEBIAN_PYTHON if os.access(DEBIAN_PYTHON, os.X_OK) else sys.executable, "-I", "-S"]
    version = subprocess.run(
        [*run, str(tmp_path / "qconnect"), "--version"], capture_output=True, text=True,
        timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert (version.returncode, version.stdout) == (0, f"qconnect {__version__}\n"), version.stderr
    other = subprocess.run(
        [*run, str(tmp_path / "qconnect"), "persist", "list"], capture_output=True, text=True,
        timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert other.returncode == 2 and "invalid choice: 'persist'" in other.stderr
    # The refusal hint a client prints is a command this package runs as written.
    machine = Machine.create(tmp_path / "m", ["work", "web"])
    hint = shlex.split(policy_allow_command("work", "web", 8080))
    assert hint[0] == "qconnect"
    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir()
    allow = subprocess.run(
        [*run, str(tmp_path / "qconnect"), *hint[1:], "--policy-dir", str(policy_dir),
         "--qubes", str(machine.qubes_json)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert allow.returncode == 0, allow.stderr
    written = "".join(p.read_text() for p in policy_dir.iterdir())
    assert "qubes.ConnectTCP +8080 work web allow" in written


def test_dom0_man_page_lists_exactly_the_policy_options(
    rpm_roots: dict[str, Path], tmp_path: Path
) -> None:
    root = rpm_roots["qconnect-dom0"]
    sections = _page_sections((root / "usr/share/man/man1/qconnect.1").read_text())
    assert set(sections) >= {"qconnect", "qconnect policy", "qconnect policy allow"}
    assert not any(name.startswith(("qconnect persist", "qconnect service")) for name in sections)
    for name, section in sections.items():
        words = name.split()[1:]
        assert _page_options(section) == _help_options(_live_help(words)), name


def test_package_versions_match_the_source() -> None:
    changelog = (SOURCE / "debian/changelog").read_text().split("\n", 1)[0]
    assert changelog.startswith(f"qconnect ({__version__})")
    for spec in ("qconnect.spec", "qconnect-dom0.spec"):
        text = (SOURCE / "packaging/rpm" / spec).read_text()
        assert re.search(rf"^Version:\s+{re.escape(__version__)}$", text, re.MULTILINE), spec


# --- bash completion ---------------------------------------------------------------------


def _complete(function: str, words: list[str]) -> set[str]:
    """COMPREPLY of a completion function for ``words`` (the last one is being typed)."""
    script = (
        'source "$1"; source "$2"; shift 2; COMP_WORDS=("$@"); '
        "COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); " + function + '; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    result = subprocess.run(
        ["bash", "--norc", "-c", script, "bash",
         str(SOURCE / "completion/qconnect"), str(SOURCE / "completion/qvm-connect-tcp"), *words],
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
        env={**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                                    os.environ.get("PATH", "")])},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


@pytest.mark.parametrize(
    "words", [[], ["persist"], ["persist", "add"], ["policy", "allow"], ["service", "run"]]
)
def test_bash_completion_offers_the_commands_and_options_of_help(words: list[str]) -> None:
    if _missing("bash"):
        pytest.skip("bash is not installed")
    help_text = _live_help(words)
    offered = _complete("_qconnect", ["qconnect", *words, ""])
    assert set(_help_subcommands(help_text)) | _help_options(help_text) <= offered
    assert _complete("_qconnect", ["qconnect", *words, "--"]) == {
        option for option in _help_options(help_text) | {"--help"} if option.startswith("--")
    }


def test_bash_completion_of_qvm_connect_tcp_offers_its_options() -> None:
    if _missing("bash"):
        pytest.skip("bash is not installed")
    options = _help_options(_live_help([], prog="qvm-connect-tcp"))
    expected = {option for option in options | {"--help"} if option.startswith("--")}
    assert _complete("_qvm_connect_tcp", ["qvm-connect-tcp", "--"]) == expected


def test_packaged_units_pass_systemd_analyze_verify(deb_root: Path) -> None:
    if _missing("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    unit_dir = deb_root / "lib/systemd/system"
    # --man=no: Documentation=man:qconnect(1) is the package's page, not installed here.
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no",
         "./qconnect-connecttcp.socket", "./qconnect-connecttcp.service"],
        capture_output=True, text=True, cwd=unit_dir, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert "Documentation=man:qconnect(1)" in (unit_dir / "qconnect-connecttcp.service").read_text()
