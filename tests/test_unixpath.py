"""Unix sockets at paths longer than sockaddr_un, and listening ones with an exact mode."""

import errno
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qconnect.core.unixpath import SUN_PATH_MAX, bind_unix, connect_unix, listen_unix


@pytest.mark.parametrize("depth", [1, 12])
def test_bind_and_connect_at_any_path_length(tmp_path: Path, depth: int) -> None:
    directory = tmp_path.joinpath(*["d" * 9] * depth)
    directory.mkdir(parents=True)
    path = str(directory / "control.sock")
    assert (len(path) > SUN_PATH_MAX) == (depth == 12)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        bind_unix(server, path)
        server.listen(1)
        assert Path(path).is_socket()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            connect_unix(client, path)
            accepted, _ = server.accept()
            with accepted:
                client.sendall(b"ping")
                assert accepted.recv(4) == b"ping"


def test_missing_socket_raises_like_connect(tmp_path: Path) -> None:
    long_dir = tmp_path.joinpath(*["d" * 9] * 12)
    long_dir.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client, pytest.raises(OSError):
        connect_unix(client, str(long_dir / "absent.sock"))


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """Set the process's umask for one test, and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("depth", [1, 12])
@pytest.mark.parametrize(
    ("mode", "process_umask"), [(0o600, 0o000), (0o660, 0o077), (0o666, 0o022)]
)
def test_listen_unix_gives_the_socket_file_its_mode_whatever_the_umask(
    tmp_path: Path, depth: int, mode: int, process_umask: int, umask: Callable[[int], int]
) -> None:
    directory = tmp_path.joinpath(*["d" * 9] * depth)
    directory.mkdir(parents=True)
    path = str(directory / "control.sock")
    umask(process_umask)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        listen_unix(server, path, mode=mode, backlog=4)
        assert umask(process_umask) == process_umask  # never changed, not even for a moment
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == mode
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            connect_unix(client, path)  # listening already: no listen() left to the caller
            accepted, _ = server.accept()
            accepted.close()


def test_listen_unix_never_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "taken.sock"
    path.write_text("someone's file")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server,
        pytest.raises(OSError) as raised,
    ):
        listen_unix(server, str(path), mode=0o600, backlog=4)
    assert raised.value.errno == errno.EADDRINUSE
    assert path.read_text() == "someone's file"


def test_a_socket_file_that_cannot_listen_is_removed_again(tmp_path: Path) -> None:
    path = tmp_path / "datagram.sock"
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as datagram,
        pytest.raises(OSError) as raised,
    ):
        listen_unix(datagram, str(path), mode=0o600, backlog=4)  # datagram sockets never listen
    assert raised.value.errno == errno.EOPNOTSUPP
    assert not path.exists()
