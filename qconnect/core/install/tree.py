"""Every file operation of an installer, confined to one directory tree (``/`` or ``--root``).

An installer runs as root on trees it did not make: a qube's image, a
template's mounted volume. A symbolic link planted anywhere on a path
(``usr -> /elsewhere``, ``rc.local -> /etc/shadow``) must never carry a
write, a rename or a delete out of the tree. So no path is ever handed to
the kernel whole: each one is walked a component at a time from a
descriptor of the root, every directory opened with ``O_NOFOLLOW`` relative
to the one before (``openat``), and the last component is acted on through
its directory's descriptor (``unlinkat``, ``renameat``, ``symlinkat``...).
The kernel never follows a link by itself; this module reads each link and
follows it only while it stays inside the tree:

- a relative link is followed, its ``..`` taken from the directories walked,
  never above the root;
- an absolute link is followed only when it names a place inside the root
  (always so for ``/``);
- anything else is refused with :class:`TreeError`.

Because every step holds the descriptor of the directory it acts in, a link
swapped in between a check and the use cannot redirect it: the walk never
resolves the same name twice. The last component itself is never followed:
a link there is replaced or removed as a link, and read or written never.

Resource handling: every descriptor opened here is closed before the call
returns; :meth:`Tree.locked` holds one on the root for its ``with`` block.
"""

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from qconnect.core.errors import TreeError

# Links followed in one walk before giving up, as the kernel does (MAXSYMLINKS).
_MAX_LINKS = 40

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _reason(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else str(error)


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Tree:
    """One directory tree that an installer may change, and nothing outside it.

    Paths are given as the installer prints them: ``root / "usr/local/..."``
    (or relative to the root). A path that is not lexically under the root,
    or has a ``..`` component, is refused before anything is opened.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._real_root = PurePosixPath(os.path.realpath(root))

    # --- paths ----------------------------------------------------------------

    def parts(self, path: Path | PurePosixPath) -> list[str]:
        """The components of ``path`` below the root; TreeError if it is not below it."""
        relative: PurePosixPath
        if path.is_absolute():
            try:
                relative = PurePosixPath(path).relative_to(PurePosixPath(self.root))
            except ValueError:
                raise TreeError(f"refusing {path}: it is not under {self.root}") from None
        else:
            relative = PurePosixPath(path)
        parts = [part for part in relative.parts if part != "."]
        if ".." in parts:
            raise TreeError(f"refusing {path}: '..' is not allowed in a path under {self.root}")
        return parts

    def _open_root(self) -> int:
        try:
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise TreeError(f"cannot open {self.root}: {_reason(error)}") from None

    def _inside(self, target: str) -> list[str] | None:
        """The components below the root of an absolute link target, or None if outside."""
        try:
            relative = PurePosixPath(os.path.normpath(target)).relative_to(self._real_root)
        except ValueError:
            return None
        return list(relative.parts)

    @contextlib.contextmanager
    def _directory(
        self, shown: Path | PurePosixPath, parts: list[str], created: list[Path] | None
    ) -> Iterator[tuple[int, list[str]]]:
        """A descriptor of the directory ``parts`` (resolved inside the tree), and its real parts.

        ``created``: make missing directories (mode 0755), appending each one
        made, by its real path, so that an undo can remove it again.
        """
        stack = [self._open_root()]
        walked: list[str] = []
        pending = list(parts)
        links = 0
        try:
            while pending:
                part = pending.pop(0)
                if part in ("", "."):
                    continue
                if part == "..":
                    if len(stack) == 1:
                        raise TreeError(f"refusing {shown}: a link in it leads out of {self.root}")
                    os.close(stack.pop())
                    walked.pop()
                    continue
                try:
                    fd = os.open(part, _DIR_FLAGS, dir_fd=stack[-1])
                except FileNotFoundError:
                    if created is None:
                        raise
                    here = self.root.joinpath(*walked, part)
                    try:
                        os.mkdir(part, 0o755, dir_fd=stack[-1])
                    except OSError as error:
                        raise TreeError(
                            f"cannot create directory {here}: {_reason(error)}"
                        ) from None
                    created.append(here)
                    fd = os.open(part, _DIR_FLAGS, dir_fd=stack[-1])
                except OSError as error:
                    if error.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    here = self.root.joinpath(*walked, part)
                    info = os.stat(part, dir_fd=stack[-1], follow_symlinks=False)
                    if not stat.S_ISLNK(info.st_mode):
                        raise TreeError(f"refusing {shown}: {here} is not a directory") from None
                    links += 1
                    target = os.readlink(part, dir_fd=stack[-1])
                    if links > _MAX_LINKS:
                        raise TreeError(f"refusing {shown}: too many symbolic links") from None
                    if target.startswith("/"):
                        inside = self._inside(target)
                        if inside is None:
                            raise TreeError(
                                f"refusing {shown}: {here} is a symbolic link to {target}, "
                                f"outside {self.root}"
                            ) from None
                        _close(stack[1:])
                        del stack[1:]
                        walked = []
                        pending = inside + pending
                    else:
                        pending = target.split("/") + pending
                    continue
                stack.append(fd)
                walked.append(part)
            yield stack[-1], walked
        finally:
            _close(stack)

    @contextlib.contextmanager
    def _parent(
        self, path: Path | PurePosixPath, created: list[Path] | None = None
    ) -> Iterator[tuple[int, str]]:
        """(descriptor of the directory holding ``path``, its last component)."""
        parts = self.parts(path)
        if not parts:
            raise TreeError(f"refusing {path}: it is the root itself")
        with contextlib.ExitStack() as stack:
            try:
                fd, _walked = stack.enter_context(self._directory(path, parts[:-1], created))
            except TreeError:
                raise
            except OSError as error:
                if error.errno == errno.ENOENT and created is None:
                    raise FileNotFoundError(errno.ENOENT, "No such file", str(path)) from None
                raise TreeError(f"cannot reach {path}: {_reason(error)}") from None
            yield fd, parts[-1]

    # --- reading ---------------------------------------------------------------

    def lstat(self, path: Path | PurePosixPath) -> os.stat_result | None:
        """``path``'s own status (a link is not followed); None if it or its directory is absent."""
        try:
            with self._parent(path) as (fd, name):
                return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise TreeError(f"cannot read {path}: {_reason(error)}") from None

    def exists(self, path: Path | PurePosixPath) -> bool:
        return self.lstat(path) is not None

    def is_dir(self, path: Path | PurePosixPath) -> bool:
        """Whether ``path`` is a directory reached inside the tree (links followed inside)."""
        try:
            with self._directory(path, self.parts(path), None):
                return True
        except OSError:
            return False

    def read_bytes(self, path: Path | PurePosixPath, limit: int | None = None) -> bytes | None:
        """A regular file's bytes (at most ``limit``), None when absent; TreeError otherwise.

        A link at ``path`` is refused, not read: its target may be outside.
        """
        try:
            with self._parent(path) as (dir_fd, name):
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=dir_fd)  # fmt: skip
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise TreeError(f"refusing to read {path}: it is a symbolic link") from None
            raise TreeError(f"cannot read {path}: {_reason(error)}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise TreeError(f"refusing to read {path}: it is not a regular file")
            chunks: list[bytes] = []
            size = 0
            while limit is None or size <= limit:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)
        except OSError as error:
            raise TreeError(f"cannot read {path}: {_reason(error)}") from None
        finally:
            os.close(fd)

    def read_text(self, path: Path | PurePosixPath) -> str | None:
        """A UTF-8 text file, None when absent; TreeError if unreadable or not text."""
        data = self.read_bytes(path)
        if data is None:
            return None
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise TreeError(f"cannot read {path}: it is not UTF-8 text") from None

    def readlink(self, path: Path | PurePosixPath) -> str | None:
        """Where the link ``path`` points (never followed); None if absent or not a link.

        A path that leads out of the tree is a TreeError, not "no link": the
        caller must not mistake a hostile tree for a clean one.
        """
        try:
            with self._parent(path) as (fd, name):
                return os.readlink(name, dir_fd=fd)
        except FileNotFoundError:
            return None
        except OSError:
            return None

    def listdir(self, path: Path | PurePosixPath) -> list[str] | None:
        """The names in directory ``path`` (resolved inside the tree); None when absent."""
        try:
            with self._directory(path, self.parts(path), None) as (fd, _walked):
                return os.listdir(fd)
        except FileNotFoundError:
            return None
        except TreeError:
            raise
        except OSError as error:
            raise TreeError(f"cannot list {path}: {_reason(error)}") from None

    # --- changing ----------------------------------------------------------------

    def make_dirs(
        self, directory: Path | PurePosixPath, created: list[Path] | None = None
    ) -> list[Path]:
        """Create ``directory`` and its missing parents; the ones created, outermost first.

        Each one made is also appended to ``created`` as soon as it exists, so
        that a failure half way still tells the caller what to remove.
        """
        created = [] if created is None else created
        try:
            with self._directory(directory, self.parts(directory), created):
                pass
        except TreeError:
            raise
        except OSError as error:
            raise TreeError(f"cannot create directory {directory}: {_reason(error)}") from None
        return created

    def write(self, path: Path | PurePosixPath, data: bytes, mode: int) -> None:
        """Replace ``path`` with ``data`` and ``mode`` atomically; readers see old or new.

        Written to a temporary file in the same directory, fsynced, given the
        old file's owner, renamed over it, and the directory fsynced. A link
        or anything but a regular file at ``path`` is refused, never written
        through. On failure the old file is intact.
        """
        try:
            with self._parent(path) as (dir_fd, name):
                self._write_at(path, dir_fd, name, data, mode)
        except FileNotFoundError:
            raise TreeError(f"cannot write {path}: its directory does not exist") from None

    def _write_at(self, path: Path | PurePosixPath, dir_fd: int, name: str, data: bytes,
                  mode: int) -> None:  # fmt: skip
        try:
            old: os.stat_result | None = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            old = None
        except OSError as error:
            raise TreeError(f"cannot write {path}: {_reason(error)}") from None
        if old is not None and stat.S_ISLNK(old.st_mode):
            raise TreeError(f"refusing to write {path}: it is a symbolic link")
        if old is not None and not stat.S_ISREG(old.st_mode):
            raise TreeError(f"refusing to write {path}: it is not a regular file")
        temporary = f".{name}.{secrets.token_hex(4)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(temporary, flags, 0o600, dir_fd=dir_fd)
        except OSError as error:
            raise TreeError(f"cannot write {path}: {_reason(error)}") from None
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, mode)
                if old is not None:
                    with contextlib.suppress(PermissionError):
                        os.fchown(fd, old.st_uid, old.st_gid)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException as error:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=dir_fd)
            if isinstance(error, OSError):
                reason = "disk full" if error.errno == errno.ENOSPC else _reason(error)
                raise TreeError(
                    f"cannot write {path}: {reason}; the old content is intact"
                ) from None
            raise
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)

    def symlink(self, path: Path | PurePosixPath, target: str) -> None:
        """Make ``path`` a link to ``target``, replacing what is there in one rename.

        ``target`` is stored as given: it is what the qube resolves, never
        followed here.
        """
        try:
            with self._parent(path) as (dir_fd, name):
                temporary = f".{name}.qconnect-tmp"
                try:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(temporary, dir_fd=dir_fd)
                    os.symlink(target, temporary, dir_fd=dir_fd)
                    os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except OSError as error:
                    with contextlib.suppress(OSError):
                        os.unlink(temporary, dir_fd=dir_fd)
                    raise TreeError(f"cannot link {path}: {_reason(error)}") from None
                with contextlib.suppress(OSError):
                    os.fsync(dir_fd)
        except FileNotFoundError:
            raise TreeError(f"cannot link {path}: its directory does not exist") from None

    def remove(self, path: Path | PurePosixPath) -> bool:
        """Delete ``path`` if present (a link itself, never its target); whether it was."""
        try:
            with self._parent(path) as (dir_fd, name):
                try:
                    os.unlink(name, dir_fd=dir_fd)
                except FileNotFoundError:
                    return False
                except OSError as error:
                    raise TreeError(f"cannot remove {path}: {_reason(error)}") from None
                with contextlib.suppress(OSError):
                    os.fsync(dir_fd)
                return True
        except FileNotFoundError:
            return False

    def rmdir(self, path: Path | PurePosixPath) -> bool:
        """Remove the directory ``path`` if it is empty; whether it was removed."""
        try:
            with self._parent(path) as (dir_fd, name):
                os.rmdir(name, dir_fd=dir_fd)
                return True
        except (OSError, TreeError):
            return False

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive ``flock`` on the root directory itself for the ``with`` block.

        Two installers on one tree would each plan from the old files and the
        second would undo the first; the lock serialises them. Locking the
        directory leaves no lock file behind, so a round trip leaves the tree
        exactly as it was.
        """
        fd = self._open_root()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
