"""Shared fixtures: a loopback Qubes machine and small real servers on ephemeral ports.

The servers themselves are in :mod:`tests.servers` (shared with the benchmarks);
here are the fixtures that start them for one test.

Everything here is synchronous (threads), so it works from sync tests and
from trio tests alike, and everything is torn down at the end of the test
that asked for it: listeners closed, open connections shut, threads joined.

- ``loopback_machine(*qubes, policy=(), stock_connect_tcp=True, ask=None, old_client=False)``
  ``-> Machine``; its calls run in-process, or through the machine's fork-server
  when ``loopback_mode`` is "fork-server". A test module that sets
  ``LOOPBACK_MODES = BOTH_LOOPBACK_MODES`` runs each of its machine tests in both.
- ``echo_server -> int`` (port on 127.0.0.1; echoes, then half-closes after the client's EOF)
- ``ipv6_only_echo_server -> int`` (the same on [::1] only)
- ``http_server -> HttpServer`` (.port, .body: every GET answers 200 with .body)
- ``half_close_server -> HalfCloseServer`` (see its docstring)

and plain helpers: ``free_port(host)``, ``tcp_pair()``, ``recv_all(sock)``,
``write_executable(path, text)``.
"""

import atexit
import contextlib
import itertools
import random
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

from qconnect.loopback.machine import Machine
from tests.servers import HalfCloseServer, HttpServer, Servers, ThreadedTCPServer, echo, serve_http

# Hypothesis' timing checks (a deadline per example, "input generation is
# slow") measure how busy the machine is, not the code: on a loaded 2-core
# machine they fail at random. Every property test runs without them. Nor does
# Hypothesis keep its example database, and what else it stores (a cache of the
# constants in the code under test) goes to a temporary directory removed at
# exit, not to ./.hypothesis: nothing is written into the checkout.
_hypothesis_home = tempfile.mkdtemp(prefix="qconnect-hypothesis-")
atexit.register(shutil.rmtree, _hypothesis_home, ignore_errors=True)
set_hypothesis_home_dir(_hypothesis_home)
settings.register_profile(
    "qconnect",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
settings.load_profile("qconnect")

#: How a loopback machine's qrexec-client-vm runs a call: in its own process
#: (no server), or handed to the machine's fork-server (``Machine.server()``).
IN_PROCESS = "in-process"
FORK_SERVER = "fork-server"
BOTH_LOOPBACK_MODES = (IN_PROCESS, FORK_SERVER)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run a module's loopback machine tests in every mode its LOOPBACK_MODES names."""
    modes = getattr(metafunc.module, "LOOPBACK_MODES", None)
    if modes and "loopback_mode" in metafunc.fixturenames:
        metafunc.parametrize("loopback_mode", modes)


# -- plain helpers for tests (import them: ``from tests.conftest import tcp_pair``) --


# Ports that free_port() hands out: below the kernel's ephemeral range
# (ip_local_port_range, 32768-60999 by default), so no bind(0) and no outgoing
# connection's source port can take one between the test's probe and the bind
# of the program under test; and above the ports services commonly hold
# (8000-8100, 8080, 8443, 9000, ...).
_FREE_PORTS = range(20000, 32768)
_handed_out: set[tuple[str, int]] = set()
_handed_out_lock = threading.Lock()


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _FREE_PORTS.stop


def free_port(host: str = "127.0.0.1") -> int:
    """A free port on ``host`` for a program that binds it itself (one that takes 0: use 0).

    Each port is probed free (bound and released, as strictly as a listener
    binds it), never handed out twice in this process, and chosen at random
    outside the kernel's ephemeral range, so nothing else on the machine is
    handed it by chance before the program binds it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ports = range(_FREE_PORTS.start, min(_FREE_PORTS.stop, _ephemeral_floor()))
    for _ in range(1000):
        port = random.choice(ports)
        with _handed_out_lock:
            if (host, port) in _handed_out:
                continue
            with socket.socket(family) as probe:
                try:
                    probe.bind((host, port))
                except OSError:
                    continue
            _handed_out.add((host, port))
            return port
    raise RuntimeError(f"no free port on {host} in {ports}")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on 127.0.0.1: (the user's end, the accepted end)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        user = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    return user, accepted


def recv_all(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """Everything ``sock`` receives until EOF (socket.timeout after ``timeout`` idle seconds)."""
    sock.settimeout(timeout)
    chunks = []
    while data := sock.recv(1 << 16):
        chunks.append(data)
    return b"".join(chunks)


def write_executable(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` and make it executable (a service or a local program)."""
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def loopback_mode() -> str:
    """The loopback mode of ``loopback_machine``: in-process unless a module asks for both."""
    return IN_PROCESS


@pytest.fixture
def loopback_machine(tmp_path: Path, loopback_mode: str) -> Iterator[Callable[..., Machine]]:
    """Factory: ``loopback_machine("work", "web::server", policy=[...]) -> Machine``.

    Each call creates a new machine under tmp_path (qube specs as for
    ``qconnect loopback init``: ``NAME[:TYPE][:TAG,...]``); ``policy`` lines
    go to policy.d/30-loopback.policy, ``ask`` answers ask rules ("allow",
    "allow QUBE", "deny"), ``stock_connect_tcp=False`` leaves out the stock
    qubes.ConnectTCP -> /dev/tcp/127.0.0.1 of today's Qubes, ``old_client=True``
    plays a qrexec-client-vm without --use-stdin-socket (for fallback tests).
    In the fork-server mode each machine's server runs until the test ends.
    """
    numbers = itertools.count()
    servers = contextlib.ExitStack()

    def make(
        *qubes: str,
        policy: Sequence[str] = (),
        stock_connect_tcp: bool = True,
        ask: str | None = None,
        old_client: bool = False,
    ) -> Machine:
        machine = Machine.create(
            tmp_path / f"loopback-{next(numbers)}",
            qubes,
            policy=policy,
            stock_connect_tcp=stock_connect_tcp,
        )
        if ask is not None:
            machine.set_ask_answer(ask)
        if old_client:
            machine.set_old_client(True)
        if loopback_mode == FORK_SERVER:
            servers.enter_context(machine.server())
        return machine

    with servers:
        yield make


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1:ephemeral; yields its port."""
    with Servers({"echo": echo}) as running:
        yield running["echo"]


@pytest.fixture
def ipv6_only_echo_server() -> Iterator[int]:
    """A TCP echo server listening on [::1] only (IPV6_V6ONLY); yields its port."""
    try:
        server = ThreadedTCPServer(echo, host="::1")
    except OSError as error:
        pytest.skip(f"no IPv6 loopback on this host: {error}")
    try:
        yield server.port
    finally:
        server.close()


@pytest.fixture
def http_server() -> Iterator[HttpServer]:
    """A threaded HTTP/1.0 server (http.server) on 127.0.0.1:ephemeral."""
    with serve_http(b"hello from the http_server fixture\n") as server:
        yield server


@pytest.fixture
def half_close_server() -> Iterator[HalfCloseServer]:
    """A HalfCloseServer (two ports; see the class)."""
    with HalfCloseServer() as server:
        yield server
