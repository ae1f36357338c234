"""The trio relay: exact bytes, half-close both ways, backpressure, broken peers."""

import hashlib
import os
import socket
import struct
from typing import Any

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from qconnect.core.relay.trio_streams import RelayStats, relay


def _stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = trio.socket.socketpair()
    return trio.SocketStream(left), trio.SocketStream(right)


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return client, server


async def _receive_all(stream: trio.SocketStream) -> bytes:
    chunks = []
    while data := await stream.receive_some(65536):
        chunks.append(data)
    return b"".join(chunks)


async def test_relay_moves_megabytes_both_ways_byte_exact_and_counts_them() -> None:
    size = 8 * 1024 * 1024
    up, down = os.urandom(size), os.urandom(size // 2)
    client, a = await _tcp_pair()
    b, server = await _tcp_pair()
    got: dict[str, bytes] = {}
    stats = RelayStats()

    async def client_side() -> None:
        async def send() -> None:
            await client.send_all(up)
            await client.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            got["down"] = await _receive_all(client)

    async def server_side() -> None:
        async def send() -> None:
            await server.send_all(down)
            await server.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            got["up"] = await _receive_all(server)

    async with client, a, b, server, trio.open_nursery() as nursery:
        nursery.start_soon(client_side)
        nursery.start_soon(server_side)
        result = await relay(a, b, stats=stats)
    assert result is stats
    assert hashlib.sha256(got["up"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got["down"]).digest() == hashlib.sha256(down).digest()
    assert (stats.a_to_b, stats.b_to_a) == (size, size // 2)
    assert stats.a_eof and stats.b_eof and stats.error is None
    assert stats.ended is not None and stats.duration == stats.ended - stats.started  # stopped


async def test_client_eof_reaches_server_and_a_late_reply_still_arrives() -> None:
    client, a = _stream_pair()
    b, server = _stream_pair()
    async with client, a, b, server, trio.open_nursery() as nursery:
        nursery.start_soon(relay, a, b)
        await client.send_all(b"question")
        await client.send_eof()
        assert await _receive_all(server) == b"question"  # ends: EOF was delivered
        await wait_all_tasks_blocked()  # the relay did all it does after that EOF
        await server.send_all(b"late answer")
        await server.send_eof()
        assert await _receive_all(client) == b"late answer"


async def test_server_eof_reaches_client_and_client_can_still_send() -> None:
    client, a = _stream_pair()
    b, server = _stream_pair()
    async with client, a, b, server, trio.open_nursery() as nursery:
        nursery.start_soon(relay, a, b)
        await server.send_all(b"banner")
        await server.send_eof()
        assert await _receive_all(client) == b"banner"
        await wait_all_tasks_blocked()  # the relay did all it does after that EOF
        await client.send_all(b"still talking")
        await client.send_eof()
        assert await _receive_all(server) == b"still talking"


async def test_relay_returns_only_after_both_directions_ended() -> None:
    client, a = _stream_pair()
    b, server = _stream_pair()
    async with client, a, b, server:
        async with trio.open_nursery() as nursery:
            stats = RelayStats()
            nursery.start_soon(lambda: relay(a, b, stats=stats))
            await client.send_eof()
            await wait_all_tasks_blocked()
            assert stats.ended is None and stats.a_eof and not stats.b_eof
            await server.send_eof()
        assert stats.ended is not None and stats.b_eof


async def test_a_reader_that_stops_reading_holds_back_the_writer() -> None:
    """Backpressure: the relay takes at most what the kernel buffers plus one chunk."""
    client, a = _stream_pair()
    b, server = _stream_pair()
    for sock in (client.socket, a.socket, b.socket, server.socket):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    stats = RelayStats()
    sent = 0
    async with client, a, b, server, trio.open_nursery() as nursery:
        nursery.start_soon(lambda: relay(a, b, stats=stats))
        with trio.move_on_after(1.0):
            block = b"x" * 65536
            while True:
                await client.send_all(block)
                sent += len(block)
        # The server never read: everything "sent" sits in kernel buffers or one chunk.
        assert sent < 8 * 1024 * 1024
        assert stats.a_to_b < 4 * 1024 * 1024
        nursery.cancel_scope.cancel()


async def test_a_reset_peer_ends_the_relay_with_an_error_not_an_exception() -> None:
    client, a = await _tcp_pair()
    b, server = await _tcp_pair()
    async with a, b, server:
        with trio.fail_after(5):  # the nursery waits for the relay to end
            async with trio.open_nursery() as nursery:
                stats = RelayStats()
                nursery.start_soon(lambda: relay(a, b, stats=stats))
                await client.send_all(b"hello")
                assert await server.receive_some(100) == b"hello"
                linger = struct.pack("ii", 1, 0)
                client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                await client.aclose()  # RST, not FIN
        assert stats.error is not None and "reset" in stats.error
        assert stats.a_to_b == 5


async def test_idle_relays_hold_no_pipes() -> None:
    """Splicing borrows a pipe only while bytes are in flight: idle calls hold sockets only."""
    relays = 100
    before = len(os.listdir("/proc/self/fd"))
    async with trio.open_nursery() as nursery:
        ends = []
        for _ in range(relays):
            client, a = _stream_pair()
            b, server = _stream_pair()
            ends.append((client, server))
            nursery.start_soon(relay, a, b)
        for client, server in ends:  # every relay has moved bytes both ways once
            await client.send_all(b"up")
            assert await server.receive_some(10) == b"up"
            await server.send_all(b"down")
            assert await client.receive_some(10) == b"down"
        during = len(os.listdir("/proc/self/fd"))
        # Four sockets per relay, plus at most the pool's 32 idle pipes (two fds each).
        assert during - before <= 4 * relays + 2 * 32
        nursery.cancel_scope.cancel()


async def test_stapled_socket_streams_are_spliced_and_half_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client's relay mode staples two socketpairs: both directions may still splice."""
    import qconnect.core.relay.trio_streams as relay_module

    spliced: list[bool] = []
    real = relay_module._splice_copy

    async def counting(*args: Any) -> None:
        spliced.append(True)
        await real(*args)

    monkeypatch.setattr(relay_module, "_splice_copy", counting)
    client, a = _stream_pair()
    to_call, call_stdin = _stream_pair()
    from_call, call_stdout = _stream_pair()
    pipes = trio.StapledStream(to_call, from_call)
    async with client, a, call_stdin, call_stdout, pipes, trio.open_nursery() as nursery:
        nursery.start_soon(relay, a, pipes)
        await client.send_all(b"to the call")
        await client.send_eof()
        assert await _receive_all(call_stdin) == b"to the call"
        await call_stdout.send_all(b"from the call")
        await call_stdout.send_eof()
        assert await _receive_all(client) == b"from the call"
    assert spliced == [True, True]


async def test_each_direction_signals_its_own_end_while_the_other_still_flows() -> None:
    client, a = _stream_pair()
    b, server = _stream_pair()
    stats = RelayStats()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: relay(a, b, stats=stats))
        await server.send_all(b"last words")
        await server.send_eof()
        with trio.fail_after(10):
            await stats.b_to_a_ended.wait()
        assert await _receive_all(client) == b"last words"
        assert not stats.a_to_b_ended.is_set()
        await client.send_all(b"still heard")  # the other direction is still open
        with trio.fail_after(10):
            assert await server.receive_some(100) == b"still heard"
        await client.send_eof()
        with trio.fail_after(10):
            await stats.a_to_b_ended.wait()
    assert stats.a_eof and stats.b_eof and stats.error is None
