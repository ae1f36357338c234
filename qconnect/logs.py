"""Logging set-up: journald with structured fields under systemd, stderr otherwise.

Callers log through ``logging`` and pass structured fields as
``extra={"fields": {"CALLER": ..., "PORT": ...}}``; the journal handler turns
them into journal fields (``QCONNECT_CALLER=...``) so ``journalctl`` can filter
on them, and the stderr handler prints just the message.
"""

import logging
import os
import sys
from typing import Any

FIELD_PREFIX = "QCONNECT_"


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

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = getattr(record, "fields", {}) or {}
            extra = {f"{FIELD_PREFIX}{key.upper()}": str(value) for key, value in fields.items()}
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
    stream_handler.setFormatter(logging.Formatter(f"{identifier}: %(message)s"))
    root.addHandler(stream_handler)
