"""What every benchmark shares: process memory, the process tree, percentiles, the machine.

The process tree and descriptor helpers are the test suite's (tests.processes).

Standard library only, synchronous: read /proc, compute, describe.
"""

import contextlib
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.processes import children_map, cmdline, descendants, fd_kinds, parent_of, stop_process

__all__ = [
    "children_map",
    "cmdline",
    "descendants",
    "fd_kinds",
    "parent_of",
    "stop_process",
]


def pss_kib(pid: int) -> int:
    """Proportional set size of ``pid`` in KiB (shared pages split between their users).

    Summed over processes it counts a shared library once, which is what
    "memory of every process we own" means; 0 for a process that has gone.
    """
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def tree_pss_kib(roots: Iterable[int], *, excluding: Iterable[bytes] = ()) -> int:
    """PSS of ``roots`` and all their descendants, without processes whose command line
    contains one of ``excluding`` (e.g. qrexec-client-vm: qrexec's, the same for every chain)."""
    roots = list(roots)
    skip = tuple(excluding)
    total = 0
    for pid in [*roots, *descendants(roots)]:
        command = cmdline(pid)
        if any(marker in command for marker in skip):
            continue
        total += pss_kib(pid)
    return total


def open_fds(pid: int) -> int:
    """How many file descriptors ``pid`` has open now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile (0.5: median, 0.99: p99) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: they mean little without it."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    socat = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        socat = subprocess.run(
            ["socat", "-V"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()[1]
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model or platform.processor() or "unknown",
        "memory_mib": memory_kib // 1024,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "socat": socat.strip(),
    }


def wait_for_port(
    port: int, timeout: float = 30.0, process: "subprocess.Popen[Any] | None" = None
) -> None:
    """Block until something accepts on 127.0.0.1:``port`` (or fail, naming the process)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{process.args} exited with {process.returncode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port} after {timeout} s") from None
            time.sleep(0.05)


def log(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(message, file=sys.stderr, flush=True)
