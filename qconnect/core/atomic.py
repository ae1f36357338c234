"""Atomic, locked file writes for every file this tool generates.

dom0's policy directory and a qube's unit directories are read by other
programs at any moment: a half-written policy file breaks every qrexec call,
so a reader must only ever see the old content or the new. Standard library
only (the dom0 path uses it).
"""

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from qconnect.core.errors import FileWriteError
from qconnect.core.install.tree import Tree


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

    The install engine's writer (:meth:`qconnect.core.install.tree.Tree.write`)
    does it, in ``path``'s directory: written next to the old file, fsynced,
    given the old file's mode and owner (or ``mode`` for a new file), renamed
    over it, the directory fsynced. A symlink at ``path`` is refused, never
    written through. Any failure leaves the old file as it was and raises
    FileWriteError with the reason.
    """
    data = content.encode() if isinstance(content, str) else content
    if not path.parent.is_dir():
        raise FileWriteError(f"cannot write {path}: no directory {path.parent}")
    directory = Tree(path.parent)
    try:
        old = directory.lstat(path)
        if old is not None and stat.S_ISREG(old.st_mode):
            mode = stat.S_IMODE(old.st_mode)
        directory.write(path, data, 0o644 if mode is None else mode)
    except FileWriteError as error:  # the tree's TreeError: here the caller's area decides
        raise FileWriteError(str(error)) from None


def remove_file(path: Path) -> bool:
    """Delete ``path`` if present (a symlink itself, never its target); report whether it was."""
    try:
        return Tree(path.parent).remove(path)
    except FileWriteError as error:
        raise FileWriteError(str(error)) from None
