"""Bursts through dom0's data-port table: every connection served, a denial refused once.

Real qrexec gives a target qube 128 data ports for the calls from all the
qubes on one side of its domain id, and frees a port only some time after
the caller's qrexec-client-vm has exited (qconnect.loopback.channels). A
client that only counts its live calls overfills that table in a burst of
short calls and loses connections with 126, "Request refused". These tests
run the real client, the loopback qrexec (fork-server: a call costs a fork)
with the modelled table, and the socket service, and count what each TCP
client of the burst got.

Budget (2 cores, shared with others): 30-50 s for the 1,000-connection
burst (the loopback's Python qrexec-client-vm start per call is most of it),
15-30 s for 200 + 200 from two qubes, a few seconds for the denied burst; the
2x-lag burst and 500 + 500 run with the slow tests. Each burst has its own
deadline.
"""

import contextlib
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from qconnect.loopback.machine import Machine
from tests.client_world import start_socket_service
from tests.conftest import free_port
from tests.processes import stop_process
from tests.servers import servers_process

SOURCE = "untrusted"
SECOND_SOURCE = "untrusted2"
TARGET = "mytcp-service"

#: Seconds a whole burst may take before the test fails (it is measured and printed too).
#: Only a stuck burst comes near it: 1,000 calls take 30-50 s alone on 2 shared cores, and
#: under `make test`'s parallel workers on a loaded machine they were seen to pass 120 s.
BURST_DEADLINE = 360.0


@dataclass
class Tally:
    """What the TCP clients of one burst got back."""

    served: int = 0  #: the echo came back whole, then EOF
    reset: int = 0  #: the connection was reset or closed early
    wrong: list[bytes] = field(default_factory=list)  #: anything else
    seconds: float = 0.0
    peak_held: int = 0  #: most ports of the target's table held at once (sampled)
    no_channel: int = 0  #: calls dom0 refused for lack of a port during the burst


async def echo_once(port: int, payload: bytes, tally: Tally) -> None:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(payload)
            await stream.send_eof()
            received = bytearray()
            async for data in stream:
                received += data
    except (trio.BrokenResourceError, OSError):
        tally.reset += 1
        return
    if bytes(received) == payload:
        tally.served += 1
    elif not received:
        tally.reset += 1  # closed without a byte: the call was refused
    else:
        tally.wrong.append(bytes(received))


async def sample_held(machine: Machine, tally: Tally) -> None:
    """Note the most ports of the target's table held at once, every 20 ms (for the report)."""
    while True:
        held = await trio.to_thread.run_sync(machine.channels_held, TARGET)
        tally.peak_held = max(tally.peak_held, held)
        await trio.sleep(0.02)


async def burst(machine: Machine, port: int, count: int, tag: str = "") -> Tally:
    """``count`` connections opened at once to 127.0.0.1:port, each a short echo."""
    tally = Tally()
    refusals_before = no_channel_refusals(machine)
    started = time.monotonic()
    with trio.fail_after(BURST_DEADLINE):
        async with trio.open_nursery() as sampling:
            sampling.start_soon(sample_held, machine, tally)
            async with trio.open_nursery() as nursery:
                for index in range(count):
                    nursery.start_soon(echo_once, port, f"{tag}ping {index}\n".encode(), tally)
            sampling.cancel_scope.cancel()
    tally.seconds = time.monotonic() - started
    tally.no_channel = no_channel_refusals(machine) - refusals_before
    return tally


def no_channel_refusals(machine: Machine) -> int:
    """How many calls the target's daemon has refused for lack of a port so far."""
    with contextlib.suppress(FileNotFoundError):
        return machine.log_file.read_text().count("Failed to allocate new vchan port")
    return 0


@dataclass
class BurstWorld:
    machine: Machine
    echo_port: int
    denied_port: int
    directory: Path
    processes: list["subprocess.Popen[str]"] = field(default_factory=list)
    logs: dict[int, list[str]] = field(default_factory=dict)

    def start_client(self, qube: str, spec: str) -> "subprocess.Popen[str]":
        """qvm-connect-tcp --foreground in ``qube``; returns once it is bound."""
        env = self.machine.env_for(qube)
        env.pop("NOTIFY_SOCKET", None)
        process = subprocess.Popen(
            [sys.executable, "-m", "qconnect.client.cli", "--foreground", spec],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.processes.append(process)
        assert process.stdout is not None and process.stderr is not None
        line = process.stdout.readline()
        if not line.startswith("Binding TCP"):
            process.kill()
            raise RuntimeError(f"client did not start: {line!r} {process.communicate()[1]}")
        lines = self.logs[process.pid] = []
        stderr = process.stderr
        threading.Thread(target=lambda: lines.extend(stderr), daemon=True).start()
        return process

    def log_of(self, process: "subprocess.Popen[str]") -> str:
        return "".join(self.logs[process.pid])

    def policy_decisions(self, port: int) -> list[str]:
        """The lines in which dom0's policy decided a call to ``port`` (one per evaluation)."""
        call = f"qubes.ConnectTCP+{port} from "
        return [
            line
            for line in self.machine.log_file.read_text().splitlines()
            if call in line and ("allowed" in line or "denied" in line)
        ]


@contextlib.contextmanager
def burst_world(directory: Path) -> Iterator[BurstWorld]:
    """Two calling qubes (domain ids 1, 2) below the target (3): both share one half."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000 sockets in this process
    try:
        with servers_process("client") as (_, ports):
            echo_port, denied_port = ports["echo"], ports["late"]
            machine = Machine.create(
                directory / "machine",
                [SOURCE, SECOND_SOURCE, TARGET],
                policy=[
                    f"qubes.ConnectTCP +{echo_port} {SOURCE} {TARGET} allow",
                    f"qubes.ConnectTCP +{echo_port} {SECOND_SOURCE} {TARGET} allow",
                    f"qubes.ConnectTCP +{denied_port} {SOURCE} {TARGET} deny",
                ],
            )
            world = BurstWorld(machine, echo_port, denied_port, directory)
            world.processes.append(
                start_socket_service(machine, TARGET, allow_file=directory / "no-allowlist")
            )
            try:
                with machine.server():
                    yield world
            finally:
                for process in reversed(world.processes):
                    stop_process(process, timeout=20)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BurstWorld]:
    with burst_world(tmp_path_factory.mktemp("bursts")) as built:
        yield built


def report(name: str, tally: Tally, count: int) -> None:
    print(
        f"\n{name}: {tally.served}/{count} served, {tally.reset} reset, "
        f"{len(tally.wrong)} wrong, {tally.seconds:.1f} s, "
        f"at most {tally.peak_held} ports of {TARGET}'s table held, "
        f"{tally.no_channel} calls refused for lack of one (and made again)"
    )


@pytest.mark.slow
async def test_a_burst_of_short_calls_with_a_slow_release_is_served_whole(
    world: BurstWorld,
) -> None:
    """The issue's failure: 200 at once; a port comes back twice the call's lifetime late.

    A client counting only its live calls (64) then has ~190 ports held at
    the target, over its 128, and loses connections with 126.
    """
    world.machine.set_channel_release_lag(0.005, per_call=2.0)
    try:
        port = free_port()
        client = world.start_client(SOURCE, f"{port}:{TARGET}:{world.echo_port}")
        tally = await burst(world.machine, port, 200)
        report("200 at once, release lag 2x the call", tally, 200)
        assert (tally.served, tally.reset, tally.wrong) == (200, 0, []), world.log_of(client)
    finally:
        world.machine.set_channel_release_lag(None)
        client.terminate()
        client.wait(30)


async def test_a_thousand_connections_at_once_are_all_served(world: BurstWorld) -> None:
    port = free_port()
    client = world.start_client(SOURCE, f"{port}:{TARGET}:{world.echo_port}")
    try:
        tally = await burst(world.machine, port, 1000)
        report("1,000 at once, default release lag", tally, 1000)
        assert (tally.served, tally.reset, tally.wrong) == (1000, 0, []), world.log_of(client)
    finally:
        client.terminate()
        client.wait(30)


@pytest.mark.parametrize("each", [200, pytest.param(500, marks=pytest.mark.slow)])
async def test_two_qubes_bursting_at_one_target_are_both_served_whole(
    world: BurstWorld, each: int
) -> None:
    """Both callers sit below the target: they share one half (128 ports) of its table."""
    assert world.machine.domain_id(SOURCE) < world.machine.domain_id(TARGET)
    assert world.machine.domain_id(SECOND_SOURCE) < world.machine.domain_id(TARGET)
    first_port, second_port = free_port(), free_port()
    first = world.start_client(SOURCE, f"{first_port}:{TARGET}:{world.echo_port}")
    second = world.start_client(SECOND_SOURCE, f"{second_port}:{TARGET}:{world.echo_port}")
    try:
        tallies: list[Tally] = []

        async def run(port: int, tag: str) -> None:
            tallies.append(await burst(world.machine, port, each, tag))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, first_port, "a")
            nursery.start_soon(run, second_port, "b")
        for tally in tallies:
            report(f"{each} + {each} at once from two qubes", tally, each)
        assert [(t.served, t.reset, t.wrong) for t in tallies] == [(each, 0, [])] * 2, world.log_of(
            first
        ) + world.log_of(second)
    finally:
        for client in (first, second):
            client.terminate()
            client.wait(30)


async def test_a_denied_burst_is_refused_once_per_connection(world: BurstWorld) -> None:
    """dom0's deny rule notifies the user per evaluation: never ask it twice for one connection."""
    port = free_port()
    client = world.start_client(SOURCE, f"{port}:{TARGET}:{world.denied_port}")
    try:
        tally = await burst(world.machine, port, 100)
        report("100 at once, denied by policy", tally, 100)
        assert (tally.served, tally.reset, tally.wrong) == (0, 100, [])
        decisions = world.policy_decisions(world.denied_port)
        assert len(decisions) == 100
        assert all("denied" in line for line in decisions)
    finally:
        client.terminate()
        client.wait(30)
