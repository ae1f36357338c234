"""What every benchmark shares: process memory, the process tree, percentiles, the machine.

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


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def children_map() -> dict[int, list[int]]:
    """Parent pid -> its children's pids, for every process now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = parent_of(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    return children


def descendants(pids: Iterable[int]) -> list[int]:
    """Every descendant of ``pids`` (children, grandchildren, ...), not the pids themselves."""
    children = children_map()
    found: list[int] = []
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


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


def fd_kinds(pid: int) -> dict[str, int]:
    """``pid``'s open descriptors by kind ("socket", "pipe", "pipe_pair", "anon_inode", "file").

    A pipe whose both ends ``pid`` holds itself counts as "pipe_pair" (two
    descriptors): that is a splice pipe of qconnect.core.relay's pool, kept on
    purpose. A pipe with one end here ("pipe") leads to another process, and
    one left open after that process is gone is a leak.
    """
    kinds: dict[str, int] = {}
    pipes: dict[str, int] = {}
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        with contextlib.suppress(OSError):
            target = os.readlink(f"{directory}/{name}")
            kind = target.split(":", 1)[0] if ":" in target and "[" in target else "file"
            if kind == "pipe":
                pipes[target] = pipes.get(target, 0) + 1
            else:
                kinds[kind] = kinds.get(kind, 0) + 1
    for ends in pipes.values():
        kind = "pipe_pair" if ends >= 2 else "pipe"
        kinds[kind] = kinds.get(kind, 0) + ends
    return kinds


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


def stop_process(process: "subprocess.Popen[Any]", timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; reaped either way."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def log(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(message, file=sys.stderr, flush=True)
