"""Our block in a user's policy file: found by its markers, replaced whole, the rest kept.

A policy file may hold the user's own lines around ours. Everything we
write sits between two marker comments; an edit swaps that block and keeps
every other byte of the file, so a user's comment or rule is never lost.
The finding and keeping is ``qconnect.core.fence``'s, with dom0's line ends;
this module adds our markers, the block's text and the policy's messages.
Pure: text in, text out.
"""

from collections.abc import Sequence

from qconnect.core.errors import FenceError, PolicyError
from qconnect.core.fence import DOM0_LINE_ENDS, Fenced, Markers

BEGIN_MARKER = "# --- BEGIN qconnect: rules managed by `qconnect policy` ---"
END_MARKER = "# --- END qconnect ---"

# dom0 splits lines at "\n", "\r\n" or a lone "\r"; so do we.
_MARKERS = Markers(BEGIN_MARKER, END_MARKER, line_ends=DOM0_LINE_ENDS)

_EXPLANATION = (
    "# Change these rules with `qconnect policy allow|deny|remove`; lines outside",
    "# the BEGIN/END markers are yours and are never touched. To drop them all:",
    "# `qconnect policy remove --all`.",
)


def split(text: str, file: str) -> Fenced:
    """Find our block in ``text``; a file without one gives an empty block at its end."""
    try:
        return _MARKERS.split(text)
    except FenceError as error:
        raise PolicyError(
            f"qconnect's BEGIN/END markers are damaged (found {error.begins} BEGIN and "
            f"{error.ends} END lines): repair the file by hand",
            file=file or None,
        ) from None


def render_block(rule_lines: Sequence[str], command: str) -> str:
    """Our block with its markers, a note on what wrote it, and ``rule_lines``.

    ``command`` must be printable (the command line quotes and escapes every
    word): a line break in it would end the comment and start a policy line.
    """
    if not command.isprintable():
        raise PolicyError(f"refusing to record the command {command!r}: not one printable line")
    lines = [BEGIN_MARKER, f"# Last change: {command}", *_EXPLANATION, *rule_lines, END_MARKER]
    return "".join(line + "\n" for line in lines)


def replace(fenced: Fenced, rule_lines: Sequence[str], command: str) -> str:
    """The file with our block holding ``rule_lines``; no rules and no block: the block goes.

    A new block goes at the end of the file (after the user's own lines,
    which keep their precedence), on a line of its own.
    """
    if not rule_lines:
        return fenced.without_block()
    return fenced.with_block(render_block(rule_lines, command))
