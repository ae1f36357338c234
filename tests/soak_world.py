"""The soak's world: a loopback machine, servers with every end-of-stream behaviour, a client.

One chain per test: ``qvm-connect-tcp`` in qube "work" (handoff or relay)
to ``svc-socket`` (qconnect's socket service) or ``svc-exec`` (its
executable), with one binding per server behaviour plus a binding that dom0
refuses and one to a port nothing listens on. Built on the machine the
service benchmark runs on too (``tests.client_world.build_machine``), so the
soak and the bench run the same services, and on the servers of
:mod:`tests.servers`.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qconnect.loopback.machine import Machine
from tests.client_world import build_machine
from tests.conftest import free_port
from tests.processes import cmdline, descendants, fd_kinds, stop_process
from tests.servers import SoakServers


@dataclass
class SoakChain:
    """A running client bound to every behaviour, and the service behind it."""

    machine: Machine
    target: str
    client: "subprocess.Popen[str]"
    client_log: Path
    service_log: Path
    daemon: "subprocess.Popen[Any]"
    qrexec: "subprocess.Popen[bytes]"  #: the machine's loopback fork-server (runs the calls)
    servers: SoakServers  #: what the behaviours' calls reach
    local: dict[str, int] = field(default_factory=dict)  #: behaviour -> local port
    remote: dict[str, int] = field(default_factory=dict)  #: behaviour -> server port

    def executable_services(self, remote_port: int) -> list[int]:
        """Pids of executable qubes.ConnectTCP processes now serving ``remote_port``.

        The calls run in the loopback fork-server's children, so the services
        descend from the server, not from the client.
        """
        marker = f"qubes.ConnectTCP\0{remote_port}\0".encode()
        roots = [self.client.pid, self.qrexec.pid]
        return [pid for pid in descendants(roots) if marker in cmdline(pid)]

    def snapshot(self) -> dict[str, int]:
        """Open descriptors of the binding and of the service, and the binding's child processes.

        Pipes whose both ends one process holds are left out: they are the
        empty splice pipes qconnect.core.relay keeps for reuse (up to PIPES_KEPT,
        in the service and in a relay-mode client), a bounded pool, not a
        leak; pooled_pipes() checks that bound. A pipe with one end here
        leads to a child (qrexec-client-vm) and must be gone with it.
        """
        client, service = fd_kinds(self.client.pid), fd_kinds(self.daemon.pid)
        return {
            "client_fds": sum(client.values()) - client.get("pipe_pair", 0),
            "client_pipes": client.get("pipe", 0),
            "service_fds": sum(service.values()) - service.get("pipe_pair", 0),
            "client_children": len(descendants([self.client.pid])),
            "qrexec_calls": len(descendants([self.qrexec.pid])),
        }

    def pooled_pipes(self) -> dict[str, int]:
        """Descriptors of the pipes each process holds both ends of (relay pools)."""
        return {
            "client": fd_kinds(self.client.pid).get("pipe_pair", 0),
            "service": fd_kinds(self.daemon.pid).get("pipe_pair", 0),
        }

    def client_outcomes(self) -> dict[int, list[str]]:
        """Remote port -> the outcome words of each call the client logged (bursts expanded)."""
        found: dict[int, list[str]] = {}
        line_pattern = re.compile(r"-> [\w.@-]+:(\d+) \([^)]*\): (.*)$")
        burst_pattern = re.compile(r"\.\.\. and (\d+) more calls to [\w.@-]+:(\d+) refused")
        for line in self.client_log.read_text().splitlines():
            if match := line_pattern.search(line):
                found.setdefault(int(match[1]), []).append(match[2])
            elif match := burst_pattern.search(line):
                found.setdefault(int(match[2]), []).extend(["refused (burst)"] * int(match[1]))
        return found


@contextlib.contextmanager
def soak_chain(directory: Path, *, target: str, relay: bool) -> Iterator[SoakChain]:
    """Start the servers, build the machine, start the client bound to every behaviour.

    Calls go through the machine's loopback fork-server, as in the benchmark.
    All is stopped when the block ends.
    """
    with SoakServers() as servers, _chain(directory, servers, target=target, relay=relay) as chain:
        yield chain


@contextlib.contextmanager
def _chain(
    directory: Path, servers: SoakServers, *, target: str, relay: bool
) -> Iterator[SoakChain]:
    service_log = directory / "service.log"
    machine, daemon = build_machine(directory / "machine", service_log)
    qrexec_server = contextlib.ExitStack()
    try:
        qrexec = qrexec_server.enter_context(machine.server())
        remote = dict(servers.ports)
        remote["closed"] = free_port()
        # dom0 refuses the "denied" binding by a rule that sorts before the allow rules.
        remote["denied"] = free_port()
        machine.add_policy(
            [f"qubes.ConnectTCP +{remote['denied']} work {target} deny"], name="20-soak.policy"
        )
        local = {name: free_port() for name in remote}
        specs = [f"{local[name]}:{target}:{remote[name]}" for name in remote]
        client_log = directory / "client.log"
        argv = [sys.executable, "-m", "qconnect.client.cli", "--foreground"]
        if relay:
            argv.append("--relay")
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        with open(client_log, "w") as log_file:
            client = machine.popen(
                "work",
                [*argv, *specs],
                env=env,
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                start_new_session=True,
            )
        chain = SoakChain(
            machine, target, client, client_log, service_log, daemon, qrexec, servers, local, remote
        )
        try:
            assert client.stdout is not None
            for _ in specs:
                line = client.stdout.readline()
                assert line.startswith("Binding TCP"), (line, client_log.read_text())
            yield chain
        finally:
            if client.poll() is None:
                client.send_signal(signal.SIGTERM)
            try:
                client.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(client.pid, signal.SIGKILL)
                client.wait()
            if client.stdout is not None:
                client.stdout.close()
    finally:
        qrexec_server.close()
        stop_process(daemon)
