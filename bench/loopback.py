"""Loopback benchmark: what the loopback qrexec's own copying costs, against direct TCP.

``python -m bench.loopback [--size-mib 256] [--calls 200] [--rounds 3]`` builds
a loopback machine with a caller qube "work" and a target qube "web", and
moves the same bytes to the same TCP servers (a separate process) along
four paths:

- ``direct``:  the benchmark connects to the server itself (no qrexec at all);
- ``builtin``: ``qrexec-client-vm --use-stdin-socket web qubes.ConnectTCP+PORT``
  to the stock ``/dev/tcp/127.0.0.1`` service: one loopback process copies
  between the caller's socket and the server's;
- ``socket``:  the same call to a socket service that is a minimal
  standard-library relay (``qconnect.core.relay.blocking``, one process for all
  calls): the loopback copies caller <-> unix socket, the service copies
  unix socket <-> TCP;
- ``exec``:    the same call to an executable service that relays with
  ``blocking.relay_fds`` over qrexec's stdin/stdout socketpairs (one process
  per call, as the executable qubes.ConnectTCP does).

Figures, medians over rounds (rounds interleave the paths):
- upload / download: SIZE MiB one way, MB/s (the server counts or sends);
- latency: connect + 10-byte echo, CALLS sequential calls, p50 and p99 ms
  (for loopback paths this includes starting qrexec-client-vm);
- start-up: a refused call (policy evaluated, nothing started), p50 ms.
Ratios are against ``direct`` (throughput) and ``builtin`` (latency).
Raw figures go to bench/results/loopback.json.
"""

import argparse
import contextlib
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import percentile
from bench.servers import BUFFER
from qconnect.loopback.machine import Machine
from tests.servers import servers_process

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = ("direct", "builtin", "socket", "exec")
ECHO = b"0123456789"
TIMEOUT = 120

# A socket service relaying to 127.0.0.1:PORT, PORT taken from the descriptor.
SOCKET_RELAY = r"""
import socket, sys, threading
sys.path.insert(0, sys.argv[2])
from qconnect.core.relay import blocking as byterelay
listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1])
listener.listen(1024)
def handle(conn):
    with conn:
        descriptor = b""
        while not descriptor.endswith(b"\0"):
            chunk = conn.recv(1)
            if not chunk:
                return
            descriptor += chunk
        port = int(descriptor.split(b" ")[0].split(b"+")[1])
        with socket.create_connection(("127.0.0.1", port)) as peer:
            byterelay.relay_fds(conn.fileno(), conn.fileno(), peer.fileno())
print("ready", flush=True)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
"""

EXEC_RELAY = """#!{python} -IS
import socket, sys
sys.path.insert(0, {project!r})
from qconnect.core.relay import blocking as byterelay
with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as peer:
    byterelay.relay_fds(0, 1, peer.fileno())
"""


class Bench:
    """The machine, the servers and one way to open a connection per path."""

    def __init__(self, directory: Path, stack: contextlib.ExitStack) -> None:
        project = str(Path(__file__).resolve().parent.parent)
        self.machine = Machine.create(
            directory, ["work", "web"], policy=["my.Refused * work web deny", "* * work web allow"]
        )
        _, ports = stack.enter_context(servers_process("bench"))
        self.echo_port, self.sink_port, self.source_port = (
            ports["echo"],
            ports["sink"],
            ports["source"],
        )
        relay = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SOCKET_RELAY,
                str(self.machine.rpc_dir("web") / "my.SocketRelay"),
                project,
            ],
            stdout=subprocess.PIPE,
        )
        stack.callback(_stop, relay)
        assert relay.stdout is not None and relay.stdout.readline() == b"ready\n"
        exec_relay = self.machine.rpc_dir("web") / "my.ExecRelay"
        exec_relay.write_text(EXEC_RELAY.format(python=sys.executable, project=project))
        exec_relay.chmod(0o755)
        self.services = {
            "builtin": "qubes.ConnectTCP",
            "socket": "my.SocketRelay",
            "exec": "my.ExecRelay",
        }

    @contextlib.contextmanager
    def connect(self, path: str, port: int) -> Iterator[socket.socket]:
        """A connection to 127.0.0.1:port along ``path``; closed (and the call reaped) after."""
        if path == "direct":
            with socket.create_connection(("127.0.0.1", port)) as sock:
                yield sock
            return
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            user = socket.create_connection(listener.getsockname())
            accepted, _ = listener.accept()
        argv = self.machine.call_argv("web", f"{self.services[path]}+{port}", "--use-stdin-socket")
        with accepted:
            process = self.machine.popen("work", argv, stdin=accepted.fileno())
        try:
            with user:
                yield user
        finally:
            if process.wait(TIMEOUT) != 0:
                raise RuntimeError(f"{path}: qrexec-client-vm exited {process.returncode}")

    def upload(self, path: str, size: int) -> float:
        block = b"\x5a" * BUFFER
        with self.connect(path, self.sink_port) as sock:
            start = time.perf_counter()
            remaining = size
            while remaining > 0:
                sock.sendall(block[: min(remaining, BUFFER)])
                remaining -= BUFFER
            sock.shutdown(socket.SHUT_WR)
            answer = _recv_all(sock)
            elapsed = time.perf_counter() - start
        if int(answer) != size:
            raise RuntimeError(f"{path}: server counted {answer!r}, sent {size}")
        return size / elapsed / 1e6

    def download(self, path: str, size: int) -> float:
        buffer = bytearray(BUFFER)
        with self.connect(path, self.source_port) as sock:
            start = time.perf_counter()
            sock.sendall(b"%d\n" % size)
            sock.shutdown(socket.SHUT_WR)
            total = 0
            while count := sock.recv_into(buffer):
                total += count
            elapsed = time.perf_counter() - start
        if total != size:
            raise RuntimeError(f"{path}: received {total} of {size} bytes")
        return size / elapsed / 1e6

    def latency(self, path: str, calls: int) -> list[float]:
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            with self.connect(path, self.echo_port) as sock:
                sock.sendall(ECHO)
                received = b""
                while len(received) < len(ECHO):
                    chunk = sock.recv(64)
                    if not chunk:
                        break
                    received += chunk
                times.append(time.perf_counter() - start)
            if received != ECHO:
                raise RuntimeError(f"{path}: echo returned {received!r}")
        return times

    def refused_call(self, calls: int) -> list[float]:
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            result = self.machine.run(
                "work",
                self.machine.call_argv("web", "my.Refused"),
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )
            times.append(time.perf_counter() - start)
            if result.returncode != 126:
                raise RuntimeError(f"refused call exited {result.returncode}")
        return times


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def _stop(process: "subprocess.Popen[bytes]") -> None:
    with contextlib.suppress(OSError):
        if process.stdin:
            process.stdin.close()
    process.terminate()
    process.wait(10)
    if process.stdout:
        process.stdout.close()


def run(size_mib: int, calls: int, rounds: int) -> dict[str, Any]:
    size = size_mib << 20
    figures: dict[str, dict[str, list[float]]] = {
        path: {"upload": [], "download": [], "latency": []} for path in PATHS
    }
    with (
        tempfile.TemporaryDirectory(prefix="qconnect-bench-loopback-") as temp,
        contextlib.ExitStack() as stack,
    ):
        bench = Bench(Path(temp) / "machine", stack)
        for _ in range(rounds):
            for path in PATHS:
                figures[path]["upload"].append(bench.upload(path, size))
                figures[path]["download"].append(bench.download(path, size))
                figures[path]["latency"].extend(bench.latency(path, calls // rounds))
        refused = bench.refused_call(max(10, calls // 10))
    return {
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "size_mib": size_mib,
        "calls": calls,
        "rounds": rounds,
        "paths": {
            path: {
                "upload_mb_s": statistics.median(values["upload"]),
                "download_mb_s": statistics.median(values["download"]),
                "latency_p50_ms": percentile(values["latency"], 0.5) * 1e3,
                "latency_p99_ms": percentile(values["latency"], 0.99) * 1e3,
            }
            for path, values in figures.items()
        },
        "refused_call_p50_ms": statistics.median(refused) * 1e3,
    }


def report(results: dict[str, Any]) -> str:
    paths = results["paths"]
    direct = paths["direct"]
    builtin = paths["builtin"]
    lines = [
        f"loopback qrexec: {results['size_mib']} MiB each way, {results['calls']} echo calls, "
        f"{results['rounds']} rounds (medians)",
        f"{'path':<8} {'upload MB/s':>12} {'download MB/s':>14} {'vs direct':>10} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'p50 vs builtin':>15}",
    ]
    for path, figure in paths.items():
        ratio = (figure["upload_mb_s"] + figure["download_mb_s"]) / (
            direct["upload_mb_s"] + direct["download_mb_s"]
        )
        latency_ratio = figure["latency_p50_ms"] / builtin["latency_p50_ms"]
        lines.append(
            f"{path:<8} {figure['upload_mb_s']:>12.0f} {figure['download_mb_s']:>14.0f} "
            f"{ratio:>10.2f} {figure['latency_p50_ms']:>8.1f} {figure['latency_p99_ms']:>8.1f} "
            f"{latency_ratio:>15.2f}"
        )
    lines.append(f"refused call (start-up + policy): p50 {results['refused_call_p50_ms']:.1f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="bytes each way (default 256)")
    parser.add_argument("--calls", type=int, default=200, help="echo calls per path")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args(argv)
    results = run(args.size_mib, args.calls, args.rounds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loopback.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
