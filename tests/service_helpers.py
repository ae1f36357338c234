"""Shared helpers for the service tests: local TCP servers and a socket service in-process."""

import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from qconnect.service.daemon import ConnectTCPService, ServiceConfig, bind_socket, serve

Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def receive_all(stream: trio.abc.ReceiveStream, limit: int = 1 << 30) -> bytes:
    chunks, size = [], 0
    while size < limit and (data := await stream.receive_some(65536)):
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()


@asynccontextmanager
async def tcp_server(handler: Handler, host: str = "127.0.0.1") -> AsyncIterator[int]:
    """Serve ``handler`` on an ephemeral port of ``host``; yield the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    await sock.bind((host, 0))
    sock.listen(512)
    listener = trio.SocketListener(sock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handler, [listener])
        yield sock.getsockname()[1]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def socket_service(
    path: Path, config: ServiceConfig | None = None
) -> AsyncIterator[ConnectTCPService]:
    """Run the socket service on ``path`` inside the test's event loop."""
    sock = bind_socket(str(path))
    async with trio.open_nursery() as nursery:
        service = await nursery.start(serve, sock, config or ServiceConfig(allow_files=()))
        yield service
        nursery.cancel_scope.cancel()


async def call(
    path: Path, argument: str, source: str = "work", data: bytes = b""
) -> trio.SocketStream:
    """Open a call as qrexec-agent does: connect, send the descriptor, then ``data``."""
    stream = await trio.open_unix_socket(str(path))
    await stream.send_all(f"qubes.ConnectTCP+{argument} {source}\0".encode() + data)
    return stream


def unused_port() -> int:
    """A port nothing listens on (bound then released, on both loopback addresses)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_service_process(path: Path, log: Path, *options: str) -> "subprocess.Popen[bytes]":
    """Run ``qconnect service run --socket PATH`` as its own process, stderr to ``log``.

    No allowlist applies (a file that does not exist is given). Returns once
    the socket listens; the caller stops it (SIGTERM) and waits for it.
    """
    argv = [sys.executable, "-m", "qconnect.cli", "service", "run", "--socket", str(path)]
    argv += ["--allow-file", str(log.parent / "no-such.allow"), *options]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(argv, stderr=log_file)
    deadline = time.monotonic() + 20
    # The socket file exists from bind(), before listen(): wait for the log line after it.
    while " socket service listening on " not in log.read_text():
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            process.wait()
            raise AssertionError(f"socket service did not start: {log.read_text()}")
        time.sleep(0.05)
    return process
