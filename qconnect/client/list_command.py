"""``qconnect list``: the bindings running in this qube, live from their processes."""

import argparse
import json
import os
import time
from typing import Any

from qconnect.client import exposure
from qconnect.client.registry import ask_all, runtime_dir

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


def format_table(answers: list[dict[str, Any]]) -> list[str]:
    rows = [("BINDING", "PID", "MODE", "OPEN", "SERVED", "REFUSED", "HUNG", "UP")]
    for answer in answers:
        mode = str(answer.get("mode", "?")) + (" (systemd)" if answer.get("systemd") else "")
        for binding in answer.get("bindings", []):
            state = " stopping" if binding.get("stopping") else ""
            rows.append(
                (
                    str(binding.get("spec")),
                    str(answer.get("pid")),
                    mode,
                    f"{binding.get('open')}/{binding.get('max')}{state}",
                    str(binding.get("served")),
                    str(binding.get("refused")),
                    str(binding.get("hung", 0)),
                    _age(float(answer.get("started", time.time()))),
                )
            )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def run(args: argparse.Namespace) -> int:
    answers = ask_all("status")
    if args.json:
        print(json.dumps(answers, indent=2))
        return 0
    if not any(answer.get("bindings") for answer in answers):
        print(f"no running bindings (registry: {runtime_dir()})")
    else:
        for line in format_table(answers):
            print(line)
        specs = [str(b.get("spec")) for answer in answers for b in answer.get("bindings", [])]
        for line in exposure.exposed_lines(specs):
            print(line)
        logs = sorted({str(answer["log"]) for answer in answers if answer.get("log")})
        for log in logs:
            print(f"log: {log}")
    if os.geteuid() != 0 and os.path.isdir(ROOT_REGISTRY) and os.listdir(ROOT_REGISTRY):
        print("root also runs bindings here: see them with 'sudo qconnect list'")
    return 0
