"""The accept loop of one listening socket, in the shape of trio's ``serve_listeners``.

The loop only accepts: it takes a slot before each accept() (so a full
binding leaves new connections in the kernel's listen backlog, where the
client waits, instead of accepting and closing them), then hands the
connection and the slot to ``start``, which starts its handler. What a
slot is, what a handler does and what is logged are the caller's.
"""

import errno
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import trio

#: Pause after accept() fails for lack of descriptors or memory. The pending
#: connection stays in the backlog; retrying at once would spin.
ACCEPT_RETRY_DELAY = 0.1

#: accept() errors that mean "this process is out of resources right now".
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

#: accept() errors that mean "the peer gave up before we accepted": nothing to serve.
ACCEPT_GONE_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


async def accept_loop(
    listener: trio.socket.SocketType,
    *,
    acquire: Callable[[], Awaitable[None]],
    release: Callable[[], None],
    start: Callable[[trio.socket.SocketType, Any], None],
    out_of_resources: Callable[[int], None],
) -> NoReturn:
    """Accept connections on ``listener`` for ever, one slot each.

    ``acquire`` waits for a slot; ``start(conn, peer)`` receives each
    accepted connection with its slot; ``out_of_resources(errno)`` is told
    of an accept() that failed for lack of descriptors or memory, before
    the loop pauses ACCEPT_RETRY_DELAY and tries again.

    Resource handling: ``start`` owns the connection and the slot it is
    given (it must close the one and ``release`` the other, whatever
    happens); a slot taken for an accept that gave no connection is
    released here. ``listener`` stays the caller's to close. Error
    handling: an accept() error other than the above propagates.
    """
    while True:
        await acquire()
        try:
            conn, peer = await listener.accept()
        except OSError as error:
            release()
            if error.errno in ACCEPT_CAPACITY_ERRNOS:
                out_of_resources(error.errno)
                await trio.sleep(ACCEPT_RETRY_DELAY)
                continue
            if error.errno in ACCEPT_GONE_ERRNOS:
                continue
            raise
        except BaseException:
            release()
            raise
        start(conn, peer)
