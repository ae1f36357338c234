"""``qconnect list``: the bindings running in this qube, live from their processes."""

import argparse
import json
import os
import time

from qconnect.client.control import STATUS, ProcessStatus, ask_all
from qconnect.client.registry import runtime_dir
from qconnect.core import exposure
from qconnect.core.printable import printable

ROOT_REGISTRY = "/run/qconnect/client"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Show the qvm-connect-tcp bindings running in this qube: spec, process, mode, "
        "open connections. Bindings started with sudo (ports below 1024) are root's: "
        "list them with 'sudo qconnect list'."
    )
    parser.add_argument("--json", action="store_true", help="print the raw status objects")


def _age(started: float) -> str:
    seconds = max(0, int(time.time() - started))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def format_table(answers: list[ProcessStatus]) -> list[str]:
    """The table ``qconnect list`` prints; every cell from a process goes through printable()."""
    rows: list[tuple[str, ...]] = [
        ("BINDING", "PID", "MODE", "OPEN", "SERVED", "REFUSED", "HUNG", "UP")
    ]
    for answer in answers:
        mode = str(answer.mode) + (" (systemd)" if answer.systemd else "")
        for binding in answer.bindings:
            state = " stopping" if binding.stopping else ""
            cells = (
                binding.spec,
                answer.pid,
                mode,
                f"{binding.open}/{binding.max}{state}",
                binding.served,
                binding.refused,
                binding.hung,
                _age(answer.started),
            )
            rows.append(tuple(printable(str(cell)) for cell in cells))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def run(args: argparse.Namespace) -> int:
    answers = ask_all(STATUS)
    if args.json:
        print(json.dumps([answer.to_json() for answer in answers], indent=2))
        return 0
    if not any(answer.bindings for answer in answers):
        print(f"no running bindings (registry: {printable(str(runtime_dir()))})")
    else:
        for line in format_table(answers):
            print(line)
        specs = [binding.spec for answer in answers for binding in answer.bindings]
        for line in exposure.exposed_lines(specs):
            print(printable(line))
        logs = sorted({printable(str(answer.log)) for answer in answers if answer.log})
        for log in logs:
            print(f"log: {log}")
    hint = root_hint()
    if hint:
        print(hint)
    return 0


def root_hint() -> str | None:
    """A line pointing a user to root's bindings (ports below 1024), when there may be some.

    Root's registry is 0700, so a user usually cannot see into it: then its
    existence is the hint (root has run a binding here since boot).
    """
    if os.geteuid() == 0:
        return None
    try:
        if not os.listdir(ROOT_REGISTRY):
            return None
    except PermissionError:
        return "root may also run bindings here: see them with 'sudo qconnect list'"
    except OSError:
        return None
    return "root also runs bindings here: see them with 'sudo qconnect list'"
