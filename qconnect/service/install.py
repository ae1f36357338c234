"""Install and uninstall qubes.ConnectTCP (socket service or executable) in a qube.

Where things go depends on what the qube keeps across a reboot (DESIGN.md
§2; qubesdb's ``/qubes-vm-persistence``, see :mod:`qconnect.persistence`).

**App qube** (``rw-only``). The root file system is reset at every boot from
the template; only /rw, /home and /usr/local (which is /rw/usrlocal) survive.
So everything lives under /usr/local:

- ``/usr/local/etc/qubes-rpc/qubes.ConnectTCP``: the executable form. qrexec
  looks there before /etc/qubes-rpc, so it overrides the stock ``/dev/tcp``
  symlink; with ``--socket`` it is the fallback while the socket is absent
  (early boot, service stopped), so the allowlist holds at every moment.
- ``/usr/local/etc/qubes/rpc-config/qubes.ConnectTCP``: searched before the
  stock /etc/qubes/rpc-config one, which skips the descriptor and ends the
  call at the service's first EOF; ours keeps the descriptor (port and
  caller) and leaves half-close to the service.
- ``/usr/local/lib/systemd/system/qconnect-connecttcp.{socket,service}``
  (``--socket``): a unit directory systemd searches, and persistent.
- ``/rw/config/rc.local`` (``--socket``): a fenced block that reloads systemd
  and starts the socket at boot, because /usr/local is mounted after systemd
  read its units and /etc/systemd/system (where ``enable`` writes) is reset.

**Template** (``full``: a template, a standalone qube, plain Linux). /etc and
/usr reach every app qube of a template; its /usr/local and /rw do not. The
stock ``/etc/qubes-rpc/qubes.ConnectTCP`` symlink and its rpc-config belong
to the qubes-core-agent package and are never touched (an update would
revert them, a removal would break them). Everything of ours sits in /etc,
the administrator's part of the tree, and reaches /run, which qrexec
searches first, at every boot:

- ``/etc/qconnect/qubes.ConnectTCP``: the executable form (our own directory,
  next to the allowlist ``/etc/qconnect/connecttcp.allow``; /usr/lib belongs
  to packages and /etc/qubes-rpc would publish it as a service).
- ``/etc/tmpfiles.d/qconnect-connecttcp.conf``: systemd-tmpfiles writes our
  rpc-config to ``/run/qubes/rpc-config/`` and links the executable at
  ``/run/qubes-rpc/qubes.ConnectTCP`` at boot (before sockets and
  qrexec-agent start); both are also written at install time.
- ``/etc/systemd/system/qconnect-connecttcp.{socket,service}`` and the
  ``sockets.target.wants`` link ``systemctl enable`` makes (``--socket``).
  The socket replaces the executable's link at the same path when it starts
  and puts it back when it stops, so qrexec always finds one of the two.

A manifest (``/usr/local/etc/qconnect/service-install.json``, or
``/etc/qconnect/service-install.json`` for the template layout) records
every file, symbolic link and directory created, so ``uninstall`` removes
exactly those, and the rc.local block, and nothing of the user's.
"""

import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import string
import subprocess
import sys
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from qconnect.atomic import remove_file, symlink_atomic, write_atomic
from qconnect.errors import FileWriteError, ServiceError
from qconnect.fence import Fenced, FenceError, Markers
from qconnect.persistence import Persistence
from qconnect.qrexec import SERVICE
from qconnect.resources import SOURCE_ROOT, data_path
from qconnect.service.daemon import DEFAULT_SOCKET

SOCKET_UNIT = "qconnect-connecttcp.socket"
SERVICE_UNIT = "qconnect-connecttcp.service"

#: The data files installed from (the source tree, or share/qconnect of a wheel install).
SERVICE_SOURCE = data_path("rpc-services", SERVICE)
UNITS_SOURCE = data_path("systemd-units")

# Paths inside the qube (relative to --root).
RPC_DIR = Path("usr/local/etc/qubes-rpc")
RPC_CONFIG_DIR = Path("usr/local/etc/qubes/rpc-config")
UNIT_DIR = Path("usr/local/lib/systemd/system")
RC_LOCAL = Path("rw/config/rc.local")
MANIFEST = Path("usr/local/etc/qconnect/service-install.json")

# The template layout's paths (relative to --root).
TEMPLATE_EXEC = Path("etc/qconnect") / SERVICE
TEMPLATE_UNIT_DIR = Path("etc/systemd/system")
WANTS_LINK = TEMPLATE_UNIT_DIR / "sockets.target.wants" / SOCKET_UNIT
TMPFILES = Path("etc/tmpfiles.d/qconnect-connecttcp.conf")
RUN_SERVICE = Path("run/qubes-rpc") / SERVICE
RUN_RPC_CONFIG = Path("run/qubes/rpc-config") / SERVICE
TEMPLATE_MANIFEST = Path("etc/qconnect/service-install.json")

#: Where a template keeps what never reaches its app qubes (each has its own).
_NOT_IN_APP_QUBES = (Path("/usr/local"), Path("/rw"), Path("/home"))

#: What ``/run/qubes-rpc/qubes.ConnectTCP`` points at: relative, so that it also
#: resolves inside a ``--root`` tree (a loopback qube, a mounted image).
RUN_SERVICE_TARGET = os.path.relpath("/" / TEMPLATE_EXEC, "/" / RUN_SERVICE.parent)


#: Fences of our block in the user's rc.local; a later edit finds exactly its lines.
BLOCK_BEGIN = "# BEGIN qconnect service (generated; remove with: qconnect service uninstall)"
BLOCK_END = "# END qconnect service"
_MARKERS = Markers(BLOCK_BEGIN, BLOCK_END)  # a shell script: lines end at "\n"

RC_LOCAL_BLOCK = f"""{BLOCK_BEGIN}
# /usr/local is mounted after systemd read its units: reload, then start the
# qubes.ConnectTCP socket without waiting (rc.local must not block).
systemctl daemon-reload && systemctl --no-block start {SOCKET_UNIT}
{BLOCK_END}
"""

RPC_CONFIG = f"""# Generated by qconnect service install; remove with: qconnect service uninstall
# qubes.ConnectTCP rpc-config, read before the stock /etc/qubes/rpc-config one.
# The socket service needs the descriptor ("{SERVICE}+PORT SOURCE"): it names
# the port and the calling qube. It also passes each direction's EOF on itself,
# so qrexec must not end the call at the service's first EOF.
skip-service-descriptor=false
exit-on-service-eof=false
exit-on-client-eof=false
"""


class Layout(StrEnum):
    """Where the service is installed, named for the kind of qube it suits."""

    APP_QUBE = "app-qube"  #: /usr/local and /rw/config/rc.local: an app qube keeps those
    TEMPLATE = "template"  #: /etc: a template (for its app qubes), a standalone, plain Linux


def layout_for(persistence: Persistence, root: Path = Path("/")) -> Layout:
    """The layout for what the qube at ``root`` keeps (``persistence``, from qubesdb).

    Error handling: ServiceError in a disposable (nothing would last), and in
    an app qube whose template installed the service (it already runs here,
    and an app-qube copy would fight the template's over the same units).
    """
    if persistence is Persistence.NONE:
        raise ServiceError(
            "this is a disposable qube: nothing installed in it survives its shutdown; install "
            "the service in its disposable template (or in that one's template) instead"
        )
    if persistence is Persistence.FULL:
        return Layout.TEMPLATE
    refuse_if_the_template_installed(root, persistence, "change it")
    return Layout.APP_QUBE


def refuse_if_the_template_installed(root: Path, persistence: Persistence, action: str) -> None:
    """ServiceError if ``root`` is an app qube that has the service from its template."""
    if persistence is Persistence.RW_ONLY and (root / TEMPLATE_MANIFEST).exists():
        raise ServiceError(
            f"this app qube has the service from its template (/{TEMPLATE_MANIFEST}): "
            f"{action} in the template"
        )


@dataclass
class Manifest:
    """What an installation created: files, links, directories, whether rc.local was ours."""

    form: str
    layout: str = Layout.APP_QUBE.value  # absent from manifests written before layouts
    files: list[str] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)  #: path -> target
    directories: list[str] = field(default_factory=list)
    rc_local_created: bool = False
    rc_local_block: bool = False


def _search_path() -> list[str]:
    """Directories the -S interpreter of the executable needs: qconnect's and systemd's."""
    paths = [str(SOURCE_ROOT)]
    spec = importlib.util.find_spec("systemd")
    if spec is not None and spec.submodule_search_locations:
        parent = str(Path(next(iter(spec.submodule_search_locations))).parent)
        if parent not in paths:
            paths.append(parent)
    return paths


def unreachable_from_app_qubes(
    python: str = sys.executable, search_path: list[str] | None = None
) -> list[str]:
    """What the installed service runs from that a template's app qubes do not get.

    The units and the executable name the interpreter and qconnect's own
    directory by absolute path; in a template those must be on the root
    volume (/usr, /opt), not in the template's own /usr/local, /rw or /home.
    """
    paths = [python, *(_search_path() if search_path is None else search_path)]
    return [
        path
        for path in paths
        if any(Path(os.path.abspath(path)).is_relative_to(kept) for kept in _NOT_IN_APP_QUBES)
    ]


def _read_source(path: Path) -> str:
    """A file of the source tree (rpc-services/, systemd-units/), or a clear error."""
    try:
        return path.read_text()
    except OSError as error:
        raise ServiceError(
            f"cannot read {path}: {error.strerror}; reinstall qconnect (its rpc-services/ "
            "and systemd-units/ files are missing)"
        ) from None


def render_executable(
    python: str = sys.executable,
    search_path: list[str] | None = None,
    allow_files: list[str] | None = None,
) -> str:
    """The executable service with its interpreter line and paths filled in. Pure."""
    source = _read_source(SERVICE_SOURCE)
    first, rest = source.split("\n", 1)
    if not first.startswith("#!"):
        raise ServiceError(f"{SERVICE_SOURCE}: no interpreter line")
    if any(c.isspace() for c in python):
        raise ServiceError(f"interpreter path {python!r} contains white space: cannot run it")
    paths = _search_path() if search_path is None else search_path
    rest = _replace_once(rest, "SEARCH_PATH: list[str] = []", f"SEARCH_PATH: list[str] = {paths!r}")
    if allow_files is not None:
        rest = _replace_once(rest, "ALLOW_FILES = None", f"ALLOW_FILES = {tuple(allow_files)!r}")
    # -I: ignore PYTHON* variables and the user's site; -S: skip site start-up
    # (the paths above replace it), which is most of the start-up time.
    return f"#!{python} -IS\n{rest}"


def _replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise ServiceError(f"{SERVICE_SOURCE}: expected one line {old!r}")
    return text.replace(old, new)


def _systemd_quote(word: str) -> str:
    """Quote one ExecStart word for systemd: specifiers and variables escaped."""
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"' if escaped != word or any(c.isspace() for c in word) else word


def render_units(
    command: str,
    root_option: str = "",
    python: str = sys.executable,
    socket: str = DEFAULT_SOCKET,
    layout: Layout = Layout.APP_QUBE,
) -> dict[str, str]:
    """The socket and service units' texts, by file name. Pure apart from reading templates."""
    values = {
        "ON_STOP": _socket_on_stop(socket, layout),
        "COMMAND": command.replace("\n", " "),
        "ROOT_OPTION": root_option.replace("\n", " "),
        "PYTHON": _systemd_quote(python),
        "SOCKET": socket,
        "SOCKET_UNIT": SOCKET_UNIT,
        "SERVICE_UNIT": SERVICE_UNIT,
    }
    units = {}
    for name in (SOCKET_UNIT, SERVICE_UNIT):
        template = string.Template(_read_source(UNITS_SOURCE / f"{name}.in"))
        try:
            units[name] = template.substitute(values)
        except (KeyError, ValueError) as error:
            raise ServiceError(f"{UNITS_SOURCE / name}.in: bad placeholder {error}") from None
    return units


def _socket_on_stop(socket: str, layout: Layout) -> str:
    """The socket unit's lines that hand qrexec's search back to the executable form."""
    run_service = "/" + str(RUN_SERVICE)
    if layout is Layout.APP_QUBE or socket != run_service:
        return """\
# Remove the socket file when stopped, so qrexec falls back to the next
# service in its path (the executable form) instead of a dead socket.
RemoveOnStop=yes"""
    # systemd spawns ExecStopPost before it unlinks a RemoveOnStop socket
    # (socket_enter_stop_post), so the two would race for the path.
    return f"""\
# The executable form is qrexec's fallback while this socket does not exist:
# systemd-tmpfiles links it at this path at boot. systemd does not bind over
# it, so take the link away first; once stopped, put it back in place of the
# dead socket (with RemoveOnStop=yes, systemd's unlink races with that).
RemoveOnStop=no
ExecStartPre=rm -f {run_service}
ExecStopPost=-systemd-tmpfiles --create --prefix={run_service} /{TMPFILES}"""


def tmpfiles_argument(text: str) -> str:
    """``text`` as the argument field of a tmpfiles.d line (C escapes, specifiers). Pure."""
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise ServiceError("a tmpfiles.d argument cannot hold control characters but newlines")
    return text.replace("\\", "\\\\").replace("%", "%%").replace("\n", "\\n")


def render_tmpfiles(command: str, root_option: str = "") -> str:
    """The tmpfiles.d file that recreates our /run entries at every boot. Pure."""
    return f"""# Generated by `{command}`.
# Remove with `qconnect service uninstall{root_option}`.
#
# /run is empty at every boot; systemd-tmpfiles (before sockets and qrexec-agent
# start) puts back where qrexec-agent looks first, ahead of the package's own
# /etc/qubes/rpc-config/{SERVICE} and /etc/qubes-rpc/{SERVICE} -> /dev/tcp:
# - qconnect's rpc-config (descriptor on, no end of the call at the first EOF);
# - a link to the executable service (with the socket service, its socket takes
#   this place when it starts and gives it back when it stops).
f+ /{RUN_RPC_CONFIG} 0644 root root - {tmpfiles_argument(RPC_CONFIG)}
L+ /{RUN_SERVICE} - - - - {RUN_SERVICE_TARGET}
"""


def add_block(text: str) -> str:
    """``text`` (an rc.local) with our block, replacing an old copy. Pure.

    The block goes at the end, or before a final ``exit`` (after it, it
    would never run).
    """
    return _split(remove_block(text)).with_block(RC_LOCAL_BLOCK)


def remove_block(text: str) -> str:
    """``text`` without our fenced block; every other line untouched. Pure."""
    return _split(text).without_block()


def _split(text: str) -> Fenced:
    try:
        return _MARKERS.split(text, before_exit=True)
    except FenceError as error:
        if error.unclosed:
            raise ServiceError(
                f"rc.local has '{BLOCK_BEGIN}' without its end line; edit it by hand"
            ) from None
        raise ServiceError(
            f"rc.local has a damaged qconnect block ({error.begins} '{BLOCK_BEGIN}' and "
            f"{error.ends} '{BLOCK_END}' lines); edit it by hand"
        ) from None


class _Installer:
    """Creates files and directories under ``root`` and records them in a manifest."""

    def __init__(self, root: Path, form: str) -> None:
        self.root = root
        self.manifest = Manifest(form=form)

    def directory(self, relative: Path) -> Path:
        path = self.root / relative
        missing = []
        for parent in [path, *path.parents]:
            if parent.exists() or parent == self.root:
                break
            missing.append(parent)
        for created in reversed(missing):
            try:
                created.mkdir(mode=0o755)
            except OSError as error:
                raise ServiceError(f"cannot create {created}: {error.strerror}") from None
            self.manifest.directories.append(str(created.relative_to(self.root)))
        return path

    def file(self, relative: Path, content: str, mode: int) -> None:
        self.directory(relative.parent)
        path = self.root / relative
        if os.path.lexists(path) and not _is_ours(path):
            raise ServiceError(f"refusing to replace {path}: not installed by qconnect")
        write_atomic(path, content, mode=mode)
        os.chmod(path, mode)
        self.manifest.files.append(str(relative))

    def link(self, relative: Path, target: str) -> None:
        """A symbolic link; one already there is replaced only if it points to ``target``."""
        self.directory(relative.parent)
        path = self.root / relative
        if os.path.lexists(path) and not _is_our_link(path, target):
            raise ServiceError(f"refusing to replace {path}: not installed by qconnect")
        try:
            symlink_atomic(path, target)
        except FileWriteError as error:
            raise ServiceError(str(error)) from None
        self.manifest.links[str(relative)] = target


def _is_our_link(path: Path, target: str) -> bool:
    try:
        return os.readlink(path) == target
    except OSError:
        return False


def _is_ours(path: Path) -> bool:
    try:
        head = path.read_bytes()[:4096]
    except OSError:
        return False
    return b"qconnect service install" in head or b"qconnect service uninstall" in head


def _read_manifest(root: Path, relative: Path) -> Manifest | None:
    path = root / relative
    try:
        data = json.loads(path.read_text())
        return Manifest(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as error:
        raise ServiceError(f"cannot read {path}: {error}") from None


def install(
    root: Path,
    form: str,
    *,
    layout: Layout = Layout.APP_QUBE,
    python: str = sys.executable,
    socket: str = DEFAULT_SOCKET,
    allow_files: list[str] | None = None,
) -> Manifest:
    """Install the service in ``form`` ("socket" or "exec") under ``root`` in ``layout``.

    A previous installation (either layout) is removed first, so switching
    forms or layouts or re-installing leaves exactly one set of files.

    Error handling: ServiceError with a one-line message; whatever was
    created before the failure is removed again.
    """
    if form not in ("socket", "exec"):
        raise ServiceError(f"unknown service form {form!r}: expected 'socket' or 'exec'")
    if not root.is_dir():
        raise ServiceError(f"root {root} is not a directory")
    uninstall(root)
    installer = _Installer(root, form)
    installer.manifest.layout = layout.value
    root_option = "" if root == Path("/") else f" --root {shlex.quote(str(root))}"
    command = f"qconnect service install --{form} --layout {layout}{root_option}"
    manifest_path = MANIFEST if layout is Layout.APP_QUBE else TEMPLATE_MANIFEST
    try:
        executable = render_executable(python, allow_files=allow_files)
        if layout is Layout.APP_QUBE:
            installer.file(RPC_DIR / SERVICE, executable, 0o755)
            installer.file(RPC_CONFIG_DIR / SERVICE, RPC_CONFIG, 0o644)
        else:
            installer.file(TEMPLATE_EXEC, executable, 0o755)
            installer.file(TMPFILES, render_tmpfiles(command, root_option), 0o644)
            # What systemd-tmpfiles would create at boot, now.
            installer.file(RUN_RPC_CONFIG, RPC_CONFIG, 0o644)
            installer.link(RUN_SERVICE, RUN_SERVICE_TARGET)
        if form == "socket":
            unit_dir = UNIT_DIR if layout is Layout.APP_QUBE else TEMPLATE_UNIT_DIR
            units = render_units(command, root_option, python, socket, layout)
            for name, text in units.items():
                installer.file(unit_dir / name, text, 0o644)
            if layout is Layout.APP_QUBE:
                _add_rc_local(installer)
            else:
                # Exactly the link `systemctl enable` makes (the [Install] section).
                installer.link(WANTS_LINK, "/" + str(TEMPLATE_UNIT_DIR / SOCKET_UNIT))
        installer.directory(manifest_path.parent)
        write_atomic(root / manifest_path, json.dumps(installer.manifest.__dict__, indent=2) + "\n")
    except BaseException:
        _remove(root, installer.manifest)
        raise
    return installer.manifest


def _add_rc_local(installer: _Installer) -> None:
    path = installer.root / RC_LOCAL
    try:
        old = path.read_text()
    except FileNotFoundError:
        old = None
    except (OSError, UnicodeDecodeError) as error:
        raise ServiceError(f"cannot read {path}: {error}") from None
    installer.directory(RC_LOCAL.parent)
    if old is None:
        installer.manifest.rc_local_created = True
        write_atomic(path, "#!/bin/sh\n" + RC_LOCAL_BLOCK, mode=0o755)
    else:
        write_atomic(path, add_block(old))
    installer.manifest.rc_local_block = True


def _remove(root: Path, manifest: Manifest) -> None:
    for relative, target in manifest.links.items():
        if _is_our_link(root / relative, target):  # a socket in its place is not ours
            remove_file(root / relative)
    for relative in manifest.files:
        remove_file(root / relative)
    if manifest.rc_local_block:
        path = root / RC_LOCAL
        with contextlib.suppress(FileNotFoundError):
            kept = remove_block(path.read_text())
            if manifest.rc_local_created and kept.strip() in ("", "#!/bin/sh"):
                remove_file(path)
            else:
                write_atomic(path, kept)
    for relative in reversed(manifest.directories):
        with contextlib.suppress(OSError):
            (root / relative).rmdir()


def installed(root: Path) -> list[Manifest]:
    """The installations recorded under ``root``: none, or one (two only if damaged)."""
    found = (_read_manifest(root, path) for path in (MANIFEST, TEMPLATE_MANIFEST))
    return [manifest for manifest in found if manifest is not None]


def uninstall(root: Path) -> list[Manifest]:
    """Remove what ``install`` created under ``root``; the manifests of what was removed."""
    removed = []
    for relative in (MANIFEST, TEMPLATE_MANIFEST):
        manifest = _read_manifest(root, relative)
        if manifest is None:
            continue
        if manifest.rc_local_block:
            # A damaged block in rc.local is refused before anything is removed.
            with contextlib.suppress(FileNotFoundError):
                remove_block((root / RC_LOCAL).read_text())
        remove_file(root / relative)  # first, so that its directory can go with the others
        _remove(root, manifest)
        removed.append(manifest)
    return removed


def install_into_rpc_dir(
    rpc_dir: Path,
    *,
    rpc_config_dir: Path | None = None,
    python: str = sys.executable,
    allow_files: list[str] | None = None,
) -> Path:
    """Put the executable service into one qubes-rpc directory (e.g. a loopback qube's).

    Replaces what is there (the stock ``/dev/tcp`` symlink). For the socket
    service use ``install(root, "socket")`` on the qube's root instead: it
    also installs the executable as the fallback, without which our
    rpc-config (descriptor on) would corrupt the stock ``/dev/tcp`` service's
    stream whenever the socket is absent. Returns the service's path.
    """
    target = rpc_dir / SERVICE
    if rpc_config_dir is not None:
        rpc_config_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(rpc_config_dir / SERVICE, RPC_CONFIG)
    rpc_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if target.is_symlink() or not target.is_file():
            target.unlink()
    write_atomic(target, render_executable(python, allow_files=allow_files), mode=0o755)
    os.chmod(target, 0o755)
    return target


def systemctl(*words: str) -> None:
    """Run systemctl when this is the live system; a failure is reported, not fatal."""
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        return
    result = subprocess.run(["systemctl", *words], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[-1:] or ["failed"]
        print(f"qconnect: warning: systemctl {' '.join(words)}: {message[0]}", file=sys.stderr)
