"""systemd's unit file syntax: what a value we write may hold, and what a text says. Pure.

Every value ``qconnect persist`` puts into a unit file is checked here
against the syntax systemd reads it with, so that a value is exactly one
value and the file holds exactly the directives its template has. The
rules (systemd.syntax(7), systemd.service(5), and systemd 252's parser as
``systemd-analyze verify`` shows it; ``tests/test_unit_syntax.py`` holds
the probes that check each one against the real systemd):

- a line ends at ``\\n``, ``\\r``, ``\\r\\n`` or NUL: a carriage return
  inside a comment starts a new line that systemd reads as a directive;
- a line whose first non-blank character is ``#`` or ``;`` is a comment,
  never continued, and skipped even in the middle of a continued value;
- any other line ending in an unescaped ``\\`` is continued by the next one
  (the backslash becomes a space); an empty line ends the continuation;
- white space around keys, values and section headers is dropped;
- ``%`` starts a specifier in nearly every value (``%%`` is a ``%``);
- in ``Exec*=`` lines, words are split at white space, double and single
  quotes group, a backslash escapes, ``$`` starts a variable (``$$`` is a
  ``$``) and a lone ``;`` separates two commands.

The checks accept printable ASCII only: no value we generate needs more,
and a character outside that set is either a line end to systemd or text a
reader of the file cannot trust to be what it looks like.
"""

import re
from typing import NamedTuple

from qconnect.core.errors import PersistError
from qconnect.core.printable import printable

# systemd's line ends (read_line() in its fileio.c): "\r\n" is one end.
_LINE_END_RE = re.compile(r"\r\n|[\n\r\0]")

# What systemd strips around lines, keys and values.
_BLANK = " \t\n\r\v\f"

_COMMENT_STARTS = ("#", ";")

# Printable ASCII: the characters a generated unit's lines consist of.
_LINE_CHARS = frozenset(chr(code) for code in range(0x20, 0x7F))

# Words an Exec line carries without quotes: nothing in it has a meaning to
# systemd's word splitting, variables or specifiers.
_PLAIN_WORD_RE = re.compile(r"[A-Za-z0-9_./+@:=,-]+")

# Backslash, double quote, specifier and variable, escaped inside "...".
_EXEC_ESCAPES = {"\\": "\\\\", '"': '\\"', "%": "%%", "$": "$$"}

# How much of a refused value an error message shows.
_SHOWN_MAX = 60


class Directive(NamedTuple):
    """One ``Key=value`` line as systemd reads it: its section, key and value."""

    section: str
    key: str
    value: str


def _shown(value: str) -> str:
    cut = value if len(value) <= _SHOWN_MAX else value[:_SHOWN_MAX] + "..."
    return f"'{printable(cut)}'"


def check_line(value: str, what: str) -> str:
    """Return ``value`` if it can be written as (part of) one unit file line, else PersistError.

    Refused: any character but printable ASCII (line ends above all), ``%``
    (a specifier), a ``\\`` at the end (it would continue the line onto the
    next), and white space at either end (systemd would drop it).
    """
    if (
        not set(value) <= _LINE_CHARS
        or "%" in value
        or value.endswith("\\")
        or value != value.strip(_BLANK)
    ):
        raise PersistError(
            f"invalid {what} {_shown(value)}: a systemd unit line takes printable ASCII "
            "only, without '%', a '\\' at its end or white space around it"
        )
    return value


def check_comment_block(text: str, what: str) -> str:
    """Return ``text`` if each of its lines is one comment line, else PersistError."""
    for line in text.split("\n"):
        if line != "#" and not line.startswith("# "):
            raise PersistError(
                f"invalid {what} line {_shown(line)}: expected a comment starting with '# '"
            )
        check_line(line, what)
    return text


def exec_line(argv: list[str]) -> str:
    """``argv`` written as the value of an ``Exec*=`` directive that systemd splits back to it.

    The executable is an absolute path of plain characters (no prefix like
    ``-`` or ``@`` can be smuggled in front of it); every other word is
    written as it is when plain, else in double quotes with ``\\``, ``"``,
    ``%`` and ``$`` escaped. A word of control characters or other text
    outside printable ASCII is refused rather than C-escaped: none is ever
    meant, and a log of the unit would show it differently from what runs.
    """
    if not argv or not argv[0].startswith("/") or not _PLAIN_WORD_RE.fullmatch(argv[0]):
        shown = _shown(argv[0]) if argv else "''"
        raise PersistError(f"invalid executable {shown}: expected an absolute plain path")
    words = [argv[0]]
    for word in argv[1:]:
        if not set(word) <= _LINE_CHARS:
            raise PersistError(
                f"invalid command word {_shown(word)}: expected printable ASCII only"
            )
        if _PLAIN_WORD_RE.fullmatch(word):
            words.append(word)
        else:
            words.append('"' + "".join(_EXEC_ESCAPES.get(char, char) for char in word) + '"')
    return " ".join(words)


def _ends_in_backslash(line: str) -> bool:
    """Whether ``line`` ends in a backslash that is not itself escaped."""
    escaped = False
    for char in line:
        escaped = not escaped and char == "\\"
    return escaped


def directives(text: str) -> list[Directive]:
    """Every directive of a unit text, in order, as systemd reads it; PersistError if malformed.

    A line systemd would ignore with a warning (no ``=``, a directive
    before any section, a broken section header) is an error here: a file
    we generate has none.
    """
    found: list[Directive] = []
    section: str | None = None
    continued: str | None = None
    for number, raw in enumerate(_LINE_END_RE.split(text), start=1):
        if raw.lstrip(_BLANK).startswith(_COMMENT_STARTS):
            continue
        line = raw if continued is None else continued + raw
        if _ends_in_backslash(line):
            continued = line[:-1] + " "
            continue
        continued = None
        line = line.strip(_BLANK)
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise PersistError(f"line {number}: invalid section header {_shown(line)}")
            section = line[1:-1]
            continue
        key, equals, value = line.partition("=")
        if not equals or section is None:
            raise PersistError(f"line {number}: expected KEY=VALUE in a section: {_shown(line)}")
        found.append(Directive(section, key.strip(_BLANK), value.strip(_BLANK)))
    if continued is not None:
        raise PersistError("the last line ends in a backslash that continues it into nothing")
    return found
