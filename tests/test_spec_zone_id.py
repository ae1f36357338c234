"""IPv6 zone ids in a bind address are refused, and so is any character no IP literal has.

Issue 9, defect 6: ``[::1%<text>]`` used to be accepted with any text but
``/``, ``%`` and ``]`` after the ``%``, newlines included, and reached a
systemd unit as written.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qconnect.core.errors import SpecError
from qconnect.core.spec import parse_bind_address, parse_spec


@pytest.mark.parametrize(
    "bind",
    [
        "[fe80::1%eth0]",
        "[::1%lo]",
        "[fe80::1%1]",
        "[::1%x\nExecStartPre=touch pwned\n#]",
        "[::1%a b]",
        "[::1%\\]",
        "[::1%$x]",
    ],
)
def test_a_zone_id_is_refused_in_one_line_naming_it(bind: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(f"{bind}:8080:web:80")
    message = str(caught.value)
    assert "zone" in message and "'%'" in message
    assert "\n" not in message and "\r" not in message
    assert message.startswith("invalid bind address '[::1%") or "fe80" in message


def test_the_zone_is_refused_without_brackets_too() -> None:
    with pytest.raises(SpecError, match="zone"):
        parse_spec("8080:web:80", default_bind="fe80::1%eth0")


def test_a_hostile_value_is_shown_escaped_and_cut() -> None:
    with pytest.raises(SpecError) as caught:
        parse_bind_address("[::1%\x1b[2J" + "x" * 500 + "]")
    message = str(caught.value)
    assert "\\x1b[2J" in message and "\x1b" not in message
    assert len(message) < 200


# Any text at all in the bind field, the brackets around it or not.
@given(st.text(max_size=40), st.booleans())
def test_an_accepted_bind_address_is_an_ip_literal_of_hex_digits_colons_and_dots(
    text: str, bracketed: bool
) -> None:
    field = f"[{text}]" if bracketed else text
    try:
        spec = parse_spec(f"{field}:8080:web:80")
    except SpecError as error:
        assert "\n" not in str(error) and "\r" not in str(error)
        return
    assert set(spec.bind_address) <= set("0123456789abcdef:.")
    assert parse_spec(str(spec)) == spec
