"""The shared fence: our block is found by its markers, and no byte outside it ever changes."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qconnect.core.errors import FenceError, QconnectError
from qconnect.core.fence import DOM0_LINE_ENDS, SHELL_LINE_ENDS, Markers

# The markers hold "@", which the generated user text never does: it cannot contain them.
SHELL = Markers("# @begin", "# @end")
DOM0 = Markers("# @begin", "# @end", line_ends=DOM0_LINE_ENDS)
FLAGGED = Markers("# @begin", "# @end", flagged=True)
BLOCK = "# @begin\nsome line\n# @end\n"

# Any user text: every kind of line end, non-ASCII, comments, exit lines, no final newline.
user_text = st.lists(
    st.one_of(
        st.text(alphabet="ab #\n\r\t-=é\u2028\x0b\x0c", max_size=12),
        st.sampled_from(["exit 0\n", "exit\n", "  exit 1", "# comment\n", "\n", "\r\n", "\r"]),
    ),
    max_size=8,
).map("".join)
markers = st.sampled_from([SHELL, DOM0, FLAGGED])
new_block = st.lists(st.text(alphabet="xyz =", max_size=6), max_size=3).map(
    lambda lines: "# @begin\n" + "".join(line + "\n" for line in lines) + "# @end\n"
)


@given(text=user_text, fence=markers, before_exit=st.booleans(), block=new_block)
def test_inserting_then_removing_a_block_restores_any_text(
    text: str, fence: Markers, before_exit: bool, block: str
) -> None:
    fenced = fence.split(text, before_exit=before_exit)
    assert not fenced.present and fenced.before + fenced.after == text
    inserted = fenced.with_block(block)
    found = fence.split(inserted)
    assert found.present and found.block == block
    assert found.without_block(newline_added=fenced.needs_newline) == text
    # without the record of an added newline, that newline is all that stays
    assert (
        found.without_block()
        == text[: len(fenced.before)]
        + ("\n" if fenced.needs_newline else "")
        + text[len(fenced.before) :]
    )


@given(before=user_text, after=user_text, fence=markers, old=new_block, new=new_block)
def test_replacing_a_block_never_changes_a_byte_outside_it(
    before: str, after: str, fence: Markers, old: str, new: str
) -> None:
    if before and not before.endswith(fence.line_ends):
        before += "\n"  # a block starts on a line of its own
    text = before + old + after
    fenced = fence.split(text, before_exit=True)
    assert (fenced.before, fenced.block, fenced.after) == (before, old, after)
    assert fenced.with_block(new) == before + new + after
    assert fenced.without_block() == before + after


def test_body_and_its_line_numbers_are_the_lines_between_the_markers() -> None:
    fenced = DOM0.split("mine\r\n# @begin\r\none\rtwo\n# @end\r\nafter")
    assert fenced.body == ("one", "two")
    assert fenced.body_first_line == 3
    assert fenced.after == "after"
    assert DOM0.split("a\nb\n").body_first_line == 4  # a new block's body


def test_line_ends_are_the_files_own_a_lone_cr_ends_a_line_only_for_dom0() -> None:
    text = "mine\r# @begin\nx\n# @end\n"
    assert DOM0.split(text).before == "mine\r"
    with pytest.raises(FenceError):  # for sh, "mine\r# @begin" is one line and no marker
        SHELL.split(text)
    assert SHELL.split("mine\r").needs_newline and not DOM0.split("mine\r").needs_newline
    assert SHELL_LINE_ENDS == ("\n",)


@pytest.mark.parametrize(
    ("text", "begins", "ends", "unclosed"),
    [
        ("# @begin\nx\n", 1, 0, True),
        ("# @end\n", 0, 1, False),
        ("# @begin\n# @end\n# @begin\n# @end\n", 2, 2, False),
        ("# @begin\n# @end\n# @begin\n", 2, 1, True),
        ("# @end\n# @begin\n", 1, 1, True),
        ("# @begin\n# @begin\n# @end\n", 2, 1, False),
    ],
)
def test_damaged_markers_are_refused_with_their_counts(
    text: str, begins: int, ends: int, unclosed: bool
) -> None:
    with pytest.raises(FenceError) as raised:
        SHELL.split(text)
    assert (raised.value.begins, raised.value.ends, raised.value.unclosed) == (
        begins,
        ends,
        unclosed,
    )
    assert isinstance(raised.value, QconnectError)
    assert str(raised.value) == (
        f"damaged markers ({begins} '# @begin' and {ends} '# @end' lines): repair the file by hand"
    )


@pytest.mark.parametrize(
    ("text", "at"),
    [
        ("#!/bin/sh\necho a\nexit 0\n", "exit 0\n"),
        ("#!/bin/sh\nexit 0\n\n# trailing comment\n", "exit 0\n\n# trailing comment\n"),
        ("#!/bin/sh\n  exit", "  exit"),
        ("#!/bin/sh\nexit 0\necho after\n", ""),
        ("#!/bin/sh\nexiting\n", ""),
    ],
)
def test_a_new_block_goes_before_a_final_exit_when_asked(text: str, at: str) -> None:
    fenced = SHELL.split(text, before_exit=True)
    assert fenced.after == at
    assert SHELL.split(text).after == ""


def test_a_flag_after_the_begin_marker_is_read_only_when_flagged() -> None:
    text = "# @begin (created)\n# @end\n"
    assert FLAGGED.split(text).flag == " (created)"
    assert FLAGGED.split("# @begin\n# @end\n").flag == ""
    with pytest.raises(FenceError):  # unflagged, that line is the user's: an END alone
        SHELL.split(text)
