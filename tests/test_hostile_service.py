"""Hostile callers of the socket service: each gets the expected outcome, and a
well-behaved call made right after is still served.

The service runs in the test's event loop (tests.service_helpers.socket_service)
and is called as qrexec-agent calls it: connect to the unix socket, send the
descriptor, then the caller's bytes. A call the service refuses is closed
without a byte (a socket service cannot set an exit code).
"""

import contextlib
import threading
import time
from pathlib import Path

import pytest
import trio

from qconnect.service.daemon import ConnectTCPService, ServiceConfig
from qconnect.service.descriptor import MAX_DESCRIPTOR
from tests.service_helpers import call, echo, receive_all, socket_service, tcp_server

# Seconds a refused call may take to be closed (it is closed at once; this is
# only how long a loaded machine may delay it).
PROMPT = 5.0

# How many bytes a caller that stops reading may leave on the way before the
# service stops reading from the server: socket buffers on both hops plus one
# relay chunk or pipe; far below what the server tries to push.
BACKPRESSURE_BOUND = 32 << 20


async def assert_closed_without_a_byte(stream: trio.SocketStream) -> None:
    # a reset is as good as EOF: nothing was served
    with trio.fail_after(PROMPT), contextlib.suppress(trio.BrokenResourceError):
        assert await receive_all(stream) == b""
    await stream.aclose()


async def assert_still_serves(socket_path: Path, echo_port: int) -> None:
    stream = await call(socket_path, str(echo_port), data=b"still here")
    async with stream:
        await stream.send_eof()
        with trio.fail_after(PROMPT):
            assert await receive_all(stream) == b"still here"


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "qubes.ConnectTCP"


async def test_a_call_without_descriptor_is_closed_and_the_service_keeps_serving(
    socket_path: Path,
) -> None:
    async with socket_service(socket_path) as service, tcp_server(echo) as port:
        stream = await trio.open_unix_socket(str(socket_path))
        await stream.send_eof()
        await assert_closed_without_a_byte(stream)
        await assert_still_serves(socket_path, port)
        assert service.limits.refused == 1


async def test_a_descriptor_without_nul_is_refused(socket_path: Path) -> None:
    async with socket_service(socket_path) as service, tcp_server(echo) as port:
        stream = await trio.open_unix_socket(str(socket_path))
        await stream.send_all(f"qubes.ConnectTCP+{port} work".encode())
        await stream.send_eof()
        await assert_closed_without_a_byte(stream)
        await assert_still_serves(socket_path, port)
        assert service.limits.refused == 1


async def test_a_64_kib_descriptor_is_refused_after_a_bounded_read(socket_path: Path) -> None:
    async with socket_service(socket_path) as service, tcp_server(echo) as port:
        stream = await trio.open_unix_socket(str(socket_path))
        flood = b"qubes.ConnectTCP+" + b"9" * (64 * 1024)
        # the service stops reading long before the end
        with trio.move_on_after(PROMPT), contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(flood)
        await assert_closed_without_a_byte(stream)
        await assert_still_serves(socket_path, port)
        assert service.limits.refused == 1
        assert MAX_DESCRIPTOR < 64 * 1024


@pytest.mark.parametrize(
    "descriptor",
    [
        "qubes.Other+{port} work",  # another service
        "qubes.ConnectTCP {port} work",  # no '+'
        "qubes.ConnectTCP+0{port} work",  # leading zero
        "qubes.ConnectTCP+65536 work",
        "qubes.ConnectTCP+{port}",  # no calling qube
        "qubes.ConnectTCP+{port} work extra",
    ],
)
async def test_a_descriptor_naming_another_service_or_a_bad_port_is_refused(
    socket_path: Path, descriptor: str
) -> None:
    async with socket_service(socket_path) as service, tcp_server(echo) as port:
        stream = await trio.open_unix_socket(str(socket_path))
        await stream.send_all(descriptor.format(port=port).encode() + b"\0hello")
        await assert_closed_without_a_byte(stream)
        await assert_still_serves(socket_path, port)
        assert service.limits.refused == 1


async def test_a_port_outside_the_allowlist_is_refused_and_an_allowed_one_served(
    socket_path: Path, tmp_path: Path
) -> None:
    async with tcp_server(echo) as allowed, tcp_server(echo) as other:
        allow = tmp_path / "connecttcp.allow"
        allow.write_text(f"{allowed} work\n")
        config = ServiceConfig(allow_files=(allow,))
        async with socket_service(socket_path, config) as service:
            stream = await call(socket_path, str(other), data=b"x")
            await assert_closed_without_a_byte(stream)
            stream = await call(socket_path, str(allowed), source="personal", data=b"x")
            await assert_closed_without_a_byte(stream)  # allowed port, wrong caller
            await assert_still_serves(socket_path, allowed)
            assert service.limits.refused == 2


async def test_a_call_that_never_sends_a_byte_times_out(socket_path: Path) -> None:
    config = ServiceConfig(allow_files=(), descriptor_timeout=0.5)
    async with socket_service(socket_path, config) as service, tcp_server(echo) as port:
        stream = await trio.open_unix_socket(str(socket_path))
        started = time.monotonic()
        await assert_closed_without_a_byte(stream)
        assert time.monotonic() - started >= 0.4
        await assert_still_serves(socket_path, port)
        assert service.limits.refused == 1


async def _flood(socket_path: Path, port: int, count: int, service: ConnectTCPService) -> None:
    """``count`` calls opened as fast as possible; each is served or closed, none hangs."""
    outcomes = {"served": 0, "closed": 0}

    async def one(index: int) -> None:
        payload = f"{index:08d}".encode()
        try:
            stream = await call(socket_path, str(port), data=payload)
        except (OSError, trio.BrokenResourceError):
            outcomes["closed"] += 1  # refused at once (backlog full, or over the call limit)
            return
        async with stream:
            try:
                await stream.send_eof()
                got = await receive_all(stream)
            except trio.BrokenResourceError:
                got = b""
        outcomes["served" if got == payload else "closed"] += 1
        assert got in (payload, b"")

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(one, index)
    assert outcomes["served"] + outcomes["closed"] == count
    assert outcomes["served"] > 0
    await assert_still_serves(socket_path, port)
    with trio.fail_after(PROMPT):
        while service.limits.total:  # every call's slot given back
            await trio.sleep(0.05)


async def test_300_calls_opened_at_once_are_served_or_closed_never_hung(
    socket_path: Path,
) -> None:
    async with socket_service(socket_path) as service, tcp_server(echo) as port:
        await _flood(socket_path, port, 300, service)


@pytest.mark.slow
async def test_5000_calls_opened_at_once_are_served_or_closed_never_hung(
    socket_path: Path,
) -> None:
    async with socket_service(socket_path) as service, tcp_server(echo) as port:
        await _flood(socket_path, port, 5000, service)


async def test_a_caller_that_stops_reading_holds_the_server_back_not_service_memory(
    socket_path: Path,
) -> None:
    """Backpressure: the server can push only what the buffers on the way hold."""
    sent = [0]
    stop = threading.Event()

    async def firehose(stream: trio.SocketStream) -> None:
        block = b"\xa5" * 65536
        async with stream:
            with trio.move_on_after(30), contextlib.suppress(trio.BrokenResourceError):
                while not stop.is_set():
                    await stream.send_all(block)
                    sent[0] += len(block)

    async with (
        socket_service(socket_path) as service,
        tcp_server(firehose) as port,
        tcp_server(echo) as echo_port,
    ):
        stream = await call(socket_path, str(port))
        # We read nothing: the relay must stop reading the server, so what the
        # server sent, once it started, stops growing (unchanged for 0.5 s) below the bound.
        plateau, still_since = 0, trio.current_time()
        with trio.fail_after(30):  # still growing: the service is buffering
            while not plateau or sent[0] != plateau or trio.current_time() - still_since < 0.5:
                if sent[0] != plateau:
                    plateau, still_since = sent[0], trio.current_time()
                assert sent[0] < BACKPRESSURE_BOUND, sent[0]
                await trio.sleep(0.05)
        assert 0 < plateau < BACKPRESSURE_BOUND, plateau
        stop.set()
        await stream.aclose()
        await assert_still_serves(socket_path, echo_port)
        assert service.limits.refused == 0
