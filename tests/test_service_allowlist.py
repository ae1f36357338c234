"""The target qube's allowlist: grammar, errors with file:line, reloading."""

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qconnect.core.errors import ServiceError
from qconnect.service.allowlist import (
    AllowlistCache,
    AllowRule,
    find_allowlist,
    load_allowlist,
    parse_allowlist,
    read_allowlist,
)

EXAMPLE = """\
# ports this qube serves
80                      # the web server, to everyone
8000-8099 work personal # development servers
5432 dev  # the database
22 *
"""


def test_rules_are_parsed_into_ranges_and_callers() -> None:
    allowlist = parse_allowlist(EXAMPLE, "connecttcp.allow")
    assert allowlist.rules == (
        AllowRule(80, 80, frozenset()),
        AllowRule(8000, 8099, frozenset({"work", "personal"})),
        AllowRule(5432, 5432, frozenset({"dev"})),
        AllowRule(22, 22, frozenset({"*"})),
    )


@pytest.mark.parametrize(
    ("port", "caller", "allowed"),
    [
        (80, "anyone", True),
        (8000, "work", True),
        (8099, "personal", True),
        (8050, "untrusted", False),
        (8100, "work", False),
        (5432, "dev", True),
        (5432, "work", False),
        (22, "untrusted", True),
        (443, "work", False),
    ],
)
def test_a_call_is_served_only_when_a_rule_names_its_port_and_caller(
    port: int, caller: str, allowed: bool
) -> None:
    assert parse_allowlist(EXAMPLE).allows(port, caller) is allowed


def test_a_file_without_rules_serves_nothing() -> None:
    assert not parse_allowlist("# nothing yet\n\n").allows(80, "work")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("080", "allow:2: invalid port '080'"),
        ("0", "allow:2: invalid port '0'"),
        ("65536", "allow:2: invalid port '65536'"),
        ("http", "allow:2: invalid port 'http'"),
        ("90-80", "allow:2: empty port range '90-80'"),
        ("80- work", "allow:2: invalid port ''"),
        ("80 @anyvm", "allow:2: invalid caller '@anyvm'"),
        ("80 work,dev", "allow:2: invalid caller 'work,dev'"),
    ],
)
def test_a_bad_line_is_an_error_naming_file_and_line(line: str, message: str) -> None:
    with pytest.raises(ServiceError) as info:
        parse_allowlist(f"80\n{line}\n", "allow")
    assert str(info.value).startswith(message)


def test_missing_file_means_every_port(tmp_path: Path) -> None:
    assert load_allowlist([tmp_path / "absent"]) is None
    assert find_allowlist([tmp_path / "a", tmp_path / "b"]) is None


def test_a_dangling_link_on_the_path_is_found_and_cannot_be_read(tmp_path: Path) -> None:
    """Only a path with nothing at all is "no allowlist"; a link to nothing is an error."""
    (tmp_path / "b").write_text("1-65535\n")
    (tmp_path / "dir").symlink_to(tmp_path / "gone")
    for first in (tmp_path / "a", tmp_path / "dir" / "a"):
        if first.parent == tmp_path:
            first.symlink_to(tmp_path / "gone")
        assert find_allowlist([first, tmp_path / "b"]) == first
        with pytest.raises(ServiceError, match="symbolic link to nothing"):
            load_allowlist([first, tmp_path / "b"])


def test_first_existing_file_wins(tmp_path: Path) -> None:
    (tmp_path / "b").write_text("80\n")
    assert find_allowlist([tmp_path / "a", tmp_path / "b"]) == tmp_path / "b"
    (tmp_path / "a").write_text("81\n")
    assert find_allowlist([tmp_path / "a", tmp_path / "b"]) == tmp_path / "a"


def test_unreadable_or_binary_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "bin").write_bytes(b"\xff\xfe80\n")
    with pytest.raises(ServiceError, match="is not UTF-8 text"):
        read_allowlist(tmp_path / "bin")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ServiceError, match=r"cannot read allowlist .*: it is a directory"):
        read_allowlist(tmp_path / "dir")


def test_cache_rereads_the_file_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "connecttcp.allow"
    cache = AllowlistCache([path])
    assert cache.current() is None
    path.write_text("80\n")
    current = cache.current()
    assert current is not None and current.allows(80, "work")
    assert cache.current() is current  # unchanged file: not parsed again
    path.write_text("81 dev\n")
    os.utime(path, ns=(1, 1))  # a different mtime even within the clock's resolution
    current = cache.current()
    assert current is not None and not current.allows(80, "work") and current.allows(81, "dev")
    path.write_text("oops\n")
    os.utime(path, ns=(2, 2))
    with pytest.raises(ServiceError, match=r"connecttcp\.allow:1: invalid port 'oops'"):
        cache.current()
    path.unlink()
    assert cache.current() is None


@given(st.text(max_size=60))
def test_a_bad_caller_in_the_allowlist_is_named_on_one_printable_line(caller: str) -> None:
    """A hand-edited file's text reaches the journal escaped: one line, no terminal escapes."""
    try:
        parse_allowlist(f"80 {caller}\n", "allow")
    except ServiceError as error:
        assert str(error).isprintable(), str(error)
