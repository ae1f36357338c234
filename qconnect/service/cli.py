"""``qconnect service``: run, install and uninstall the qubes.ConnectTCP service."""

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qconnect.core import argtypes
from qconnect.core.errors import CommandLineError

if TYPE_CHECKING:
    from qconnect.service.install import Layout


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    run = actions.add_parser(
        "run",
        help="run the socket service in the foreground",
        description="Serve qubes.ConnectTCP calls as a socket service: one process for every "
        "call. Uses the socket systemd passes (LISTEN_FDS), else binds --socket.",
    )
    # The defaults only: the daemon (and trio) is imported when `run` runs.
    from qconnect.service import defaults

    run.add_argument(
        "--socket",
        default=defaults.DEFAULT_SOCKET,
        type=argtypes.path_text,
        metavar="PATH",
        help="unix socket to listen on (default: %(default)s)",
    )
    run.add_argument(
        "--allow-file",
        action="append",
        type=argtypes.path_text,
        metavar="PATH",
        help="allowlist file (repeatable; first existing wins; default: "
        "/usr/local/etc/qconnect/connecttcp.allow, /etc/qconnect/connecttcp.allow)",
    )
    run.add_argument(
        "--max-calls",
        type=argtypes.count(1),
        default=defaults.DEFAULT_MAX_CALLS,
        metavar="N",
        help="calls open at once, in total (default: %(default)s)",
    )
    run.add_argument(
        "--max-calls-per-caller",
        type=argtypes.count(1),
        default=defaults.DEFAULT_MAX_CALLS_PER_CALLER,
        metavar="N",
        help="calls open at once from one qube (default: %(default)s)",
    )
    run.add_argument(
        "--descriptor-timeout",
        type=argtypes.seconds(),
        default=defaults.DEFAULT_DESCRIPTOR_TIMEOUT,
        metavar="SECONDS",
        help="drop a connection that sends no descriptor in time (default: %(default)s)",
    )
    run.add_argument(
        "--connect-timeout",
        type=argtypes.seconds(),
        default=defaults.DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help="give up connecting to the local port (default: %(default)s)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    run.set_defaults(handler=_run)

    for name, help_text in (
        ("install", "install the service in this qube (or under --root)"),
        ("uninstall", "remove exactly what install put there"),
    ):
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--root",
            type=argtypes.path,
            default=Path("/"),
            metavar="DIR",
            help="the qube's root directory (default: /)",
        )
        if name == "install":
            form = sub.add_mutually_exclusive_group()
            form.add_argument(
                "--socket",
                dest="form",
                action="store_const",
                const="socket",
                help="socket service, socket-activated (default)",
            )
            form.add_argument(
                "--exec",
                dest="form",
                action="store_const",
                const="exec",
                help="executable service, one process per call",
            )
            form.add_argument(
                "--rpc-dir",
                type=argtypes.path,
                metavar="DIR",
                help="only put the executable into this qubes-rpc directory "
                "(e.g. a loopback qube's)",
            )
            sub.add_argument(
                "--layout",
                choices=["app-qube", "template"],
                help="where the service goes: app-qube (/usr/local and /rw/config/rc.local, "
                "which an app qube keeps) or template (/etc, which a template passes on to its "
                "app qubes; also for a standalone qube or plain Linux); default: asked from "
                "qubesdb, needed with --root",
            )
            sub.add_argument(
                "--rpc-config-dir",
                type=argtypes.path,
                metavar="DIR",
                help="with --rpc-dir: also write the rpc-config there",
            )
            sub.set_defaults(form="socket", handler=_install)
        else:
            sub.set_defaults(handler=_uninstall)


def _run(args: argparse.Namespace) -> int:
    from qconnect.core.logs import setup_logging
    from qconnect.service import daemon

    setup_logging("qconnect-service", verbose=args.verbose)
    config = daemon.ServiceConfig(
        max_calls=args.max_calls,
        max_calls_per_caller=args.max_calls_per_caller,
        descriptor_timeout=args.descriptor_timeout,
        connect_timeout=args.connect_timeout,
        allow_files=daemon.allow_files_from(args.allow_file),
    )
    return daemon.run(args.socket, config)


def _install(args: argparse.Namespace) -> int:
    from qconnect.core.install.systemctl import Systemd
    from qconnect.service import install

    if args.rpc_dir is not None and args.layout is not None:
        raise CommandLineError("--layout goes with a whole install, not with --rpc-dir")
    if args.rpc_dir is not None:
        path = install.install_into_rpc_dir(args.rpc_dir, rpc_config_dir=args.rpc_config_dir)
        print(f"installed the executable qubes.ConnectTCP as {path}")
        return 0
    if args.rpc_config_dir is not None:
        raise CommandLineError("--rpc-config-dir goes with --rpc-dir")
    live = args.root == Path("/")
    layout = _layout(args.layout, live)
    unreachable = install.unreachable_from_app_qubes() if layout == "template" else []
    if unreachable:
        print(
            f"qconnect: warning: the service runs from {unreachable[0]}, which a template's "
            "app qubes do not get (a standalone qube does): install qconnect under /usr or "
            "/opt in the template",
            file=sys.stderr,
        )
    # A running socket holds the path the template layout's link takes,
    # and a running service keeps its old socket: stop both first.
    if live and any(manifest.form == "socket" for manifest in install.installed(args.root)):
        Systemd().call_or_warn("stop", install.SOCKET_UNIT, install.SERVICE_UNIT)
    manifest = install.install(args.root, args.form, layout=layout)
    for relative in manifest.files:
        print(f"installed {args.root / relative}")
    for relative, target in manifest.links.items():
        print(f"linked {args.root / relative} -> {target}")
    if manifest.rc_local_block:
        print(f"added the start-up block to {args.root / install.RC_LOCAL}")
    if live:
        Systemd().call_or_warn("daemon-reload")
        if args.form == "socket":
            Systemd().call_or_warn("start", install.SOCKET_UNIT)
    return 0


def _layout(option: str | None, live: bool) -> "Layout":
    """The layout asked for, or the one this qube's persistence calls for.

    A layout given against what qubesdb says is honoured with a warning:
    the user may know better (testing in a disposable, say), but should hear
    what will not last.
    """
    from qconnect.core.persistence import Persistence, detect_persistence
    from qconnect.service import install

    if not live:
        if option is None:
            raise CommandLineError(
                "with --root, give --layout app-qube or --layout template: "
                "the kind of qube a tree belongs to cannot be detected"
            )
        return install.Layout(option)
    persistence = detect_persistence()
    if option is None:
        return install.layout_for(persistence)
    install.refuse_if_the_template_installed(Path("/"), persistence, "change it")
    chosen = install.Layout(option)
    gone_at_shutdown = "this is a disposable qube: the installation is gone when it shuts down"
    warning = {
        (Persistence.NONE, install.Layout.APP_QUBE): gone_at_shutdown,
        (Persistence.NONE, install.Layout.TEMPLATE): gone_at_shutdown,
        (Persistence.RW_ONLY, install.Layout.TEMPLATE): "this is an app qube: its /etc comes "
        "from its template at every boot, so the installation lasts until the next reboot",
        (Persistence.FULL, install.Layout.APP_QUBE): "this is a template or standalone qube: "
        "a template's /usr/local and /rw/config do not reach the app qubes based on it",
    }.get((persistence, chosen))
    if warning is not None:
        print(f"qconnect: warning: {warning}", file=sys.stderr)
    return chosen


def _uninstall(args: argparse.Namespace) -> int:
    from qconnect.core.install.systemctl import Systemd
    from qconnect.core.persistence import detect_persistence
    from qconnect.service import install

    live = args.root == Path("/")
    found = install.installed(args.root)
    if live and [manifest.layout for manifest in found] == [install.Layout.TEMPLATE]:
        install.refuse_if_the_template_installed(args.root, detect_persistence(), "uninstall it")
    if live and any(manifest.form == "socket" for manifest in found):
        Systemd().call_or_warn("stop", install.SOCKET_UNIT, install.SERVICE_UNIT)
    removed = install.uninstall(args.root)
    if not removed:
        print(f"no qconnect service installed under {args.root}", file=sys.stderr)
        return 0
    for manifest in removed:
        for relative in [*manifest.files, *manifest.links]:
            print(f"removed {args.root / relative}")
    if live:
        Systemd().call_or_warn("daemon-reload")
    return 0


def run(args: argparse.Namespace) -> int:
    handler = args.handler
    result: int = handler(args)
    return result
