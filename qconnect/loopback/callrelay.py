"""The bytes of one loopback call, moved with both sides' EOF rules.

Real qrexec moves a call's bytes through two processes joined by a vchan:
qrexec-client-vm on the caller's side, qrexec-agent's child on the
service's side, each with its own rules for EOF and exit (qubes-core-qrexec,
libqrexec/process_io.c). The loopback has both ends in one process, so one
``CallRelay`` plays both: what the caller sends goes to the service, what
the service sends goes back, an executable's stderr reaches the caller's
stderr, and the exit code is decided when the service side has ended.

Standard library only (it runs in every call): ``qconnect.core.relay.blocking``
copies with splice, one thread per direction.
"""

import contextlib
import os
import select
import socket
import subprocess
import threading
from dataclasses import dataclass

from qconnect.core.relay.blocking import ReadFailed, WriteFailed, pump, write_all

# How long, after the service side has ended, the relay of its last bytes to
# the caller may take before the call ends anyway (a caller that does not read
# would otherwise keep a finished call, and its data channel, forever).
FINAL_FLUSH_SECONDS = 5.0


@dataclass
class Ends:
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


class CallRelay:
    """Moves the bytes of one call and applies both sides' EOF rules.

    Four threads: the caller's bytes to the service (``_upstream``), the
    service's bytes to the caller (``_downstream``), an executable's stderr to
    the caller's stderr, and the main thread, which waits for the service
    side to end and decides the exit code. Each thread sets its own flags;
    every change goes through one condition variable, which the main thread
    waits on (a handful of booleans: one lock is simpler than several
    events, and no thread ever holds it while it does I/O).
    """

    def __init__(self, ends: Ends) -> None:
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
        shutdown_quietly(ends.service_in, socket.SHUT_WR)
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

    def run(self, process: "subprocess.Popen[bytes] | None") -> int:
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
            status = exit_status(process.wait())
            # SIGCHLD: the agent stops writing to the service's stdin.
            shutdown_quietly(self.ends.service_in, socket.SHUT_WR)
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
            shutdown_quietly(self.ends.service_out, socket.SHUT_RD)
            threads[1].join(FINAL_FLUSH_SECONDS)
        return 0


def _close_or_shutdown(fd: int, how: int, *, shutdown: bool) -> None:
    if shutdown:
        shutdown_quietly(fd, how)
    else:
        with contextlib.suppress(OSError):
            os.close(fd)


def shutdown_quietly(fd: int, how: int) -> None:
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(how)
    except OSError:
        pass


def _hung_up(fd: int) -> bool:
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


def exit_status(returncode: int) -> int:
    """A child's status as qrexec reports it: the exit code, or 128+N for signal N."""
    return 128 - returncode if returncode < 0 else returncode
