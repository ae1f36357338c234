"""What survives a reboot of this qube: the one fact that decides where files must go.

Shared by ``persist`` (where binding units go) and ``service install``
(where the qubes.ConnectTCP service goes). Qubes publishes it in qubesdb;
outside Qubes there is no qubesdb and everything persists.
"""

import subprocess
from enum import StrEnum

# qubesdb-read answers at once from a local daemon; one that hangs this long
# is broken, and we fall back to the plain-Linux answer rather than hang.
QUBESDB_TIMEOUT = 10


class Persistence(StrEnum):
    """What survives a reboot of this qube (qubesdb's ``/qubes-vm-persistence``).

    ``full``: a template or standalone qube, or any ordinary Linux system.
    ``rw-only``: an app qube; only /home, /rw and /usr/local are kept.
    ``none``: a disposable; nothing is kept.
    """

    FULL = "full"
    RW_ONLY = "rw-only"
    NONE = "none"


def detect_persistence() -> Persistence:
    """Ask qubesdb what this qube keeps; ``full`` outside Qubes."""
    try:
        result = subprocess.run(
            ["qubesdb-read", "/qubes-vm-persistence"],
            capture_output=True,
            text=True,
            timeout=QUBESDB_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return Persistence.FULL
    try:
        return Persistence(result.stdout.strip()) if result.returncode == 0 else Persistence.FULL
    except ValueError:
        return Persistence.FULL
