"""The executable qubes.ConnectTCP: a real process per call, stdin/stdout as qrexec gives them."""

import errno
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qconnect.service.install import install_into_rpc_dir
from tests.conftest import recv_all, write_executable


@pytest.fixture(scope="module")
def service_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_into_rpc_dir(tmp_path_factory.mktemp("rpc"))


def _env(argument: str, caller: str = "work", **extra: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "QREXEC_REMOTE_DOMAIN": caller}
    env["QREXEC_SERVICE_ARGUMENT"] = argument
    env["QREXEC_SERVICE_FULL_NAME"] = f"qubes.ConnectTCP+{argument}"
    env["QCONNECT_ALLOW_FILE"] = "/nonexistent/connecttcp.allow"
    env.update(extra)
    return env


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock


def _start_over_socket(
    exe: Path, argument: str, **extra: str
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start the service with stdin and stdout one socket, as a socket-based qrexec does."""
    ours, theirs = socket.socketpair()
    argv = [str(exe), argument] if argument else [str(exe)]
    process = subprocess.Popen(
        argv, stdin=theirs, stdout=theirs, stderr=subprocess.PIPE, env=_env(argument, **extra)
    )
    theirs.close()
    return process, ours


def test_client_half_close_and_late_reply_over_one_socket(
    service_exe: Path, listening: socket.socket
) -> None:
    port = listening.getsockname()[1]
    process, caller = _start_over_socket(service_exe, str(port))
    server, _ = listening.accept()
    caller.sendall(b"question")
    caller.shutdown(socket.SHUT_WR)
    assert recv_all(server) == b"question"
    time.sleep(0.5)  # deliberate: a reply that comes late is the behaviour under test
    server.sendall(b"late reply")
    server.close()
    assert recv_all(caller) == b"late reply"
    assert process.wait(10) == 0
    caller.close()


def test_server_half_close_reaches_caller_who_can_still_send(
    service_exe: Path, listening: socket.socket
) -> None:
    port = listening.getsockname()[1]
    process, caller = _start_over_socket(service_exe, str(port))
    server, _ = listening.accept()
    server.sendall(b"banner")
    server.shutdown(socket.SHUT_WR)
    assert recv_all(caller) == b"banner"  # EOF reached us, not a close of the whole call
    time.sleep(0.3)  # deliberate: the caller still sends a while after the server's EOF
    caller.sendall(b"still talking")
    caller.shutdown(socket.SHUT_WR)
    assert recv_all(server) == b"still talking"
    server.close()
    assert process.wait(10) == 0
    caller.close()


def test_pipes_carry_bytes_both_ways(service_exe: Path, listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    payload = os.urandom(3 * 1024 * 1024)
    process = subprocess.Popen(
        [str(service_exe), str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(str(port)),
    )
    server, _ = listening.accept()

    def serve() -> None:
        data = recv_all(server)
        server.sendall(data[::-1])
        server.close()

    thread = threading.Thread(target=serve)
    thread.start()
    out, err = process.communicate(payload, timeout=30)
    thread.join()
    assert out == payload[::-1] and process.returncode == 0, err


def test_ipv6_only_server_is_reached(service_exe: Path) -> None:
    with socket.socket(socket.AF_INET6) as listener:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind(("::1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        process, caller = _start_over_socket(service_exe, str(port))
        server, _ = listener.accept()
        server.sendall(b"v6")
        server.close()
        assert recv_all(caller) == b"v6"
        caller.shutdown(socket.SHUT_WR)
        assert process.wait(10) == 0
        caller.close()


def _run(exe: Path, argument: str, **extra: str) -> subprocess.CompletedProcess[bytes]:
    argv = [str(exe), argument] if argument else [str(exe)]
    return subprocess.run(
        argv, input=b"", capture_output=True, env=_env(argument, **extra), timeout=30, check=False
    )


@pytest.mark.parametrize("argument", ["0", "65536", "080", "-1", "1+2", "", "1" * 200])
def test_bad_argument_prints_one_line_and_exits_125(service_exe: Path, argument: str) -> None:
    result = _run(service_exe, argument)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 125 and result.stdout == b""
    assert len(lines) == 1 and lines[0].startswith("qubes.ConnectTCP: invalid port argument")
    assert "expected a decimal number from 1 to 65535" in lines[0]


def test_unreachable_port_names_port_and_both_addresses(service_exe: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        result = _run(service_exe, str(port))
    assert result.returncode == 125
    assert result.stderr.decode() == (
        f"qubes.ConnectTCP: cannot connect to port {port}: 127.0.0.1: connection refused; "
        "::1: connection refused\n"
    )


def test_allowlist_refusal_exits_126_with_one_generic_line(
    service_exe: Path, tmp_path: Path, listening: socket.socket
) -> None:
    """The caller learns its port was refused, never the file, its lines or other qubes."""
    port = listening.getsockname()[1]
    allow = tmp_path / "connecttcp.allow"
    generic = f"qubes.ConnectTCP: port {port} is not served by this qube's allowlist\n"
    allow.write_text(f"{port} dev\n")
    result = _run(service_exe, str(port), caller="work", QCONNECT_ALLOW_FILE=str(allow))
    assert (result.returncode, result.stderr.decode()) == (126, generic)
    allow.write_text("80 @bad\n")
    result = _run(service_exe, str(port), caller="dev", QCONNECT_ALLOW_FILE=str(allow))
    assert (result.returncode, result.stderr.decode()) == (126, generic)


def test_executable_does_not_import_trio(service_exe: Path) -> None:
    code = (
        "import sys, runpy\n"
        f"sys.argv = [{str(service_exe)!r}, '0']\n"
        "try:\n"
        f"    runpy.run_path({str(service_exe)!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('trio' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env("0")
    )
    assert result.stdout.strip() == "False"


# Runs a program as on a qube booted with ipv6.disable=1: socket(AF_INET6) fails.
WITHOUT_IPV6 = """
import errno, os, runpy, socket, sys
_real_init = socket.socket.__init__
def _without_ipv6(self, family=-1, type=-1, proto=-1, fileno=None):
    if fileno is None and family == socket.AF_INET6:
        raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
    _real_init(self, family, type, proto, fileno)
socket.socket.__init__ = _without_ipv6
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_kernel_without_ipv6_is_an_unreachable_address_not_a_traceback(service_exe: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: 127.0.0.1 refuses
        result = subprocess.run(
            [sys.executable, "-c", WITHOUT_IPV6, str(service_exe), str(port)],
            input=b"",
            capture_output=True,
            env=_env(str(port)),
            timeout=30,
            check=False,
        )
    assert (result.returncode, result.stderr.decode()) == (
        125,
        f"qubes.ConnectTCP: cannot connect to port {port}: 127.0.0.1: connection refused; "
        "::1: address family not supported by protocol\n",
    )


def test_an_unforeseen_error_is_one_line_and_125_with_the_details_in_the_journal(
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    listening: socket.socket,
) -> None:
    """No traceback reaches the caller: it would show the target's installation."""
    from qconnect.service import execservice

    def no_thread(*_args: object) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(execservice, "relay_fds", no_thread)
    journal: list[tuple[str, dict[str, object]]] = []
    port = str(listening.getsockname()[1])
    code = execservice.serve(
        port, "work", allow_files=(), log=lambda m, f: journal.append((m, dict(f)))
    )
    out, err = capfd.readouterr()
    assert (code, out, err) == (125, "", f"qubes.ConnectTCP: {execservice.INTERNAL_ERROR}\n")
    [(message, fields)] = journal
    assert message == f"work -> '{port}': internal error: RuntimeError: can't start new thread"
    assert "Traceback" in str(fields["traceback"]) and "no_thread" in str(fields["traceback"])


def test_a_removed_installation_is_one_line_and_125(service_exe: Path, tmp_path: Path) -> None:
    text = service_exe.read_text()
    broken = tmp_path / "qubes.ConnectTCP"
    first, rest = text.split("\n", 1)
    # As if qconnect were uninstalled under the script: nothing to import.
    rest = "\n".join(
        "SEARCH_PATH: list[str] = ['/nonexistent']" if line.startswith("SEARCH_PATH") else line
        for line in rest.splitlines()
    )
    write_executable(broken, f"{first}\n{rest}\n")
    result = _run(broken, "80")
    assert (result.returncode, result.stdout, result.stderr.decode()) == (
        125,
        b"",
        "qubes.ConnectTCP: internal error; the target qube's journal has the details\n",
    )


@pytest.mark.parametrize(
    "code",
    [errno.EAFNOSUPPORT, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS],
    ids=errno.errorcode.get,
)
def test_no_socket_to_be_had_is_one_line_and_125(
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    listening: socket.socket,
    code: int,
) -> None:
    from qconnect.service import execservice

    real_socket = socket.socket

    def no_socket(family: int = -1, *args: object, **kwargs: object) -> socket.socket:
        if family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(code, os.strerror(code))
        return real_socket(family, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(execservice.socket, "socket", no_socket)
    journal: list[str] = []
    port = listening.getsockname()[1]
    result = execservice.serve(
        str(port), "work", allow_files=(), log=lambda message, _fields: journal.append(message)
    )
    _out, err = capfd.readouterr()
    reason = os.strerror(code).lower()
    if code == errno.EAFNOSUPPORT:  # neither family: both addresses unreachable
        line = f"cannot connect to port {port}: 127.0.0.1: {reason}; ::1: {reason}"
    else:
        line = f"cannot open a socket for port {port}: {reason}"
    assert (result, err) == (125, f"qubes.ConnectTCP: {line}\n")
    assert journal == [f"work -> '{port}': {line}"]
