"""The lines real qrexec would put in dom0's and the qubes' journals, in one file.

The loopback's dom0 daemon, policy daemon and agents all write here
(``DIR/log/qrexec.log``), so a test reads one file to see what happened.
"""

import os
import time
from pathlib import Path


class Logger:
    """Appends the lines real qrexec would put in dom0's and the qubes' journals.

    One ``write`` per line on an O_APPEND file, so concurrent calls never
    interleave within a line. Logging never fails a call.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, component: str, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        line = f"{stamp} {component}[{os.getpid()}]: {message}\n".encode(errors="replace")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return
        try:
            os.write(fd, line)
        except OSError:
            pass
        finally:
            os.close(fd)
