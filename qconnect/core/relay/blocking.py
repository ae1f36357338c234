"""The blocking relay: standard library, a thread per direction, for per-call processes.

The executable ``qubes.ConnectTCP`` service and the loopback
``qrexec-client-vm`` start once per connection, so they cannot afford trio's
import (~180 ms); they copy bytes with blocking system calls instead, one
thread per direction. Each direction ends on its own EOF and hands that EOF on
(``shutdown(SHUT_WR)`` on a socket, ``close`` otherwise) while the other
direction keeps flowing: a client that has finished sending still gets its
reply, and a server that has finished replying can still be sent to.

The copying follows the rules of :mod:`qconnect.core.relay.splice`: ``os.splice``
through a kernel pipe when both ends allow it, so the bytes never enter
Python; ``read``/``write`` is the fallback (terminals, O_APPEND files, old
kernels, no pipe to be had).
"""

import contextlib
import errno
import os
import select
import socket
import stat
import threading
from collections.abc import Callable
from functools import partial

from qconnect.core.relay.splice import (
    CHUNK_SIZE,
    PIPE_SIZE,
    SpliceUnsupported,
    is_peer_gone,
    open_pipe,
    splice_unsupported,
)

__all__ = [
    "ReadFailed",
    "RelayCounts",
    "WriteFailed",
    "is_peer_gone",
    "pump",
    "relay_fds",
    "shut_read",
    "shut_write",
    "write_all",
]


class ReadFailed(OSError):
    """Reading the source failed (e.g. ECONNRESET): for most callers, an early EOF."""


class WriteFailed(OSError):
    """Writing the destination failed (e.g. EPIPE): whoever read it is gone."""


def _failed(error: OSError, *, reading: bool) -> OSError:
    kind = ReadFailed if reading else WriteFailed
    return kind(error.errno, error.strerror)


class RelayCounts:
    """Bytes moved by a two-way relay, each direction counted on its own.

    ``outbound`` is what went from the local side (stdin, or the first
    socket) to the peer; ``inbound`` what came back. ``error`` holds the first
    failure that ended a direction early (not a peer that went away, which is
    an ordinary end), or None.

    A plain class, not a dataclass: importing dataclasses (and inspect, which
    it pulls in) costs ~10 ms, paid by every per-call process that relays.
    """

    __slots__ = ("error", "inbound", "outbound")

    def __init__(self, outbound: int = 0, inbound: int = 0, error: OSError | None = None) -> None:
        self.outbound = outbound
        self.inbound = inbound
        self.error = error

    def __repr__(self) -> str:
        return (
            f"RelayCounts(outbound={self.outbound}, inbound={self.inbound}, error={self.error!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RelayCounts):
            return NotImplemented
        mine = (self.outbound, self.inbound, self.error)
        return mine == (other.outbound, other.inbound, other.error)

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass it replaces was


def _is_socket(fd: int) -> bool:
    return stat.S_ISSOCK(os.fstat(fd).st_mode)


def _wait_ready(fd: int, *, writing: bool) -> None:
    """Block until ``fd`` can be read (or written).

    A descriptor we were handed may be non-blocking: O_NONBLOCK belongs to
    the open file, shared with whoever passed it (a trio program's accepted
    socket, say), so we wait here instead of changing it under them.
    """
    poller = select.poll()
    poller.register(fd, select.POLLOUT if writing else select.POLLIN)
    poller.poll()


def _retry(function: Callable[[], int], fd: int, *, writing: bool) -> int:
    """``function()``, waiting for ``fd`` and retrying whenever it says EAGAIN."""
    while True:
        try:
            return function()
        except BlockingIOError:
            _wait_ready(fd, writing=writing)


def _splice_all(pipe_read: int, dst_fd: int, count: int) -> None:
    """Move exactly ``count`` bytes that sit in ``pipe_read`` to ``dst_fd``."""
    while count:
        count -= _retry(partial(os.splice, pipe_read, dst_fd, count), dst_fd, writing=True)


def _copy_splice(src_fd: int, dst_fd: int, progress: list[int]) -> None:
    """Copy with splice through a private pipe that only this thread touches.

    Never splice straight into (or out of) a pipe someone else holds: a
    splice from a socket into a pipe keeps the pipe's lock while it waits for
    the socket, so the process reading that pipe blocks even on the bytes
    already in it (seen on Linux 6.x: a reader stuck until the next chunk).
    The private pipe is only locked against ourselves. Raises
    SpliceUnsupported when no pipe can be had or splice refuses these
    descriptors before the first byte: nothing has moved, copy another way.
    """
    pipe_read, pipe_write = open_pipe(nonblocking=False)
    try:
        while True:
            try:
                moved = _retry(
                    lambda: os.splice(src_fd, pipe_write, PIPE_SIZE), src_fd, writing=False
                )
            except OSError as error:
                if splice_unsupported(error, moved_any=progress[0] > 0):
                    raise SpliceUnsupported(error.strerror) from None
                raise _failed(error, reading=True) from None
            if moved == 0:
                return
            try:
                _splice_all(pipe_read, dst_fd, moved)
            except OSError as error:
                if splice_unsupported(error, moved_any=progress[0] > 0):
                    # Nothing reached dst yet: send these bytes the slow way, go on slowly.
                    write_all(dst_fd, os.read(pipe_read, moved))
                    progress[0] += moved
                    _copy_buffered(src_fd, dst_fd, progress)
                    return
                raise _failed(error, reading=False) from None
            progress[0] += moved
    finally:
        os.close(pipe_read)
        os.close(pipe_write)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` to ``fd`` (WriteFailed on error)."""
    view = memoryview(data)
    try:
        while view:
            written = _retry(partial(os.write, fd, view), fd, writing=True)
            view = view[written:]
    except OSError as error:
        raise _failed(error, reading=False) from None


def _copy_buffered(src_fd: int, dst_fd: int, progress: list[int]) -> None:
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    while True:
        try:
            count = _retry(lambda: os.readv(src_fd, [buffer]), src_fd, writing=False)
        except OSError as error:
            raise _failed(error, reading=True) from None
        if count == 0:
            return
        write_all(dst_fd, view[:count])
        progress[0] += count


def pump(src_fd: int, dst_fd: int, progress: list[int] | None = None) -> int:
    """Copy bytes from ``src_fd`` to ``dst_fd`` until EOF on ``src_fd``; return the count.

    Blocking: run it in the thread that owns this direction. It neither
    closes nor shuts down anything; the caller decides what EOF means for
    ``dst_fd`` (see ``shut_write``).

    Error handling: a failure raises ReadFailed (the source broke, e.g.
    ECONNRESET) or WriteFailed (the destination's reader is gone, e.g. EPIPE),
    both OSError; ``is_peer_gone`` tells a vanished peer from a real fault.
    ``progress[0]`` is increased as bytes are delivered, so a caller still
    knows how many went through when an error ends the copy.
    """
    if progress is None:
        progress = [0]
    start = progress[0]
    try:
        _copy_splice(src_fd, dst_fd, progress)
    except SpliceUnsupported:
        _copy_buffered(src_fd, dst_fd, progress)
    return progress[0] - start


def _shutdown(fd: int, how: int) -> None:
    with socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(how)


def shut_write(fd: int) -> None:
    """Deliver EOF to whoever reads the other end of ``fd``, keeping the other direction.

    A socket is shut down for writing, so the same descriptor still reads;
    anything else (a pipe, a file) can only be closed. Closing a descriptor
    that another process or descriptor also holds delivers no EOF: that is
    why stdin and stdout sharing one socket need ``shutdown``.
    """
    if _is_socket(fd):
        try:
            _shutdown(fd, socket.SHUT_WR)
        except OSError as error:
            if error.errno != errno.ENOTCONN:
                raise
    else:
        os.close(fd)


def shut_read(fd: int) -> None:
    """Stop reading ``fd``: wakes a thread blocked reading this socket (it sees EOF).

    Best effort, never raises: it runs after the direction has already failed.
    """
    with contextlib.suppress(OSError):
        if _is_socket(fd):
            _shutdown(fd, socket.SHUT_RD)


def _direction(src_fd: int, dst_fd: int, result: list[int], errors: list[OSError]) -> None:
    """One direction of a relay: copy, then hand EOF on with shut_write."""
    try:
        pump(src_fd, dst_fd, result)
    except OSError as error:
        if not is_peer_gone(error):
            errors.append(error)
        # The source broke, or nobody takes its bytes any more: stop
        # reading it (a socket is shut for reading; other kinds are left).
        shut_read(src_fd)
    try:
        shut_write(dst_fd)
    except OSError as error:
        if not is_peer_gone(error):
            errors.append(error)


def relay_fds(in_fd: int, out_fd: int, peer_fd: int) -> RelayCounts:
    """Relay ``in_fd`` -> ``peer_fd`` and ``peer_fd`` -> ``out_fd`` until both directions end.

    The executable service's shape: ``in_fd``/``out_fd`` are its stdin and
    stdout (qrexec gives them as two socketpairs; they may also be one
    socket), ``peer_fd`` the connected TCP socket. Two connected sockets
    relay with ``relay_fds(a, a, b)`` (``a -> b`` counted as outbound). Each direction's EOF is
    handed on with ``shut_write`` as it happens; the other direction keeps
    going until its own EOF.

    Resource handling: ``out_fd`` is closed (or shut down, when it is a
    socket) when the peer's EOF arrives; ``in_fd`` and ``peer_fd`` are left
    open for the caller to close. Runs one extra thread; returns when both
    directions have ended.

    Error handling: an I/O error ends its direction and is reported in the
    counts; anything else raised in the extra thread is raised here, once
    both directions have ended, never printed by the thread (a per-call
    service's stderr is its caller's, who must not see a traceback).
    """
    outbound = [0]
    inbound = [0]
    errors: list[OSError] = []
    crashed: list[BaseException] = []

    def upload() -> None:
        try:
            _direction(in_fd, peer_fd, outbound, errors)
        except BaseException as error:  # handed to the calling thread, not to excepthook
            crashed.append(error)
            shut_read(peer_fd)  # let the other direction end too

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    _direction(peer_fd, out_fd, inbound, errors)
    thread.join()
    if crashed:
        raise crashed[0]
    return RelayCounts(outbound[0], inbound[0], errors[0] if errors else None)
