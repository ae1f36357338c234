"""qrexec's own rules: the port rule, dom0's name sanitising, target validation."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qconnect.core.errors import ArgumentError, SpecError
from qconnect.core.qrexec import (
    parse_port,
    sanitize_service,
    sanitize_target,
    validate_target,
)


@pytest.mark.parametrize("text", ["1", "80", "444", "65535", "1024"])
def test_valid_ports(text: str) -> None:
    assert parse_port(text) == int(text)


@pytest.mark.parametrize(
    "text",
    ["", "0", "65536", "080", "+80", "-1", "0x50", "8e1", "1+2", " 80", "80 ", "٨٠", "9" * 200],
)
def test_invalid_ports_are_refused_with_the_value_named(text: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_port(text)
    assert "expected a decimal number from 1 to 65535" in str(caught.value)


@given(st.integers(min_value=1, max_value=65535))
def test_every_port_round_trips(port: int) -> None:
    assert parse_port(str(port)) == port


def test_dom0_sanitising() -> None:
    assert sanitize_target("$default") == "@default"
    assert sanitize_target("@dispvm:dvm") == "@dispvm:dvm"
    assert sanitize_target("web;rm -rf") == "web_rm_-rf"
    assert sanitize_service("qubes.ConnectTCP+80") == "qubes.ConnectTCP+80"
    assert sanitize_service("qubes.ConnectTCP+8/0") == "qubes.ConnectTCP+8_0"


@pytest.mark.parametrize("target", ["", "@default", "@dispvm", "@dispvm:dvm", "dom0", "work-2.x_y"])
def test_valid_targets(target: str) -> None:
    assert validate_target(target) == target


@pytest.mark.parametrize("target", ["@anyvm", "a b", "1abc", "none", "x" * 32, "@dispvm:", "w$x"])
def test_invalid_targets(target: str) -> None:
    with pytest.raises(ArgumentError):
        validate_target(target)
