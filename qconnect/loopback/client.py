"""The loopback ``qrexec-client-vm``: one call, from the calling qube to the service.

Real qrexec splits a call across three programs: qrexec-client-vm in the
calling qube, qrexec-daemon and the policy in dom0, qrexec-agent in the
target qube, with vchan byte streams in between. Here one short-lived process
plays all of them for one call, each part in its own module:

1. ``options``: reads the command line exactly as qrexec-client-vm does;
2. ``dom0``: sanitises the names and evaluates the policy (deny: "Request
   refused", exit 126); then a data port is taken from the target's
   table (``channels``), and given back when the call has ended;
3. ``agent``: as the target's agent, reads the rpc-config, finds the service
   and starts it (executable), connects to it (socket service) or makes the
   built-in TCP connection (``/dev/tcp`` symlink);
4. ``callrelay``: relays the bytes, each side applying the EOF rules its real
   counterpart applies, with ``localprogram`` as the caller's end when a
   LOCAL_PROGRAM is given; the process exits with the remote exit code.

Every event real qrexec would log goes to ``journal``. It starts once per
connection, so it imports the standard library only (no trio). Known
differences from real qrexec are listed in the README.
"""

import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import NoReturn

from qconnect.core.errors import AgentCallFailed
from qconnect.core.qrexec import EXIT_REFUSED, is_valid_qube_name
from qconnect.loopback import channels, layout, localprogram
from qconnect.loopback.agent import (
    Request,
    connect_tcp,
    connect_unix,
    find_service,
    load_config,
    start_executable,
    tcp_address,
)
from qconnect.loopback.callrelay import CallRelay, Ends, shutdown_quietly
from qconnect.loopback.dom0 import Refused, evaluate_policy, read_request
from qconnect.loopback.journal import Logger
from qconnect.loopback.options import PROG, Options, UsageError, parse_command_line, usage

#: What qrexec-daemon logs when a qube's port table has no free port for a call.
CHANNELS_EXHAUSTED = "Failed to allocate new vchan port, too many clients?"


class Call:
    """One qrexec call from ``source``, from the command line to the exit code."""

    def __init__(
        self, machine: Path, source: str, options: Options, caller_pid: int | None = None
    ) -> None:
        self.machine = machine
        self.source = source
        self.options = options
        self.log = Logger(machine / "log" / "qrexec.log")
        #: the qrexec-client-vm process: this one, or the fork-server's caller
        self.caller_pid = os.getpid() if caller_pid is None else caller_pid

    def run(self) -> int:
        try:
            draft, requested_target = read_request(
                self.source, self.options.target, self.options.service
            )
            target = evaluate_policy(self.machine, self.log, draft, requested_target)
        except Refused as reason:
            self.log("qrexec-daemon", f"refused: {reason}")
            print("Request refused", file=sys.stderr, flush=True)
            return EXIT_REFUSED
        request = Request(draft.source, target, draft.service, draft.argument)
        port = channels.allocate(
            self.machine,
            target,
            layout.domain_id(self.machine, target),
            self.source,
            layout.domain_id(self.machine, self.source),
        )
        if port is None:
            # The target's daemon logs it; the caller sees what a denial shows.
            self.log(f"qrexec-daemon[{target}]", CHANNELS_EXHAUSTED)
            self.log(
                "qrexec-daemon",
                f"refused: {request.full_name} from {self.source}: {CHANNELS_EXHAUSTED}",
            )
            print("Request refused", file=sys.stderr, flush=True)
            return EXIT_REFUSED
        taken = time.monotonic()
        try:
            return self._serve(request)
        except AgentCallFailed as failure:
            self.log(
                f"qrexec-agent[{target}]", f"{request.full_name} from {self.source}: {failure}"
            )
            return failure.exit_code
        finally:
            caller_lived = channels.process_age(self.caller_pid)
            channels.release(
                self.machine, target, port, caller_lived, held=time.monotonic() - taken
            )

    def _serve(self, request: Request) -> int:
        """The target's side: connect or start the service, then relay until it has ended.

        Resource handling: the service's sockets (or an executable's pipes)
        and the local program's stream ends stay open until the relay is
        done, and are closed when this returns.
        """
        config = load_config(self.machine, request)
        found = find_service(self.machine, request)
        prefix = self.options.prefix_data
        process = None
        keep: list[socket.socket] = []
        if found.kind == "executable":
            service = start_executable(self.machine, request, found.path)
            process = service.process
            keep += [service.stdin, service.stdout]
            service_in, service_out = service.stdin.fileno(), service.stdout.fileno()
            service_err: int | None = service.stderr
            first_bytes = prefix
            exit_on_client_eof = exit_on_service_eof = False
        else:
            if found.kind == "socket":
                sock = connect_unix(found.path)
            else:
                sock = connect_tcp(*tcp_address(found.path, request.argument))
            keep.append(sock)
            service_in = service_out = sock.fileno()
            service_err = None
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
            local = localprogram.start(self.options.local_program)
            client_in, client_out = local.call_in, local.call_out
        elif self.options.use_stdin_socket:
            client_in = client_out = 0
        else:
            client_in, client_out = 0, 1
        relay = CallRelay(
            Ends(
                client_in=client_in,
                client_out=client_out,
                single_socket=self.options.use_stdin_socket,
                service_in=service_in,
                service_out=service_out,
                service_err=service_err,
                is_socket_service=process is None,
                exit_on_client_eof=exit_on_client_eof,
                exit_on_service_eof=exit_on_service_eof,
                first_bytes=first_bytes,
            )
        )
        with contextlib.ExitStack() as local_ends:
            with contextlib.ExitStack() as service_ends:
                for held in keep:
                    service_ends.enter_context(held)
                if local is not None:
                    local_ends.enter_context(local.from_program)
                    local_ends.enter_context(local.to_program)
                remote_status = relay.run(process)
            # The service's ends are closed now, as the real agent closes them.
            if local is None:
                return remote_status
            # The remote has exited: the local program gets EOF and we wait for it.
            relay.client_output_eof()
            shutdown_quietly(client_in, socket.SHUT_RD)
            return remote_status or local.wait()


def _flush_and_exit(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def main(
    argv: list[str] | None = None, *, machine: str | None = None, caller_pid: int | None = None
) -> NoReturn:
    """Run one call and exit the process with its exit code (never returns).

    ``machine`` is the machine directory baked into the generated launcher;
    QCONNECT_LOOPBACK_MACHINE overrides it. The calling qube comes from
    QCONNECT_LOOPBACK_QUBE (``Machine.env_for`` / ``qconnect loopback run``
    set both). ``caller_pid`` is the qrexec-client-vm the fork-server runs
    this call for (default: this process). The process exits with os._exit
    once the call is over, so a thread still blocked reading the caller's
    input cannot keep it alive.
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
    _flush_and_exit(Call(machine_path, source, options, caller_pid).run())
