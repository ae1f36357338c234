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
    """A dom0 policy file does not parse, or an edit would break it.

    Where the problem is stays in fields, as qrexec's own parser keeps a
    token's ``filepath`` and ``lineno``: ``file`` (as shown to the user) and
    ``line`` (None: the whole file, or no file at all). ``str()`` gives the
    user-ready ``FILE:LINE: message``; ``lint`` sorts and prints from the
    fields and never parses the text back.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        super().__init__(self.__str__())

    @property
    def where(self) -> str:
        """``FILE:LINE``, ``FILE`` or empty."""
        if self.file is None:
            return ""
        return self.file if self.line is None else f"{self.file}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class FileWriteError(QconnectError):
    """An atomic file write or its lock failed; the old content is intact."""


class PersistError(QconnectError):
    """A permanent binding cannot be installed, changed or removed as asked; nothing changed."""


class ServiceError(QconnectError):
    """The qubes.ConnectTCP service: a bad call descriptor, allowlist or installation."""
