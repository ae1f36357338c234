"""``qconnect persist add|list|show|remove``: permanent bindings as systemd units.

The command-line layer: it reads the options, asks :mod:`.install` for a
plan, applies it, then tells a running systemd (when there is one) and
prints what was done. No trio: it runs once and exits.
"""

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from qconnect.core import argtypes
from qconnect.core.errors import CommandLineError, PersistError, SystemctlError
from qconnect.core.install.systemctl import Systemd
from qconnect.core.qrexec import MAX_CALLS_IN_FLIGHT
from qconnect.core.qrexec_client import (
    LOOPBACK_MACHINE_ENV,
    QREXEC_CLIENT_VM,
    supports_stdin_socket,
)
from qconnect.core.spec import BindingSpec, parse_spec
from qconnect.persist import install
from qconnect.persist.install import AddRequest, Installed, Persistence, Plan, UnitPaths
from qconnect.persist.render import (
    DAEMON_SERVICE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_QREXEC_CLIENT_VM,
    DEFAULT_SOCAT,
    Binding,
    Mode,
    Relay,
    Scope,
    Templates,
    check_executable_path,
    check_max_connections,
    load_templates,
)

# Ports below this need root to bind, so only the system manager can listen there.
PRIVILEGED_PORT_LIMIT = 1024

# A console script that pip generated for qconnect's client contains this.
_OUR_CLIENT_MARK = b"qconnect.client.cli"


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="persist_action", metavar="ACTION")
    actions.required = True

    add = actions.add_parser(
        "add",
        help="install a binding as systemd socket units and start it",
        description="Install [BIND:]LPORT:VM:PORT as systemd socket units and start it.",
    )
    add.add_argument(
        "spec", metavar="SPEC", type=argtypes.spec_text, help="[BIND:]LOCALPORT:[VMNAME]:PORT"
    )
    _scope_options(add, "default: --user for ports from 1024, --system below")
    add.add_argument(
        "--mode",
        choices=[str(mode) for mode in Mode],
        default=str(Mode.PER_CONNECTION),
        help="per-connection: one qrexec-client-vm per connection, no Python (default); "
        "daemon: one long-running qvm-connect-tcp serves every daemon-mode binding",
    )
    add.add_argument(
        "--max-connections",
        type=argtypes.count(1, MAX_CALLS_IN_FLIGHT),
        metavar="N",
        help=f"per-connection mode: connections at once, 1 to {MAX_CALLS_IN_FLIGHT} "
        f"(default {DEFAULT_MAX_CONNECTIONS})",
    )
    add.add_argument(
        "--relay",
        choices=["auto", *(str(relay) for relay in Relay)],
        default="auto",
        help="per-connection mode: handoff (qrexec-client-vm --use-stdin-socket) or socat "
        "(for a qrexec-client-vm without that option); default: ask qrexec-client-vm --help",
    )
    add.add_argument(
        "--qrexec-client-vm",
        type=_executable("--qrexec-client-vm"),
        metavar="PATH",
        help=f"per-connection mode: the one the units run (default {DEFAULT_QREXEC_CLIENT_VM}, "
        "or the loopback machine's inside `qconnect loopback run`)",
    )
    add.add_argument(
        "--socat",
        default=DEFAULT_SOCAT,
        type=_executable("--socat"),
        metavar="PATH",
        help=f"--relay socat: the socat the units run (default {DEFAULT_SOCAT})",
    )
    add.add_argument(
        "--qvm-connect-tcp",
        type=_executable("--qvm-connect-tcp"),
        metavar="PATH",
        help="daemon mode: qconnect's qvm-connect-tcp (default: the one installed with qconnect)",
    )
    add.add_argument(
        "--persistence",
        choices=[str(item) for item in Persistence],
        help="what survives a reboot of this qube (default: qubesdb-read "
        "/qubes-vm-persistence; rw-only in an app qube, full outside Qubes)",
    )
    add.add_argument(
        "--replace", action="store_true", help="replace a binding persisted with other settings"
    )
    _root_option(add)
    add.set_defaults(handler=run_add)

    listing = actions.add_parser("list", help="the bindings installed, with their state")
    _root_option(listing)
    listing.set_defaults(handler=run_list)

    show = actions.add_parser("show", help="the unit files of one binding")
    show.add_argument("spec", metavar="SPEC", type=argtypes.spec_text)
    _scope_options(show, "default: either")
    _root_option(show)
    show.set_defaults(handler=run_show)

    remove = actions.add_parser(
        "remove", help="stop a binding and delete its units (and its rc.local lines)"
    )
    target = remove.add_mutually_exclusive_group(required=True)
    target.add_argument("spec", metavar="SPEC", nargs="?", type=argtypes.spec_text)
    target.add_argument("--all", action="store_true", help="every binding (of the scope given)")
    _scope_options(remove, "default: either")
    _root_option(remove)
    remove.set_defaults(handler=run_remove)


def _scope_options(parser: argparse.ArgumentParser, default: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--user", dest="scope", action="store_const", const=str(Scope.USER),
        help=f"the user's systemd (~/.config/systemd/user); {default}",
    )  # fmt: skip
    group.add_argument(
        "--system", dest="scope", action="store_const", const=str(Scope.SYSTEM),
        help="the system's systemd (/usr/local/lib/systemd/system)",
    )  # fmt: skip


def _executable(option: str) -> Callable[[str], str]:
    """A validator for a program path the units run: ExecStart='s own safe subset."""

    def parse_executable(text: str) -> str:
        try:
            return check_executable_path(text, option)
        except PersistError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse_executable


def _root_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        type=argtypes.path,
        default="/",
        metavar="DIR",
        help="prefix every path with DIR (an image of a qube); systemd is not told",
    )


def run(args: argparse.Namespace) -> int:
    handler = {"add": run_add, "list": run_list, "show": run_show, "remove": run_remove}
    return handler[args.persist_action](args)


# --- common ----------------------------------------------------------------------


def _layout(args: argparse.Namespace) -> UnitPaths:
    root = Path(args.root)
    if not root.is_dir():
        raise PersistError(f"invalid --root '{args.root}': expected an existing directory")
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    if not os.path.isabs(config):
        raise PersistError(f"invalid XDG_CONFIG_HOME {config!r}: expected an absolute path")
    return UnitPaths(root=root, config_home=PurePosixPath(os.path.normpath(config)))


def _live(layout: UnitPaths, scope: Scope) -> Systemd | None:
    """The running manager of ``scope`` when it is the one that reads ``layout``."""
    if layout.root.resolve() != Path("/"):
        return None
    manager = Systemd(scope)
    return manager if manager.reachable() else None


def _systemctl_hint(scope: Scope, *args: str) -> str:
    user = ["--user"] if scope is Scope.USER else []
    return shlex.join(["systemctl", *user, *args])


# --- add -------------------------------------------------------------------------


def _choose_scope(args: argparse.Namespace, spec: BindingSpec) -> Scope:
    if args.scope is None:
        return Scope.USER if spec.local_port >= PRIVILEGED_PORT_LIMIT else Scope.SYSTEM
    scope = Scope(args.scope)
    if scope is Scope.USER and spec.local_port < PRIVILEGED_PORT_LIMIT:
        raise CommandLineError(
            f"local port {spec.local_port} is below {PRIVILEGED_PORT_LIMIT}: only --system "
            "can listen there (a user's systemd may not bind it)"
        )
    return scope


def default_qrexec_client_vm() -> str:
    """The ``qrexec-client-vm`` the units run when none is given.

    In a Qubes qube, the agent's own. Inside a loopback machine's qube
    (``qconnect loopback run``, which sets LOOPBACK_MACHINE_ENV), the machine's
    client plays qrexec and /usr/bin has none: take the machine's.
    """
    machine = os.environ.get(LOOPBACK_MACHINE_ENV)
    if machine:
        client = Path(machine).absolute() / "bin" / QREXEC_CLIENT_VM
        if os.access(client, os.X_OK):
            return str(client)
    return DEFAULT_QREXEC_CLIENT_VM


def detect_relay(qrexec_client_vm: str) -> Relay:
    """Handoff when ``qrexec-client-vm --help`` lists --use-stdin-socket, else socat.

    The probe is the client's own (:func:`supports_stdin_socket`), so a
    permanent binding and ``qvm-connect-tcp`` always agree on a qube's agent.
    """
    if not os.access(qrexec_client_vm, os.X_OK):
        raise PersistError(
            f"{qrexec_client_vm} is not an executable, so whether it has --use-stdin-socket "
            "cannot be asked: give --qrexec-client-vm PATH or --relay handoff|socat"
        )
    return Relay.HANDOFF if supports_stdin_socket(qrexec_client_vm) else Relay.SOCAT


def find_our_client() -> str:
    """qconnect's qvm-connect-tcp: next to this Python first, then on PATH.

    The stock Qubes ``/usr/bin/qvm-connect-tcp`` (bash and socat) cannot serve
    sockets from systemd, so a candidate counts only if it is our console script.
    """
    candidates = [str(Path(sys.executable).parent / "qvm-connect-tcp")]
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if directory:
            candidates.append(os.path.join(directory, "qvm-connect-tcp"))
    for candidate in candidates:
        try:
            with open(candidate, "rb") as script:
                head = script.read(4096)
        except OSError:
            continue
        if _OUR_CLIENT_MARK in head and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    raise PersistError(
        "cannot find qconnect's qvm-connect-tcp (the one on PATH is not ours): "
        "give --qvm-connect-tcp PATH"
    )


def _binding_from(args: argparse.Namespace) -> Binding:
    spec = parse_spec(args.spec)
    scope = _choose_scope(args, spec)
    mode = Mode(args.mode)
    if mode is Mode.DAEMON:
        if args.max_connections is not None or args.relay != "auto":
            raise CommandLineError(
                "--max-connections and --relay apply to --mode per-connection only"
            )
        return Binding(spec, scope, mode)
    max_connections = check_max_connections(
        DEFAULT_MAX_CONNECTIONS if args.max_connections is None else args.max_connections
    )
    qrexec_client_vm = check_executable_path(
        args.qrexec_client_vm or default_qrexec_client_vm(), "--qrexec-client-vm"
    )
    relay = detect_relay(qrexec_client_vm) if args.relay == "auto" else Relay(args.relay)
    socat = check_executable_path(args.socat, "--socat")
    if relay is Relay.SOCAT and not os.access(socat, os.X_OK):
        raise PersistError(
            f"{qrexec_client_vm} has no --use-stdin-socket and {socat} is not an executable: "
            "install socat (every Qubes template has it) or give --socat PATH"
        )
    return Binding(spec, scope, mode, max_connections, relay, qrexec_client_vm, socat)


def run_add(args: argparse.Namespace) -> int:
    binding = _binding_from(args)
    layout = _layout(args)
    persistence = (
        Persistence(args.persistence) if args.persistence else install.detect_persistence()
    )
    client = None
    if binding.mode is Mode.DAEMON:
        client = check_executable_path(
            args.qvm_connect_tcp or find_our_client(), "--qvm-connect-tcp"
        )
    request = AddRequest(binding, persistence, client, replace=args.replace)
    plan, report, told = install_and_start(layout, request, load_templates(), _live)
    _print_add(binding, plan, report, told, layout)
    return 0


ManagerFinder = Callable[[UnitPaths, Scope], Systemd | None]


def install_and_start(
    layout: UnitPaths, request: AddRequest, templates: Templates, find_manager: ManagerFinder
) -> tuple[Plan, list[str], bool]:
    """Plan, write, then tell systemd; (plan, what was done, whether systemd was told).

    Error handling: if systemd refuses (the port is taken, say), every file
    is put back as it was and systemd reloaded again, then PersistError.
    """
    with install.scope_lock(layout):
        plan = install.plan_add(layout, request, templates)
        scopes = {request.binding.scope, *(scope for scope, _unit in plan.stop_units)}
        live = {scope: find_manager(layout, scope) for scope in scopes}
        applied = install.apply(layout, plan)
        try:
            _stop(plan, live)
            _reload_and_start(plan, live)
        except SystemctlError as error:
            applied.undo()
            for manager in live.values():
                if manager is not None:
                    with contextlib.suppress(SystemctlError):
                        manager.call("daemon-reload")
            raise PersistError(f"{error}; the files were put back as they were") from None
    return plan, applied.report, live[request.binding.scope] is not None


def _managers(live: dict[Scope, Systemd | None], scopes: Iterable[Scope]) -> list[Systemd]:
    """The running managers among ``live`` for ``scopes``."""
    found = [live.get(scope) for scope in scopes]
    return [manager for manager in found if manager is not None]


def _stop(plan: Plan, live: dict[Scope, Systemd | None]) -> None:
    """Stop the sockets that go (and the daemon-mode client when its last socket goes)."""
    for scope, unit in plan.stop_units:
        for manager in _managers(live, [scope]):
            manager.call("stop", unit)
    for manager in _managers(live, plan.stop_daemon):
        manager.call("stop", DAEMON_SERVICE)


def _reload_and_start(plan: Plan, live: dict[Scope, Systemd | None]) -> None:
    """Reload, start the sockets that come, and let the daemon pick up its sockets."""
    for manager in _managers(live, list(live)):
        manager.call("daemon-reload")
    for scope, unit in plan.start_units:
        for manager in _managers(live, [scope]):
            manager.call("start", unit)
    # A running client holds only the sockets it was started with.
    for manager in _managers(live, plan.restart_daemon):
        manager.call("try-restart", DAEMON_SERVICE)


def _print_add(
    binding: Binding, plan: Plan, report: list[str], live: bool, layout: UnitPaths
) -> None:
    detail = f"{binding.mode}, {binding.scope} scope"
    if binding.mode is Mode.PER_CONNECTION:
        detail += f", relay {binding.relay}"
    if not report:
        print(f"binding {binding.spec} ({detail}) is already persisted so; no file changed")
    else:
        print(f"binding {binding.spec} ({detail}):")
    for line in [*plan.notes, *report]:
        print(f"  {line}")
    if binding.relay is Relay.SOCAT and binding.mode is Mode.PER_CONNECTION:
        print(
            f"  note: without --use-stdin-socket, every connection runs {binding.socat} as "
            f"{binding.qrexec_client_vm}'s local program, which keeps half-close correct"
        )
    if live:
        print(f"  systemd: reloaded and started {binding.socket_unit}")
    else:
        where = "--root given" if layout.root.resolve() != Path("/") else "not running here"
        print(
            f"  systemd: not told ({where}); start it now with: "
            f"{_systemctl_hint(binding.scope, 'daemon-reload')} && "
            f"{_systemctl_hint(binding.scope, 'start', binding.socket_unit)}"
        )


# --- list, show, remove ------------------------------------------------------------


def _at_boot(item: Installed) -> str:
    if item.enabled_link is not None:
        return "enabled"
    return "rc.local" if item.at_boot_by_rc_local else "no"


def run_list(args: argparse.Namespace) -> int:
    layout = _layout(args)
    installed = install.find_installed(layout)
    live = {scope: _live(layout, scope) for scope in {item.scope for item in installed}}
    rows = [("BINDING", "MODE", "SCOPE", "AT-BOOT", "STATE")]
    for item in installed:
        manager = live.get(item.scope)
        state = manager.state(item.socket_unit) if manager is not None else "-"
        rows.append((str(item.spec), str(item.mode), str(item.scope), _at_boot(item), state))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
              + "  " + row[4])  # fmt: skip
    return 0


def _select(installed: list[Installed], spec_text: str, scope: str | None) -> list[Installed]:
    spec = parse_spec(spec_text)
    chosen = [
        item for item in installed if item.spec == spec and (scope is None or item.scope == scope)
    ]
    if not chosen:
        where = f" in the {scope} scope" if scope else ""
        raise PersistError(f"no binding {spec} is persisted{where}; see: qconnect persist list")
    return chosen


def run_show(args: argparse.Namespace) -> int:
    layout = _layout(args)
    for item in _select(install.find_installed(layout), args.spec, args.scope):
        paths = list(item.files)
        if item.mode is Mode.DAEMON:
            paths.append(layout.unit_dir(item.scope) / DAEMON_SERVICE)
        for path in paths:
            print(f"# {path}")
            print(layout.tree.read_text(path) or "", end="\n")
        if item.enabled_link is not None:
            print(f"# {item.enabled_link} -> {layout.tree.readlink(item.enabled_link)}\n")
        if item.at_boot_by_rc_local:
            print(f"# {layout.rc_local} starts {item.socket_unit} at boot")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    layout = _layout(args)
    chosen, report, told = remove_and_stop(layout, args.spec, args.all, args.scope, _live)
    if not chosen:
        print("no bindings persisted; nothing changed")
        return 0
    for item in chosen:
        print(f"removed binding {item.spec} ({item.mode}, {item.scope} scope)")
    for line in report:
        print(f"  {line}")
    if not told:
        print("  systemd: not told (not running here, or --root given)")
    return 0


def remove_and_stop(
    layout: UnitPaths,
    spec_text: str | None,
    every: bool,
    scope: str | None,
    find_manager: ManagerFinder,
) -> tuple[list[Installed], list[str], bool]:
    """Stop, delete, reload; (bindings removed, what was done, whether systemd was told)."""
    with install.scope_lock(layout):
        installed = install.find_installed(layout)
        if every or spec_text is None:
            chosen = [item for item in installed if scope is None or item.scope == scope]
        else:
            chosen = _select(installed, spec_text, scope)
        if not chosen:
            return [], [], False
        plan = install.plan_remove(layout, chosen)
        live = {item.scope: find_manager(layout, item.scope) for item in chosen}
        try:
            _stop(plan, live)
        except SystemctlError as error:
            raise PersistError(str(error)) from None
        applied = install.apply(layout, plan)
        try:
            _reload_and_start(plan, live)
        except SystemctlError as error:
            raise PersistError(str(error)) from None
    return chosen, applied.report, any(live.values())
