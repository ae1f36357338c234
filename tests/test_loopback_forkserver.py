"""The loopback fork-server: calls handed to a long-running process, and what it must survive.

The behaviour of calls themselves is proven in both modes by the other
test_loopback_* modules; here: that calls really run in the server's
children, the fallback to in-process, signals, a killed caller, a stopped
server, and hostile bytes on the server's socket. Real processes, real
sockets throughout.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qconnect.core.errors import LoopbackError
from qconnect.loopback import forkcall, layout
from qconnect.loopback.machine import Machine
from tests.conftest import BOTH_LOOPBACK_MODES, FORK_SERVER

MakeMachine = Callable[..., Machine]

# The tests that take ``loopback_machine`` run in both modes (same outcome).
LOOPBACK_MODES = BOTH_LOOPBACK_MODES

TIMEOUT = 30

# A service that says which process runs the call (qrexec's QREXEC_AGENT_PID:
# the loopback client's own pid), then echoes until EOF.
PID_SERVICE = '#!/bin/sh\necho "$QREXEC_AGENT_PID"\nexec cat\n'


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        # ProcessLookupError: the file was opened but the process was reaped before the read.
        return False
    return state != "Z"


def wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def new_machine(directory: Path) -> Machine:
    machine = Machine.create(directory, ["work", "web"], policy=["* * work web allow"])
    service = machine.rpc_dir("web") / "my.Pid"
    service.write_text(PID_SERVICE)
    service.chmod(0o755)
    return machine


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    """A machine with no server (the server tests start theirs)."""
    return new_machine(tmp_path / "machine")


class PidCall:
    """A running ``qrexec-client-vm web my.Pid``: ``agent`` is the pid that runs the call."""

    def __init__(self, machine: Machine, **popen: object) -> None:
        self.process = machine.popen(
            "work",
            machine.call_argv("web", "my.Pid"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **popen,
        )
        assert self.process.stdout is not None
        self.agent = int(self.process.stdout.readline())

    def finish(self) -> tuple[int, bytes]:
        """Send "bye", close stdin; (exit status, echoed bytes)."""
        stdout, _ = self.process.communicate(b"bye\n", timeout=TIMEOUT)
        return self.process.returncode, stdout

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=TIMEOUT)


@pytest.fixture
def pid_calls() -> Iterator[Callable[..., PidCall]]:
    calls: list[PidCall] = []

    def start(machine: Machine, **popen: object) -> PidCall:
        calls.append(PidCall(machine, **popen))
        return calls[-1]

    yield start
    for call in calls:
        call.close()


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:"):
            inodes.add(target)
    return inodes


def test_a_call_runs_in_a_child_of_the_server_without_the_servers_descriptors(
    machine: Machine, pid_calls: Callable[..., PidCall]
) -> None:
    with machine.server() as server:
        first = pid_calls(machine)
        second = pid_calls(machine)
        assert parent_of(first.agent) == server.pid
        assert first.agent != first.process.pid
        # Neither the listener, nor any connection (the other call's included)
        # reaches a call.
        server_sockets = socket_inodes(server.pid)
        assert len(server_sockets) >= 4  # listener, wake-up pair, two calls' connections
        assert not socket_inodes(first.agent) & server_sockets
        assert not socket_inodes(second.agent) & server_sockets
        assert first.finish() == (0, b"bye\n")
        assert second.finish() == (0, b"bye\n")


def test_without_a_server_or_with_a_stale_socket_the_call_runs_in_process(
    machine: Machine, pid_calls: Callable[..., PidCall]
) -> None:
    call = pid_calls(machine)
    assert call.agent == call.process.pid  # no server: the caller is the call
    assert call.finish() == (0, b"bye\n")
    # A server killed without its clean-up leaves its socket behind.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(machine.server_socket))
    stale.close()
    call = pid_calls(machine)
    assert call.agent == call.process.pid
    assert call.finish()[0] == 0
    with machine.server() as server:  # the next server replaces the stale socket
        call = pid_calls(machine)
        assert parent_of(call.agent) == server.pid
        assert call.finish()[0] == 0
    assert not machine.server_socket.exists()  # removed on a clean stop


def test_a_second_server_for_the_same_machine_is_refused(machine: Machine) -> None:
    with machine.server():
        with pytest.raises(LoopbackError, match="already served"), machine.server():
            pass
        assert machine.server_socket.exists()  # the first server's socket stays


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_the_caller_ends_the_call_as_it_ends_an_in_process_call(
    loopback_machine: MakeMachine,
    loopback_mode: str,
    pid_calls: Callable[..., PidCall],
    signum: int,
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    (machine.rpc_dir("web") / "my.Pid").write_text(PID_SERVICE)
    (machine.rpc_dir("web") / "my.Pid").chmod(0o755)
    call = pid_calls(machine)
    assert (call.agent != call.process.pid) == (loopback_mode == FORK_SERVER)
    call.process.send_signal(signum)
    assert call.process.wait(TIMEOUT) == -signum  # died of the signal, in both modes
    wait_for(lambda: not alive(call.agent))
    wait_for(lambda: machine.calls_in_flight("work") == 0)


def test_a_caller_started_ignoring_sigterm_keeps_its_call_through_one(
    loopback_machine: MakeMachine, pid_calls: Callable[..., PidCall]
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    (machine.rpc_dir("web") / "my.Pid").write_text(PID_SERVICE)
    (machine.rpc_dir("web") / "my.Pid").chmod(0o755)
    call = pid_calls(machine, preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
    call.process.send_signal(signal.SIGTERM)
    # deliberate: nothing is to happen, so there is no event to wait for; a
    # SIGTERM that got through would end the call within this time
    time.sleep(0.2)
    assert alive(call.agent)
    assert call.finish() == (0, b"bye\n")


def test_a_killed_caller_takes_its_call_and_call_slot_with_it(
    loopback_machine: MakeMachine, pid_calls: Callable[..., PidCall]
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    (machine.rpc_dir("web") / "my.Pid").write_text(PID_SERVICE)
    (machine.rpc_dir("web") / "my.Pid").chmod(0o755)
    call = pid_calls(machine)
    assert machine.calls_in_flight("work") == 1
    call.process.kill()  # SIGKILL: nothing of the caller runs any more
    assert call.process.wait(TIMEOUT) == -signal.SIGKILL
    wait_for(lambda: not alive(call.agent))
    wait_for(lambda: machine.calls_in_flight("work") == 0)


def test_sigterm_stops_the_server_once_running_calls_end(
    machine: Machine, pid_calls: Callable[..., PidCall]
) -> None:
    with machine.server() as server:
        running = pid_calls(machine)
        server.send_signal(signal.SIGTERM)
        wait_for(lambda: not machine.server_socket.exists())  # no new calls ...
        later = pid_calls(machine)
        assert later.agent == later.process.pid  # ... they run in-process
        assert server.poll() is None  # still there for the running call
        assert running.finish() == (0, b"bye\n")  # which gets its status
        assert server.wait(TIMEOUT) == 0
        assert later.finish()[0] == 0


def test_a_request_too_large_for_the_server_runs_in_process(
    machine: Machine, pid_calls: Callable[..., PidCall]
) -> None:
    # Linux takes at most 128 KiB per variable (MAX_ARG_STRLEN): several, then.
    large = {f"LARGE{index}": "x" * 60_000 for index in range(3)}
    env = dict(os.environ, **large)
    with machine.server():
        call = pid_calls(machine, env=env)
        assert call.agent == call.process.pid
        assert call.finish()[0] == 0


def test_descriptors_that_are_not_sockets_are_the_calls_stdio(
    loopback_machine: MakeMachine, tmp_path: Path
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    (machine.rpc_dir("web") / "my.Cat").write_text("#!/bin/sh\nexec cat\n")
    (machine.rpc_dir("web") / "my.Cat").chmod(0o755)
    source, output = tmp_path / "in", tmp_path / "out"
    source.write_bytes(b"from a file\n")
    with open(source, "rb") as stdin, open(output, "wb") as stdout:
        result = machine.run("work", machine.call_argv("web", "my.Cat"), stdin=stdin, stdout=stdout)
    assert (result.returncode, output.read_bytes()) == (0, b"from a file\n")
    with open(source, "rb") as stdin:
        result = machine.run(
            "work",
            machine.call_argv("web", "my.Cat", "--use-stdin-socket"),
            stdin=stdin,
            capture_output=True,
        )
    assert result.returncode == 2
    assert result.stderr == b"qrexec-client-vm: --use-stdin-socket passed, but stdin not a socket\n"


# -- hostile bytes on the server's socket --------------------------------------


def request_fds(cwd: Path) -> list[int]:
    """Four descriptors a real request carries: stdin, stdout, stderr, cwd (the caller closes)."""
    null = os.open(os.devnull, os.O_RDWR)
    return [null, os.dup(null), os.dup(null), os.open(cwd, os.O_PATH | os.O_DIRECTORY)]


def send(machine: Machine, payload: bytes, fds: list[int]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(TIMEOUT)
    sock.connect(str(machine.server_socket))
    try:
        if fds:
            socket.send_fds(sock, [payload], fds)
        else:
            sock.send(payload)
    finally:
        for fd in fds:
            os.close(fd)
    return sock


def replies(sock: socket.socket) -> list[bytes]:
    """Every reply until the server closes the connection."""
    with sock:
        answers = []
        while answer := sock.recv(forkcall.MAX_REPLY):
            answers.append(answer)
        return answers


def good_payload(machine: Machine, argv: list[bytes]) -> bytes:
    environ = {
        b"PATH": os.environb.get(b"PATH", b"/usr/bin:/bin"),
        os.fsencode(layout.MACHINE_ENV): os.fsencode(machine.directory),
        os.fsencode(layout.QUBE_ENV): b"work",
    }
    return forkcall.encode_request(argv, environ)


def test_junk_on_the_server_socket_is_refused_and_the_server_goes_on(
    machine: Machine, tmp_path: Path, pid_calls: Callable[..., PidCall]
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    good = good_payload(machine, [b"web", b"my.Pid"])
    junk: list[tuple[str, bytes, Callable[[], list[int]]]] = [
        ("no descriptors", good, list),
        ("no magic", b"junk\0", lambda: request_fds(tmp_path)),
        ("no final NUL", good[:-1], lambda: request_fds(tmp_path)),
        ("argc too large", forkcall.MAGIC + b"\x0099\0a\0", lambda: request_fds(tmp_path)),
        ("argc not a number", forkcall.MAGIC + b"\0-1\0", lambda: request_fds(tmp_path)),
        ("env without =", forkcall.MAGIC + b"\x000\0NOEQUALS\0", lambda: request_fds(tmp_path)),
        ("oversized", good + b"x" * forkcall.MAX_REQUEST, lambda: request_fds(tmp_path)),
        ("five descriptors", good, lambda: [*request_fds(tmp_path), os.open(os.devnull, 0)]),
        (
            "cwd not a directory",
            good,
            lambda: [*request_fds(tmp_path)[:3], os.open(not_a_directory, os.O_RDONLY)],
        ),
    ]
    with machine.server() as server:
        baseline = len(os.listdir(f"/proc/{server.pid}/fd"))
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        idle.connect(str(machine.server_socket))  # connects, never sends: must not block
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        silent.connect(str(machine.server_socket))
        silent.close()
        with idle:
            for name, payload, fds in junk:
                assert replies(send(machine, payload, fds())) == [], name
            # Every descriptor a refused request brought was closed; the idle
            # connection is still held (until REQUEST_SECONDS).
            wait_for(lambda: len(os.listdir(f"/proc/{server.pid}/fd")) == baseline + 1)
            with pytest.raises(OSError):  # the wrong socket type: refused by the kernel
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(
                    str(machine.server_socket)
                )
            call = pid_calls(machine)
            assert parent_of(call.agent) == server.pid
            assert call.finish()[0] == 0
    refused = [line for line in machine.server_log.read_text().splitlines() if "malformed" in line]
    assert len(refused) == len(junk)  # one line each


def test_a_request_whose_descriptors_are_not_sockets_is_served(
    machine: Machine, tmp_path: Path
) -> None:
    """stdin an O_PATH descriptor (unreadable), stdout and stderr files: the call still ends."""
    (tmp_path / "in").write_text("")
    (machine.rpc_dir("web") / "my.Cat").write_text("#!/bin/sh\nexec cat\n")
    (machine.rpc_dir("web") / "my.Cat").chmod(0o755)
    output = tmp_path / "out"
    fds = [
        os.open(tmp_path / "in", os.O_PATH),
        os.open(output, os.O_WRONLY | os.O_CREAT, 0o600),
        os.open(tmp_path / "err", os.O_WRONLY | os.O_CREAT, 0o600),
        os.open(tmp_path, os.O_PATH | os.O_DIRECTORY),
    ]
    with machine.server() as server:
        answers = replies(send(machine, good_payload(machine, [b"web", b"my.Cat"]), fds))
        assert [answer.split()[0] for answer in answers] == [b"pid", b"exit"]
        assert answers[1] == b"exit 0", (tmp_path / "err").read_text()
        # A directory as stdin ends the call as it ends a Python start: exit 1.
        fds = [os.open(tmp_path, os.O_PATH), *request_fds(tmp_path)[1:]]
        assert replies(send(machine, good_payload(machine, [b"web", b"my.Cat"]), fds))[1:] == [
            b"exit 1"
        ]
        assert server.poll() is None
        # A call with no argv at all: the usage error, from the same code.
        fds = request_fds(tmp_path)
        assert replies(send(machine, good_payload(machine, []), fds))[1:] == [b"exit 2"]


# -- the pure parts -----------------------------------------------------------


def test_requests_round_trip_and_junk_is_a_bad_request() -> None:
    argv = [b"--use-stdin-socket", b"web", b"qubes.ConnectTCP+80", b""]
    environ = {b"A": b"1", b"EMPTY": b"", b"EQUALS": b"a=b"}
    assert forkcall.decode_request(forkcall.encode_request(argv, environ)) == (argv, environ)
    with pytest.raises(forkcall.BadRequest):
        forkcall.encode_request([b"a\0b"], {})
    for junk in (b"", b"\0", forkcall.MAGIC + b"\0", forkcall.MAGIC + b"\x001234567\0"):
        with pytest.raises(forkcall.BadRequest):
            forkcall.decode_request(junk)
    assert forkcall.decode_reply(b"pid 12") == ("pid", 12)
    assert forkcall.decode_reply(b"signal 9") == ("signal", 9)
    assert forkcall.decode_reply(b"exit -1") == ("", 0)
    assert forkcall.MACHINE_ENV == layout.MACHINE_ENV


def test_the_per_call_entry_imports_almost_nothing() -> None:
    """What the launcher loads before connecting: no socket, signal, pathlib or typing.

    The few standard modules it may use are loaded first (what ``import os``
    pulls in differs between Python versions: 3.13's imports errno); whatever
    importing forkcall adds beyond them must be the project's own.
    """
    project = str(Path(forkcall.__file__).resolve().parents[2])
    script = (
        f"import sys; sys.path.insert(0, {project!r})\n"
        "import os, _signal, _socket\n"
        "before = set(sys.modules)\n"
        "import qconnect.loopback.forkcall\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-IS", "-c", script], capture_output=True, text=True, check=True
    )
    assert set(result.stdout.split()) <= {
        "qconnect",
        "qconnect.loopback",
        "qconnect.loopback.forkcall",
        "qconnect.core",  # its __init__ is a docstring
        "qconnect.core.unixpath",
    }
