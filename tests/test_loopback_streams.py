"""The loopback's byte streams: half-close both ways, qrexec's EOF rules, large transfers.

The caller is a real TCP connection handed to ``qrexec-client-vm`` as its
stdin (``--use-stdin-socket``) or as both stdin and stdout (socat EXEC /
systemd StandardInput=socket style), exactly as the client will do it.
"""

import contextlib
import hashlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qconnect.loopback.machine import Machine
from tests.conftest import (
    BOTH_LOOPBACK_MODES,
    recv_all,
    tcp_pair,
    write_executable,
)
from tests.servers import HalfCloseServer

MakeMachine = Callable[..., Machine]

# Every test runs in-process and through the fork-server: the same behaviour.
LOOPBACK_MODES = BOTH_LOOPBACK_MODES

TIMEOUT = 30
# How long a test waits to be sure something does NOT arrive.
QUIET_SECONDS = 0.5


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    sock.settimeout(TIMEOUT)
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, f"EOF after {len(data)} of {count} bytes"
        data += chunk
    return data


def is_quiet(sock: socket.socket, seconds: float = QUIET_SECONDS) -> bool:
    """Whether nothing (not even EOF) arrives on ``sock`` within ``seconds``."""
    sock.settimeout(seconds)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return True
    return False


@pytest.fixture
def start_call() -> Iterator[Callable[..., "subprocess.Popen[bytes]"]]:
    """Start a call whose caller is a TCP connection; the test keeps the user's end."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(
        machine: Machine, argv: list[str], accepted: socket.socket, *, same_socket_out: bool
    ) -> "subprocess.Popen[bytes]":
        process = machine.popen(
            "work",
            argv,
            stdin=accepted.fileno(),
            stdout=accepted.fileno() if same_socket_out else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        accepted.close()  # the call's process holds the only copy now
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(TIMEOUT)
        if process.stderr:
            process.stderr.close()


STDIN_SOCKET = ["qrexec-client-vm", "--use-stdin-socket"]
PLAIN = ["qrexec-client-vm"]


def test_use_stdin_socket_client_half_close_still_gets_a_late_reply(
    loopback_machine: MakeMachine,
    half_close_server: HalfCloseServer,
    start_call: Callable[..., Any],
) -> None:
    half_close_server.reply_delay = 0.5
    port = half_close_server.reply_after_eof_port
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    user, accepted = tcp_pair()
    process = start_call(
        machine, [*STDIN_SOCKET, "web", f"qubes.ConnectTCP+{port}"], accepted, same_socket_out=False
    )
    payload = os.urandom(300_000)
    user.sendall(payload)
    user.shutdown(socket.SHUT_WR)
    assert recv_all(user) == HalfCloseServer.summary(payload)
    assert process.wait(TIMEOUT) == 0


def test_stock_connect_tcp_ends_the_call_when_the_server_half_closes(
    loopback_machine: MakeMachine,
    half_close_server: HalfCloseServer,
    start_call: Callable[..., Any],
) -> None:
    """The stock rpc-config (exit-on-service-eof=true): the server's EOF tears the call down."""
    port = half_close_server.writes_first_port
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    user, accepted = tcp_pair()
    process = start_call(
        machine, [*STDIN_SOCKET, "web", f"qubes.ConnectTCP+{port}"], accepted, same_socket_out=False
    )
    assert recv_all(user) == HalfCloseServer.GREETING
    assert process.wait(TIMEOUT) == 0
    # What the user sends now goes nowhere: the call is over.
    user.sendall(b"too late")
    assert half_close_server.wait_received() == [b""]


def test_server_half_close_keeps_the_call_when_exit_on_service_eof_is_false(
    loopback_machine: MakeMachine,
    half_close_server: HalfCloseServer,
    start_call: Callable[..., Any],
) -> None:
    port = half_close_server.writes_first_port
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    (machine.rpc_config_dir("web") / "qubes.ConnectTCP").write_text(
        "skip-service-descriptor=true\nexit-on-service-eof=false\n"
    )
    user, accepted = tcp_pair()
    process = start_call(
        machine, [*STDIN_SOCKET, "web", f"qubes.ConnectTCP+{port}"], accepted, same_socket_out=False
    )
    assert recv_all(user) == HalfCloseServer.GREETING
    assert process.poll() is None
    user.sendall(b"still sending after the server's EOF")
    user.shutdown(socket.SHUT_WR)
    assert half_close_server.wait_received() == [b"still sending after the server's EOF"]
    assert process.wait(TIMEOUT) == 0


LINGERING_SERVICE = """#!/bin/sh
# Reply, close stdout, then keep reading stdin until the caller's EOF.
printf bye
exec 1>&-
cat >/dev/null
"""


def test_without_stdin_socket_no_fin_reaches_the_client_until_the_call_ends(
    loopback_machine: MakeMachine, start_call: Callable[..., Any]
) -> None:
    """fd 0 and fd 1 are one socket: closing fd 1 sends no FIN while fd 0 is open."""
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    write_executable(machine.rpc_dir("web") / "my.Linger", LINGERING_SERVICE)
    user, accepted = tcp_pair()
    process = start_call(machine, [*PLAIN, "web", "my.Linger"], accepted, same_socket_out=True)
    assert recv_exactly(user, 3) == b"bye"
    assert is_quiet(user), "EOF reached the client although fd 0 still holds the socket"
    user.shutdown(socket.SHUT_WR)  # the service's cat ends, the service exits, the call ends
    assert recv_all(user) == b""
    assert process.wait(TIMEOUT) == 0


def test_with_stdin_socket_the_services_eof_reaches_the_client_at_once(
    loopback_machine: MakeMachine, start_call: Callable[..., Any]
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    write_executable(machine.rpc_dir("web") / "my.Linger", LINGERING_SERVICE)
    user, accepted = tcp_pair()
    process = start_call(
        machine, [*STDIN_SOCKET, "web", "my.Linger"], accepted, same_socket_out=False
    )
    assert recv_all(user, timeout=5) == b"bye"
    assert process.poll() is None  # the call goes on: the user may still send
    user.sendall(b"more")
    user.shutdown(socket.SHUT_WR)
    assert process.wait(TIMEOUT) == 0


def test_executable_exit_ends_the_call_although_the_caller_never_sent_eof(
    loopback_machine: MakeMachine, start_call: Callable[..., Any]
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    write_executable(machine.rpc_dir("web") / "my.Quick", "#!/bin/sh\nprintf done\nexit 5\n")
    user, accepted = tcp_pair()
    process = start_call(
        machine, [*STDIN_SOCKET, "web", "my.Quick"], accepted, same_socket_out=False
    )
    assert recv_all(user) == b"done"
    assert process.wait(TIMEOUT) == 5


def test_executable_service_reply_after_the_callers_eof(
    loopback_machine: MakeMachine, start_call: Callable[..., Any]
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    write_executable(
        machine.rpc_dir("web") / "my.Count", "#!/bin/sh\nn=$(wc -c)\nsleep 0.3\necho $n\n"
    )
    user, accepted = tcp_pair()
    process = start_call(
        machine, [*STDIN_SOCKET, "web", "my.Count"], accepted, same_socket_out=False
    )
    user.sendall(b"x" * 5000)
    user.shutdown(socket.SHUT_WR)
    assert recv_all(user) == b"5000\n"
    assert process.wait(TIMEOUT) == 0


class HalfCloseSocketService:
    """A unix socket service that reads the caller's bytes to EOF, then replies with their count."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                self.received.append(data)
                with contextlib.suppress(OSError):
                    conn.sendall(b"got %d\n" % len(data))

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def counting_socket_service() -> Iterator[Callable[[Path], HalfCloseSocketService]]:
    services: list[HalfCloseSocketService] = []

    def make(path: Path) -> HalfCloseSocketService:
        services.append(HalfCloseSocketService(path))
        return services[-1]

    yield make
    for service in services:
        service.close()


def test_socket_service_replies_after_the_callers_eof(
    loopback_machine: MakeMachine,
    counting_socket_service: Callable[[Path], HalfCloseSocketService],
    start_call: Callable[..., Any],
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    service = counting_socket_service(machine.rpc_dir("web") / "my.Sock")
    user, accepted = tcp_pair()
    process = start_call(
        machine, [*STDIN_SOCKET, "web", "my.Sock"], accepted, same_socket_out=False
    )
    user.sendall(b"12345")
    user.shutdown(socket.SHUT_WR)
    assert recv_all(user) == b"got %d\n" % len(b"my.Sock+ work\0" + b"12345")
    assert process.wait(TIMEOUT) == 0
    assert service.received == [b"my.Sock+ work\x0012345"]


def test_exit_on_client_eof_ends_the_call_before_the_socket_service_replies(
    loopback_machine: MakeMachine,
    counting_socket_service: Callable[[Path], HalfCloseSocketService],
    start_call: Callable[..., Any],
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    counting_socket_service(machine.rpc_dir("web") / "my.Sock")
    (machine.rpc_config_dir("web") / "my.Sock").write_text("exit-on-client-eof=true\n")
    user, accepted = tcp_pair()
    process = start_call(
        machine, [*STDIN_SOCKET, "web", "my.Sock"], accepted, same_socket_out=False
    )
    user.sendall(b"12345")
    user.shutdown(socket.SHUT_WR)
    assert recv_all(user) == b""
    assert process.wait(TIMEOUT) == 0


def test_large_transfer_both_ways_is_byte_exact(
    loopback_machine: MakeMachine, echo_server: int, start_call: Callable[..., Any]
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    (machine.rpc_config_dir("web") / "qubes.ConnectTCP").write_text(
        "skip-service-descriptor=true\n"
    )
    user, accepted = tcp_pair()
    process = start_call(
        machine,
        [*STDIN_SOCKET, "web", f"qubes.ConnectTCP+{echo_server}"],
        accepted,
        same_socket_out=False,
    )
    size = 16 << 20
    block = os.urandom(1 << 20)
    sent = hashlib.sha256()
    received = hashlib.sha256()
    total = [0]

    def reader() -> None:
        user.settimeout(TIMEOUT)
        while data := user.recv(1 << 20):
            received.update(data)
            total[0] += len(data)

    thread = threading.Thread(target=reader)
    thread.start()
    for _ in range(size // len(block)):
        user.sendall(block)
        sent.update(block)
    user.shutdown(socket.SHUT_WR)
    thread.join(TIMEOUT)
    assert total[0] == size
    assert received.hexdigest() == sent.hexdigest()
    assert process.wait(TIMEOUT) == 0


def test_caller_stdout_can_be_a_pipe_and_stdin_a_file(
    loopback_machine: MakeMachine, echo_server: int, tmp_path: Path
) -> None:
    """The plain (non-socket) shape: stdin a file, stdout a pipe; splice or not, bytes arrive."""
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    source = tmp_path / "input"
    source.write_bytes(os.urandom(3 << 20))
    with source.open("rb") as stdin:
        result = machine.run(
            "work",
            ["qrexec-client-vm", "web", f"qubes.ConnectTCP+{echo_server}"],
            stdin=stdin,
            capture_output=True,
            timeout=TIMEOUT,
        )
    assert result.returncode == 0
    assert result.stdout == source.read_bytes()


def test_caller_reading_stdout_pipe_gets_each_reply_while_the_call_goes_on(
    loopback_machine: MakeMachine,
) -> None:
    """Request/response over pipes: every reply must be readable at once.

    A splice from the service's socket straight into the caller's stdout
    pipe would hold that pipe's lock while waiting for the next reply, and the
    caller's read of the reply already in the pipe would block with it.
    """
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    write_executable(machine.rpc_dir("web") / "my.Cat", "#!/bin/sh\nexec cat\n")
    process = machine.popen(
        "work", ["qrexec-client-vm", "web", "my.Cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdin is not None and process.stdout is not None
    replies: list[bytes] = []
    try:
        for number in range(10):
            process.stdin.write(b"ping %d\n" % number)
            process.stdin.flush()
            reader = threading.Thread(target=lambda: replies.append(process.stdout.readline()))
            reader.start()
            reader.join(5)
            assert not reader.is_alive(), f"reply {number} stuck in the pipe"
        assert replies == [b"ping %d\n" % number for number in range(10)]
    finally:
        process.kill()
        process.wait(TIMEOUT)
        process.stdin.close()
        process.stdout.close()


class WritesFirstSocketService:
    """A unix socket service that sends a greeting, then half-closes or closes its socket.

    After a half-close it reads the caller's bytes to EOF and records them.
    """

    GREETING = b"greeting from the socket service\n"

    def __init__(self, path: Path, *, full_close: bool) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.full_close = full_close
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.sendall(self.GREETING)
            if self.full_close:
                return
            conn.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            self.received.append(data)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


@pytest.mark.parametrize("exit_on_service_eof", [False, True])
def test_socket_service_half_close_and_exit_on_service_eof(
    loopback_machine: MakeMachine, start_call: Callable[..., Any], exit_on_service_eof: bool
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    service = WritesFirstSocketService(machine.rpc_dir("web") / "my.Sock", full_close=False)
    (machine.rpc_config_dir("web") / "my.Sock").write_text(
        f"skip-service-descriptor=true\nexit-on-service-eof={str(exit_on_service_eof).lower()}\n"
    )
    try:
        user, accepted = tcp_pair()
        process = start_call(
            machine, [*STDIN_SOCKET, "web", "my.Sock"], accepted, same_socket_out=False
        )
        assert recv_all(user) == WritesFirstSocketService.GREETING
        if exit_on_service_eof:
            assert process.wait(TIMEOUT) == 0  # the service's EOF ended the call
        else:
            assert process.poll() is None
            user.sendall(b"after the service's EOF")
            user.shutdown(socket.SHUT_WR)
            assert process.wait(TIMEOUT) == 0
            service.thread.join(TIMEOUT)
            assert service.received == [b"after the service's EOF"]
    finally:
        service.close()


def test_socket_service_closing_its_socket_ends_the_call_without_the_callers_eof(
    loopback_machine: MakeMachine, start_call: Callable[..., Any]
) -> None:
    """A full close (not a half-close) hangs up the socket: the agent ends the call."""
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    service = WritesFirstSocketService(machine.rpc_dir("web") / "my.Sock", full_close=True)
    # No descriptor: the service closes with nothing unread, a clean EOF and a
    # hang-up (unread bytes would make it a reset instead).
    (machine.rpc_config_dir("web") / "my.Sock").write_text("skip-service-descriptor=true\n")
    try:
        user, accepted = tcp_pair()
        process = start_call(
            machine, [*STDIN_SOCKET, "web", "my.Sock"], accepted, same_socket_out=False
        )
        assert recv_all(user) == WritesFirstSocketService.GREETING
        assert process.wait(TIMEOUT) == 0
    finally:
        service.close()


def test_a_non_blocking_stdin_socket_is_waited_on_not_taken_for_eof(
    loopback_machine: MakeMachine, start_call: Callable[..., Any]
) -> None:
    """A trio program hands over its accepted socket, which is O_NONBLOCK (shared with us)."""
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(TIMEOUT)
        user, accepted = tcp_pair()
        accepted.setblocking(False)
        process = start_call(
            machine,
            [*STDIN_SOCKET, "web", f"qubes.ConnectTCP+{server.getsockname()[1]}"],
            accepted,
            same_socket_out=False,
        )
        conn, _ = server.accept()  # the call is connected: the relay starts now
    with conn:
        time.sleep(0.3)  # the relay finds nothing to read yet (EAGAIN, not EOF)
        user.sendall(b"late bytes")
        assert recv_exactly(conn, 10) == b"late bytes"
        conn.sendall(b"reply")
        conn.shutdown(socket.SHUT_WR)
        assert recv_all(user) == b"reply"
    user.close()
    assert process.wait(TIMEOUT) == 0
