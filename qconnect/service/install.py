"""Install and uninstall qubes.ConnectTCP (socket service or executable) in a qube.

Where things go depends on what the qube keeps across a reboot (DESIGN.md
§2; qubesdb's ``/qubes-vm-persistence``, see :mod:`qconnect.core.persistence`).

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
exactly those, and the rc.local block, and nothing of the user's. A
manifest is read as hostile: every path in it must be one this installer
writes (relative, without ``..``), else nothing is removed.

This module only describes *what* to install; the install engine
(:mod:`qconnect.core.install`) plans it against the tree, applies it all or
nothing (undone from snapshots), under one lock, confined to ``--root``.
"""

import contextlib
import importlib.util
import json
import os
import shlex
import stat
import string
import sys
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from qconnect.core.atomic import write_atomic
from qconnect.core.errors import ServiceError, TreeError
from qconnect.core.install import engine
from qconnect.core.install.header import (
    SERVICE_RPC_CONFIG_MARK,
    is_service_generated,
    service_header,
)
from qconnect.core.install.rclocal import (
    BLOCK_BEGIN as BLOCK_BEGIN,
)
from qconnect.core.install.rclocal import (
    BLOCK_END as BLOCK_END,
)
from qconnect.core.install.rclocal import (
    RC_LOCAL_BLOCK,
    RC_LOCAL_MODE,
    SERVICE_SOCKET_UNIT,
    SHEBANG,
)
from qconnect.core.install.rclocal import add_block as add_block
from qconnect.core.install.rclocal import remove_block as remove_block
from qconnect.core.install.tree import Tree
from qconnect.core.persistence import Persistence
from qconnect.core.printable import printable
from qconnect.core.qrexec import SERVICE
from qconnect.core.resources import SOURCE_ROOT, data_path
from qconnect.service.defaults import DEFAULT_SOCKET

SOCKET_UNIT = SERVICE_SOCKET_UNIT
SERVICE_UNIT = "qconnect-connecttcp.service"

#: The data files installed from (the source tree, or share/qconnect of a wheel install).
SERVICE_SOURCE = data_path("rpc-services", SERVICE)
UNITS_SOURCE = data_path("systemd-units")

# Paths inside the qube (relative to --root).
RPC_DIR = Path("usr/local/etc/qubes-rpc")
RPC_CONFIG_DIR = Path("usr/local/etc/qubes/rpc-config")
UNIT_DIR = Path("usr/local/lib/systemd/system")
RC_LOCAL = Path("rw/config/rc.local")  # the rc.local editor's RC_LOCAL, as a Path
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


RPC_CONFIG = f"""{SERVICE_RPC_CONFIG_MARK}
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
    if persistence is Persistence.RW_ONLY and Tree(root).exists(TEMPLATE_MANIFEST):
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
    """Quote one ExecStart word for systemd: specifiers and variables escaped.

    A word holding anything but printable ASCII is refused: systemd ends a
    line at CR, LF or NUL, so such a word would end the directive early.
    """
    if not word.isascii() or not word.isprintable():
        raise ServiceError(
            f"{printable(word)!r} cannot be written into a unit: not printable ASCII"
        )
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
        "HEADER": service_header(command, root_option),
        "ON_STOP": _socket_on_stop(socket, layout),
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
    return f"""{service_header(command, root_option)}
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


# --- what is installed where ---------------------------------------------------------


def _files(layout: Layout, form: str) -> list[Path]:
    """The files ``install`` writes for ``form`` in ``layout``, in the order written."""
    if layout is Layout.APP_QUBE:
        files = [RPC_DIR / SERVICE, RPC_CONFIG_DIR / SERVICE]
    else:
        files = [TEMPLATE_EXEC, TMPFILES, RUN_RPC_CONFIG]
    if form == "socket":
        unit_dir = UNIT_DIR if layout is Layout.APP_QUBE else TEMPLATE_UNIT_DIR
        files += [unit_dir / SOCKET_UNIT, unit_dir / SERVICE_UNIT]
    return files


def _links(layout: Layout, form: str) -> dict[Path, str]:
    """The symbolic links ``install`` makes for ``form`` in ``layout``: path -> target."""
    if layout is Layout.APP_QUBE:
        return {}
    links = {RUN_SERVICE: RUN_SERVICE_TARGET}
    if form == "socket":
        # Exactly the link `systemctl enable` makes (the [Install] section).
        links[WANTS_LINK] = "/" + str(TEMPLATE_UNIT_DIR / SOCKET_UNIT)
    return links


def _ours() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(files, links, directories) any install may have made, as a manifest records them."""
    files = {str(MANIFEST), str(TEMPLATE_MANIFEST)}
    links: set[str] = set()
    for layout in Layout:
        files |= {str(path) for path in _files(layout, "socket")}
        links |= {str(path) for path in _links(layout, "socket")}
    directories = {
        str(parent)
        for path in [*files, *links, str(RC_LOCAL)]
        for parent in Path(path).parents
        if parent != Path(".")
    }
    return frozenset(files), frozenset(links), frozenset(directories)


def _check_manifest(path: Path, manifest: Manifest) -> Manifest:
    """``manifest`` if every path in it is one ``install`` makes; TreeError otherwise.

    A manifest lives in the tree, which may be hostile: an absolute path, a
    ``..`` or any path this installer never writes would make ``uninstall``
    (and ``install``, which uninstalls first) delete what is not ours.
    """
    files, links, directories = _ours()
    for entries, allowed in (
        (manifest.files, files),
        (list(manifest.links), links),
        (manifest.directories, directories),
    ):
        for entry in entries:
            if not isinstance(entry, str) or entry not in allowed:
                raise TreeError(
                    f"{path}: refusing the manifest: {printable(str(entry))!r} is not a path "
                    "qconnect service install makes; nothing was changed"
                )
    for entry, target in manifest.links.items():
        if not isinstance(target, str):
            raise TreeError(f"{path}: refusing the manifest: bad link target for {entry!r}")
    if manifest.form not in ("socket", "exec") or manifest.layout not in [*Layout]:
        raise TreeError(f"{path}: refusing the manifest: unknown form or layout")
    return manifest


def _read_manifest(tree: Tree, relative: Path) -> Manifest | None:
    path = tree.root / relative
    try:
        text = tree.read_text(relative)
        if text is None:
            return None
        data = json.loads(text)
        manifest = Manifest(**data)
    except (ValueError, TypeError) as error:
        raise ServiceError(f"cannot read {path}: {printable(str(error))}") from None
    if not isinstance(manifest.files, list) or not isinstance(manifest.directories, list):
        raise TreeError(f"{path}: refusing the manifest: files and directories must be lists")
    if not isinstance(manifest.links, dict):
        raise TreeError(f"{path}: refusing the manifest: links must be a mapping")
    return _check_manifest(path, manifest)


def _is_ours(tree: Tree, relative: Path) -> bool:
    """Whether the regular file at ``relative`` says ``service install`` wrote it."""
    info = tree.lstat(relative)
    if info is None or not stat.S_ISREG(info.st_mode):
        return False
    head = tree.read_bytes(relative, 4096)
    return head is not None and is_service_generated(head[:4096])


def _mode_of(tree: Tree, relative: Path, default: int) -> int:
    info = tree.lstat(relative)
    return default if info is None else stat.S_IMODE(info.st_mode)


# --- planning -----------------------------------------------------------------------


@dataclass
class _Change:
    """One install or uninstall being planned: the engine's plan and what planning learnt.

    rc.local is read only when an installation has or gets a block in it, so
    a template (which has no rc.local of ours) never depends on that file.
    """

    tree: Tree
    plan: engine.Plan = field(default_factory=engine.Plan)
    removed: list[Manifest] = field(default_factory=list)  #: the installations going
    old_directories: set[str] = field(default_factory=set)  #: the directories they made
    _rc_local: list[str | None] = field(default_factory=list)  #: [before, after], once read

    def rc_local(self) -> str | None:
        """rc.local as this change leaves it so far (None: no such file)."""
        if not self._rc_local:
            text = self.tree.read_text(RC_LOCAL)
            self._rc_local = [text, text]
        return self._rc_local[1]

    def set_rc_local(self, text: str | None) -> None:
        self.rc_local()
        self._rc_local[1] = text

    def plan_rc_local(self) -> None:
        """The step that leaves rc.local as :meth:`set_rc_local` said, if it changed."""
        if not self._rc_local or self._rc_local[0] == self._rc_local[1]:
            return
        path, text = self.tree.root / RC_LOCAL, self._rc_local[1]
        if text is None:
            self.plan.steps.append(engine.Delete(path))
        else:
            mode = _mode_of(self.tree, RC_LOCAL, RC_LOCAL_MODE)
            self.plan.steps.append(engine.Write(path, text.encode(), mode, "rc.local"))

    def remove_installed(self) -> None:
        """Steps removing every installation recorded under the tree."""
        for relative in (MANIFEST, TEMPLATE_MANIFEST):
            manifest = _read_manifest(self.tree, relative)
            if manifest is None:
                continue
            steps, root = self.plan.steps, self.tree.root
            # The manifest first, so that its directory can go with the others.
            steps.append(engine.Delete(root / relative))
            for link, target in manifest.links.items():
                if self.tree.readlink(Path(link)) == target:  # a socket there is not ours
                    steps.append(engine.Delete(root / link))
            steps.extend(engine.Delete(root / file) for file in manifest.files)
            text = self.rc_local() if manifest.rc_local_block else None
            if text is not None:
                # A damaged block in rc.local is refused before anything is removed.
                text = remove_block(text)
                gone = manifest.rc_local_created and text.strip() in ("", SHEBANG.strip())
                self.set_rc_local(None if gone else text)
            self.old_directories.update(manifest.directories)
            self.removed.append(manifest)


def _prune(tree: Tree, directories: set[str], kept: list[str], plan: engine.Plan) -> None:
    """Remove the old installations' directories that end up empty, deepest first."""
    going = sorted(set(directories) - set(kept), key=lambda name: -len(Path(name).parts))
    plan.prune.extend(tree.root / name for name in going)


def _record_directories(
    tree: Tree, paths: list[Path], old_directories: set[str], manifest: Manifest
) -> None:
    """Record the directories this install makes (or an old one made and it keeps)."""
    for path in paths:
        for parent in reversed(path.parents):
            name = str(parent)
            if parent == Path(".") or name in manifest.directories:
                continue
            if name in old_directories or not tree.is_dir(parent):
                manifest.directories.append(name)


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

    A previous installation (either layout) is removed in the same
    transaction, so switching forms or layouts or re-installing leaves
    exactly one set of files.

    Error handling: ServiceError (TreeError when the tree refuses a path)
    with a one-line message; the tree is then as it was, the previous
    installation included.
    """
    if form not in ("socket", "exec"):
        raise ServiceError(f"unknown service form {form!r}: expected 'socket' or 'exec'")
    if not root.is_dir():
        raise ServiceError(f"root {root} is not a directory")
    tree = Tree(root)
    root_option = "" if root == Path("/") else f" --root {shlex.quote(str(root))}"
    command = f"qconnect service install --{form} --layout {layout}{root_option}"
    executable = render_executable(python, allow_files=allow_files)
    texts = {
        RPC_DIR / SERVICE: executable,
        TEMPLATE_EXEC: executable,
        RPC_CONFIG_DIR / SERVICE: RPC_CONFIG,
        RUN_RPC_CONFIG: RPC_CONFIG,
        TMPFILES: render_tmpfiles(command, root_option) if layout is Layout.TEMPLATE else "",
    }
    if form == "socket":
        unit_dir = UNIT_DIR if layout is Layout.APP_QUBE else TEMPLATE_UNIT_DIR
        for name, text in render_units(command, root_option, python, socket, layout).items():
            texts[unit_dir / name] = text
    with tree.locked():
        change = _Change(tree)
        change.remove_installed()
        going = {step.path for step in change.plan.steps}
        manifest = Manifest(form=form, layout=layout.value)
        files, links = _files(layout, form), _links(layout, form)
        for relative in files:
            path = root / relative
            if path not in going and tree.exists(relative) and not _is_ours(tree, relative):
                raise ServiceError(f"refusing to replace {path}: not installed by qconnect")
            mode = 0o755 if relative in (RPC_DIR / SERVICE, TEMPLATE_EXEC) else 0o644
            change.plan.drop(path)
            change.plan.steps.append(engine.Write(path, texts[relative].encode(), mode, ""))
            manifest.files.append(str(relative))
        for relative, target in links.items():
            path = root / relative
            current = tree.readlink(relative)
            if path not in going and tree.exists(relative) and current != target:
                raise ServiceError(f"refusing to replace {path}: not installed by qconnect")
            change.plan.drop(path)
            change.plan.steps.append(engine.Link(path, target))
            manifest.links[str(relative)] = target
        # The order main's installer made them in, so that the manifest's
        # directories come out in the same order.
        touched = [*files[:3], *list(links)[:1], *files[3:], *list(links)[1:]]
        if form == "socket" and layout is Layout.APP_QUBE:
            rc_local = change.rc_local()
            manifest.rc_local_created = rc_local is None
            manifest.rc_local_block = True
            change.set_rc_local(
                SHEBANG + RC_LOCAL_BLOCK if rc_local is None else add_block(rc_local)
            )
            touched.append(RC_LOCAL)
        change.plan_rc_local()
        manifest_path = MANIFEST if layout is Layout.APP_QUBE else TEMPLATE_MANIFEST
        touched.append(manifest_path)
        _record_directories(tree, touched, change.old_directories, manifest)
        _prune(tree, change.old_directories, manifest.directories, change.plan)
        change.plan.drop(root / manifest_path)
        data = (json.dumps(manifest.__dict__, indent=2) + "\n").encode()
        mode = _mode_of(tree, manifest_path, 0o644)
        change.plan.steps.append(engine.Write(root / manifest_path, data, mode, "manifest"))
        engine.apply(tree, change.plan, ServiceError)
    return manifest


def installed(root: Path) -> list[Manifest]:
    """The installations recorded under ``root``: none, or one (two only if damaged)."""
    tree = Tree(root)
    found = (_read_manifest(tree, path) for path in (MANIFEST, TEMPLATE_MANIFEST))
    return [manifest for manifest in found if manifest is not None]


def uninstall(root: Path) -> list[Manifest]:
    """Remove what ``install`` created under ``root``; the manifests of what was removed.

    Error handling: all or nothing, as ``install``; a damaged rc.local block
    or a manifest naming a path that is not ours is refused before anything
    is removed.
    """
    tree = Tree(root)
    with tree.locked():
        change = _Change(tree)
        change.remove_installed()
        change.plan_rc_local()
        _prune(tree, change.old_directories, [], change.plan)
        engine.apply(tree, change.plan, ServiceError)
    return change.removed


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
