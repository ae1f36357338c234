"""The loopback ``qrexec-client-vm``: one call, from the calling qube to the service.

Real qrexec splits a call across three programs: qrexec-client-vm in the
calling qube, qrexec-daemon and the policy in dom0, qrexec-agent in the
target qube, with vchan byte streams in between. Here one short-lived process
plays all of them for one call:

1. reads the command line exactly as qrexec-client-vm does
   (``[--use-stdin-socket] [--buffer-size=N] TARGET SERVICE[+ARG] [LOCAL_PROGRAM ARGS...]``);
2. as dom0: sanitises the names, evaluates the policy (deny: "Request
   refused", exit 126) and takes one of the calling qube's call slots;
3. as the target's agent: reads the rpc-config, finds the service and starts
   it (executable), connects to it (socket service) or makes the built-in TCP
   connection (``/dev/tcp`` symlink);
4. relays the bytes, each side applying the EOF rules its real counterpart
   applies (qubes-core-qrexec, libqrexec/process_io.c), and exits with the
   remote exit code.

It starts once per connection, so it imports the standard library only (no
trio) and copies with ``qconnect.byterelay`` (splice, one thread per
direction). Known differences from real qrexec are listed in the README.
"""

import contextlib
import errno
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from qconnect.loopback import layout, slots
from qconnect.loopback.agent import (
    CallFailed,
    Request,
    connect_tcp,
    connect_unix,
    find_service,
    load_config,
    start_executable,
    tcp_address,
)
from qconnect.qrexec import (
    EXIT_REFUSED,
    MAX_CALLS_IN_FLIGHT,
    is_valid_qube_name,
    sanitize_service,
    sanitize_target,
)
from qconnect.relay.blocking import ReadFailed, WriteFailed, pump, write_all

PROG = "qrexec-client-vm"

USAGE = f"""\
usage: {PROG} [options] target_vmname program_ident [local_program [local program arguments]]
Options:
  -h, --help - print this message
  --buffer-size=BUFFER_SIZE - minimum vchan buffer size (default: 64k)
  -t, --filter-escape-chars-stdout - filter non-ASCII and control characters on stdout
  -T, --filter-escape-chars-stderr - filter non-ASCII and control characters on stderr
  --no-filter-escape-chars-stdout - opposite to --filter-escape-chars-stdout
  --no-filter-escape-chars-stderr - opposite to --filter-escape-chars-stderr
  --agent-socket=PATH - path to connect to (ignored by the loopback)
  -p PREFIX-DATA, --prefix-data=PREFIX-DATA - send the given data before the provided stdin
  --use-stdin-socket - use fd 0 (which must be socket) for both stdin and stdout
  -s SOURCE-QUBE, --source-qube=SOURCE-QUBE - source of a relayed call (ignored by the loopback)
"""

# getopt_long's table in qrexec-client-vm.c: long name -> (short key, takes a value).
_LONG_OPTIONS = {
    "buffer-size": ("b", True),
    "filter-escape-chars-stdout": ("t", False),
    "filter-escape-chars-stderr": ("T", False),
    "no-filter-escape-chars-stdout": ("no-t", False),
    "no-filter-escape-chars-stderr": ("no-T", False),
    "agent-socket": ("a", True),
    "prefix-data": ("p", True),
    "use-stdin-socket": ("use-stdin-socket", False),
    "source-qube": ("s", True),
    "help": ("h", False),
}
_SHORT_OPTIONS = {"t": False, "T": False, "a": True, "p": True, "s": True, "h": False}

# The largest --buffer-size qrexec-client-vm accepts (it must fit a C int).
_INT_MAX = 2**31 - 1

# How long, after the service side has ended, the relay of its last bytes to
# the caller may take before the call ends anyway (a caller that does not read
# would otherwise keep a finished call, and its call slot, forever).
_FINAL_FLUSH_SECONDS = 5.0


class UsageError(Exception):
    """A command line qrexec-client-vm refuses; ``exit_code`` and whether to print usage."""

    def __init__(self, message: str, exit_code: int = 2, *, show_usage: bool = True) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.show_usage = show_usage


@dataclass
class Options:
    """The parsed command line."""

    target: str = ""
    service: str = ""
    local_program: list[str] = field(default_factory=list)
    use_stdin_socket: bool = False
    buffer_size: int = 0
    prefix_data: bytes = b""
    help: bool = False


def _parse_buffer_size(text: str) -> int:
    """strtoul(text, 0) as qrexec-client-vm checks it: a leading digit, no junk, <= INT_MAX."""
    if not text[:1].isdigit() or not text[:1].isascii():
        raise UsageError("Bad buffer size: does not begin with a number", 1, show_usage=False)
    digits, base = text, 10
    if text[:2].lower() == "0x":
        digits, base = text[2:], 16
    elif text.startswith("0") and len(text) > 1:
        digits, base = text[1:], 8
    try:
        value = int(digits, base) if digits.isascii() and digits.isalnum() else None
    except ValueError:
        value = None
    if value is None:
        raise UsageError("Bad buffer size: trailing junk", 1, show_usage=False)
    if value > _INT_MAX:
        raise UsageError("strtoul: Numerical result out of range", 1, show_usage=False)
    return value


def _check_stdin_socket() -> None:
    try:
        kind = _socket_type(0)
    except OSError as error:
        if error.errno == errno.ENOTSOCK:
            raise UsageError(
                "--use-stdin-socket passed, but stdin not a socket", show_usage=False
            ) from None
        raise UsageError(
            f"getsockopt(0, SOL_SOCKET, SO_TYPE): {error.strerror}", show_usage=False
        ) from None
    if kind != socket.SOCK_STREAM:
        raise UsageError(
            f"stdin was a socket of type {kind}, not SOCK_STREAM ({int(socket.SOCK_STREAM)})",
            show_usage=False,
        )


def _socket_type(fd: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)


def usage(*, stdin_socket_option: bool = True) -> str:
    """The usage text; an older client's has no --use-stdin-socket line."""
    if stdin_socket_option:
        return USAGE
    return "".join(line for line in USAGE.splitlines(True) if "--use-stdin-socket" not in line)


def parse_command_line(argv: list[str], *, stdin_socket_option: bool = True) -> Options:
    """Parse like getopt_long with "+" (options end at the first non-option word).

    ``stdin_socket_option=False`` plays a qrexec-client-vm from before
    ``--use-stdin-socket`` existed: the option is unknown.
    """
    options = Options()
    long_options = dict(_LONG_OPTIONS)
    if not stdin_socket_option:
        del long_options["use-stdin-socket"]
    index = 0

    def apply(key: str, value: str | None) -> None:
        if key == "b":
            assert value is not None
            options.buffer_size = _parse_buffer_size(value)
        elif key == "p":
            if options.prefix_data:
                raise UsageError("--prefix-data can only be used once")
            options.prefix_data = os.fsencode(value or "")
        elif key == "use-stdin-socket":
            if options.use_stdin_socket:
                raise UsageError("--use-stdin-socket passed twice", show_usage=False)
            _check_stdin_socket()
            options.use_stdin_socket = True
        elif key == "h":
            options.help = True
        # -t/-T and their negations (escape filtering), -a and -s are accepted
        # and have no effect in the loopback (see the README).

    while index < len(argv):
        word = argv[index]
        if word == "--":
            index += 1
            break
        if word.startswith("--"):
            name, equals, value = word[2:].partition("=")
            matches = [long for long in long_options if long.startswith(name)]
            if name in long_options:
                matches = [name]
            if len(matches) != 1:
                problem = "ambiguous" if matches else "unrecognized"
                raise UsageError(f"{PROG}: {problem} option '--{name}'")
            key, takes_value = long_options[matches[0]]
            if takes_value and not equals:
                index += 1
                if index >= len(argv):
                    raise UsageError(f"{PROG}: option '--{matches[0]}' requires an argument")
                value = argv[index]
            elif not takes_value and equals:
                raise UsageError(f"{PROG}: option '--{matches[0]}' doesn't allow an argument")
            apply(key, value if takes_value else None)
            index += 1
            continue
        if word.startswith("-") and word != "-":
            position = 1
            while position < len(word):
                letter = word[position]
                if letter not in _SHORT_OPTIONS:
                    raise UsageError(f"{PROG}: invalid option -- '{letter}'")
                if _SHORT_OPTIONS[letter]:
                    value = word[position + 1 :]
                    if not value:
                        index += 1
                        if index >= len(argv):
                            raise UsageError(f"{PROG}: option requires an argument -- '{letter}'")
                        value = argv[index]
                    apply(letter, value)
                    break
                apply(letter, None)
                position += 1
            index += 1
            continue
        break
    positional = argv[index:]
    if options.help:
        return options
    if len(positional) < 2:
        raise UsageError("")
    options.target, options.service = positional[0], positional[1]
    options.local_program = positional[2:]
    if options.local_program and options.use_stdin_socket:
        raise UsageError("cannot spawn a local process with --use-stdin-socket")
    return options


class Refused(Exception):
    """dom0 refuses the call: the caller sees "Request refused" and 126; the reason is logged."""


class Logger:
    """Appends the lines real qrexec would put in dom0's and the qubes' journals.

    One ``write`` per line on an O_APPEND file, so concurrent calls never
    interleave within a line. Logging never fails a call.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, component: str, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        line = f"{stamp} {component}[{os.getpid()}]: {message}\n".encode(errors="replace")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return
        try:
            os.write(fd, line)
        except OSError:
            pass
        finally:
            os.close(fd)


def _read_ask_answer(machine: Path) -> str:
    try:
        return (machine / "ask").read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return "deny"


def evaluate_policy(machine: Path, log: Logger, request: Request, requested_target: str) -> str:
    """dom0's decision for this call: the qube that serves it, or Refused.

    ``ask`` has no user to ask here: the machine's ``ask`` file answers
    (``allow``, ``allow QUBE`` or ``deny``; missing means deny).
    """
    try:
        from qconnect.policy.evaluate import evaluate_call
        from qconnect.policy.system_info import SystemInfo
    except ImportError as error:
        raise Refused(f"the policy engine is not available: {error}") from None
    from qconnect.errors import QconnectError

    try:
        system = SystemInfo.load(machine / "qubes.json")
        resolution = evaluate_call(
            machine / "policy.d",
            system,
            source=request.source,
            target=requested_target,
            service=request.service,
            argument=f"+{request.argument}",
        )
    except QconnectError as error:
        raise Refused(f"policy error, every call is refused: {error}") from None
    where = f" ({resolution.rule})" if resolution.rule else ""
    call = f"{request.full_name} from {request.source} to {requested_target}"
    action = resolution.action
    target = resolution.target
    if action == "ask":
        answer = _read_ask_answer(machine).split()
        if answer[:1] != ["allow"] or len(answer) > 2:
            raise Refused(f"{call}: ask{where} answered deny")
        if len(answer) == 2:
            target = answer[1]
            if target not in resolution.choices:
                raise Refused(
                    f"{call}: ask{where} answered {target}, not among {resolution.choices}"
                )
        log("qrexec-policy-daemon", f"{call}: ask{where} answered allow, target {target}")
    elif action != "allow":
        raise Refused(f"{call}: denied{where}: {resolution.reason}")
    if not target:
        raise Refused(f"{call}: {action}{where} without a target qube")
    if target.startswith("@dispvm"):
        raise Refused(f"{call}: {target}: disposable qubes are not emulated by the loopback")
    if target in ("@adminvm", "dom0") or not layout.qube_dir(machine, target).is_dir():
        raise Refused(f"{call}: target {target!r} is not a qube of this loopback machine")
    log("qrexec-policy-daemon", f"{call}: allowed{where}, target {target}")
    return target


@dataclass
class _Ends:
    """The descriptors of one call, as the client and the agent see them."""

    client_in: int  #: what the caller sends: fd 0, or the local program's stdout
    client_out: int  #: where the service's output goes: fd 1, fd 0, or the local program's stdin
    single_socket: bool  #: client_in == client_out, used with shutdown (--use-stdin-socket)
    service_in: int  #: the service's input: its stdin socketpair, or the socket
    service_out: int  #: the service's output: its stdout socketpair, or the socket
    service_err: int | None  #: an executable's stderr pipe
    is_socket_service: bool  #: socket or TCP service (no process, exit code 0)
    exit_on_client_eof: bool
    exit_on_service_eof: bool
    first_bytes: bytes  #: the descriptor, then -p prefix data


class _Relay:
    """Moves the bytes of one call and applies both sides' EOF rules.

    Four threads: the caller's bytes to the service (``_upstream``), the
    service's bytes to the caller (``_downstream``), an executable's stderr to
    the caller's stderr, and the main thread, which waits for the service
    side to end and decides the exit code. State changes go through one
    condition variable.
    """

    def __init__(self, ends: _Ends) -> None:
        self.ends = ends
        self.changed = threading.Condition()
        self.service_input_done = False  # the agent stopped writing to the service
        self.service_output_done = False  # the agent saw the service's EOF
        self.stderr_done = ends.service_err is None
        self.ended_early = False  # exit-on-client-eof / exit-on-service-eof fired
        self.client_out_open = True
        self.upstream_bytes = [0]
        self.downstream_bytes = [0]

    def _set(self, name: str) -> None:
        with self.changed:
            setattr(self, name, True)
            self.changed.notify_all()

    # -- the client side (qrexec-client-vm's own fds) ------------------------

    def client_output_eof(self) -> None:
        """The remote's EOF, applied as qrexec-client-vm does: shutdown only on its own socket.

        fd 1 (or 0) is *closed* unless --use-stdin-socket made it the same
        socket as the input: with socat's EXEC or systemd's
        StandardInput=socket fd 0 still holds the socket, so no FIN reaches
        the TCP client until this process exits. A local program's stdin is
        our own socketpair and is shut down.
        """
        with self.changed:
            if not self.client_out_open:
                return
            self.client_out_open = False
        fd = self.ends.client_out
        _close_or_shutdown(fd, socket.SHUT_WR, shutdown=self.ends.single_socket or fd > 2)

    def _client_input_eof(self) -> None:
        fd = self.ends.client_in
        _close_or_shutdown(fd, socket.SHUT_RD, shutdown=self.ends.single_socket or fd > 2)

    # -- the threads ----------------------------------------------------------

    def _upstream(self) -> None:
        ends = self.ends
        try:
            if ends.first_bytes:
                write_all(ends.service_in, ends.first_bytes)
            pump(ends.client_in, ends.service_in, self.upstream_bytes)
        except ReadFailed:
            pass  # the caller's stream broke: an EOF for the service
        except WriteFailed:
            # The service stopped reading (closed, reset): the agent drops what
            # the caller still sends, and the caller keeps sending until EOF.
            self._set("service_input_done")
            _drain(ends.client_in)
        self._client_input_eof()
        if ends.exit_on_client_eof:
            self.client_output_eof()  # the agent sends the service's EOF, then exit 0
            self._set("ended_early")
            return
        _shutdown_quietly(ends.service_in, socket.SHUT_WR)
        self._set("service_input_done")

    def _downstream(self) -> None:
        ends = self.ends
        try:
            pump(ends.service_out, ends.client_out, self.downstream_bytes)
        except ReadFailed:
            if ends.is_socket_service:
                self._set("service_input_done")  # a reset socket: POLLERR ends both ways
        except WriteFailed:
            # The caller's output is gone: qrexec-client-vm stops writing it and
            # drops the rest; the service may go on.
            with self.changed:
                self.client_out_open = False
            _drain(ends.service_out)
        self.client_output_eof()
        if ends.exit_on_service_eof:
            self._set("ended_early")
            return
        if ends.is_socket_service and _hung_up(ends.service_in):
            # The service closed its socket altogether (not just shut it for
            # writing): the agent sees POLLHUP and stops writing to it.
            self._set("service_input_done")
        self._set("service_output_done")

    def _stderr(self) -> None:
        assert self.ends.service_err is not None
        try:
            pump(self.ends.service_err, 2)
        except ReadFailed:
            pass
        except WriteFailed:
            _drain(self.ends.service_err)
        self._set("stderr_done")

    def run(self, process: "Any | None") -> int:
        """Relay until the service side has ended; return the remote exit code."""
        threads = [
            threading.Thread(target=self._upstream, daemon=True),
            threading.Thread(target=self._downstream, daemon=True),
        ]
        if self.ends.service_err is not None:
            threads.append(threading.Thread(target=self._stderr, daemon=True))
        for thread in threads:
            thread.start()
        if process is not None:
            status = _exit_status(process.wait())
            # SIGCHLD: the agent stops writing to the service's stdin.
            _shutdown_quietly(self.ends.service_in, socket.SHUT_WR)
            with self.changed:
                self.service_input_done = True
                self.changed.wait_for(lambda: self.service_output_done and self.stderr_done)
            return status
        with self.changed:
            self.changed.wait_for(
                lambda: self.ended_early or (self.service_input_done and self.service_output_done)
            )
        if self.ended_early:
            # What the service already sent still reaches the caller first;
            # the service's later bytes are dropped (wake the reader up).
            _shutdown_quietly(self.ends.service_out, socket.SHUT_RD)
            threads[1].join(_FINAL_FLUSH_SECONDS)
        return 0


def _close_or_shutdown(fd: int, how: int, *, shutdown: bool) -> None:
    if shutdown:
        _shutdown_quietly(fd, how)
    else:
        with contextlib.suppress(OSError):
            os.close(fd)


def _shutdown_quietly(fd: int, how: int) -> None:
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(how)
    except OSError:
        pass


def _hung_up(fd: int) -> bool:
    import select

    poller = select.poll()
    poller.register(fd, 0)
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


def _drain(fd: int) -> None:
    """Read and drop until EOF (bytes nobody can take any more)."""
    try:
        while os.read(fd, 1 << 16):
            pass
    except OSError:
        pass


def _exit_status(returncode: int) -> int:
    """A child's status as qrexec reports it: the exit code, or 128+N for signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Call:
    """One qrexec call from ``source``, from the command line to the exit code."""

    def __init__(self, machine: Path, source: str, options: Options) -> None:
        self.machine = machine
        self.source = source
        self.options = options
        self.log = Logger(machine / "log" / "qrexec.log")

    def request(self) -> tuple[Request, str]:
        """What dom0 makes of the command line: sanitised names and the requested target."""
        target = sanitize_target(self.options.target) or "@default"
        full_name = sanitize_service(self.options.service)
        service, _, argument = full_name.partition("+")
        if not service:
            raise Refused(f"empty service name in {self.options.service!r}")
        return Request(self.source, "", service, argument), target

    def run(self) -> int:
        try:
            draft, requested_target = self.request()
            target = evaluate_policy(self.machine, self.log, draft, requested_target)
        except Refused as reason:
            self.log("qrexec-daemon", f"refused: {reason}")
            print("Request refused", file=sys.stderr, flush=True)
            return EXIT_REFUSED
        request = Request(draft.source, target, draft.service, draft.argument)
        slot = slots.acquire(layout.calls_dir(self.machine, self.source))
        if slot is None:
            message = (
                f"Failed to allocate new vchan port for source qube {self.source}: "
                f"{MAX_CALLS_IN_FLIGHT} calls in flight"
            )
            self.log("qrexec-daemon", message)
            print(f"qrexec-daemon (loopback): {message}", file=sys.stderr)
            print("Request refused", file=sys.stderr, flush=True)
            return EXIT_REFUSED
        try:
            return self._serve(request)
        except CallFailed as failure:
            self.log(
                f"qrexec-agent[{target}]", f"{request.full_name} from {self.source}: {failure}"
            )
            return failure.exit_code

    def _serve(self, request: Request) -> int:
        config = load_config(self.machine, request)
        found = find_service(self.machine, request)
        prefix = self.options.prefix_data
        process = None
        if found.kind == "executable":
            service = start_executable(self.machine, request, found.path)
            process = service.process
            ends_service: tuple[int, int, int | None] = (
                service.stdin.fileno(),
                service.stdout.fileno(),
                service.stderr,
            )
            keep: list[Any] = [service.stdin, service.stdout]
            first_bytes = prefix
            exit_on_client_eof = exit_on_service_eof = False
        else:
            if found.kind == "socket":
                sock = connect_unix(found.path)
            else:
                sock = connect_tcp(*tcp_address(found.path, request.argument))
            keep = [sock]
            ends_service = (sock.fileno(), sock.fileno(), None)
            descriptor = request.descriptor if config.send_service_descriptor else b""
            first_bytes = descriptor + prefix
            exit_on_client_eof = config.exit_on_client_eof
            exit_on_service_eof = config.exit_on_service_eof
        self.log(
            f"qrexec-agent[{request.target}]",
            f"{request.full_name} from {self.source}: {found.kind} {found.path}",
        )
        local = None
        if self.options.local_program:
            local, client_in, client_out = self._start_local_program()
        elif self.options.use_stdin_socket:
            client_in = client_out = 0
        else:
            client_in, client_out = 0, 1
        ends = _Ends(
            client_in=client_in,
            client_out=client_out,
            single_socket=self.options.use_stdin_socket,
            service_in=ends_service[0],
            service_out=ends_service[1],
            service_err=ends_service[2],
            is_socket_service=process is None,
            exit_on_client_eof=exit_on_client_eof,
            exit_on_service_eof=exit_on_service_eof,
            first_bytes=first_bytes,
        )
        relay = _Relay(ends)
        remote_status = relay.run(process)
        del keep  # the service's sockets stay open until the relay is done
        if local is None:
            return remote_status
        # The remote has exited: the local program gets EOF and we wait for it.
        relay.client_output_eof()
        _shutdown_quietly(client_in, socket.SHUT_RD)
        local_status = _exit_status(local.wait()) if local is not _NO_LOCAL else 255
        return remote_status or local_status

    def _start_local_program(self) -> tuple[Any, int, int]:
        """Start LOCAL_PROGRAM as qrexec-client-vm does: execv (no PATH search), argv[0] = basename.

        Its stdin and stdout are socketpairs to the call, its stderr is ours;
        SAVED_FD_0 and SAVED_FD_1 name copies of our own stdin and stdout.
        """
        import subprocess

        program, *arguments = self.options.local_program
        to_local, local_stdin = socket.socketpair()
        from_local, local_stdout = socket.socketpair()
        saved = [os.dup(0), os.dup(1)]
        env = dict(os.environ)
        env["SAVED_FD_0"], env["SAVED_FD_1"] = str(saved[0]), str(saved[1])
        env["QREXEC_AGENT_PID"] = str(os.getpid())
        if os.environ.get("PASS_LOCAL_STDERR"):
            saved.append(os.dup(2))
            env["SAVED_FD_2"] = str(saved[2])
        process: Any
        try:
            process = subprocess.Popen(
                [os.path.basename(program), *arguments],
                executable=program if os.sep in program else os.path.join(".", program),
                stdin=local_stdin.fileno(),
                stdout=local_stdout.fileno(),
                env=env,
                pass_fds=saved,
            )
        except OSError as error:
            print(f"execv: {error.strerror}", file=sys.stderr, flush=True)
            process = _NO_LOCAL
            local_stdout.close()  # the caller's side reads EOF at once
        finally:
            for fd in saved:
                os.close(fd)
        local_stdin.close()
        if process is not _NO_LOCAL:
            local_stdout.close()
        self._local_sockets = (to_local, from_local)
        return process, from_local.fileno(), to_local.fileno()


_NO_LOCAL: Any = object()  # LOCAL_PROGRAM could not be executed (exit status 255)


def _flush_and_exit(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None, *, machine: str | None = None) -> NoReturn:
    """Run one call and exit the process with its exit code (never returns).

    ``machine`` is the machine directory baked into the generated launcher;
    QCONNECT_LOOPBACK_MACHINE overrides it. The calling qube comes from
    QCONNECT_LOOPBACK_QUBE (``Machine.env_for`` / ``qconnect loopback run``
    set both). The process exits with os._exit once the call is over, so a
    thread still blocked reading the caller's input cannot keep it alive.
    """
    # Like the C program, die of SIGINT (Ctrl-C) instead of a Python traceback.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    words = sys.argv[1:] if argv is None else argv
    machine_dir = os.environ.get(layout.MACHINE_ENV) or machine
    modern = not (machine_dir and layout.old_client_flag(Path(machine_dir)).exists())
    try:
        options = parse_command_line(words, stdin_socket_option=modern)
    except UsageError as error:
        if str(error):
            print(str(error) if error.show_usage else f"{PROG}: {error}", file=sys.stderr)
        if error.show_usage:
            sys.stderr.write(usage(stdin_socket_option=modern))
        _flush_and_exit(error.exit_code)
    if options.help:
        sys.stdout.write(usage(stdin_socket_option=modern))
        _flush_and_exit(0)
    source = os.environ.get(layout.QUBE_ENV, "")
    if not machine_dir or not source:
        print(
            f"{PROG}: not inside a loopback qube ({layout.QUBE_ENV} is not set); "
            "run it with `qconnect loopback run DIR QUBE -- COMMAND`",
            file=sys.stderr,
        )
        _flush_and_exit(1)
    machine_path = Path(machine_dir)
    if not is_valid_qube_name(source) or not layout.qube_dir(machine_path, source).is_dir():
        print(f"{PROG}: no qube {source!r} in the loopback machine {machine_path}", file=sys.stderr)
        _flush_and_exit(1)
    _flush_and_exit(Call(machine_path, source, options).run())
