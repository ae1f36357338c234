"""The trio byte relay: copy two streams into each other with correct half-close.

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

import time
from dataclasses import dataclass, field

import trio

# Bytes asked for per receive. 64 KiB matches the loopback interface's default
# socket buffers well enough that one call usually drains what is waiting; a
# larger chunk buys little throughput (the syscalls are already few) and costs
# memory per busy call, a smaller one multiplies trio's per-call scheduling
# overhead. The buffer exists only while bytes are in flight: an idle call
# holds no chunk at all.
CHUNK_SIZE = 65536


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
        while True:
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
