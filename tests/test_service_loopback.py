"""qubes.ConnectTCP end to end through the loopback qrexec, in both forms.

A caller in qube "work" runs the loopback ``qrexec-client-vm @default
qubes.ConnectTCP+PORT`` (dom0's policy sends it to qube "web"), which finds
our service in web's qubes-rpc directory: the socket service (one trio
process, started by the fixture) or the executable (one process per call).
"""

import hashlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qconnect.loopback.machine import Machine
from qconnect.service.install import install, install_into_rpc_dir
from tests.conftest import recv_all
from tests.servers import HalfCloseServer, HttpServer
from tests.service_helpers import start_service_process

TIMEOUT = 60
POLICY = [
    "qubes.ConnectTCP * work @default allow target=web",
    "qubes.ConnectTCP * untrusted @default deny",
]


@dataclass
class Target:
    """A loopback machine whose qube "web" runs qubes.ConnectTCP in ``form``."""

    machine: Machine
    form: str
    log: Path

    def argv(self, argument: str, *options: str) -> list[str]:
        service = f"qubes.ConnectTCP+{argument}" if argument is not None else "qubes.ConnectTCP"
        return ["qrexec-client-vm", *options, "@default", service]

    def run(
        self, argument: str, data: bytes = b"", source: str = "work"
    ) -> "subprocess.CompletedProcess[bytes]":
        return self.machine.run(
            source, self.argv(argument), input=data, capture_output=True, timeout=TIMEOUT
        )

    def service_log(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def _start_socket_service(machine: Machine, log: Path) -> subprocess.Popen[bytes]:
    """Install as `qconnect service install --socket` does in web's root; run the daemon.

    The socket goes where systemd's socket unit would put it, the qube's
    /run/qubes-rpc, searched first.
    """
    root = machine.root_dir("web")
    install(root, "socket")
    path = root / "run/qubes-rpc/qubes.ConnectTCP"
    path.parent.mkdir(parents=True, exist_ok=True)
    return start_service_process(path, log)


@pytest.fixture(params=["socket", "exec"])
def target(
    request: pytest.FixtureRequest, loopback_machine: Callable[..., Machine], tmp_path: Path
) -> Iterator[Target]:
    machine = loopback_machine("work", "web", "untrusted", policy=POLICY)
    log = tmp_path / f"service-{request.param}.log"
    process = None
    if request.param == "socket":
        process = _start_socket_service(machine, log)
    else:
        install(machine.root_dir("web"), "exec")
    try:
        yield Target(machine, request.param, log)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(20)


def test_echo_and_http_servers_are_reachable(
    target: Target, echo_server: int, http_server: HttpServer
) -> None:
    result = target.run(str(echo_server), b"ping\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"ping\n", b"")
    request = b"GET / HTTP/1.0\r\nHost: web\r\n\r\n"
    result = target.run(str(http_server.port), request)
    assert result.returncode == 0
    assert result.stdout.startswith(b"HTTP/1.0 200") and result.stdout.endswith(http_server.body)
    if target.form == "socket":  # the executable logs to the journal only, absent here
        _wait_for(
            lambda: f"127.0.0.1:{http_server.port}: {len(request)} bytes in" in target.service_log()
        )
        assert f"call from work to 127.0.0.1:{echo_server}: 5 bytes in, 5 bytes out" in (
            target.service_log()
        )


def test_100_mib_each_way_arrive_byte_exact(target: Target, echo_server: int) -> None:
    """100 MiB up and the same 100 MiB echoed down, at once, compared by sha256."""
    block = hashlib.sha256(b"seed").digest() * 32768  # 1 MiB, not all one byte
    total = 100 * len(block)
    process = target.machine.popen(
        "work", target.argv(str(echo_server)), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdin is not None and process.stdout is not None
    sent = hashlib.sha256()

    def feed() -> None:
        assert process.stdin is not None
        for index in range(100):
            chunk = block[index:] + block[:index]  # every MiB different
            sent.update(chunk)
            process.stdin.write(chunk)
        process.stdin.close()

    feeder = threading.Thread(target=feed)
    feeder.start()
    got, size = hashlib.sha256(), 0
    while data := process.stdout.read(1 << 20):
        got.update(data)
        size += len(data)
    feeder.join()
    assert process.wait(TIMEOUT) == 0
    assert size == total and got.hexdigest() == sent.hexdigest()


def _stdin_socket_call(target: Target, port: int) -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = socket.socketpair()
    process = target.machine.popen(
        "work", target.argv(str(port), "--use-stdin-socket"), stdin=theirs
    )
    theirs.close()
    return process, ours


def test_client_half_close_then_a_reply_2_s_later_arrives(
    target: Target, half_close_server: HalfCloseServer
) -> None:
    half_close_server.reply_delay = 2.0
    process, caller = _stdin_socket_call(target, half_close_server.reply_after_eof_port)
    with caller:
        caller.sendall(b"request body")
        caller.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        reply = recv_all(caller)
        assert time.monotonic() - started >= 1.9
    assert reply == HalfCloseServer.summary(b"request body")
    assert process.wait(TIMEOUT) == 0


def test_server_half_close_reaches_client_which_can_still_send(
    target: Target, half_close_server: HalfCloseServer
) -> None:
    process, caller = _stdin_socket_call(target, half_close_server.writes_first_port)
    with caller:
        assert recv_all(caller) == HalfCloseServer.GREETING  # EOF arrived
        time.sleep(0.5)  # deliberate: the caller still sends a while after the server's EOF
        caller.sendall(b"sent after the server's EOF")
        caller.shutdown(socket.SHUT_WR)
        assert half_close_server.wait_received() == [b"sent after the server's EOF"]
    assert process.wait(TIMEOUT) == 0


def test_server_only_on_ipv6_loopback_is_reachable(
    target: Target, ipv6_only_echo_server: int
) -> None:
    result = target.run(str(ipv6_only_echo_server), b"over ::1")
    assert (result.returncode, result.stdout) == (0, b"over ::1")


BAD_ARGUMENTS = ["0", "65536", "080", "-1", "1+2", "", "9" * 200]


def test_bad_arguments_are_refused(target: Target) -> None:
    """0, 65536, 080, -1, 1+2, empty, 200 characters: each refused (one machine for all)."""
    for argument in BAD_ARGUMENTS:
        result = target.run(argument, b"data")
        assert result.stdout == b"", argument
        shown = repr(argument if len(argument) <= 40 else argument[:40] + "...")
        if target.form == "exec":
            assert result.returncode == 125, argument
            assert result.stderr.decode() == (
                f"qubes.ConnectTCP: invalid port argument {shown}: expected a decimal number "
                "from 1 to 65535 without sign or leading zero\n"
            )
        else:  # a socket service cannot set the exit code: closed without a byte, logged
            assert (result.returncode, result.stderr) == (0, b""), argument
            _wait_for(lambda shown=shown: f"invalid port argument {shown}" in target.service_log())
    if target.form == "socket":
        assert target.service_log().count("call from work to port") == len(BAD_ARGUMENTS)


def test_port_nobody_listens_on(target: Target) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]  # bound, not listening: refused
        result = target.run(str(port), b"data")
    reason = (
        f"cannot connect to port {port}: 127.0.0.1: connection refused; ::1: connection refused"
    )
    assert result.stdout == b""
    if target.form == "exec":
        assert result.returncode == 125
        assert result.stderr.decode() == f"qubes.ConnectTCP: {reason}\n"
    else:
        assert (result.returncode, result.stderr) == (0, b"")
        _wait_for(lambda: reason in target.service_log())


def test_policy_deny_is_refused_before_the_service(target: Target, echo_server: int) -> None:
    result = target.run(str(echo_server), b"data", source="untrusted")
    assert result.returncode == 126 and b"Request refused" in result.stderr
    assert result.stdout == b""
    assert "untrusted" not in target.service_log()


def test_executable_in_a_loopback_rpc_dir_overrides_the_stock_service(
    loopback_machine: Callable[..., Machine], echo_server: int
) -> None:
    machine = loopback_machine("work", "web", policy=POLICY)
    install_into_rpc_dir(machine.rpc_dir("web"), rpc_config_dir=machine.rpc_config_dir("web"))
    result = machine.run(
        "work",
        ["qrexec-client-vm", "@default", "qubes.ConnectTCP+080"],
        input=b"",
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 125 and b"invalid port argument '080'" in result.stderr


def test_missing_service_gives_127(
    loopback_machine: Callable[..., Machine], echo_server: int
) -> None:
    machine = loopback_machine("work", "web", policy=POLICY, stock_connect_tcp=False)
    result = machine.run(
        "work",
        ["qrexec-client-vm", "@default", f"qubes.ConnectTCP+{echo_server}"],
        input=b"",
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 127


def test_stopped_socket_service_leaves_no_dead_socket(
    loopback_machine: Callable[..., Machine], tmp_path: Path, echo_server: int
) -> None:
    """After SIGTERM the socket is gone, so qrexec falls back to the installed executable."""
    machine = loopback_machine("work", "web", policy=POLICY)
    process = _start_socket_service(machine, tmp_path / "service.log")
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0
    assert not (machine.root_dir("web") / "run/qubes-rpc/qubes.ConnectTCP").exists()
    result = machine.run(
        "work",
        ["qrexec-client-vm", "@default", f"qubes.ConnectTCP+{echo_server}"],
        input=b"stock",
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert (result.returncode, result.stdout) == (0, b"stock")


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.mark.slow
def test_500_concurrent_calls_through_the_loopback_are_served_by_one_process(
    loopback_machine: Callable[..., Machine], tmp_path: Path, echo_server: int
) -> None:
    """Four calling qubes, 125 calls each (qrexec allows 128 per qube), all open at once."""
    callers = [f"caller{index}" for index in range(4)]
    machine = loopback_machine(
        "web",
        *callers,
        policy=[f"qubes.ConnectTCP * {c} @default allow target=web" for c in callers],
    )
    log = tmp_path / "service.log"
    service = _start_socket_service(machine, log)
    calls = []
    try:
        for index in range(500):
            ours, theirs = socket.socketpair()
            process = machine.popen(
                callers[index % 4],
                [
                    "qrexec-client-vm",
                    "--use-stdin-socket",
                    "@default",
                    f"qubes.ConnectTCP+{echo_server}",
                ],
                stdin=theirs,
            )
            theirs.close()
            calls.append((process, ours))
        for index, (_process, sock) in enumerate(calls):
            sock.sendall(f"{index:04d}".encode())
            assert sock.recv(10) == f"{index:04d}".encode()
        assert len(list(Path(f"/proc/{service.pid}/task").iterdir())) == 1
        for process, sock in calls:
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b""
            sock.close()
            assert process.wait(TIMEOUT) == 0
        _wait_for(lambda: log.read_text().count(" bytes in, ") >= 500, timeout=30)
    finally:
        for process, sock in calls:
            sock.close()
            if process.poll() is None:
                process.kill()
                process.wait()
        service.send_signal(signal.SIGTERM)
        service.wait(20)
    text = log.read_text()
    for caller in callers:
        assert text.count(f"call from {caller} to 127.0.0.1:{echo_server}: 4 bytes in") == 125
