"""qvm-connect-tcp through a loopback machine: calls, both modes, bytes, half-close, limits.

Real processes all the way: the client, the loopback qrexec-client-vm per
connection, dom0's policy, the socket service in mytcp-service, TCP servers.
"""

import re
from collections.abc import Iterator

import pytest
import trio

from tests.client_world import SOURCE, TARGET, World, exchange, free_port, make_world
from tests.servers import GREETING, bulk_transfer, summary

MODES = {"handoff": (), "relay": ("--relay",)}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("client-calls")) as built:
        yield built


async def closed_without_data(port: int) -> bool:
    """Whether the binding closes a connection without a byte (FIN or, unread data, RST)."""
    try:
        return await exchange(port, b"hello?") == b""
    except trio.BrokenResourceError:
        return True


def original_message(localport: str, vmname: str, port: str) -> str:
    """The line the original script prints, by its own rules (empty parts defaulted)."""
    return f"Binding TCP '{vmname or '@default'}:{port}' to 'localhost:{localport or port}'..."


async def test_original_forms_behave_as_the_original(world: World) -> None:
    """Empty VMNAME means @default; the start-up lines are the original's, word for word."""
    remote = str(world.ports["echo"])
    named, default = free_port(), free_port()
    client = world.start_client(f"{named}:{TARGET}:{remote}", f"{default}::{remote}", specs=2)
    assert world.startup_lines == [
        original_message(str(named), TARGET, remote),
        original_message(str(default), "", remote),
    ]
    assert await exchange(named, b"named") == b"named"
    assert await exchange(default, b"default") == b"default"
    code, log = world.stop_client(client)
    assert code == 0
    assert f"-> {TARGET}:{remote}" in log and f"-> @default:{remote}" in log


@pytest.mark.parametrize("vmname", [TARGET, ""])
async def test_empty_local_port_means_the_remote_port(world: World, vmname: str) -> None:
    remote = str(world.ports["echo"])
    # The echo server itself listens on 127.0.0.1:remote: bind the client on
    # 127.0.0.2, where that port is free.
    client = world.start_client("--bind", "127.0.0.2", f":{vmname}:{remote}")
    assert world.startup_lines == [original_message("", vmname, remote)]
    assert await exchange(int(remote), b"ping", host="127.0.0.2") == b"ping"
    assert world.stop_client(client)[0] == 0


async def test_several_specs_and_ipv6_in_one_call(world: World) -> None:
    first, second = free_port(), free_port("::1")
    client = world.start_client(
        f"{first}:{TARGET}:{world.ports['echo']}",
        f"[::1]:{second}::{world.ports['echo']}",
        specs=2,
    )
    assert await exchange(first, b"one") == b"one"
    assert await exchange(second, b"two", host="::1") == b"two"
    code, _ = world.stop_client(client)
    assert code == 0


@pytest.mark.parametrize("mode", MODES)
async def test_echo_and_one_log_line_per_connection(world: World, mode: str) -> None:
    port = free_port()
    client = world.start_client(*MODES[mode], f"{port}:{TARGET}:{world.ports['echo']}")
    for index in range(3):
        assert await exchange(port, b"x" * index + b"!") == b"x" * index + b"!"
    code, log = world.stop_client(client)
    assert code == 0
    lines = [line for line in log.splitlines() if f"-> {TARGET}:" in line]
    assert len(lines) == 3
    assert all(line.endswith(": closed") for line in lines)
    if mode == "relay":
        assert "1 bytes out, 1 bytes in" in lines[0]


@pytest.mark.parametrize("mode", MODES)
async def test_100_mib_each_way_byte_exact(world: World, mode: str) -> None:
    port = free_port()
    client = world.start_client(*MODES[mode], f"{port}:{TARGET}:{world.ports['bulk']}")
    await bulk_transfer(port, 100 << 20)
    assert world.stop_client(client)[0] == 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
async def test_1_gib_each_way_byte_exact(world: World, mode: str) -> None:
    port = free_port()
    client = world.start_client(*MODES[mode], f"{port}:{TARGET}:{world.ports['bulk']}")
    await bulk_transfer(port, 1 << 30)
    assert world.stop_client(client)[0] == 0


@pytest.mark.parametrize("mode", MODES)
async def test_client_half_close_still_gets_late_reply(world: World, mode: str) -> None:
    port = free_port()
    client = world.start_client(*MODES[mode], f"{port}:{TARGET}:{world.ports['late']}")
    # the server answers 2 s after our EOF, with the count and sha256 of what it got
    assert await exchange(port, b"a" * 1000) == summary(b"a" * 1000)
    assert world.stop_client(client)[0] == 0


@pytest.mark.parametrize("mode", MODES)
async def test_server_half_close_reaches_client_which_can_still_send(
    world: World, mode: str
) -> None:
    port = free_port()
    client = world.start_client(*MODES[mode], f"{port}:{TARGET}:{world.ports['early']}")
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        received = bytearray()
        with trio.fail_after(10):
            async for data in stream:  # ends at the server's EOF
                received += data
        assert bytes(received) == GREETING
        await stream.send_all(b"b" * 500)
        await stream.send_eof()
    servers = world.processes[0]
    assert servers.stdout is not None
    line = await trio.to_thread.run_sync(servers.stdout.readline)
    assert line.strip() == '{"early_received": 500}'
    assert world.stop_client(client)[0] == 0


@pytest.mark.parametrize(
    "count",
    [
        150,  # over qrexec's 128 calls in flight and over --max-connections
        pytest.param(1000, marks=pytest.mark.slow),
    ],
)
async def test_connections_opened_at_once_are_all_served(world: World, count: int) -> None:
    port = free_port()
    client = world.start_client(f"{port}:{TARGET}:{world.ports['echo']}")
    results: dict[int, bytes] = {}

    async def one(index: int) -> None:
        results[index] = await exchange(port, f"{index:010d}".encode())

    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(one, index)
    assert all(results[index] == f"{index:010d}".encode() for index in range(count))
    code, log = world.stop_client(client)
    assert code == 0
    assert "refused" not in log
    assert log.count(": closed") == count


async def test_refused_call_closes_connection_promptly_and_says_how_to_allow(
    world: World,
) -> None:
    port, not_allowed = free_port(), free_port()
    client = world.start_client(f"{port}:{TARGET}:{not_allowed}")
    with trio.fail_after(5):
        assert await closed_without_data(port)
    code, log = world.stop_client(client)
    assert code == 0
    assert "refused by dom0 policy" in log
    assert f"qconnect policy allow {SOURCE} --port {not_allowed} --target {TARGET}" in log


async def test_burst_of_refusals_is_logged_once_with_a_count(world: World) -> None:
    port, not_allowed = free_port(), free_port()
    client = world.start_client(f"{port}::{not_allowed}")
    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(closed_without_data, port)
    _, log = world.stop_client(client)
    # One full line per burst window (BURST_WINDOW seconds): one when the 40
    # calls fit in a window, a few more when a loaded machine spreads them out.
    full = log.count("refused by dom0 policy")
    counted = re.findall(rf"and (\d+) more calls to @default:{not_allowed} refused", log)
    assert full + sum(map(int, counted)) == 40, log
    assert full <= 4 and counted, log
    assert "--default-target QUBE" in log


async def test_unreachable_port_and_missing_service_are_told_apart(world: World) -> None:
    closed, missing = free_port(), free_port()
    client = world.start_client(
        f"{closed}:stock:{world.ports['closed']}",
        f"{missing}:noservice:{world.ports['echo']}",
        specs=2,
    )
    assert await closed_without_data(closed)
    assert await closed_without_data(missing)
    _, log = world.stop_client(client)
    assert "could not connect to its port" in log and "exit code 125" in log
    assert "noservice has no qubes.ConnectTCP service (exit code 127)" in log


async def test_max_connections_holds_the_rest_in_the_backlog(world: World) -> None:
    port = free_port()
    client = world.start_client("--max-connections", "2", f"{port}:{TARGET}:{world.ports['echo']}")
    streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(5)]
    try:
        for stream in streams:
            await stream.send_all(b"hi")
        served = []
        # only two are being served: their echo comes back, the others wait
        for stream in streams[:2]:
            with trio.fail_after(10):
                served.append(await stream.receive_some(2))
        assert served == [b"hi", b"hi"]
        with trio.move_on_after(1):
            await streams[2].receive_some(2)
            pytest.fail("a third connection was served over --max-connections 2")
        assert world.machine.calls_in_flight(SOURCE) == 2
        for stream in streams[:2]:
            await stream.aclose()
        for stream in streams[2:4]:
            with trio.fail_after(10):
                assert await stream.receive_some(2) == b"hi"
    finally:
        for stream in streams:
            await stream.aclose()
    _, log = world.stop_client(client)
    assert log.count("all 2 connection slots busy") == 1


async def test_older_qrexec_client_vm_without_stdin_socket_gets_the_relay(world: World) -> None:
    world.machine.set_old_client(True)
    try:
        port = free_port()
        client = world.start_client(f"{port}:{TARGET}:{world.ports['late']}")
        # half-close still exact: the reply comes 2 s after our EOF
        assert await exchange(port, b"c" * 300) == summary(b"c" * 300)
        code, log = world.stop_client(client)
    finally:
        world.machine.set_old_client(False)
    assert code == 0
    assert "listening, relay mode" in log
    assert f"300 bytes out, {len(summary(b'c' * 300))} bytes in" in log
