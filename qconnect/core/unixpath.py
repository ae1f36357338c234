"""Unix socket paths longer than ``sockaddr_un`` allows.

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
