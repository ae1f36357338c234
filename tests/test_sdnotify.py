"""sd_notify for every daemon: what reaches a real NOTIFY_SOCKET, in each of its forms."""

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qconnect.core.sdnotify import notify


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket at a path, given as NOTIFY_SOCKET, as systemd gives its own."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket in the abstract namespace, given as ``@NAME`` (systemd's own form)."""
    name = f"qconnect-test-notify-{os.getpid()}-{os.urandom(6).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def test_ready_and_status_reach_a_socket_at_a_path(path_socket: socket.socket) -> None:
    assert notify("serving 2 binding(s)", ready=True)
    assert path_socket.recv(4096) == b"READY=1\nSTATUS=serving 2 binding(s)"


def test_ready_and_status_reach_an_abstract_socket(abstract_socket: socket.socket) -> None:
    assert notify("3 calls open", ready=True)
    assert abstract_socket.recv(4096) == b"READY=1\nSTATUS=3 calls open"


def test_stopping_and_a_bare_status_are_sent_alone(abstract_socket: socket.socket) -> None:
    assert notify(stopping=True)
    assert abstract_socket.recv(4096) == b"STOPPING=1"
    assert notify("1 open")
    assert abstract_socket.recv(4096) == b"STATUS=1 open"


def test_a_newline_in_the_status_cannot_forge_another_assignment(
    path_socket: socket.socket,
) -> None:
    assert notify("serving evil\nREADY=1\x1b[2J")
    message = path_socket.recv(4096).decode()
    assert message.splitlines() == ["STATUS=serving evil\\nREADY=1\\x1b[2J"]


def test_nothing_is_sent_without_a_notify_socket(
    path_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify("x", ready=True)
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert not notify("x", ready=True)
    path_socket.setblocking(False)
    with pytest.raises(BlockingIOError):
        path_socket.recv(4096)


@pytest.mark.parametrize("address", ["@qconnect-test-nobody-listens", "/nonexistent/notify"])
def test_a_service_manager_that_cannot_be_told_is_not_an_error(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert not notify("x", ready=True)


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_any_status_text_arrives_as_one_printable_status_line(text: str) -> None:
    name = f"qconnect-test-notify-{os.getpid()}-{os.urandom(6).hex()}"
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
        pytest.MonkeyPatch.context() as monkeypatch,
    ):
        sock.bind("\0" + name)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify(text, ready=True)
        lines = sock.recv(65536).decode().split("\n")
    assert lines[0] == "READY=1"
    assert len(lines) == 2 and lines[1].startswith("STATUS=")
    assert lines[1].isprintable()
