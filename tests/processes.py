"""The process tree and open descriptors of the processes a test (or a benchmark) started.

Standard library only, synchronous: read /proc. The soak checks with these
that a chain returns to its baseline; the benchmarks measure with them.
"""

import contextlib
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any


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


def stop_process(process: "subprocess.Popen[Any]", timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; reaped either way."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
