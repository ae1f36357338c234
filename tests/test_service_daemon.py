"""The socket service in-process: real unix and TCP sockets, one trio process for every call."""

import logging
import os
from pathlib import Path

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from qconnect.service.daemon import ServiceConfig
from tests.service_helpers import (
    call,
    echo,
    receive_all,
    socket_service,
    tcp_server,
    unused_port,
)


async def test_call_reaches_the_local_port_and_is_logged_with_the_caller(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "qconnect.service")
    path = tmp_path / "qubes.ConnectTCP"
    async with tcp_server(echo) as port, socket_service(path) as service:
        stream = await call(path, str(port), "work", b"hello")
        async with stream:
            await stream.send_eof()
            assert await receive_all(stream) == b"hello"
        with trio.fail_after(5):
            while service.limits.served < 1:
                await trio.sleep(0.01)
    record = next(r for r in caplog.records if "call from work" in r.getMessage())
    assert f"127.0.0.1:{port}: 5 bytes in, 5 bytes out" in record.getMessage()
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["caller"] == "work" and fields["port"] == port and fields["outcome"] == "ok"
    assert fields["address"] == "127.0.0.1" and fields["bytes_in"] == 5


async def test_server_only_on_ipv6_loopback_is_reached(tmp_path: Path) -> None:
    path = tmp_path / "qubes.ConnectTCP"
    async with (
        tcp_server(echo, host="::1") as port,
        socket_service(path),
        await call(path, str(port), data=b"six") as stream,
    ):
        await stream.send_eof()
        assert await receive_all(stream) == b"six"


async def test_client_half_close_then_late_reply_arrives(tmp_path: Path) -> None:
    async def late_reply(stream: trio.SocketStream) -> None:
        async with stream:
            request = await receive_all(stream)  # until the client's EOF
            await wait_all_tasks_blocked()  # late: the service did all it does after the EOF
            await stream.send_all(b"reply to " + request)

    path = tmp_path / "qubes.ConnectTCP"
    async with (
        tcp_server(late_reply) as port,
        socket_service(path),
        await call(path, str(port), data=b"question") as stream,
    ):
        await stream.send_eof()
        assert await receive_all(stream) == b"reply to question"


async def test_server_half_close_reaches_client_which_can_still_send(tmp_path: Path) -> None:
    received = trio.Event()
    got: list[bytes] = []

    async def banner_then_listen(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"banner")
            await stream.send_eof()
            got.append(await receive_all(stream))
            received.set()

    path = tmp_path / "qubes.ConnectTCP"
    async with (
        tcp_server(banner_then_listen) as port,
        socket_service(path),
        await call(path, str(port)) as stream,
    ):
        assert await receive_all(stream) == b"banner"
        await wait_all_tasks_blocked()  # the service did all it does after the EOF
        await stream.send_all(b"still here")
        await stream.send_eof()
        with trio.fail_after(5):
            await received.wait()
    assert got == [b"still here"]


@pytest.mark.parametrize(
    ("argument", "reason"),
    [
        ("0", "invalid port argument '0'"),
        ("65536", "invalid port argument '65536'"),
        ("080", "invalid port argument '080'"),
        ("-1", "invalid port argument '-1'"),
        ("1+2", "invalid port argument '1+2'"),
        ("", "invalid port argument ''"),
        ("9" * 200, "invalid port argument '9999999999"),
    ],
)
async def test_bad_argument_closes_the_call_without_a_byte(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, argument: str, reason: str
) -> None:
    path = tmp_path / "qubes.ConnectTCP"
    async with socket_service(path) as service:
        async with await call(path, argument, "work", b"data") as stream:
            with trio.fail_after(5):
                assert await receive_all(stream) == b""
        assert service.limits.refused == 1 and service.limits.total == 0
    assert any(reason in r.getMessage() and "from work" in r.getMessage() for r in caplog.records)


async def test_unreachable_port_closes_the_call_and_logs_both_addresses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "qubes.ConnectTCP"
    port = unused_port()
    async with socket_service(path), await call(path, str(port)) as stream:
        with trio.fail_after(5):
            assert await receive_all(stream) == b""
    message = next(r.getMessage() for r in caplog.records if "unreachable" in r.getMessage())
    assert f"cannot connect to port {port}: 127.0.0.1: connection refused; ::1:" in message


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        (b"x" * 65536, "no NUL within the first 1024 bytes"),
        (b"qubes.Other+80 work\0", "service 'qubes.Other'"),
        (b"qubes.ConnectTCP+80 ../etc\0", "is not a qube name"),
        (b"qubes.ConnectTCP+80 wo", "closed before the service descriptor (22 bytes)"),
    ],
)
async def test_hostile_descriptor_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, sent: bytes, reason: str
) -> None:
    path = tmp_path / "qubes.ConnectTCP"
    async with socket_service(path) as service:
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            try:
                await stream.send_all(sent)
                await stream.send_eof()
                with trio.fail_after(5):
                    assert await receive_all(stream) == b""
            except trio.BrokenResourceError:
                pass  # the service closed first, which is the point
        with trio.fail_after(5):
            while service.limits.refused < 1:
                await trio.sleep(0.01)
    assert any(reason in r.getMessage() for r in caplog.records)


async def test_caller_that_never_sends_the_descriptor_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "qubes.ConnectTCP"
    config = ServiceConfig(descriptor_timeout=0.3, allow_files=())
    async with socket_service(path, config), await trio.open_unix_socket(str(path)) as stream:
        with trio.fail_after(5):
            assert await receive_all(stream) == b""
    assert any("no service descriptor within 0.3 s" in r.getMessage() for r in caplog.records)


async def test_calls_over_the_limits_are_refused_and_the_service_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "qubes.ConnectTCP"
    config = ServiceConfig(max_calls=3, max_calls_per_caller=2, allow_files=())
    async with tcp_server(echo) as port, socket_service(path, config) as service:
        open_calls = [await call(path, str(port), "work", b"1") for _ in range(2)]
        open_calls.append(await call(path, str(port), "dev", b"1"))
        for stream in open_calls:
            assert await stream.receive_some(10) == b"1"  # all three are up
        assert service.limits.total == 3
        over_total = await call(path, str(port), "other", b"x")
        assert await receive_all(over_total) == b""
        await open_calls[2].aclose()  # dev's call ends: one slot free
        with trio.fail_after(5):
            while service.limits.total > 2:
                await trio.sleep(0.01)
        over_caller = await call(path, str(port), "work", b"x")
        assert await receive_all(over_caller) == b""
        fine = await call(path, str(port), "dev", b"ok")
        assert await fine.receive_some(10) == b"ok"
        for stream in [*open_calls[:2], over_total, over_caller, fine]:
            await stream.aclose()
    messages = [r.getMessage() for r in caplog.records]
    assert any("too many calls open (3, limit 3)" in m for m in messages)
    assert any("too many calls open from work (2, limit 2)" in m for m in messages)


async def test_allowlist_limits_ports_and_callers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "qubes.ConnectTCP"
    allow = tmp_path / "connecttcp.allow"
    async with tcp_server(echo) as port:
        allow.write_text(f"{port} work\n")
        config = ServiceConfig(allow_files=(allow,))
        async with socket_service(path, config):
            async with await call(path, str(port), "work", b"yes") as stream:
                assert await stream.receive_some(10) == b"yes"
            async with await call(path, str(port), "untrusted", b"no") as stream:
                assert await receive_all(stream) == b""
            allow.write_text("garbage\n")
            async with await call(path, str(port), "work", b"no") as stream:
                assert await receive_all(stream) == b""
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"port {port} is not served to untrusted" in m for m in messages)
    assert any("allowlist broken, refusing every call" in m and ":1:" in m for m in messages)


async def test_bytes_sent_with_the_descriptor_are_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "qubes.ConnectTCP"
    payload = bytes(range(256)) * 4  # more than one descriptor-sized read
    async with (
        tcp_server(echo) as port,
        socket_service(path),
        await call(path, str(port), data=payload) as stream,
    ):
        await stream.send_eof()
        assert await receive_all(stream) == payload


async def test_socket_path_longer_than_sockaddr_un_still_works(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "qubes.ConnectTCP"
    assert len(str(path)) > 108
    async with tcp_server(echo) as port, socket_service(path):
        sock = trio.socket.socket(trio.socket.AF_UNIX)
        directory = os.open(deep, os.O_RDONLY)
        try:
            await sock.connect(f"/proc/self/fd/{directory}/qubes.ConnectTCP")
        finally:
            os.close(directory)
        async with trio.SocketStream(sock) as stream:
            await stream.send_all(f"qubes.ConnectTCP+{port} work\0deep".encode())
            await stream.send_eof()
            assert await receive_all(stream) == b"deep"
