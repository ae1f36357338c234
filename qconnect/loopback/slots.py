"""Calls in flight: the loopback's copy of qrexec-daemon's data-channel table.

A real qube's qrexec-daemon hands each call a vchan port from a fixed table,
so one qube can have at most ``MAX_CALLS_IN_FLIGHT`` calls of its own running
and the next is refused until one ends. The loopback has no daemon: each call
is its own process, so the table is a directory of lock files, one per slot,
and a call holds its slot with ``flock`` for as long as its process lives.
The kernel drops the lock when the process dies however it dies, so a killed
call can never leak a slot.
"""

import contextlib
import fcntl
import os
from pathlib import Path

from qconnect.qrexec import MAX_CALLS_IN_FLIGHT


def _slot_path(directory: Path, index: int) -> Path:
    return directory / f"slot-{index:03d}"


def acquire(directory: Path) -> int | None:
    """Take a free slot for this process; return its descriptor, or None when all are busy.

    The descriptor is close-on-exec (Python's default), so services and
    local programs started by the call do not hold the slot; it is freed when
    this process exits or closes it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    # Start at a slot chosen by the pid, so concurrent callers do not all
    # fight over slot 0 first.
    start = os.getpid() % MAX_CALLS_IN_FLIGHT
    for step in range(MAX_CALLS_IN_FLIGHT):
        index = (start + step) % MAX_CALLS_IN_FLIGHT
        fd = os.open(_slot_path(directory, index), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        return fd
    return None


def count_busy(directory: Path) -> int:
    """How many slots are held right now (a snapshot, for tests and diagnostics)."""
    busy = 0
    for index in range(MAX_CALLS_IN_FLIGHT):
        path = _slot_path(directory, index)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy += 1
        else:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    return busy
