"""Install and remove permanent bindings in a file tree (``/`` or a ``--root``).

Every change is planned first (pure decisions over what is on disk), then
applied as one transaction: files written atomically, and on any failure
every step already taken is undone, so a failed command leaves the tree as
it found it. A file is only ever overwritten or deleted when its first line
says this tool generated it.

Resource handling: the per-scope unit directory is locked (``flock`` on the
directory itself, which leaves no lock file behind) for the whole
read-plan-apply sequence, so two commands never interleave their edits.
"""

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from qconnect.atomic import locked, remove_file, symlink_atomic, write_atomic
from qconnect.errors import FileWriteError, PersistError, QconnectError
from qconnect.persistence import Persistence as Persistence  # re-exported for persist's CLI
from qconnect.persistence import detect_persistence as detect_persistence  # likewise
from qconnect.spec import BindingSpec
from qconnect.units import rclocal
from qconnect.units.render import (
    DAEMON_SERVICE,
    UNIT_PREFIX,
    Binding,
    GeneratedInfo,
    Mode,
    Scope,
    Templates,
    parse_generated,
    render_binding,
    render_daemon_service,
    spec_from_unit_name,
)

#: Mode of every unit file written: systemd only needs to read them.
UNIT_FILE_MODE = 0o644

# Generated files are small; anything bigger at one of our paths is not ours
# (bounded read of files we do not trust to be ours).
_MAX_UNIT_FILE_SIZE = 64 * 1024

_SYSTEM_UNIT_DIR = PurePosixPath("/usr/local/lib/systemd/system")
_SYSTEM_WANTS_DIR = PurePosixPath("/etc/systemd/system/sockets.target.wants")
_RC_LOCAL = PurePosixPath("/rw/config/rc.local")


@dataclass(frozen=True)
class Layout:
    """Where each file goes: paths as the qube sees them, and on disk under ``root``."""

    root: Path
    config_home: PurePosixPath  #: $XDG_CONFIG_HOME or ~/.config, as the qube sees it

    def unit_dir_seen(self, scope: Scope) -> PurePosixPath:
        return self.config_home / "systemd" / "user" if scope is Scope.USER else _SYSTEM_UNIT_DIR

    def wants_dir_seen(self, scope: Scope) -> PurePosixPath:
        if scope is Scope.USER:
            return self.unit_dir_seen(scope) / "sockets.target.wants"
        return _SYSTEM_WANTS_DIR

    def on_disk(self, path: PurePosixPath) -> Path:
        return self.root / path.relative_to("/")

    def unit_dir(self, scope: Scope) -> Path:
        return self.on_disk(self.unit_dir_seen(scope))

    def wants_dir(self, scope: Scope) -> Path:
        return self.on_disk(self.wants_dir_seen(scope))

    @property
    def rc_local(self) -> Path:
        return self.on_disk(_RC_LOCAL)

    def prunable_dirs(self, scope: Scope) -> list[Path]:
        """Directories an add may have created, deepest first; removed again when empty."""
        unit_dir = self.unit_dir(scope)
        if scope is Scope.USER:
            return [self.wants_dir(scope), unit_dir, unit_dir.parent]
        wants = self.wants_dir(scope)
        return [wants, wants.parent, wants.parent.parent, unit_dir, unit_dir.parent]


@dataclass(frozen=True)
class Installed:
    """One binding found on disk."""

    spec: BindingSpec
    scope: Scope
    mode: Mode
    command: str
    files: tuple[Path, ...]  #: our unit files of this binding (not the shared service)
    enabled_link: Path | None  #: its sockets.target.wants link, if present
    at_boot_by_rc_local: bool

    @property
    def socket_unit(self) -> str:
        return self.files[0].name


# --- reading what is there ---------------------------------------------------


def _read_ours(path: Path) -> tuple[str | None, GeneratedInfo | None]:
    """(text, header) of ``path``: (None, None) if absent, (text, None) if not ours."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None, None
    except OSError as error:
        raise PersistError(f"cannot read {path}: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_UNIT_FILE_SIZE:
        return "", None
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        raise PersistError(f"cannot read {path}: {error.strerror}") from None
    return text, parse_generated(text)


def _read_rc_local(layout: Layout) -> str | None:
    try:
        return layout.rc_local.read_text()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise PersistError(f"cannot read {layout.rc_local}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise PersistError(f"cannot read {layout.rc_local}: it is not UTF-8 text") from None


def find_installed(layout: Layout) -> list[Installed]:
    """Every binding this tool installed under ``layout``, both scopes, sorted."""
    rc_units = set(rclocal.units_in_block(_read_rc_local(layout)))
    found: list[Installed] = []
    for scope in Scope:
        unit_dir = layout.unit_dir(scope)
        try:
            names = sorted(os.listdir(unit_dir))
        except FileNotFoundError:
            continue
        except OSError as error:
            raise PersistError(f"cannot list {unit_dir}: {error.strerror}") from None
        for name in names:
            if not (name.startswith(UNIT_PREFIX) and name.endswith(".socket")):
                continue
            _text, info = _read_ours(unit_dir / name)
            spec = spec_from_unit_name(name)
            if info is None or spec is None or info.spec != spec or info.scope is not scope:
                continue
            files = [unit_dir / name]
            template = unit_dir / name.replace(".socket", "@.service")
            if info.mode is Mode.PER_CONNECTION and _read_ours(template)[1] is not None:
                files.append(template)
            link = layout.wants_dir(scope) / name
            found.append(
                Installed(
                    spec=spec,
                    scope=scope,
                    mode=info.mode,
                    command=info.command,
                    files=tuple(files),
                    enabled_link=link if _is_our_link(layout, scope, link) else None,
                    at_boot_by_rc_local=scope is Scope.SYSTEM and name in rc_units,
                )
            )
    return sorted(found, key=lambda item: (item.scope, item.spec))


def _link_target(layout: Layout, scope: Scope, name: str) -> str:
    """What ``systemctl enable`` would make the wants link point at."""
    return str(layout.unit_dir_seen(scope) / name)


def _is_our_link(layout: Layout, scope: Scope, link: Path) -> bool:
    try:
        return os.readlink(link) == _link_target(layout, scope, link.name)
    except OSError:
        return False


# --- the transaction ---------------------------------------------------------


@dataclass(frozen=True)
class Write:
    path: Path
    data: bytes
    mode: int
    what: str  #: said to the user: "wrote PATH (WHAT)"


@dataclass(frozen=True)
class Link:
    path: Path
    target: str


@dataclass(frozen=True)
class Delete:
    path: Path


Step = Write | Link | Delete


@dataclass
class Plan:
    """The file changes one command makes, and what to tell systemd afterwards."""

    steps: list[Step] = field(default_factory=list)
    start_units: list[tuple[Scope, str]] = field(default_factory=list)
    stop_units: list[tuple[Scope, str]] = field(default_factory=list)
    restart_daemon: set[Scope] = field(default_factory=set)
    stop_daemon: set[Scope] = field(default_factory=set)
    prune: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def changes_files(self) -> bool:
        return bool(self.steps)


@dataclass(frozen=True)
class _Before:
    """A path's state before a step, to put it back on rollback."""

    path: Path
    data: bytes | None = None
    mode: int = 0
    link: str | None = None


def _snapshot(path: Path) -> _Before:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return _Before(path)
    if stat.S_ISLNK(info.st_mode):
        return _Before(path, link=os.readlink(path))
    return _Before(path, data=path.read_bytes(), mode=stat.S_IMODE(info.st_mode))


def _restore(before: _Before) -> None:
    with contextlib.suppress(OSError, QconnectError):
        if before.link is not None:
            symlink_atomic(before.path, before.link)
        elif before.data is not None:
            if before.path.is_symlink():
                os.unlink(before.path)
            write_atomic(before.path, before.data, mode=before.mode)
            os.chmod(before.path, before.mode)
        else:
            remove_file(before.path)


def _make_dirs(directory: Path, created: list[Path]) -> None:
    missing: list[Path] = []
    probe = directory
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o755)
        except OSError as error:
            raise PersistError(
                f"cannot create directory {path}: {error.strerror}; nothing was changed"
            ) from None
        created.append(path)


@dataclass
class Applied:
    """A plan carried out: what was done (for the user) and how to undo it."""

    report: list[str]
    _before: list[_Before]
    _created: list[Path]

    def undo(self) -> None:
        """Put every changed path back and remove the directories created (best effort)."""
        for before in reversed(self._before):
            _restore(before)
        for directory in reversed(self._created):
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        self._before, self._created = [], []


def apply(plan: Plan) -> Applied:
    """Carry out ``plan``'s file steps all or nothing.

    Error handling: the first failing step raises PersistError after every
    earlier step (and every directory created) has been undone. The returned
    :class:`Applied` can undo the whole plan later, e.g. when systemd then
    refuses to start the socket.
    """
    applied = Applied([], [], [])
    try:
        for step in plan.steps:
            _apply_step(step, applied)
    except BaseException:
        applied.undo()
        raise
    for directory in plan.prune:
        with contextlib.suppress(OSError):
            os.rmdir(directory)
    return applied


def _apply_step(step: Step, applied: Applied) -> None:
    if not isinstance(step, Delete):
        _make_dirs(step.path.parent, applied._created)
    try:
        applied._before.append(_snapshot(step.path))
    except OSError as error:
        raise PersistError(f"cannot read {step.path}: {error.strerror}") from None
    try:
        if isinstance(step, Write):
            write_atomic(step.path, step.data, mode=step.mode)
            os.chmod(step.path, step.mode)
            applied.report.append(f"wrote {step.path} ({step.what})")
        elif isinstance(step, Link):
            symlink_atomic(step.path, step.target)
            applied.report.append(f"linked {step.path} -> {step.target}")
        else:
            remove_file(step.path)
            applied.report.append(f"removed {step.path}")
    except OSError as error:
        raise PersistError(
            f"cannot change {step.path}: {error.strerror}; nothing was changed"
        ) from None
    except QconnectError as error:
        raise PersistError(f"{error}; nothing was changed") from None


@contextlib.contextmanager
def scope_lock(layout: Layout) -> Iterator[None]:
    """Serialise persist commands on one tree: flock the root directory itself.

    Locking a directory leaves no file behind, so a round trip leaves the
    tree exactly as it was.
    """
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locked(layout.root))
        except FileWriteError as error:
            raise PersistError(f"{error} (the --root directory)") from None
        yield


# --- planning ------------------------------------------------------------------


def _overlaps(a: BindingSpec, b: BindingSpec) -> bool:
    """Whether two listeners would fight over one address (a wildcard takes the port)."""
    if a.local_port != b.local_port:
        return False
    wildcards = ("0.0.0.0", "::")
    return a.bind_address == b.bind_address or (
        a.bind_address in wildcards or b.bind_address in wildcards
    )


def _removal_steps(layout: Layout, item: Installed) -> list[Step]:
    steps: list[Step] = [Delete(path) for path in item.files]
    if item.enabled_link is not None:
        steps.insert(0, Delete(item.enabled_link))
    return steps


@dataclass(frozen=True)
class AddRequest:
    binding: Binding
    persistence: Persistence
    qvm_connect_tcp: str | None  #: the daemon-mode client; needed in daemon mode only
    replace: bool = False


def plan_add(layout: Layout, request: AddRequest, templates: Templates) -> Plan:
    """Decide every file change ``persist add`` makes; raise PersistError on a conflict."""
    binding = request.binding
    scope = binding.scope
    plan = Plan()
    installed = find_installed(layout)
    rendered = render_binding(binding, templates)
    unit_dir = layout.unit_dir(scope)

    # Conflicts: this spec with other settings, or another binding on the same address.
    replaced: list[Installed] = []
    for item in installed:
        same = item.spec == binding.spec and item.scope is scope
        if (
            same
            and all(_read_ours(unit_dir / name)[0] == text for name, text in rendered.items())
            and len(item.files) == len(rendered)
        ):
            continue
        if same or _overlaps(item.spec, binding.spec):
            if not request.replace:
                what = (
                    f"binding {binding.spec} is already persisted with different settings"
                    if item.spec == binding.spec
                    else f"{binding.spec} listens where {item.spec} ({item.scope}) already does"
                )
                raise PersistError(
                    f"{what} ({item.command or item.mode}); nothing changed; "
                    "use --replace to replace it"
                )
            replaced.append(item)

    replaced_paths: set[Path] = set()
    for item in replaced:
        for step in _removal_steps(layout, item):
            plan.steps.append(step)
            replaced_paths.add(step.path)
        plan.stop_units.append((item.scope, item.socket_unit))
        plan.notes.append(f"replacing {item.spec} ({item.mode}, {item.scope})")

    for name, text in rendered.items():
        path = unit_dir / name
        current, info = _read_ours(path)
        if current is not None and info is None:
            raise PersistError(
                f"refusing to overwrite {path}: qconnect did not generate it; nothing changed"
            )
        plan.steps = [s for s in plan.steps if s.path != path]
        if current == text:
            continue
        plan.steps.append(Write(path, text.encode(), UNIT_FILE_MODE, f"{binding.mode} unit"))

    if binding.mode is Mode.DAEMON:
        _plan_daemon_service(layout, request, templates, plan)
    _plan_daemon_leftovers(layout, installed, replaced, binding, plan)

    # Start at boot: a wants link (what systemctl enable makes), or rc.local.
    socket = binding.socket_unit
    link = layout.wants_dir(scope) / socket
    target = _link_target(layout, scope, socket)
    if scope is Scope.USER or request.persistence is Persistence.FULL:
        current_link = os.readlink(link) if link.is_symlink() else None
        if current_link is None and os.path.lexists(link):
            raise PersistError(f"refusing to replace {link}: it is not a symbolic link")
        if current_link is not None and current_link != target:
            raise PersistError(
                f"refusing to replace {link}: it points to {current_link}, not {target}"
            )
        if current_link is None or link in replaced_paths:
            plan.steps = [s for s in plan.steps if s.path != link]
            plan.steps.append(Link(link, target))
    old_rc = _read_rc_local(layout)
    rc_units = set(rclocal.units_in_block(old_rc))
    rc_units -= {item.socket_unit for item in replaced}
    if scope is Scope.SYSTEM and request.persistence is Persistence.RW_ONLY:
        rc_units.add(socket)
        _check_rc_local_runs(layout, old_rc, plan)
    _plan_rc_local(layout, old_rc, sorted(rc_units), plan)
    if not binding.spec.is_loopback:
        plan.notes.append(
            f"warning: {binding.spec.bind_host} is not a loopback address: other qubes on "
            "this qube's network can connect to the binding"
        )
    if request.persistence is Persistence.NONE:
        plan.notes.append("this qube keeps nothing across a reboot: the binding lasts until then")

    plan.start_units.append((scope, socket))
    if binding.mode is Mode.DAEMON and plan.steps:
        plan.restart_daemon.add(scope)
    return plan


def _plan_daemon_service(
    layout: Layout, request: AddRequest, templates: Templates, plan: Plan
) -> None:
    if request.qvm_connect_tcp is None:
        raise PersistError("daemon mode needs qconnect's qvm-connect-tcp: give --qvm-connect-tcp")
    scope = request.binding.scope
    path = layout.unit_dir(scope) / DAEMON_SERVICE
    text = render_daemon_service(scope, request.qvm_connect_tcp, templates)
    current, info = _read_ours(path)
    if current == text:
        return
    if current is not None and info is None:
        raise PersistError(
            f"refusing to overwrite {path}: qconnect did not generate it; nothing changed"
        )
    if current is not None and not request.replace:
        raise PersistError(
            f"{path} runs another qvm-connect-tcp ({info.command if info else ''}); "
            "nothing changed; use --replace to change it for every daemon-mode binding"
        )
    plan.steps.append(Write(path, text.encode(), UNIT_FILE_MODE, "the daemon-mode client"))


def _check_rc_local_runs(layout: Layout, old_rc: str | None, plan: Plan) -> None:
    if old_rc is None:
        return
    if not os.stat(layout.rc_local).st_mode & stat.S_IXUSR:
        plan.notes.append(
            f"warning: {layout.rc_local} is not executable, so Qubes will not run it at boot; "
            f"chmod +x it"
        )


def _plan_rc_local(layout: Layout, old_rc: str | None, units: list[str], plan: Plan) -> None:
    new_rc = rclocal.update(old_rc, units)
    if new_rc == old_rc:
        return
    if new_rc is None:
        plan.steps.append(Delete(layout.rc_local))
    else:
        mode = rclocal.RC_LOCAL_MODE
        if old_rc is not None:
            mode = stat.S_IMODE(os.stat(layout.rc_local).st_mode)
        what = f"starts {len(units)} socket(s) at boot" if units else "qconnect's lines removed"
        plan.steps.append(Write(layout.rc_local, new_rc.encode(), mode, what))


def _plan_daemon_leftovers(
    layout: Layout,
    installed: list[Installed],
    going: list[Installed],
    coming: Binding | None,
    plan: Plan,
) -> None:
    """The shared daemon-mode service goes with the last daemon-mode binding of its scope;
    while others remain, it is restarted to let go of the sockets that went."""
    for scope in Scope:
        if not any(item.scope is scope and item.mode is Mode.DAEMON for item in going):
            continue
        staying = [
            item
            for item in installed
            if item.scope is scope and item.mode is Mode.DAEMON and item not in going
        ]
        # A daemon-mode binding being added keeps the service too.
        kept = bool(staying) or (
            coming is not None and coming.scope is scope and coming.mode is Mode.DAEMON
        )
        service = layout.unit_dir(scope) / DAEMON_SERVICE
        if not kept and _read_ours(service)[1] is not None:
            plan.steps.append(Delete(service))
            plan.stop_daemon.add(scope)
        else:
            plan.restart_daemon.add(scope)


def plan_remove(layout: Layout, chosen: list[Installed]) -> Plan:
    """Decide every file change ``persist remove`` makes for the ``chosen`` bindings."""
    plan = Plan()
    installed = find_installed(layout)
    for item in chosen:
        plan.steps.extend(_removal_steps(layout, item))
        plan.stop_units.append((item.scope, item.socket_unit))
    _plan_daemon_leftovers(layout, installed, chosen, None, plan)
    old_rc = _read_rc_local(layout)
    remaining = set(rclocal.units_in_block(old_rc)) - {item.socket_unit for item in chosen}
    _plan_rc_local(layout, old_rc, sorted(remaining), plan)
    for scope in sorted({item.scope for item in chosen}):
        plan.prune.extend(layout.prunable_dirs(scope))
    return plan
