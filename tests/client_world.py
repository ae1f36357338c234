"""The world the client's tests run in: a loopback machine, a service, servers, a client.

``untrusted`` runs ``qvm-connect-tcp``; ``mytcp-service`` runs the socket
service (``qconnect service run``) in front of the "client" set of
:mod:`tests.servers`, run as a process of its own. dom0's policy lets
``untrusted`` call those ports in ``mytcp-service``, by name and as ``@default``; everything else is
refused (there is no allowing rule). ``noservice`` has no qubes.ConnectTCP
at all; ``stock`` has only today's built-in ``/dev/tcp`` service.
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from qconnect.loopback.machine import Machine
from qconnect.service.install import install
from tests.conftest import free_port
from tests.processes import stop_process
from tests.servers import servers_process

SOURCE = "untrusted"
TARGET = "mytcp-service"

#: How long a process we start may take to get ready on a loaded 2-core machine.
START_TIMEOUT = 30.0


async def exchange(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    """Connect, send ``payload``, send EOF, return everything received until EOF."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(payload)
        await stream.send_eof()
        received = bytearray()
        async for data in stream:
            received += data
        return bytes(received)


def wait_for_path(path: Path, process: "subprocess.Popen[Any]") -> None:
    """Wait until ``process`` has made ``path`` (its socket: it listens), or fail if it exits."""
    deadline = time.monotonic() + START_TIMEOUT
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.02)


def start_socket_service(
    machine: Machine,
    qube: str,
    *,
    allow_file: Path | None = None,
    log: Path | None = None,
) -> "subprocess.Popen[Any]":
    """Install qconnect's socket service in ``qube`` and run it; return once it listens.

    As ``qconnect service install --socket`` does in the qube's root, with the
    socket where its systemd unit puts it (/run/qubes-rpc). ``allow_file``:
    its --allow-file (default: the service's own); ``log``: where its stderr
    goes (default: nowhere). The caller stops the process.
    """
    root = machine.root_dir(qube)
    install(root, "socket")
    service_socket = root / "run" / "qubes-rpc" / "qubes.ConnectTCP"
    service_socket.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "qconnect.cli", "service", "run", "--socket", str(service_socket)]
    if allow_file is not None:
        argv += ["--allow-file", str(allow_file)]
    env = machine.env_for(qube)
    env.pop("NOTIFY_SOCKET", None)
    with open(log, "wb") if log is not None else contextlib.nullcontext() as log_file:
        service = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL if log_file is None else log_file,
        )
    try:
        wait_for_path(service_socket, service)
    except BaseException:
        stop_process(service)
        raise
    return service


#: The four ways a target qube can serve qubes.ConnectTCP, one qube "svc-FORM" each:
#: qconnect's socket service, its executable service, the socat original, and
#: today's built-in /dev/tcp/127.0.0.1 service.
FORMS = ("socket", "exec", "socat", "builtin")

SOCAT_SERVICE = (
    '#!/bin/sh\n# The socat original, as a qrexec service.\nexec socat STDIO TCP:localhost:"$1"\n'
)


def build_machine(directory: Path, log: Path) -> tuple[Machine, "subprocess.Popen[Any]"]:
    """A caller qube "work" and one target qube per form in FORMS; the socket service runs.

    The soak and the service benchmark run on it. Returns the machine and the
    socket service's process (its stderr goes to ``log``); the caller stops it.
    """
    machine = Machine.create(
        directory,
        ["work", *(f"svc-{form}" for form in FORMS)],
        policy=[f"qubes.ConnectTCP * work svc-{form} allow" for form in FORMS],
    )
    install(machine.root_dir("svc-exec"), "exec")
    socat = machine.rpc_dir("svc-socat") / "qubes.ConnectTCP"
    socat.write_text(SOCAT_SERVICE)
    socat.chmod(0o755)
    # svc-builtin keeps the stock /dev/tcp/127.0.0.1 service of today's Qubes.
    return machine, start_socket_service(machine, "svc-socket", log=log)


@dataclass
class World:
    machine: Machine
    ports: dict[str, int]
    processes: list["subprocess.Popen[Any]"] = field(default_factory=list)
    startup_lines: list[str] = field(default_factory=list)  #: of the last start_client
    #: A started client's log (stderr) so far, by pid: read as it comes, because
    #: a client whose stderr pipe fills (64 KiB, ~900 call lines) blocks in write().
    logs: dict[int, list[str]] = field(default_factory=dict)
    _drains: dict[int, threading.Thread] = field(default_factory=dict)

    def env(self, qube: str = SOURCE) -> dict[str, str]:
        env = self.machine.env_for(qube)
        env.pop("NOTIFY_SOCKET", None)
        return env

    def client_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "qconnect.client.cli", *args]

    def qconnect(self, *args: str) -> "subprocess.CompletedProcess[str]":
        return subprocess.run(
            [sys.executable, "-m", "qconnect.cli", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def run_client(self, *args: str, **kwargs: object) -> "subprocess.CompletedProcess[str]":
        """Run qvm-connect-tcp in ``untrusted`` to completion (background mode returns)."""
        return subprocess.run(
            self.client_argv(*args),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            **kwargs,  # type: ignore[call-overload]
        )

    def start_client(self, *args: str, specs: int = 1, **kwargs: object) -> "subprocess.Popen[str]":
        """Start ``qvm-connect-tcp --foreground`` in ``untrusted``; return once it is bound.

        It prints the original's start-up line per spec once every listener
        is bound, so reading ``specs`` lines means it is ready.
        """
        process = subprocess.Popen(
            self.client_argv("--foreground", *args),
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kwargs,  # type: ignore[call-overload]
        )
        self.processes.append(process)
        self.startup_lines = []
        for _ in range(specs):
            line = process.stdout.readline() if process.stdout else ""
            if not line.startswith("Binding TCP"):
                process.kill()
                _, err = process.communicate(timeout=10)
                raise RuntimeError(f"client did not start: {line!r} {err}")
            self.startup_lines.append(line.rstrip("\n"))
        lines = self.logs[process.pid] = []
        stderr = process.stderr
        assert stderr is not None
        drain = threading.Thread(target=lambda: lines.extend(stderr), daemon=True)
        drain.start()
        self._drains[process.pid] = drain
        return process

    def log_so_far(self, process: "subprocess.Popen[str]") -> str:
        """What a started client has logged until now."""
        return "".join(self.logs[process.pid])

    async def wait_logged(
        self, process: "subprocess.Popen[str]", text: str, timeout: float = 30.0
    ) -> str:
        """Wait until a started client's log holds ``text`` (the event a test waits for)."""
        with trio.fail_after(timeout):
            while text not in (log := self.log_so_far(process)):
                await trio.sleep(0.02)
        return log

    def stop_client(self, process: "subprocess.Popen[str]") -> tuple[int, str]:
        """SIGTERM the client and return its exit code and its log (stderr)."""
        process.send_signal(signal.SIGTERM)
        return self.wait_client(process, 60)

    def wait_client(self, process: "subprocess.Popen[str]", timeout: float) -> tuple[int, str]:
        """Wait for a started client to exit; its exit code and its whole log."""
        process.wait(timeout=timeout)
        self._drains[process.pid].join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
        return process.returncode, self.log_so_far(process)

    def close(self) -> None:
        self.qconnect("stop", "--all")
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            drain = self._drains.get(process.pid)
            if drain is not None:
                drain.join(timeout=10)

    def leftover_calls(self) -> list[int]:
        """Pids of loopback qrexec-client-vm processes of this machine still running."""
        marker = str(self.machine.qrexec_client_vm).encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                if marker in cmdline:
                    pids.append(int(entry))
        return pids


def allow_lines(ports: dict[str, int]) -> list[str]:
    lines = []
    for port in ports.values():
        lines.append(f"qubes.ConnectTCP +{port} {SOURCE} {TARGET} allow")
        lines.append(f"qubes.ConnectTCP +{port} {SOURCE} @default allow target={TARGET}")
        lines.append(f"qubes.ConnectTCP +{port} {SOURCE} stock allow")
        lines.append(f"qubes.ConnectTCP +{port} {SOURCE} noservice allow")
    return lines


@contextlib.contextmanager
def make_world(directory: Path) -> Iterator[World]:
    """Build the machine, start the servers and the socket service; tear all down after."""
    with servers_process("client") as (servers, ports):
        ports["closed"] = free_port()
        machine = Machine.create(
            directory / "machine",
            [SOURCE, TARGET, "stock", "noservice"],
            policy=allow_lines(ports),
        )
        # today's Qubes ships the service as /etc/qubes-rpc/qubes.ConnectTCP
        (machine.root_dir("noservice") / "etc" / "qubes-rpc" / "qubes.ConnectTCP").unlink()
        world = World(machine, ports, [servers])
        world.processes.append(
            start_socket_service(machine, TARGET, allow_file=directory / "no-allowlist")
        )
        try:
            yield world
        finally:
            world.close()
