"""What our logging sends to journald (systemd-python's JournalHandler), and to stderr otherwise.

The journal cases read what reaches a journal socket: libsystemd always
sends to /run/systemd/journal/socket, so the program runs in a user and
mount namespace of its own (``unshare``) with a fresh /run, where it binds
that socket itself, logs through setup_logging() and reads the datagrams
back in journald's native protocol. No journald and no privilege is needed,
and nothing reaches the host's journal.
"""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qconnect.core.logs import journal_handler

PROJECT = Path(__file__).resolve().parent.parent

# Binds the journal's socket, logs through setup_logging as under systemd
# (JOURNAL_STREAM names our stderr), prints each entry it received as JSON.
JOURNAL_PROGRAM = r"""
import json, logging, os, socket, struct, sys
os.makedirs("/run/systemd/journal")
journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
journal.bind("/run/systemd/journal/socket")
journal.settimeout(10)
info = os.fstat(2)
os.environ["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
from qconnect.core.logs import setup_logging
setup_logging("qconnect-service", verbose=True)
log = logging.getLogger("qconnect.service")
fields = {"caller": "wo\x1b[2Jrk", "port": 8080, "reason": "evil\nQCONNECT_OUTCOME=ok"}
log.warning("call from %s refused", "wo\x1b[2Jrk", extra={"fields": fields})
log.debug("plain")
try:
    raise ValueError("bad\nvalue")
except ValueError:
    log.exception("failed")

def parse(datagram):
    entry, rest = {}, datagram
    while rest:
        line, _, rest = rest.partition(b"\n")
        if b"=" in line:
            name, _, value = line.partition(b"=")
        else:  # binary-safe form: NAME \n le64 length, value, \n
            (size,) = struct.unpack("<Q", rest[:8])
            name, value, rest = line, rest[8 : 8 + size], rest[9 + size :]
        entry[name.decode()] = value.decode()
    return entry

print(json.dumps([parse(journal.recv(65536)) for _ in range(3)]))
"""


def _journal_entries() -> list[dict[str, str]]:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1) for a journal socket of the test's own")
    probe = subprocess.run(
        [unshare, "-Urm", "mount", "-t", "tmpfs", "tmpfs", "/run"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"no user and mount namespace here: {probe.stderr.decode().strip()}")
    shell = 'mount -t tmpfs tmpfs /run && exec "$0" -c "$1"'
    result = subprocess.run(
        [unshare, "-Urm", "sh", "-c", shell, sys.executable, JOURNAL_PROGRAM],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    entries: list[dict[str, str]] = json.loads(result.stdout)
    return entries


@pytest.fixture(scope="module")
def journal_entries() -> list[dict[str, str]]:
    return _journal_entries()


def test_a_journal_entry_has_our_identifier_priority_and_fields(
    journal_entries: list[dict[str, str]],
) -> None:
    warning = journal_entries[0]
    assert warning["MESSAGE"] == "call from wo\\x1b[2Jrk refused"
    assert warning["PRIORITY"] == "4"
    assert warning["SYSLOG_IDENTIFIER"] == "qconnect-service"
    assert warning["LOGGER"] == "qconnect.service"
    assert warning["QCONNECT_CALLER"] == "wo\\x1b[2Jrk"
    assert warning["QCONNECT_PORT"] == "8080"
    assert warning["QCONNECT_REASON"] == "evil\\nQCONNECT_OUTCOME=ok"
    assert "QCONNECT_OUTCOME" not in warning
    assert journal_entries[1]["MESSAGE"] == "plain"
    assert journal_entries[1]["PRIORITY"] == "7"


def test_every_journal_field_is_one_printable_line_with_a_name_journald_takes(
    journal_entries: list[dict[str, str]],
) -> None:
    for entry in journal_entries:
        for name, value in entry.items():
            assert name.isupper() and not name.startswith("_"), name
            assert value.isprintable(), (name, value)
    failed = journal_entries[2]
    assert failed["PRIORITY"] == "3"
    assert failed["MESSAGE"].startswith("failed\\nTraceback")
    assert "ValueError: bad\\nvalue" in failed["EXCEPTION_TEXT"]


def test_the_handler_turns_fields_into_qconnect_fields_for_any_sender() -> None:
    sent: list[tuple[str, dict[str, object]]] = []
    handler = journal_handler("qvm-connect-tcp", lambda message, **f: sent.append((message, f)))
    record = logging.LogRecord("qconnect.client", logging.INFO, __file__, 7, "ok", (), None)
    record.fields = {"bytes_in": 12, "outcome": "ok"}
    handler.handle(record)
    ((message, fields),) = sent
    assert message == "ok"
    assert fields["QCONNECT_BYTES_IN"] == "12"
    assert fields["QCONNECT_OUTCOME"] == "ok"
    assert fields["PRIORITY"] == "6"
    assert fields["SYSLOG_IDENTIFIER"] == "qvm-connect-tcp"
    assert fields["CODE_LINE"] == 7
    assert not [name for name in fields if not name.isupper()]


def test_without_systemd_the_log_is_one_escaped_line_on_stderr() -> None:
    program = (
        "import logging; from qconnect.core.logs import setup_logging\n"
        "setup_logging('qvm-connect-tcp')\n"
        "logging.getLogger('x').warning('from %s', 'a\\x1b[2J\\nb')\n"
        "logging.getLogger('x').debug('not shown')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.stderr == "qvm-connect-tcp: from a\\x1b[2J\\nb\n"
