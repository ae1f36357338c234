"""rpc-config files read as qrexec-agent reads them (libqrexec/toml.c is the reference)."""

import pytest

from qconnect.core.errors import RpcConfigError
from qconnect.loopback.rpcconfig import RpcConfig, parse_rpc_config


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", RpcConfig()),
        ("# only a comment\n\n", RpcConfig()),
        (
            "skip-service-descriptor=true\nexit-on-service-eof=true\n",
            RpcConfig(send_service_descriptor=False, exit_on_service_eof=True),
        ),
        ("exit-on-client-eof = true # trailing comment\n", RpcConfig(exit_on_client_eof=True)),
        ("skip-service-descriptor=false\r\n", RpcConfig()),
        ("wait-for-session=1\n", RpcConfig(wait_for_session=True)),
        ("wait-for-session=0\n", RpcConfig()),
        ("force-user='alice'\n", RpcConfig(force_user="alice")),
        ("exit-on-service-eof=true   \t\n", RpcConfig(exit_on_service_eof=True)),
        ("no-newline-at-end=false", RpcConfig(ignored=("no-newline-at-end",))),
    ],
)
def test_valid_rpc_config(text: str, expected: RpcConfig) -> None:
    assert parse_rpc_config(text) == expected


def test_unknown_keys_are_ignored_and_reported_like_qrexec_agent() -> None:
    config = parse_rpc_config("future-key=true\nskip-service-descriptor=true\n")
    assert config.ignored == ("future-key",)
    assert not config.send_service_descriptor


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("skip-service-descriptor=yes\n", "unsupported start of value 'y'"),
        ("skip-service-descriptor=trueish\n", "unexpected junk after value"),
        ("skip-service-descriptor=tru\n", "unexpected unquoted string"),
        ("skip-service-descriptor=1\n", "expects true or false"),
        ("exit-on-service-eof='true'\n", "expects true or false"),
        ("wait-for-session=2\n", "expects true, false, 0 or 1"),
        ("force-user=true\n", "expects a quoted user name"),
        ('force-user="alice"\n', "double-quoted strings are not supported"),
        ("force-user='''alice'''\n", "triple-quoted strings are not supported"),
        ("force-user='alice\n", "unterminated quoted string"),
        ("wait-for-session=01\n", "unexpected junk after integer"),
        (" skip-service-descriptor=true\n", "unexpected whitespace at start of line"),
        ("[section]\n", "section headers are not supported"),
        ("1key=true\n", "invalid character '1' at start of key"),
        ("skip-service-descriptor true\n", "missing '='"),
        ("exit-on-client-eof=true\nexit-on-client-eof=false\n", "already seen"),
        ("exit-on-client-eof=true\0\n", "NUL byte"),
        (
            "force-user='alice'\nskip-service-descriptor=true\n",
            "cannot set force-user if skip-service-descriptor=true",
        ),
    ],
)
def test_invalid_rpc_config_names_file_line_and_problem(text: str, message: str) -> None:
    with pytest.raises(RpcConfigError) as error:
        parse_rpc_config(text, source="qubes.ConnectTCP")
    assert message in str(error.value)
    assert str(error.value).startswith("qubes.ConnectTCP")
    assert "\n" not in str(error.value)


def test_error_names_the_line_number() -> None:
    with pytest.raises(RpcConfigError, match=r"^svc:3: "):
        parse_rpc_config("# one\nexit-on-client-eof=true\nbad key=1\n", source="svc")
