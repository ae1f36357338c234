"""The generated units work: each socket's ListenStream= and each service's ExecStart=,
run under the real ``systemd-socket-activate`` (PID 1 here is not systemd), carry
traffic both ways to a qube of the loopback machine, and half-close holds.

``--accept --inetd`` is what ``Accept=yes`` + ``StandardInput=socket`` do; the
service's ``StandardOutput=journal`` is played by sending fd 1 to stderr.
``--fdname`` is what ``FileDescriptorName=`` does for daemon mode.
"""

import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qconnect.loopback import layout
from qconnect.loopback.machine import Machine
from qconnect.persist.render import exec_start_of, listen_of
from qconnect.service.install import install_into_rpc_dir
from tests.conftest import free_port
from tests.persist_tree import make_qube_tree, run_persist
from tests.servers import HalfCloseServer

MakeMachine = Callable[..., Machine]

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate"
)

USER_UNITS = "home/user/.config/systemd/user"

# How long a test waits for a listener to come up or for bytes to arrive
# before calling it a failure (generous: the machine may be busy).
_WAIT = 20.0


@pytest.fixture
def machine(loopback_machine: MakeMachine) -> Machine:
    """Qubes "work" (the client side) and "web" (runs qconnect's executable service)."""
    made = loopback_machine(
        "work",
        "web",
        policy=[
            "qubes.ConnectTCP * work web allow",
            "qubes.ConnectTCP * work @default allow target=web",
        ],
    )
    install_into_rpc_dir(made.rpc_dir("web"), rpc_config_dir=made.rpc_config_dir("web"))
    return made


@contextlib.contextmanager
def activated(
    machine: Machine,
    listens: list[str],
    argv: list[str],
    *,
    accept: bool,
    fdnames: list[str],
    stdout_is_socket: bool = False,
) -> Iterator[Path]:
    """Run ``argv`` under systemd-socket-activate inside qube "work"; yield its log file."""
    log = machine.directory / f"activate-{len(list(machine.directory.glob('activate-*')))}.log"
    command = ["systemd-socket-activate"]
    # systemd-socket-activate, like systemd, starts the service with a clean
    # environment: pass on only what says "this runs in qube work" and the
    # PATH that has the loopback qrexec-client-vm where a qube has /usr/bin's.
    for name in (layout.MACHINE_ENV, layout.QUBE_ENV, "PATH"):
        command += ["--setenv", name]
    for listen in listens:
        command += ["--listen", listen]
    if accept:
        command += ["--accept", "--inetd"]
    if fdnames:
        command += ["--fdname", ":".join(fdnames)]
    # StandardOutput=journal: the service's fd 1 is not the connection.
    redirect = "" if stdout_is_socket else " 1>&2"
    command += ["--", "/bin/sh", "-c", f'exec "$@"{redirect}', "sh", *argv]
    with open(log, "wb") as log_file:
        process = machine.popen(
            "work", command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + _WAIT
        while log.read_text().count("Listening on") < len(listens):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        yield log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def connect(listen: str) -> socket.socket:
    host, _colon, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    conn = socket.socket(family, socket.SOCK_STREAM)
    conn.settimeout(_WAIT)
    conn.connect((host, int(port)))
    return conn


def receive_all(conn: socket.socket) -> bytes:
    chunks = []
    while data := conn.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def check_reply_after_client_eof(listen: str, log: Path) -> None:
    """The client half-closes; the server answers afterwards; the answer arrives whole."""
    payload = os.urandom(300_000)
    with connect(listen) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        answer = receive_all(conn)
    assert answer == HalfCloseServer.summary(payload), log.read_text()


def check_server_eof_then_client_sends(listen: str, server: HalfCloseServer, log: Path) -> None:
    """The server half-closes first; the client sees EOF yet can still send."""
    with connect(listen) as conn:
        greeting = receive_all(conn)  # returns only because the server's FIN arrived
        assert greeting == HalfCloseServer.GREETING, log.read_text()
        conn.sendall(b"sent after the server's EOF")
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(1) == b""
    assert server.wait_received(timeout=_WAIT)[-1] == b"sent after the server's EOF"


def check_echo(listen: str, log: Path) -> None:
    payload = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(20_000))
    with connect(listen) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        assert receive_all(conn) == payload, log.read_text()


def add_binding(tree: Path, spec: str, *args: str) -> dict[str, str]:
    """``persist add`` into ``tree``; return the unit texts of the new binding, by file name."""
    before = set(os.listdir(tree / USER_UNITS)) if (tree / USER_UNITS).exists() else set()
    run_persist("add", spec, "--root", str(tree), "--user", *args, check=True)
    names = set(os.listdir(tree / USER_UNITS)) - before - {"sockets.target.wants"}
    return {name: (tree / USER_UNITS / name).read_text() for name in names}


def systemd_argv(exec_start: str) -> list[str]:
    """ExecStart= split as systemd does for our units: quotes, then ``$$`` -> ``$``."""
    return [word.replace("$$", "$") for word in shlex.split(exec_start)]


def per_connection_units(units: dict[str, str]) -> tuple[str, list[str]]:
    socket_text = next(text for name, text in units.items() if name.endswith(".socket"))
    service_text = next(text for name, text in units.items() if name.endswith("@.service"))
    return listen_of(socket_text), systemd_argv(exec_start_of(service_text))


def test_per_connection_handoff_units_carry_traffic_and_half_close(
    machine: Machine, tmp_path: Path, echo_server: int, half_close_server: HalfCloseServer
) -> None:
    tree = make_qube_tree(tmp_path / "qube")
    qcv = ["--qrexec-client-vm", str(machine.qrexec_client_vm)]
    servers = {
        "echo": echo_server,
        "reply": half_close_server.reply_after_eof_port,
        "first": half_close_server.writes_first_port,
    }
    specs = {
        "echo": f"[::1]:{free_port('::1')}:web:{servers['echo']}",
        "reply": f"{free_port()}:@default:{servers['reply']}",
        "first": f"{free_port()}:web:{servers['first']}",
    }
    units = {name: add_binding(tree, spec, *qcv) for name, spec in specs.items()}
    for name in servers:
        listen, argv = per_connection_units(units[name])
        assert argv[1:3] == ["--use-stdin-socket", "--"]  # auto-detected: handoff
        with activated(machine, [listen], argv, accept=True, fdnames=[]) as log:
            if name == "echo":
                check_echo(listen, log)
            elif name == "reply":
                check_reply_after_client_eof(listen, log)
            else:
                check_server_eof_then_client_sends(listen, half_close_server, log)


@pytest.fixture
def old_qrexec_client_vm(machine: Machine, tmp_path: Path) -> Path:
    """A qrexec-client-vm of an older Qubes: no --use-stdin-socket in its --help.

    Calls go to the loopback client without that option, which then applies
    the remote's EOF by closing its stdout, as the old agent does.
    """
    path = tmp_path / "old-bin" / "qrexec-client-vm"
    path.parent.mkdir()
    real = shlex.quote(str(machine.qrexec_client_vm))
    path.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = --help ]; then {real} --help 2>&1 | grep -v use-stdin-socket; exit 0; fi\n'
        f'exec {real} "$@"\n'
    )
    path.chmod(0o755)
    return path


def test_per_connection_socat_fallback_keeps_half_close_with_an_old_qrexec_client_vm(
    machine: Machine,
    tmp_path: Path,
    old_qrexec_client_vm: Path,
    half_close_server: HalfCloseServer,
) -> None:
    tree = make_qube_tree(tmp_path / "qube")
    qcv = ["--qrexec-client-vm", str(old_qrexec_client_vm)]
    first = add_binding(tree, f"{free_port()}:web:{half_close_server.writes_first_port}", *qcv)
    reply = add_binding(tree, f"{free_port()}:web:{half_close_server.reply_after_eof_port}", *qcv)
    listen, argv = per_connection_units(first)
    assert argv[4:6] == ["/bin/sh", "-c"] and "socat" in argv[6]  # auto-detected: socat
    with activated(machine, [listen], argv, accept=True, fdnames=[]) as log:
        check_server_eof_then_client_sends(listen, half_close_server, log)
    half_close_server.reply_delay = 1.0  # longer than socat's default -t of 0.5 s
    listen, argv = per_connection_units(reply)
    with activated(machine, [listen], argv, accept=True, fdnames=[]) as log:
        check_reply_after_client_eof(listen, log)


def test_the_naive_unit_of_the_documentation_loses_the_servers_half_close(
    machine: Machine, old_qrexec_client_vm: Path, half_close_server: HalfCloseServer
) -> None:
    """Why the fallback exists: StandardInput=socket straight into an old qrexec-client-vm
    (the Qubes documentation's unit) never passes the server's EOF to the client."""
    listen = f"127.0.0.1:{free_port()}"
    port = half_close_server.writes_first_port
    argv = [str(old_qrexec_client_vm), "web", f"qubes.ConnectTCP+{port}"]
    # StandardOutput=inherit, as in the documentation: fd 1 is the connection too.
    with (
        activated(machine, [listen], argv, accept=True, fdnames=[], stdout_is_socket=True) as log,
        connect(listen) as conn,
    ):
        # The greeting arrives (a loaded machine may take a while to start the call) ...
        conn.settimeout(30.0)
        data = b""
        while len(data) < len(HalfCloseServer.GREETING):
            chunk = conn.recv(65536)
            assert chunk, (data, log.read_text())
            data += chunk
        assert data == HalfCloseServer.GREETING, log.read_text()
        # ... but the server's EOF after it never does.
        conn.settimeout(2.0)
        with pytest.raises(TimeoutError):
            conn.recv(65536)


def test_daemon_mode_units_serve_every_binding_from_one_client(
    machine: Machine, tmp_path: Path, echo_server: int, half_close_server: HalfCloseServer
) -> None:
    tree = make_qube_tree(tmp_path / "qube")
    client = str(Path(sys.executable).parent / "qvm-connect-tcp")
    specs = [
        f"{free_port()}:web:{echo_server}",
        f"{free_port()}:@default:{half_close_server.reply_after_eof_port}",
        f"{free_port()}:web:{half_close_server.writes_first_port}",
    ]
    sockets = []
    for spec in specs:
        units = add_binding(tree, spec, "--mode", "daemon", "--qvm-connect-tcp", client)
        sockets.append(next(text for name, text in units.items() if name.endswith(".socket")))
    service = (tree / USER_UNITS / "qconnect-bindings.service").read_text()
    listens = [listen_of(text) for text in sockets]
    fdnames = [
        next(
            line for line in text.splitlines() if line.startswith("FileDescriptorName=")
        ).partition("=")[2]
        for text in sockets
    ]
    argv = systemd_argv(exec_start_of(service))
    assert argv == [client, "--systemd"]
    with activated(machine, listens, argv, accept=False, fdnames=fdnames) as log:
        check_echo(listens[0], log)
        check_reply_after_client_eof(listens[1], log)
        check_server_eof_then_client_sends(listens[2], half_close_server, log)
        check_echo(listens[0], log)  # the same client still serves
