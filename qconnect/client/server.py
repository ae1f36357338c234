"""The trio event loop of one client process: accept, call qrexec, account, stop.

One process serves every binding of one command line (or of one systemd
service). Task tree, each nursery owned by the function that opens it::

    ClientServer.run
    ├── services: signals, control socket, refusal-burst flusher, systemd STATUS
    └── bindings: serve_binding(b) per binding
        └── connections of b: handle_connection(...) per accepted connection

Stopping a binding cancels its accept loop and closes its listener; its open
connections get ``grace`` seconds to finish, then their calls are ended
(SIGTERM, then SIGKILL) and reaped. The process ends when no binding is left.

A call that dom0 never answers (an ``ask`` prompt nobody sees, a target
that never starts) would hold its connection and slot for ever: each call
is watched until it shows it was accepted (see acceptance.py), and ended
after ``call_timeout`` seconds if it provably hung.
"""

import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from qconnect.client import control
from qconnect.client.acceptance import (
    Progress,
    Verdict,
    judge,
    relay_progress,
    still_hung,
    tcp_progress,
)
from qconnect.client.bursts import BurstCounter
from qconnect.client.control import BindingStatus, ProcessStatus, Request, StopRequest
from qconnect.client.limits import DEFAULT_CALL_TIMEOUT, DEFAULT_GRACE, PROCESS_MAX_CONNECTIONS
from qconnect.client.listeners import Listener
from qconnect.client.outcome import Kind, describe_exit
from qconnect.client.pacing import HOLD_SECONDS, MAX_ATTEMPTS, Evidence, TargetPacer
from qconnect.client.qrexec_call import Mode, call_argv
from qconnect.core.printable import printable
from qconnect.core.qrexec import EXIT_NO_SERVICE, EXIT_QREXEC_PROBLEM, EXIT_REFUSED
from qconnect.core.relay.trio_streams import RelayStats, relay
from qconnect.core.spec import BindingSpec

logger = logging.getLogger("qconnect.client")

#: After SIGTERM, seconds a qrexec-client-vm gets to exit before SIGKILL.
TERMINATE_TIMEOUT = 2.0

#: stderr kept from one qrexec-client-vm (e.g. "Request refused") for the log
#: line; the rest is read and dropped so the child never blocks on the pipe.
MAX_STDERR_KEPT = 2048

#: Characters of a failed call's stderr shown in its log line: a message such
#: as "Request refused" fits many times over; a chatty service is cut short.
STDERR_DETAIL_CHARS = 200

#: After a call's process exits, how long its stderr may take to reach EOF.
#: Only a grandchild still holding it delays it; its words are not worth more.
STDERR_DRAIN_TIMEOUT = 1.0

#: Pause after accept() fails for lack of descriptors or memory. The pending
#: connection stays in the backlog; retrying at once would spin.
ACCEPT_RETRY_DELAY = 0.1

#: After a relayed call's process exits, seconds its last output may take to
#: reach the client (at most a pipe buffer, 64 KiB) before the relay ends.
DRAIN_TIMEOUT = 10.0

#: accept() errors that mean "this process is out of resources right now".
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

#: Minimum seconds between two systemd STATUS updates.
STATUS_INTERVAL = 1.0

#: A call is declared hung only if nothing moved between two readings this
#: far apart (the second at the call timeout). An accepted qrexec-client-vm
#: reads waiting bytes within microseconds; a second covers a loaded machine
#: and a call accepted just before the timeout.
HANG_CONFIRM_DELAY = 1.0


@dataclass
class Binding:
    """The live state of one binding; owned by :class:`ClientServer`."""

    spec: BindingSpec
    listener: trio.socket.SocketType
    max_connections: int
    slots: trio.Semaphore
    accept_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    open: int = 0
    served: int = 0
    refused: int = 0
    hung: int = 0  #: calls ended because they were not accepted within the call timeout
    stopping: bool = False
    done: bool = False  #: stopped and every connection closed: no longer listed
    idle: trio.Event = field(default_factory=trio.Event)
    #: what this binding's calls showed of dom0's policy (see pacing.py)
    evidence: Evidence = field(default_factory=Evidence)
    next_call: int = 0  #: number of the next call started, in start order
    undecided: set[int] = field(default_factory=set)  #: calls started, outcome not known yet
    decided: trio.Event = field(default_factory=trio.Event)  #: set (and replaced) at each outcome

    def status(self) -> BindingStatus:
        return BindingStatus(
            spec=str(self.spec),
            open=self.open,
            max=self.max_connections,
            served=self.served,
            refused=self.refused,
            hung=self.hung,
            stopping=self.stopping,
        )


@dataclass
class ServerOptions:
    mode: Mode
    executable: str
    source_qube: str
    max_connections: int
    grace: float = DEFAULT_GRACE
    call_timeout: float = DEFAULT_CALL_TIMEOUT  #: 0: never end a call that is not accepted
    systemd: bool = False
    log_path: str | None = None
    log_path_is_ours: bool = False  #: the registry's file, removed after a clean stop


class ClientServer:
    """Serve a set of bound listeners until every binding is stopped.

    Resource handling: takes ownership of the listening sockets and of the
    control socket and closes them; every qrexec-client-vm it starts is
    reaped before :meth:`run` returns.
    """

    def __init__(
        self,
        listeners: list[Listener],
        options: ServerOptions,
        control: socket.socket | None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.options = options
        self.bindings = [
            Binding(
                spec=listener.spec,
                listener=trio.socket.from_stdlib_socket(listener.sock),
                max_connections=options.max_connections,
                slots=trio.Semaphore(options.max_connections),
            )
            for listener in listeners
        ]
        self._control = trio.socket.from_stdlib_socket(control) if control else None
        self._on_ready = on_ready
        self._process_slots = trio.Semaphore(PROCESS_MAX_CONNECTIONS)
        self._bursts = BurstCounter()
        self._burst_added = trio.Event()
        self._changed = trio.Event()
        self._started = time.time()
        self._urgent = trio.CancelScope()  # cancelled by a second signal: no more grace
        self._pacers: dict[str, TargetPacer] = {}  # by target qube, as the binding names it
        self._pacing_changed = trio.Event()  # set (and replaced) when a call starts or ends

    # -- status and control ------------------------------------------------

    def status(self) -> ProcessStatus:
        return ProcessStatus(
            pid=os.getpid(),
            started=self._started,
            mode=self.options.mode.value,
            systemd=self.options.systemd,
            log=self.options.log_path,
            bindings=tuple(binding.status() for binding in self.bindings if not binding.done),
        )

    def stop(self, spec: BindingSpec | None = None) -> int:
        """Stop accepting on ``spec`` (every binding when None); return how many matched."""
        matched = 0
        for binding in self.bindings:
            if (spec is None or binding.spec == spec) and not binding.done:
                matched += 1
                if not binding.stopping:
                    binding.stopping = True
                    binding.accept_scope.cancel()
        self._note_change()
        return matched

    def _note_change(self) -> None:
        self._changed.set()

    # -- the loop ------------------------------------------------------------

    async def run(self) -> None:
        with self._urgent:
            async with trio.open_nursery() as services:
                services.start_soon(self._watch_signals)
                services.start_soon(self._flush_bursts)
                if self._control is not None:
                    services.start_soon(control.serve, self._control, self._carry_out)
                if self.options.systemd:
                    services.start_soon(self._report_status)
                async with trio.open_nursery() as bindings:
                    for binding in self.bindings:
                        bindings.start_soon(self._serve_binding, binding)
                    if self._on_ready is not None:
                        self._on_ready()
                services.cancel_scope.cancel()
        self._log_suppressed(everything=True)
        if self._control is not None:
            self._control.close()

    async def _serve_binding(self, binding: Binding) -> None:
        async with trio.open_nursery() as connections:
            with binding.accept_scope:
                await self._accept_loop(binding, connections)
            binding.stopping = True
            binding.listener.close()
            if binding.open:
                logger.info(
                    "%s: stopped accepting; waiting up to %g s for %d open connection(s)",
                    binding.spec,
                    self.options.grace,
                    binding.open,
                )
                with trio.move_on_after(self.options.grace):
                    await binding.idle.wait()
            connections.cancel_scope.cancel()
        binding.done = True
        logger.info("%s: stopped", binding.spec)
        self._note_change()

    async def _accept_loop(self, binding: Binding, connections: trio.Nursery) -> None:
        while True:
            await self._acquire_slots(binding)
            try:
                conn, peer = await binding.listener.accept()
            except OSError as error:
                self._release_slots(binding)
                if error.errno in ACCEPT_CAPACITY_ERRNOS:
                    self._log_burst(
                        ("accept", binding.spec),
                        f"{binding.spec}: cannot accept a connection: {os.strerror(error.errno)}; "
                        "it stays in the listen backlog and is retried",
                        "accept() failures",
                    )
                    await trio.sleep(ACCEPT_RETRY_DELAY)
                    continue
                if error.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the peer gave up before we accepted; nothing to serve
                raise
            except BaseException:
                self._release_slots(binding)
                raise
            binding.open += 1
            binding.idle = trio.Event()
            self._note_change()
            connections.start_soon(self._handle_connection, binding, conn, peer)

    async def _acquire_slots(self, binding: Binding) -> None:
        """Take a slot of the binding and one of the process; log when either is exhausted."""
        if binding.slots.value == 0:
            self._log_burst(
                ("binding-full", binding.spec),
                f"{binding.spec}: all {binding.max_connections} connection slots busy "
                "(--max-connections); new connections wait in the listen backlog",
                "times the binding was full",
            )
        await binding.slots.acquire()
        try:
            if self._process_slots.value == 0:
                self._log_burst(
                    ("process-full",),
                    f"all {PROCESS_MAX_CONNECTIONS} calls this process may have in flight are "
                    "busy; new connections wait in the listen backlog",
                    "times the process was full",
                )
            await self._process_slots.acquire()
        except BaseException:
            binding.slots.release()
            raise

    def _release_slots(self, binding: Binding) -> None:
        self._process_slots.release()
        binding.slots.release()

    # -- one connection --------------------------------------------------------

    async def _handle_connection(
        self, binding: Binding, conn: trio.socket.SocketType, peer: Any
    ) -> None:
        """Serve one accepted connection with one qrexec call.

        Resource handling: owns ``conn`` and the call's process; both are
        closed or reaped here whatever happens. Error handling: any failure
        (no descriptors, the call cannot start) closes this connection only.
        """
        spec = binding.spec
        started = time.monotonic()
        call = _Call()
        spare: socket.socket | None = None
        try:
            argv = call_argv(self.options.executable, spec, self.options.mode)
            for attempt in range(1, MAX_ATTEMPTS + 1):
                call = _Call()
                # A second descriptor of the socket, so a call refused for lack
                # of a channel can be made again on it (handoff mode only: in
                # relay mode the refused call may have taken bytes with it).
                # Out of descriptors: no retry for this connection, nothing worse.
                spare = None
                if self.options.mode is Mode.HANDOFF:
                    with contextlib.suppress(OSError):
                        spare = _duplicate(conn)
                try:
                    await self._paced_call(binding, argv, conn, call)
                except OSError as error:
                    self._log_burst(
                        ("start-failed", spec),
                        f"{_peer_text(peer)} -> {spec.target}:{spec.remote_port}: cannot start "
                        f"qrexec-client-vm: {error.strerror or error}; connection closed",
                        "connections closed because qrexec-client-vm could not start",
                    )
                    return
                if spare is None or not await self._call_again(binding, call, spare, attempt):
                    break
                conn, spare = trio.socket.from_stdlib_socket(spare), None
        finally:
            if spare is not None:
                spare.close()
            conn.close()
            binding.open -= 1
            if binding.open == 0:
                binding.idle.set()
            self._release_slots(binding)
            self._note_change()
        if call.hung is not None:
            self._log_hung(binding, peer, call.hung, time.monotonic() - started)
            return
        self._log_call(
            binding, peer, call.returncode, time.monotonic() - started, call.stats, call.stderr
        )

    # -- dom0's data-port table: pacing and retries (see pacing.py) -----------------

    def _pacer(self, target: str) -> TargetPacer:
        pacer = self._pacers.get(target)
        if pacer is None:
            pacer = self._pacers[target] = TargetPacer()
        return pacer

    def _pacing_change(self) -> None:
        self._pacing_changed.set()
        self._pacing_changed = trio.Event()

    async def _paced_call(
        self, binding: Binding, argv: list[str], conn: trio.socket.SocketType, call: "_Call"
    ) -> None:
        """Make one call when the target's window and pause allow it; account for its outcome.

        A call counts against its target until its port is likely back in
        dom0's table, not only until qrexec-client-vm exits; a 126 counts as
        a lack of channel only when the binding's calls were allowed lately.
        """
        pacer = self._pacer(binding.spec.target)
        while (delay := pacer.wait(trio.current_time())) > 0:
            changed = self._pacing_changed
            with trio.move_on_after(delay):
                await changed.wait()
        call.number = binding.next_call
        binding.next_call += 1
        binding.undecided.add(call.number)
        began = trio.current_time()
        pacer.started(began)
        try:
            if self.options.mode is Mode.HANDOFF:
                await self._run_handoff(argv, conn, call)
            else:
                call.stats = RelayStats()
                await self._run_relay(argv, conn, call, call.stats)
        finally:
            now = trio.current_time()
            if _refused_by_dom0(call):
                pacer.refused(now, no_channel=binding.evidence.says_allowed(now))
            else:
                if call.returncode in ALLOWED_EXITS and call.hung is None:
                    binding.evidence.allowed(now)  # dom0 let it through: the policy allows it
                pacer.ended(now, now - began)
            binding.undecided.discard(call.number)
            binding.decided.set()
            binding.decided = trio.Event()
            self._pacing_change()

    async def _call_again(
        self, binding: Binding, call: "_Call", spare: socket.socket, attempt: int
    ) -> bool:
        """Whether a refused call is to be made again on the same connection.

        Only a 126 the evidence calls "no free channel" is: a call of this
        binding was allowed within EVIDENCE_SECONDS, or one that started
        before this one is allowed within HOLD_SECONDS. Otherwise it is a
        denial, refused once (each evaluation of a deny rule notifies dom0's
        user). The socket must be as the client left it: nothing read from
        it, nothing written to it.
        """
        if not _refused_by_dom0(call) or call.hung is not None or attempt >= MAX_ATTEMPTS:
            return False
        try:
            reading = tcp_progress(spare)
        except OSError:
            return False
        if reading.consumed or reading.returned:
            return False
        evidence = binding.evidence
        with trio.move_on_after(HOLD_SECONDS):
            while not evidence.says_allowed(trio.current_time()) and any(
                number < call.number for number in binding.undecided
            ):
                await binding.decided.wait()
        if not evidence.says_allowed(trio.current_time()):
            return False
        spec = binding.spec
        self._log_burst(
            ("no-channel", spec),
            f"{spec.target}:{spec.remote_port}: dom0 had no free qrexec channel to the target "
            "for a call this binding is allowed to make (a qube gets 128, shared by every qube "
            "calling it on one side); slowing down and calling again",
            f"calls to {spec.target}:{spec.remote_port} made again for lack of a channel",
        )
        return True

    async def _run_handoff(
        self, argv: list[str], conn: trio.socket.SocketType, call: "_Call"
    ) -> None:
        """Give ``conn`` to qrexec-client-vm as its fd 0 and wait for it.

        Our copy of the socket is closed as soon as the child has its own, so
        the child's shutdown() and exit are what the TCP peer sees; only a
        duplicate for reading the socket's counters stays while the call is
        not yet accepted (closed when it is, or when the call ends).
        """
        # The child shares the socket's file description, O_NONBLOCK flag
        # included; qrexec-client-vm expects an ordinary blocking socket.
        os.set_blocking(conn.fileno(), True)
        watched = _duplicate(conn) if self.options.call_timeout > 0 else None
        try:
            errors_ours, errors_theirs = _stdio_pair()
            async with errors_ours:
                try:
                    process = await trio.lowlevel.open_process(
                        argv,
                        stdin=conn.fileno(),
                        stdout=subprocess.DEVNULL,
                        stderr=errors_theirs.fileno(),
                        start_new_session=True,  # a Ctrl-C in our terminal must not end calls early
                    )
                finally:
                    errors_theirs.close()
                    conn.close()

                def progress() -> Progress:
                    assert watched is not None
                    reading = tcp_progress(watched)
                    if call.stderr:
                        return dataclasses.replace(reading, returned=reading.returned + 1)
                    return reading

                await self._wait_call(process, errors_ours, call, progress, watched)
        finally:
            if watched is not None:
                watched.close()

    async def _run_relay(
        self,
        argv: list[str],
        conn: trio.socket.SocketType,
        call: "_Call",
        stats: RelayStats,
    ) -> None:
        """Copy between ``conn`` and qrexec-client-vm's stdin/stdout, half-close both ways.

        Its stdin and stdout are two socketpairs, not pipes and not one
        socket: qrexec-client-vm passes the remote EOF on by closing fd 1,
        which must reach us as EOF while fd 0 stays open for our bytes.
        """
        to_call, to_call_theirs = _stdio_pair()
        from_call, from_call_theirs = _stdio_pair()
        errors_ours, errors_theirs = _stdio_pair()
        watched: socket.socket | None = None
        # Plain socket streams both ways, so the relay splices in both directions.
        pipes = trio.StapledStream(to_call, from_call)
        stream = trio.SocketStream(conn)
        try:
            try:
                if self.options.call_timeout > 0:
                    # The child's end of its stdin, kept while the call is pending to
                    # see whether it reads (closed once it does, or when the call ends).
                    watched = to_call_theirs.dup()
                process = await trio.lowlevel.open_process(
                    argv,
                    stdin=to_call_theirs.fileno(),
                    stdout=from_call_theirs.fileno(),
                    stderr=errors_theirs.fileno(),
                    start_new_session=True,
                )
            finally:
                for theirs in (to_call_theirs, from_call_theirs, errors_theirs):
                    theirs.close()

            def progress() -> Progress:
                assert watched is not None
                returned = stats.b_to_a + len(call.stderr) + int(stats.b_eof)
                return relay_progress(stats.a_to_b, watched, returned)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._relay_then_close, stream, pipes, stats)
                await self._wait_call(process, errors_ours, call, progress, watched)
                # The call is over: pass on what it still wrote, then stop waiting
                # for bytes from the client that nobody would receive.
                with trio.move_on_after(DRAIN_TIMEOUT):
                    await stats.b_to_a_ended.wait()
                nursery.cancel_scope.cancel()
        finally:
            if watched is not None:
                watched.close()
            await trio.aclose_forcefully(pipes)
            await trio.aclose_forcefully(errors_ours)

    async def _wait_call(
        self,
        process: trio.Process,
        errors: trio.SocketStream,
        call: "_Call",
        progress: Callable[[], Progress],
        watched: socket.socket | None,
    ) -> None:
        """Wait for a call to end; end it early if it is not accepted in time.

        Resource handling: ``watched`` (the duplicate the readings come
        from) is closed as soon as the call shows it was accepted, or ends.
        """
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as call_scope:
                if watched is not None:
                    nursery.start_soon(self._watch_acceptance, progress, watched, call, call_scope)
                call.returncode = await self._wait_process(process, errors, call.stderr)
            nursery.cancel_scope.cancel()
        if watched is not None:
            watched.close()
        if call_scope.cancelled_caught:
            call.returncode = process.returncode  # ended by us: SIGTERM, or SIGKILL

    async def _watch_acceptance(
        self,
        progress: Callable[[], Progress],
        watched: socket.socket,
        call: "_Call",
        call_scope: trio.CancelScope,
    ) -> None:
        """Look at a pending call near its timeout; end it if it provably hung.

        One timer per call and nothing once it is accepted: a first reading
        HANG_CONFIRM_DELAY before the timeout, a second at the timeout. A call
        whose client sent nothing is looked at again every timeout period,
        since the client may speak later (still one timer, no busy polling).
        """
        timeout = self.options.call_timeout
        confirm = min(HANG_CONFIRM_DELAY, timeout / 2)
        started = trio.current_time()
        await trio.sleep(timeout - confirm)
        earlier: Progress | None = None
        while True:
            try:
                reading = progress()
            except OSError as error:
                logger.debug("cannot watch a pending call: %s", error)
                return
            verdict = judge(reading)
            if verdict is Verdict.ACCEPTED:
                watched.close()
                return
            if verdict is Verdict.IDLE:
                earlier = None
                await trio.sleep(timeout - confirm)
                continue
            if earlier is not None and still_hung(earlier, reading):
                call.hung = _Hang(waited=trio.current_time() - started, unread=reading.waiting)
                call_scope.cancel()
                return
            earlier = reading
            await trio.sleep(confirm)

    # Quoted: trio's streams are generic only from trio 0.23; Debian 12's python3-trio is 0.22.
    async def _relay_then_close(
        self, stream: trio.SocketStream, pipes: "trio.StapledStream[Any, Any]", stats: RelayStats
    ) -> None:
        """Relay, then end the call if the client broke off (its stdin closed, stdout dropped)."""
        await relay(stream, pipes, stats=stats)
        if stats.error is not None:
            await trio.aclose_forcefully(pipes)

    async def _wait_process(
        self, process: trio.Process, errors: trio.SocketStream, stderr: bytearray
    ) -> int:
        """Wait for a call to end, collecting its stderr; on cancellation end it and reap it."""
        try:
            collected = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_collect, errors, stderr, collected)
                returncode = await process.wait()
                # Its stderr ends with it, unless a grandchild still holds it.
                with trio.move_on_after(STDERR_DRAIN_TIMEOUT):
                    await collected.wait()
                nursery.cancel_scope.cancel()
                return returncode
        except BaseException:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.terminate()
                    with trio.move_on_after(TERMINATE_TIMEOUT):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
            raise

    def _log_call(
        self,
        binding: Binding,
        peer: Any,
        returncode: int | None,
        duration: float,
        stats: RelayStats | None,
        stderr: bytearray,
    ) -> None:
        spec = binding.spec
        fields: dict[str, Any] = {
            "PEER": _peer_text(peer),
            "BINDING": str(spec),
            "TARGET": spec.target,
            "PORT": spec.remote_port,
            "DURATION": f"{duration:.3f}",
            "MODE": self.options.mode.value,
        }
        if returncode is None:
            outcome_text = "ended at shutdown"
            kind = None
        else:
            outcome = describe_exit(
                returncode,
                source_qube=self.options.source_qube,
                target=spec.target,
                remote_port=spec.remote_port,
            )
            outcome_text, kind = outcome.words, outcome.kind
            fields["EXIT"] = returncode
            fields["OUTCOME"] = outcome.kind.value
        timing = f"{duration:.2f} s"
        if stats is not None:
            fields["BYTES_OUT"], fields["BYTES_IN"] = stats.a_to_b, stats.b_to_a
            timing += f", {stats.a_to_b} bytes out, {stats.b_to_a} bytes in"
        message = f"{fields['PEER']} -> {spec.target}:{spec.remote_port} ({timing}): {outcome_text}"
        if stderr and kind not in (None, Kind.OK):
            detail = stderr_detail(bytes(stderr))
            if detail:
                message += f" [qrexec-client-vm: {detail}]"
        if kind is Kind.REFUSED:
            binding.refused += 1
            self._log_burst(
                ("refused", spec), message, f"calls to {spec.target}:{spec.remote_port} refused"
            )
            return
        binding.served += 1
        level = logging.INFO if kind in (None, Kind.OK) else logging.WARNING
        logger.log(level, message, extra={"fields": fields})

    def _log_hung(self, binding: Binding, peer: Any, hang: "_Hang", duration: float) -> None:
        """One line for a call ended because it was not accepted; a burst of them, once."""
        spec = binding.spec
        binding.hung += 1
        target = spec.target
        starting = (
            "the target qube dom0 picks"
            if target == "@default"
            else f"{target} (try: qvm-start {target} in dom0)"
        )
        message = (
            f"{_peer_text(peer)} -> {target}:{spec.remote_port} ({duration:.2f} s): call not "
            f"accepted after {hang.waited:.0f} s, the client's {hang.unread} byte(s) still "
            "unread; ended qrexec-client-vm and closed the connection. Check dom0 for a policy "
            f"'ask' prompt waiting for an answer, and that {starting} starts; "
            f"--call-timeout is {self.options.call_timeout:g} s"
        )
        self._log_burst(
            ("hung", spec),
            message,
            f"calls to {target}:{spec.remote_port} not accepted within "
            f"{self.options.call_timeout:g} s",
            {
                "PEER": _peer_text(peer),
                "BINDING": str(spec),
                "TARGET": target,
                "PORT": spec.remote_port,
                "DURATION": f"{duration:.3f}",
                "MODE": self.options.mode.value,
                "OUTCOME": "hung",
                "UNREAD": hang.unread,
            },
        )

    # -- rate-limited logging -----------------------------------------------------

    def _log_burst(
        self,
        key: tuple[object, ...],
        message: str,
        counted_as: str,
        fields: dict[str, Any] | None = None,
    ) -> None:
        """Log ``message`` unless the same key was logged within the burst window."""
        if self._bursts.record(key, time.monotonic(), counted_as):
            logger.warning(message, extra={"fields": {"EVENT": str(key[0]), **(fields or {})}})
            self._burst_added.set()

    def _log_suppressed(self, *, everything: bool = False) -> None:
        for key, count, what in self._bursts.flush(time.monotonic(), everything=everything):
            logger.warning(
                "... and %d more %s in the last %g s",
                count,
                what,
                self._bursts.window,
                extra={"fields": {"EVENT": str(key), "COUNT": count}},
            )

    async def _flush_bursts(self) -> None:
        while True:
            deadline = self._bursts.next_deadline()
            if deadline is None:
                await self._burst_added.wait()
                self._burst_added = trio.Event()
                continue
            await trio.sleep(max(0.0, deadline - time.monotonic()) + 0.01)
            self._log_suppressed()

    # -- signals, control socket, systemd --------------------------------------------

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            first = True
            async for signum in signals:
                name = signal.Signals(signum).name
                if first:
                    logger.info("%s: stopping; open connections get %g s", name, self.options.grace)
                    self.stop()
                    first = False
                else:
                    logger.info("%s again: closing open connections now", name)
                    self._urgent.cancel()

    def _carry_out(self, request: Request) -> ProcessStatus:
        """Carry out a control request (see control.py); answer with the status after it."""
        if isinstance(request, StopRequest) and not self.stop(request.spec):
            return dataclasses.replace(self.status(), error=f"no binding {request.spec} here")
        return self.status()

    async def _report_status(self) -> None:
        from systemd import daemon

        while True:
            await self._changed.wait()
            self._changed = trio.Event()
            live = [b for b in self.bindings if not b.stopping]
            open_total = sum(b.open for b in self.bindings)
            daemon.notify(
                f"STATUS=serving {len(live)} binding(s), {open_total} open connection(s)"
                f"{' (stopping)' if len(live) < len(self.bindings) else ''}"
            )
            await trio.sleep(STATUS_INTERVAL)


@dataclass
class _Hang:
    """Why a call was ended before it was accepted."""

    waited: float  #: seconds the call was watched
    unread: int  #: bytes the client sent that the call never read


@dataclass
class _Call:
    """What one call did, filled in while it runs; read by the connection's handler."""

    returncode: int | None = None  #: None: ended at shutdown before it exited
    stderr: bytearray = field(default_factory=bytearray)
    stats: RelayStats | None = None  #: relay mode only
    hung: _Hang | None = None  #: set when the call was ended for not being accepted
    number: int = -1  #: the binding's count of calls when this one started


#: What qrexec-client-vm prints, and all it prints, when dom0 refuses a call
#: (qubes-core-qrexec, agent/qrexec-client-vm.c): the agent closed the trigger
#: socket before sending the connection's parameters. A service's own exit
#: code 126 comes after the call was connected, with the service's words.
REQUEST_REFUSED = b"Request refused\n"


#: Exit codes that prove dom0 allowed the call: served (0), or failed at the
#: target (125: its connect failed, 127: no such service). Any other code may
#: be qrexec-client-vm's own failure before dom0 was asked (1, 255).
ALLOWED_EXITS = frozenset({0, EXIT_QREXEC_PROBLEM, EXIT_NO_SERVICE})


def _refused_by_dom0(call: "_Call") -> bool:
    """Whether dom0 refused the call (policy or no free port), not the service with 126."""
    return call.returncode == EXIT_REFUSED and bytes(call.stderr) == REQUEST_REFUSED


def _duplicate(conn: trio.socket.SocketType) -> socket.socket:
    """A second descriptor of ``conn``'s socket (close-on-exec), for reading its counters."""
    return socket.socket(fileno=os.dup(conn.fileno()))


def _stdio_pair() -> tuple[trio.SocketStream, socket.socket]:
    """A connected pair: our end as a trio stream, the child's as a blocking socket.

    Sockets rather than pipes: a child that splice()s a socket into a pipe
    holds the pipe's lock while it waits for data, and our non-blocking read
    of that pipe would then block the whole event loop.
    """
    ours, theirs = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(ours)), theirs


async def _collect(stream: trio.abc.ReceiveStream, kept: bytearray, done: trio.Event) -> None:
    """Read a child's stderr to EOF, keeping the first MAX_STDERR_KEPT bytes."""
    try:
        while True:
            data = await stream.receive_some(4096)
            if not data:
                return
            room = MAX_STDERR_KEPT - len(kept)
            if room > 0:
                kept.extend(data[:room])
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        done.set()


def stderr_detail(stderr: bytes) -> str:
    """What a call's stderr adds to its log line: one line, printable, the first 200 characters.

    The bytes come from the target qube (a service's stderr is forwarded to
    the caller) and may hold anything: runs of whitespace become one space,
    every other non-printable character is escaped (qconnect.core.printable).
    """
    text = " ".join(stderr.decode("utf-8", errors="surrogateescape").split())
    return printable(text[:STDERR_DETAIL_CHARS])


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)
