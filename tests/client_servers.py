"""TCP servers for the client's tests and bench, run as their own process.

``python -m tests.client_servers`` listens on 127.0.0.1 (ephemeral ports)
and prints one JSON line with the ports of:

- ``echo``: echoes every byte; on the client's EOF, shuts its write side down.
- ``bulk``: reads two 8-byte big-endian lengths DOWN and UP, then at the same
  time sends DOWN bytes of :func:`pattern` and hashes the next UP bytes it
  receives; once both are done it sends the 64-character sha256 hex digest of
  what it received, then closes. No half-close is needed, so the socat
  original (which cuts a connection 0.5 s after one side's EOF) can be
  measured with it too.
- ``late``: half-close from the client's side: reads until EOF, waits
  ``LATE_REPLY_DELAY`` seconds, then replies with the byte count, and closes.
- ``early``: half-close from the server's side: sends ``EARLY_GREETING`` and
  shuts its write side at once, then reads until the client's EOF and prints
  ``{"early_received": N}`` on its stdout, so a test can check that what the
  client sent after seeing EOF still arrived.

A separate process, so the test's own event loop is not the bottleneck of a
1 GiB transfer.
"""

import hashlib
import json
import sys
from functools import partial

import trio

CHUNK = 65536
LATE_REPLY_DELAY = 2.0
EARLY_GREETING = b"hello, then EOF\n"
PATTERN_BLOCK = 1 << 20


def pattern_block(index: int, base: bytes) -> bytes:
    """Block ``index`` of the bulk pattern: distinct blocks, so reordering is detected."""
    return index.to_bytes(8, "big") + base[8:]


def pattern_base() -> bytes:
    import random

    return random.Random(4).randbytes(PATTERN_BLOCK)


def pattern(size: int, base: bytes) -> "list[bytes]":
    blocks = []
    index = 0
    while size > 0:
        block = pattern_block(index, base)[:size]
        blocks.append(block)
        size -= len(block)
        index += 1
    return blocks


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for block in pattern(size, pattern_base()):
        digest.update(block)
    return digest.hexdigest()


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            async for data in stream:
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise trio.BrokenResourceError("EOF in header")
        data += chunk
    return data


async def bulk(stream: trio.SocketStream, base: bytes) -> None:
    async with stream:
        try:
            header = await _receive_exactly(stream, 16)
            down, up = int.from_bytes(header[:8], "big"), int.from_bytes(header[8:], "big")
            digest = hashlib.sha256()

            async def send_pattern() -> None:
                for block in pattern(down, base):
                    await stream.send_all(block)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_pattern)
                while up > 0:
                    data = await stream.receive_some(min(CHUNK, up))
                    if not data:
                        return
                    digest.update(data)
                    up -= len(data)
            await stream.send_all(digest.hexdigest().encode())
        except trio.BrokenResourceError:
            pass


async def late(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            count = 0
            async for data in stream:
                count += len(data)
            await trio.sleep(LATE_REPLY_DELAY)
            await stream.send_all(f"{count}\n".encode())
        except trio.BrokenResourceError:
            pass


async def early(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            await stream.send_all(EARLY_GREETING)
            await stream.send_eof()
            count = 0
            async for data in stream:
                count += len(data)
            print(json.dumps({"early_received": count}), flush=True)
        except trio.BrokenResourceError:
            pass


async def main() -> None:
    base = pattern_base()
    handlers = {
        "echo": echo,
        "bulk": lambda stream: bulk(stream, base),
        "late": late,
        "early": early,
    }
    async with trio.open_nursery() as nursery:
        ports = {}
        for name, handler in handlers.items():
            listeners = await nursery.start(
                partial(trio.serve_tcp, handler, 0, host="127.0.0.1", backlog=4096)
            )
            ports[name] = listeners[0].socket.getsockname()[1]
        print(json.dumps(ports), flush=True)


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        sys.exit(0)
