"""The whole chains of the benchmark, each from a TCP client to the same server.

One loopback machine (``tests.client_world.build_machine``): the caller "work"
and one target qube per service form (``svc-socket`` runs qconnect's socket
service, ``svc-exec`` its executable, ``svc-socat`` the socat original,
``svc-builtin`` qrexec's ``/dev/tcp/127.0.0.1``). Each chain is a listener in
"work" forwarding to the ``mux`` port of :mod:`bench.servers`; ``direct``
is that port itself, the limit no relay can beat.

A chain knows which processes are ours (for the memory figure): the
client-side processes it started and their descendants, plus the socket
service daemon when it uses it, plus the services the loopback qrexec
started for its calls (executables: socat, qconnect's); never the loopback
``qrexec-client-vm`` nor its fork-server and the calls it forks (they play
qrexec, the same for every chain), nor ``systemd-socket-activate`` (it
plays PID 1, which runs anyway). With the fork-server an executable service
is a descendant of the server, not of the chain's client: the server is
walked too, which is fair because chains are measured one at a time.
"""

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import tree_pss_kib, wait_for_port
from qconnect.core.spec import parse_spec
from qconnect.loopback import layout
from qconnect.loopback.machine import Machine
from qconnect.persist.render import (
    Binding,
    Mode,
    Scope,
    exec_start_of,
    load_templates,
    render_binding,
)

#: The chains in the order of the table, with what each one is made of.
CHAINS: dict[str, str] = {
    "original": "socat TCP-LISTEN,fork EXEC:qrexec-client-vm + socat STDIO TCP service",
    "builtin": "the original socat client + qrexec's /dev/tcp/127.0.0.1",
    "default": "qvm-connect-tcp (handoff) + socket service",
    "exec": "qvm-connect-tcp (handoff) + executable service",
    "relay": "qvm-connect-tcp --relay + socket service",
    "systemd": "Accept=yes units (systemd-socket-activate --accept) + socket service",
    "direct": "no relay: the server itself",
}

#: Which target qube (service form) each chain calls; direct calls none.
TARGET_QUBE = {
    "original": "svc-socat",
    "builtin": "svc-builtin",
    "default": "svc-socket",
    "exec": "svc-exec",
    "relay": "svc-socket",
    "systemd": "svc-socket",
}

#: The caller qube of every chain.
SOURCE_QUBE = "work"

# The command line of the loopback fork-server and of the calls it forks (a
# fork keeps its parent's command line): ``... loopback serve DIR``.
QREXEC_SERVER_MARKER = b"loopback\0serve\0"

# Seconds a chain's listener may take to come up on a busy 2-core machine.
START_TIMEOUT = 30.0


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Chain:
    """One running chain: its listening port, its processes, its memory."""

    name: str
    port: int
    processes: list["subprocess.Popen[bytes]"] = field(default_factory=list)
    daemon_pid: int | None = None  #: the socket service, when this chain uses it
    qrexec_marker: bytes = b""  #: the loopback qrexec-client-vm's path (not ours)
    qrexec_server_pid: int | None = None  #: the loopback fork-server, when calls go through it

    def owned_pss_kib(self) -> int:
        roots = [process.pid for process in self.processes]
        if self.daemon_pid is not None:
            roots.append(self.daemon_pid)
        if self.qrexec_server_pid is not None:
            roots.append(self.qrexec_server_pid)
        excluding = [b"systemd-socket-activate", QREXEC_SERVER_MARKER]
        if self.qrexec_marker:
            excluding.append(self.qrexec_marker)
        return tree_pss_kib(roots, excluding=excluding)

    def owned_pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _popen(
    machine: Machine, argv: list[str], log: Path, **kwargs: Any
) -> "subprocess.Popen[bytes]":
    """Start ``argv`` in qube "work", in its own process group (stopped as a whole)."""
    with open(log, "ab") as log_file:
        return machine.popen(
            SOURCE_QUBE,
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            **kwargs,
        )


def original_argv(port: int, target: str, remote_port: int) -> list[str]:
    """The original qvm-connect-tcp's socat line, bound to 127.0.0.1 (we never listen wider)."""
    return [
        "socat",
        f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
        f"EXEC:qrexec-client-vm '{target}' qubes.ConnectTCP+{remote_port}",
    ]


def systemd_argv(machine: Machine, port: int, target: str, remote_port: int) -> list[str]:
    """The generated per-connection units, run as systemd would run them.

    ``--accept --inetd`` is ``Accept=yes`` with ``StandardInput=socket``;
    ``StandardOutput=journal`` is played by sending fd 1 to stderr.
    systemd's ``MaxConnections=`` has no equivalent here.
    """
    binding = Binding(
        spec=parse_spec(f"127.0.0.1:{port}:{target}:{remote_port}"),
        scope=Scope.USER,
        mode=Mode.PER_CONNECTION,
        qrexec_client_vm=str(machine.qrexec_client_vm),
    )
    units = render_binding(binding, load_templates())
    service = next(text for name, text in units.items() if name.endswith("@.service"))
    exec_start = [word.replace("$$", "$") for word in shlex.split(exec_start_of(service))]
    command = ["systemd-socket-activate", "--accept", "--inetd", "--listen", f"127.0.0.1:{port}"]
    for name in (layout.MACHINE_ENV, layout.QUBE_ENV, "PATH"):
        command += ["--setenv", name]
    return [*command, "--", "/bin/sh", "-c", 'exec "$@" 1>&2', "sh", *exec_start]


def start_chain(
    name: str,
    machine: Machine,
    daemon_pid: int,
    mux_port: int,
    log: Path,
    *,
    qrexec_server_pid: int | None = None,
) -> Chain:
    """Start chain ``name`` towards the server's ``mux_port``; return once it accepts.

    ``qrexec_server_pid``: the machine's loopback fork-server, if it runs
    (for the memory figure; the calls reach it whatever this says).
    """
    if name == "direct":
        return Chain(name, mux_port)
    port = free_port()
    target = TARGET_QUBE[name]
    if name in ("original", "builtin"):
        argv = original_argv(port, target, mux_port)
    elif name == "systemd":
        argv = systemd_argv(machine, port, target, mux_port)
    else:
        relay = ["--relay"] if name == "relay" else []
        argv = [
            sys.executable,
            "-m",
            "qconnect.client.cli",
            "--foreground",
            *relay,
            f"{port}:{target}:{mux_port}",
        ]
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    process = _popen(machine, argv, log, env=env)
    chain = Chain(
        name,
        port,
        [process],
        daemon_pid=daemon_pid if target == "svc-socket" else None,
        qrexec_marker=str(machine.qrexec_client_vm).encode(),
        qrexec_server_pid=qrexec_server_pid,
    )
    try:
        wait_for_port(port, START_TIMEOUT, process)
    except BaseException:
        chain.stop()
        raise
    return chain
