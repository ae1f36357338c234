"""The trio front of the relay: copy two trio streams into each other with correct half-close.

Used wherever a trio process carries a connection's bytes itself: the socket
service (caller's unix stream <-> the local TCP server) and the client's relay
mode (accepted TCP connection <-> ``qrexec-client-vm``). Each direction is
independent: when one side stops sending, its EOF is passed on with
``send_eof()`` (``shutdown(SHUT_WR)`` on a socket) and the other direction
keeps flowing until its own EOF. There is no grace period and no cut-off, unlike
socat's 0.5 s ``-t`` timeout.

Backpressure, not buffering: a direction reads one chunk, then waits until the
other side has taken all of it before reading again. A peer that stops reading
therefore stops its counterpart (through the kernel's socket buffers and TCP
flow control); the relay never holds more than one chunk per direction.
"""

import contextlib
import os
import time
from dataclasses import dataclass, field

import trio

from qconnect.core.relay.splice import (
    CHUNK_SIZE,
    HAVE_SPLICE,
    PIPE_SIZE,
    SpliceUnsupported,
    open_pipe,
    splice_unsupported,
)

# Between two sockets the bytes move with splice(2) through a kernel pipe
# (qconnect.core.relay.splice): three to four times the throughput of
# receive/send on loopback. Streams that are not plain sockets use
# receive_some(CHUNK_SIZE)/send_all.

# A busy direction yields to the event loop after moving this many bytes
# without having had to wait: about a millisecond of copying on loopback, so
# other calls stay responsive while a bulk transfer costs no scheduling.
CHECKPOINT_BYTES = 4 * 1024 * 1024

_SPLICE_FLAGS = getattr(os, "SPLICE_F_NONBLOCK", 0) | getattr(os, "SPLICE_F_MOVE", 0)


@dataclass
class RelayStats:
    """What a relay moved, and how it ended; the caller logs it.

    ``a_to_b`` and ``b_to_a`` count the bytes delivered in each direction
    (received from one side and fully handed to the other); the relay adds to
    them, so a caller that forwarded some bytes itself may count those first. ``a_eof`` and
    ``b_eof`` say whether that side sent its EOF (and so whether it was passed
    on). ``error`` is None for a clean end (both EOFs), else a short reason
    such as ``"a: connection reset"``.
    """

    a_to_b: int = 0
    b_to_a: int = 0
    a_eof: bool = False
    b_eof: bool = False
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    #: Set when each direction has ended (EOF passed on, broken, or cancelled):
    #: lets a caller wait for the last bytes of one direction without wrapping
    #: the stream, which would hide its socket from splice.
    a_to_b_ended: trio.Event = field(default_factory=trio.Event, repr=False, compare=False)
    b_to_a_ended: trio.Event = field(default_factory=trio.Event, repr=False, compare=False)

    @property
    def duration(self) -> float:
        """Seconds from the start of the relay to its end (or to now, while it runs)."""
        return (self.ended if self.ended is not None else time.monotonic()) - self.started


def _reason(error: BaseException) -> str:
    """A short, log-ready reason for a broken stream."""
    cause = error.__cause__ or error.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    if isinstance(error, trio.ClosedResourceError):
        return "closed"
    return str(error) or type(error).__name__


def _receiving_socket(stream: trio.abc.ReceiveStream) -> trio.socket.SocketType | None:
    """The socket ``stream`` receives from, if it is a plain socket (splice can read it)."""
    if isinstance(stream, trio.StapledStream):
        stream = stream.receive_stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None


def _sending_socket(stream: trio.abc.SendStream) -> trio.socket.SocketType | None:
    """The socket ``stream`` sends to, if it is a plain socket (splice can write it)."""
    if isinstance(stream, trio.StapledStream):
        stream = stream.send_stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None


async def _copy(
    source: trio.abc.ReceiveStream,
    sink: trio.abc.HalfCloseableStream,
    stats: RelayStats,
    direction: str,
    chunk_size: int,
    cancel_scope: trio.CancelScope,
) -> None:
    """Copy ``source`` into ``sink`` until EOF, then pass the EOF on.

    Error handling: a broken stream on either end ends the whole relay (the
    other direction is cancelled) and is recorded in ``stats.error``: a reset
    connection cannot half-work, and waiting on its other half would hang.
    """
    forward = direction == "a_to_b"
    try:
        spliced = False
        source_socket, sink_socket = _receiving_socket(source), _sending_socket(sink)
        if HAVE_SPLICE and source_socket is not None and sink_socket is not None:
            # Unsupported at once, or no pipe to be had later: the rest goes
            # the generic way (the counters go on from where splice left them).
            with contextlib.suppress(SpliceUnsupported):
                await _splice_copy(source_socket, sink_socket, stats, forward)
                spliced = True
        while not spliced:
            data = await source.receive_some(chunk_size)
            if not data:
                break
            await sink.send_all(data)
            if forward:
                stats.a_to_b += len(data)
            else:
                stats.b_to_a += len(data)
        if forward:
            stats.a_eof = True
        else:
            stats.b_eof = True
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
        side = "a" if direction == "a_to_b" else "b"
        if stats.error is None:
            stats.error = f"{side}->{'b' if side == 'a' else 'a'}: {_reason(error)}"
        cancel_scope.cancel()
    finally:
        (stats.a_to_b_ended if forward else stats.b_to_a_ended).set()


class _PipePool:
    """Empty kernel pipes for splicing, shared by every call of the process.

    A direction holds a pipe only while bytes are in it (from a splice in to
    the end of the splices out), then gives it back, so a thousand idle
    calls hold no pipe at all: no file descriptors, no pipe pages, and no
    share of the per-user pipe quota (fs.pipe-user-pages-soft, past which
    Linux gives unprivileged processes one-page pipes).
    """

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._idle: list[tuple[int, int]] = []

    def acquire(self) -> tuple[int, int]:
        """An empty pipe; SpliceUnsupported when none can be made (no descriptor left)."""
        if self._idle:
            return self._idle.pop()
        return open_pipe(nonblocking=True)

    def close_idle(self) -> None:
        """Close every idle pipe (they are made again when needed)."""
        while self._idle:
            self.discard(self._idle.pop())

    def release(self, pipe: tuple[int, int]) -> None:
        """Take back an EMPTY pipe (or close it when enough are kept)."""
        if len(self._idle) < self._keep:
            self._idle.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: tuple[int, int]) -> None:
        """Close a pipe that may still hold bytes: they must never reach another call."""
        os.close(pipe[0])
        os.close(pipe[1])


#: Empty pipes kept for reuse: enough for the busy directions of a typical
#: moment, few enough (two descriptors each) not to matter when idle.
PIPES_KEPT = 32

_pipes = _PipePool(keep=PIPES_KEPT)


async def _splice_copy(
    source: trio.socket.SocketType,
    sink: trio.socket.SocketType,
    stats: RelayStats,
    forward: bool,
) -> None:
    """Move bytes ``source`` -> ``sink`` through a kernel pipe until EOF.

    Both sockets are non-blocking (trio's), so every splice either moves
    bytes or fails with EAGAIN, and we wait for readiness through trio. The
    pipe is drained completely before the next read (backpressure, as the
    generic copy) and handed back to the pool whenever the source has
    nothing to read. Raises trio.BrokenResourceError when a peer is gone,
    SpliceUnsupported (with the pipe empty) when the generic copy must go on.
    """
    source_fd, sink_fd = source.fileno(), sink.fileno()
    pipe: tuple[int, int] | None = None
    in_pipe = 0
    moved_any = False
    since_checkpoint = 0
    try:
        while True:
            # Yield to the other calls now and then, even when bytes never stop
            # coming (a busy call must not starve the rest), and let a cancel in.
            if since_checkpoint >= CHECKPOINT_BYTES:
                await trio.lowlevel.checkpoint()
                since_checkpoint = 0
            if pipe is None:
                pipe = _pipes.acquire()
            try:
                size = os.splice(source_fd, pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                _pipes.release(pipe)  # empty: nothing was spliced in
                pipe = None
                await trio.lowlevel.wait_readable(source)
                continue
            except OSError as error:
                if splice_unsupported(error, moved_any=moved_any):
                    raise SpliceUnsupported(os.strerror(error.errno or 0)) from None
                raise trio.BrokenResourceError(os.strerror(error.errno or 0)) from error
            if size == 0:
                return
            moved_any = True
            in_pipe = size
            while in_pipe:
                try:
                    in_pipe -= os.splice(pipe[0], sink_fd, in_pipe, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sink)
                except OSError as error:
                    raise trio.BrokenResourceError(os.strerror(error.errno or 0)) from error
            since_checkpoint += size
            if forward:
                stats.a_to_b += size
            else:
                stats.b_to_a += size
    finally:
        if pipe is not None:
            if in_pipe:
                _pipes.discard(pipe)
            else:
                _pipes.release(pipe)


async def relay(
    a: trio.abc.HalfCloseableStream,
    b: trio.abc.HalfCloseableStream,
    *,
    chunk_size: int = CHUNK_SIZE,
    stats: RelayStats | None = None,
) -> RelayStats:
    """Relay bytes between ``a`` and ``b`` both ways until both have sent EOF.

    Returns the RelayStats (the one passed in, if any, so a caller can read
    the live counters from another task, e.g. to log a call that is cancelled).

    Resource handling: the relay never closes ``a`` or ``b``; their owner does,
    after this returns (``async with a, b: await relay(a, b)``). EOFs are
    delivered with ``send_eof()``, so each stream must support half-close
    (trio.SocketStream does; for a process's pipes use a stapled stream whose
    send side's ``aclose()`` is the EOF).

    Error handling: a broken or closed stream ends the relay early with
    ``stats.error`` set; it does not raise. Cancellation from outside (a
    timeout, shutdown) propagates as usual, with the counters up to date.
    """
    stats = stats if stats is not None else RelayStats()
    try:
        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            nursery.start_soon(_copy, a, b, stats, "a_to_b", chunk_size, scope)
            nursery.start_soon(_copy, b, a, stats, "b_to_a", chunk_size, scope)
    finally:
        stats.ended = time.monotonic()
    return stats
