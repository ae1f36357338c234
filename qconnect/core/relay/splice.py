"""The splice rules both relays follow, and the constants they share. Standard library only.

A relay moves bytes from a source descriptor into a kernel pipe with one
``splice(2)`` and from the pipe into the sink with more, so the bytes never
enter Python. Splice works only between some kinds of descriptors (sockets,
pipes, regular files for reading); before the first byte has moved, an error
that says "not with these descriptors" means: copy with read/write instead.
After that, an error is an error. A pipe that cannot be made (no descriptor or
memory left) is no reason to fail a call either: the copy goes on without
splice, which needs no descriptor.
"""

import contextlib
import errno
import fcntl
import os

# Bytes one pipe holds, so the most one splice moves. Measured through both
# relays (paired, alternating runs of 256 MiB over loopback TCP, 7 rounds, on
# a shared 2-core machine at load 6): medians 0.85 GB/s with 256 KiB against
# 0.78 GB/s with 1 MiB through the trio relay, 0.71 against 0.84 GB/s through
# the blocking one, each inside the runs' spread (0.24 to 1.33 GB/s): no
# difference to measure. 256 KiB is a quarter of the kernel memory per busy
# direction, which counts in a socket service with hundreds of busy calls;
# the earlier claims either way ("1 MiB for fewer syscalls", "256 KiB because
# 1 MiB was slower") did not show.
PIPE_SIZE = 256 * 1024

# Bytes per read when splice cannot be used (terminals, O_APPEND files, no
# pipe to be had): as large as loopback's socket buffers, so one read usually
# drains what is waiting, and small enough that a thousand busy calls of the
# socket service hold ~64 MB at most. A copy holds it only while bytes are in
# flight.
CHUNK_SIZE = 64 * 1024

#: Whether this Python has os.splice (Linux, Python >= 3.10).
HAVE_SPLICE = hasattr(os, "splice")

# errno values with which splice says "not with these descriptors" (a file
# opened O_APPEND, a terminal, a kernel without splice for this type).
# Before any byte has moved they mean: fall back to read/write.
SPLICE_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})

# errno values that mean "the other side is gone": the direction ends, and
# for the blocking relay that is an ordinary end, not a failure to report.
PEER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN})


class SpliceUnsupported(Exception):
    """Splice cannot carry this direction (now): copy the rest with read/write.

    Raised only when no byte is in a pipe, so nothing is lost by switching.
    """


def open_pipe(*, nonblocking: bool) -> tuple[int, int]:
    """A new pipe (read end, write end) of PIPE_SIZE bytes, close-on-exec.

    Raises SpliceUnsupported when no pipe can be had (EMFILE, ENFILE,
    ENOMEM): the copy then goes on without one. A pipe kept at the default
    size (over the per-user pipe quota) still works, only slower.
    """
    flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
    try:
        pipe_read, pipe_write = os.pipe2(flags)
    except OSError as error:
        raise SpliceUnsupported(os.strerror(error.errno or 0)) from error
    with contextlib.suppress(OSError):
        fcntl.fcntl(pipe_write, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return pipe_read, pipe_write


def splice_unsupported(error: OSError, *, moved_any: bool) -> bool:
    """Whether ``error`` from a splice means "use read/write", not "this stream failed"."""
    return not moved_any and error.errno in SPLICE_UNSUPPORTED


def is_peer_gone(error: OSError) -> bool:
    """Whether ``error`` only says the other end closed or reset the stream."""
    return error.errno in PEER_GONE
