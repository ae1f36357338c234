"""qvm-connect-tcp's life: background start, bind errors, list/stop, signals, EMFILE, systemd."""

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.client_world import SOURCE, TARGET, World, exchange, free_port, make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("client-life")) as built:
        yield built


@pytest.fixture(autouse=True)
def no_binding_outlives_its_test(world: World) -> Iterator[None]:
    yield
    world.qconnect("stop", "--all")


def listed(world: World) -> list[dict[str, object]]:
    result = world.qconnect("list", "--json")
    assert result.returncode == 0, result.stderr
    answers: list[dict[str, object]] = json.loads(result.stdout)
    return answers


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


async def test_returns_once_bound_then_serves_and_is_listed_and_stopped(world: World) -> None:
    port = free_port()
    spec = f"{port}:{TARGET}:{world.ports['echo']}"
    started = world.run_client(spec)
    assert started.returncode == 0, started.stderr
    assert (
        started.stdout == f"Binding TCP '{TARGET}:{world.ports['echo']}' to 'localhost:{port}'...\n"
    )
    # serving as soon as the command returned, from the background
    assert await exchange(port, b"ping") == b"ping"
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"hold")
        assert await stream.receive_some(4) == b"hold"
        (answer,) = listed(world)
        binding = answer["bindings"][0]  # type: ignore[index]
        assert binding["spec"] == f"127.0.0.1:{spec}"
        assert binding["open"] == 1 and binding["served"] == 1
        table = world.qconnect("list").stdout
        assert f"127.0.0.1:{spec}" in table and str(answer["pid"]) in table
    pid = int(answer["pid"])  # type: ignore[call-overload]
    stopped = world.qconnect("stop", spec)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout == f"stopped 127.0.0.1:{spec}\n"
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        await trio.sleep(0.05)
    assert not pid_alive(pid)
    assert listed(world) == []
    with pytest.raises(OSError):
        await exchange(port, b"ping")


async def test_stop_one_binding_keeps_the_others(world: World) -> None:
    first, second = free_port(), free_port()
    specs = [f"{first}:{TARGET}:{world.ports['echo']}", f"{second}::{world.ports['echo']}"]
    assert world.run_client(*specs).returncode == 0
    assert world.qconnect("stop", specs[0]).returncode == 0
    (answer,) = listed(world)
    remaining = [b["spec"] for b in answer["bindings"]]  # type: ignore[attr-defined]
    assert remaining == [f"127.0.0.1:{second}:@default:{world.ports['echo']}"]
    assert await exchange(second, b"ping") == b"ping"
    missing = world.qconnect("stop", specs[0])
    assert missing.returncode == 1
    assert f"no running binding 127.0.0.1:{specs[0]}" in missing.stderr
    assert world.qconnect("stop", "--all").returncode == 0
    assert listed(world) == []


def test_port_in_use_is_reported_before_return(world: World) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = world.run_client(f"{free_port()}:{TARGET}:80", f"{port}:{TARGET}:80")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"qvm-connect-tcp: error: cannot listen on 127.0.0.1:{port}: the port is already in "
        "use (another binding? see 'qconnect list'; or pick another local port)"
    ]
    assert listed(world) == []  # nothing half-started: the first port was released too


def test_port_below_1024_without_privilege_says_what_to_do(world: World) -> None:
    # root without CAP_NET_BIND_SERVICE is refused ports below 1024 like any user
    result = subprocess.run(
        [
            "setpriv",
            "--bounding-set",
            "-net_bind_service",
            "--",
            *world.client_argv(f"80:{TARGET}:80"),
        ],
        env=world.env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "ports below 1024 need root" in result.stderr
    assert "'8080:mytcp-service:80'" in result.stderr


async def test_sigterm_lets_open_connections_finish_then_exits(world: World) -> None:
    port = free_port()
    client = world.start_client("--grace", "20", f"{port}:{TARGET}:{world.ports['echo']}")
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"before")
        assert await stream.receive_some(6) == b"before"
        client.send_signal(signal.SIGTERM)
        await world.wait_logged(client, "stopped accepting")  # logged once the listener closed
        with pytest.raises(OSError):  # no longer accepting
            await exchange(port, b"ping")
        await stream.send_all(b"during")  # the open connection still works
        assert await stream.receive_some(6) == b"during"
        assert client.poll() is None
    code, log = world.wait_client(client, 30)
    assert code == 0
    assert "SIGTERM: stopping" in log
    assert world.leftover_calls() == []


async def test_after_the_grace_period_open_connections_are_closed(world: World) -> None:
    port = free_port()
    client = world.start_client("--grace", "1", f"{port}:{TARGET}:{world.ports['echo']}")
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"x")
        assert await stream.receive_some(1) == b"x"
        client.send_signal(signal.SIGTERM)
        # EOF or a reset: either way the call is gone
        with trio.fail_after(15), contextlib.suppress(trio.BrokenResourceError):
            assert await stream.receive_some(1) == b""
    code, _ = world.wait_client(client, 30)
    assert code == 0
    assert world.leftover_calls() == []
    assert world.machine.calls_in_flight(SOURCE) == 0


async def test_out_of_file_descriptors_closes_connections_not_the_binding(world: World) -> None:
    port = free_port()

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

    client = world.start_client(
        f"{port}:{TARGET}:{world.ports['echo']}", preexec_fn=few_descriptors
    )
    streams = []
    for _ in range(60):  # more connections than the process has descriptors for
        streams.append(await trio.open_tcp_stream("127.0.0.1", port))
    for stream in streams:
        with trio.move_on_after(0.2):
            await stream.send_all(b"z")
    # Wait until the client says it ran out of descriptors (a loaded machine
    # may take a while to accept them all).
    await world.wait_logged(client, "Too many open files", timeout=60)
    await trio.sleep(1)  # deliberate: the behaviour under test is staying at the limit a while
    for stream in streams:
        await stream.aclose()
    # the binding survived and, once the closed connections are gone, serves normally again
    with trio.fail_after(60):
        while True:
            with contextlib.suppress(trio.BrokenResourceError, OSError):
                if await exchange(port, b"ping") == b"ping":
                    break
            await trio.sleep(0.5)
    for _ in range(5):
        with trio.fail_after(20):
            assert await exchange(port, b"ping") == b"ping"
    assert client.poll() is None
    _, log = world.stop_client(client)
    assert "Too many open files" in log


def test_systemd_socket_activation_serves_named_sockets(world: World, tmp_path: Path) -> None:
    echo_port, other_port = free_port(), free_port()
    notify_path = tmp_path / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    env = world.env()
    env["NOTIFY_SOCKET"] = str(notify_path)
    passed = ["PATH", "NOTIFY_SOCKET", "QCONNECT_LOOPBACK_MACHINE", "QCONNECT_LOOPBACK_QUBE"]
    activate = subprocess.Popen(
        [
            "systemd-socket-activate",
            *(f"-E{name}" for name in passed),
            "-l",
            f"127.0.0.1:{echo_port}",
            "-l",
            f"127.0.0.1:{other_port}",
            f"--fdname={TARGET}+{world.ports['echo']}:@default+{world.ports['echo']}",
            sys.executable,
            "-m",
            "qconnect.client.cli",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        deadline = time.monotonic() + 30
        while True:  # until systemd-socket-activate listens (it binds, then runs the client)
            try:
                conn = socket.create_connection(("127.0.0.1", echo_port), timeout=30)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and activate.poll() is None
                time.sleep(0.02)
        with conn:
            messages = notify.recv(4096).decode()
            assert "READY=1" in messages
            assert f"127.0.0.1:{echo_port}:{TARGET}:{world.ports['echo']}" in messages
            conn.sendall(b"activated")
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(100) == b"activated"
        with socket.create_connection(("127.0.0.1", other_port), timeout=30) as conn:
            conn.sendall(b"second")
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(100) == b"second"
        answers = listed(world)
        assert any(answer["systemd"] for answer in answers)
    finally:
        activate.terminate()
        _, log = activate.communicate(timeout=30)
        notify.close()
    assert activate.returncode == 0, log
    assert f"-> @default:{world.ports['echo']}" in log


@pytest.mark.parametrize("mode", [(), ("--relay",)])
async def test_no_descriptor_or_child_outlives_its_connection(
    world: World, mode: tuple[str, ...]
) -> None:
    port = free_port()
    client = world.start_client(*mode, f"{port}:{TARGET}:{world.ports['echo']}")
    assert await exchange(port, b"warm-up") == b"warm-up"
    # the event: the warm-up call has ended (logged, and its child reaped)
    await world.wait_logged(client, f"-> {TARGET}:{world.ports['echo']} ")
    with trio.fail_after(30):
        while Path(f"/proc/{client.pid}/task/{client.pid}/children").read_text().split():
            await trio.sleep(0.05)
    baseline = len(os.listdir(f"/proc/{client.pid}/fd"))
    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(exchange, port, b"x" * 1000)
    deadline = time.monotonic() + 10
    while len(os.listdir(f"/proc/{client.pid}/fd")) != baseline and time.monotonic() < deadline:
        await trio.sleep(0.05)
    assert len(os.listdir(f"/proc/{client.pid}/fd")) == baseline
    children = Path(f"/proc/{client.pid}/task/{client.pid}/children").read_text().split()
    assert children == []  # every call reaped: no zombie, no orphan
    assert world.stop_client(client)[0] == 0
