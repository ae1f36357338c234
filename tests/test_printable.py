"""printable(): one line, no control character, and nothing lost."""

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from qconnect.core.printable import printable


def test_terminal_escapes_and_newlines_are_shown_not_obeyed() -> None:
    assert printable("a\x1b[2Jb\nc\rd\te\\f") == "a\\x1b[2Jb\\nc\\rd\\te\\\\f"


def test_invalid_utf8_bytes_are_shown_as_hex() -> None:
    assert printable(b"ok\xff\x00") == "ok\\xff\\x00"


def test_printable_non_ascii_letters_stay() -> None:
    assert printable("réseau ωmega") == "réseau ωmega"


@given(st.one_of(st.text(), st.binary()))
def test_the_result_never_holds_a_control_character(value: str | bytes) -> None:
    shown = printable(value)
    assert all(char.isprintable() and char != "\x7f" for char in shown)
    assert not any(unicodedata.category(char) in {"Zl", "Zp", "Cc", "Cs"} for char in shown)


@given(st.text())
def test_printable_text_is_unchanged(value: str) -> None:
    plain = "".join(c for c in value if c.isprintable() and c not in "\\\x7f")
    assert printable(plain) == plain
