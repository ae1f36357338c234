"""Reading whether a call was accepted from real sockets' counters (qconnect.client.acceptance).

Each test plays qrexec-client-vm by hand on a real loopback TCP pair (handoff
mode: it owns the accepted socket) or a real socketpair (relay mode: its
stdin), and reads the progress through a duplicate, as the client does.
"""

import select
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from qconnect.client.acceptance import (
    Progress,
    Verdict,
    judge,
    relay_progress,
    still_hung,
    tcp_progress,
)
from tests.conftest import tcp_pair

# How long the kernel may take to move bytes across loopback on a loaded machine.
SETTLE = 2.0


def reading_when(sock: socket.socket, ready: Callable[[Progress], bool]) -> Progress:
    """Read until ``ready`` holds (loopback delivery is asynchronous), at most SETTLE s."""
    deadline = time.monotonic() + SETTLE
    while True:
        reading = tcp_progress(sock)
        if ready(reading) or time.monotonic() > deadline:
            return reading
        time.sleep(0.01)


@pytest.fixture
def handed_off() -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    """(user's client, accepted socket as qrexec-client-vm holds it, our duplicate)."""
    client, accepted = tcp_pair()
    watched = accepted.dup()
    try:
        yield client, accepted, watched
    finally:
        for sock in (client, accepted, watched):
            sock.close()


def test_a_fresh_connection_is_idle(handed_off: tuple[socket.socket, ...]) -> None:
    _, _, watched = handed_off
    reading = tcp_progress(watched)
    assert reading == Progress(consumed=0, waiting=0, returned=0, moved=0)
    assert judge(reading) is Verdict.IDLE


def test_bytes_sent_and_unread_make_a_suspect(handed_off: tuple[socket.socket, ...]) -> None:
    client, _, watched = handed_off
    client.sendall(b"GET / HTTP/1.0\r\n\r\n")
    reading = reading_when(watched, lambda r: r.waiting == 18)
    assert reading == Progress(consumed=0, waiting=18, returned=0, moved=18)
    assert judge(reading) is Verdict.SUSPECT


def test_one_byte_read_by_the_call_means_accepted(handed_off: tuple[socket.socket, ...]) -> None:
    client, accepted, watched = handed_off
    client.sendall(b"hello")
    reading_when(watched, lambda r: r.waiting == 5)
    assert accepted.recv(1) == b"h"
    reading = tcp_progress(watched)
    assert (reading.consumed, reading.waiting) == (1, 4)
    assert judge(reading) is Verdict.ACCEPTED


def test_a_reply_from_the_call_means_accepted(handed_off: tuple[socket.socket, ...]) -> None:
    """A server that speaks first: the client sent nothing, the call wrote a greeting."""
    _, accepted, watched = handed_off
    accepted.sendall(b"220 ready\r\n")
    reading = reading_when(watched, lambda r: r.returned > 0)
    assert reading.returned == len(b"220 ready\r\n")
    assert judge(reading) is Verdict.ACCEPTED


def test_the_clients_eof_is_not_a_byte_read(handed_off: tuple[socket.socket, ...]) -> None:
    """tcpi_bytes_received counts the peer's FIN; nobody can read it, so it is not consumption."""
    client, _, watched = handed_off
    client.sendall(b"abc")
    client.shutdown(socket.SHUT_WR)
    reading = reading_when(watched, lambda r: r.moved == 3 and r.waiting == 3)
    assert judge(reading) is Verdict.SUSPECT
    assert reading.consumed == 0


def test_an_eof_alone_is_idle(handed_off: tuple[socket.socket, ...]) -> None:
    client, _, watched = handed_off
    client.shutdown(socket.SHUT_WR)
    # the event: the EOF has arrived (the socket turns readable; nothing is read)
    assert select.select([watched], [], [], SETTLE)[0] == [watched]
    assert judge(tcp_progress(watched)) is Verdict.IDLE


def test_relay_progress_reads_the_childs_stdin_queue() -> None:
    ours, theirs = socket.socketpair()
    watched = theirs.dup()
    with ours, theirs, watched:
        ours.sendall(b"x" * 1000)
        before = relay_progress(1000, watched, 0)
        assert before == Progress(consumed=0, waiting=1000, returned=0, moved=2000)
        assert judge(before) is Verdict.SUSPECT
        assert theirs.recv(10) == b"x" * 10
        after = relay_progress(1000, watched, 0)
        assert (after.consumed, after.waiting) == (10, 990)
        assert judge(after) is Verdict.ACCEPTED


def test_relay_chunk_in_flight_is_not_taken_for_consumption() -> None:
    """The relay counts a chunk only once it is all in: queued bytes beyond the count are unread."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(b"y" * 500)  # 300 counted as delivered, 200 of the next chunk already in
        assert judge(relay_progress(300, theirs, 0)) is Verdict.SUSPECT


@pytest.mark.parametrize(
    ("first", "second", "hung"),
    [
        (Progress(0, 5, 0, 5), Progress(0, 5, 0, 5), True),
        (Progress(0, 5, 0, 5), Progress(0, 9, 0, 9), False),  # more just arrived: look again
        (Progress(0, 5, 0, 5), Progress(5, 0, 0, 5), False),  # accepted at the last moment
        (Progress(0, 5, 0, 5), Progress(0, 5, 1, 5), False),  # it answered
        (Progress(0, 0, 0, 0), Progress(0, 0, 0, 0), False),  # idle is never hung
    ],
)
def test_hung_needs_two_equal_suspect_readings(
    first: Progress, second: Progress, hung: bool
) -> None:
    assert still_hung(first, second) is hung
