"""The TCP servers every benchmark chain ends at: echo, sink (upload) and source (download).

Plain blocking sockets and one thread per connection: the server's own cost
per byte is one ``recv_into``/``send`` of a 1 MiB buffer, so it is never what
limits a chain. ``python -m bench.servers`` runs them in a process of their own
(the load generator's interpreter lock then cannot slow them) and prints one
JSON line with the ports; it exits when its stdin closes.

- ``echo``: sends back every byte; after the client's EOF, shuts its write side.
- ``sink``: counts what it receives until EOF, then answers the count as ``N\\n``.
- ``source``: reads a line ``N\\n`` and sends N bytes, then closes.
- ``mux``: one port for all three, chosen by the first byte (``E``: echo, the
  ``E`` included; ``U``: sink; ``D``: source), so a chain needs one binding.
"""

import contextlib
import json
import socket
import sys
import threading
from collections.abc import Callable

# Bytes per recv/send: large enough that a 1 GiB transfer costs the server
# about a thousand system calls per direction, small enough to stay in cache.
BUFFER = 1 << 20

# Listen backlog: a burst of 1,000 connections opened at once must wait here,
# not be refused, so that only the chain under test decides what is dropped.
BACKLOG = 4096

# The largest "N\n" header a source accepts before it gives up on a peer.
MAX_HEADER = 64


class Servers:
    """The servers on 127.0.0.1 ephemeral ports; ``close()`` stops accepting."""

    def __init__(self) -> None:
        self._listeners: list[socket.socket] = []
        self._block = b"\xa5" * BUFFER
        self.echo = self._serve(self._echo)
        self.sink = self._serve(self._sink)
        self.source = self._serve(self._source)
        self.mux = self._serve(self._mux)

    def ports(self) -> dict[str, int]:
        return {"echo": self.echo, "sink": self.sink, "source": self.source, "mux": self.mux}

    def _serve(self, handler: Callable[[socket.socket], None]) -> int:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(BACKLOG)
        self._listeners.append(listener)

        def accept_loop() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=self._run, args=(handler, conn), daemon=True).start()

        threading.Thread(target=accept_loop, daemon=True).start()
        port: int = listener.getsockname()[1]
        return port

    @staticmethod
    def _run(handler: Callable[[socket.socket], None], conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError, ValueError):
            handler(conn)

    @staticmethod
    def _echo(conn: socket.socket, first: bytes = b"") -> None:
        if first:
            conn.sendall(first)
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)

    @staticmethod
    def _sink(conn: socket.socket, first: bytes = b"") -> None:
        buffer = bytearray(BUFFER)
        total = len(first)
        while size := conn.recv_into(buffer):
            total += size
        conn.sendall(f"{total}\n".encode())

    def _source(self, conn: socket.socket, first: bytes = b"") -> None:
        header = first
        while b"\n" not in header and len(header) < MAX_HEADER:
            data = conn.recv(MAX_HEADER)
            if not data:
                return
            header += data
        size = int(header.split(b"\n")[0])
        view = memoryview(self._block)
        while size > 0:
            size -= conn.send(view[: min(size, BUFFER)])

    def _mux(self, conn: socket.socket) -> None:
        first = conn.recv(65536)
        if not first:
            return
        kind, rest = first[:1], first[1:]
        if kind == b"E":
            self._echo(conn, first)
        elif kind == b"U":
            self._sink(conn, rest)
        elif kind == b"D":
            self._source(conn, rest)

    def close(self) -> None:
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()


def main() -> int:
    servers = Servers()
    print(json.dumps(servers.ports()), flush=True)
    sys.stdin.read()  # until our parent closes the pipe (or dies)
    servers.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
