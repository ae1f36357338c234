"""The test servers themselves (tests.servers): a wrong server makes other tests lie.

Each behaviour is checked against its own description, and the bulk client
is shown to notice a corrupted transfer, so a test built on them can fail.
"""

import hashlib
import socket
import time

import pytest
import trio

from tests.conftest import recv_all
from tests.servers import (
    BIG_SIZE,
    GREETING,
    SLOW_FIRST,
    HalfCloseServer,
    Servers,
    SoakServers,
    ThreadedTCPServer,
    bulk,
    bulk_transfer,
    late_reply,
    pattern,
    pattern_base,
    servers_process,
)


def _exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


async def test_bulk_and_its_client_move_every_byte_both_ways() -> None:
    with Servers({"bulk": bulk}) as running:
        # not a whole number of pattern blocks, with and without the client's EOF
        await bulk_transfer(running["bulk"], (3 << 20) + 5)
        await bulk_transfer(running["bulk"], 1000, half_close=False)


async def test_the_bulk_client_notices_one_changed_byte() -> None:
    def corrupting(conn: socket.socket) -> None:
        header = b""
        while len(header) < 16:
            header += conn.recv(16 - len(header))
        size = int.from_bytes(header[:8], "big")
        blocks = pattern(size, pattern_base())
        blocks[-1] = blocks[-1][:-1] + bytes([blocks[-1][-1] ^ 1])
        for block in blocks:
            conn.sendall(block)
        digest = hashlib.sha256()
        while size > 0:
            data = conn.recv(size)
            if not data:
                break
            digest.update(data)
            size -= len(data)
        conn.sendall(digest.hexdigest().encode())

    with (
        Servers({"bulk": corrupting}) as running,
        pytest.raises(AssertionError, match="download corrupted"),
    ):
        await bulk_transfer(running["bulk"], 100_000)


def test_late_reply_answers_the_summary_only_after_its_delay() -> None:
    delay = 0.3
    with Servers({"late": late_reply(delay)}) as running:
        begin = time.monotonic()
        answer = _exchange(running["late"], b"x" * 5000)
        assert time.monotonic() - begin >= delay
    assert answer == f"5000 {hashlib.sha256(b'x' * 5000).hexdigest()}\n".encode()
    assert answer == HalfCloseServer.summary(b"x" * 5000)


def test_half_close_server_records_what_was_sent_after_its_eof() -> None:
    with HalfCloseServer() as server:
        with socket.create_connection(("127.0.0.1", server.writes_first_port)) as sock:
            sock.settimeout(30)
            greeting = b""
            while data := sock.recv(1024):  # ends at the server's EOF
                greeting += data
            assert greeting == GREETING
            sock.sendall(b"after your EOF")
        assert server.wait_received() == [b"after your EOF"]


def test_soak_servers_big_slow_and_early() -> None:
    with SoakServers() as running:
        with socket.create_connection(("127.0.0.1", running["big"])) as sock:
            assert len(recv_all(sock)) == BIG_SIZE
        with socket.create_connection(("127.0.0.1", running["slow"])) as sock:
            sock.settimeout(30)
            first = b""
            while len(first) < SLOW_FIRST:
                first += sock.recv(SLOW_FIRST)
            assert first == b"s" * SLOW_FIRST
            sock.settimeout(0.2)
            with pytest.raises(TimeoutError):  # it waits for our EOF, sending nothing more
                sock.recv(1)
        assert _exchange(running["early"], b"late words") == GREETING
        running.wait_early_received({hashlib.sha256(b"late words").hexdigest()}, timeout=30)


def test_the_bench_set_as_its_own_process_serves_and_ends_with_its_stdin() -> None:
    with servers_process("bench") as (process, ports):
        assert set(ports) == {"echo", "sink", "source", "mux"}
        assert _exchange(ports["echo"], b"ping") == b"ping"
        assert _exchange(ports["sink"], b"u" * 70000) == b"70000\n"
        assert _exchange(ports["source"], b"12345\n") == b"\xa5" * 12345
        assert _exchange(ports["mux"], b"Eecho me") == b"Eecho me"
        assert _exchange(ports["mux"], b"U" + b"u" * 99) == b"99\n"
        assert _exchange(ports["mux"], b"D7\n") == b"\xa5" * 7
    assert process.returncode == 0  # it ended because its stdin closed, not by a signal


def test_close_ends_open_connections_and_their_threads() -> None:
    def wait_for_one_byte(conn: socket.socket) -> None:
        conn.recv(1)

    server = ThreadedTCPServer(wait_for_one_byte)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(30)
    try:
        deadline = time.monotonic() + 30
        while not server.threads and time.monotonic() < deadline:  # the connection is served
            time.sleep(0.01)
        assert server.threads
        server.close()
        assert not server.threads
        assert sock.recv(1) == b""  # our end sees the close
    finally:
        sock.close()


async def test_servers_work_under_trio_too() -> None:
    with Servers({"late": late_reply(0)}) as running:
        stream = await trio.open_tcp_stream("127.0.0.1", running["late"])
        async with stream:
            await stream.send_all(b"abc")
            await stream.send_eof()
            answer = b""
            async for data in stream:
                answer += data
    assert answer == HalfCloseServer.summary(b"abc")
