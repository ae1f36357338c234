"""Logging set-up: journald with structured fields under systemd, stderr otherwise.

Callers log through ``logging`` and pass structured fields as
``extra={"fields": {"CALLER": ..., "PORT": ...}}``; the journal handler turns
them into journal fields (``QCONNECT_CALLER=...``) so ``journalctl`` can filter
on them, and the stderr handler prints just the message.

Every line either handler writes, and every journal field, goes through
:func:`escape_controls` (qconnect.core.printable's escapes for each non-printable
character): messages carry text from outside (a target's stderr, a caller's name, a
peer's answer), and a log line must stay one line of printable text whatever
a caller put in it, so no escape sequence reaches the terminal of whoever
reads the log and no newline forges a second line.
"""

import logging
import os
import sys
from typing import Any

from qconnect.core.printable import printable

FIELD_PREFIX = "QCONNECT_"


def escape_controls(text: str) -> str:
    """``text`` with each non-printable character escaped as printable() does, the rest as is.

    Unlike printable() it leaves backslashes alone, so a message whose values
    were already escaped at their source is not escaped twice; it is the net
    under every log line for the values nobody escaped.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else printable(char) for char in text)


class PrintableFormatter(logging.Formatter):
    """A formatter whose output is one line with every non-printable character escaped.

    Applied to the whole formatted record, exception text included, so no
    caller of ``logging`` can forget it: values from outside should still be
    passed through printable() where they enter a message (that also escapes
    backslashes, so what was received can be read back without doubt).
    """

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record))


def under_systemd() -> bool:
    """Whether stderr is connected to the journal (systemd sets JOURNAL_STREAM).

    Checking the stream's identity rather than INVOCATION_ID alone keeps a
    program started from a unit but redirected to a file on stderr.
    """
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        device, inode = (int(part) for part in stream.split(":"))
        info = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


class _JournalFieldsHandler(logging.Handler):
    """Send records to journald with their ``fields`` as QCONNECT_* journal fields."""

    def __init__(self, identifier: str) -> None:
        super().__init__()
        from systemd import journal  # imported here: only ever needed under systemd

        self._send = journal.send
        self._identifier = identifier
        self.setFormatter(PrintableFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = getattr(record, "fields", {}) or {}
            extra = {
                f"{FIELD_PREFIX}{key.upper()}": escape_controls(str(value))
                for key, value in fields.items()
            }
            self._send(
                self.format(record),
                PRIORITY=_journal_priority(record.levelno),
                SYSLOG_IDENTIFIER=self._identifier,
                LOGGER=record.name,
                **extra,
            )
        except Exception:
            self.handleError(record)


def _journal_priority(level: int) -> int:
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    if level >= logging.INFO:
        return 6
    return 7


def setup_logging(identifier: str, *, verbose: bool = False) -> None:
    """Route the root logger to journald under systemd, else to stderr."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if under_systemd():
        try:
            root.addHandler(_JournalFieldsHandler(identifier))
            return
        except ImportError:
            pass
    stream_handler = logging.StreamHandler(sys.stderr)
    stream_handler.setFormatter(PrintableFormatter(f"{identifier}: %(message)s"))
    root.addHandler(stream_handler)
