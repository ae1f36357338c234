"""Text from outside never reaches the client's log or terminal raw.

A target's stderr (an executable service's is forwarded to the caller), a
control-socket peer's answer, the background process's report: whatever
bytes they hold, a log line stays one line of printable characters in which
each of those bytes can still be read (runs of whitespace shown as one space).
"""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qconnect.client.loglines import CallContext, call_line
from qconnect.client.outcome import CallResult
from qconnect.client.qrexec_call import Mode
from qconnect.core.spec import BindingSpec
from qconnect.loopback.machine import Machine
from tests.client_world import exchange, free_port
from tests.conftest import write_executable

#: What a hostile service writes: clear the screen, set the terminal's title,
#: overwrite the line, forge a second log line, a C1 control, invalid UTF-8.
HOSTILE_STDERR = (
    b"\x1b[2J\x1b]0;owned\x07denied\rqvm-connect-tcp: all fine\n"
    b"forged line\x9b31m \xc2\x9b\xff\xfe\xe2\x80\xa8end"
)


def one_printable_line(text: str) -> bool:
    return text.isprintable()


class Records(logging.Handler):
    """Keeps every record logged to it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@given(st.binary(max_size=3000))
def test_a_calls_stderr_becomes_one_printable_line(stderr: bytes) -> None:
    from qconnect.client.loglines import stderr_detail

    detail = stderr_detail(stderr)
    assert one_printable_line(detail)
    if stderr.isascii() and bytes(stderr).decode().isprintable() and b"\\" not in stderr:
        assert detail == " ".join(stderr.decode().split())[:200]


@settings(max_examples=200)
@given(stderr=st.binary(max_size=600), returncode=st.sampled_from([1, 2, 125, 126, 127, 137, -9]))
def test_a_failed_calls_log_line_is_printable_whatever_its_stderr(
    stderr: bytes, returncode: int
) -> None:
    spec = BindingSpec("127.0.0.1", 8080, "web", 80)
    context = CallContext(spec, "127.0.0.1:40000", Mode.RELAY, "work", call_timeout=30)
    line = call_line(context, CallResult(returncode, stderr), 0.5)
    records = Records()
    logger = logging.getLogger("qconnect.client")
    logger.addHandler(records)
    try:
        logger.log(line.level, line.text, extra={"fields": line.fields})
    finally:
        logger.removeHandler(records)
    (record,) = records.records
    message = record.getMessage()  # the message itself, before any formatter's safety net
    assert one_printable_line(message), message
    if stderr.decode("utf-8", errors="surrogateescape").split():
        assert "[qrexec-client-vm: " in message


@given(st.text(max_size=300), st.text(max_size=50))
def test_the_formatter_makes_every_record_one_printable_line(message: str, argument: str) -> None:
    from qconnect.core.logs import PrintableFormatter

    record = logging.LogRecord(
        "x", logging.WARNING, __file__, 1, "%s %s", (message, argument), None
    )
    formatted = PrintableFormatter("qconnect: %(message)s").format(record)
    assert one_printable_line(formatted)
    if (message + argument).isprintable():
        assert formatted == f"qconnect: {message} {argument}"  # nothing changed, no double escape


def test_the_formatter_keeps_an_exception_on_the_same_line() -> None:
    from qconnect.core.logs import PrintableFormatter

    try:
        raise ValueError("bad\nvalue\x1b[2J")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    formatted = PrintableFormatter().format(record)
    assert one_printable_line(formatted)
    assert formatted.startswith("failed\\nTraceback") and "\\x1b[2J" in formatted


def test_journal_messages_and_fields_are_escaped_too() -> None:
    from qconnect.core.logs import journal_handler

    sent: list[tuple[str, dict[str, object]]] = []
    handler = journal_handler(
        "qvm-connect-tcp", send=lambda message, **fields: sent.append((message, fields))
    )
    record = logging.LogRecord(
        "x", logging.WARNING, __file__, 1, "call from %s", ("a\x1b[2Jb",), None
    )
    record.fields = {"PEER": "evil\nQCONNECT_OUTCOME=ok"}
    handler.emit(record)
    ((message, fields),) = sent
    assert message == "call from a\\x1b[2Jb"
    assert fields["QCONNECT_PEER"] == "evil\\nQCONNECT_OUTCOME=ok"


def test_escape_controls_leaves_already_escaped_text_alone() -> None:
    from qconnect.core.logs import escape_controls

    assert escape_controls("a\\x1b b") == "a\\x1b b"
    assert escape_controls("a\x1bb\n") == "a\\x1bb\\n"


@pytest.mark.parametrize("where", ["log file", "stderr"])
async def test_a_services_escape_sequences_reach_the_client_log_escaped(
    loopback_machine: object, tmp_path: Path, where: str
) -> None:
    port = free_port()
    machine: Machine = loopback_machine(  # type: ignore[operator]
        "untrusted",
        "web",
        policy=[f"qubes.ConnectTCP +{port} untrusted web allow"],
        stock_connect_tcp=False,
    )
    hostile = tmp_path / "hostile-stderr"
    hostile.write_bytes(HOSTILE_STDERR)
    write_executable(
        machine.rpc_dir("web") / "qubes.ConnectTCP",
        f"#!/bin/sh\ncat {hostile} >&2\nexit 1\n",
    )
    local_port = free_port()
    log_file = tmp_path / "client.log"
    env = machine.env_for("untrusted")
    env.pop("NOTIFY_SOCKET", None)
    argv = [sys.executable, "-m", "qconnect.client.cli", "-f", f"{local_port}:web:{port}"]
    if where == "log file":
        argv += ["--log-file", str(log_file)]
    client = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().startswith(b"Binding TCP")
        assert await exchange(local_port, b"hello") == b""
    finally:
        client.terminate()
        _, stderr = client.communicate(timeout=60)
    log = log_file.read_bytes() if where == "log file" else stderr
    lines = log.decode().splitlines()
    (call_line,) = [line for line in lines if "exit code 1" in line]
    assert all(one_printable_line(line) for line in lines), lines
    # whitespace runs (the CR, the newline, U+2028) become one space, as before
    assert (
        "[qrexec-client-vm: \\x1b[2J\\x1b]0;owned\\x07denied qvm-connect-tcp: all fine forged "
        "line\\x9b31m \\x9b\\xff\\xfe end]"
    ) in call_line
