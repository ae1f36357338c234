"""The registry of running bindings: where each client process's control socket lives.

Every ``qvm-connect-tcp`` process listens on ``RUNTIME/client/PID.sock``
(a unix stream socket, mode 0600 in a 0700 directory) and may log to
``RUNTIME/client/PID.log``. What is said on those sockets is control.py's;
this module owns the place: where it is, that nobody else could have made
or changed it (:func:`registry_dir`), whose peer is at the other end
(:func:`peer_credentials`), and removing a dead process's leftovers.
Standard library only: ``qconnect list`` does not import trio.
"""

import contextlib
import os
import socket
import stat
import struct
from pathlib import Path

from qconnect.core.errors import ClientError
from qconnect.core.printable import printable
from qconnect.core.qrexec_client import LOOPBACK_MACHINE_ENV, LOOPBACK_QUBE_ENV

#: Environment variable that moves the runtime directory (tests, loopback qubes).
RUNTIME_DIR_ENV = "QCONNECT_RUNTIME_DIR"

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


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


#: struct ucred (socket(7)): pid_t, uid_t, gid_t.
_UCRED = struct.Struct("iII")


def remove_stale(path: Path) -> None:
    """Remove a dead process's control socket and its log file."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.unlink(path.with_suffix(".log"))
