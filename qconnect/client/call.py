"""Make one qrexec call for one accepted connection, and say how it ended.

:func:`make_call` starts ``qrexec-client-vm`` for a connection, in handoff
mode (the socket becomes the call's stdin and stdout) or relay mode (we copy
between the socket and the call's stdin/stdout), waits for it, and returns
a :class:`~qconnect.client.outcome.CallResult`: its exit code, what it
wrote on stderr, the bytes relayed, or why it was ended early. It decides nothing else: pacing,
retries, counting and logging are the caller's, from the result.

A call that dom0 never answers (an ``ask`` prompt nobody sees, a target
that never starts) would hold its connection for ever: each call is watched
until it shows it was accepted (see acceptance.py), and ended after the
call timeout if it provably hung.
"""

import dataclasses
import logging
import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from qconnect.client.acceptance import (
    Progress,
    Verdict,
    judge,
    relay_progress,
    still_hung,
    tcp_progress,
)
from qconnect.client.outcome import CallResult, Hang, Relayed
from qconnect.client.qrexec_call import Mode
from qconnect.core.relay.trio_streams import RelayStats, relay

logger = logging.getLogger("qconnect.client")

#: After SIGTERM, seconds a qrexec-client-vm gets to exit before SIGKILL.
TERMINATE_TIMEOUT = 2.0

#: stderr kept from one qrexec-client-vm (e.g. "Request refused") for the log
#: line; the rest is read and dropped so the child never blocks on the pipe.
MAX_STDERR_KEPT = 2048

#: After a call's process exits, how long its stderr may take to reach EOF.
#: Only a grandchild still holding it delays it; its words are not worth more.
STDERR_DRAIN_TIMEOUT = 1.0

#: After a relayed call's process exits, seconds its last output may take to
#: reach the client (at most a pipe buffer, 64 KiB) before the relay ends.
DRAIN_TIMEOUT = 10.0

#: A call is declared hung only if nothing moved between two readings this
#: far apart (the second at the call timeout). An accepted qrexec-client-vm
#: reads waiting bytes within microseconds; a second covers a loaded machine
#: and a call accepted just before the timeout.
HANG_CONFIRM_DELAY = 1.0


async def make_call(
    argv: list[str],
    conn: trio.socket.SocketType,
    mode: Mode,
    call_timeout: float,
    relay_prefix: bytes = b"",
) -> CallResult:
    """Serve ``conn`` with one call of ``argv``; return how it ended.

    ``call_timeout``: seconds after which a call not yet accepted is ended
    if it provably hung (0: never). ``relay_prefix`` (relay mode: an exposed
    listener's binary PROXY header) is sent to the call before the client's bytes.

    Resource handling: ``conn`` stays the caller's to close (in handoff mode
    it is already closed here once the call holds its own copy, so that the
    call's exit is what the client sees). The call's process is reaped
    before this returns or, when cancelled, ended (SIGTERM, then SIGKILL)
    and reaped before the cancellation goes on. Error handling: OSError
    when the process cannot be started.
    """
    call = _Running(call_timeout)
    if mode is Mode.HANDOFF:
        await _run_handoff(argv, conn, call)
    else:
        call.stats = RelayStats()
        await _run_relay(argv, conn, call, call.stats, relay_prefix)
    relayed = None if call.stats is None else Relayed(call.stats.a_to_b, call.stats.b_to_a)
    return CallResult(call.returncode, bytes(call.stderr), relayed, call.hang)


@dataclass
class _Running:
    """What a running call has done so far; the watchers read it while it runs."""

    call_timeout: float
    returncode: int | None = None
    stderr: bytearray = field(default_factory=bytearray)
    stats: RelayStats | None = None
    hang: Hang | None = None


async def _run_handoff(argv: list[str], conn: trio.socket.SocketType, call: _Running) -> None:
    """Give ``conn`` to qrexec-client-vm as its fd 0 and wait for it.

    Our copy of the socket is closed as soon as the child has its own, so
    the child's shutdown() and exit are what the TCP peer sees; only a
    duplicate for reading the socket's counters stays while the call is
    not yet accepted (closed when it is, or when the call ends).
    """
    # The child shares the socket's file description, O_NONBLOCK flag
    # included; qrexec-client-vm expects an ordinary blocking socket.
    os.set_blocking(conn.fileno(), True)
    watched = duplicate(conn) if call.call_timeout > 0 else None
    try:
        errors_ours, errors_theirs = _stdio_pair()
        async with errors_ours:
            try:
                process = await trio.lowlevel.open_process(
                    argv,
                    stdin=conn.fileno(),
                    stdout=subprocess.DEVNULL,
                    stderr=errors_theirs.fileno(),
                    start_new_session=True,  # a Ctrl-C in our terminal must not end calls early
                )
            finally:
                errors_theirs.close()
                conn.close()

            def progress() -> Progress:
                assert watched is not None
                reading = tcp_progress(watched)
                if call.stderr:
                    return dataclasses.replace(reading, returned=reading.returned + 1)
                return reading

            await _wait_call(process, errors_ours, call, progress, watched)
    finally:
        if watched is not None:
            watched.close()


async def _run_relay(
    argv: list[str],
    conn: trio.socket.SocketType,
    call: _Running,
    stats: RelayStats,
    prefix: bytes = b"",
) -> None:
    """Copy between ``conn`` and qrexec-client-vm's stdin/stdout, half-close both ways.

    ``prefix`` (an exposed listener's binary PROXY header) goes first.

    Its stdin and stdout are two socketpairs, not pipes and not one
    socket: qrexec-client-vm passes the remote EOF on by closing fd 1,
    which must reach us as EOF while fd 0 stays open for our bytes.
    """
    to_call, to_call_theirs = _stdio_pair()
    from_call, from_call_theirs = _stdio_pair()
    errors_ours, errors_theirs = _stdio_pair()
    watched: socket.socket | None = None
    # Plain socket streams both ways, so the relay splices in both directions.
    pipes = trio.StapledStream(to_call, from_call)
    stream = trio.SocketStream(conn)
    try:
        try:
            if call.call_timeout > 0:
                # The child's end of its stdin, kept while the call is pending to
                # see whether it reads (closed once it does, or when the call ends).
                watched = to_call_theirs.dup()
            process = await trio.lowlevel.open_process(
                argv,
                stdin=to_call_theirs.fileno(),
                stdout=from_call_theirs.fileno(),
                stderr=errors_theirs.fileno(),
                start_new_session=True,
            )
        finally:
            for theirs in (to_call_theirs, from_call_theirs, errors_theirs):
                theirs.close()

        def progress() -> Progress:
            assert watched is not None
            returned = stats.b_to_a + len(call.stderr) + int(stats.b_eof)
            return relay_progress(stats.a_to_b, watched, returned)

        if prefix:
            await to_call.send_all(prefix)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_relay_then_close, stream, pipes, stats)
            await _wait_call(process, errors_ours, call, progress, watched)
            # The call is over: pass on what it still wrote, then stop waiting
            # for bytes from the client that nobody would receive.
            with trio.move_on_after(DRAIN_TIMEOUT):
                await stats.b_to_a_ended.wait()
            nursery.cancel_scope.cancel()
    finally:
        if watched is not None:
            watched.close()
        await trio.aclose_forcefully(pipes)
        await trio.aclose_forcefully(errors_ours)


async def _wait_call(
    process: trio.Process,
    errors: trio.SocketStream,
    call: _Running,
    progress: Callable[[], Progress],
    watched: socket.socket | None,
) -> None:
    """Wait for a call to end; end it early if it is not accepted in time.

    Resource handling: ``watched`` (the duplicate the readings come
    from) is closed as soon as the call shows it was accepted, or ends.
    """
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as call_scope:
            if watched is not None:
                nursery.start_soon(_watch_acceptance, progress, watched, call, call_scope)
            call.returncode = await _wait_process(process, errors, call.stderr)
        nursery.cancel_scope.cancel()
    if watched is not None:
        watched.close()
    if call_scope.cancelled_caught:
        call.returncode = process.returncode  # ended by us: SIGTERM, or SIGKILL


async def _watch_acceptance(
    progress: Callable[[], Progress],
    watched: socket.socket,
    call: _Running,
    call_scope: trio.CancelScope,
) -> None:
    """Look at a pending call near its timeout; end it if it provably hung.

    One timer per call and nothing once it is accepted: a first reading
    HANG_CONFIRM_DELAY before the timeout, a second at the timeout. A call
    whose client sent nothing is looked at again every timeout period,
    since the client may speak later (still one timer, no busy polling).
    """
    timeout = call.call_timeout
    confirm = min(HANG_CONFIRM_DELAY, timeout / 2)
    started = trio.current_time()
    await trio.sleep(timeout - confirm)
    earlier: Progress | None = None
    while True:
        try:
            reading = progress()
        except OSError as error:
            logger.debug("cannot watch a pending call: %s", error)
            return
        verdict = judge(reading)
        if verdict is Verdict.ACCEPTED:
            watched.close()
            return
        if verdict is Verdict.IDLE:
            earlier = None
            await trio.sleep(timeout - confirm)
            continue
        if earlier is not None and still_hung(earlier, reading):
            call.hang = Hang(waited=trio.current_time() - started, unread=reading.waiting)
            call_scope.cancel()
            return
        earlier = reading
        await trio.sleep(confirm)


# Quoted: trio's streams are generic only from trio 0.23; Debian 12's python3-trio is 0.22.
async def _relay_then_close(
    stream: trio.SocketStream, pipes: "trio.StapledStream[Any, Any]", stats: RelayStats
) -> None:
    """Relay, then end the call if the client broke off (its stdin closed, stdout dropped)."""
    await relay(stream, pipes, stats=stats)
    if stats.error is not None:
        await trio.aclose_forcefully(pipes)


async def _wait_process(process: trio.Process, errors: trio.SocketStream, stderr: bytearray) -> int:
    """Wait for a call to end, collecting its stderr; on cancellation end it and reap it."""
    try:
        collected = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_collect, errors, stderr, collected)
            returncode = await process.wait()
            # Its stderr ends with it, unless a grandchild still holds it.
            with trio.move_on_after(STDERR_DRAIN_TIMEOUT):
                await collected.wait()
            nursery.cancel_scope.cancel()
            return returncode
    except BaseException:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with trio.move_on_after(TERMINATE_TIMEOUT):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        raise


def duplicate(conn: trio.socket.SocketType) -> socket.socket:
    """A second descriptor of ``conn``'s socket (close-on-exec), for reading its counters."""
    return socket.socket(fileno=os.dup(conn.fileno()))


def _stdio_pair() -> tuple[trio.SocketStream, socket.socket]:
    """A connected pair: our end as a trio stream, the child's as a blocking socket.

    Sockets rather than pipes: a child that splice()s a socket into a pipe
    holds the pipe's lock while it waits for data, and our non-blocking read
    of that pipe would then block the whole event loop.
    """
    ours, theirs = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(ours)), theirs


async def _collect(stream: trio.abc.ReceiveStream, kept: bytearray, done: trio.Event) -> None:
    """Read a child's stderr to EOF, keeping the first MAX_STDERR_KEPT bytes."""
    try:
        while True:
            data = await stream.receive_some(4096)
            if not data:
                return
            room = MAX_STDERR_KEPT - len(kept)
            if room > 0:
                kept.extend(data[:room])
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        done.set()
