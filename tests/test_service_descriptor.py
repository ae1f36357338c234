"""The socket service's descriptor: strict parsing, bounded splitting."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qconnect.core.errors import ServiceError
from qconnect.service.descriptor import (
    MAX_DESCRIPTOR,
    CallDescriptor,
    parse_descriptor,
    split_descriptor,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"qubes.ConnectTCP+80 work", CallDescriptor("qubes.ConnectTCP", "80", "work")),
        (b"qubes.ConnectTCP+080 work", CallDescriptor("qubes.ConnectTCP", "080", "work")),
        (b"qubes.ConnectTCP+ dom0", CallDescriptor("qubes.ConnectTCP", "", "dom0")),
        (b"qubes.ConnectTCP disp1234", CallDescriptor("qubes.ConnectTCP", "", "disp1234")),
        (b"qubes.ConnectTCP+1+2 a-b.c_d", CallDescriptor("qubes.ConnectTCP", "1+2", "a-b.c_d")),
    ],
)
def test_descriptor_names_service_argument_and_caller(raw: bytes, expected: CallDescriptor) -> None:
    assert parse_descriptor(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"qubes.Other+80 work", "service 'qubes.Other', expected qubes.ConnectTCP"),
        (b"qubes.ConnectTCP+80", "expected 'SERVICE+ARGUMENT SOURCE'"),
        (b"qubes.ConnectTCP+80 work extra", "expected 'SERVICE+ARGUMENT SOURCE'"),
        (b"qubes.ConnectTCP+80  work", "expected 'SERVICE+ARGUMENT SOURCE'"),
        (b"qubes.ConnectTCP+80 ../../etc", "source '../../etc' is not a qube name"),
        (b"qubes.ConnectTCP+80 ", "source '' is not a qube name"),
        (b"qubes.ConnectTCP+80 w\xc3\xa9rk", "not ASCII"),
        (b"", "expected 'SERVICE+ARGUMENT SOURCE'"),
    ],
)
def test_malformed_descriptor_is_refused_with_the_reason(raw: bytes, message: str) -> None:
    with pytest.raises(ServiceError, match="bad service descriptor") as info:
        parse_descriptor(raw)
    assert message in str(info.value)


def test_split_keeps_the_callers_first_bytes() -> None:
    assert split_descriptor(b"qubes.ConnectTCP+80 work\0GET / HTTP/1.0\r\n") == (
        b"qubes.ConnectTCP+80 work",
        b"GET / HTTP/1.0\r\n",
    )


def test_split_waits_for_the_nul_within_the_bound() -> None:
    assert split_descriptor(b"qubes.ConnectTCP+80 wo") is None
    assert split_descriptor(b"x" * MAX_DESCRIPTOR) is None


def test_split_refuses_a_peer_that_sends_no_nul() -> None:
    with pytest.raises(ServiceError, match="no NUL within the first 1024 bytes"):
        split_descriptor(b"x" * (64 * 1024))


@given(st.binary(max_size=MAX_DESCRIPTOR), st.binary(max_size=200))
def test_split_never_reads_the_callers_bytes_as_descriptor(head: bytes, tail: bytes) -> None:
    head = head.replace(b"\0", b"")
    assert split_descriptor(head + b"\0" + tail) == (head, tail)


@given(st.binary(max_size=300))
def test_parse_either_succeeds_or_raises_a_service_error(raw: bytes) -> None:
    try:
        call = parse_descriptor(raw)
    except ServiceError:
        return
    assert call.service == "qubes.ConnectTCP"
    assert f"{call.service}+{call.argument} {call.source}".encode() == raw or (
        f"{call.service} {call.source}".encode() == raw
    )


@given(st.text(alphabet=st.characters(codec="ascii"), max_size=120))
def test_a_refused_descriptor_is_named_on_one_printable_line(text: str) -> None:
    """Whatever a peer sends ends up in the log escaped: no control character, no second line."""
    for raw in (text, f"qubes.ConnectTCP+80 {text}", f"{text} work"):
        try:
            parse_descriptor(raw.encode())
        except ServiceError as error:
            assert str(error).isprintable(), str(error)
