"""Every exception a user can see, in one place, each carrying a message ready for them.

The command-line layer (``qconnect.cli.run_command``, shared by ``qconnect``
and ``qvm-connect-tcp``) prints ``str(error)`` as one line on stderr and
exits with ``error.exit_code``; nothing below it ever prints a traceback for
a user mistake. Where an error carries data a caller acts on (a file and
line, a port, marker counts, an exit status for qrexec), it is a field, never
something to parse back out of the message.

Exit codes follow one rule, the same for every command:

* **2, the command line is wrong**: an unknown option or subcommand, a
  missing argument, a value that breaks its grammar (argparse's ``type=``
  validators of :mod:`qconnect.core.argtypes` refuse those before anything
  runs), or options that contradict each other (:class:`CommandLineError`).
  Whether a command line is wrong never depends on the machine it runs on.
* **1, it could not be done**: a file that is missing or damaged, a refusal
  (a policy, an allowlist, a file we did not write), a system failure. Every
  other :class:`QconnectError` is one of these.

Exceptions that never leave their module (a parser's internal signal, a
relay's fallback) stay private to it; they are not user-facing.
"""


class QconnectError(Exception):
    """A user-facing failure: the message names the bad value and what was expected.

    Exit status 1: the command line was fine, but it could not be done.
    """

    exit_code = 1


class CommandLineError(QconnectError):
    """The command line is wrong in a way no single option's validator can see.

    Two options that exclude each other, one that needs another, a required
    choice left out. Exit status 2, and the command's usage line is printed
    before the message, as argparse does for its own refusals.
    """

    exit_code = 2


class SpecError(QconnectError):
    """A binding spec (``[bind:]localport:[vmname]:port``) or port is malformed.

    On the command line the validators turn it into argparse's exit 2; met
    anywhere else (a running process's report, a unit's socket name) it is
    data we were given that cannot be used: exit 1.
    """


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


class TreeError(FileWriteError):
    """A path would leave the ``--root`` tree, or cannot be used there; nothing was done to it."""


class FenceError(QconnectError):
    """A file's marker lines are damaged, so its fenced block cannot be found.

    The marker texts and their counts are fields, so a caller can word its
    own message: ``begins`` and ``ends`` are how many BEGIN and END lines the
    file has; ``unclosed`` says the last marker line is a BEGIN (a block that
    never ends).
    """

    def __init__(self, begin: str, end: str, begins: int, ends: int, unclosed: bool) -> None:
        super().__init__(
            f"damaged markers ({begins} '{begin}' and {ends} '{end}' lines): "
            "repair the file by hand"
        )
        self.begin = begin
        self.end = end
        self.begins = begins
        self.ends = ends
        self.unclosed = unclosed


class SystemctlError(QconnectError):
    """A systemctl command failed or did not answer; the message is its last word."""


class PersistError(QconnectError):
    """A permanent binding cannot be installed, changed or removed as asked; nothing changed."""


class ClientError(QconnectError):
    """A binding cannot be set up: the message says which and what to do instead."""


class PrivilegedPortError(ClientError):
    """Binding a port below ip_unprivileged_port_start needs root."""


class ServiceError(QconnectError):
    """The qubes.ConnectTCP service: a bad call descriptor, allowlist or installation."""


class AllowlistRefusal(ServiceError):
    """The allowlist does not let this call through.

    ``str()`` is the detail for the target's own log (file, line, names);
    ``public`` is the one line the caller may be told, the same whatever the
    reason, so that a caller learns nothing about the target's configuration.
    """

    def __init__(self, port: int, detail: str) -> None:
        super().__init__(detail)
        self.port = port
        self.public = f"port {port} is not served by this qube's allowlist"


class ServiceCallFailed(ServiceError):
    """The executable service cannot serve this call.

    The message is the one line the caller sees; ``exit_code`` is the status
    qrexec reports to the caller (125, 126…); ``detail`` (the message by
    default) is what the target's journal records, and may name what the
    caller must not learn (the allowlist's path and lines, other qubes).
    """

    def __init__(self, message: str, exit_code: int, detail: str | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.detail = message if detail is None else detail


class LoopbackError(QconnectError):
    """A loopback machine cannot be created or used as asked."""


class RpcConfigError(LoopbackError):
    """An rpc-config file qrexec-agent would refuse (the call fails with 125)."""


class AgentCallFailed(LoopbackError):
    """The loopback target's agent could not start the service.

    ``exit_code`` is what the caller's qrexec-client-vm exits with, as
    qrexec-agent would make it (125: a qrexec problem, 127: no such service).
    """

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
