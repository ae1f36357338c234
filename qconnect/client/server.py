"""The trio event loop of one client process: accept, call qrexec, account, stop.

One process serves every binding of one command line (or of one systemd
service). Task tree, each nursery owned by the function that opens it::

    ClientServer.run
    ├── services: signals, control socket, refusal-burst flusher, systemd STATUS
    └── bindings: _serve_binding(b) per binding: listen.accept_loop
        └── connections of b: _handle(b, conn, peer) per accepted connection

The jobs live in their own modules; this one wires them and owns the live
state (:class:`Binding`): listen.py accepts, call.py makes one call and
returns a typed :class:`~qconnect.client.outcome.CallResult`, pacing.py
fits calls into dom0's port table, loglines.py builds every log line from
values, bursts.py rate-limits them, control.py speaks the control protocol.

Stopping a binding cancels its accept loop and closes its listener; its open
connections get ``grace`` seconds to finish, then their calls are ended
(SIGTERM, then SIGKILL) and reaped. The process ends when no binding is left.
"""

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from qconnect.client import control, loglines
from qconnect.client.acceptance import tcp_progress
from qconnect.client.bursts import BurstCounter
from qconnect.client.call import duplicate, make_call
from qconnect.client.control import BindingStatus, ProcessStatus, Request, StopRequest
from qconnect.client.limits import DEFAULT_CALL_TIMEOUT, DEFAULT_GRACE, PROCESS_MAX_CONNECTIONS
from qconnect.client.listen import accept_loop
from qconnect.client.listeners import Listener
from qconnect.client.loglines import CallContext, LogLine
from qconnect.client.outcome import CallResult, Ending
from qconnect.client.pacing import HOLD_SECONDS, MAX_ATTEMPTS, Evidence, TargetPacer
from qconnect.client.qrexec_call import Mode, call_argv
from qconnect.core import exposure, sdnotify
from qconnect.core.spec import BindingSpec

logger = logging.getLogger("qconnect.client")

#: Minimum seconds between two systemd STATUS updates.
STATUS_INTERVAL = 1.0


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

    def count(self, result: CallResult) -> None:
        """Count a connection's last call: the one place the counters change."""
        ending = result.ending
        if ending is Ending.HUNG:
            self.hung += 1
        elif ending is Ending.REFUSED:
            self.refused += 1
        else:
            self.served += 1

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

            def start(conn: trio.socket.SocketType, peer: Any) -> None:
                binding.open += 1
                binding.idle = trio.Event()
                self._note_change()
                connections.start_soon(self._handle, binding, conn, peer)

            with binding.accept_scope:
                await accept_loop(
                    binding.listener,
                    acquire=lambda: self._acquire_slots(binding),
                    release=lambda: self._release_slots(binding),
                    start=start,
                    out_of_resources=lambda number: self._write(
                        loglines.accept_failed_line(binding.spec, number)
                    ),
                )
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

    async def _acquire_slots(self, binding: Binding) -> None:
        """Take a slot of the binding and one of the process; log when either is exhausted."""
        if binding.slots.value == 0:
            self._write(loglines.binding_full_line(binding.spec, binding.max_connections))
        await binding.slots.acquire()
        try:
            if self._process_slots.value == 0:
                self._write(loglines.process_full_line(PROCESS_MAX_CONNECTIONS))
            await self._process_slots.acquire()
        except BaseException:
            binding.slots.release()
            raise

    def _release_slots(self, binding: Binding) -> None:
        self._process_slots.release()
        binding.slots.release()

    # -- one connection --------------------------------------------------------

    async def _handle(self, binding: Binding, conn: trio.socket.SocketType, peer: Any) -> None:
        """Serve one accepted connection with one qrexec call (or a few, see _call_again).

        Resource handling: owns ``conn``, its slot and the call's process;
        all are closed, released or reaped here whatever happens. Error
        handling: any failure (no descriptors, the call cannot start) closes
        this connection only.
        """
        context = CallContext(
            spec=binding.spec,
            peer=loglines.peer_text(peer),
            mode=self.options.mode,
            source_qube=self.options.source_qube,
            call_timeout=self.options.call_timeout,
        )
        started = time.monotonic()
        result: CallResult | None = None
        spare: socket.socket | None = None
        try:
            # An exposed listener (qconnect expose): --from checked again here.
            admission = exposure.admit(conn.getsockname(), peer)
            if admission.refusal is not None:
                self._write(loglines.not_admitted_line(context, admission.refusal))
                return
            # A binary PROXY header is written by the relay: such a call is relayed.
            mode = Mode.RELAY if admission.relay_prefix else self.options.mode
            context = dataclasses.replace(context, mode=mode)
            argv = admission.call_argv(call_argv(self.options.executable, binding.spec, mode))
            for attempt in range(1, MAX_ATTEMPTS + 1):
                # A second descriptor of the socket, so a call refused for lack
                # of a channel can be made again on it (handoff mode only: in
                # relay mode the refused call may have taken bytes with it).
                # Out of descriptors: no retry for this connection, nothing worse.
                spare = None
                if mode is Mode.HANDOFF:
                    with contextlib.suppress(OSError):
                        spare = duplicate(conn)
                try:
                    result, number = await self._paced_call(
                        binding, argv, conn, mode, admission.relay_prefix
                    )
                except OSError as error:
                    self._write(loglines.start_failed_line(context, error))
                    return
                if (
                    spare is None
                    or attempt >= MAX_ATTEMPTS
                    or not await self._call_again(binding, result, number, spare)
                ):
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
        assert result is not None
        duration = time.monotonic() - started
        if result.hang is not None:
            self._write(loglines.hung_line(context, result.hang, duration))
        else:
            self._write(loglines.call_line(context, result, duration))
        binding.count(result)

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
        self,
        binding: Binding,
        argv: list[str],
        conn: trio.socket.SocketType,
        mode: Mode,
        relay_prefix: bytes = b"",
    ) -> tuple[CallResult, int]:
        """Make one call when the target's window and pause allow it; account for its outcome.

        Returns the call's result and its number in the binding's start order.
        A call counts against its target until its port is likely back in
        dom0's table, not only until qrexec-client-vm exits; a 126 counts as
        a lack of channel only when the binding's calls were allowed lately.
        """
        pacer = self._pacer(binding.spec.target)
        while (delay := pacer.wait(trio.current_time())) > 0:
            changed = self._pacing_changed
            with trio.move_on_after(delay):
                await changed.wait()
        number = binding.next_call
        binding.next_call += 1
        binding.undecided.add(number)
        began = trio.current_time()
        pacer.started(began)
        result: CallResult | None = None
        try:
            result = await make_call(
                argv, conn, mode, call_timeout=self.options.call_timeout, relay_prefix=relay_prefix
            )
            return result, number
        finally:
            now = trio.current_time()
            if result is not None and result.refused_by_dom0:
                pacer.refused(now, no_channel=binding.evidence.says_allowed(now))
            else:
                if result is not None and result.allowed_by_dom0:
                    binding.evidence.allowed(now)  # dom0 let it through: the policy allows it
                pacer.ended(now, now - began)
            binding.undecided.discard(number)
            binding.decided.set()
            binding.decided = trio.Event()
            self._pacing_change()

    async def _call_again(
        self, binding: Binding, result: CallResult, number: int, spare: socket.socket
    ) -> bool:
        """Whether a refused call is to be made again on the same connection.

        Only a 126 the evidence calls "no free channel" is: a call of this
        binding was allowed within EVIDENCE_SECONDS, or one that started
        before this one (``number``) is allowed within HOLD_SECONDS.
        Otherwise it is a denial, refused once (each evaluation of a deny
        rule notifies dom0's user). The socket must be as the client left
        it: nothing read from it, nothing written to it.
        """
        if not result.refused_by_dom0 or result.hang is not None:
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
                earlier < number for earlier in binding.undecided
            ):
                await binding.decided.wait()
        if not evidence.says_allowed(trio.current_time()):
            return False
        self._write(loglines.no_channel_line(binding.spec))
        return True

    # -- logging ----------------------------------------------------------------------

    def _write(self, line: LogLine) -> None:
        """Log a line built by loglines.py; a burst's line only once per burst window."""
        if line.burst is not None:
            if not self._bursts.record(line.burst.key, time.monotonic(), line.burst.counted_as):
                return
            self._burst_added.set()
        logger.log(line.level, line.text, extra={"fields": line.fields})

    def _log_suppressed(self, *, everything: bool = False) -> None:
        for key, count, what in self._bursts.flush(time.monotonic(), everything=everything):
            self._write(loglines.suppressed_line(key, count, what, self._bursts.window))

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
        while True:
            await self._changed.wait()
            self._changed = trio.Event()
            live = [b for b in self.bindings if not b.stopping]
            open_total = sum(b.open for b in self.bindings)
            sdnotify.notify(
                f"serving {len(live)} binding(s), {open_total} open connection(s)"
                f"{' (stopping)' if len(live) < len(self.bindings) else ''}"
            )
            await trio.sleep(STATUS_INTERVAL)
