"""qubes.ConnectTCP as an executable service: started by qrexec once per call.

Compatibility form for qubes without socket services or without the daemon
running. It starts per call, so it imports the standard library and small
pure qconnect modules only, never trio (see BRIEF: trio costs ~180 ms).

Contract (DESIGN.md §2): argv[1] and ``QREXEC_SERVICE_ARGUMENT`` carry the
argument (the port), ``QREXEC_REMOTE_DOMAIN`` the calling qube (from dom0,
trustworthy); stdin/stdout are the caller's stream (one socket, or two pipes);
stderr reaches the caller. A failure prints one line there and exits non-zero,
whatever happened: never a traceback, which would show the caller the
target's installation paths; the details go to the target's journal.
The bytes are relayed by ``qconnect.core.relay.blocking`` (splice, one thread per
direction, half-close with shutdown when stdin and stdout share a socket).
"""

import contextlib
import errno
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial

from qconnect.core.errors import AllowlistRefusal, QconnectError, ServiceCallFailed
from qconnect.core.printable import printable
from qconnect.core.qrexec import EXIT_QREXEC_PROBLEM, EXIT_REFUSED, SERVICE, parse_port
from qconnect.core.relay.blocking import relay_fds
from qconnect.service import allowlist
from qconnect.service.allowlist import DEFAULT_ALLOW_FILES, AnyPath

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


# socket() errors that mean "this kernel has no such address family" (booted
# with ipv6.disable=1, say): that address is unreachable, the next is tried.
NO_SUCH_FAMILY = frozenset({errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT})

#: What the caller is told when something unforeseen ends the call: no path,
#: no traceback (they would show the target's installation to another qube).
INTERNAL_ERROR = "internal error; the target qube's journal has the details"


def _strerror(error: OSError) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    return (os.strerror(error.errno) if error.errno else str(error)).lower()


def connect_local(port: int, timeout: float = CONNECT_TIMEOUT) -> tuple[socket.socket, str]:
    """Connect to ``port`` on 127.0.0.1, then ::1; return the socket and the address used.

    Error handling: as the socket service's: an address family the kernel
    lacks is an unreachable address; a socket that cannot be made at all (no
    descriptor or memory left) fails the call at once.
    """
    reasons = []
    for address, family in ADDRESSES:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as error:
            if error.errno not in NO_SUCH_FAMILY:
                raise ServiceCallFailed(
                    f"cannot open a socket for port {port}: {_strerror(error)}", EXIT_UNREACHABLE
                ) from None
            reasons.append(f"{address}: {_strerror(error)}")
            continue
        try:
            sock.settimeout(timeout)
            sock.connect((address, port))
            sock.settimeout(None)
            return sock, address
        except OSError as error:
            sock.close()
            reasons.append(f"{address}: {_strerror(error)}")
    raise ServiceCallFailed(
        f"cannot connect to port {port}: {'; '.join(reasons)}", EXIT_UNREACHABLE
    )


def check_call(
    argument: str, caller: str, allow_files: Sequence[AnyPath] = DEFAULT_ALLOW_FILES
) -> int:
    """Return the port this call may reach, or raise ServiceCallFailed with the caller's message.

    The allowlist decides through the same function as the socket service's
    (allowlist.check_call): an unusable file refuses every call, and the
    caller hears one generic line whatever the reason.
    """
    try:
        port = parse_port(argument, what="port argument")
    except QconnectError as error:
        raise ServiceCallFailed(str(error), EXIT_BAD_ARGUMENT) from None
    try:
        allowlist.check_call(port, caller, partial(allowlist.load_allowlist, allow_files))
    except AllowlistRefusal as refusal:
        raise ServiceCallFailed(refusal.public, EXIT_NOT_ALLOWED, str(refusal)) from None
    return port


def _log_call(message: str, fields: Mapping[str, object]) -> None:
    """One line per call to the journal when there is one (stderr is the caller's).

    Never fails: a journal that cannot take the line must not fail the call.
    """
    if not os.path.exists("/run/systemd/journal/socket"):
        return
    try:
        from systemd import journal
    except ImportError:
        return
    with contextlib.suppress(OSError):
        journal.send(**journal_entry(message, fields))


def journal_entry(message: str, fields: Mapping[str, object]) -> dict[str, str]:
    """The journal fields of one call's line, every value one printable line. Pure.

    The message and the fields carry text from outside (the call's argument,
    an allowlist's line), so each passes through :func:`printable`: a newline
    in one cannot add a journal field or a forged line.
    """
    entry = {"MESSAGE": printable(message), "SYSLOG_IDENTIFIER": SERVICE}
    for key, value in fields.items():
        entry[f"QCONNECT_{printable(key).upper()}"] = printable(str(value))
    return entry


def _tell_caller(line: str) -> None:
    """One line on stderr, which qrexec forwards to the caller; a caller gone is no error."""
    with contextlib.suppress(OSError, ValueError):
        print(f"{SERVICE}: {line}", file=sys.stderr, flush=True)


def serve(
    argument: str,
    caller: str,
    *,
    allow_files: Sequence[AnyPath] = DEFAULT_ALLOW_FILES,
    log: Callable[[str, Mapping[str, object]], None] = _log_call,
) -> int:
    """Serve one call on stdin/stdout; return the exit code.

    Error handling: whatever ends the call, the caller gets one line and an
    exit code, never a traceback: a refusal or an unreachable port its own
    line (125 or 126), anything unforeseen INTERNAL_ERROR and 125 with the
    traceback in the journal only.
    """
    started = time.monotonic()
    shown = printable(argument[:64])
    fields: dict[str, object] = {"caller": caller, "argument": shown}
    try:
        return _serve(argument, caller, allow_files, log, fields, started)
    except ServiceCallFailed as error:
        _tell_caller(str(error))
        fields.update(outcome="failed", reason=error.detail)
        log(f"{caller} -> '{shown}': {error.detail}", fields)
        return error.exit_code
    except Exception as error:  # a traceback would show the caller our installation
        import traceback  # only on this path: it costs every call a few ms

        _tell_caller(INTERNAL_ERROR)
        reason = printable(f"{type(error).__name__}: {error}")
        fields.update(outcome="failed", reason=reason, traceback=traceback.format_exc())
        log(f"{caller} -> '{shown}': internal error: {reason}", fields)
        return EXIT_QREXEC_PROBLEM


def _serve(
    argument: str,
    caller: str,
    allow_files: Sequence[AnyPath],
    log: Callable[[str, Mapping[str, object]], None],
    fields: dict[str, object],
    started: float,
) -> int:
    port = check_call(argument, caller, allow_files)
    fields["port"] = port
    sock, address = connect_local(port)
    with sock:
        counts = relay_fds(0, 1, sock.fileno())
    up, down = counts.outbound, counts.inbound
    error_text = None
    if counts.error is not None:
        error_text = _strerror(counts.error)
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
        _tell_caller(f"port {port}: {error_text}")
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
