"""Hostile input to the executable service (rpc-services/qubes.ConnectTCP), run as qrexec runs it:
argv[1] = the argument, QREXEC_* in the environment, stdin/stdout = the caller's stream
(socketpairs, as qrexec-agent gives them).
"""

import hashlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qconnect.core.qrexec import EXIT_QREXEC_PROBLEM
from tests.servers import ThreadedTCPServer

SERVICE = Path(__file__).resolve().parent.parent / "rpc-services" / "qubes.ConnectTCP"

# Every argument qrexec's port rule refuses (digits only, no sign, no leading
# zero, 1..65535), including what a shell or int() would have accepted.
MALFORMED = [
    "",
    "0",
    "65536",
    "99999999999999999999",
    "080",
    "-1",
    "+80",
    "1+2",
    "0x50",
    "1e2",
    " 80",
    "80 ",
    "8_0",
    "\u0663",  # ARABIC-INDIC DIGIT THREE: int() accepts it
    "80\n",
    "../80",
    "$(id)",
    "9" * 200,
]

HUGE = 64 << 20  # bytes of "huge stdin"


def env(argument: str) -> dict[str, str]:
    environ = dict(os.environ)
    environ.update(
        QREXEC_REMOTE_DOMAIN="work",
        QREXEC_SERVICE_ARGUMENT=argument,
        QREXEC_SERVICE_FULL_NAME=f"qubes.ConnectTCP+{argument}",
        QCONNECT_ALLOW_FILE=os.devnull + ".absent",
    )
    return environ


def start(argument: str) -> tuple["subprocess.Popen[bytes]", socket.socket]:
    """The service with stdin and stdout on one end of a socketpair; the other end is ours."""
    ours, theirs = socket.socketpair()
    argv = [sys.executable, str(SERVICE)] + ([argument] if argument else [])
    process = subprocess.Popen(
        argv, stdin=theirs, stdout=theirs, stderr=subprocess.PIPE, env=env(argument)
    )
    theirs.close()
    return process, ours


@pytest.mark.parametrize("argument", MALFORMED)
def test_every_malformed_argument_exits_125_with_one_line_naming_it(argument: str) -> None:
    process, ours = start(argument)
    with ours:
        ours.settimeout(30)
        assert ours.recv(1) == b""  # not a byte relayed
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == EXIT_QREXEC_PROBLEM
    lines = stderr.decode(errors="replace").splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert "invalid port argument" in lines[0] and "expected a decimal number" in lines[0]
    if len(argument) < 20 and argument.isprintable():
        assert repr(argument) in lines[0], lines


@pytest.fixture
def sink() -> Iterator[tuple[int, list[bytes]]]:
    """Counts and hashes what arrives; answers ``N sha256`` after EOF."""
    results: list[bytes] = []

    def handle(conn: socket.socket) -> None:
        digest, count = hashlib.sha256(), 0
        while data := conn.recv(1 << 20):
            digest.update(data)
            count += len(data)
        reply = f"{count} {digest.hexdigest()}".encode()
        results.append(reply)
        conn.sendall(reply)

    server = ThreadedTCPServer(handle)
    try:
        yield server.port, results
    finally:
        server.close()


def test_huge_stdin_arrives_byte_exact(sink: tuple[int, list[bytes]]) -> None:
    port, _ = sink
    process, ours = start(str(port))
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    with ours:
        for _ in range(HUGE >> 20):
            ours.sendall(block)
            digest.update(block)
        ours.shutdown(socket.SHUT_WR)
        ours.settimeout(60)
        reply = b""
        while data := ours.recv(4096):
            reply += data
    process.communicate(timeout=60)
    assert reply == f"{HUGE} {digest.hexdigest()}".encode()
    assert process.returncode == 0


def test_stdout_closed_early_ends_the_call_without_a_traceback() -> None:
    """The caller stops reading and goes away while the server still sends."""
    stop = threading.Event()

    def firehose(conn: socket.socket) -> None:
        block = b"\xa5" * 65536
        while not stop.is_set():
            conn.sendall(block)

    server = ThreadedTCPServer(firehose)
    try:
        process, ours = start(str(server.port))
        ours.recv(65536)  # the stream is up
        ours.close()  # stdout's reader is gone (and stdin sees EOF)
        _, stderr = process.communicate(timeout=30)
    finally:
        stop.set()
        server.close()
    assert "Traceback" not in stderr.decode(errors="replace")
    assert len(stderr.splitlines()) <= 1
