"""Telling the service manager how we are doing (sd_notify(3)), for every daemon of ours.

The client under ``--systemd`` and the socket service both report READY,
a STATUS line while they run and STOPPING when asked to stop. systemd-python's
``systemd.daemon.notify`` wraps libsystemd's own ``sd_notify``, which knows
every form NOTIFY_SOCKET takes (a path, an abstract ``@name``, a vsock
address on newer systemd), so it does the sending; this module only adds
what each caller needed on its own:

- nothing happens, and nothing is imported, when NOTIFY_SOCKET is unset (run
  from a terminal, or a unit without Type=notify);
- a service manager that cannot be told (its socket gone, systemd-python
  missing from a hand-made install) never stops the daemon: the status is
  advisory, the work is not;
- a STATUS text cannot forge a second assignment: the message is one
  ``KEY=VALUE`` per line, so a newline in the text would start a new one
  (``READY=1`` from a peer's name, say); every non-printable character is
  escaped as in the log (``logs.escape_controls``).
"""

import logging
import os

from qconnect.core.logs import escape_controls
from qconnect.core.printable import printable

logger = logging.getLogger(__name__)

#: The environment variable through which the service manager gives its socket.
NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


def notify(status: str | None = None, *, ready: bool = False, stopping: bool = False) -> bool:
    """Send READY=1 / STOPPING=1 / STATUS=``status`` (those given) to the service manager.

    Returns whether the message was sent: False without a service manager,
    without systemd-python, or when the send failed (logged at debug level).
    """
    if not os.environ.get(NOTIFY_SOCKET_ENV):
        return False
    assignments = []
    if ready:
        assignments.append("READY=1")
    if stopping:
        assignments.append("STOPPING=1")
    if status is not None:
        assignments.append(f"STATUS={escape_controls(status)}")
    if not assignments:
        return False
    try:
        from systemd import daemon  # only ever needed under a service manager
    except ImportError:
        logger.debug("systemd-python is not installed: the service manager is not told")
        return False
    try:
        return bool(daemon.notify("\n".join(assignments)))
    except OSError as error:
        logger.debug(
            "could not notify the service manager at %s: %s",
            printable(os.environ.get(NOTIFY_SOCKET_ENV, "")),
            error.strerror or error,
        )
        return False
