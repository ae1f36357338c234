"""Atomic, locked file writes for every file this tool generates.

dom0's policy directory and a qube's unit directories are read by other
programs at any moment: a half-written policy file breaks every qrexec call,
so a reader must only ever see the old content or the new. Standard library
only (the dom0 path uses it).
"""

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qconnect.errors import FileWriteError


def _describe(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else str(error)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` for one read-modify-write of a file in it.

    Two edits at once would each read the old file and the second rename
    would silently drop the first edit; the lock serialises them. The
    directory itself is locked (flock on its descriptor), so no lock file is
    left behind in places such as dom0's policy directory.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise FileWriteError(f"cannot lock {directory}: {_describe(error)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_atomic(path: Path, content: str | bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``content`` so readers see the old or the new file, never a mix.

    The new file is written next to the old one, fsynced, given the old
    file's mode and owner (or ``mode`` for a new file), then renamed over it,
    and the directory is fsynced. A symlink at ``path`` is replaced, never
    written through. Any failure leaves the old file as it was and raises
    FileWriteError with the reason.
    """
    data = content.encode() if isinstance(content, str) else content
    directory = path.parent
    try:
        old = os.lstat(path)
    except FileNotFoundError:
        old = None
    except OSError as error:
        raise FileWriteError(f"cannot write {path}: {_describe(error)}") from None
    if old is not None and stat.S_ISLNK(old.st_mode):
        raise FileWriteError(f"refusing to write {path}: it is a symbolic link")
    if old is not None and not stat.S_ISREG(old.st_mode):
        raise FileWriteError(f"refusing to write {path}: it is not a regular file")
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as error:
        raise FileWriteError(f"cannot write {path}: {_describe(error)}") from None
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if old is not None:
                os.fchmod(fd, stat.S_IMODE(old.st_mode))
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, old.st_uid, old.st_gid)
            else:
                os.fchmod(fd, 0o644 if mode is None else mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp_name, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        reason = "disk full" if error.errno == errno.ENOSPC else _describe(error)
        raise FileWriteError(f"cannot write {path}: {reason}; the old content is intact") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    _fsync_directory(directory)


def symlink_atomic(path: Path, target: str) -> None:
    """Make ``path`` a symbolic link to ``target``, replacing what is there in one rename.

    Readers see the old entry or the new link, never no entry. Any failure
    leaves the old entry as it was and raises FileWriteError with the reason.
    """
    temporary = path.with_name(f".{path.name}.qconnect-tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        os.symlink(target, temporary)
        os.rename(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise FileWriteError(f"cannot link {path}: {_describe(error)}") from None
    _fsync_directory(path.parent)


def remove_file(path: Path) -> bool:
    """Delete ``path`` if present (a symlink itself, never its target); report whether it was."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as error:
        raise FileWriteError(f"cannot remove {path}: {_describe(error)}") from None
    _fsync_directory(path.parent)
    return True


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
