"""qubes.ConnectTCP as an executable service: started by qrexec once per call.

Compatibility form for qubes without socket services or without the daemon
running. It starts per call, so it imports the standard library and small
pure qconnect modules only, never trio (see BRIEF: trio costs ~180 ms).

Contract (DESIGN.md §2): argv[1] and ``QREXEC_SERVICE_ARGUMENT`` carry the
argument (the port), ``QREXEC_REMOTE_DOMAIN`` the calling qube (from dom0,
trustworthy); stdin/stdout are the caller's stream (one socket, or two pipes);
stderr reaches the caller. A failure prints one line there and exits non-zero.
The bytes are relayed by ``qconnect.byterelay`` (splice, one thread per
direction, half-close with shutdown when stdin and stdout share a socket).
"""

import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from qconnect.byterelay import relay_fds
from qconnect.errors import QconnectError
from qconnect.qrexec import EXIT_QREXEC_PROBLEM, EXIT_REFUSED, SERVICE, parse_port
from qconnect.service.allowlist import (
    DEFAULT_ALLOW_FILES,
    AnyPath,
    find_allowlist,
    read_allowlist,
)

# Exit codes the caller's qrexec-client-vm returns. A bad argument or an
# unreachable port gives 125, as qrexec's built-in /dev/tcp service does for
# both, so scripts written for today's Qubes see what they saw. A port this
# qube's allowlist does not serve is a refusal, like dom0's: 126.
EXIT_BAD_ARGUMENT = EXIT_QREXEC_PROBLEM
EXIT_UNREACHABLE = EXIT_QREXEC_PROBLEM
EXIT_NOT_ALLOWED = EXIT_REFUSED
#: The stream broke in the middle (a peer reset): the bytes may be incomplete.
EXIT_BROKEN = 1

#: Loopback addresses tried in order; never a name, so never DNS.
ADDRESSES = (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6))

# A local server that accepts nothing (full backlog) leaves a connect hanging;
# after this many seconds per address the call fails instead of hanging forever.
CONNECT_TIMEOUT = 10.0


class CallFailed(QconnectError):
    """This call cannot be served; the message is the one line the caller sees."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def connect_local(port: int, timeout: float = CONNECT_TIMEOUT) -> tuple[socket.socket, str]:
    """Connect to ``port`` on 127.0.0.1, then ::1; return the socket and the address used."""
    reasons = []
    for address, family in ADDRESSES:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((address, port))
            sock.settimeout(None)
            return sock, address
        except OSError as error:
            sock.close()
            reason = "timed out" if isinstance(error, TimeoutError) else error.strerror
            reasons.append(f"{address}: {(reason or str(error)).lower()}")
    raise CallFailed(f"cannot connect to port {port}: {'; '.join(reasons)}", EXIT_UNREACHABLE)


def check_call(
    argument: str, caller: str, allow_files: Sequence[AnyPath] = DEFAULT_ALLOW_FILES
) -> int:
    """Return the port this call may reach, or raise CallFailed with the caller's message."""
    try:
        port = parse_port(argument, what="port argument")
    except QconnectError as error:
        raise CallFailed(str(error), EXIT_BAD_ARGUMENT) from None
    try:
        path = find_allowlist(allow_files)
        allowlist = read_allowlist(path) if path is not None else None
    except QconnectError as error:
        raise CallFailed(f"refused: {error}", EXIT_NOT_ALLOWED) from None
    if allowlist is not None and not allowlist.allows(port, caller):
        raise CallFailed(
            f"port {port} is not served to {caller}: not in {allowlist.source}",
            EXIT_NOT_ALLOWED,
        )
    return port


def _log_call(message: str, fields: Mapping[str, object]) -> None:
    """One line per call to the journal when there is one (stderr is the caller's)."""
    if not os.path.exists("/run/systemd/journal/socket"):
        return
    try:
        from systemd import journal
    except ImportError:
        return
    journal.send(
        message,
        SYSLOG_IDENTIFIER=SERVICE,
        **{f"QCONNECT_{key.upper()}": str(value) for key, value in fields.items()},
    )


def serve(
    argument: str,
    caller: str,
    *,
    allow_files: Sequence[AnyPath] = DEFAULT_ALLOW_FILES,
    log: Callable[[str, Mapping[str, object]], None] = _log_call,
) -> int:
    """Serve one call on stdin/stdout; return the exit code."""
    started = time.monotonic()
    fields: dict[str, object] = {"caller": caller, "argument": argument[:64]}
    try:
        port = check_call(argument, caller, allow_files)
        fields["port"] = port
        sock, address = connect_local(port)
    except CallFailed as error:
        print(f"{SERVICE}: {error}", file=sys.stderr, flush=True)
        fields.update(outcome="failed", reason=str(error))
        log(f"{caller} -> {argument[:64]!r}: {error}", fields)
        return error.exit_code
    with sock:
        counts = relay_fds(0, 1, sock.fileno())
    up, down = counts.outbound, counts.inbound
    error_text = None
    if counts.error is not None:
        error_text = (counts.error.strerror or str(counts.error)).lower()
    fields.update(
        address=address,
        bytes_in=up,
        bytes_out=down,
        duration=f"{time.monotonic() - started:.3f}",
        outcome="broken" if error_text else "ok",
    )
    summary = (
        f"{caller} -> {address}:{port}: {up} bytes in, {down} bytes out, "
        f"{fields['duration']} s, {error_text or 'ok'}"
    )
    log(summary, fields)
    if error_text:
        print(f"{SERVICE}: port {port}: {error_text}", file=sys.stderr, flush=True)
        return EXIT_BROKEN
    return 0


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    allow_files: Sequence[AnyPath] | None = None,
) -> int:
    """Entry point of rpc-services/qubes.ConnectTCP."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    argument = argv[1] if len(argv) > 1 else environ.get("QREXEC_SERVICE_ARGUMENT", "")
    caller = environ.get("QREXEC_REMOTE_DOMAIN", "") or "unknown"
    if allow_files is None:
        override = environ.get("QCONNECT_ALLOW_FILE")
        allow_files = (override,) if override else DEFAULT_ALLOW_FILES
    return serve(argument, caller, allow_files=allow_files)
