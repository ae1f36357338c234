"""``python -m bench``: every chain side by side, one run, the same server (issue 6).

Chains (see :mod:`bench.chains`): original, builtin, default, exec, relay,
systemd, direct. Figures per chain: throughput each way (SIZE MiB up, then
down), connect + 10-byte echo latency p50/p99 over CALLS sequential
connections, the time to serve BURST connections opened at once, and the
memory (PSS) of every process we own, idle and per open connection. Rounds
interleave the chains so a machine whose speed drifts affects all alike.

Every chain calls through the same loopback qrexec: by default the machine's
fork-server (each call a fork of one long-running process, as real
qrexec-client-vm hands calls to a running agent); ``--loopback in-process``
starts a Python process per call instead, as before the fork-server existed.

The table (each figure, and its ratio to the original and to direct) goes to
stdout, progress to stderr, the raw figures and the machine's description
to ``bench/results/chains.json`` (``--quick``: ``chains-quick.json``, small
sizes, for a check that everything runs; its figures mean little).
"""

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import load, report
from bench.chains import CHAINS, Chain, start_chain
from bench.common import log, machine_info, percentile, stop_process
from qconnect.core.fdlimit import raise_open_file_limit
from tests.client_world import build_machine
from tests.servers import servers_process

RESULTS = Path(__file__).resolve().parent / "results"

#: How the loopback qrexec-client-vm runs calls (see the module docstring).
LOOPBACK_MODES = ("fork-server", "in-process")

#: Full run / --quick: MiB each way, sequential echo calls, burst size,
#: connections held open for the memory figure, seconds a burst may take.
FULL = {"size_mib": 1024, "calls": 500, "burst": 1000, "held": 50, "burst_timeout": 120.0}
QUICK = {"size_mib": 2, "calls": 4, "burst": 20, "held": 2, "burst_timeout": 30.0}

# After a burst or the held connections, seconds for the chain's calls to end
# before the next measurement starts (they end within milliseconds normally;
# a full run waits longer so one chain's tail never weighs on the next).
SETTLE_SECONDS = {False: 1.0, True: 0.1}


def no_channel_refusals(log: Path) -> int:
    """Calls the loopback's dom0 refused so far for lack of a data port (its log's count).

    The loopback models dom0's per-qube port table (qconnect.loopback.channels):
    a burst that overfills it shows here, whatever the chain did about it.
    """
    try:
        return log.read_text(errors="replace").count("Failed to allocate new vchan port")
    except FileNotFoundError:
        return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a check, not a figure")
    parser.add_argument("--size-mib", type=int, help="MiB per transfer (1024; quick 8)")
    parser.add_argument("--calls", type=int, help="sequential echo connections (500; quick 10)")
    parser.add_argument("--burst", type=int, help="connections opened at once (1000; quick 40)")
    parser.add_argument("--held", type=int, help="connections open for the memory figure (50)")
    parser.add_argument("--burst-timeout", type=float, help="seconds a burst may take (120)")
    parser.add_argument(
        "--chains", default=",".join(CHAINS), help=f"comma-separated ({','.join(CHAINS)})"
    )
    parser.add_argument("--output", type=Path, help="where the JSON goes")
    parser.add_argument(
        "--loopback",
        choices=LOOPBACK_MODES,
        default=LOOPBACK_MODES[0],
        help="how the loopback qrexec-client-vm runs each call: handed to the machine's "
        "fork-server (default) or in a Python process of its own",
    )
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = args.chains.split(",")
    unknown = [name for name in names if name not in CHAINS]
    if unknown:
        parser.error(f"unknown chain {unknown[0]!r}: expected some of {', '.join(CHAINS)}")
    if "original" not in names or "direct" not in names:
        parser.error("--chains must include original and direct (the ratios' references)")
    args.chains = names
    if args.output is None:
        args.output = RESULTS / ("chains-quick.json" if args.quick else "chains.json")
    return args


def measure_throughput(chains: list[Chain], size: int, figures: dict[str, dict[str, Any]]) -> None:
    for chain in chains:
        for direction, function in (
            ("up_mb_s", load.upload_mb_s),
            ("down_mb_s", load.download_mb_s),
        ):
            try:
                figures[chain.name][direction] = function(chain.port, size)
            except (OSError, load.ChainBroken) as error:
                figures[chain.name].setdefault("errors", []).append(f"{direction}: {error}")
        log(
            f"  {chain.name}: up {figures[chain.name].get('up_mb_s', 0):.0f} MB/s, "
            f"down {figures[chain.name].get('down_mb_s', 0):.0f} MB/s"
        )


def measure_latency(chains: list[Chain], calls: int, figures: dict[str, dict[str, Any]]) -> None:
    samples: dict[str, list[float]] = {chain.name: [] for chain in chains}
    failures: dict[str, int] = {chain.name: 0 for chain in chains}
    for _ in range(calls):
        for chain in chains:
            try:
                samples[chain.name].append(load.echo_ms(chain.port))
            except (OSError, load.ChainBroken):
                failures[chain.name] += 1
    for chain in chains:
        values = samples[chain.name]
        row = figures[chain.name]
        row["latency_ms"] = values
        if values:
            row["p50_ms"] = percentile(values, 0.50)
            row["p99_ms"] = percentile(values, 0.99)
            row["mean_ms"] = statistics.fmean(values)
        if failures[chain.name]:
            row.setdefault("errors", []).append(
                f"latency: {failures[chain.name]} of {calls} connections failed"
            )


def measure_memory(chain: Chain, held: int, settle: float, row: dict[str, Any]) -> None:
    if chain.name == "direct":
        return
    time.sleep(settle)
    row["idle_kib"] = chain.owned_pss_kib()
    try:
        socks = load.open_echoed(chain.port, held)
    except (OSError, load.ChainBroken) as error:
        row.setdefault("errors", []).append(f"memory: {error}")
        return
    try:
        time.sleep(0.2)
        row["busy_kib"] = chain.owned_pss_kib()
    finally:
        load.close_all(socks)
    row["per_conn_kib"] = (row["busy_kib"] - row["idle_kib"]) / held


def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_open_file_limit()  # a burst holds BURST sockets
    size = args.size_mib << 20
    settle = SETTLE_SECONDS[args.quick]
    figures: dict[str, dict[str, Any]] = {name: {} for name in args.chains}
    chains: list[Chain] = []
    with (
        servers_process("bench") as (_, ports),
        tempfile.TemporaryDirectory(prefix="qconnect-bench-") as tmp,
    ):
        directory = Path(tmp)
        machine, daemon = build_machine(directory / "machine", directory / "service.log")
        loopback = contextlib.ExitStack()
        try:
            qrexec_pid = None
            if args.loopback == "fork-server":
                qrexec_pid = loopback.enter_context(machine.server()).pid
            for name in args.chains:
                chains.append(
                    start_chain(
                        name,
                        machine,
                        daemon.pid,
                        ports["mux"],
                        directory / "chains.log",
                        qrexec_server_pid=qrexec_pid,
                    )
                )
            log("warming up (first process starts, page cache)")
            for chain in chains:
                load.echo_ms(chain.port)
                load.upload_mb_s(chain.port, 4 << 20)
            log(f"throughput, {args.size_mib} MiB each way")
            measure_throughput(chains, size, figures)
            log(f"latency, {args.calls} sequential connections per chain")
            measure_latency(chains, args.calls, figures)
            for chain in chains:
                log(f"memory and burst: {chain.name}")
                measure_memory(chain, args.held, settle, figures[chain.name])
                time.sleep(settle)
                refused_before = no_channel_refusals(machine.log_file)
                result = load.burst(chain.port, args.burst, args.burst_timeout)
                result["count"] = args.burst
                result["no_channel"] = no_channel_refusals(machine.log_file) - refused_before
                figures[chain.name]["burst"] = result
                log(
                    f"  {chain.name}: {result['served']}/{args.burst} served in "
                    f"{result['seconds']:.2f} s"
                )
                time.sleep(settle)
        finally:
            for chain in chains:
                chain.stop()
            loopback.close()
            stop_process(daemon)
    summary = {name: report.summary_row(figures[name]) for name in args.chains}
    results: dict[str, Any] = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "arguments": {
            key: getattr(args, key)
            for key in ("quick", "size_mib", "calls", "burst", "held", "burst_timeout")
        },
        "loopback": args.loopback,
        "chain_descriptions": {name: CHAINS[name] for name in args.chains},
        "summary": summary,
        "ratios_vs_original": report.ratios(summary, "original"),
        "ratios_vs_direct": report.ratios(summary, "direct"),
        "chains": figures,
    }
    results["goals"] = report.goals(summary, results)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(report.table(results))
    print(f"\nraw figures: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
