"""Load generators: what a TCP client does to a chain, timed from the client's side.

Every function talks to a chain's port on 127.0.0.1 and to the ``mux``
server of :mod:`bench.servers` behind it (first byte ``E`` echo, ``U``
upload, ``D`` download), and checks what came back, so a chain that drops
or cuts bytes fails loudly instead of looking fast.
"""

import socket
import time
from typing import Any

import trio

from bench.servers import BUFFER

#: The 10-byte echo of the latency figure (its first byte selects the echo).
ECHO = b"E123456789"

# How long one connection of the latency or memory figure may take before the
# chain is declared broken (the machine may be loaded; a working chain needs
# milliseconds).
CONNECTION_TIMEOUT = 60.0


class ChainBroken(Exception):
    """A chain did not deliver what the server sent (or cut the connection)."""


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=CONNECTION_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def upload_mb_s(port: int, size: int) -> float:
    """Send ``size`` bytes; the server answers the count after our EOF. MB/s, end to end."""
    block = memoryview(b"\x5a" * BUFFER)
    started = time.perf_counter()
    with _connect(port) as sock:
        sock.sendall(b"U")
        left = size
        while left > 0:
            chunk = block[: min(left, BUFFER)]
            sock.sendall(chunk)
            left -= len(chunk)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while data := sock.recv(64):
            reply += data
    elapsed = time.perf_counter() - started
    if reply.strip() != str(size).encode():
        raise ChainBroken(f"upload: the server counted {reply!r}, expected {size}")
    return size / elapsed / 1e6


def download_mb_s(port: int, size: int) -> float:
    """Ask for ``size`` bytes and read them all. MB/s, end to end.

    Our write side stays open until the end: the socat original ends a
    connection 0.5 s after the first EOF in either direction.
    """
    buffer = bytearray(BUFFER)
    started = time.perf_counter()
    total = 0
    with _connect(port) as sock:
        sock.sendall(f"D{size}\n".encode())
        while total < size:
            got = sock.recv_into(buffer)
            if not got:
                break
            total += got
    elapsed = time.perf_counter() - started
    if total != size:
        raise ChainBroken(f"download: received {total} bytes, expected {size}")
    return size / elapsed / 1e6


def echo_ms(port: int) -> float:
    """Connect, send 10 bytes, receive them back: milliseconds from connect() to the last byte."""
    started = time.perf_counter()
    with _connect(port) as sock:
        sock.sendall(ECHO)
        got = b""
        while len(got) < len(ECHO):
            data = sock.recv(64)
            if not data:
                break
            got += data
        elapsed = time.perf_counter() - started
    if got != ECHO:
        raise ChainBroken(f"echo returned {got!r}")
    return elapsed * 1000


def open_echoed(port: int, count: int) -> list[socket.socket]:
    """``count`` connections, each with one echo done (so the whole chain is up), left open."""
    held = []
    try:
        for _ in range(count):
            sock = _connect(port)
            held.append(sock)
            sock.sendall(b"E")
            if sock.recv(1) != b"E":
                raise ChainBroken("a held connection did not echo")
    except BaseException:
        close_all(held)
        raise
    return held


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


async def _burst(port: int, count: int, timeout: float) -> dict[str, Any]:
    served = failed = 0
    finished = 0
    last_end = 0.0

    async def one(index: int) -> None:
        nonlocal served, failed, finished, last_end
        payload = b"E" + f"{index:09d}".encode()
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(payload)
                got = b""
                while len(got) < len(payload):
                    data = await stream.receive_some(64)
                    if not data:
                        break
                    got += data
            if got == payload:
                served += 1
            else:
                failed += 1
        except (OSError, trio.BrokenResourceError):
            failed += 1  # refused, reset or cut: the chain dropped it
        finished += 1
        last_end = time.perf_counter()

    started = time.perf_counter()
    with trio.move_on_after(timeout) as scope:
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(one, index)
    unfinished = count - finished
    elapsed = (last_end if not scope.cancelled_caught else time.perf_counter()) - started
    return {
        "seconds": elapsed,
        "served": served,
        "failed": failed,
        "unfinished": unfinished,
        "timed_out": scope.cancelled_caught,
    }


def burst(port: int, count: int, timeout: float) -> dict[str, Any]:
    """Open ``count`` connections at once, each echoes 10 bytes and closes.

    Returns the seconds until the last one ended, how many echoed
    correctly, failed (refused, reset, cut) or had not ended within
    ``timeout`` seconds (then "seconds" is the timeout: a lower bound).
    """
    return trio.run(_burst, port, count, timeout)
