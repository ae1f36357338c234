"""``qconnect``: the subcommand front door.

Each subcommand lives in its own module, imported only when that subcommand
runs, so ``qconnect policy`` in dom0 never imports trio and starts fast.
A subcommand module provides ``configure(parser)`` and ``run(args) -> int``.
"""

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn, Protocol

from qconnect import __version__
from qconnect.core.errors import QconnectError
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


class _Parser(argparse.ArgumentParser):
    """argparse, with its error line escaped: it quotes a bad choice but not an extra word.

    ``unrecognized arguments: ...`` shows the words as given, so a newline
    or a terminal escape sequence in one would reach the terminal as such.
    Subparsers are made of the same class, so every subcommand gets this.
    """

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {printable(message)}\n")


def _load(name: str) -> CommandModule:
    module: CommandModule = importlib.import_module(COMMANDS[name][0])
    return module


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """Build the parser, configuring only the subcommand being run (lazy imports)."""
    parser = _Parser(
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


def run_command(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    """Parse, run, and turn user mistakes into one line on stderr and an exit code."""
    args = parser.parse_args(argv)
    try:
        handler = getattr(args, "handler", None)
        if handler is None:
            handler = _load(args.command).run
        result: int = handler(args)
        return result
    except QconnectError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 141


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    return run_command("qconnect", build_parser(words), words)


if __name__ == "__main__":
    sys.exit(main())
