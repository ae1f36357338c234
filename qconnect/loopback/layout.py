"""Where things live in a loopback machine directory (pure paths, standard library only).

Shared by the ``Machine`` API and the per-call ``qrexec-client-vm``, which
must start fast and so imports only this, not ``machine``::

    DIR/qubes.json                 dom0's system info (internal.GetSystemInfo)
    DIR/policy.d/*.policy          dom0's qrexec policy
    DIR/ask                        the answer to ``ask`` rules (no user to ask)
    DIR/old-qrexec-client-vm       if present: the client lacks --use-stdin-socket
    DIR/bin/qrexec-client-vm       the loopback client every qube calls
    DIR/qubes/NAME/rpc/            the qube's first qubes-rpc directory
    DIR/qubes/NAME/rpc-config/     the qube's first rpc-config directory
    DIR/qubes/NAME/root/           the qube's root file system, for the rest
                                   of qrexec's search path (etc/qubes-rpc ...)
    DIR/qubes/NAME/domid           the qube's domain id (dom0 is 0)
    DIR/channel-release-lag        if present: seconds a data port outlives its call
    DIR/run/channels/NAME          the qube's qrexec-daemon port table (channels.py)
    DIR/log/qrexec.log             what qrexec-agent and -daemon would log
"""

import os
from pathlib import Path

from qconnect.core.qrexec_client import LOOPBACK_MACHINE_ENV, LOOPBACK_QUBE_ENV

#: Environment variables that tell the loopback client which machine and qube it runs in.
MACHINE_ENV = LOOPBACK_MACHINE_ENV
QUBE_ENV = LOOPBACK_QUBE_ENV

CLIENT_NAME = "qrexec-client-vm"

# qrexec's search paths inside a qube (qubes-core-qrexec, libqrexec/qrexec.h:
# QREXEC_SERVICE_PATH and QUBES_RPC_CONFIG_PATH), in order; the loopback puts
# the qube's own rpc/ and rpc-config/ directories in front of them.
SERVICE_PATH = ("run/qubes-rpc", "usr/local/etc/qubes-rpc", "etc/qubes-rpc")
RPC_CONFIG_PATH = ("run/qubes/rpc-config", "usr/local/etc/qubes/rpc-config", "etc/qubes/rpc-config")


def qube_dir(machine: Path, qube: str) -> Path:
    return machine / "qubes" / qube


def rpc_dir(machine: Path, qube: str) -> Path:
    return qube_dir(machine, qube) / "rpc"


def rpc_config_dir(machine: Path, qube: str) -> Path:
    return qube_dir(machine, qube) / "rpc-config"


def root_dir(machine: Path, qube: str) -> Path:
    return qube_dir(machine, qube) / "root"


def service_path(machine: Path, qube: str) -> list[Path]:
    """The directories the qube's agent searches for a service, first match wins."""
    root = root_dir(machine, qube)
    return [rpc_dir(machine, qube), *(root / part for part in SERVICE_PATH)]


def rpc_config_path(machine: Path, qube: str) -> list[Path]:
    """The directories the qube's agent searches for rpc-config files, first match wins."""
    root = root_dir(machine, qube)
    return [rpc_config_dir(machine, qube), *(root / part for part in RPC_CONFIG_PATH)]


def domid_file(machine: Path, qube: str) -> Path:
    return qube_dir(machine, qube) / "domid"


def domain_id(machine: Path, qube: str) -> int:
    """The qube's domain id: its ``domid`` file, else its place in qubes.json (dom0 first, 0).

    Real domain ids are handed out by Xen as qubes start; qrexec compares
    them to choose a half of the target's port table (see channels.py).
    """
    try:
        return int(domid_file(machine, qube).read_text().strip())
    except (OSError, ValueError):
        pass
    import json

    try:
        names = list(json.loads((machine / "qubes.json").read_text())["domains"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return names.index(qube) if qube in names else 0


def old_client_flag(machine: Path) -> Path:
    """Present when the machine's qrexec-client-vm plays one without --use-stdin-socket."""
    return machine / "old-qrexec-client-vm"


def bin_dir(machine: Path) -> Path:
    return machine / "bin"


def env_for(machine: Path, qube: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process "inside" ``qube``: the loopback client first on PATH."""
    env = dict(os.environ if base is None else base)
    env[MACHINE_ENV] = str(machine)
    env[QUBE_ENV] = qube
    bin_path = str(bin_dir(machine))
    path = [part for part in env.get("PATH", os.defpath).split(os.pathsep) if part != bin_path]
    env["PATH"] = os.pathsep.join([bin_path, *path])
    return env
