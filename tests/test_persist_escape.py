"""Unit names: systemd's escaping, checked against the real systemd-escape, and our naming."""

import subprocess

from hypothesis import given, settings
from hypothesis import strategies as st

from qconnect.core.spec import BindingSpec, parse_spec
from qconnect.persist.escape import escape, is_valid_unit_name, unescape
from qconnect.persist.render import spec_from_unit_name, unit_prefix

# argv cannot carry NUL or lone surrogates; everything else is fair game.
_ARGV_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=30,
)


def systemd_escape(*texts: str) -> list[str]:
    """The real systemd-escape; it prints its results on one line, space separated."""
    result = subprocess.run(
        ["systemd-escape", "--", *texts],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return result.stdout.rstrip("\n").split(" ")


def test_escape_matches_systemd_escape_on_tricky_inputs() -> None:
    texts = ["a-b\\c", ".hidden", "..", "/a//b/", " x", "ü/é", "[::1]:8080", "@dispvm:x", "%i"]
    assert [escape(text) for text in texts] == systemd_escape(*texts)


@settings(max_examples=25, deadline=None)
@given(st.lists(_ARGV_TEXT, min_size=1, max_size=40))
def test_escape_matches_systemd_escape_on_any_text(texts: list[str]) -> None:
    assert [escape(text) for text in texts] == systemd_escape(*texts)


@settings(max_examples=15, deadline=None)
@given(st.lists(_ARGV_TEXT, min_size=1, max_size=8))
def test_unescape_matches_systemd_unescape(texts: list[str]) -> None:
    # One call per name: unescaped text may itself hold the spaces that separate results.
    for text in texts:
        name = escape(text)
        assert unescape(name) == text
        result = subprocess.run(
            ["systemd-escape", "--unescape", "--", name],
            capture_output=True,  # bytes: text mode would turn a "\r" into "\n"
            check=True,
            timeout=30,
        )
        assert result.stdout == text.encode() + b"\n"


def test_unescape_refuses_a_truncated_escape() -> None:
    for bad in ["a\\x2", "a\\y20", "\\xzz"]:
        try:
            unescape(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was accepted")


_SPECS = st.builds(
    BindingSpec,
    bind_address=st.sampled_from(
        ["127.0.0.1", "0.0.0.0", "::1", "::", "fe80::1", "::ffff:1.2.3.4"]
    ),
    local_port=st.integers(1, 65535),
    target=st.one_of(
        st.sampled_from(["@default", "@dispvm", "dom0"]),
        st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,30}", fullmatch=True).filter(
            lambda name: name not in ("none", "default")
        ),
        st.from_regex(r"@dispvm:[A-Za-z][A-Za-z0-9_.-]{0,30}", fullmatch=True),
    ),
    remote_port=st.integers(1, 65535),
)


@settings(max_examples=300, deadline=None)
@given(_SPECS)
def test_every_spec_gets_a_valid_reversible_colon_free_unit_name(spec: BindingSpec) -> None:
    spec = parse_spec(str(spec))  # normalised as the command line would
    stem = unit_prefix(spec)
    for name in (f"{stem}.socket", f"{stem}@.service"):
        assert is_valid_unit_name(name), name
        assert ":" not in name
        assert spec_from_unit_name(name) == spec
    # An accepted connection's instance (the longest name systemd derives) still fits.
    instance = "4294967295-[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535-" * 2
    assert len(f"{stem}@{instance}.service") <= 255


def test_unit_names_read_well_for_common_specs() -> None:
    assert unit_prefix(parse_spec("8080:web:80")) == "qconnect-bind-127.0.0.1-8080-web-80"
    assert unit_prefix(parse_spec("[::1]:444::444")) == "qconnect-bind-__1-444-\\x40default-444"
    assert (
        unit_prefix(parse_spec("9000:@dispvm:my-dvm:22"))
        == "qconnect-bind-127.0.0.1-9000-\\x40dispvm\\x3dmy\\x2ddvm-22"
    )


def test_our_unit_names_agree_with_systemd_escape() -> None:
    assert (
        unit_prefix(parse_spec("[::1]:444:@dispvm:a-b:1"))
        == "qconnect-bind-" + systemd_escape("__1/444/@dispvm=a-b/1")[0]
    )


def test_names_not_ours_are_not_read_as_bindings() -> None:
    for name in [
        "sshd.socket",
        "qconnect-bind-garbage.socket",
        "qconnect-bind-127.0.0.1-8080-web.socket",
        "qconnect-bind-127.0.0.1-08080-web-80.socket",  # not canonical
        "qconnect-bind-127.0.0.1-8080-bad\\x20name-80.socket",
        "qconnect-bindings.service",
    ]:
        assert spec_from_unit_name(name) is None, name


def test_unit_name_validity_rules() -> None:
    assert is_valid_unit_name("a@b.service")
    assert is_valid_unit_name("a@.service")
    assert not is_valid_unit_name("@b.service")
    assert not is_valid_unit_name("a@b@c.service")
    assert not is_valid_unit_name("a b.service")
    assert not is_valid_unit_name("noext")
    assert not is_valid_unit_name("x" * 250 + ".service")
