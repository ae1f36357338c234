"""qconnect.core.relay.blocking: the standard-library relay the per-call processes copy with."""

import errno
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from qconnect.core.relay import blocking
from tests.conftest import recv_all, tcp_pair

TIMEOUT = 20


@pytest.fixture
def pairs() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def test_two_sockets_relay_both_ways_and_count(pairs: list[socket.socket]) -> None:
    user, first = tcp_pair()
    second, server = tcp_pair()
    pairs.extend([user, first, second, server])
    result: list[blocking.RelayCounts] = []
    thread = threading.Thread(
        target=lambda: result.append(
            blocking.relay_fds(first.fileno(), first.fileno(), second.fileno())
        )
    )
    thread.start()
    request = os.urandom(3 << 20)
    user.sendall(request)
    user.shutdown(socket.SHUT_WR)
    assert recv_all(server) == request
    server.sendall(b"reply after the request's EOF")
    server.shutdown(socket.SHUT_WR)
    assert recv_all(user) == b"reply after the request's EOF"
    thread.join(TIMEOUT)
    assert result == [blocking.RelayCounts(len(request), 29, None)]


def test_two_sockets_server_half_close_lets_the_client_keep_sending(
    pairs: list[socket.socket],
) -> None:
    user, first = tcp_pair()
    second, server = tcp_pair()
    pairs.extend([user, first, second, server])
    thread = threading.Thread(
        target=blocking.relay_fds, args=(first.fileno(), first.fileno(), second.fileno())
    )
    thread.start()
    server.sendall(b"greeting")
    server.shutdown(socket.SHUT_WR)
    assert recv_all(user) == b"greeting"
    user.sendall(b"sent after the server's EOF")
    user.shutdown(socket.SHUT_WR)
    assert recv_all(server) == b"sent after the server's EOF"
    thread.join(TIMEOUT)
    assert not thread.is_alive()


RELAY_PROGRAM = """
import socket, sys
from qconnect.core.relay import blocking
peer = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
counts = blocking.relay_fds(0, 1, peer.fileno())
print(counts.outbound, counts.inbound, counts.error, file=sys.stderr)
"""


@pytest.mark.parametrize("shape", ["pipes", "socketpairs"])
def test_relay_fds_as_an_executable_service_with_half_close(
    pairs: list[socket.socket], shape: str
) -> None:
    """stdin/stdout as pipes (a shell) or socketpairs (qrexec-agent): EOF each way alone."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        if shape == "pipes":
            stdin_arg: int = subprocess.PIPE
            stdout_arg: int = subprocess.PIPE
        else:
            in_ours, in_theirs = socket.socketpair()
            out_ours, out_theirs = socket.socketpair()
            pairs.extend([in_ours, in_theirs, out_ours, out_theirs])
            stdin_arg, stdout_arg = in_theirs.fileno(), out_theirs.fileno()
        process = subprocess.Popen(
            [sys.executable, "-c", RELAY_PROGRAM, str(listener.getsockname()[1])],
            stdin=stdin_arg,
            stdout=stdout_arg,
            stderr=subprocess.PIPE,
        )
        server, _ = listener.accept()
    pairs.append(server)
    payload = os.urandom(1 << 20)
    if shape == "pipes":
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(payload)
        process.stdin.close()
        assert recv_all(server) == payload
        server.sendall(b"late reply")
        server.shutdown(socket.SHUT_WR)
        assert process.stdout.read() == b"late reply"
        process.stdout.close()
    else:
        in_theirs.close()
        out_theirs.close()
        in_ours.sendall(payload)
        in_ours.shutdown(socket.SHUT_WR)
        assert recv_all(server) == payload
        server.sendall(b"late reply")
        server.shutdown(socket.SHUT_WR)
        assert recv_all(out_ours) == b"late reply"
    assert process.wait(TIMEOUT) == 0
    assert process.stderr is not None
    stderr = process.stderr.read()
    process.stderr.close()
    assert stderr.decode().split() == [str(len(payload)), "10", "None"]


def test_pump_reports_a_vanished_reader_as_write_failed(pairs: list[socket.socket]) -> None:
    source_write, source_read = socket.socketpair()
    sink, sink_peer = socket.socketpair()
    pairs.extend([source_write, source_read, sink, sink_peer])
    sink_peer.close()
    source_write.sendall(b"nobody reads this")
    with pytest.raises(blocking.WriteFailed) as error:
        blocking.pump(source_read.fileno(), sink.fileno())
    assert blocking.is_peer_gone(error.value)


def test_pump_reports_a_reset_source_as_read_failed(pairs: list[socket.socket]) -> None:
    near, far = tcp_pair()
    sink, sink_peer = socket.socketpair()
    pairs.extend([near, far, sink, sink_peer])
    far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    far.close()  # linger 0: the close sends RST, not FIN
    with pytest.raises(blocking.ReadFailed) as error:
        blocking.pump(near.fileno(), sink.fileno())
    assert blocking.is_peer_gone(error.value)


def test_pump_falls_back_when_splice_cannot_be_used(tmp_path: "os.PathLike[str]") -> None:
    """An O_APPEND file refuses splice; the copy goes through read/write instead."""
    source = os.path.join(tmp_path, "source")
    target = os.path.join(tmp_path, "target")
    data = os.urandom(700_000)
    with open(source, "wb") as file:
        file.write(data)
    with open(target, "wb") as file:
        file.write(b"head:")
    source_fd = os.open(source, os.O_RDONLY)
    target_fd = os.open(target, os.O_WRONLY | os.O_APPEND)
    try:
        assert blocking.pump(source_fd, target_fd) == len(data)
    finally:
        os.close(source_fd)
        os.close(target_fd)
    with open(target, "rb") as file:
        assert file.read() == b"head:" + data


NO_PIPE_ERRNOS = [errno.EMFILE, errno.ENFILE, errno.ENOMEM]


@pytest.mark.parametrize("code", NO_PIPE_ERRNOS, ids=errno.errorcode.get)
def test_pump_copies_without_splice_when_no_pipe_can_be_had(
    pairs: list[socket.socket], monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """No descriptor left for a pipe is no reason to fail the call: read/write needs none."""

    def no_pipe(*_args: int) -> tuple[int, int]:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "pipe", no_pipe)
    monkeypatch.setattr(os, "pipe2", no_pipe)
    user, first = tcp_pair()
    second, server = tcp_pair()
    pairs.extend([user, first, second, server])
    data = os.urandom(1 << 20)
    sender = threading.Thread(target=lambda: (user.sendall(data), user.shutdown(socket.SHUT_WR)))
    sender.start()
    received: list[bytes] = []
    receiver = threading.Thread(target=lambda: received.append(recv_all(server)))
    receiver.start()
    assert blocking.pump(first.fileno(), second.fileno()) == len(data)
    second.shutdown(socket.SHUT_WR)
    sender.join(TIMEOUT)
    receiver.join(TIMEOUT)
    assert received == [data]


def test_a_crash_in_the_relays_thread_is_raised_to_the_caller_not_printed(
    pairs: list[socket.socket],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A per-call service's stderr is its caller's: a thread's traceback would reach it."""
    service_side, caller_side = socket.socketpair()  # stdin and stdout, as one socket
    server, peer = tcp_pair()
    pairs.extend([service_side, caller_side, server, peer])
    real_pump = blocking.pump

    def pump(src_fd: int, dst_fd: int, progress: list[int] | None = None) -> int:
        if src_fd == service_side.fileno():
            raise RuntimeError("a bug in the upload")
        return real_pump(src_fd, dst_fd, progress)

    monkeypatch.setattr(blocking, "pump", pump)
    server.sendall(b"reply")
    server.shutdown(socket.SHUT_WR)
    with pytest.raises(RuntimeError, match="a bug in the upload"):
        blocking.relay_fds(service_side.fileno(), service_side.fileno(), peer.fileno())
    assert capfd.readouterr().err == ""


def test_shut_write_closes_a_pipe_and_shuts_down_a_socket(pairs: list[socket.socket]) -> None:
    read_end, write_end = os.pipe()
    blocking.shut_write(write_end)
    assert os.read(read_end, 1) == b""
    os.close(read_end)
    near, far = socket.socketpair()
    pairs.extend([near, far])
    blocking.shut_write(near.fileno())
    assert far.recv(1) == b""
    far.sendall(b"the other way still works")
    assert near.recv(100) == b"the other way still works"


def test_blocking_relay_imports_neither_trio_nor_dataclasses() -> None:
    """Every per-call executable pays for what the blocking relay imports (inspect: ~10 ms)."""
    probe = (
        "import sys, qconnect.core.relay.blocking; "
        "print('trio' in sys.modules or 'dataclasses' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    assert result.stdout == "False\n"
