"""The binding spec grammar: the original's inputs, our extensions, and every refusal."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qconnect.core.errors import SpecError
from qconnect.core.spec import BindingSpec, parse_fd_name, parse_spec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("444:@default:444", BindingSpec("127.0.0.1", 444, "@default", 444)),
        ("::444", BindingSpec("127.0.0.1", 444, "@default", 444)),
        ("10444:mytcp-service:444", BindingSpec("127.0.0.1", 10444, "mytcp-service", 444)),
        (":web:80", BindingSpec("127.0.0.1", 80, "web", 80)),
        ("8080::80", BindingSpec("127.0.0.1", 8080, "@default", 80)),
        ("8080:$default:80", BindingSpec("127.0.0.1", 8080, "@default", 80)),
        ("8080:@dispvm:80", BindingSpec("127.0.0.1", 8080, "@dispvm", 80)),
        ("8080:@dispvm:default-dvm:80", BindingSpec("127.0.0.1", 8080, "@dispvm:default-dvm", 80)),
        ("127.0.0.2:8080:web:80", BindingSpec("127.0.0.2", 8080, "web", 80)),
        ("[::1]:8080:web:80", BindingSpec("::1", 8080, "web", 80)),
        ("0.0.0.0:8080:web:80", BindingSpec("0.0.0.0", 8080, "web", 80)),
        ("localhost:8080:web:80", BindingSpec("127.0.0.1", 8080, "web", 80)),
        ("*:8080:web:80", BindingSpec("0.0.0.0", 8080, "web", 80)),
        ("1.2.3.4:1:@dispvm:dvm:65535", BindingSpec("1.2.3.4", 1, "@dispvm:dvm", 65535)),
    ],
)
def test_valid_specs_parse(text: str, expected: BindingSpec) -> None:
    assert parse_spec(text) == expected


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", "empty"),
        ("8080", "'8080'"),
        ("8080:web", "'8080:web'"),
        ("1:2:3:4:5", "'1:2:3:4:5'"),
        ("8080:web:", "PORT is missing"),
        ("0:web:80", "'0'"),
        ("8080:web:65536", "'65536'"),
        ("8080:web:080", "'080'"),
        ("8080:web:0x50", "'0x50'"),
        ("8080:web:1e2", "'1e2'"),
        ("8080:web:+80", "'+80'"),
        ("8080:web:-1", "'-1'"),
        ("8080:web: 80", "' 80'"),
        ("8080:we b:80", "'we b'"),
        ("8080:web/../x:80", "'web/../x'"),
        ("8080:-web:80", "'-web'"),
        ("8080:@anyvm:80", "'@anyvm'"),
        ("8080:" + "a" * 40 + ":80", "qube name"),
        ("example.com:8080:web:80", "'example.com'"),
        ("[::1:8080:web:80", "never closed"),
        ("[::1]8080:web:80", "expected ':'"),
        ("[127.0.0.1]:8080:web:80", "'[127.0.0.1]'"),
    ],
)
def test_invalid_specs_name_the_bad_part(text: str, names: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(text)
    message = str(caught.value)
    assert names in message
    assert "\n" not in message


def test_default_bind_applies_to_specs_without_one() -> None:
    assert parse_spec("8080:web:80", default_bind="[::1]").bind_address == "::1"
    assert parse_spec("127.0.0.3:8080:web:80", default_bind="[::1]").bind_address == "127.0.0.3"


def test_startup_message_matches_the_original() -> None:
    assert parse_spec("::444").startup_message() == (
        "Binding TCP '@default:444' to 'localhost:444'..."
    )
    assert parse_spec("10444:mytcp-service:444").startup_message() == (
        "Binding TCP 'mytcp-service:444' to 'localhost:10444'..."
    )


names = st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True).filter(
    lambda n: n not in ("none", "default")
)
ports = st.integers(min_value=1, max_value=65535)
binds = st.sampled_from(["127.0.0.1", "[::1]", "10.137.0.5", "0.0.0.0", "[fe80::1]"])


@given(bind=binds, local=ports, target=names, remote=ports)
def test_canonical_form_parses_back_to_itself(
    bind: str, local: int, target: str, remote: int
) -> None:
    spec = parse_spec(f"{bind}:{local}:{target}:{remote}")
    assert parse_spec(str(spec)) == spec


@given(st.text(max_size=60))
def test_any_text_parses_or_raises_spec_error(text: str) -> None:
    try:
        spec = parse_spec(text)
    except SpecError:
        return
    assert 1 <= spec.local_port <= 65535 and 1 <= spec.remote_port <= 65535


@pytest.mark.parametrize("text", ["::444", "8080:web:80", "[::1]:1:@dispvm:dvm:2", "9:@dispvm:9"])
def test_fd_name_carries_target_and_port_without_colons(text: str) -> None:
    spec = parse_spec(text)
    assert ":" not in spec.fd_name
    assert parse_fd_name(spec.fd_name) == (spec.target, spec.remote_port)


@pytest.mark.parametrize("name", ["", "web", "+80", "web+", "web+080", "we b+80", "web+80+1"])
def test_bad_fd_names_are_refused(name: str) -> None:
    with pytest.raises(SpecError):
        parse_fd_name(name)
