"""``qconnect stop SPEC... | --all``: stop running bindings and wait for them to end."""

import argparse
import time

from qconnect.client.control import STATUS, StopRequest, ask_all
from qconnect.core import argtypes
from qconnect.core.errors import ClientError, CommandLineError, SpecError
from qconnect.core.printable import printable
from qconnect.core.spec import BindingSpec, parse_spec

#: How often ``stop`` looks whether the bindings it stopped are gone. The
#: wait is normally the grace period of their open connections (seconds).
POLL_INTERVAL = 0.1


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Stop running qvm-connect-tcp bindings: they stop accepting at once, open "
        "connections get the binding's grace period, then the command returns."
    )
    parser.add_argument(
        "specs",
        nargs="*",
        type=argtypes.spec,
        metavar="SPEC",
        help="[BIND:]LOCALPORT:[VMNAME]:PORT",
    )
    parser.add_argument("--all", action="store_true", help="stop every running binding")
    parser.add_argument(
        "--timeout",
        type=argtypes.seconds(zero="do not wait"),
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for them to end (default 60)",
    )


def _running() -> set[BindingSpec]:
    """The bindings the processes of this user report (the registry checks who answers)."""
    specs: set[BindingSpec] = set()
    for answer in ask_all(STATUS):
        for binding in answer.bindings:
            try:
                specs.add(parse_spec(binding.spec))
            except SpecError:
                raise ClientError(
                    f"process {answer.pid} reports an invalid binding '{printable(binding.spec)}'"
                ) from None
    return specs


def run(args: argparse.Namespace) -> int:
    if args.all == bool(args.specs):
        raise CommandLineError(
            "expected SPEC... or --all (see 'qconnect list' for the running ones)"
        )
    if args.all:
        wanted = _running()
        if not wanted:
            print("no running bindings")
            return 0
        ask_all(StopRequest())
    else:
        wanted = set(args.specs)
        running = _running()
        missing = sorted(str(spec) for spec in wanted - running)
        if missing:
            raise ClientError(f"no running binding {', '.join(missing)} (see 'qconnect list')")
        for spec in sorted(wanted):
            ask_all(StopRequest(spec))
    deadline = time.monotonic() + args.timeout
    while wanted & _running():
        if time.monotonic() > deadline:
            left = ", ".join(str(spec) for spec in sorted(wanted & _running()))
            raise ClientError(f"still running after {args.timeout:g} s: {left}")
        time.sleep(POLL_INTERVAL)
    for spec in sorted(wanted):
        print(f"stopped {spec}")
    return 0
