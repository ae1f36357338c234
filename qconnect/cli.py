"""``qconnect``: the subcommand front door.

Each subcommand lives in its own module, imported only when that subcommand
runs, so ``qconnect policy`` in dom0 never imports trio and starts fast.
A subcommand module provides ``configure(parser)`` and ``run(args) -> int``.
"""

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, Protocol

from qconnect import __version__
from qconnect.core.errors import CommandLineError, QconnectError
from qconnect.core.printable import printable

# name -> (module, one-line help). Modules are imported lazily: see the module docstring.
COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("qconnect.client.list_command", "show the running qvm-connect-tcp bindings"),
    "stop": ("qconnect.client.stop_command", "stop running qvm-connect-tcp bindings"),
    "persist": ("qconnect.persist.cli", "permanent bindings as socket-activated systemd units"),
    "service": ("qconnect.service.cli", "run, install or remove the qubes.ConnectTCP service"),
    "policy": (
        "qconnect.policy.cli",
        "dom0 policy for qubes.ConnectTCP: allow, deny, list, explain, lint",
    ),
    "expose": (
        "qconnect.expose.cli",
        "make a qube's port reachable from the outside world through sys-net, over qrexec",
    ),
    "loopback": (
        "qconnect.loopback.cli",
        "a whole Qubes machine (qubes, policy, qrexec) on one host",
    ),
    "demo": ("qconnect.demo", "show qconnect at work on a sample Qubes machine"),
}


class CommandModule(Protocol):
    def configure(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


#: Exit codes, the same for ``qconnect`` and ``qvm-connect-tcp`` (see
#: docs/ARCHITECTURE.md, "Errors and exit codes").
EXIT_FAILED = 1  #: it could not be done: a file, a refusal, a system failure
EXIT_USAGE = 2  #: the command line is wrong (argparse's own status)
EXIT_INTERRUPTED = 130  #: Ctrl-C: 128 + SIGINT, as a shell reports it
EXIT_BROKEN_PIPE = 141  #: the reader of our output went away: 128 + SIGPIPE

#: The epilog every command's --help ends with.
EXIT_STATUS_HELP = (
    "exit status: 0 done; 1 it could not be done (a file, a refusal, a system failure); "
    "2 the command line is wrong (an unknown option, a bad value, a missing argument)"
)

# The namespace attribute naming the (sub)command parser that parsed the
# command line, so a CommandLineError prints that command's usage line.
_PARSER_ATTR = "_qconnect_parser"


class Parser(argparse.ArgumentParser):
    """argparse as every qconnect command uses it.

    * Its error line is made one safe line (:func:`one_line`): argparse
      quotes a bad choice but not an extra word, so a newline or a terminal
      escape sequence in one would reach the terminal as such.
    * A subcommand's parser refuses the words it does not know itself, so
      ``qconnect list --bogus`` shows ``qconnect list``'s usage, not the
      top-level one (argparse hands unknown words up to the top by default).
    * Options may come between positionals (``qvm-connect-tcp A --bind X B``),
      as with :meth:`parse_intermixed_args`, wherever argparse supports that
      (no subcommands, no ``REMAINDER``, no positional in an exclusive group).
    * It records itself in the namespace, so :func:`run_command` can show the
      right usage line for a :class:`CommandLineError`.

    Subparsers are made of the same class, so every subcommand gets all this.
    """

    #: Set on the parsers of subcommands (by :meth:`add_subparsers`).
    is_subcommand = False
    _intermixing = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Every command's --help ends with the exit codes, unless it words them itself.
        kwargs.setdefault("epilog", EXIT_STATUS_HELP)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)}\n")

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", _SubcommandParser)
        return super().add_subparsers(**kwargs)

    def _can_intermix(self) -> bool:
        positionals = self._get_positional_actions()
        if any(action.nargs in (argparse.PARSER, argparse.REMAINDER) for action in positionals):
            return False
        return not any(
            action in positionals
            for group in self._mutually_exclusive_groups
            for action in group._group_actions
        )

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._intermixing:  # argparse's own passes inside parse_known_intermixed_args
            return super().parse_known_args(args, namespace)
        if self._can_intermix():
            self._intermixing = True
            try:
                parsed, extras = self.parse_known_intermixed_args(args, namespace)
            finally:
                self._intermixing = False
        else:
            parsed, extras = super().parse_known_args(args, namespace)
        if extras and self.is_subcommand:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        if not hasattr(parsed, _PARSER_ATTR):  # the innermost subcommand sets it first
            setattr(parsed, _PARSER_ATTR, self)
        return parsed, extras


class _SubcommandParser(Parser):
    is_subcommand = True


def one_line(message: str) -> str:
    """``message`` as one safe line: escaped by :func:`printable` if it needs to be.

    Most messages quote the bad value with ``repr()`` already, so they are
    printable as they are; escaping them again would double every backslash.
    A message carrying a raw control character (a newline, an escape
    sequence) from outside is escaped whole.
    """
    return message if message.isprintable() else printable(message)


def _load(name: str) -> CommandModule:
    module: CommandModule = importlib.import_module(COMMANDS[name][0])
    return module


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """Build the parser, configuring only the subcommand being run (lazy imports)."""
    parser = Parser(
        prog="qconnect",
        description="Bind TCP ports between Qubes OS qubes over qrexec (qubes.ConnectTCP).",
    )
    parser.add_argument("--version", action="version", version=f"qconnect {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    chosen = next((word for word in argv if not word.startswith("-")), None)
    for name, (_module, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _load(name).configure(sub)
    return parser


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush cannot fail again.

    Without this, Python reports the closed pipe a second time at exit
    ("Exception ignored ... BrokenPipeError"), after we chose the exit code.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stdout (a test's StringIO)
        pass


def run_command(
    prog: str,
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    default_handler: Callable[[argparse.Namespace], int] | None = None,
) -> int:
    """Parse, run, and turn every failure into one line on stderr and an exit code.

    The one front door of ``qconnect`` and ``qvm-connect-tcp``. The handler
    is ``args.handler`` (a subcommand's own), else ``default_handler``, else
    the chosen subcommand's ``run``.

    Error handling: argparse refuses a wrong command line itself (usage line,
    one error line, exit 2; ``--help`` exits 0). Then a
    :class:`CommandLineError` prints the usage line of the (sub)command that
    was parsed and its message, exit 2; any other :class:`QconnectError`
    prints its message, exit ``error.exit_code`` (1 unless it carries
    qrexec's own status); an ``OSError`` nothing below caught is a system
    failure, exit 1; a reader that went away is 141 and Ctrl-C 130, as a
    shell reports those signals. None of these prints a traceback.
    """
    args = parser.parse_args(argv)
    try:
        handler = getattr(args, "handler", None) or default_handler
        if handler is None:
            handler = _load(args.command).run
        result: int = handler(args)
        sys.stdout.flush()
        return result
    except CommandLineError as error:
        usage_parser: argparse.ArgumentParser = getattr(args, _PARSER_ATTR, parser)
        usage_parser.print_usage(sys.stderr)
        print(f"{usage_parser.prog}: error: {one_line(str(error))}", file=sys.stderr)
        return error.exit_code
    except QconnectError as error:
        print(f"{prog}: error: {one_line(str(error))}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except OSError as error:
        print(f"{prog}: error: {one_line(_describe(error))}", file=sys.stderr)
        return EXIT_FAILED


def _describe(error: OSError) -> str:
    """``FILE: reason`` as the C library words it, or the error's own text."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    return f"{error.filename}: {reason}" if error.filename is not None else reason


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    return run_command("qconnect", build_parser(words), words)


if __name__ == "__main__":
    sys.exit(main())
