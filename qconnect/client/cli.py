"""``qvm-connect-tcp``: Qubes' command, compatible and stricter.

``qvm-connect-tcp [OPTIONS] [BIND:]LOCALPORT:[VMNAME]:PORT ...`` binds each
local port and, for every connection accepted there, calls
``qubes.ConnectTCP+PORT`` in VMNAME (``@default`` when empty: dom0's policy
picks the qube). It returns once every listener is bound and serving in the
background, like the original; ``--foreground`` stays attached. Run by
systemd with sockets passed (LISTEN_FDS), it serves those instead.
"""

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from qconnect import __version__
from qconnect.cli import EXIT_STATUS_HELP, Parser, run_command
from qconnect.client.limits import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_GRACE,
    DEFAULT_MAX_CONNECTIONS,
    PROCESS_MAX_CONNECTIONS,
)
from qconnect.client.listeners import Listener, adopt_systemd_listeners, open_listeners
from qconnect.client.qrexec_call import choose_mode, find_qrexec_client_vm, this_qube_name
from qconnect.core import argtypes
from qconnect.core.errors import ClientError, CommandLineError
from qconnect.core.fdlimit import raise_open_file_limit
from qconnect.core.logs import setup_logging
from qconnect.core.qrexec import MAX_CALLS_IN_FLIGHT
from qconnect.core.spec import DEFAULT_BIND, BindingSpec, parse_spec

if TYPE_CHECKING:
    from qconnect.client.server import ServerOptions

PROG = "qvm-connect-tcp"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        usage=f"{PROG} [OPTIONS] [BIND:]LOCALPORT:[VMNAME]:PORT ...",
        description=(
            "Bind a local TCP port to a port of another qube using the qubes.ConnectTCP RPC "
            "service. An empty LOCALPORT means the same as PORT; an empty VMNAME means "
            "@default (dom0's policy picks the qube). Returns once every port is bound, "
            "leaving the binding running in the background."
        ),
        epilog=(
            "examples: qvm-connect-tcp ::22 (local 22 to @default's 22); "
            "qvm-connect-tcp 8080:web:80 5432:db:5432; qvm-connect-tcp '[::1]:8080:web:80'. "
            "Options may come before, between or after the SPECs. "
            "See the running bindings with 'qconnect list', stop them with 'qconnect stop'. "
            + EXIT_STATUS_HELP
        ),
    )
    parser.add_argument(
        "specs",
        nargs="*",
        type=argtypes.spec_text,
        metavar="SPEC",
        help="[BIND:]LOCALPORT:[VMNAME]:PORT",
    )
    parser.add_argument(
        "--bind",
        metavar="ADDR",
        type=argtypes.bind_address,
        default=None,
        help="listen on ADDR for every SPEC without its own (default 127.0.0.1; "
        "a non-loopback address lets other qubes on that network connect)",
    )
    parser.add_argument(
        "-f", "--foreground", action="store_true", help="stay attached; log to stderr"
    )
    parser.add_argument(
        "--relay",
        action="store_true",
        help="copy the bytes in this process instead of handing the connection to "
        "qrexec-client-vm (automatic when it lacks --use-stdin-socket)",
    )
    parser.add_argument(
        "--max-connections",
        type=argtypes.count(1, PROCESS_MAX_CONNECTIONS),
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help=f"open connections per binding, 1 to {PROCESS_MAX_CONNECTIONS} (default "
        f"{DEFAULT_MAX_CONNECTIONS}; a target qube serves at most {MAX_CALLS_IN_FLIGHT} calls "
        "at once from the qubes on one side of it, some kept for other callers); more wait "
        "in the listen backlog",
    )
    parser.add_argument(
        "--grace",
        type=argtypes.seconds(zero="close them at once"),
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help=f"on stop, how long open connections may continue (default {DEFAULT_GRACE:g})",
    )
    parser.add_argument(
        "--call-timeout",
        type=argtypes.seconds(zero="never"),
        default=DEFAULT_CALL_TIMEOUT,
        metavar="SECONDS",
        help="end a call that dom0 has not let through after SECONDS while the client's bytes "
        f"wait unread, and close its connection (default {DEFAULT_CALL_TIMEOUT:g}: room for a "
        "target qube to start and an 'ask' prompt to be answered; 0 = never). A connection "
        "on which the client sent nothing is never ended this way",
    )
    parser.add_argument(
        "--systemd",
        action="store_true",
        help="serve the sockets systemd passes (LISTEN_FDS), one binding per socket, named by "
        "FileDescriptorName=TARGET+PORT; automatic when run with LISTEN_FDS and no SPEC",
    )
    parser.add_argument(
        "--log-file",
        metavar="PATH",
        type=argtypes.path,
        help="append the log to PATH (default: the journal, or stderr with --foreground)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--version", action="version", version=f"qconnect {__version__}")
    return parser


def _socket_activated() -> bool:
    """Whether systemd passed sockets to this very process (sd_listen_fds' own test)."""
    return os.environ.get("LISTEN_PID") == str(os.getpid()) and bool(os.environ.get("LISTEN_FDS"))


def parse_specs(texts: Sequence[str], bind: str | None) -> list[BindingSpec]:
    """The bindings of the command line, ``--bind`` (already normalised) filling BIND.

    Two SPECs for one local address and port are a wrong command line.
    """
    specs = [parse_spec(text, default_bind=bind or DEFAULT_BIND) for text in texts]
    seen: dict[tuple[str, int], BindingSpec] = {}
    for spec in specs:
        key = (spec.bind_address, spec.local_port)
        if key in seen:
            raise CommandLineError(
                f"local port {spec.bind_host}:{spec.local_port} given twice "
                f"({seen[key]} and {spec})"
            )
        seen[key] = spec
    return specs


def _warn_exposed(specs: Sequence[BindingSpec]) -> None:
    for spec in specs:
        if not spec.is_loopback:
            print(
                f"{PROG}: warning: listening on {spec.bind_host}:{spec.local_port}, not a "
                f"loopback address: other qubes on that network can connect to "
                f"{spec.target}:{spec.remote_port} through this qube",
                file=sys.stderr,
            )


def run(args: argparse.Namespace) -> int:
    """Bind and serve; every value was checked by the parser's validators already."""
    systemd = args.systemd or (not args.specs and _socket_activated())
    if not systemd and not args.specs:
        raise CommandLineError(
            "no binding given: expected [BIND:]LOCALPORT:[VMNAME]:PORT, e.g. 8080:work:80 or ::444"
        )
    if systemd and args.specs:
        raise CommandLineError("--systemd serves the sockets systemd passes; give no SPEC with it")
    specs = [] if systemd else parse_specs(args.specs, args.bind)
    # Before binding: without qrexec-client-vm nothing can be served, and a
    # port bound for nothing would only be in someone else's way.
    find_qrexec_client_vm()
    log_file = os.path.abspath(args.log_file) if args.log_file else None
    # Imported only now: a mistyped spec is reported without loading trio.
    from qconnect.client.daemon import bind_or_sudo, run_foreground, serve_in_background

    raise_open_file_limit()  # a handed-off connection costs descriptors while it starts
    if systemd:
        return _run_systemd(_options(args, systemd=True), args.verbose)
    listeners: list[Listener] = bind_or_sudo(lambda: open_listeners(specs))
    try:
        options = _options(args, systemd=False)
    except BaseException:
        for listener in listeners:
            listener.sock.close()
        raise
    for spec in specs:
        print(spec.startup_message(), flush=True)
    _warn_exposed(specs)
    if args.foreground:
        return run_foreground(listeners, options, args.verbose, log_file)
    return serve_in_background(listeners, options, args.verbose, log_file)


def _options(args: argparse.Namespace, *, systemd: bool) -> "ServerOptions":
    """Find qrexec-client-vm and decide the mode (asked once, for the whole process)."""
    from qconnect.client.server import ServerOptions

    executable = find_qrexec_client_vm()
    return ServerOptions(
        mode=choose_mode(executable, force_relay=args.relay),
        executable=executable,
        source_qube=this_qube_name(),
        max_connections=args.max_connections,
        grace=args.grace,
        call_timeout=args.call_timeout,
        systemd=systemd,
    )


def _run_systemd(options: "ServerOptions", verbose: bool) -> int:
    """Serve socket-activated listeners, telling systemd when we are ready."""
    from qconnect.client.daemon import LOG_IDENTIFIER, serve
    from qconnect.core.sdnotify import notify

    setup_logging(LOG_IDENTIFIER, verbose=verbose)
    listeners = adopt_systemd_listeners()
    if not listeners:
        raise ClientError(
            "--systemd: no sockets were passed (LISTEN_FDS is unset or not for this process); "
            "run it from a .socket unit with Accept=no and FileDescriptorName=TARGET+PORT"
        )
    _warn_exposed([listener.spec for listener in listeners])
    summary = ", ".join(str(listener.spec) for listener in listeners)

    def ready() -> None:
        notify(f"serving {len(listeners)} binding(s): {summary}", ready=True)

    return serve(listeners, options, on_ready=ready)


def main(argv: Sequence[str] | None = None) -> int:
    """``qvm-connect-tcp``'s entry point: the same front door as ``qconnect``'s."""
    words = list(sys.argv[1:] if argv is None else argv)
    return run_command(PROG, build_parser(), words, default_handler=run)


if __name__ == "__main__":
    sys.exit(main())
