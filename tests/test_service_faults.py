"""Fault injection into the socket service: a failure inside one call ends that call only.

For every I/O step of a call (making a socket, connecting it, making a splice
pipe, splicing, sending, receiving, closing) and each error the kernel may
answer there, one call (B) meets that error once, while another call (A) is
open and idle in the middle of its transfer. Then B must end (closed, or served
when the relay can do without the failed step), its log line must say what
happened, the next call (C) must be served, and A must finish with every byte.

The service runs in the test's event loop. The faults are injected below the
service, at trio's socket methods and the os functions the relay calls, and
only on B's descriptors: its unix stream (the service's own end, named after
the listening socket) or its TCP connection (to B's own echo server). The
clients and servers of the test use trio streams as well, but their sockets
never match.
"""

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import qconnect.core.relay.trio_streams as trio_streams
from qconnect.core.relay.splice import SPLICE_UNSUPPORTED
from qconnect.service.daemon import ConnectTCPService
from tests.service_helpers import call, echo, receive_all, socket_service, tcp_server

STEPS = ("socket", "connect", "pipe2", "splice", "send", "receive", "close")
ERRNOS = (
    errno.EAFNOSUPPORT,
    errno.EMFILE,
    errno.ENFILE,
    errno.ENOMEM,
    errno.ECONNRESET,
    errno.EPIPE,
    errno.EBADF,
)

# Seconds within which every call of a case ends; far above what one takes.
PROMPT = 10.0

#: The call that meets the fault: its source qube, as the log names it.
FAULTY = "faulty"


class Fault:
    """One error, injected once, at one step, on call B's descriptors only."""

    def __init__(self, step: str, code: int, socket_path: Path) -> None:
        self.step, self.code = step, code
        self.socket_path = str(socket_path)
        self.port_b: int | None = None
        self.armed = False
        self.fired = 0

    def error(self) -> OSError:
        return OSError(self.code, os.strerror(self.code))

    def arm(self) -> None:
        # A pipe kept idle by an earlier call would spare B its pipe2.
        trio_streams._pipes.close_idle()
        self.armed = True

    def take(self, step: str, matches: Callable[[], bool] = lambda: True) -> bool:
        """Whether the error must be raised now (and then never again)."""
        if self.armed and step == self.step and matches():
            self.armed = False
            self.fired += 1
            return True
        return False

    def is_b(self, sock: socket.socket | Any) -> bool:
        """Whether ``sock`` is the service's end of call B (unix stream or TCP connection)."""
        try:
            if sock.family == socket.AF_UNIX:
                return bool(sock.getsockname() == self.socket_path)
            return bool(sock.getpeername()[1] == self.port_b)
        except OSError:
            return False

    def is_b_fd(self, fd: int) -> bool:
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                return self.is_b(sock)
        except OSError:
            return False  # a pipe


@pytest.fixture
def inject(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Fault], None]]:
    """Install the fault's hooks under trio's sockets and the relay's os calls."""

    def install(fault: Fault) -> None:
        probe = trio.socket.socket()
        socket_type: Any = type(probe)  # the concrete class, whose methods the service calls
        probe.close()
        real_factory = trio.socket.socket
        real_connect = socket_type.connect
        real_recv = socket_type.recv
        real_send = socket_type.send
        real_close = socket_type.close
        real_pipe2 = os.pipe2
        real_splice = os.splice

        def factory(*args: Any, **kwargs: Any) -> Any:
            if fault.take("socket"):
                raise fault.error()
            return real_factory(*args, **kwargs)

        async def connect(self: Any, address: Any) -> None:
            if fault.take("connect", lambda: address[1] == fault.port_b):
                await trio.lowlevel.checkpoint()
                raise fault.error()
            await real_connect(self, address)

        def recv(self: Any, *args: Any) -> Any:
            if fault.take("receive", lambda: fault.is_b(self)):
                raise fault.error()
            return real_recv(self, *args)

        def send(self: Any, *args: Any) -> Any:
            if fault.take("send", lambda: fault.is_b(self)):
                raise fault.error()
            return real_send(self, *args)

        def close(self: Any) -> None:
            fire = fault.take("close", lambda: fault.is_b(self))
            real_close(self)  # as close(2): the descriptor is gone even when it fails
            if fire:
                raise fault.error()

        def pipe2(flags: int) -> tuple[int, int]:
            if fault.take("pipe2"):
                raise fault.error()
            return real_pipe2(flags)

        def splice(src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
            if fault.take("splice", lambda: fault.is_b_fd(src) or fault.is_b_fd(dst)):
                raise fault.error()
            return real_splice(src, dst, count, *args, **kwargs)

        monkeypatch.setattr(trio.socket, "socket", factory)
        monkeypatch.setattr(socket_type, "connect", connect)
        monkeypatch.setattr(socket_type, "recv", recv)
        monkeypatch.setattr(socket_type, "send", send)
        monkeypatch.setattr(socket_type, "close", close)
        monkeypatch.setattr(os, "pipe2", pipe2)
        monkeypatch.setattr(os, "splice", splice)

    yield install
    trio_streams._pipes.close_idle()


async def echo_until_reset(stream: trio.SocketStream) -> None:
    """B's server: echoes, and takes a reset (B broken by its fault) as the end."""
    with contextlib.suppress(trio.BrokenResourceError):
        await echo(stream)


async def _wait_calls_open(service: ConnectTCPService, count: int) -> None:
    with trio.fail_after(PROMPT):
        while service.limits.total != count:
            await trio.sleep(0.01)


@pytest.mark.parametrize("code", ERRNOS, ids=[errno.errorcode[code] for code in ERRNOS])
@pytest.mark.parametrize("step", STEPS)
async def test_a_fault_at_any_step_ends_that_call_only(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    inject: Callable[[Fault], None],
    step: str,
    code: int,
) -> None:
    caplog.set_level(logging.INFO, "qconnect.service")
    path = tmp_path / "qubes.ConnectTCP"
    fault = Fault(step, code, path)
    first_half, second_half = os.urandom(300_000), os.urandom(300_000)
    request_b = b"B" * 100_000
    async with (
        tcp_server(echo) as port_a,
        tcp_server(echo_until_reset) as port_b,
        socket_service(path) as service,
    ):
        fault.port_b = port_b
        inject(fault)

        # A: open, half its bytes there and back, then idle.
        call_a = await call(path, str(port_a), "steady", first_half)
        with trio.fail_after(PROMPT):
            assert await receive_all(call_a, len(first_half)) == first_half

        # B meets the fault once.
        call_b = await trio.open_unix_socket(str(path))
        logged_before = len(caplog.records)
        fault.arm()
        got_b = b""
        with trio.fail_after(PROMPT):
            try:
                await call_b.send_all(f"qubes.ConnectTCP+{port_b} {FAULTY}\0".encode() + request_b)
                await call_b.send_eof()
                got_b = await receive_all(call_b)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # reset: B ended, as it may
        await call_b.aclose()
        assert request_b.startswith(got_b)  # a prefix of the echo: never a foreign byte

        # B's one line, with its reason (a call that failed before its
        # descriptor was read cannot name its caller: it is the only new line).
        with trio.fail_after(PROMPT):
            while len(caplog.records) == logged_before:
                await trio.sleep(0.01)
        await _wait_calls_open(service, 1)  # only A is left
        assert fault.fired == 1, "the fault was never met: this case tests nothing"
        lines = [r.getMessage() for r in caplog.records[logged_before:]]
        assert len(lines) == 1, lines
        assert f"from {FAULTY} " in lines[0] or "from - " in lines[0], lines
        reason = os.strerror(code).lower()
        recovered = step == "pipe2" or (step == "splice" and code in SPLICE_UNSUPPORTED)
        if recovered:  # the relay copies without splice: B is served in full
            assert got_b == request_b and lines[0].endswith(", ok"), lines
        elif step == "close" and code == errno.EBADF:
            assert "bad file descriptor" in lines[0], lines
        else:
            assert reason in lines[0].lower() or "closed" in lines[0], lines

        # C is served, as if nothing happened.
        async with await call(path, str(port_a), "next", b"next call") as call_c:
            await call_c.send_eof()
            with trio.fail_after(PROMPT):
                assert await receive_all(call_c) == b"next call"

        # A finishes with every byte.
        await call_a.send_all(second_half)
        await call_a.send_eof()
        with trio.fail_after(PROMPT):
            assert await receive_all(call_a) == second_half
        await call_a.aclose()
        with trio.fail_after(PROMPT):
            while not any("call from steady " in r.getMessage() for r in caplog.records):
                await trio.sleep(0.01)
        assert [r.getMessage() for r in caplog.records if "from steady " in r.getMessage()] == [
            f"call from steady to 127.0.0.1:{port_a}: 600000 bytes in, 600000 bytes out, "
            + caplog.records[-1].getMessage().split(" bytes out, ")[1]
        ]
        assert caplog.records[-1].getMessage().endswith(", ok")
        # Every slot back but the one the listener holds while it waits in accept().
        assert service.fd_slots.value == service.fd_calls - 1
        counted = service.limits
        assert (counted.total, counted.served + counted.refused + counted.failed) == (0, 3)
