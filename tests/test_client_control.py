"""The control protocol: typed messages, parsed by the same rules at each end, nothing malformed.

Pure tests of control.py's requests and answers (table and property, no
sockets), then the answering end over a real unix socket pair.
"""

import json
import socket
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from qconnect.client.control import (
    STATUS,
    UNKNOWN_REQUEST,
    BindingStatus,
    ControlMessageError,
    ProcessStatus,
    Request,
    RequestRefused,
    StopRequest,
    encode_answer,
    parse_answer,
    parse_request,
    serve,
)
from qconnect.core.spec import BindingSpec

WEB = BindingSpec("127.0.0.1", 8080, "web", 80)

shown = st.one_of(st.none(), st.booleans(), st.integers(), st.text(), st.floats(allow_nan=False))

binding_statuses = st.builds(
    BindingStatus,
    spec=st.text(),
    open=shown,
    max=shown,
    served=shown,
    refused=shown,
    hung=shown,
    stopping=st.booleans(),
)

process_statuses = st.builds(
    ProcessStatus,
    pid=st.integers(),
    started=st.floats(allow_nan=False, allow_infinity=False),
    mode=shown,
    systemd=st.booleans(),
    log=shown,
    bindings=st.lists(binding_statuses, max_size=3).map(tuple),
    error=st.none() | st.text(),
)


# -- requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "request_"),
    [
        (b"status", STATUS),
        (b"  status ", STATUS),
        (b"stop", StopRequest()),
        (b"stop 127.0.0.1:8080:web:80", StopRequest(WEB)),
        (b"stop 8080:web:80", StopRequest(WEB)),
    ],
)
def test_a_request_line_reads_as_its_request(line: bytes, request_: Request) -> None:
    assert parse_request(line) == request_


@pytest.mark.parametrize(
    "line", [b"", b"stat", b"status now", b"stop a b", b"STOP", b"\xff\xfe", b"list"]
)
def test_anything_else_is_refused_with_what_is_expected(line: bytes) -> None:
    with pytest.raises(ControlMessageError) as caught:
        parse_request(line)
    assert str(caught.value) == UNKNOWN_REQUEST


def test_a_stop_naming_no_spec_is_refused_in_the_spec_parsers_words() -> None:
    with pytest.raises(ControlMessageError) as caught:
        parse_request(b"stop 8080:web\x1b[2J:80")
    message = str(caught.value)
    assert message.isprintable() and "web\\x1b[2J" in message


@pytest.mark.parametrize("request_", [STATUS, StopRequest(), StopRequest(WEB)])
def test_every_request_reads_back_as_itself(request_: Request) -> None:
    line = request_.to_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_request(line[:-1]) == request_


# -- answers ------------------------------------------------------------------------------


@given(process_statuses)
def test_every_status_reads_back_as_itself(status: ProcessStatus) -> None:
    answer = parse_answer(encode_answer(status))
    assert answer == status
    assert isinstance(answer, ProcessStatus) and answer.error == status.error


@given(st.text())
def test_a_refusal_reads_back_as_itself(error: str) -> None:
    assert parse_answer(encode_answer(RequestRefused(error))) == RequestRefused(error)


def test_the_wire_form_of_a_status_is_the_documented_one() -> None:
    status = ProcessStatus(
        pid=1234,
        started=1764318000.0,
        mode="handoff",
        systemd=False,
        log="/run/x.log",
        bindings=(BindingStatus("127.0.0.1:8080:web:80", 2, 64, 40, 1, 0, False),),
    )
    assert json.loads(encode_answer(status)) == {
        "pid": 1234,
        "started": 1764318000.0,
        "mode": "handoff",
        "systemd": False,
        "log": "/run/x.log",
        "bindings": [
            {
                "spec": "127.0.0.1:8080:web:80",
                "open": 2,
                "max": 64,
                "served": 40,
                "refused": 1,
                "hung": 0,
                "stopping": False,
            }
        ],
    }
    with_error = json.loads(encode_answer(ProcessStatus(pid=1, started=0, error="no binding")))
    assert list(with_error)[-1] == "error"


def test_an_older_process_without_hung_counts_is_read_with_none_hung() -> None:
    older = {"pid": 7, "started": 0, "mode": "relay", "systemd": True, "log": None}
    older["bindings"] = [{"spec": "8080:web:80", "open": 0, "max": 1, "served": 0, "refused": 0}]
    answer = parse_answer(json.dumps(older).encode() + b"\n")
    assert isinstance(answer, ProcessStatus) and answer.bindings[0].hung == 0


MALFORMED = [
    b"",
    b"{}",  # no pid
    b'{"pid": 1}',  # no newline
    b"not json\n",
    b"[1, 2]\n",
    b'"status"\n',
    b'{"pid": "1"}\n',
    b'{"pid": true}\n',
    b'{"pid": 1, "started": "yesterday"}\n',
    b'{"pid": 1, "started": false}\n',
    b'{"pid": 1, "bindings": {}}\n',
    b'{"pid": 1, "bindings": ["8080:web:80"]}\n',
    b'{"pid": 1, "bindings": [{"open": 1}]}\n',
    b'{"pid": 1, "bindings": [{"spec": 8080}]}\n',
    b'{"pid": 1, "bindings": [{"spec": "a", "open": [1]}]}\n',
    b'{"pid": 1, "bindings": [{"spec": "a", "stopping": "no"}]}\n',
    b'{"pid": 1, "systemd": 1}\n',
    b'{"pid": 1, "mode": {"\\u001b[2J": 1}}\n',
    b'{"pid": 1, "error": 5}\n',
    b'{"error": 5}\n',
    b'{"pid": 1, "log": "' + b"x" * (64 * 1024) + b'"}\n',
]


@pytest.mark.parametrize("data", MALFORMED)
def test_a_malformed_answer_is_one_printable_line_saying_what_is_wrong(data: bytes) -> None:
    with pytest.raises(ControlMessageError) as caught:
        parse_answer(data)
    message = str(caught.value)
    assert message and message.isprintable() and len(message) < 200, message


@given(st.binary(max_size=300))
def test_no_bytes_from_a_peer_get_past_the_parser_unchecked(data: bytes) -> None:
    try:
        answer = parse_answer(data)
    except ControlMessageError as error:
        assert str(error).isprintable()
        return
    assert isinstance(answer, ProcessStatus | RequestRefused)
    if isinstance(answer, ProcessStatus):
        assert isinstance(answer.pid, int) and not isinstance(answer.pid, bool)
        assert all(isinstance(binding.spec, str) for binding in answer.bindings)


# -- the answering end, over a real socket ------------------------------------------------------


async def _ask(listener: trio.socket.SocketType, path: str, line: bytes) -> bytes:
    async with trio.open_nursery() as nursery:

        def respond(request: Request) -> ProcessStatus:
            error = "no binding here" if request == StopRequest(WEB) else None
            return ProcessStatus(pid=99, started=1.0, error=error)

        nursery.start_soon(serve, listener, respond)
        peer = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with peer:
            await peer.connect(path)
            await peer.send(line)
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = await peer.recv(65536)
                if not chunk:
                    break
                answer += chunk
        nursery.cancel_scope.cancel()
    return answer


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"status\n", ProcessStatus(pid=99, started=1.0)),
        (b"stop 8080:web:80\n", ProcessStatus(pid=99, started=1.0, error="no binding here")),
        (b"halt\n", RequestRefused(UNKNOWN_REQUEST)),
        (b"stop 99999:web:80\n", None),  # the spec parser's own words
    ],
)
async def test_a_process_answers_each_request_with_one_json_line(
    tmp_path: Path, line: bytes, expected: object
) -> None:
    path = f"{tmp_path}/1.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        await listener.bind(path)
        listener.listen()
        answer = parse_answer(await _ask(listener, path, line))
    if expected is None:
        assert isinstance(answer, RequestRefused) and "99999" in answer.error
    else:
        assert answer == expected
        assert getattr(answer, "error", None) == getattr(expected, "error", None)
