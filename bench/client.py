"""Client-side benchmark: qvm-connect-tcp (handoff, relay) against the socat original.

``python -m bench.client [--size MIB]`` builds one loopback machine (the same
world as the client's tests: untrusted -> mytcp-service running the socket
service in front of TCP servers) and, in one run, measures each client chain
on the same service:

- original: ``socat TCP-LISTEN:L,reuseaddr,fork``
  ``EXEC:"qrexec-client-vm @default qubes.ConnectTCP+P"``
  (the original writes the target ``''``, which means @default; socat 1.7.4 drops
  that empty word, so it is written out)
- handoff:  ``qvm-connect-tcp L::P`` (the default)
- relay:    ``qvm-connect-tcp --relay L::P``

Figures: throughput (SIZE MiB each way at once, sha256-checked), connect +
10-byte echo latency p50/p99 over sequential connections, time to serve
1,000 connections opened at once, and memory (PSS) of the client's own
processes idle and per open connection, not counting qrexec-client-vm.
Raw numbers go to bench/results/client.json; the table shows each figure
and its ratio to the original.
"""

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from bench.common import descendants, pss_kib
from tests.client_world import World, free_port, make_world
from tests.servers import bulk_transfer

RESULTS = Path(__file__).resolve().parent / "results"

#: Seconds a bulk transfer may take before it counts as failed (0 MiB/s).
BULK_TIMEOUT = 120.0


def own_memory_kib(pid: int) -> int:
    """PSS of the client and its helpers, without qrexec-client-vm (the same for every chain)."""
    total = 0
    for member in [pid, *descendants([pid])]:
        try:
            words = Path(f"/proc/{member}/cmdline").read_bytes().split(b"\0")[:3]
            if any(os.path.basename(word) == b"qrexec-client-vm" for word in words):
                continue  # the loopback client runs as "python -IS .../qrexec-client-vm"
            total += pss_kib(member)
        except OSError:
            continue
    return total


class Chain:
    def __init__(self, world: World, name: str) -> None:
        self.world, self.name = world, name
        self.port = free_port()
        remote = world.ports["echo"]
        self.echo_port, self.bulk_port = self.port, free_port()
        argv: list[list[str]]
        if name == "original":
            argv = [
                [
                    "socat",
                    f"TCP-LISTEN:{port},reuseaddr,fork",
                    # '' as the original writes it: this host's socat (1.7.4)
                    # drops the empty word, so the equivalent @default is used
                    f"EXEC:qrexec-client-vm @default qubes.ConnectTCP+{target}",
                ]
                for port, target in (
                    (self.echo_port, remote),
                    (self.bulk_port, world.ports["bulk"]),
                )
            ]
        else:
            extra = ["--relay"] if name == "relay" else []
            argv = [
                world.client_argv(
                    "--foreground",
                    *extra,
                    f"{self.echo_port}::{remote}",
                    f"{self.bulk_port}::{world.ports['bulk']}",
                )
            ]
        self.processes = [
            subprocess.Popen(
                words,
                env=world.env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for words in argv
        ]

    async def wait_ready(self) -> None:
        for port in (self.echo_port, self.bulk_port):
            for _ in range(300):
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    await stream.aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)

    def memory(self) -> int:
        return sum(own_memory_kib(process.pid) for process in self.processes[:1])

    def close(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def echo_then_close(port: int, payload: bytes) -> bytes:
    """Connect, send ``payload``, read as many bytes back, close (no half-close: socat's
    original cuts the other direction 0.5 s after an EOF)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(payload)
        received = b""
        while len(received) < len(payload):
            data = await stream.receive_some(len(payload) - len(received))
            if not data:
                break
            received += data
        return received


async def measure(chain: Chain, size: int, sequential: int, burst: int) -> dict[str, Any]:
    await chain.wait_ready()
    await trio.sleep(0.5)
    figures: dict[str, Any] = {"idle_pss_kib": chain.memory()}
    start = time.perf_counter()
    with trio.move_on_after(BULK_TIMEOUT) as bulk_scope:
        await bulk_transfer(chain.bulk_port, size, half_close=False)
    elapsed = time.perf_counter() - start
    # both ways at once; 0 when it did not complete in BULK_TIMEOUT
    figures["throughput_mib_s"] = (
        0 if bulk_scope.cancelled_caught else 2 * size / (1 << 20) / elapsed
    )

    latencies = []
    for _ in range(sequential):
        begin = time.perf_counter()
        assert await echo_then_close(chain.echo_port, b"0123456789") == b"0123456789"
        latencies.append(time.perf_counter() - begin)
    latencies.sort()
    figures["latency_p50_ms"] = 1000 * statistics.median(latencies)
    figures["latency_p99_ms"] = 1000 * latencies[int(0.99 * (len(latencies) - 1))]

    # memory per open connection: hold 50 connections open with an echo done
    held = []
    for _ in range(50):
        stream = await trio.open_tcp_stream("127.0.0.1", chain.echo_port)
        await stream.send_all(b"x")
        with trio.fail_after(30):
            await stream.receive_some(1)
        held.append(stream)
    figures["per_connection_pss_kib"] = (chain.memory() - figures["idle_pss_kib"]) / len(held)
    for stream in held:
        await stream.aclose()
    await trio.sleep(1)

    served = failed = 0

    async def one(index: int) -> None:
        nonlocal served, failed
        payload = f"{index:010d}".encode()
        try:
            with trio.fail_after(300):
                if await echo_then_close(chain.echo_port, payload) == payload:
                    served += 1
                    return
        except (OSError, trio.BrokenResourceError, trio.TooSlowError):
            pass  # refused, reset or timed out: counted as failed
        failed += 1

    begin = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(burst):
            nursery.start_soon(one, index)
    figures["burst_seconds"] = time.perf_counter() - begin
    figures["burst_served"], figures["burst_failed"] = served, failed
    return figures


def ratio(value: float, original: float, higher_is_better: bool) -> str:
    if not original or not value:
        return "-"
    return f"{value / original:.2f}x"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.client", description=__doc__)
    parser.add_argument("--size", type=int, default=256, help="MiB each way (default 256)")
    parser.add_argument("--sequential", type=int, default=500, help="latency samples")
    parser.add_argument("--burst", type=int, default=1000, help="connections opened at once")
    parser.add_argument("--chains", default="handoff,relay,original")
    args = parser.parse_args()
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "size_mib": args.size,
        "chains": {},
    }
    import tempfile

    # SIGTERM ends the run through the same clean-up as Ctrl-C
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory() as directory, make_world(Path(directory)) as world:
        for name in args.chains.split(","):
            chain = Chain(world, name)
            try:
                print(f"measuring {name}...", file=sys.stderr, flush=True)
                results["chains"][name] = trio.run(
                    measure, chain, args.size << 20, args.sequential, args.burst
                )
                print(f"{name}: {json.dumps(results['chains'][name])}", file=sys.stderr, flush=True)
            finally:
                chain.close()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "client.json").write_text(json.dumps(results, indent=2) + "\n")
    original = results["chains"].get("original", {})
    rows = [
        ("throughput MiB/s", "throughput_mib_s", True),
        ("latency p50 ms", "latency_p50_ms", False),
        ("latency p99 ms", "latency_p99_ms", False),
        (f"{args.burst} at once, s", "burst_seconds", False),
        (f"{args.burst} at once, failed", "burst_failed", False),
        ("idle PSS KiB", "idle_pss_kib", False),
        ("PSS KiB per open conn", "per_connection_pss_kib", False),
    ]
    print(f"client chains, {results['machine']['cpus']} CPUs, {args.size} MiB each way")
    header = f"{'':28}" + "".join(f"{name:>22}" for name in results["chains"])
    print(header)
    for label, key, better_high in rows:
        cells = []
        for _name, figures in results["chains"].items():
            value = figures.get(key, 0)
            cells.append(f"{value:10.1f} ({ratio(value, original.get(key, 0), better_high):>6})")
        print(f"{label:28}" + "".join(f"{cell:>22}" for cell in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
