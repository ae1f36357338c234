"""Unix sockets: paths longer than ``sockaddr_un`` allows, and listening with a given mode.

``sun_path`` holds 108 bytes with its NUL, and a loopback machine or a test's
temporary directory easily nests deeper. Such a path is reached through
``/proc/self/fd/N/NAME``, N being a descriptor of its directory (qrexec uses a
symlink in /tmp for the same problem). Standard library only, and ``_socket``
rather than ``socket``: the latter's import costs ~20 ms, more than the whole
per-call loopback entry (``qconnect.loopback.forkcall``) that uses these
functions. A ``socket.socket`` is a ``_socket.socket``, so callers pass either.
"""

import _socket
import os
import stat

#: The longest path ``sockaddr_un`` takes (108 bytes including the NUL).
SUN_PATH_MAX = 107


def _through_directory(sock: _socket.socket, path: str, *, bind: bool) -> None:
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        sock.bind(path) if bind else sock.connect(path)
        return
    directory = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        short = f"/proc/self/fd/{directory}/{os.path.basename(path)}"
        sock.bind(short) if bind else sock.connect(short)
    finally:
        os.close(directory)


def bind_unix(sock: _socket.socket, path: str) -> None:
    """``sock.bind(path)`` for a path of any length; raises OSError as bind does."""
    _through_directory(sock, path, bind=True)


def connect_unix(sock: _socket.socket, path: str) -> None:
    """``sock.connect(path)`` for a path of any length; raises OSError as connect does."""
    _through_directory(sock, path, bind=False)


def listen_unix(sock: _socket.socket, path: str, *, mode: int, backlog: int) -> None:
    """Bind ``sock`` at ``path`` (any length), give the socket file ``mode``, then listen.

    For the stream and seqpacket sockets every daemon here listens on (its
    control socket, the socket service, the loopback's fork-server): until
    listen() a connect() is refused whatever the file's mode, so setting the
    mode between the two leaves no moment when a peer the mode keeps out
    can connect. The process's umask is never touched: it is shared by every
    thread, and a file another thread created while it was narrowed would
    get the wrong mode. The mode is set through a descriptor of the name
    just bound (``O_PATH | O_NOFOLLOW``, checked to be a socket of ours),
    never by following a name that could meanwhile have become a symlink.

    Error handling: raises OSError as bind, chmod or listen would (EEXIST
    when the name was replaced by something else while it was being bound);
    a socket file bound here but not listened on is removed again. The caller
    owns ``sock`` and closes it on error.
    """
    bind_unix(sock, path)
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.geteuid():
            import errno  # only on this path: forkcall's import budget has no room for it

            raise OSError(errno.EEXIST, f"{path} was replaced while it was being bound")
        try:
            # chmod() through the descriptor's /proc name: fchmod() refuses O_PATH.
            os.chmod(f"/proc/self/fd/{fd}", mode)
            sock.listen(backlog)
        except OSError:
            try:  # noqa: SIM105 (contextlib is not in forkcall's import budget)
                os.unlink(path)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)
