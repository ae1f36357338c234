"""The command-line validators: the core's grammars, refused the way argparse reports them."""

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qconnect.core import argtypes

VALIDATORS: dict[str, Callable[[str], object]] = {
    "port": argtypes.port,
    "count": argtypes.count(1, 112),
    "seconds": argtypes.seconds(),
    "seconds or 0": argtypes.seconds(zero="never"),
    "qube name": argtypes.qube_name,
    "spec": argtypes.spec,
    "spec text": argtypes.spec_text,
    "bind address": argtypes.bind_address,
    "path": argtypes.path,
    "path text": argtypes.path_text,
    "absolute path": argtypes.absolute_path,
}

ACCEPTED: list[tuple[str, str, object]] = [
    ("port", "1", 1),
    ("port", "65535", 65535),
    ("count", "112", 112),
    ("seconds", "0.5", 0.5),
    ("seconds or 0", "0", 0.0),
    ("qube name", "work-2.b_c", "work-2.b_c"),
    ("spec text", "::80", "::80"),
    ("bind address", "localhost", "127.0.0.1"),
    ("path", "a/b", Path("a/b")),
    ("path text", "a/b", "a/b"),
    ("absolute path", "/a/b", Path("/a/b")),
]


@pytest.mark.parametrize(("kind", "text", "value"), ACCEPTED)
def test_a_value_in_its_grammar_is_returned(kind: str, text: str, value: object) -> None:
    assert VALIDATORS[kind](text) == value


def test_a_spec_is_parsed_with_the_default_bind() -> None:
    spec = argtypes.spec("8080:web:80")
    assert (spec.bind_address, spec.local_port, spec.target, spec.remote_port) == (
        "127.0.0.1",
        8080,
        "web",
        80,
    )


REFUSED: list[tuple[str, str, str]] = [
    ("port", "0", "invalid port '0'"),
    ("port", "080", "invalid port '080'"),
    ("port", "65536", "invalid port '65536'"),
    ("count", "0", "invalid number '0': expected a whole number from 1 to 112"),
    ("count", "113", "invalid number '113'"),
    ("count", "+5", "invalid number '+5'"),
    ("count", "٣", "invalid number '٣'"),  # a digit, but not one a person types here
    ("count", "5_0", "invalid number '5_0'"),
    ("seconds", "0", "invalid duration '0': expected a positive number of seconds"),
    ("seconds", "nan", "invalid duration 'nan'"),
    ("seconds or 0", "-1", "invalid duration '-1': expected 0 (never) or more seconds"),
    ("seconds or 0", "inf", "invalid duration 'inf'"),
    ("qube name", "9lives", "invalid qube name '9lives'"),
    ("qube name", "@default", "invalid qube name '@default'"),
    ("spec", "8080", "invalid binding '8080'"),
    ("spec text", "8080:we b:80", "'we b'"),
    ("bind address", "example.com", "invalid bind address 'example.com'"),
    ("path", "", "invalid path ''"),
    ("path", "a\0b", "invalid path 'a\\x00b'"),
    ("absolute path", "a/b", "invalid path 'a/b': expected an absolute path"),
]


@pytest.mark.parametrize(("kind", "text", "message"), REFUSED)
def test_a_value_outside_its_grammar_is_argparses_refusal_naming_it(
    kind: str, text: str, message: str
) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as refusal:
        VALIDATORS[kind](text)
    assert message in str(refusal.value)
    assert "\n" not in str(refusal.value)


@pytest.mark.parametrize("kind", sorted(VALIDATORS))
@given(text=st.text(max_size=80))
def test_any_text_is_a_value_or_a_printable_one_line_refusal(kind: str, text: str) -> None:
    try:
        VALIDATORS[kind](text)
    except argparse.ArgumentTypeError as refusal:
        assert str(refusal).isprintable()  # one line, whatever the text held
