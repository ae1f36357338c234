"""Unix sockets at paths longer than sockaddr_un: bound and reached all the same."""

import socket
from pathlib import Path

import pytest

from qconnect.core.unixpath import SUN_PATH_MAX, bind_unix, connect_unix


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
