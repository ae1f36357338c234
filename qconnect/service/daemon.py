"""qubes.ConnectTCP as a socket service: one long-running trio process for every call.

qrexec-agent connects to our unix socket once per call and writes the
descriptor ``qubes.ConnectTCP+PORT SOURCE\\0``, then the caller's bytes. We
check the port (qrexec's rule), the allowlist and the limits, connect to
127.0.0.1:PORT then [::1]:PORT (numeric addresses: never DNS) and relay with
correct half-close. No process is started per call.

A socket service cannot set the caller's exit code (qrexec reports 0), so a
call that cannot be served is closed at once, without a byte, and the reason
goes to the log with the caller's name.

One process serves every caller, so nothing that goes wrong inside one call
may reach the others: every exception of a call (an address family the kernel
lacks, no descriptor left, a peer resetting at any step) ends that call only,
with one log line and a count, and the service goes on. Descriptors are
budgeted: the service accepts a call only while the open-file limit leaves
room for everything that call may need, so an accepted call never fails for
want of one; the others wait in the socket's backlog.
"""

import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio

from qconnect.core import sdnotify
from qconnect.core.errors import AllowlistRefusal, QconnectError, ServiceError
from qconnect.core.fdlimit import raise_open_file_limit
from qconnect.core.printable import printable
from qconnect.core.qrexec import SERVICE, parse_port
from qconnect.core.relay.trio_streams import RelayStats, relay
from qconnect.core.unixpath import listen_unix
from qconnect.service.allowlist import (
    DEFAULT_ALLOW_FILES,
    AllowlistCache,
    AnyPath,
    check_call,
)
from qconnect.service.defaults import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DESCRIPTOR_TIMEOUT,
    DEFAULT_MAX_CALLS,
    DEFAULT_MAX_CALLS_PER_CALLER,
)
from qconnect.service.descriptor import (
    MAX_DESCRIPTOR,
    CallDescriptor,
    parse_descriptor,
    split_descriptor,
)

logger = logging.getLogger("qconnect.service")

#: Loopback addresses tried in order; numeric, so never DNS.
ADDRESSES = (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6))

# socket() errors that mean "this kernel has no such address family" (booted
# with ipv6.disable=1, say): that address is unreachable, the next is tried.
NO_SUCH_FAMILY = frozenset({errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT})

# Descriptors the process needs besides its calls: stdin, stdout, stderr, the
# listening socket, trio's epoll and wake-up socketpair, the journal's socket,
# and a few more for what a library opens for a moment (reading the allowlist).
RESERVED_FDS = 16

# Descriptors one call may hold at once: the agent's unix stream, the TCP
# connection to the local server, and one splice pipe (two descriptors) per
# direction while bytes are in it. The relay's pool of idle pipes never holds
# more pipes than calls held at once, so it fits in the same budget.
FDS_PER_CALL = 6

#: Signals that stop the service cleanly (socket removed, one log line).
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}

# How often (seconds) the daemon refreshes its systemd STATUS line; often
# enough for `systemctl status`, rare enough to cost nothing.
STATUS_INTERVAL = 5.0


@dataclass
class ServiceConfig:
    """Settings of one socket service process (the CLI's options)."""

    max_calls: int = DEFAULT_MAX_CALLS
    max_calls_per_caller: int = DEFAULT_MAX_CALLS_PER_CALLER
    descriptor_timeout: float = DEFAULT_DESCRIPTOR_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    allow_files: tuple[AnyPath, ...] = DEFAULT_ALLOW_FILES


@dataclass
class CallLimits:
    """Counts open calls in total and per caller; refuses over the limits."""

    max_calls: int
    max_calls_per_caller: int
    total: int = 0
    per_caller: dict[str, int] = field(default_factory=dict)
    served: int = 0
    refused: int = 0
    failed: int = 0

    def acquire(self, caller: str) -> str | None:
        """Take a slot for ``caller``; return None, or why the call is refused."""
        if self.total >= self.max_calls:
            return f"too many calls open ({self.total}, limit {self.max_calls})"
        mine = self.per_caller.get(caller, 0)
        if mine >= self.max_calls_per_caller:
            return f"too many calls open from {caller} ({mine}, limit {self.max_calls_per_caller})"
        self.total += 1
        self.per_caller[caller] = mine + 1
        return None

    def release(self, caller: str) -> None:
        self.total -= 1
        left = self.per_caller[caller] - 1
        if left:
            self.per_caller[caller] = left
        else:
            del self.per_caller[caller]


class CallRefused(Exception):
    """This call is not served; ``reason`` goes to the log."""

    def __init__(self, reason: str, outcome: str = "refused") -> None:
        super().__init__(reason)
        self.reason = reason
        self.outcome = outcome


async def read_descriptor(stream: trio.SocketStream) -> tuple[CallDescriptor, bytes]:
    """Read the descriptor with a bounded read; return it and the caller's first bytes.

    Never reads more than MAX_DESCRIPTOR + 1 bytes before deciding; the bytes
    after the NUL are the caller's and must be forwarded, not dropped.
    """
    buffer = b""
    while True:
        data = await stream.receive_some(MAX_DESCRIPTOR + 1 - len(buffer))
        if not data:
            raise CallRefused(f"closed before the service descriptor ({len(buffer)} bytes)")
        buffer += data
        try:
            parts = split_descriptor(buffer)
        except ServiceError as error:
            raise CallRefused(str(error)) from None
        if parts is not None:
            try:
                return parse_descriptor(parts[0]), parts[1]
            except ServiceError as error:
                raise CallRefused(str(error)) from None


def calls_within_fd_limit(fd_limit: int) -> int:
    """How many calls may be open at once under an open-file limit of ``fd_limit``."""
    return max(1, (fd_limit - RESERVED_FDS) // FDS_PER_CALL)


def _strerror(error: OSError) -> str:
    return (os.strerror(error.errno) if error.errno else str(error)).lower()


async def connect_local(port: int, timeout: float) -> tuple[trio.SocketStream, str]:
    """Connect to 127.0.0.1:PORT, then [::1]:PORT; return the stream and address used.

    Error handling: an address whose family the kernel lacks (EAFNOSUPPORT)
    or that refuses or times out is skipped with its reason; when none is left
    the call is refused as "unreachable". A socket that cannot be made at all
    (no descriptor or memory left) fails the call at once ("failed"): trying
    the next address would only fail the same way.
    """
    reasons = []
    for address, family in ADDRESSES:
        try:
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
        except OSError as error:
            if error.errno not in NO_SUCH_FAMILY:
                raise CallRefused(
                    f"cannot open a socket for port {port}: {_strerror(error)}", "failed"
                ) from None
            reasons.append(f"{address}: {_strerror(error)}")
            continue
        try:
            with trio.fail_after(timeout):
                await sock.connect((address, port))
        except (OSError, trio.TooSlowError) as error:
            sock.close()
            if isinstance(error, trio.TooSlowError):
                reasons.append(f"{address}: timed out")
            else:
                reasons.append(f"{address}: {_strerror(error)}")
            continue
        return trio.SocketStream(sock), address
    raise CallRefused(f"cannot connect to port {port}: {'; '.join(reasons)}", "unreachable")


class ConnectTCPService:
    """The state of one socket service process: config, allowlist, limits."""

    def __init__(self, config: ServiceConfig, fd_limit: int | None = None) -> None:
        self.config = config
        self.allowlist = AllowlistCache(config.allow_files)
        self.limits = CallLimits(config.max_calls, config.max_calls_per_caller)
        if fd_limit is None:
            fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        #: Calls the open-file limit leaves room for; the listener takes one
        #: slot per accepted call and handle() gives it back (see SlotListener).
        self.fd_calls = calls_within_fd_limit(fd_limit)
        self.fd_slots = trio.Semaphore(self.fd_calls)

    def _check_port(self, call: CallDescriptor) -> int:
        try:
            port = parse_port(call.argument, what="port argument")
        except QconnectError as error:
            raise CallRefused(str(error)) from None
        try:
            check_call(port, call.source, self.allowlist.current)
        except AllowlistRefusal as refusal:
            raise CallRefused(str(refusal)) from None
        return port

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one call on ``stream`` (the agent's connection) and log one line.

        Resource handling: owns ``stream`` and the TCP connection it opens,
        closing both when the call ends, and gives back the descriptor slot
        SlotListener took for it. Error handling: every failure is logged with
        its reason, counted, and closes the call; nothing escapes to the
        listener (one bad call never stops the service): a refusal is
        "refused" or "unreachable", any other exception (an OSError at any
        step, or a bug) "failed". A call cancelled by the service stopping is
        logged too, then the cancellation goes on.
        """
        try:
            await self._handle(stream)
        except Exception:  # a bug in the bookkeeping itself: it still ends this call only
            self.limits.failed += 1
            logger.exception("a call failed in the service's own bookkeeping")
        finally:
            self.fd_slots.release()

    async def _handle(self, stream: trio.SocketStream) -> None:
        started = time.monotonic()
        fields: dict[str, object] = {"caller": "-", "port": "-"}
        stats = RelayStats()
        try:
            async with stream:
                await self._serve_call(stream, fields, stats)
        except CallRefused as refused:
            self.limits.refused += 1
            self._log_unserved(fields, refused.outcome, refused.reason, started)
            return
        except trio.Cancelled:
            stats.error = "service stopping"
            self._log_relayed(fields, stats, started)
            raise
        except Exception as error:  # one call's failure must never end the others
            self.limits.failed += 1
            self._log_unserved(fields, "failed", _failure_reason(error), started, error)
            return
        self.limits.served += 1
        self._log_relayed(fields, stats, started)

    @staticmethod
    def _log_unserved(
        fields: dict[str, object],
        outcome: str,
        reason: str,
        started: float,
        error: BaseException | None = None,
    ) -> None:
        fields.update(outcome=outcome, reason=reason)
        fields["duration"] = f"{time.monotonic() - started:.3f}"
        # A traceback only for what no stream error explains: that is a bug to report.
        bug = error is not None and not isinstance(_leaf(error), (OSError, *_STREAM_ERRORS))
        logger.warning(
            "call from %s to port %s %s: %s",
            fields["caller"],
            fields["port"],
            outcome,
            reason,
            extra={"fields": fields},
            exc_info=error if bug else None,
        )

    async def _serve_call(
        self, stream: trio.SocketStream, fields: dict[str, object], stats: RelayStats
    ) -> None:
        """Descriptor, checks, connect, relay; fills ``fields`` and ``stats`` as it goes."""
        try:
            with trio.fail_after(self.config.descriptor_timeout):
                call, early = await read_descriptor(stream)
        except trio.TooSlowError:
            raise CallRefused(
                f"no service descriptor within {self.config.descriptor_timeout:g} s"
            ) from None
        fields["caller"] = call.source
        # Shown quoted and escaped until it is a valid port: it is the peer's text.
        fields["port"] = "'" + printable(call.argument[:64]) + "'"
        port = self._check_port(call)
        fields["port"] = port
        refusal = self.limits.acquire(call.source)
        if refusal is not None:
            raise CallRefused(refusal)
        try:
            server, address = await connect_local(port, self.config.connect_timeout)
            fields["address"] = address
            async with server:
                try:
                    if early:
                        await server.send_all(early)
                        stats.a_to_b = len(early)
                except trio.BrokenResourceError as error:
                    stats.error = f"a->b: {_failure_reason(error)}"  # the server reset at once
                    return
                await relay(stream, server, stats=stats)
        finally:
            self.limits.release(call.source)

    @staticmethod
    def _log_relayed(fields: dict[str, object], stats: RelayStats, started: float) -> None:
        fields.update(
            bytes_in=stats.a_to_b,
            bytes_out=stats.b_to_a,
            duration=f"{time.monotonic() - started:.3f}",
            outcome="ok" if stats.error is None else "broken",
        )
        if stats.error:
            fields["reason"] = stats.error
        logger.info(
            "call from %s to %s:%s: %d bytes in, %d bytes out, %s s, %s",
            fields["caller"],
            fields.get("address", "-"),
            fields["port"],
            stats.a_to_b,
            stats.b_to_a,
            fields["duration"],
            stats.error or "ok",
            extra={"fields": fields},
        )

    def status_line(self) -> str:
        limits = self.limits
        return (
            f"{limits.total} calls open, {limits.served} served, {limits.refused} refused, "
            f"{limits.failed} failed"
        )


# What trio raises for an OSError on a stream (EBADF becomes ClosedResourceError).
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


def _leaf(error: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups: the one that ended the call."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def _failure_reason(error: BaseException) -> str:
    """A one-line, log-ready reason for an exception that ended a call."""
    leaf = _leaf(error)
    cause = leaf.__cause__ if isinstance(leaf, trio.BrokenResourceError) else None
    if isinstance(cause, OSError):
        leaf = cause
    if isinstance(leaf, OSError):
        name = errno.errorcode.get(leaf.errno or 0, "")
        return f"{_strerror(leaf)}{f' ({name})' if name else ''}"
    return printable(f"{type(leaf).__name__}: {leaf}")


class SlotListener(trio.abc.Listener[trio.SocketStream]):
    """A listener that accepts a call only while one of ``slots`` is free.

    Calls beyond what the open-file limit allows wait in the socket's backlog
    instead of being accepted and then failing for want of a descriptor.

    Resource handling: owns ``inner`` (closed by aclose). Each accepted stream
    holds one slot, which the handler gives back (ConnectTCPService.handle).
    """

    def __init__(self, inner: trio.SocketListener, slots: trio.Semaphore) -> None:
        self.inner = inner
        self.slots = slots

    async def accept(self) -> trio.SocketStream:
        await self.slots.acquire()
        try:
            return await self.inner.accept()
        except BaseException:
            self.slots.release()
            raise

    async def aclose(self) -> None:
        await self.inner.aclose()


def inherited_socket() -> socket.socket | None:
    """The listening socket systemd passed us (socket unit with Accept=no), if any."""
    if not os.environ.get("LISTEN_FDS"):
        return None
    from systemd import daemon as sd_daemon

    fds = sd_daemon.listen_fds()
    if len(fds) != 1:
        raise ServiceError(f"expected one socket from systemd, got {len(fds)}")
    sock = socket.socket(fileno=fds[0])
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ServiceError("the socket systemd passed is not a unix stream socket")
    return sock


def bind_socket(path: str, mode: int = 0o600) -> socket.socket:
    """Bind and listen on the unix socket ``path``, replacing a stale socket file only.

    Mode 0600: only the agent (root in a qube) may connect; any other local
    process could otherwise pose as a calling qube.
    """
    try:
        # As systemd's socket unit does (DirectoryMode=0755): /run/qubes-rpc may not exist yet.
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    except FileExistsError:
        parent = os.path.dirname(path)
        raise ServiceError(f"cannot listen on {path}: {parent} is not a directory") from None
    except OSError as error:
        raise ServiceError(f"cannot listen on {path}: {error.strerror}") from None
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ServiceError(f"refusing to replace {path}: it exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listen_unix(sock, path, mode=mode, backlog=socket.SOMAXCONN)
    except OSError as error:
        sock.close()
        reason = error.strerror or str(error)
        if error.errno == errno.ENOENT:
            reason = "its directory does not exist"
        raise ServiceError(f"cannot listen on {path}: {reason}") from None
    return sock


async def serve(
    listen_sock: socket.socket,
    config: ServiceConfig,
    *,
    # Quoted: trio.TaskStatus exists from trio 0.23; Debian 12's python3-trio is 0.22.
    task_status: "trio.TaskStatus[ConnectTCPService]" = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept calls on ``listen_sock`` until cancelled or SIGTERM/SIGINT.

    Resource handling: takes ownership of ``listen_sock`` and closes it on
    return; calls still open are cancelled (their sockets closed) at return.
    """
    service = ConnectTCPService(config)
    listener = SlotListener(
        trio.SocketListener(trio.socket.from_stdlib_socket(listen_sock)), service.fd_slots
    )
    async with listener, trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, service.handle, [listener])
        nursery.start_soon(_report_status, service)
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope, service)
        sdnotify.notify(service.status_line(), ready=True)
        task_status.started(service)


async def _report_status(service: ConnectTCPService) -> None:
    last = ""
    while True:
        line = service.status_line()
        if line != last:
            sdnotify.notify(line)
            last = line
        await trio.sleep(STATUS_INTERVAL)


async def _stop_on_signal(scope: trio.CancelScope, service: ConnectTCPService) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        # run() blocked these until now, so that a stop request arriving while
        # the socket was being set up is handled here, cleanly, not by dying.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        async for signum in signals:
            logger.info("stopping on %s: %s", signal.Signals(signum).name, service.status_line())
            sdnotify.notify(stopping=True)
            scope.cancel()
            return


def run(socket_path: str, config: ServiceConfig, *, allow_inherited: bool = True) -> int:
    """Run the service in the foreground: systemd's socket if passed, else bind ``socket_path``.

    SIGTERM/SIGINT are held back from the start until the trio signal
    receiver takes them (see _stop_on_signal); the previous signal mask is
    restored on return, whatever happened.
    """
    fd_limit = raise_open_file_limit()  # each call holds up to FDS_PER_CALL descriptors
    fd_calls = calls_within_fd_limit(fd_limit)
    if fd_calls < config.max_calls:
        logger.info(
            "open-file limit %d: at most %d calls at once, more wait to be accepted",
            fd_limit,
            fd_calls,
        )
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        sock = inherited_socket() if allow_inherited else None
        where = "socket from systemd" if sock is not None else socket_path
        if sock is None:
            sock = bind_socket(socket_path)
        logger.info(
            "%s socket service listening on %s (max %d calls, %d per caller)",
            SERVICE,
            where,
            config.max_calls,
            config.max_calls_per_caller,
        )
        try:
            trio.run(serve, sock, config)
        finally:
            if where == socket_path:
                with contextlib.suppress(OSError):
                    os.unlink(socket_path)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return 0


def allow_files_from(paths: Iterable[str] | None) -> tuple[AnyPath, ...]:
    """The allowlist search list: the given files, or the defaults."""
    return tuple(paths) if paths else DEFAULT_ALLOW_FILES
