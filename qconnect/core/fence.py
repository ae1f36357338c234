"""A generated block inside a file the user also edits: found by its markers, the rest kept.

qconnect writes a few files that belong to the user as well: dom0's
``30-qconnect.policy`` and a qube's ``/rw/config/rc.local``. Everything we
write there sits between a BEGIN and an END marker line, so a later edit
finds exactly our lines and keeps every other byte: the user's lines, their
order, their line ends, a missing final newline. Damaged markers (a BEGIN
without its END, two BEGINs, an END first) are refused, never guessed at:
the caller turns the FenceError into its own area's error and message.

Pure (text in, text out) and standard library only: the dom0 policy tool,
which starts per call, imports it.
"""

import functools
import re
from dataclasses import dataclass

from qconnect.core.errors import FenceError

#: Line ends as sh reads a script: only "\n" ends a line.
SHELL_LINE_ENDS = ("\n",)
#: Line ends as dom0's policy parser reads a file. "\r\n" precedes "\r" so
#: that a Windows line end is one end, not a lone "\r" and an empty line.
DOM0_LINE_ENDS = ("\r\n", "\r", "\n")


@functools.cache
def _line_pattern(line_ends: tuple[str, ...]) -> re.Pattern[str]:
    """One line with its end (or a last line without one), for ``findall``."""
    chars = re.escape("".join(sorted(set("".join(line_ends)))))
    ends = "|".join(re.escape(end) for end in line_ends)
    return re.compile(f"[^{chars}]*(?:{ends})|[^{chars}]+\\Z")


def _final_exit(lines: list[str]) -> int:
    """Index of a final ``exit`` line, else ``len(lines)``: a block after it would never run."""
    for index in range(len(lines) - 1, -1, -1):
        words = lines[index].split()
        if not words or words[0].startswith("#"):
            continue
        return index if words[0] == "exit" else len(lines)
    return len(lines)


@dataclass(frozen=True)
class Fenced:
    """A file split around our block: ``before + block + after`` is the file.

    Without a block, ``block`` is empty and the split is where a new block
    goes (the end, or before a final ``exit`` when the caller asked).
    """

    before: str
    block: str
    after: str
    body: tuple[str, ...]  # the lines between the markers, without their ends
    body_first_line: int  # 1-based line number of body[0] (or of a new block's body)
    flag: str  # what follows the BEGIN marker on its line ("" unless Markers.flagged)
    needs_newline: bool  # no block yet, and ``before`` ends without a line end

    @property
    def present(self) -> bool:
        return bool(self.block)

    def with_block(self, block: str) -> str:
        """The file with ``block`` (marker lines included) in our block's place.

        A new block after a last line without a line end starts on a line of
        its own: a "\\n" goes first, so that the user's last line stays intact.
        """
        newline = "\n" if self.needs_newline else ""
        return self.before + newline + block + self.after

    def without_block(self, *, newline_added: bool = False) -> str:
        """The file without our block, every other byte as it was.

        ``newline_added``: the caller recorded that ``with_block`` added a
        "\\n" to the user's last line; it goes again while the block is last,
        so the file is restored byte for byte.
        """
        before = self.before
        if newline_added and self.present and not self.after and before.endswith("\n"):
            before = before[:-1]
        return before + self.after


@dataclass(frozen=True)
class Markers:
    """The BEGIN and END marker lines of one kind of block, and how its file ends lines."""

    begin: str
    end: str
    line_ends: tuple[str, ...] = SHELL_LINE_ENDS
    #: The BEGIN line may carry a flag after the marker (``Fenced.flag``), a
    #: record of what adding the block did beyond the block itself.
    flagged: bool = False

    def _is_begin(self, content: str) -> bool:
        return content == self.begin or (self.flagged and content.startswith(self.begin))

    def _content(self, line: str) -> str:
        for end in self.line_ends:
            if line.endswith(end):
                return line[: -len(end)]
        return line

    def split(self, text: str, *, before_exit: bool = False) -> Fenced:
        """Find our block in ``text``; FenceError if its markers are damaged.

        Without a block the split is at the end of ``text`` or, with
        ``before_exit``, before a final ``exit`` line of a shell script.
        """
        lines = _line_pattern(self.line_ends).findall(text)
        contents = [self._content(line) for line in lines]
        begins = [i for i, content in enumerate(contents) if self._is_begin(content)]
        ends = [i for i, content in enumerate(contents) if content == self.end]
        if not begins and not ends:
            at = _final_exit(lines) if before_exit else len(lines)
            before = "".join(lines[:at])
            needs_newline = bool(before) and not before.endswith(self.line_ends)
            return Fenced(before, "", "".join(lines[at:]), (), at + 2, "", needs_newline)
        if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
            unclosed = bool(begins) and (not ends or begins[-1] > ends[-1])
            raise FenceError(self.begin, self.end, len(begins), len(ends), unclosed)
        begin, end = begins[0], ends[0]
        return Fenced(
            before="".join(lines[:begin]),
            block="".join(lines[begin : end + 1]),
            after="".join(lines[end + 1 :]),
            body=tuple(contents[begin + 1 : end]),
            body_first_line=begin + 2,
            flag=contents[begin][len(self.begin) :],
            needs_newline=False,
        )
