"""Logging set-up: journald with structured fields under systemd, stderr otherwise.

Callers log through ``logging`` and pass structured fields as
``extra={"fields": {"CALLER": ..., "PORT": ...}}``; under systemd,
systemd-python's own ``systemd.journal.JournalHandler`` sends them as journal
fields (``QCONNECT_CALLER=...``) so ``journalctl`` can filter on them, and
otherwise the stderr handler prints just the message.

Every line either handler writes, and every journal field, goes through
:func:`escape_controls` (qconnect.core.printable's escapes for each non-printable
character): messages carry text from outside (a target's stderr, a caller's name, a
peer's answer), and a log line must stay one line of printable text whatever
a caller put in it, so no escape sequence reaches the terminal of whoever
reads the log and no newline forges a second line.
"""

import logging
import os
import re
import sys
from collections.abc import Callable
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


#: What journald takes as a field name (systemd.journal-fields(7)): upper-case
#: letters, digits and underscores, not starting with one (those are the
#: trusted fields journald adds itself), at most 64 characters. JournalHandler
#: passes every attribute of a record (``msg``, ``args``, ``fields``...) on;
#: journald would drop those, so they are not sent at all.
_JOURNAL_FIELD_NAME = re.compile(r"[A-Z0-9][A-Z0-9_]{0,63}")


def _printable_sender(send: Callable[..., None]) -> Callable[..., None]:
    """``send`` as JournalHandler's sender: our ``fields`` as QCONNECT_*, every value escaped.

    JournalHandler builds the journal fields (MESSAGE, PRIORITY, LOGGER,
    CODE_*, CODE_ARGS, EXCEPTION_TEXT) and passes every attribute of the
    record too, our ``fields`` dict among them; this turns that dict into
    QCONNECT_* fields, keeps only names journald takes, and passes each value
    but CODE_LINE (a number, which systemd.journal.send formats itself)
    through escape_controls, so a field holding a caller's text is one
    printable line as the message is.
    """

    def send_printable(MESSAGE: str, fields: dict[str, Any] | None = None, **others: Any) -> None:
        journal_fields = {
            name: value for name, value in others.items() if _JOURNAL_FIELD_NAME.fullmatch(name)
        }
        for key, value in (fields or {}).items():
            journal_fields[f"{FIELD_PREFIX}{key.upper()}"] = value
        send(
            escape_controls(MESSAGE),
            **{
                name: value if name == "CODE_LINE" else escape_controls(str(value))
                for name, value in journal_fields.items()
            },
        )

    return send_printable


def journal_handler(identifier: str, send: Callable[..., None] | None = None) -> logging.Handler:
    """A systemd.journal.JournalHandler sending as ``identifier``, with our fields, escaped.

    Each record's ``fields`` become QCONNECT_* journal fields (``journalctl
    QCONNECT_CALLER=work``), its message goes through PrintableFormatter,
    and every field through escape_controls. ``send`` replaces
    systemd.journal.send (a test's recorder). Raises ImportError without
    systemd-python.
    """
    from systemd import journal  # imported here: only ever needed under systemd

    handler: logging.Handler = journal.JournalHandler(
        sender_function=_printable_sender(send or journal.send), SYSLOG_IDENTIFIER=identifier
    )
    handler.setFormatter(PrintableFormatter())
    return handler


def setup_logging(identifier: str, *, verbose: bool = False) -> None:
    """Route the root logger to journald under systemd, else to stderr."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if under_systemd():
        try:
            root.addHandler(journal_handler(identifier))
            return
        except ImportError:
            pass
    stream_handler = logging.StreamHandler(sys.stderr)
    stream_handler.setFormatter(PrintableFormatter(f"{identifier}: %(message)s"))
    root.addHandler(stream_handler)
