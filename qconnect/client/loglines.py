"""The client's log lines: each line's text and journal fields, built once, from values.

Pure: no logger, no clock, no I/O. The server asks here for a
:class:`LogLine` and writes it (see ``ClientServer._write``); a line with a
:class:`Burst` is written only once per burst window, and the rest of its
burst is reported as a count (bursts.py). Everything a peer or a target
controls (a service's stderr) reaches a line only through
qconnect.core.printable.

Journal fields (journalctl shows them with ``-o verbose``, prefixed
``QCONNECT_`` by core/logs.py): a call's line has PEER, BINDING, TARGET,
PORT, DURATION and MODE, then EXIT and OUTCOME once it exited, BYTES_OUT
and BYTES_IN in relay mode; a hung call's has OUTCOME=hung and UNREAD; every
burst line has EVENT, and a burst's count COUNT.
"""

import logging
import os
from dataclasses import dataclass, field

from qconnect.client.outcome import CallResult, Hang, Kind, describe_exit
from qconnect.client.qrexec_call import Mode
from qconnect.core.printable import printable
from qconnect.core.spec import BindingSpec

#: Characters of a failed call's stderr shown in its log line: a message such
#: as "Request refused" fits many times over; a chatty service is cut short.
STDERR_DETAIL_CHARS = 200

Fields = dict[str, str | int]


@dataclass(frozen=True)
class Burst:
    """Lines of one kind that are written once per burst window, then counted."""

    key: tuple[object, ...]  #: what makes two events "the same": its first item names the event
    counted_as: str  #: the counted events, in words: "... and 12 more <counted_as>"


@dataclass(frozen=True)
class LogLine:
    text: str
    level: int = logging.INFO
    fields: Fields = field(default_factory=dict)
    burst: Burst | None = None


@dataclass(frozen=True)
class CallContext:
    """What every line about one connection's call says besides the call's own result."""

    spec: BindingSpec
    peer: str  #: the client's address, as :func:`peer_text` writes it
    mode: Mode
    source_qube: str  #: this qube, for the dom0 command a refusal suggests
    call_timeout: float


def peer_text(peer: object) -> str:
    """A client's address as accept() gave it: ``host:port``, ``[v6host]:port``."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


def stderr_detail(stderr: bytes) -> str:
    """What a call's stderr adds to its log line: one line, printable, the first 200 characters.

    The bytes come from the target qube (a service's stderr is forwarded to
    the caller) and may hold anything: runs of whitespace become one space,
    every other non-printable character is escaped (qconnect.core.printable).
    """
    text = " ".join(stderr.decode("utf-8", errors="surrogateescape").split())
    return printable(text[:STDERR_DETAIL_CHARS])


def _burst_line(text: str, burst: Burst, fields: Fields | None = None) -> LogLine:
    return LogLine(
        text, logging.WARNING, {"EVENT": str(burst.key[0]), **(fields or {})}, burst=burst
    )


def _call_fields(context: CallContext, duration: float) -> Fields:
    spec = context.spec
    return {
        "PEER": context.peer,
        "BINDING": str(spec),
        "TARGET": spec.target,
        "PORT": spec.remote_port,
        "DURATION": f"{duration:.3f}",
        "MODE": context.mode.value,
    }


def call_line(context: CallContext, result: CallResult, duration: float) -> LogLine:
    """The line for a call that ended on its own (or at shutdown): how, and what it moved.

    A refusal is a burst line (a browser may be refused a thousand times in
    a second) and carries EVENT only; any other call is one line of its own.
    """
    spec = context.spec
    fields = _call_fields(context, duration)
    kind = result.kind
    if result.returncode is None:
        words = "ended at shutdown"
    else:
        outcome = describe_exit(
            result.returncode,
            source_qube=context.source_qube,
            target=spec.target,
            remote_port=spec.remote_port,
        )
        words = outcome.words
        fields["EXIT"] = result.returncode
        fields["OUTCOME"] = outcome.kind.value
    timing = f"{duration:.2f} s"
    if result.relayed is not None:
        fields["BYTES_OUT"], fields["BYTES_IN"] = result.relayed.out, result.relayed.back
        timing += f", {result.relayed.out} bytes out, {result.relayed.back} bytes in"
    text = f"{context.peer} -> {spec.target}:{spec.remote_port} ({timing}): {words}"
    if result.stderr and kind not in (None, Kind.OK):
        detail = stderr_detail(result.stderr)
        if detail:
            text += f" [qrexec-client-vm: {detail}]"
    if kind is Kind.REFUSED:
        where = f"{spec.target}:{spec.remote_port}"
        return _burst_line(text, Burst(("refused", spec), f"calls to {where} refused"))
    level = logging.INFO if kind in (None, Kind.OK) else logging.WARNING
    return LogLine(text, level, fields)


def hung_line(context: CallContext, hang: Hang, duration: float) -> LogLine:
    """The line for a call ended because it was not accepted: what to check in dom0."""
    spec = context.spec
    target = spec.target
    starting = (
        "the target qube dom0 picks"
        if target == "@default"
        else f"{target} (try: qvm-start {target} in dom0)"
    )
    text = (
        f"{context.peer} -> {target}:{spec.remote_port} ({duration:.2f} s): call not "
        f"accepted after {hang.waited:.0f} s, the client's {hang.unread} byte(s) still "
        "unread; ended qrexec-client-vm and closed the connection. Check dom0 for a policy "
        f"'ask' prompt waiting for an answer, and that {starting} starts; "
        f"--call-timeout is {context.call_timeout:g} s"
    )
    burst = Burst(
        ("hung", spec),
        f"calls to {target}:{spec.remote_port} not accepted within {context.call_timeout:g} s",
    )
    fields = _call_fields(context, duration)
    fields["OUTCOME"] = "hung"
    fields["UNREAD"] = hang.unread
    return _burst_line(text, burst, fields)


def start_failed_line(context: CallContext, error: OSError) -> LogLine:
    """The line for a connection closed because qrexec-client-vm could not be started."""
    spec = context.spec
    return _burst_line(
        f"{context.peer} -> {spec.target}:{spec.remote_port}: cannot start "
        f"qrexec-client-vm: {error.strerror or error}; connection closed",
        Burst(
            ("start-failed", spec),
            "connections closed because qrexec-client-vm could not start",
        ),
    )


def not_admitted_line(context: CallContext, refusal: str) -> LogLine:
    """The line for a connection to an exposed listener from outside its ``--from``."""
    spec = context.spec
    return _burst_line(
        f"{context.peer} -> {spec.target}:{spec.remote_port}: closed, never forwarded: {refusal}",
        Burst(("not-admitted", spec), "connections closed because their source is not admitted"),
        {"PEER": context.peer, "BINDING": str(spec), "OUTCOME": "not-admitted"},
    )


def no_channel_line(spec: BindingSpec) -> LogLine:
    """The line for a call made again because dom0 had no free channel (see pacing.py)."""
    where = f"{spec.target}:{spec.remote_port}"
    return _burst_line(
        f"{where}: dom0 had no free qrexec channel to the target "
        "for a call this binding is allowed to make (a qube gets 128, shared by every qube "
        "calling it on one side); slowing down and calling again",
        Burst(("no-channel", spec), f"calls to {where} made again for lack of a channel"),
    )


def accept_failed_line(spec: BindingSpec, error_number: int) -> LogLine:
    """The line for an accept() that failed for lack of descriptors or memory."""
    return _burst_line(
        f"{spec}: cannot accept a connection: {os.strerror(error_number)}; "
        "it stays in the listen backlog and is retried",
        Burst(("accept", spec), "accept() failures"),
    )


def binding_full_line(spec: BindingSpec, max_connections: int) -> LogLine:
    """The line for a binding whose every connection slot is taken."""
    return _burst_line(
        f"{spec}: all {max_connections} connection slots busy "
        "(--max-connections); new connections wait in the listen backlog",
        Burst(("binding-full", spec), "times the binding was full"),
    )


def process_full_line(process_max: int) -> LogLine:
    """The line for a process whose every call slot is taken, whichever binding waits."""
    return _burst_line(
        f"all {process_max} calls this process may have in flight are "
        "busy; new connections wait in the listen backlog",
        Burst(("process-full",), "times the process was full"),
    )


def suppressed_line(key: object, count: int, counted_as: str, window: float) -> LogLine:
    """The count of a burst's lines that were not written, at the end of its window."""
    return LogLine(
        f"... and {count} more {counted_as} in the last {window:g} s",
        logging.WARNING,
        {"EVENT": str(key), "COUNT": count},
    )
