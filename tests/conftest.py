"""Shared fixtures: a loopback Qubes machine and small real servers on ephemeral ports.

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
import hashlib
import http.server
import itertools
import random
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

from qconnect.loopback.machine import Machine

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

# Teardown waits this long for a server thread to finish before giving up on
# it (threads are daemons; a stuck one cannot hang the test run).
_JOIN_SECONDS = 5.0

# Large enough that the echo server is not what limits a 100 MiB test.
_RECV_SIZE = 256 * 1024

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


class ThreadedTCPServer:
    """A TCP listener on ``host``:ephemeral that runs ``handler(conn)`` in a thread per connection.

    Resource handling: ``close()`` shuts the listener and every open
    connection, then joins the threads; the handler must not close ``conn``
    (the server does, after the handler returns).
    """

    def __init__(self, handler: Callable[[socket.socket], None], host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            self.listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.listener.bind((host, 0))
        self.listener.listen(1024)
        self.host = host
        self.port: int = self.listener.getsockname()[1]
        self.handler = handler
        self.connections: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.accepted = 0
        self.acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self.acceptor.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self.lock:
                self.accepted += 1
                self.connections.add(conn)
                self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            with self.lock:
                self.connections.discard(conn)
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        self.acceptor.join(_JOIN_SECONDS)
        with self.lock:
            open_connections = list(self.connections)
            threads = list(self.threads)
        for conn in open_connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(_JOIN_SECONDS)


def echo(conn: socket.socket) -> None:
    """Send back every byte; after the client's EOF, send EOF (half-close aware)."""
    while data := conn.recv(_RECV_SIZE):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


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
    server = ThreadedTCPServer(echo)
    try:
        yield server.port
    finally:
        server.close()


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


@dataclass(frozen=True)
class HttpServer:
    """An HTTP server on 127.0.0.1:port whose every GET answers 200 with ``body``."""

    port: int
    body: bytes

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


@pytest.fixture
def http_server() -> Iterator[HttpServer]:
    """A threaded HTTP/1.0 server (http.server) on 127.0.0.1:ephemeral."""
    body = b"hello from the http_server fixture\n"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield HttpServer(server.server_address[1], body)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(_JOIN_SECONDS)


class HalfCloseServer:
    """Two listeners on 127.0.0.1 that prove each direction's EOF travels alone.

    - ``reply_after_eof_port``: reads until the client's EOF, waits
      ``reply_delay`` seconds (set it; default 0.2), then sends
      ``b"<count> <sha256 hex>\\n"`` of what it received and closes.
    - ``writes_first_port``: sends ``GREETING``, shuts its write side at
      once, reads until the client's EOF, and records the bytes; a test
      reads them with ``wait_received()``.
    """

    GREETING = b"server done sending; you may still send\n"

    def __init__(self) -> None:
        self.reply_delay = 0.2
        self.received: list[bytes] = []
        self._received_changed = threading.Condition()
        self._reply = ThreadedTCPServer(self._reply_after_eof)
        self._first = ThreadedTCPServer(self._write_first)
        self.reply_after_eof_port = self._reply.port
        self.writes_first_port = self._first.port

    @staticmethod
    def summary(data: bytes) -> bytes:
        """What reply_after_eof answers for ``data``."""
        return f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode()

    def _reply_after_eof(self, conn: socket.socket) -> None:
        digest = hashlib.sha256()
        count = 0
        while data := conn.recv(_RECV_SIZE):
            digest.update(data)
            count += len(data)
        time.sleep(self.reply_delay)
        conn.sendall(f"{count} {digest.hexdigest()}\n".encode())

    def _write_first(self, conn: socket.socket) -> None:
        conn.sendall(self.GREETING)
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while data := conn.recv(_RECV_SIZE):
            chunks.append(data)
        with self._received_changed:
            self.received.append(b"".join(chunks))
            self._received_changed.notify_all()

    def wait_received(self, count: int = 1, timeout: float = 10.0) -> list[bytes]:
        """Block until ``count`` connections to writes_first_port have ended; return their bytes."""
        with self._received_changed:
            if not self._received_changed.wait_for(lambda: len(self.received) >= count, timeout):
                raise TimeoutError(f"writes_first server saw {len(self.received)} of {count} EOFs")
            return list(self.received)

    def close(self) -> None:
        self._reply.close()
        self._first.close()


@pytest.fixture
def half_close_server() -> Iterator[HalfCloseServer]:
    """A HalfCloseServer (two ports; see the class)."""
    server = HalfCloseServer()
    try:
        yield server
    finally:
        server.close()
