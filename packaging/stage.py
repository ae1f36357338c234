"""Lay out one native package's files under DESTDIR: the one install step of every package.

``debian/rules`` and both RPM specs call this, so the .deb and the .rpm of
a template hold the same files at the same paths (apart from where the
distribution keeps Python modules and the Fedora client's directory)::

    python3 packaging/stage.py template --dest DESTDIR --site DIR [--client-dir DIR]
    python3 packaging/stage.py dom0 --dest DESTDIR --lib DIR

**template** (template, app qube, standalone, plain Linux):

- the ``qconnect`` package in ``--site`` (the distribution's own module
  directory: units and the client start ``/usr/bin/python3 -m qconnect...``);
- ``/usr/bin/qconnect`` and ``qvm-connect-tcp`` in ``--client-dir``
  (``/usr/bin`` on Debian, where Qubes' own is diverted away in the
  maintainer scripts);
- ``/usr/share/qconnect/{rpc-services,systemd-units}``: what ``qconnect
  service install`` and ``qconnect persist`` read (``qconnect/core/resources.py``);
- the executable service ``/usr/lib/qconnect/qubes.ConnectTCP`` and the
  tmpfiles.d file that, at every boot, links it at ``/run/qubes-rpc`` and
  writes its rpc-config to ``/run/qubes/rpc-config`` (both searched before
  the stock ``/etc`` ones, which stay untouched);
- the socket service's units in ``--unit-dir`` (shipped
  disabled: ``systemctl enable --now qconnect-connecttcp.socket``);
- man pages and bash completion.

**dom0**: ``/usr/bin/qconnect`` with only the ``policy`` command, run from a
private copy of the standard-library-only modules it needs under ``--lib``.

The units, service and man pages are rendered by qconnect's own code (the
same renderer ``qconnect service install`` uses), from this source tree.
"""

import argparse
import ast
import os
import shutil
import stat
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(SOURCE))
sys.path.insert(0, str(SOURCE / "packaging"))

import manpage  # noqa: E402

from qconnect import __version__  # noqa: E402

PYTHON = "/usr/bin/python3"
SHARE = Path("usr/share/qconnect")
SERVICE_EXEC = Path("usr/lib/qconnect/qubes.ConnectTCP")
TMPFILES = Path("usr/lib/tmpfiles.d/qconnect-connecttcp.conf")
MAN1 = Path("usr/share/man/man1")
COMPLETIONS = Path("usr/share/bash-completion/completions")

#: Where dom0's ``qconnect policy`` starts: the front door and the policy command.
DOM0_ENTRIES = ("cli.py", "policy/cli.py")

PACKAGED = "Installed by the qconnect package; do not edit (copy it to /etc to override)."

CLIENT_SCRIPT = f"""#!{PYTHON}
# qconnect's qvm-connect-tcp (Qubes' own, if installed, is diverted or later on PATH).
import sys

from qconnect.client.cli import main

sys.exit(main())
"""

QCONNECT_SCRIPT = f"""#!{PYTHON}
import sys

from qconnect.cli import main

sys.exit(main())
"""

DOM0_SCRIPT = """#!{python} -I
# qconnect for dom0: only the policy command (standard library only).
import sys

sys.path.insert(0, {lib!r})

from qconnect.cli import COMMANDS, run_command
from qconnect.policy import cli as policy_cli


def build_parser():
    import argparse

    from qconnect import __version__

    parser = argparse.ArgumentParser(
        prog="qconnect",
        description="qconnect in dom0: the qubes.ConnectTCP policy (the rest of qconnect "
        "runs in qubes).",
    )
    parser.add_argument("--version", action="version", version=f"qconnect {{__version__}}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    help_text = COMMANDS["policy"][1]
    policy_cli.configure(subparsers.add_parser("policy", help=help_text, description=help_text))
    return parser


if __name__ == "__main__":
    sys.exit(run_command("qconnect", build_parser(), sys.argv[1:]))
"""

PROFILE_D = """# qconnect: put its qvm-connect-tcp ahead of Qubes' /usr/bin one in login shells.
case ":$PATH:" in
  *:{dir}:*) ;;
  *) PATH="{dir}:$PATH" ;;
esac
"""


def write(dest: Path, relative: Path, text: str, mode: int = 0o644) -> None:
    path = dest / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def copy_modules(dest: Path, site: Path, only: set[Path] | None = None) -> None:
    """The package's .py files (no caches) under ``dest/site/qconnect``; ``only``: just those."""
    for source in sorted((SOURCE / "qconnect").rglob("*.py")):
        relative = source.relative_to(SOURCE / "qconnect")
        if only is None or relative in only:
            write(dest, site / "qconnect" / relative, source.read_text())


def _module_file(name: str) -> Path | None:
    """``qconnect.a.b`` as a path relative to the package directory, if it is one of ours."""
    parts = name.split(".")
    if parts[0] != "qconnect":
        return None
    base = SOURCE.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(SOURCE / "qconnect")
    return None


def imported_closure(entries: tuple[str, ...]) -> set[Path]:
    """Every qconnect module the entries import, transitively, with their packages' __init__.

    Read from the source (every import statement, lazy ones included), so the
    dom0 package follows whatever the policy code imports; the RPM test then
    checks that all of it is the standard library.
    """
    pending = [Path(entry) for entry in entries]
    found: set[Path] = set()
    while pending:
        relative = pending.pop()
        if relative in found:
            continue
        found.add(relative)
        for parent in relative.parents:
            if (SOURCE / "qconnect" / parent / "__init__.py").is_file():
                pending.append(parent / "__init__.py")
        tree = ast.parse((SOURCE / "qconnect" / relative).read_text(), str(relative))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            pending += [path for path in map(_module_file, names) if path is not None]
    return found


def packaged_header(text: str) -> str:
    """Replace a rendered file's "Generated by ... / Remove with ..." lines with ours."""
    lines = text.split("\n")
    kept = [line for line in lines if not line.startswith(("# Generated by", "# Remove with"))]
    return f"# {PACKAGED}\n" + "\n".join(kept)


def stage_service(dest: Path, site: Path, unit_dir: Path, search_dirs: list[str]) -> None:
    """The executable service, the socket service's units and the tmpfiles.d file."""
    from qconnect.service import install

    run_service = "/" + str(install.RUN_SERVICE)
    # The executable runs with -IS: it sees only these directories (qconnect's,
    # and python3-systemd's where that is elsewhere, as Fedora's lib64).
    search_path = list(dict.fromkeys([f"/{site}", *search_dirs]))
    exec_text = install.render_executable(python=PYTHON, search_path=search_path)
    write(dest, SERVICE_EXEC, exec_text, 0o755)
    units = install.render_units(
        "qconnect package", python=PYTHON, socket=run_service, layout=install.Layout.TEMPLATE
    )
    for name, text in units.items():
        # tmpfiles resolves a bare name through /etc, /run and /usr/lib: an
        # administrator's `qconnect service install` in /etc overrides ours.
        text = text.replace(f" /{install.TMPFILES}", f" {TMPFILES.name}")
        # The package ships the man page that documents them.
        text = text.replace("\nDescription=", "\nDocumentation=man:qconnect(1)\nDescription=", 1)
        write(dest, unit_dir / name, packaged_header(text))
    rpc_config = install.RPC_CONFIG.split("\n", 1)[1]
    tmpfiles = f"""# {PACKAGED}
#
# qconnect's qubes.ConnectTCP, in place of the stock /etc/qubes-rpc one at every
# boot (qrexec-agent searches /run/qubes-rpc and /run/qubes/rpc-config first):
# - its rpc-config (descriptor on, no end of the call at the first EOF);
# - a link to the executable service (the socket service, when enabled, takes
#   this place when it starts and gives it back when it stops).
# `qconnect service install` writes /etc/tmpfiles.d/{TMPFILES.name}, which
# replaces this file; removing the package gives Qubes' own service back.
f+ /{install.RUN_RPC_CONFIG} 0644 root root - {install.tmpfiles_argument(rpc_config)}
L+ {run_service} - - - - /{SERVICE_EXEC}
"""
    write(dest, TMPFILES, tmpfiles)


def qconnect_parsers() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """``qconnect`` and every subcommand's parser, each fully configured."""
    from qconnect import cli

    top = cli.build_parser([])
    parsers = [(("qconnect",), top)]
    for name in cli.COMMANDS:
        sub = manpage.subcommands(cli.build_parser([name]))[name]
        parsers += list(manpage.walk(sub, ("qconnect", name)))
    return parsers


def man_page(name: str, parsers: list[tuple[tuple[str, ...], argparse.ArgumentParser]]) -> str:
    template = (SOURCE / "man" / f"{name}.in").read_text()
    return manpage.render(template, parsers, __version__)


def stage_template(
    dest: Path, site: Path, client_dir: Path, unit_dir: Path, search_dirs: list[str]
) -> None:
    from qconnect.client import cli as client_cli

    copy_modules(dest, site)
    write(dest, Path("usr/bin/qconnect"), QCONNECT_SCRIPT, 0o755)
    write(dest, client_dir / "qvm-connect-tcp", CLIENT_SCRIPT, 0o755)
    if client_dir != Path("usr/bin"):
        write(dest, Path("etc/profile.d/qconnect.sh"), PROFILE_D.format(dir=f"/{client_dir}"))
    service = SOURCE / "rpc-services" / "qubes.ConnectTCP"
    write(dest, SHARE / "rpc-services" / service.name, service.read_text(), 0o755)
    for unit in sorted((SOURCE / "systemd-units").glob("*.in")):
        write(dest, SHARE / "systemd-units" / unit.name, unit.read_text())
    stage_service(dest, site, unit_dir, search_dirs)
    client_parser = client_cli.build_parser()
    pages = {
        "qvm-connect-tcp.1": [(("qvm-connect-tcp",), client_parser)],
        "qconnect.1": qconnect_parsers(),
    }
    for page, parsers in pages.items():
        write(dest, MAN1 / page, man_page(page, parsers))
    for command in ("qconnect", "qvm-connect-tcp"):
        write(dest, COMPLETIONS / command, (SOURCE / "completion" / command).read_text())


def stage_dom0(dest: Path, lib: Path) -> None:
    copy_modules(dest, lib, only=imported_closure(DOM0_ENTRIES))
    write(dest, Path("usr/bin/qconnect"), DOM0_SCRIPT.format(python=PYTHON, lib=f"/{lib}"), 0o755)
    namespace: dict[str, object] = {}
    # The dom0 front door's own parser, built by running its text (its sys.path
    # entry pointed at this source tree): the page describes exactly that command.
    exec(compile(DOM0_SCRIPT.format(python=PYTHON, lib=str(SOURCE)), "dom0", "exec"), namespace)
    top = namespace["build_parser"]()  # type: ignore[operator]
    page = man_page("qconnect-dom0.1", list(manpage.walk(top, ("qconnect",))))
    write(dest, MAN1 / "qconnect.1", page)
    write(dest, COMPLETIONS / "qconnect", (SOURCE / "completion" / "qconnect").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("package", choices=["template", "dom0"])
    parser.add_argument("--dest", type=Path, required=True, help="the package's root (DESTDIR)")
    parser.add_argument(
        "--site", default="usr/lib/python3/dist-packages", help="template: module dir"
    )
    parser.add_argument("--client-dir", default="usr/bin", help="template: qvm-connect-tcp's dir")
    parser.add_argument(
        "--unit-dir",
        default="usr/lib/systemd/system",
        help="template: systemd's unit directory (Debian 12: lib/systemd/system)",
    )
    parser.add_argument(
        "--search-dir",
        action="append",
        default=[],
        help="template: another directory the executable service imports from (repeatable)",
    )
    parser.add_argument("--lib", default="usr/share/qconnect-dom0", help="dom0: module dir")
    args = parser.parse_args()
    os.umask(0o022)
    names = ("site", "client_dir", "unit_dir", "lib")
    relative = {name: Path(str(getattr(args, name)).lstrip("/")) for name in names}
    if args.package == "template":
        stage_template(
            args.dest,
            relative["site"],
            relative["client_dir"],
            relative["unit_dir"],
            [os.path.abspath(directory) for directory in args.search_dir],
        )
    else:
        stage_dom0(args.dest, relative["lib"])
    for path in args.dest.rglob("*"):  # no stray write bits, whatever the umask of the checkout
        if path.is_file() and not path.is_symlink():
            path.chmod(stat.S_IMODE(path.stat().st_mode) & ~0o022)
    shutil.rmtree(args.dest / relative["site"] / "qconnect" / "__pycache__", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
