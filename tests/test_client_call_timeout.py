"""A qrexec-client-vm that hangs before its call is accepted: ended after --call-timeout.

The world: a loopback machine where "work" may call qubes.ConnectTCP+PORT in
"web" (today's stock service, /dev/tcp to an echo server). First on the
client's PATH sits a real program named qrexec-client-vm that plays a call
dom0 never answers: it reads a control file and either hangs for ever
without reading its input ("hang"; "stubborn" also ignores SIGTERM), waits
and then becomes the loopback qrexec-client-vm ("slow SECONDS"), or becomes
it at once (anything else). "web" also reaches a stalled server, which
echoes a greeting and then never reads again. Real processes throughout:
the client, the wrapper, the loopback qrexec, the servers.

(The loopback's dom0 answers an ``ask`` rule at once from its ``ask`` file,
so a prompt that is never answered is played by the wrapper instead.)
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from qconnect.loopback.machine import Machine
from tests.cli_refusals import assert_one_refusal, refusal_lines
from tests.client_world import exchange, free_port
from tests.servers import ThreadedTCPServer

SOURCE, TARGET = "work", "web"

#: The call timeout the tests run with: short, yet long enough for the
#: loopback qrexec-client-vm to start and accept on a loaded 2-core machine.
CALL_TIMEOUT = 1.5

#: How late the client may end a hung call past the timeout on a loaded
#: machine (it ends it at the timeout, then SIGTERM; SIGKILL 2 s later).
LATE = 8.0

#: What the client sends first, which the stalled server echoes.
GREETING = b"early bytes"

#: Sent at once, after the greeting, to a server that no longer reads: more
#: than the chain's buffers take once the far end stalls (measured: ~36 MB,
#: most of it the binding's socket, whose receive buffer grows up to
#: tcp_rmem's maximum, 32 MiB), so some of it waits unread in the binding.
#: The test checks that it did.
FLOOD_SIZE = 64 << 20

WRAPPER = """#!/bin/sh
# Plays a qrexec-client-vm whose call is not answered (see the test module).
case "$1" in --help) exec {real} "$@";; esac
mode=$(cat {control} 2>/dev/null)
case "$mode" in
  hang) echo $$ >> {pids}; exec sleep 3600;;
  stubborn) echo $$ >> {pids}; trap '' TERM; exec sleep 3600;;
  slow*) sleep "${{mode#slow }}";;
esac
exec {real} "$@"
"""


@dataclass
class Scene:
    machine: Machine
    control: Path
    pids: Path
    remote_port: int  #: the echo server's
    stalled_port: int  #: the stalled server's
    env: dict[str, str]
    processes: list["subprocess.Popen[str]"]

    def play(self, mode: str) -> None:
        self.control.write_text(mode)

    def hung_pids(self) -> list[int]:
        return [int(line) for line in self.pids.read_text().split()] if self.pids.exists() else []

    def start_client(
        self, *args: str, remote_port: int | None = None
    ) -> tuple["subprocess.Popen[str]", int]:
        """Start qvm-connect-tcp --foreground in "work" (to the echo server unless told
        otherwise); return it and its local port."""
        local = free_port()
        remote_port = remote_port or self.remote_port
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qconnect.client.cli",
                "--foreground",
                *args,
                f"{local}:{TARGET}:{remote_port}",
            ],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.processes.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("Binding TCP"), (line, process.stderr and process.stderr.read())
        return process, local

    def status(self, process: "subprocess.Popen[str]") -> dict[str, Any]:
        """The client's status as `qconnect list --json` gets it over its control socket."""
        listed = subprocess.run(
            [sys.executable, "-m", "qconnect.cli", "list", "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        (ours,) = [answer for answer in json.loads(listed.stdout) if answer["pid"] == process.pid]
        return ours  # type: ignore[no-any-return]

    def stop_client(self, process: "subprocess.Popen[str]") -> str:
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=60)
        assert process.returncode == 0, log
        return log


@pytest.fixture
def stalled_server() -> Iterator[int]:
    """A TCP server that echoes the first GREETING-long message, then never reads again."""
    released = threading.Event()

    def stall(conn: socket.socket) -> None:
        greeting = b""
        while len(greeting) < len(GREETING):
            data = conn.recv(len(GREETING) - len(greeting))
            if not data:
                return
            greeting += data
        conn.sendall(greeting)
        released.wait(120)

    server = ThreadedTCPServer(stall)
    try:
        yield server.port
    finally:
        released.set()
        server.close()


@pytest.fixture
def scene(
    loopback_machine: Callable[..., Machine],
    echo_server: int,
    stalled_server: int,
    tmp_path: Path,
) -> Iterator[Scene]:
    machine = loopback_machine(
        SOURCE,
        TARGET,
        policy=[
            f"qubes.ConnectTCP +{port} {SOURCE} {TARGET} allow"
            for port in (echo_server, stalled_server)
        ],
    )
    wrapper_dir = tmp_path / "wrapper"
    wrapper_dir.mkdir()
    control, pids = tmp_path / "control", tmp_path / "pids"
    wrapper = wrapper_dir / "qrexec-client-vm"
    wrapper.write_text(WRAPPER.format(real=machine.qrexec_client_vm, control=control, pids=pids))
    wrapper.chmod(0o755)
    env = machine.env_for(SOURCE)
    env.pop("NOTIFY_SOCKET", None)
    env["PATH"] = f"{wrapper_dir}{os.pathsep}{env['PATH']}"
    built = Scene(machine, control, pids, echo_server, stalled_server, env, [])
    try:
        yield built
    finally:
        for process in built.processes:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
        for pid in built.hung_pids():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether ``pid`` exists, zombies included (a zombie was not reaped: a failure too)."""
    return Path(f"/proc/{pid}").exists()


async def wait_closed(stream: trio.SocketStream) -> None:
    """Wait until the binding closes the connection (EOF or reset), reading what comes."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass


@pytest.mark.parametrize(("mode", "behaviour"), [("handoff", "hang"), ("relay", "stubborn")])
async def test_hung_calls_are_ended_closed_logged_once_and_the_binding_serves_on(
    scene: Scene, mode: str, behaviour: str
) -> None:
    options = ["--relay"] if mode == "relay" else []
    client, port = scene.start_client(*options, "--call-timeout", str(CALL_TIMEOUT))
    scene.play(behaviour)
    streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
    started = time.monotonic()
    for stream in streams:
        await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
    with trio.fail_after(CALL_TIMEOUT + LATE):
        for stream in streams:
            await wait_closed(stream)
    elapsed = time.monotonic() - started
    assert elapsed >= CALL_TIMEOUT - 0.2, elapsed
    for stream in streams:
        await stream.aclose()
    pids = scene.hung_pids()
    assert len(pids) == 3
    deadline = time.monotonic() + LATE
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        await trio.sleep(0.05)
    assert not any(alive(pid) for pid in pids), "a hung qrexec-client-vm is left (or a zombie)"

    scene.play("")
    with trio.fail_after(30):
        assert await exchange(port, b"next one") == b"next one"
    (binding,) = scene.status(client)["bindings"]
    assert (binding["hung"], binding["served"], binding["open"]) == (3, 1, 0)
    log = scene.stop_client(client)
    hung_lines = [line for line in log.splitlines() if "call not accepted after" in line]
    assert len(hung_lines) == 1, log  # the burst: one line in full ...
    assert f"-> {TARGET}:{scene.remote_port}" in hung_lines[0]
    assert "'ask' prompt" in hung_lines[0] and f"qvm-start {TARGET}" in hung_lines[0]
    assert "18 byte(s) still unread" in hung_lines[0]
    # ... and the rest as a count
    assert f"and 2 more calls to {TARGET}:{scene.remote_port} not accepted within" in log, log


@pytest.mark.parametrize("mode", ["handoff", "relay"])
async def test_a_call_accepted_late_but_in_time_is_not_ended(scene: Scene, mode: str) -> None:
    """Accepted at a third of the timeout, then stalled past it with the client's bytes waiting.

    The server answers a greeting and never reads again, and the client
    sends far more than the chain's buffers hold: at the timeout its bytes
    wait unread in the binding and nothing moves, as for a hung call; but the
    call has read some, so it is accepted and must not be ended.
    """
    timeout = 2 * CALL_TIMEOUT
    options = ["--relay"] if mode == "relay" else []
    client, port = scene.start_client(
        *options,
        "--call-timeout",
        str(timeout),
        "--grace",
        "0",  # the stalled call would otherwise get 10 s at the stop
        remote_port=scene.stalled_port,
    )
    scene.play(
        f"slow {timeout / 3}"
    )  # leaves the loopback client time to start on a loaded machine
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        connected = trio.current_time()
        await stream.send_all(GREETING)
        received = b""
        with trio.fail_after(30):
            while received != GREETING:
                received += await stream.receive_some(65536)
        sent = trio.Event()

        async def send_flood() -> None:
            await stream.send_all(bytes(FLOOD_SIZE))
            sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_flood)
            await trio.sleep_until(connected + timeout + 1.0)  # past the timeout
            assert not sent.is_set(), "the chain's buffers took it all: nothing waited"
            with trio.move_on_after(0.5) as still_open:
                await stream.receive_some(1)  # neither EOF nor a reset comes
            assert still_open.cancelled_caught, "the call was ended"
            (binding,) = scene.status(client)["bindings"]
            assert (binding["open"], binding["hung"]) == (1, 0)
            nursery.cancel_scope.cancel()
    log = scene.stop_client(client)
    assert "call not accepted" not in log


async def test_an_idle_connection_is_left_until_its_client_speaks(scene: Scene) -> None:
    """Nothing sent: cannot be told from an idle connection, so it stays; once the client
    sends and the call still reads nothing, it is ended at the next look."""
    client, port = scene.start_client("--call-timeout", str(CALL_TIMEOUT))
    scene.play("hang")
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        with trio.move_on_after(2 * CALL_TIMEOUT + 1) as idle:
            await stream.receive_some(1)
        assert idle.cancelled_caught, "an idle connection was closed"
        (pid,) = scene.hung_pids()
        assert alive(pid)
        await stream.send_all(b"now I speak")
        with trio.fail_after(2 * CALL_TIMEOUT + LATE):
            await wait_closed(stream)
    log = scene.stop_client(client)
    assert "call not accepted" in log
    assert not alive(pid)


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_an_invalid_call_timeout_is_one_clear_line(value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qconnect.client.cli", "--call-timeout", value, "8080:web:80"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout == ""
    assert_one_refusal(result.returncode, result.stderr, 2)
    assert refusal_lines(result.stderr) == [
        f"qvm-connect-tcp: error: argument --call-timeout: invalid duration '{value}': "
        "expected 0 (never) or more seconds"
    ]


def test_help_documents_the_call_timeout() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qconnect.client.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "--call-timeout SECONDS" in result.stdout
    assert "default 120" in result.stdout
