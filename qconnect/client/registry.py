"""The registry of running bindings: one control socket per client process.

Every ``qvm-connect-tcp`` process listens on ``RUNTIME/client/PID.sock``
(a unix stream socket, mode 0600 in a 0700 directory). ``qconnect list``
and ``qconnect stop`` connect to each, send one request line and read one
JSON line back, so what they show is the process's own live state, never a
stale file. A socket nobody answers on is a dead process's leftover and is
removed. Standard library only: ``qconnect list`` does not import trio.

Requests: ``status``, ``stop`` (every binding of the process), ``stop SPEC``
(one binding; the process exits when it has none left). The answer to each
is the status object::

    {"pid": 1234, "started": 1764318000.0, "mode": "handoff", "systemd": false,
     "log": "/run/user/1000/qconnect/client/1234.log",
     "bindings": [{"spec": "127.0.0.1:8080:web:80", "open": 2, "max": 64,
                   "served": 40, "refused": 1, "stopping": false}]}
"""

import contextlib
import errno
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

from qconnect.client.errors import ClientError
from qconnect.unixpath import connect_unix

#: Environment variable that moves the runtime directory (tests, loopback qubes).
RUNTIME_DIR_ENV = "QCONNECT_RUNTIME_DIR"

#: Largest request or answer on a control socket. A status names at most a
#: few dozen bindings; anything longer is not from one of ours.
MAX_MESSAGE = 64 * 1024

#: How long ``list``/``stop`` wait for a process to answer. A live client
#: answers in milliseconds; a stuck one must not hang ``qconnect list``.
QUERY_TIMEOUT = 3.0

SOCKET_SUFFIX = ".sock"


#: Set by a loopback machine in the processes "inside" one of its qubes
#: (qconnect.loopback.layout): each loopback qube gets its own /run, so
#: ``qconnect list`` in one qube does not show another qube's bindings.
LOOPBACK_MACHINE_ENV = "QCONNECT_LOOPBACK_MACHINE"
LOOPBACK_QUBE_ENV = "QCONNECT_LOOPBACK_QUBE"


def runtime_dir() -> Path:
    """Where this user's bindings register: root's in /run, a user's in XDG_RUNTIME_DIR."""
    override = os.environ.get(RUNTIME_DIR_ENV)
    if override:
        return Path(override).absolute() / "client"
    machine, qube = os.environ.get(LOOPBACK_MACHINE_ENV), os.environ.get(LOOPBACK_QUBE_ENV)
    if machine and qube:
        return Path(machine).absolute() / "qubes" / qube / "root" / "run" / "qconnect" / "client"
    if os.geteuid() == 0:
        return Path("/run/qconnect/client")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "qconnect" / "client"
    return Path(f"/tmp/qconnect-{os.getuid()}") / "client"


def ensure_runtime_dir() -> Path:
    """Create the registry directory (0700) and check that it is ours and not a symlink.

    Another user able to plant a directory or symlink there could read our
    status or stop our bindings; we refuse to use such a directory.
    """
    directory = runtime_dir()
    for path in (directory.parent, directory):
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise ClientError(f"cannot create {path}: {os.strerror(error.errno or 0)}") from None
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise ClientError(f"refusing to use {directory}: not a directory owned by this user")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(directory, 0o700)
    return directory


def control_socket_path(pid: int) -> Path:
    return runtime_dir() / f"{pid}{SOCKET_SUFFIX}"


def log_file_path(pid: int) -> Path:
    return runtime_dir() / f"{pid}.log"


def query(path: Path, request: str) -> dict[str, Any]:
    """Send one request to one control socket and return its JSON answer.

    Raises ConnectionRefusedError / FileNotFoundError when nobody listens
    there, ClientError for anything else.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(QUERY_TIMEOUT)
        connect_unix(sock, str(path))
        sock.sendall(request.encode() + b"\n")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_MESSAGE:
            chunk = sock.recv(MAX_MESSAGE)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    data = b"".join(chunks)
    if not data:
        # closed without a word: the process is exiting and stopped answering
        raise ConnectionResetError(errno.ECONNRESET, "closed without an answer")
    if size > MAX_MESSAGE or not data.endswith(b"\n"):
        raise ClientError(f"{path}: no valid answer")
    try:
        answer = json.loads(data)
    except ValueError:
        raise ClientError(f"{path}: no valid answer") from None
    if not isinstance(answer, dict):
        raise ClientError(f"{path}: no valid answer")
    return answer


def _sockets() -> list[Path]:
    directory = runtime_dir()
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as error:
        raise ClientError(f"cannot read {directory}: {os.strerror(error.errno or 0)}") from None
    return [directory / name for name in names if name.endswith(SOCKET_SUFFIX)]


def _remove_stale(path: Path) -> None:
    """Remove a dead process's control socket and its log file."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.unlink(path.with_suffix(".log"))


def ask_all(request: str) -> list[dict[str, Any]]:
    """Send ``request`` to every running client process; return their answers, by pid."""
    answers: list[dict[str, Any]] = []
    for path in _sockets():
        try:
            answers.append(query(path, request))
        except (ConnectionRefusedError, FileNotFoundError):
            _remove_stale(path)
        except OSError as error:
            if error.errno in (errno.ECONNRESET, errno.EPIPE):
                continue  # the process is exiting as we ask
            if error.errno in (errno.ECONNREFUSED, errno.ENOENT):
                _remove_stale(path)
                continue
            raise ClientError(f"{path}: {os.strerror(error.errno or 0) or error}") from None
    return sorted(answers, key=lambda answer: int(answer.get("pid", 0)))
