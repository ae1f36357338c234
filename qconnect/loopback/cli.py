"""``qconnect loopback``: create a loopback Qubes machine and run commands inside its qubes."""

import argparse
import os
import sys

from qconnect.core import argtypes
from qconnect.core.errors import CommandLineError, LoopbackError, PolicyError, QconnectError
from qconnect.loopback.machine import Machine, QubeSpec
from qconnect.policy.parser import parse_line, split_lines
from qconnect.policy.rules import Location


def configure(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="loopback_command", metavar="ACTION")
    commands.required = True

    init = commands.add_parser(
        "init",
        help="create a loopback machine directory",
        description="Create a loopback Qubes machine: dom0's policy directory and "
        "system info, and for each qube its qubes-rpc and rpc-config directories.",
    )
    init.add_argument(
        "directory",
        metavar="DIR",
        type=argtypes.path,
        help="the machine directory (new or empty)",
    )
    init.add_argument(
        "--qube",
        dest="qubes",
        action="append",
        required=True,
        type=_qube_spec,
        metavar="NAME[:TYPE][:TAG,...]",
        help="a qube (repeat for more); TYPE is AppVM (default), DispVM, StandaloneVM or "
        "TemplateVM, e.g. --qube work --qube web::server,public",
    )
    init.add_argument(
        "--policy",
        action="append",
        default=[],
        type=_policy_line,
        metavar="LINE",
        help="a dom0 policy line for policy.d/30-loopback.policy (repeatable), e.g. "
        "'qubes.ConnectTCP +80 work @default allow target=web'",
    )
    init.add_argument(
        "--ask",
        type=_ask_answer,
        metavar="ANSWER",
        help="how 'ask' rules are answered: allow, 'allow QUBE' or deny (default: deny)",
    )
    init.add_argument(
        "--no-stock-services",
        dest="stock",
        action="store_false",
        help="leave out the stock qubes.ConnectTCP (-> /dev/tcp/127.0.0.1) every qube ships",
    )
    init.add_argument(
        "--old-client",
        action="store_true",
        help="play an older qrexec-client-vm that has no --use-stdin-socket option",
    )
    init.set_defaults(handler=_init)

    run = commands.add_parser(
        "run",
        help="run a command inside one qube of a loopback machine",
        description="Run COMMAND as if inside QUBE: qrexec-client-vm on its PATH is the "
        "loopback client, which calls other qubes of the machine through dom0's policy.",
    )
    run.add_argument("directory", metavar="DIR", type=argtypes.path, help="the machine directory")
    run.add_argument("qube", metavar="QUBE", type=argtypes.qube_name, help="the qube to run in")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND...")
    run.set_defaults(handler=_run)

    serve = commands.add_parser(
        "serve",
        help="serve the machine's calls from one long-running process (foreground)",
        description="Run the machine's fork-server: qrexec-client-vm then hands each call to "
        "it (a fork) instead of starting Python for it. Listens on DIR/run/qrexec.sock and "
        "prints 'listening on PATH' when ready; SIGTERM stops it once running calls end. "
        "Without it, calls run in-process as before.",
    )
    serve.add_argument("directory", metavar="DIR", type=argtypes.path, help="the machine directory")
    serve.set_defaults(handler=_serve)


def _qube_spec(text: str) -> QubeSpec:
    """``--qube NAME[:TYPE][:TAG,...]``, by :meth:`QubeSpec.parse`'s grammar."""
    try:
        return QubeSpec.parse(text)
    except QconnectError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _policy_line(text: str) -> str:
    """``--policy LINE``: one line of dom0's policy grammar, checked by dom0's own parser.

    A line break would make one option several rules; a line dom0 would not
    parse would only fail later, at the first call.
    """
    if len(split_lines(text)) != 1:
        raise argparse.ArgumentTypeError(f"invalid policy line {text!r}: expected one line")
    try:
        parse_line(text, Location("--policy", None))
    except PolicyError as error:  # its message, without the FILE:LINE of a file
        raise argparse.ArgumentTypeError(f"invalid policy line: {error.message}") from None
    return text


def _ask_answer(text: str) -> str:
    """``--ask``: how the machine answers 'ask' rules."""
    if text.split()[:1] not in (["allow"], ["deny"]):
        raise argparse.ArgumentTypeError(
            f"invalid answer {text!r}: expected allow, 'allow QUBE' or deny"
        )
    return text


def _init(args: argparse.Namespace) -> int:
    specs: list[QubeSpec] = args.qubes
    given = [spec.name for spec in specs]
    twice = sorted({name for name in given if given.count(name) > 1})
    if twice:
        raise CommandLineError(f"--qube {twice[0]!r} given twice: expected each qube once")
    machine = Machine.create(
        args.directory, specs, policy=args.policy, stock_connect_tcp=args.stock
    )
    if args.ask is not None:
        machine.set_ask_answer(args.ask)
    if args.old_client:
        machine.set_old_client(True)
    names = ", ".join(spec.name for spec in specs)
    print(f"loopback machine {machine.directory} created with dom0 and {names}")
    return 0


def _run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise CommandLineError(
            "no command given: expected `qconnect loopback run DIR QUBE -- COMMAND...`"
        )
    machine = Machine(args.directory)
    env = machine.env_for(args.qube)
    sys.stdout.flush()
    try:
        os.execvpe(command[0], command, env)
    except OSError as error:
        raise LoopbackError(f"cannot run {command[0]!r} in {args.qube}: {error.strerror}") from None
    return 127  # pragma: no cover - execvpe only returns by raising


def _serve(args: argparse.Namespace) -> int:
    from qconnect.core.logs import setup_logging
    from qconnect.loopback import forkserver

    setup_logging("qconnect-loopback-serve")
    forkserver.serve(Machine(args.directory).directory)
    return 0


def run(args: argparse.Namespace) -> int:
    handler = args.handler
    result: int = handler(args)
    return result
