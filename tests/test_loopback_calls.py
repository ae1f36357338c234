"""The loopback qrexec-client-vm end to end: policy, service lookup, exit codes, environment.

Every test runs the generated ``bin/qrexec-client-vm`` as a real process
inside a loopback qube, against real services (executables, unix socket
services, the built-in /dev/tcp service) and real TCP servers.
"""

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qconnect.core.qrexec import EXIT_NO_SERVICE, EXIT_QREXEC_PROBLEM, EXIT_REFUSED
from qconnect.loopback.machine import Machine
from tests.conftest import BOTH_LOOPBACK_MODES, write_executable
from tests.servers import HttpServer

MakeMachine = Callable[..., Machine]

# Every test runs in-process and through the fork-server: the same behaviour.
LOOPBACK_MODES = BOTH_LOOPBACK_MODES

TIMEOUT = 30


def call(
    machine: Machine,
    source: str,
    target: str,
    service: str,
    *options: str,
    data: bytes = b"",
    local: tuple[str, ...] = (),
) -> "subprocess.CompletedProcess[bytes]":
    """Run ``qrexec-client-vm [options] TARGET SERVICE [LOCAL...]`` inside ``source``."""
    return machine.run(
        source,
        ["qrexec-client-vm", *options, target, service, *local],
        input=data,
        capture_output=True,
        timeout=TIMEOUT,
    )


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound but not listening: connect is refused)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port: int = holder.getsockname()[1]
    holder.close()
    return port


def bind_unix(path: Path) -> socket.socket:
    """A unix socket bound at ``path``, even past sun_path's 107 bytes (via /proc/self/fd)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        listener.bind(f"/proc/self/fd/{directory}/{path.name}")
    finally:
        os.close(directory)
    return listener


class UnixSocketService:
    """A socket service: a unix listener in a qube's rpc directory, recording each call's bytes.

    ``reply(received) -> bytes`` is sent back after the caller's EOF; the
    connection is then closed.
    """

    def __init__(self, path: Path, reply: Callable[[bytes], bytes] = lambda data: data) -> None:
        self.listener = bind_unix(path)
        self.listener.listen(16)
        self.reply = reply
        self.received: list[bytes] = []
        self.done = threading.Semaphore(0)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                chunks = []
                while data := conn.recv(65536):
                    chunks.append(data)
                received = b"".join(chunks)
                self.received.append(received)
                conn.sendall(self.reply(received))
            self.done.release()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def unix_service() -> Iterator[Callable[..., UnixSocketService]]:
    services: list[UnixSocketService] = []

    def make(path: Path, reply: Callable[[bytes], bytes] = lambda data: data) -> UnixSocketService:
        service = UnixSocketService(path, reply)
        services.append(service)
        return service

    yield make
    for service in services:
        service.close()


ALLOW_ALL = ["* * @anyvm @anyvm allow", "* * @anyvm @default allow target=web"]


def test_builtin_tcp_service_reaches_an_echo_server(
    loopback_machine: MakeMachine, echo_server: int
) -> None:
    machine = loopback_machine(
        "work", "web", policy=[f"qubes.ConnectTCP +{echo_server} work @default allow target=web"]
    )
    result = call(machine, "work", "@default", f"qubes.ConnectTCP+{echo_server}", data=b"ping\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"ping\n", b"")


def test_denied_call_prints_request_refused_and_exits_126(
    loopback_machine: MakeMachine, echo_server: int
) -> None:
    machine = loopback_machine("work", "web", policy=["qubes.ConnectTCP * work web deny"])
    result = call(machine, "work", "web", f"qubes.ConnectTCP+{echo_server}", data=b"ping\n")
    assert result.returncode == EXIT_REFUSED
    assert result.stderr == b"Request refused\n"
    assert result.stdout == b""
    assert "denied (30-loopback.policy:1)" in machine.log_file.read_text()


def test_call_without_matching_rule_is_refused(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine("work", "web")
    result = call(machine, "work", "web", "qubes.ConnectTCP+80")
    assert (result.returncode, result.stderr) == (EXIT_REFUSED, b"Request refused\n")


def test_policy_that_does_not_parse_refuses_every_call(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine("work", "web", policy=["qubes.ConnectTCP * work web alow"])
    result = call(machine, "work", "web", "qubes.ConnectTCP+80")
    assert (result.returncode, result.stderr) == (EXIT_REFUSED, b"Request refused\n")
    assert "policy error" in machine.log_file.read_text()


def test_builtin_tcp_connect_refused_exits_125_and_prints_nothing(
    loopback_machine: MakeMachine,
) -> None:
    machine = loopback_machine("work", "web", policy=["qubes.ConnectTCP * work web allow"])
    result = call(machine, "work", "web", f"qubes.ConnectTCP+{closed_port()}", data=b"x")
    assert (result.returncode, result.stdout, result.stderr) == (EXIT_QREXEC_PROBLEM, b"", b"")


@pytest.mark.parametrize("argument", ["0", "65536", "080", "-1", "1+2", "", "1" * 200, "0x50"])
def test_builtin_tcp_refuses_arguments_outside_the_port_rule(
    loopback_machine: MakeMachine, argument: str
) -> None:
    machine = loopback_machine("work", "web", policy=["qubes.ConnectTCP * work web allow"])
    result = call(machine, "work", "web", f"qubes.ConnectTCP+{argument}", data=b"x")
    assert (result.returncode, result.stdout, result.stderr) == (EXIT_QREXEC_PROBLEM, b"", b"")


def test_builtin_tcp_without_host_takes_host_and_port_from_argument(
    loopback_machine: MakeMachine, echo_server: int
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    (machine.rpc_dir("web") / "my.AnyTCP").symlink_to("/dev/tcp")
    result = call(machine, "work", "web", f"my.AnyTCP+127.0.0.1+{echo_server}", data=b"abc")
    # Without an rpc-config the TCP server gets the descriptor too, as in qrexec.
    expected = f"my.AnyTCP+127.0.0.1+{echo_server} work\0abc".encode()
    assert (result.returncode, result.stdout) == (0, expected)


def test_builtin_tcp_reaches_ipv6_loopback_when_the_link_names_it(
    loopback_machine: MakeMachine, ipv6_only_echo_server: int
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    (machine.rpc_dir("web") / "my.V6").symlink_to("/dev/tcp/::1")
    (machine.rpc_config_dir("web") / "my.V6").write_text("skip-service-descriptor=true\n")
    result = call(machine, "work", "web", f"my.V6+{ipv6_only_echo_server}", data=b"six")
    assert (result.returncode, result.stdout) == (0, b"six")


def test_stock_connect_tcp_cannot_reach_a_server_on_ipv6_only(
    loopback_machine: MakeMachine, ipv6_only_echo_server: int
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    result = call(machine, "work", "web", f"qubes.ConnectTCP+{ipv6_only_echo_server}", data=b"x")
    assert result.returncode == EXIT_QREXEC_PROBLEM


def test_missing_service_exits_127(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine(
        "work", "web", policy=["* * work web allow"], stock_connect_tcp=False
    )
    result = call(machine, "work", "web", "qubes.ConnectTCP+80", data=b"x")
    assert (result.returncode, result.stdout, result.stderr) == (EXIT_NO_SERVICE, b"", b"")
    assert "Service not found: qubes.ConnectTCP+80" in machine.log_file.read_text()


SHOW_CALL = """#!/bin/sh
printf 'argv=%s|' "$@"
printf 'argc=%s\\n' "$#"
printf 'arg=%s\\n' "$QREXEC_SERVICE_ARGUMENT"
printf 'full=%s\\n' "$QREXEC_SERVICE_FULL_NAME"
printf 'remote=%s\\n' "$QREXEC_REMOTE_DOMAIN"
printf 'qube=%s\\n' "$QCONNECT_LOOPBACK_QUBE"
printf 'client=%s\\n' "$(command -v qrexec-client-vm)"
printf 'stdin=%s\\n' "$(cat)"
echo "to stderr" >&2
exit 3
"""


def test_executable_service_gets_qrexec_argv_environment_and_stdin(
    loopback_machine: MakeMachine,
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    write_executable(machine.rpc_dir("web") / "my.Show", SHOW_CALL)
    result = call(machine, "work", "web", "my.Show+a.b-c", data=b"input bytes")
    lines = result.stdout.decode().splitlines()
    assert lines == [
        "argv=a.b-c|argc=1",
        "arg=a.b-c",
        "full=my.Show+a.b-c",
        "remote=work",
        "qube=web",
        f"client={machine.qrexec_client_vm}",
        "stdin=input bytes",
    ]
    assert result.stderr == b"to stderr\n"
    assert result.returncode == 3


def test_executable_service_without_argument_gets_no_argv1_and_trailing_plus(
    loopback_machine: MakeMachine,
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    write_executable(machine.rpc_dir("web") / "my.Show", SHOW_CALL)
    result = call(machine, "work", "web", "my.Show")
    lines = result.stdout.decode().splitlines()
    assert lines[:3] == ["argv=|argc=0", "arg=", "full=my.Show+"]


def test_service_with_argument_file_comes_before_plain_service(
    loopback_machine: MakeMachine,
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    write_executable(machine.rpc_dir("web") / "my.Svc", "#!/bin/sh\necho plain\n")
    write_executable(machine.rpc_dir("web") / "my.Svc+special", "#!/bin/sh\necho special\n")
    assert call(machine, "work", "web", "my.Svc+special").stdout == b"special\n"
    assert call(machine, "work", "web", "my.Svc+other").stdout == b"plain\n"


def test_rpc_dir_overrides_the_stock_service_of_the_qube_root(
    loopback_machine: MakeMachine,
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    write_executable(machine.rpc_dir("web") / "qubes.ConnectTCP", "#!/bin/sh\necho mine $1\n")
    assert call(machine, "work", "web", "qubes.ConnectTCP+22").stdout == b"mine 22\n"


def test_dom0_sanitises_service_and_target_names(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    write_executable(machine.rpc_dir("web") / "my.S_c", SHOW_CALL)
    result = call(machine, "work", "$default", "my.S\u00e9c+a/b")
    # "$default" reads as "@default", which no rule allows here: refused.
    assert result.returncode == EXIT_REFUSED
    result = call(machine, "work", "web", "my.S!c+a/b")
    assert b"full=my.S_c+a_b\n" in result.stdout


def test_unix_socket_service_gets_descriptor_then_the_callers_bytes(
    loopback_machine: MakeMachine, unix_service: Callable[..., UnixSocketService]
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    service = unix_service(machine.rpc_dir("web") / "my.Sock", lambda data: b"reply")
    result = call(machine, "work", "web", "my.Sock+42", data=b"payload")
    assert (result.returncode, result.stdout) == (0, b"reply")
    assert service.received == [b"my.Sock+42 work\0payload"]


def test_unix_socket_service_skips_descriptor_when_rpc_config_says_so(
    loopback_machine: MakeMachine, unix_service: Callable[..., UnixSocketService]
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    unix_service(machine.rpc_dir("web") / "my.Sock")
    (machine.rpc_config_dir("web") / "my.Sock+42").write_text(
        "# the argument's own config comes first\nskip-service-descriptor = true # ok\n"
    )
    (machine.rpc_config_dir("web") / "my.Sock").write_text("skip-service-descriptor=false\n")
    result = call(machine, "work", "web", "my.Sock+42", data=b"payload")
    assert (result.returncode, result.stdout) == (0, b"payload")
    result = call(machine, "work", "web", "my.Sock+7", data=b"payload")
    assert result.stdout == b"my.Sock+7 work\0payload"


def test_socket_service_failure_still_exits_0(
    loopback_machine: MakeMachine, tmp_path: Path
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(machine.rpc_dir("web") / "my.Sock"))
    listener.listen(1)

    def close_at_once() -> None:
        conn, _ = listener.accept()
        conn.close()

    thread = threading.Thread(target=close_at_once)
    thread.start()
    try:
        result = call(machine, "work", "web", "my.Sock", data=b"ignored")
    finally:
        thread.join(5)
        listener.close()
    assert (result.returncode, result.stdout) == (0, b"")


def test_socket_service_nobody_listens_exits_125(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(machine.rpc_dir("web") / "my.Sock"))
    listener.close()  # the socket file stays, nobody listens
    result = call(machine, "work", "web", "my.Sock", data=b"x")
    assert (result.returncode, result.stderr) == (EXIT_QREXEC_PROBLEM, b"")


def test_bad_rpc_config_fails_the_call_with_125(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    write_executable(machine.rpc_dir("web") / "my.Svc", "#!/bin/sh\necho ran\n")
    (machine.rpc_config_dir("web") / "my.Svc").write_text("skip-service-descriptor=yes\n")
    result = call(machine, "work", "web", "my.Svc")
    assert (result.returncode, result.stdout) == (EXIT_QREXEC_PROBLEM, b"")
    assert "unsupported start of value" in machine.log_file.read_text()


def test_non_executable_file_is_not_a_service(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    (machine.rpc_dir("web") / "my.Svc").write_text("#!/bin/sh\necho ran\n")
    result = call(machine, "work", "web", "my.Svc")
    assert (result.returncode, result.stdout) == (EXIT_QREXEC_PROBLEM, b"")


def test_executable_whose_interpreter_is_missing_exits_127(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    write_executable(machine.rpc_dir("web") / "my.Svc", "#!/nonexistent/interpreter\n")
    assert call(machine, "work", "web", "my.Svc").returncode == EXIT_NO_SERVICE


def test_service_killed_by_a_signal_exits_128_plus_signal(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    write_executable(machine.rpc_dir("web") / "my.Svc", "#!/bin/sh\nkill -TERM $$\n")
    assert call(machine, "work", "web", "my.Svc").returncode == 128 + 15


def test_service_can_call_further_from_the_target_qube(
    loopback_machine: MakeMachine, echo_server: int
) -> None:
    machine = loopback_machine(
        "work", "web", "db", policy=["my.Hop * work web allow", "qubes.ConnectTCP * web db allow"]
    )
    write_executable(
        machine.rpc_dir("web") / "my.Hop",
        f"#!/bin/sh\nexec qrexec-client-vm db qubes.ConnectTCP+{echo_server}\n",
    )
    result = call(machine, "work", "web", "my.Hop", data=b"two hops")
    assert (result.returncode, result.stdout) == (0, b"two hops")


def test_ask_is_refused_unless_the_machine_answers_allow(
    loopback_machine: MakeMachine, echo_server: int
) -> None:
    machine = loopback_machine(
        "work",
        "web",
        "db",
        policy=[
            "qubes.ConnectTCP * work web ask default_target=web",
            "qubes.ConnectTCP * work db ask",
        ],
    )
    service = f"qubes.ConnectTCP+{echo_server}"
    assert call(machine, "work", "web", service, data=b"x").returncode == EXIT_REFUSED
    machine.set_ask_answer("allow")
    result = call(machine, "work", "web", service, data=b"x")
    assert (result.returncode, result.stdout) == (0, b"x")
    # No target preselected: "allow" alone cannot choose one.
    assert call(machine, "work", "db", service, data=b"x").returncode == EXIT_REFUSED
    machine.set_ask_answer("allow db")
    assert call(machine, "work", "db", service, data=b"x").returncode == 0
    # The answer can only pick among the targets the dialog would offer.
    machine.set_ask_answer("allow work")
    assert call(machine, "work", "db", service, data=b"x").returncode == EXIT_REFUSED
    machine.set_ask_answer("deny")
    assert call(machine, "work", "web", service, data=b"x").returncode == EXIT_REFUSED


def test_local_program_talks_to_the_service_and_its_exit_code_counts(
    loopback_machine: MakeMachine, echo_server: int
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    script = write_executable(
        machine.qube_dir("work") / "local.sh",
        '#!/bin/sh\necho from-local\nexec 1>&-\nread reply\necho "got $reply" >&2\nexit 4\n',
    )
    result = call(machine, "work", "web", f"qubes.ConnectTCP+{echo_server}", local=(str(script),))
    assert result.stderr == b"got from-local\n"
    assert result.stdout == b""
    assert result.returncode == 4


def test_local_program_that_cannot_run_exits_255(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    write_executable(machine.rpc_dir("web") / "my.Svc", "#!/bin/sh\ncat >/dev/null\n")
    result = call(machine, "work", "web", "my.Svc", local=("/nonexistent/program",))
    assert result.returncode == 255
    assert b"execv" in result.stderr


def test_remote_failure_code_wins_over_local_program(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    write_executable(machine.rpc_dir("web") / "my.Svc", "#!/bin/sh\nexit 9\n")
    result = call(machine, "work", "web", "my.Svc", local=("/bin/true",))
    assert result.returncode == 9


def test_prefix_data_comes_before_stdin(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    write_executable(machine.rpc_dir("web") / "my.Cat", "#!/bin/sh\nexec cat\n")
    result = call(machine, "work", "web", "my.Cat", "--prefix-data=head:", data=b"body")
    assert result.stdout == b"head:body"


def test_client_outside_a_loopback_qube_says_how_to_run_it(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine("work")
    env = {key: value for key, value in os.environ.items() if not key.startswith("QCONNECT_")}
    result = subprocess.run(
        [str(machine.qrexec_client_vm), "web", "my.Svc"],
        env=env,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 1
    assert b"qconnect loopback run" in result.stderr
    assert b"Traceback" not in result.stderr


def test_client_start_up_imports_no_trio(loopback_machine: MakeMachine) -> None:
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['qrexec-client-vm', '--help']\n"
        "import qconnect.loopback.client, qconnect.policy.evaluate\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(loaded & {'trio', 'outcome', 'sniffio'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    assert result.stdout == "[]\n"


@pytest.mark.parametrize(
    ("options", "code", "message"),
    [
        ((), 2, b"usage: qrexec-client-vm"),
        (("web",), 2, b"usage: qrexec-client-vm"),
        (("--buffer-size=x", "web", "my.Svc"), 1, b"Bad buffer size: does not begin with a number"),
        (("--buffer-size=12k", "web", "my.Svc"), 1, b"Bad buffer size: trailing junk"),
        (("--buffer-size=4294967296", "web", "my.Svc"), 1, b"out of range"),
        (("--use-stdin-socket", "web", "my.Svc"), 2, b"stdin not a socket"),
        (("--frobnicate", "web", "my.Svc"), 2, b"unrecognized option '--frobnicate'"),
        (("-x", "web", "my.Svc"), 2, b"invalid option -- 'x'"),
    ],
)
def test_command_line_mistakes_exit_like_the_real_client(
    loopback_machine: MakeMachine, options: tuple[str, ...], code: int, message: bytes
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    result = machine.run(
        "work",
        ["qrexec-client-vm", *options],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == code
    assert message in result.stderr
    assert b"Traceback" not in result.stderr
    assert machine.calls_in_flight("work") == 0


def test_options_take_getopt_forms_and_stop_at_the_target(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    write_executable(machine.rpc_dir("web") / "my.Cat", "#!/bin/sh\nexec cat\n")
    # --buffer-size N (separate word), base-0 numbers, a unique prefix of a long
    # option and a short-option cluster all parse as getopt_long does.
    result = call(
        machine, "work", "web", "my.Cat", "--buffer-size", "0x10000", "--pref=A", "-tT", data=b"B"
    )
    assert (result.returncode, result.stdout) == (0, b"AB")
    help_result = machine.run(
        "work", ["qrexec-client-vm", "--help"], capture_output=True, timeout=TIMEOUT
    )
    assert (help_result.returncode, help_result.stdout[:6]) == (0, b"usage:")


def test_local_program_is_refused_with_use_stdin_socket(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    left, right = socket.socketpair()
    with left, right:
        result = machine.run(
            "work",
            ["qrexec-client-vm", "--use-stdin-socket", "web", "my.Svc", "/bin/true"],
            stdin=left.fileno(),
            capture_output=True,
            timeout=TIMEOUT,
        )
    assert result.returncode == 2
    assert b"cannot spawn a local process with --use-stdin-socket" in result.stderr


@pytest.mark.parametrize("host", ["192.0.2.1", "2001:db8::1", "localhost"])
def test_builtin_tcp_never_leaves_the_loopback_addresses(
    loopback_machine: MakeMachine, host: str
) -> None:
    """Only numeric loopback addresses: others are refused before any connect (no DNS)."""
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    (machine.rpc_dir("web") / "my.Out").symlink_to(f"/dev/tcp/{host}")
    result = call(machine, "work", "web", "my.Out+80", data=b"x")
    assert (result.returncode, result.stdout, result.stderr) == (EXIT_QREXEC_PROBLEM, b"", b"")
    log = machine.log_file.read_text()
    assert "loopback addresses only" in log or "getaddrinfo" in log


def test_socket_service_path_longer_than_sockaddr_un_is_still_reached(
    tmp_path: Path, unix_service: Callable[..., UnixSocketService]
) -> None:
    """sun_path holds 107 bytes; qrexec reaches longer socket paths another way, so do we."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    machine = Machine.create(deep / "machine", ["work", "web"], policy=["* * work web allow"])
    path = machine.rpc_dir("web") / "my.Sock"
    assert len(str(path)) > 108
    unix_service(path)
    result = call(machine, "work", "web", "my.Sock", data=b"far away")
    assert (result.returncode, result.stdout) == (0, b"my.Sock+ work\0far away")


def test_http_server_answers_through_the_builtin_service(
    loopback_machine: MakeMachine, http_server: HttpServer
) -> None:
    machine = loopback_machine("work", "web", policy=["* * work web allow"])
    request = b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
    result = call(machine, "work", "web", f"qubes.ConnectTCP+{http_server.port}", data=request)
    assert result.returncode == 0
    assert result.stdout.startswith(b"HTTP/1.0 200 ")
    assert result.stdout.endswith(b"\r\n\r\n" + http_server.body)


def test_old_client_has_no_stdin_socket_option(loopback_machine: MakeMachine) -> None:
    """What a caller that probes for --use-stdin-socket must fall back from."""
    machine = loopback_machine("work", "web", policy=["* * work web allow"], old_client=True)
    write_executable(machine.rpc_dir("web") / "my.Cat", "#!/bin/sh\nexec cat\n")
    help_result = machine.run(
        "work", ["qrexec-client-vm", "--help"], capture_output=True, timeout=TIMEOUT
    )
    assert help_result.returncode == 0
    assert b"--use-stdin-socket" not in help_result.stdout + help_result.stderr
    left, right = socket.socketpair()
    with left, right:
        refused = machine.run(
            "work",
            ["qrexec-client-vm", "--use-stdin-socket", "web", "my.Cat"],
            stdin=left.fileno(),
            capture_output=True,
            timeout=TIMEOUT,
        )
    assert refused.returncode == 2
    assert b"unrecognized option '--use-stdin-socket'" in refused.stderr
    # Without the option, calls work as before; switching back restores it.
    assert call(machine, "work", "web", "my.Cat", data=b"old").stdout == b"old"
    machine.set_old_client(False)
    help_result = machine.run(
        "work", ["qrexec-client-vm", "--help"], capture_output=True, timeout=TIMEOUT
    )
    assert b"--use-stdin-socket" in help_result.stdout
