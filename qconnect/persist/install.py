"""What ``persist`` installs: permanent bindings as units in a file tree (``/`` or ``--root``).

A description for the one install engine (:mod:`qconnect.core.install`): this
module reads what is installed and plans every change (pure decisions over
what is on disk); :func:`apply` carries the plan out all or nothing, undone
from snapshots, confined to the tree. A file is only ever overwritten or
deleted when its header says this tool generated it.

Resource handling: the tree's root is locked (``flock`` on the directory
itself, which leaves no lock file behind) for the whole read-plan-apply
sequence, so two commands never interleave their edits.
"""

import contextlib
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from qconnect.core.errors import FileWriteError, PersistError
from qconnect.core.install import engine, rclocal
from qconnect.core.install.engine import Applied, Delete, Link, Step, Write
from qconnect.core.install.tree import Tree
from qconnect.core.persistence import Persistence as Persistence  # re-exported for persist's CLI
from qconnect.core.persistence import detect_persistence as detect_persistence  # likewise
from qconnect.core.spec import BindingSpec
from qconnect.persist.render import (
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
_RC_LOCAL = PurePosixPath("/") / rclocal.RC_LOCAL


@dataclass(frozen=True)
class UnitPaths:
    """Where persist's files go: paths as the qube sees them, and on disk under ``root``.

    (Not to be confused with ``service install``'s ``Layout``, which names a
    kind of qube; this one only maps the binding units' paths into the tree.)
    """

    root: Path
    config_home: PurePosixPath  #: $XDG_CONFIG_HOME or ~/.config, as the qube sees it

    def unit_dir_seen(self, scope: Scope) -> PurePosixPath:
        return self.config_home / "systemd" / "user" if scope is Scope.USER else _SYSTEM_UNIT_DIR

    def wants_dir_seen(self, scope: Scope) -> PurePosixPath:
        if scope is Scope.USER:
            return self.unit_dir_seen(scope) / "sockets.target.wants"
        return _SYSTEM_WANTS_DIR

    @property
    def tree(self) -> Tree:
        """The tree every read and change goes through: nothing outside ``root``."""
        return Tree(self.root)

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


def _read_ours(layout: UnitPaths, path: Path) -> tuple[str | None, GeneratedInfo | None]:
    """(text, header) of ``path``: (None, None) if absent, (text, None) if not ours."""
    info = layout.tree.lstat(path)
    if info is None:
        return None, None
    if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_UNIT_FILE_SIZE:
        return "", None
    data = layout.tree.read_bytes(path, _MAX_UNIT_FILE_SIZE)
    if data is None:
        return None, None
    text = data.decode(errors="replace")
    return text, parse_generated(text)


def _read_rc_local(layout: UnitPaths) -> str | None:
    return layout.tree.read_text(layout.rc_local)


def rc_local_units(layout: UnitPaths) -> list[str]:
    """The socket units persist's rc.local block starts (PersistError if it is unreadable)."""
    return rclocal.units_in_block(_read_rc_local(layout), str(layout.rc_local))


def find_installed(layout: UnitPaths) -> list[Installed]:
    """Every binding this tool installed under ``layout``, both scopes, sorted."""
    rc_units = set(rc_local_units(layout))
    found: list[Installed] = []
    for scope in Scope:
        unit_dir = layout.unit_dir(scope)
        listed = layout.tree.listdir(unit_dir)
        if listed is None:
            continue
        for name in sorted(listed):
            if not (name.startswith(UNIT_PREFIX) and name.endswith(".socket")):
                continue
            _text, info = _read_ours(layout, unit_dir / name)
            spec = spec_from_unit_name(name)
            if info is None or spec is None or info.spec != spec or info.scope is not scope:
                continue
            files = [unit_dir / name]
            template = unit_dir / name.replace(".socket", "@.service")
            if info.mode is Mode.PER_CONNECTION and _read_ours(layout, template)[1] is not None:
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


def _link_target(layout: UnitPaths, scope: Scope, name: str) -> str:
    """What ``systemctl enable`` would make the wants link point at."""
    return str(layout.unit_dir_seen(scope) / name)


def _is_our_link(layout: UnitPaths, scope: Scope, link: Path) -> bool:
    return layout.tree.readlink(link) == _link_target(layout, scope, link.name)


# --- the transaction ---------------------------------------------------------


@dataclass
class Plan(engine.Plan):
    """The engine's plan, and what to tell systemd once the files are in place."""

    start_units: list[tuple[Scope, str]] = field(default_factory=list)
    stop_units: list[tuple[Scope, str]] = field(default_factory=list)
    restart_daemon: set[Scope] = field(default_factory=set)
    stop_daemon: set[Scope] = field(default_factory=set)


def apply(layout: UnitPaths, plan: Plan) -> Applied:
    """Carry out ``plan``'s file steps in ``layout``'s tree, all or nothing.

    Error handling: the first failing step raises PersistError (TreeError
    when the tree refuses a path) after every earlier step, and every
    directory created, has been undone. The returned :class:`Applied` can
    undo the whole plan later, e.g. when systemd then refuses to start the
    socket.
    """
    return engine.apply(layout.tree, plan, PersistError)


@contextlib.contextmanager
def scope_lock(layout: UnitPaths) -> Iterator[None]:
    """Serialise persist commands on one tree: flock the root directory itself."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(layout.tree.locked())
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


def _removal_steps(layout: UnitPaths, item: Installed) -> list[Step]:
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


def plan_add(layout: UnitPaths, request: AddRequest, templates: Templates) -> Plan:
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
            and all(
                _read_ours(layout, unit_dir / name)[0] == text for name, text in rendered.items()
            )
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
        current, info = _read_ours(layout, path)
        if current is not None and info is None:
            raise PersistError(
                f"refusing to overwrite {path}: qconnect did not generate it; nothing changed"
            )
        plan.drop(path)
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
        current_link = layout.tree.readlink(link)
        if current_link is None and layout.tree.exists(link):
            raise PersistError(f"refusing to replace {link}: it is not a symbolic link")
        if current_link is not None and current_link != target:
            raise PersistError(
                f"refusing to replace {link}: it points to {current_link}, not {target}"
            )
        if current_link is None or link in replaced_paths:
            plan.drop(link)
            plan.steps.append(Link(link, target))
    old_rc = _read_rc_local(layout)
    rc_units = set(rclocal.units_in_block(old_rc, str(layout.rc_local)))
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
    layout: UnitPaths, request: AddRequest, templates: Templates, plan: Plan
) -> None:
    if request.qvm_connect_tcp is None:
        raise PersistError("daemon mode needs qconnect's qvm-connect-tcp: give --qvm-connect-tcp")
    scope = request.binding.scope
    path = layout.unit_dir(scope) / DAEMON_SERVICE
    text = render_daemon_service(scope, request.qvm_connect_tcp, templates)
    current, info = _read_ours(layout, path)
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


def _check_rc_local_runs(layout: UnitPaths, old_rc: str | None, plan: Plan) -> None:
    if old_rc is None:
        return
    info = layout.tree.lstat(layout.rc_local)
    if info is not None and not info.st_mode & stat.S_IXUSR:
        plan.notes.append(
            f"warning: {layout.rc_local} is not executable, so Qubes will not run it at boot; "
            f"chmod +x it"
        )


def _plan_rc_local(layout: UnitPaths, old_rc: str | None, units: list[str], plan: Plan) -> None:
    new_rc = rclocal.update(old_rc, units, str(layout.rc_local))
    if new_rc == old_rc:
        return
    if new_rc is None:
        plan.steps.append(Delete(layout.rc_local))
    else:
        mode = rclocal.RC_LOCAL_MODE
        info = layout.tree.lstat(layout.rc_local)
        if old_rc is not None and info is not None:
            mode = stat.S_IMODE(info.st_mode)
        what = f"starts {len(units)} socket(s) at boot" if units else "qconnect's lines removed"
        plan.steps.append(Write(layout.rc_local, new_rc.encode(), mode, what))


def _plan_daemon_leftovers(
    layout: UnitPaths,
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
        if not kept and _read_ours(layout, service)[1] is not None:
            plan.steps.append(Delete(service))
            plan.stop_daemon.add(scope)
        else:
            plan.restart_daemon.add(scope)


def plan_remove(layout: UnitPaths, chosen: list[Installed]) -> Plan:
    """Decide every file change ``persist remove`` makes for the ``chosen`` bindings."""
    plan = Plan()
    installed = find_installed(layout)
    for item in chosen:
        plan.steps.extend(_removal_steps(layout, item))
        plan.stop_units.append((item.scope, item.socket_unit))
    _plan_daemon_leftovers(layout, installed, chosen, None, plan)
    old_rc = _read_rc_local(layout)
    remaining = set(rc_local_units(layout)) - {item.socket_unit for item in chosen}
    _plan_rc_local(layout, old_rc, sorted(remaining), plan)
    for scope in sorted({item.scope for item in chosen}):
        plan.prune.extend(layout.prunable_dirs(scope))
    return plan
