"""The registry of running bindings: one control socket per client process.

Every ``qvm-connect-tcp`` process listens on ``RUNTIME/client/PID.sock``
(a unix stream socket, mode 0600 in a 0700 directory). ``qconnect list``
and ``qconnect stop`` connect to each, send one request line and read one
JSON line back, so what they show is the process's own live state, never a
stale file. A socket nobody answers on is a dead process's leftover and is
removed. Standard library only: ``qconnect list`` does not import trio.

Trust: the directory chain is checked before use (:func:`registry_dir`),
each side checks the other's uid with SO_PEERCRED (a process answers only
its own user or root; ``list``/``stop`` believe only their own user), and
whatever a peer says is printed through qconnect.core.printable.

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
import struct
from pathlib import Path
from typing import Any

from qconnect.core.errors import ClientError
from qconnect.core.printable import printable
from qconnect.core.qrexec_client import LOOPBACK_MACHINE_ENV, LOOPBACK_QUBE_ENV
from qconnect.core.unixpath import connect_unix

#: Environment variable that moves the runtime directory (tests, loopback qubes).
RUNTIME_DIR_ENV = "QCONNECT_RUNTIME_DIR"

#: Largest request or answer on a control socket. A status names at most a
#: few dozen bindings; anything longer is not from one of ours.
MAX_MESSAGE = 64 * 1024

#: How long ``list``/``stop`` wait for a process to answer. A live client
#: answers in milliseconds; a stuck one must not hang ``qconnect list``.
QUERY_TIMEOUT = 3.0

SOCKET_SUFFIX = ".sock"

# In a loopback qube (LOOPBACK_*_ENV set) each qube gets its own /run, so
# ``qconnect list`` in one qube does not show another qube's bindings.


def _location() -> tuple[Path, int]:
    """The registry directory, and how many of its last components are the registry's own.

    The registry creates those (mode 0700) and they must be this user's; the
    directories above are the base it is given (/run, XDG_RUNTIME_DIR, the
    temporary directory, a loopback qube's /run, an override).
    """
    override = os.environ.get(RUNTIME_DIR_ENV)
    if override:
        return Path(override).absolute() / "client", 1
    machine, qube = os.environ.get(LOOPBACK_MACHINE_ENV), os.environ.get(LOOPBACK_QUBE_ENV)
    if machine and qube:
        run = Path(machine).absolute() / "qubes" / qube / "root" / "run"
        return run / "qconnect" / "client", 2
    if os.geteuid() == 0:
        return Path("/run/qconnect/client"), 2
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "qconnect" / "client", 2
    temporary = os.environ.get("TMPDIR") or "/tmp"
    return Path(temporary).absolute() / f"qconnect-{os.geteuid()}" / "client", 2


def runtime_dir() -> Path:
    """Where this user's bindings register: root's in /run, a user's in XDG_RUNTIME_DIR.

    Without XDG_RUNTIME_DIR (a session without systemd-logind), in
    ``$TMPDIR/qconnect-UID`` (/tmp by default), which any user could have
    made first: :func:`registry_dir` checks the whole chain before use.
    """
    return _location()[0]


def ensure_runtime_dir() -> Path:
    """Create the registry directory if needed and return it, checked (see registry_dir)."""
    directory = registry_dir(create=True)
    assert directory is not None
    return directory


def registry_dir(*, create: bool) -> Path | None:
    """The registry directory once its whole chain is checked; None if it does not exist.

    Another user able to plant or replace a directory on the way could read
    our status, answer ``qconnect list`` in our processes' place, or receive
    ``stop`` requests. So the registry's own directories must be real
    directories of this user with mode 0700, and every directory above them
    must belong to root or this user and be writable by nobody else, unless
    it is sticky (/tmp: others may add entries there but not move ours).
    The same holds for the directories a symlink above leads to. A chain
    that fails is refused with one line, never repaired.
    """
    directory, own = _location()
    base = directory.parents[own - 1]
    if os.path.lexists(base):  # nothing is made in a place another user controls
        _check_chain(base, 0, directory)
    if create:
        try:
            directory.parents[own - 1].mkdir(parents=True, exist_ok=True)
            for depth in range(own - 1, -1, -1):
                path = directory.parents[depth - 1] if depth else directory
                try:
                    path.mkdir(mode=0o700)
                except FileExistsError:
                    continue
                os.chmod(path, 0o700)  # ours since a moment ago: whatever the umask took away
        except OSError as error:
            raise ClientError(
                f"cannot create {printable(str(directory))}: {os.strerror(error.errno or 0)}"
            ) from None
    elif not os.path.lexists(directory):
        return None
    _check_chain(directory, own, directory)
    real = Path(os.path.realpath(directory))
    if real != directory:
        _check_chain(real, own, directory)
    return directory


def _check_chain(chain: Path, own: int, registry: Path) -> None:
    """Refuse ``chain`` unless it is safe from other users (see registry_dir)."""
    user = os.geteuid()
    for depth, path in enumerate((chain, *chain.parents)):
        try:
            info = os.lstat(path)
        except OSError as error:
            raise ClientError(
                f"cannot use {printable(str(registry))}: {printable(str(path))}: "
                f"{os.strerror(error.errno or 0)}"
            ) from None
        mode = info.st_mode
        problem = ""
        if depth < own:
            if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
                problem = "is not a directory"
            elif info.st_uid != user:
                problem = f"belongs to uid {info.st_uid}"
            elif stat.S_IMODE(mode) != 0o700:
                problem = f"has mode {stat.S_IMODE(mode):04o}"
            if problem:
                raise ClientError(
                    f"refusing to use {printable(str(registry))}: {printable(str(path))} "
                    f"{problem}; expected a directory of uid {user} with mode 0700"
                )
            continue
        if info.st_uid not in (0, user):
            problem = f"belongs to uid {info.st_uid}"
        elif not stat.S_ISLNK(mode) and not stat.S_ISDIR(mode):
            problem = "is not a directory"
        elif stat.S_ISDIR(mode) and mode & 0o022 and not mode & stat.S_ISVTX:
            problem = f"is writable by others (mode {stat.S_IMODE(mode):04o})"
        if problem:
            raise ClientError(
                f"refusing to use {printable(str(registry))}: {printable(str(path))} {problem}; "
                f"expected directories of root or uid {user} that only they can change"
            )


def control_socket_path(pid: int) -> Path:
    return runtime_dir() / f"{pid}{SOCKET_SUFFIX}"


def log_file_path(pid: int) -> Path:
    return runtime_dir() / f"{pid}.log"


def query(path: Path, request: str) -> dict[str, Any]:
    """Send one request to one control socket and return its JSON answer.

    The answer is believed only from a process of this user: the peer's
    uid (SO_PEERCRED, given by the kernel) is checked before the request is
    even sent. Raises ConnectionRefusedError / FileNotFoundError when nobody
    listens there, ClientError for anything else.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(QUERY_TIMEOUT)
        connect_unix(sock, str(path))
        _, uid, _ = peer_credentials(sock)
        if uid != os.geteuid():
            raise ClientError(
                f"{printable(str(path))}: answered by a process of uid {uid}, not of this "
                f"user (uid {os.geteuid()}); not believed"
            )
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
    invalid = ClientError(f"{printable(str(path))}: no valid answer")
    if size > MAX_MESSAGE or not data.endswith(b"\n"):
        raise invalid
    try:
        answer = json.loads(data)
    except ValueError:
        raise invalid from None
    if not _valid_answer(answer):
        raise invalid
    return answer  # type: ignore[no-any-return]


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


#: struct ucred (socket(7)): pid_t, uid_t, gid_t.
_UCRED = struct.Struct("iII")


def _valid_answer(answer: object) -> bool:
    """Whether ``answer`` has the shape of a status (or error) object, as far as we read it."""
    if not isinstance(answer, dict):
        return False
    bindings = answer.get("bindings", [])
    if not isinstance(bindings, list):
        return False
    if not all(isinstance(b, dict) and isinstance(b.get("spec"), str) for b in bindings):
        return False
    pid, started = answer.get("pid", 0), answer.get("started", 0.0)
    return (
        isinstance(pid, int)
        and not isinstance(pid, bool)
        and isinstance(started, int | float)
        and not isinstance(started, bool)
    )


def _sockets() -> list[Path]:
    directory = registry_dir(create=False)
    if directory is None:
        return []
    try:
        names = sorted(os.listdir(directory))
    except OSError as error:
        raise ClientError(
            f"cannot read {printable(str(directory))}: {os.strerror(error.errno or 0)}"
        ) from None
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
            raise ClientError(
                f"{printable(str(path))}: {os.strerror(error.errno or 0) or error}"
            ) from None
    return sorted(answers, key=lambda answer: int(answer.get("pid", 0)))
