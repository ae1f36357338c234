"""One exception type per area, each carrying a message ready for the user.

The command-line layer prints ``str(error)`` as one line on stderr and exits
non-zero; nothing below it ever prints a traceback for a user mistake.
"""


class QconnectError(Exception):
    """A user-facing failure: the message names the bad value and what was expected."""

    exit_code = 2


class SpecError(QconnectError):
    """A binding spec (``[bind:]localport:[vmname]:port``) or port is malformed."""


class ArgumentError(QconnectError):
    """A qrexec service argument or qube name is malformed."""


class PolicyError(QconnectError):
    """A dom0 policy file does not parse, or an edit would break it."""


class FileWriteError(QconnectError):
    """An atomic file write or its lock failed; the old content is intact."""


class PersistError(QconnectError):
    """A permanent binding cannot be installed, changed or removed as asked; nothing changed."""


class ServiceError(QconnectError):
    """The qubes.ConnectTCP service: a bad call descriptor, allowlist or installation."""
