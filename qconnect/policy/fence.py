"""Our block in a user's policy file: found by its markers, replaced whole, the rest kept.

A policy file may hold the user's own lines around ours. Everything we
write sits between two marker comments; an edit swaps that block and keeps
every other byte of the file, so a user's comment or rule is never lost.
Pure: text in, text out.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass

from qconnect.errors import PolicyError

BEGIN_MARKER = "# --- BEGIN qconnect: rules managed by `qconnect policy` ---"
END_MARKER = "# --- END qconnect ---"

# A line with its end, as dom0 splits lines ("\n", "\r\n" or a lone "\r").
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")

_EXPLANATION = (
    "# Change these rules with `qconnect policy allow|deny|remove`; lines outside",
    "# the BEGIN/END markers are yours and are never touched. To drop them all:",
    "# `qconnect policy remove --all`.",
)


@dataclass(frozen=True)
class Fenced:
    """A file split around our block: ``before + block + after`` is the file."""

    before: str
    block: str
    after: str
    body: tuple[str, ...]  # the lines between the markers (without line ends)
    body_first_line: int  # 1-based line number of body[0] in the file

    @property
    def present(self) -> bool:
        return bool(self.block)


def split(text: str, file: str) -> Fenced:
    """Find our block in ``text``; a file without one gives an empty block at its end."""
    lines = _LINE.findall(text)
    stripped = [line.rstrip("\r\n") for line in lines]
    begins = [i for i, line in enumerate(stripped) if line == BEGIN_MARKER]
    ends = [i for i, line in enumerate(stripped) if line == END_MARKER]
    if not begins and not ends:
        return Fenced(text, "", "", (), len(lines) + 2)
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise PolicyError(
            f"{file}: qconnect's BEGIN/END markers are damaged (found {len(begins)} BEGIN and "
            f"{len(ends)} END lines): repair the file by hand"
        )
    begin, end = begins[0], ends[0]
    return Fenced(
        before="".join(lines[:begin]),
        block="".join(lines[begin : end + 1]),
        after="".join(lines[end + 1 :]),
        body=tuple(stripped[begin + 1 : end]),
        body_first_line=begin + 2,
    )


def render_block(rule_lines: Sequence[str], command: str) -> str:
    """Our block with its markers, a note on what wrote it, and ``rule_lines``."""
    lines = [BEGIN_MARKER, f"# Last change: {command}", *_EXPLANATION, *rule_lines, END_MARKER]
    return "".join(line + "\n" for line in lines)


def replace(fenced: Fenced, rule_lines: Sequence[str], command: str) -> str:
    """The file with our block holding ``rule_lines``; no rules and no block: the block goes.

    A new block goes at the end of the file (after the user's own lines,
    which keep their precedence); when that file does not end with a newline,
    the block starts with one so the user's last line stays intact.
    """
    if not rule_lines:
        return fenced.before + fenced.after
    block = render_block(rule_lines, command)
    if not fenced.present and fenced.before and not fenced.before.endswith(("\n", "\r")):
        block = "\n" + block
    return fenced.before + block + fenced.after
