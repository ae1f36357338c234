"""The TCP servers every test and benchmark talks to, in one place.

Each behaviour is a handler ``(conn) -> None`` that a :class:`ThreadedTCPServer`
runs in a thread per connection (blocking sockets, so it works from sync tests,
from trio tests and from a process of its own alike):

- :func:`echo`: sends back every byte; after the client's EOF, shuts its write side.
- :func:`late_reply`: half-close from the client's side: reads until EOF, waits a
  given delay, then answers :func:`summary` of what it got and closes.
- :func:`early_close`: half-close from the server's side: sends :data:`GREETING`,
  shuts its write side at once, reads until the client's EOF and hands what
  arrived to a callback, so a test can check that bytes sent after EOF still came.
- :func:`big`: sends :data:`BIG_SIZE` bytes and closes; :func:`slow`: sends
  :data:`SLOW_FIRST` bytes, then waits for the client's EOF.
- :func:`bulk`: the byte-exact transfer both ways (see its docstring).
- :func:`sink`, :func:`source`, :func:`mux`: the benchmark's upload and download ends.
- :func:`serve_http`: an HTTP server (http.server) whose every GET answers one body.

The sets in use are named in :data:`SETS`; :class:`Servers` runs one in this
process, and ``python -m tests.servers SET`` runs it in a process of its own (the
test's or the load generator's interpreter lock then cannot slow it), prints one
JSON line of ``{name: port}``, and exits when its stdin closes or on SIGTERM.
:class:`HalfCloseServer` and :class:`SoakServers` are the in-process sets that
also record what their ``early_close`` server received.
"""

import argparse
import contextlib
import hashlib
import http.server
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import trio

#: What a connection handler is: it must not close ``conn`` (the server does).
Handler = Callable[[socket.socket], None]

# Teardown waits this long for a server thread to finish before giving up on
# it (threads are daemons; a stuck one cannot hang the test run).
_JOIN_SECONDS = 5.0

#: Bytes per recv/send: large enough that a 1 GiB transfer costs the server
#: about a thousand system calls per direction, small enough to stay in cache,
#: and large enough that no server here is what limits a test or a benchmark.
BUFFER = 1 << 20

#: Listen backlog: a burst of 1,000 connections opened at once must wait here,
#: not be refused, so that only the chain under test decides what is dropped.
BACKLOG = 4096

#: What ``early_close`` sends before it shuts its write side.
GREETING = b"server done sending; you may still send\n"

#: Bytes ``big`` sends (a test that resets the connection cuts it short).
BIG_SIZE = 4 << 20

#: Bytes ``slow`` sends before it waits for the client's EOF.
SLOW_FIRST = 65536

#: The largest "N\n" header a ``source`` accepts before it gives up on a peer.
MAX_HEADER = 64

#: Size of one block of the ``bulk`` pattern.
PATTERN_BLOCK = 1 << 20


class ThreadedTCPServer:
    """A TCP listener on ``host``:ephemeral that runs ``handler(conn)`` in a thread per connection.

    Resource handling: ``close()`` shuts the listener and every open
    connection, then joins the threads still running; the handler must not
    close ``conn`` (the server does, after the handler returns). A handler's
    OSError ends only its own connection.
    """

    def __init__(self, handler: Handler, host: str = "127.0.0.1", backlog: int = BACKLOG) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            self.listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.listener.bind((host, 0))
        self.listener.listen(backlog)
        self.host = host
        self.port: int = self.listener.getsockname()[1]
        self.handler = handler
        self.connections: set[socket.socket] = set()
        # running handler threads only (a benchmark opens many thousands of connections)
        self.threads: set[threading.Thread] = set()
        self.lock = threading.Lock()
        self.accepted = 0
        self.acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self.acceptor.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self.lock:
                self.accepted += 1
                self.connections.add(conn)
                self.threads.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except (OSError, ValueError):  # a peer that reset, or sent a bad header
            pass
        finally:
            with self.lock:
                self.connections.discard(conn)
                self.threads.discard(threading.current_thread())
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        self.acceptor.join(_JOIN_SECONDS)
        with self.lock:
            open_connections = list(self.connections)
            threads = list(self.threads)
        for conn in open_connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(_JOIN_SECONDS)


# -- the behaviours --


def echo(conn: socket.socket) -> None:
    """Send back every byte; after the client's EOF, send EOF (half-close aware)."""
    while data := conn.recv(BUFFER):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def summary(data: bytes) -> bytes:
    """What ``late_reply`` answers for ``data``: ``b"<count> <sha256 hex>\\n"``."""
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode()


def late_reply(delay: float | Callable[[], float]) -> Handler:
    """A handler that reads until EOF, waits ``delay`` seconds, then answers the summary.

    ``delay`` may be a callable, read per connection, so a test can change it.
    """

    def handle(conn: socket.socket) -> None:
        digest, count = hashlib.sha256(), 0
        while data := conn.recv(BUFFER):
            digest.update(data)
            count += len(data)
        # A deliberate delay: answering late, after the client's EOF, is the
        # behaviour under test (a half-closed connection must stay open for it).
        time.sleep(delay() if callable(delay) else delay)
        conn.sendall(f"{count} {digest.hexdigest()}\n".encode())

    return handle


def early_close(received: Callable[[bytes], None]) -> Handler:
    """A handler that sends GREETING, shuts its write side, and passes on what arrives after."""

    def handle(conn: socket.socket) -> None:
        conn.sendall(GREETING)
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while data := conn.recv(BUFFER):
            chunks.append(data)
        received(b"".join(chunks))

    return handle


def big(conn: socket.socket) -> None:
    """Send BIG_SIZE bytes, then close."""
    block = b"\x5a" * SLOW_FIRST
    for _ in range(BIG_SIZE // len(block)):
        conn.sendall(block)


def slow(conn: socket.socket) -> None:
    """Send SLOW_FIRST bytes, then wait for the client's EOF (a reader that never answers)."""
    conn.sendall(b"s" * SLOW_FIRST)
    while conn.recv(BUFFER):
        pass


def pattern_base() -> bytes:
    """The bytes every block of the bulk pattern is made from (the same in every process)."""
    return random.Random(4).randbytes(PATTERN_BLOCK)


def pattern(size: int, base: bytes) -> list[bytes]:
    """``size`` bytes of the bulk pattern, in blocks that each start with their index.

    Distinct blocks, so a reordering is detected, not only a lost or changed byte.
    """
    blocks = []
    index = 0
    while size > 0:
        block = (index.to_bytes(8, "big") + base[8:])[:size]
        blocks.append(block)
        size -= len(block)
        index += 1
    return blocks


def pattern_sha256(size: int) -> str:
    """The sha256 hex digest of ``size`` bytes of the bulk pattern."""
    digest = hashlib.sha256()
    for block in pattern(size, pattern_base()):
        digest.update(block)
    return digest.hexdigest()


def _receive_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ValueError("EOF in the header")
        data += chunk
    return data


def bulk(conn: socket.socket) -> None:
    """The byte-exact transfer both ways at once.

    Reads two 8-byte big-endian lengths DOWN and UP, then at the same time
    sends DOWN bytes of :func:`pattern` and hashes the next UP bytes it
    receives; once both are done it sends the 64-character sha256 hex digest
    of what it received, then closes. No half-close is needed, so the socat
    original (which cuts a connection 0.5 s after one side's EOF) can be
    measured with it too.
    """
    header = _receive_exactly(conn, 16)
    down, up = int.from_bytes(header[:8], "big"), int.from_bytes(header[8:], "big")
    base = pattern_base()

    def send_pattern() -> None:
        with contextlib.suppress(OSError):
            for block in pattern(down, base):
                conn.sendall(block)

    sender = threading.Thread(target=send_pattern, daemon=True)
    sender.start()
    digest = hashlib.sha256()
    while up > 0:
        data = conn.recv(min(BUFFER, up))
        if not data:
            return  # the client gave up; closing the connection ends the sender
        digest.update(data)
        up -= len(data)
    sender.join()
    conn.sendall(digest.hexdigest().encode())


async def bulk_transfer(port: int, size: int, *, half_close: bool = True) -> None:
    """The client of :func:`bulk`: ``size`` bytes of the pattern each way at once, checked.

    Both directions are checked by sha256 (an AssertionError names the one
    that arrived corrupted).

    With ``half_close`` the client also sends EOF after its bytes, while the
    rest of the download and the digest are still to come.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    expected_down = pattern_sha256(size)
    base = pattern_base()
    down = hashlib.sha256()
    tail = bytearray()
    received = 0
    async with stream:

        async def upload() -> None:
            await stream.send_all(size.to_bytes(8, "big") * 2)
            for block in pattern(size, base):
                await stream.send_all(block)
            if half_close:
                await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            async for data in stream:
                take = min(len(data), max(0, size - received))
                down.update(data[:take])
                tail += data[take:]
                received += len(data)
    assert received == size + 64
    assert down.hexdigest() == expected_down, "download corrupted"
    assert tail.decode() == expected_down, "upload corrupted"  # same pattern both ways


def sink(conn: socket.socket, first: bytes = b"") -> None:
    """Count what arrives until EOF, then answer the count as ``N\\n``."""
    buffer = bytearray(BUFFER)
    total = len(first)
    while size := conn.recv_into(buffer):
        total += size
    conn.sendall(f"{total}\n".encode())


_SOURCE_BLOCK = b"\xa5" * BUFFER


def source(conn: socket.socket, first: bytes = b"") -> None:
    """Read a line ``N\\n`` and send N bytes, then close."""
    header = first
    while b"\n" not in header and len(header) < MAX_HEADER:
        data = conn.recv(MAX_HEADER)
        if not data:
            return
        header += data
    size = int(header.split(b"\n")[0])
    view = memoryview(_SOURCE_BLOCK)
    while size > 0:
        size -= conn.send(view[: min(size, BUFFER)])


def mux(conn: socket.socket) -> None:
    """One port for echo, sink and source, chosen by the first byte.

    ``E``: echo (the ``E`` included), ``U``: sink, ``D``: source; so a chain
    needs one binding for all three.
    """
    first = conn.recv(BUFFER)
    if not first:
        return
    kind, rest = first[:1], first[1:]
    if kind == b"E":
        conn.sendall(first)
        echo(conn)
    elif kind == b"U":
        sink(conn, rest)
    elif kind == b"D":
        source(conn, rest)


@dataclass(frozen=True)
class HttpServer:
    """An HTTP server on 127.0.0.1:port whose every GET answers 200 with ``body``."""

    port: int
    body: bytes

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


@contextlib.contextmanager
def serve_http(body: bytes) -> Iterator[HttpServer]:
    """A threaded HTTP/1.0 server (http.server) on 127.0.0.1:ephemeral until the block ends."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield HttpServer(server.server_address[1], body)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(_JOIN_SECONDS)


# -- sets of servers --


class Servers:
    """One ThreadedTCPServer per named handler on ``host``; ``ports``: name -> port."""

    def __init__(self, handlers: Mapping[str, Handler], host: str = "127.0.0.1") -> None:
        self._servers: dict[str, ThreadedTCPServer] = {}
        try:
            for name, handler in handlers.items():
                self._servers[name] = ThreadedTCPServer(handler, host)
        except BaseException:
            self.close()
            raise
        self.ports = {name: server.port for name, server in self._servers.items()}

    def __getitem__(self, name: str) -> int:
        return self.ports[name]

    def close(self) -> None:
        for server in self._servers.values():
            server.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Received:
    """What an early_close server received, per connection, waited for by event."""

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self._changed = threading.Condition()

    def add(self, data: bytes) -> None:
        with self._changed:
            self.items.append(data)
            self._changed.notify_all()

    def wait(self, predicate: Callable[[list[bytes]], bool], timeout: float) -> list[bytes]:
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self.items), timeout):
                raise TimeoutError(f"early_close server saw only {len(self.items)} connections end")
            return list(self.items)


class HalfCloseServer(Servers):
    """Two listeners on 127.0.0.1 that prove each direction's EOF travels alone.

    - ``reply_after_eof_port``: a late_reply server; it waits ``reply_delay``
      seconds (set it; default 0.2) after the client's EOF.
    - ``writes_first_port``: an early_close server; a test reads what each
      connection sent with ``wait_received()``.
    """

    GREETING = GREETING
    summary = staticmethod(summary)

    def __init__(self) -> None:
        self.reply_delay = 0.2
        self._received = _Received()
        super().__init__(
            {
                "reply_after_eof": late_reply(lambda: self.reply_delay),
                "writes_first": early_close(self._received.add),
            }
        )
        self.reply_after_eof_port = self.ports["reply_after_eof"]
        self.writes_first_port = self.ports["writes_first"]

    @property
    def received(self) -> list[bytes]:
        return list(self._received.items)

    def wait_received(self, count: int = 1, timeout: float = 10.0) -> list[bytes]:
        """Block until ``count`` connections to writes_first_port have ended; return their bytes."""
        return self._received.wait(lambda items: len(items) >= count, timeout)


#: Seconds the soak's "late" server waits after the client's EOF before it answers.
SOAK_LATE_DELAY = 0.05


class SoakServers(Servers):
    """echo, late, early, big and slow; ``early_received``: sha256 of what each early call sent."""

    def __init__(self) -> None:
        self._received = _Received()
        super().__init__(
            {
                "echo": echo,
                "late": late_reply(SOAK_LATE_DELAY),
                "early": early_close(self._received.add),
                "big": big,
                "slow": slow,
            }
        )

    @property
    def early_received(self) -> set[str]:
        return {hashlib.sha256(data).hexdigest() for data in self._received.items}

    def wait_early_received(self, digests: set[str], timeout: float = 30.0) -> None:
        """Block until every sha256 in ``digests`` has arrived at the early server."""

        def arrived(items: list[bytes]) -> bool:
            return digests <= {hashlib.sha256(data).hexdigest() for data in items}

        self._received.wait(arrived, timeout)


#: Seconds the client world's "late" server waits after the client's EOF:
#: longer than socat's 0.5 s cut after one side's EOF, so the original fails it.
CLIENT_LATE_DELAY = 2.0


def _print_early(data: bytes) -> None:
    print(json.dumps({"early_received": len(data)}), flush=True)


def handler_set(name: str) -> dict[str, Handler]:
    """The handlers of the set a separate server process runs (see SETS)."""
    return SETS[name]()


#: Sets run as a process of their own: "client" for the client's tests and
#: benchmark (its early server prints ``{"early_received": N}`` per connection
#: on stdout), "bench" for every benchmark chain.
SETS: dict[str, Callable[[], dict[str, Handler]]] = {
    "client": lambda: {
        "echo": echo,
        "bulk": bulk,
        "late": late_reply(CLIENT_LATE_DELAY),
        "early": early_close(_print_early),
    },
    "bench": lambda: {"echo": echo, "sink": sink, "source": source, "mux": mux},
}


@contextlib.contextmanager
def serving(name: str) -> Iterator[Servers]:
    """Run the set ``name`` in this process until the block ends."""
    with Servers(handler_set(name)) as servers:
        yield servers


@contextlib.contextmanager
def servers_process(name: str) -> Iterator[tuple["subprocess.Popen[str]", dict[str, int]]]:
    """Run the set ``name`` as a process of its own until the block ends: (process, ports).

    Its stdout stays open for what the set prints (the client set's early
    server reports there); the process ends when its stdin closes.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.servers", name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"python -m tests.servers {name} exited with {process.wait()}")
        yield process, json.loads(line)
    finally:
        assert process.stdin is not None and process.stdout is not None
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.servers", description=__doc__)
    parser.add_argument("set", choices=sorted(SETS), help="which servers to run")
    args = parser.parse_args(argv)
    with serving(args.set) as servers:
        print(json.dumps(servers.ports), flush=True)
        sys.stdin.read()  # until our parent closes the pipe (or dies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
