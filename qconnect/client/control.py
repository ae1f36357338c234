"""The control protocol of a client process, both ends: typed messages and their wire form.

Every ``qvm-connect-tcp`` process listens on its control socket in the
registry (see registry.py for where, and why that place can be trusted).
``qconnect list`` and ``qconnect stop`` connect, send one request line and
read one JSON line back; the process answers with its own live state, so
what they show is never a stale file.

Requests (one line of ASCII words): ``status``; ``stop`` (every binding of
the process); ``stop SPEC`` (one binding; the process exits when it has none
left). The answer to each is a :class:`ProcessStatus`, one JSON object::

    {"pid": 1234, "started": 1764318000.0, "mode": "handoff", "systemd": false,
     "log": "/run/user/1000/qconnect/client/1234.log",
     "bindings": [{"spec": "127.0.0.1:8080:web:80", "open": 2, "max": 64,
                   "served": 40, "refused": 1, "hung": 0, "stopping": false}]}

with an ``"error"`` key added when a ``stop SPEC`` named a binding the
process does not have. A request it cannot read is answered by
:class:`RequestRefused`, ``{"error": "..."}`` alone.

The messages are parsed here and only here, by the same rules on both ends
(:func:`parse_request`, :func:`parse_answer`); anything else is a
:class:`ControlMessageError`. Trust: each end checks the other's uid with
SO_PEERCRED before it believes a word (a process answers its own user and
root; ``list``/``stop`` believe only their own user), and the fields a peer
fills in are only ever shown through qconnect.core.printable.

The asking end (:func:`query`, :func:`ask_all`) uses the standard library
only, so ``qconnect list`` does not import trio; the answering end
(:func:`serve`) imports trio when it runs.
"""

import contextlib
import errno
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qconnect.client.registry import SOCKET_SUFFIX, peer_credentials, registry_dir, remove_stale
from qconnect.core.errors import ClientError, SpecError
from qconnect.core.printable import printable
from qconnect.core.spec import BindingSpec, parse_spec
from qconnect.core.unixpath import connect_unix

if TYPE_CHECKING:
    import trio

logger = logging.getLogger("qconnect.client")

#: Largest request or answer on a control socket. A status names at most a
#: few dozen bindings; anything longer is not from one of ours.
MAX_MESSAGE = 64 * 1024

#: Largest request a process reads: "stop SPEC", a spec being well under it.
MAX_REQUEST = 512

#: How long ``list``/``stop`` wait for a process to answer. A live client
#: answers in milliseconds; a stuck one must not hang ``qconnect list``.
QUERY_TIMEOUT = 3.0

#: How long a process waits for a request once a peer connected: a peer that
#: connects and says nothing must not hold a task for ever.
REQUEST_TIMEOUT = 2.0

#: What a process answers to a request it cannot read.
UNKNOWN_REQUEST = "unknown request: expected 'status', 'stop' or 'stop SPEC'"


class ControlMessageError(ValueError):
    """A message on a control socket that is not one of the protocol's; says what is wrong."""


# -- requests -------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusRequest:
    """``status``: report every binding of the process."""

    def to_line(self) -> bytes:
        return b"status\n"


@dataclass(frozen=True)
class StopRequest:
    """``stop`` (``spec`` None: every binding) or ``stop SPEC`` (that binding only)."""

    spec: BindingSpec | None = None

    def to_line(self) -> bytes:
        return b"stop\n" if self.spec is None else f"stop {self.spec}\n".encode()


Request = StatusRequest | StopRequest

STATUS = StatusRequest()


def parse_request(line: bytes) -> Request:
    """One request line (without its newline) as a request; ControlMessageError if it is none.

    The error's text is what the process answers, so it says what is expected;
    a bad SPEC gets the spec parser's own words.
    """
    words = line.decode(errors="replace").split()
    if words == ["status"]:
        return STATUS
    if words == ["stop"]:
        return StopRequest()
    if len(words) == 2 and words[0] == "stop":
        try:
            return StopRequest(parse_spec(words[1]))
        except SpecError as error:
            raise ControlMessageError(str(error)) from None
    raise ControlMessageError(UNKNOWN_REQUEST)


# -- answers --------------------------------------------------------------------------

#: A field ``list`` only shows: an int from one of our processes, but any JSON
#: scalar a peer sends is kept as sent and shown escaped, never interpreted.
Shown = str | int | float | bool | None

_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class BindingStatus:
    """One binding of a process, as ``qconnect list`` shows it."""

    spec: str  #: the spec's text; ``stop`` parses it and names it if it is not a spec
    open: Shown
    max: Shown
    served: Shown
    refused: Shown
    hung: Shown = 0  #: absent from the answers of processes older than the hang watch
    stopping: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "open": self.open,
            "max": self.max,
            "served": self.served,
            "refused": self.refused,
            "hung": self.hung,
            "stopping": self.stopping,
        }

    @classmethod
    def from_json(cls, value: object) -> "BindingStatus":
        fields = _object(value, "a binding")
        spec = fields.get("spec")
        if not isinstance(spec, str):
            raise ControlMessageError(f"a binding's spec is {_shown(spec)}, expected a string")
        return cls(
            spec=spec,
            open=_scalar(fields, "open"),
            max=_scalar(fields, "max"),
            served=_scalar(fields, "served"),
            refused=_scalar(fields, "refused"),
            hung=_scalar(fields, "hung", 0),
            stopping=_boolean(fields, "stopping"),
        )


@dataclass(frozen=True)
class ProcessStatus:
    """A process's answer: who it is and its bindings (those not yet stopped and closed)."""

    pid: int
    started: float  #: time.time() when it started
    mode: Shown = "?"
    systemd: bool = False
    log: Shown = None  #: its log file, when it has one
    bindings: tuple[BindingStatus, ...] = ()
    #: set when the request named a binding this process does not have
    error: str | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        answer = {
            "pid": self.pid,
            "started": self.started,
            "mode": self.mode,
            "systemd": self.systemd,
            "log": self.log,
            "bindings": [binding.to_json() for binding in self.bindings],
        }
        if self.error is not None:
            answer["error"] = self.error
        return answer

    @classmethod
    def from_json(cls, value: object) -> "ProcessStatus":
        fields = _object(value, "the answer")
        pid, started = fields.get("pid"), fields.get("started", 0.0)
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise ControlMessageError(f"pid is {_shown(pid)}, expected an integer")
        if not isinstance(started, int | float) or isinstance(started, bool):
            raise ControlMessageError(f"started is {_shown(started)}, expected a number")
        bindings = fields.get("bindings", [])
        if not isinstance(bindings, list):
            raise ControlMessageError(f"bindings is {_shown(bindings)}, expected a list")
        error = fields.get("error")
        if error is not None and not isinstance(error, str):
            raise ControlMessageError(f"error is {_shown(error)}, expected a string")
        return cls(
            pid=pid,
            started=started,
            mode=_scalar(fields, "mode", "?"),
            systemd=_boolean(fields, "systemd"),
            log=_scalar(fields, "log", None),
            bindings=tuple(BindingStatus.from_json(binding) for binding in bindings),
            error=error,
        )


@dataclass(frozen=True)
class RequestRefused:
    """A process's answer to a request it could not read."""

    error: str

    def to_json(self) -> dict[str, Any]:
        return {"error": self.error}


Answer = ProcessStatus | RequestRefused


def encode_answer(answer: Answer) -> bytes:
    return json.dumps(answer.to_json()).encode() + b"\n"


def parse_answer(data: bytes) -> Answer:
    """One answer, newline included, as sent; ControlMessageError if it is not one."""
    if len(data) > MAX_MESSAGE:
        raise ControlMessageError(f"the answer is longer than {MAX_MESSAGE} bytes")
    if not data.endswith(b"\n"):
        raise ControlMessageError("the answer does not end with a newline")
    try:
        value = json.loads(data)
    except ValueError:
        raise ControlMessageError("the answer is not JSON") from None
    if isinstance(value, dict) and set(value) == {"error"} and isinstance(value["error"], str):
        return RequestRefused(value["error"])
    return ProcessStatus.from_json(value)


def _shown(value: object) -> str:
    """A value a peer sent, for an error message: its JSON text, escaped and cut short."""
    text = json.dumps(value)
    return printable(text if len(text) <= 60 else text[:57] + "...")


def _object(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ControlMessageError(f"{what} is {_shown(value)}, expected an object")
    return value


def _scalar(fields: dict[str, object], name: str, default: Shown = None) -> Shown:
    value = fields.get(name, default)
    if not isinstance(value, _SCALARS):
        raise ControlMessageError(f"{name} is {_shown(value)}, expected a number or a string")
    return value


def _boolean(fields: dict[str, object], name: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise ControlMessageError(f"{name} is {_shown(value)}, expected true or false")
    return value


# -- the asking end: ``qconnect list`` and ``qconnect stop`` (standard library only) ------


def query(path: Path, request: Request) -> ProcessStatus:
    """Send one request to one control socket and return the process's status.

    The answer is believed only from a process of this user: the peer's
    uid (SO_PEERCRED, given by the kernel) is checked before the request is
    even sent. Raises ConnectionRefusedError / FileNotFoundError when nobody
    listens there, ConnectionResetError when the process closed without a
    word (it is exiting), ClientError for anything else: one line, escaped.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(QUERY_TIMEOUT)
        connect_unix(sock, str(path))
        _, uid, _ = peer_credentials(sock)
        if uid != os.geteuid():
            raise ClientError(
                f"{printable(str(path))}: answered by a process of uid {uid}, not of this "
                f"user (uid {os.geteuid()}); not believed"
            )
        sock.sendall(request.to_line())
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_MESSAGE:
            chunk = sock.recv(MAX_MESSAGE)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    data = b"".join(chunks)
    if not data:
        raise ConnectionResetError(errno.ECONNRESET, "closed without an answer")
    try:
        answer = parse_answer(data)
    except ControlMessageError as error:
        logger.debug("%s: %s", printable(str(path)), error)
        raise ClientError(f"{printable(str(path))}: no valid answer") from None
    if isinstance(answer, RequestRefused):
        raise ClientError(
            f"{printable(str(path))}: the process refused the request: {printable(answer.error)}"
        )
    return answer


def _sockets() -> list[Path]:
    directory = registry_dir(create=False)
    if directory is None:
        return []
    try:
        names = sorted(os.listdir(directory))
    except OSError as error:
        raise ClientError(
            f"cannot read {printable(str(directory))}: {os.strerror(error.errno or 0)}"
        ) from None
    return [directory / name for name in names if name.endswith(SOCKET_SUFFIX)]


def ask_all(request: Request) -> list[ProcessStatus]:
    """Send ``request`` to every running client process; return their answers, by pid.

    A socket nobody listens on is a dead process's leftover and is removed
    (with its log file); a process exiting as we ask is left out.
    """
    answers: list[ProcessStatus] = []
    for path in _sockets():
        try:
            answers.append(query(path, request))
        except (ConnectionRefusedError, FileNotFoundError):
            remove_stale(path)
        except OSError as error:
            if error.errno in (errno.ECONNRESET, errno.EPIPE):
                continue  # the process is exiting as we ask
            if error.errno in (errno.ECONNREFUSED, errno.ENOENT):
                remove_stale(path)
                continue
            raise ClientError(
                f"{printable(str(path))}: {os.strerror(error.errno or 0) or error}"
            ) from None
    return sorted(answers, key=lambda answer: answer.pid)


# -- the answering end: the client process ------------------------------------------------


async def serve(
    listener: "trio.socket.SocketType", respond: Callable[[Request], ProcessStatus]
) -> None:
    """Answer every peer of the control socket, one task each, until cancelled.

    ``respond`` carries out a request and returns the status to send back
    (with its ``error`` set when the request named a binding the process
    does not have); a request that cannot be read is answered with
    :class:`RequestRefused` without reaching it.

    Resource handling: each accepted connection is closed by its task; the
    listening socket stays the caller's. Error handling: a peer that is not
    this user or root is logged and closed without a word; a peer that
    vanishes before its answer is forgotten.
    """
    import trio

    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await listener.accept()
            nursery.start_soon(_answer, conn, respond)


async def _answer(
    conn: "trio.socket.SocketType", respond: Callable[[Request], ProcessStatus]
) -> None:
    import trio

    with conn:
        pid, uid, _ = peer_credentials(conn)  # type: ignore[arg-type]
        if uid not in (os.geteuid(), 0):
            # The socket is 0600 in a 0700 directory: only a process given
            # our socket some other way gets here. It learns nothing.
            logger.warning("control socket: ignored a request from uid %d (pid %d)", uid, pid)
            return
        received = b""
        with trio.move_on_after(REQUEST_TIMEOUT):
            while b"\n" not in received and len(received) <= MAX_REQUEST:
                chunk = await conn.recv(MAX_REQUEST)
                if not chunk:
                    break
                received += chunk
        answer: Answer
        try:
            request = parse_request(received.split(b"\n", 1)[0])
        except ControlMessageError as error:
            answer = RequestRefused(str(error))
        else:
            answer = respond(request)
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            await trio.SocketStream(conn).send_all(encode_answer(answer))
