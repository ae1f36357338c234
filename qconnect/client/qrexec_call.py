"""Calling ``qrexec-client-vm``: where it is, what it supports, what to run.

Synchronous and cheap: everything here runs once, before the event loop.
"""

import enum
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

from qconnect.core.errors import ClientError
from qconnect.core.printable import printable
from qconnect.core.qrexec import service_call
from qconnect.core.qrexec_client import (
    LOOPBACK_MACHINE_ENV,
    LOOPBACK_QUBE_ENV,
    QREXEC_CLIENT_VM,
    STDIN_SOCKET_OPTION,
    supports_stdin_socket,
)
from qconnect.core.spec import BindingSpec

#: Set by daemon.bind_or_sudo in the environment of the copy of us that sudo
#: runs as root (defined here, the lowest module that reads it).
SUDO_MARK_ENV = "QCONNECT_VIA_SUDO"


class Mode(enum.Enum):
    """How bytes get from the accepted socket to qrexec."""

    HANDOFF = "handoff"  #: the socket is qrexec-client-vm's fd 0; no Python in the data path
    RELAY = "relay"  #: trio copies between the socket and qrexec-client-vm's pipes


def find_qrexec_client_vm() -> str:
    """The absolute path of the ``qrexec-client-vm`` to run, or a ClientError saying why none.

    A process takes the first on PATH, as a shell would: whoever started it
    chose that PATH. The one exception is our own re-run as root through sudo
    (a binding below port 1024, daemon.bind_or_sudo), started by a user for
    root: it does not trust PATH, which sudo keeps from the user when sudoers
    has no secure_path (see :func:`_root_qrexec_client_vm`).
    """
    if _is_root_rerun():
        return _root_qrexec_client_vm()
    path = shutil.which(QREXEC_CLIENT_VM)
    if path is None:
        raise ClientError(
            f"{QREXEC_CLIENT_VM} not found on PATH: qvm-connect-tcp runs in a Qubes app qube "
            "(package qubes-core-agent) or in a qube of a loopback machine "
            "(qconnect loopback run DIR QUBE -- qvm-connect-tcp ...)"
        )
    return os.path.abspath(path)


def _is_root_rerun() -> bool:
    return os.geteuid() == 0 and os.environ.get(SUDO_MARK_ENV) == "1"


def _root_qrexec_client_vm() -> str:
    """Root's ``qrexec-client-vm``: the loopback machine's, or one only root can have put there.

    Inside a loopback qube (QCONNECT_LOOPBACK_MACHINE, passed on by whoever
    ran us) it is the machine's own client. Otherwise it is the first found
    by :func:`root_program`.
    """
    machine = os.environ.get(LOOPBACK_MACHINE_ENV)
    if machine:
        client = Path(machine).absolute() / "bin" / QREXEC_CLIENT_VM
        if not os.access(client, os.X_OK):
            raise ClientError(f"{printable(str(client))}: no loopback {QREXEC_CLIENT_VM} there")
        return str(client)
    found, skipped = root_program(QREXEC_CLIENT_VM)
    if found is not None:
        return found
    raise ClientError(
        f"{QREXEC_CLIENT_VM} not found for root on PATH"
        + (
            f" (skipped, as others than root could have put it there: "
            f"{', '.join(printable(path) for path in skipped)})"
            if skipped
            else ": qvm-connect-tcp runs in a Qubes app qube (package qubes-core-agent)"
        )
    )


def root_program(name: str) -> tuple[str | None, list[str]]:
    """The first ``name`` on PATH that only root can have put there, and the ones skipped.

    Only absolute PATH entries count, and a program counts only when it and
    every directory above it are root's and writable by root only: a
    directory of the user's, or a relative one, on a PATH that sudo kept is
    skipped, so a planted program never runs as root.
    """
    skipped: list[str] = []
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory, name)
        if not os.access(candidate, os.X_OK) or os.path.isdir(candidate):
            continue
        if os.path.isabs(candidate) and _only_root_can_change(candidate):
            return candidate, skipped
        skipped.append(candidate)
    return None, skipped


def _only_root_can_change(path: str) -> bool:
    """Whether ``path`` and every directory above it are root's and writable by root only.

    Symlinks are followed (``/bin`` -> ``usr/bin``): the file that would run
    and each directory on its real path are checked.
    """
    current = Path(os.path.realpath(path))
    for part in (current, *current.parents):
        try:
            info = os.stat(part)
        except OSError:
            return False
        if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return False
    return True


def choose_mode(executable: str, *, force_relay: bool) -> Mode:
    if force_relay or not supports_stdin_socket(executable):
        return Mode.RELAY
    return Mode.HANDOFF


def call_argv(executable: str, spec: BindingSpec, mode: Mode) -> list[str]:
    """The command line of one call; the target is validated, so never read as an option."""
    options = [STDIN_SOCKET_OPTION] if mode is Mode.HANDOFF else []
    return [executable, *options, spec.qrexec_target, service_call(spec.remote_port)]


def this_qube_name() -> str:
    """This qube's name, for the dom0 command printed when a call is refused.

    Qubes keeps it in QubesDB (``/name``); the loopback machine and plain
    Linux fall back to the host name, which Qubes sets to the qube's name.
    """
    loopback_name = os.environ.get(LOOPBACK_QUBE_ENV)
    if loopback_name:
        return loopback_name
    # the sudo re-run runs as root: only a reader root installed (see find_qrexec_client_vm)
    reader = root_program("qubesdb-read")[0] if _is_root_rerun() else shutil.which("qubesdb-read")
    if reader is not None:
        try:
            result = subprocess.run(
                [reader, "/name"], capture_output=True, text=True, timeout=5, check=False
            )
            if result.returncode == 0 and result.stdout.strip():
                return result.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return socket.gethostname()
