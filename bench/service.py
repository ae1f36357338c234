"""Service-side benchmark: the four ways a target qube can serve qubes.ConnectTCP, in one run.

``python -m bench.service [--size-mib 1024] [--calls 500] [--rounds 3]`` builds
one loopback machine with a caller qube "work" and one target qube per form:

- ``socket``:  qconnect's socket service (one trio process; installed with
  ``qconnect service install --socket`` into the qube's root);
- ``exec``:    qconnect's executable service (one process per call);
- ``socat``:   the socat original, ``socat STDIO TCP:localhost:PORT`` as the
  executable service;
- ``builtin``: today's Qubes, ``qubes.ConnectTCP -> /dev/tcp/127.0.0.1``
  with its stock rpc-config (the connection is made by qrexec itself).

Every call is a real loopback ``qrexec-client-vm --use-stdin-socket`` process
in "work", so the caller's side costs the same for every form and only the
service side differs. Rounds interleave the forms (socket, exec, socat,
builtin, socket, ...) so a machine whose speed drifts affects all alike;
medians are reported, and ratios against socat and the built-in.

Figures:
- throughput: SIZE MiB uploaded (caller -> server, counted by the server)
  and SIZE MiB downloaded (server -> caller), MB/s;
- latency: connect + 10-byte echo over CALLS sequential calls, p50 and p99
  (from starting qrexec-client-vm to the echo's last byte), and the same for
  the service side alone, as qrexec-agent opens the service (the loopback
  qrexec-client-vm is Python, ~100 ms a start, where Qubes' is C);
- memory: service-side memory (PSS) per open call with 50 calls open (the
  daemon's growth for ``socket``; the per-call processes for ``exec`` and
  ``socat``; nothing outside qrexec for ``builtin``).

Raw figures go to bench/results/service.json.
"""

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import descendants, percentile, pss_kib
from bench.servers import BUFFER, bench_servers
from qconnect.loopback.machine import Machine
from tests.client_world import FORMS, build_machine
from tests.servers import Servers

RESULTS = Path(__file__).resolve().parent / "results"
ECHO_BYTES = b"0123456789"  # the 10-byte echo of the latency figure
OPEN_CALLS = 50  # calls held open at once for the memory figure


def start_call(
    machine: Machine, form: str, port: int
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = socket.socketpair()
    process = machine.popen(
        "work",
        ["qrexec-client-vm", "--use-stdin-socket", f"svc-{form}", f"qubes.ConnectTCP+{port}"],
        stdin=theirs,
    )
    theirs.close()
    return process, ours


def finish(process: subprocess.Popen[bytes], sock: socket.socket) -> None:
    sock.close()
    if process.wait(60) != 0:
        raise SystemExit(f"qrexec-client-vm exited {process.returncode}")


def upload(machine: Machine, form: str, servers: Servers, size: int) -> float:
    block = b"\x5a" * BUFFER
    started = time.perf_counter()
    process, sock = start_call(machine, form, servers["sink"])
    left = size
    while left > 0:
        sock.sendall(block[: min(left, BUFFER)])
        left -= BUFFER
    sock.shutdown(socket.SHUT_WR)
    reply = b""
    while data := sock.recv(64):
        reply += data
    elapsed = time.perf_counter() - started
    finish(process, sock)
    if int(reply) != size:
        raise SystemExit(f"{form}: server counted {reply!r}, expected {size}")
    return size / elapsed / 1e6


def download(machine: Machine, form: str, servers: Servers, size: int) -> float:
    buffer = bytearray(BUFFER)
    started = time.perf_counter()
    process, sock = start_call(machine, form, servers["source"])
    sock.sendall(f"{size}\n".encode())
    sock.shutdown(socket.SHUT_WR)
    total = 0
    while got := sock.recv_into(buffer):
        total += got
    elapsed = time.perf_counter() - started
    finish(process, sock)
    if total != size:
        raise SystemExit(f"{form}: received {total} bytes, expected {size}")
    return size / elapsed / 1e6


def echo_latency(machine: Machine, form: str, servers: Servers) -> float:
    started = time.perf_counter()
    process, sock = start_call(machine, form, servers["echo"])
    sock.sendall(ECHO_BYTES)
    got = b""
    while len(got) < len(ECHO_BYTES):
        data = sock.recv(64)
        if not data:
            break
        got += data
    elapsed = time.perf_counter() - started
    sock.shutdown(socket.SHUT_WR)
    finish(process, sock)
    if got != ECHO_BYTES:
        raise SystemExit(f"{form}: echo returned {got!r}")
    return elapsed * 1000


def agent_latency(machine: Machine, form: str, servers: Servers) -> float:
    """The target side alone: what qrexec-agent does for one call, then a 10-byte echo (ms).

    The loopback qrexec-client-vm is a Python process (~100 ms to start)
    where Qubes' is C; this figure leaves it out to show what the service
    form itself costs per call: connecting to the socket service and sending
    the descriptor, starting the executable (or socat) with a socketpair as
    stdin/stdout, or the built-in service's own TCP connect.
    """
    port = servers["echo"]
    started = time.perf_counter()
    process = None
    if form == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(machine.root_dir("svc-socket") / "run/qubes-rpc/qubes.ConnectTCP"))
        sock.sendall(f"qubes.ConnectTCP+{port} work\0".encode() + ECHO_BYTES)
    elif form == "builtin":
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(ECHO_BYTES)
    else:
        if form == "exec":
            path = machine.root_dir("svc-exec") / "usr/local/etc/qubes-rpc/qubes.ConnectTCP"
        else:
            path = machine.rpc_dir("svc-socat") / "qubes.ConnectTCP"
        sock, theirs = socket.socketpair()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "QREXEC_REMOTE_DOMAIN": "work",
            "QREXEC_SERVICE_ARGUMENT": str(port),
            "QREXEC_SERVICE_FULL_NAME": f"qubes.ConnectTCP+{port}",
        }
        process = subprocess.Popen([str(path), str(port)], stdin=theirs, stdout=theirs, env=env)
        theirs.close()
        sock.sendall(ECHO_BYTES)
    got = b""
    while len(got) < len(ECHO_BYTES) and (data := sock.recv(64)):
        got += data
    elapsed = time.perf_counter() - started
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(64):
        pass
    sock.close()
    if process is not None:
        process.wait(30)
    if got != ECHO_BYTES:
        raise SystemExit(f"{form}: echo returned {got!r}")
    return elapsed * 1000


def memory_per_call(
    machine: Machine, form: str, servers: Servers, daemon: subprocess.Popen[bytes]
) -> float:
    """Service-side PSS per open call, with OPEN_CALLS calls open at once."""
    idle = pss_kib(daemon.pid) if form == "socket" else 0
    calls = [start_call(machine, form, servers["echo"]) for _ in range(OPEN_CALLS)]
    for _process, sock in calls:  # every call is up end to end
        sock.sendall(b"x")
        if sock.recv(1) != b"x":
            raise SystemExit(f"{form}: a call did not come up")
    time.sleep(0.2)
    if form == "socket":
        busy = pss_kib(daemon.pid)
    else:
        clients = {process.pid for process, _sock in calls}
        busy = sum(pss_kib(pid) for pid in descendants(clients))
    for process, sock in calls:
        sock.shutdown(socket.SHUT_WR)
        finish(process, sock)
    return (busy - idle) / OPEN_CALLS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.service", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="MiB per transfer (1024)")
    parser.add_argument("--calls", type=int, default=500, help="sequential echo calls (500)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per form (3)")
    args = parser.parse_args(argv)
    size = args.size_mib * 1024 * 1024

    results: dict[str, dict[str, Any]] = {
        form: {"up": [], "down": [], "latency_ms": [], "agent_latency_ms": []} for form in FORMS
    }
    servers = bench_servers()
    with tempfile.TemporaryDirectory(prefix="qconnect-bench-") as tmp:
        machine, daemon = build_machine(Path(tmp) / "machine", Path(tmp) / "service.log")
        try:
            for form in FORMS:  # warm-up: page cache, pyc files, first process starts
                echo_latency(machine, form, servers)
                upload(machine, form, servers, 16 * BUFFER)
            for round_number in range(args.rounds):
                for form in FORMS:
                    results[form]["up"].append(upload(machine, form, servers, size))
                    results[form]["down"].append(download(machine, form, servers, size))
                print(f"throughput round {round_number + 1}/{args.rounds} done", file=sys.stderr)
            for _ in range(args.calls):
                for form in FORMS:
                    results[form]["latency_ms"].append(echo_latency(machine, form, servers))
                    results[form]["agent_latency_ms"].append(agent_latency(machine, form, servers))
            print("latency done", file=sys.stderr)
            for form in FORMS:
                results[form]["memory_kib_per_call"] = memory_per_call(
                    machine, form, servers, daemon
                )
            results["socket"]["daemon_pss_kib"] = pss_kib(daemon.pid)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            servers.close()

    summary: dict[str, dict[str, Any]] = {}
    for form in FORMS:
        figures = results[form]
        summary[form] = {
            "up_mb_s": statistics.median(figures["up"]),
            "down_mb_s": statistics.median(figures["down"]),
            "p50_ms": percentile(figures["latency_ms"], 0.50),
            "p99_ms": percentile(figures["latency_ms"], 0.99),
            "agent_p50_ms": percentile(figures["agent_latency_ms"], 0.50),
            "agent_p99_ms": percentile(figures["agent_latency_ms"], 0.99),
            "memory_kib_per_call": figures["memory_kib_per_call"],
        }
    print(
        f"\nqubes.ConnectTCP service side: {args.size_mib} MiB transfers "
        f"(median of {args.rounds}), {args.calls} sequential 10-byte echo calls, "
        f"memory with {OPEN_CALLS} calls open\n"
    )
    print(f"{'':<8} {'':>9} {'':>10} {'call (client + service)':>23} {'service side only':>21}")
    print(
        f"{'form':<8} {'up MB/s':>9} {'down MB/s':>10} {'p50 ms':>11} {'p99 ms':>11} "
        f"{'p50 ms':>10} {'p99 ms':>10} {'KiB/call':>9}"
    )
    for form in FORMS:
        row = summary[form]
        print(
            f"{form:<8} {row['up_mb_s']:>9.0f} {row['down_mb_s']:>10.0f} {row['p50_ms']:>11.2f} "
            f"{row['p99_ms']:>11.2f} {row['agent_p50_ms']:>10.2f} {row['agent_p99_ms']:>10.2f} "
            f"{row['memory_kib_per_call']:>9.0f}"
        )
    print("\nratios (socket service / other: throughput above 1 and latency below 1 favour it)")
    keys = ("up_mb_s", "down_mb_s", "p50_ms", "p99_ms", "agent_p50_ms", "agent_p99_ms")
    for other in ("socat", "builtin", "exec"):
        ours, theirs = summary["socket"], summary[other]
        ratios = {key: ours[key] / theirs[key] for key in keys}
        summary["socket"][f"ratio_vs_{other}"] = ratios
        print(
            f"  vs {other:<8} up {ratios['up_mb_s']:.2f}  down {ratios['down_mb_s']:.2f}  "
            f"call p50 {ratios['p50_ms']:.2f}  p99 {ratios['p99_ms']:.2f}  "
            f"service-side p50 {ratios['agent_p50_ms']:.2f}  p99 {ratios['agent_p99_ms']:.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    record = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
        "arguments": vars(args),
        "summary": summary,
        "raw": results,
    }
    (RESULTS / "service.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
