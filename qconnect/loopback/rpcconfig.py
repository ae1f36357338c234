"""rpc-config files, parsed the way qrexec-agent parses them (pure, no I/O but the read).

A qube's ``/etc/qubes/rpc-config/SERVICE`` (or ``SERVICE+ARG``) is a small
subset of TOML: ``key=value`` lines, ``#`` comments, booleans ``true`` and
``false``, decimal integers, strings in single quotes. The agent's own parser
(qubes-core-qrexec, libqrexec/toml.c) is the reference for what is an error:
an error makes the whole call fail with exit code 125. A key it does not know
is logged and ignored, not an error; we do the same, so a service's rpc-config
behaves here exactly as in a qube.
"""

from dataclasses import dataclass, field

from qconnect.core.errors import RpcConfigError


@dataclass(frozen=True)
class RpcConfig:
    """What an rpc-config file says about one service; the defaults are qrexec's.

    ``send_service_descriptor`` is the inverse of ``skip-service-descriptor``.
    ``exit_on_service_eof``/``exit_on_client_eof`` only matter for socket and
    TCP services (the agent ignores them, with a warning, for executables).
    ``ignored`` lists the keys the agent would log as unsupported.
    """

    send_service_descriptor: bool = True
    exit_on_service_eof: bool = False
    exit_on_client_eof: bool = False
    wait_for_session: bool = False
    force_user: str | None = None
    ignored: tuple[str, ...] = field(default=())


_KEY_CHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.-_")
_DIGITS = frozenset("0123456789")
_NONZERO_DIGITS = frozenset("123456789")
_BOOLEAN_KEYS = {
    "skip-service-descriptor",
    "exit-on-service-eof",
    "exit-on-client-eof",
}

Value = bool | int | str


def _parse_value(where: str, text: str) -> Value:
    """One TOML value as qrexec's parser reads it, then only blanks or a comment."""
    value: Value
    if text[:1] == "0":
        value, rest = 0, text[1:]
    elif text[:1] in _NONZERO_DIGITS:
        end = 1
        while end < len(text) and text[end] in _DIGITS:
            end += 1
        value, rest = int(text[:end]), text[end:]
    elif text.startswith("true"):
        value, rest = True, text[4:]
    elif text.startswith("false"):
        value, rest = False, text[5:]
    elif text[:1] in ("t", "f"):
        raise RpcConfigError(f"{where}: unexpected unquoted string {text!r}")
    elif text[:1] == '"':
        raise RpcConfigError(f"{where}: double-quoted strings are not supported, use single quotes")
    elif text[:1] == "'":
        if text.startswith("'''"):
            raise RpcConfigError(f"{where}: triple-quoted strings are not supported")
        end = text.find("'", 1)
        if end < 0:
            raise RpcConfigError(f"{where}: unterminated quoted string")
        value, rest = text[1:end], text[end + 1 :]
    else:
        raise RpcConfigError(f"{where}: unsupported start of value {text[:1]!r}")
    rest = rest.lstrip(" \t")
    if rest and not rest.startswith("#"):
        kind = "integer" if isinstance(value, int) and not isinstance(value, bool) else "value"
        raise RpcConfigError(f"{where}: unexpected junk after {kind}: {rest!r}")
    return value


def parse_rpc_config(text: str, *, source: str = "rpc-config") -> RpcConfig:
    """Parse an rpc-config file's text; raise RpcConfigError naming file and line."""
    values: dict[str, Value] = {}
    ignored: list[str] = []
    if "\0" in text:
        raise RpcConfigError(f"{source}: NUL byte in file")
    for number, raw in enumerate(text.split("\n"), start=1):
        where = f"{source}:{number}"
        line = raw.removesuffix("\r").rstrip(" \t")
        if not line or line.startswith("#"):
            continue
        first = line[0]
        if first == "[":
            raise RpcConfigError(f"{where}: TOML section headers are not supported")
        if first in " \t":
            raise RpcConfigError(f"{where}: unexpected whitespace at start of line")
        if not (first.isascii() and first.isalpha()):
            raise RpcConfigError(f"{where}: invalid character {first!r} at start of key")
        end = 1
        while end < len(line) and line[end] in _KEY_CHARS:
            end += 1
        key = line[:end]
        rest = line[end:].lstrip(" \t")
        if not rest.startswith("="):
            raise RpcConfigError(f"{where}: missing '=' after key {key!r}")
        value = _parse_value(where, rest[1:].lstrip(" \t"))
        if key in _BOOLEAN_KEYS or key == "wait-for-session" or key == "force-user":
            if key in values:
                raise RpcConfigError(f"{where}: key {key} already seen")
            _check_type(where, key, value)
            values[key] = value
        else:
            ignored.append(key)
    config = RpcConfig(
        send_service_descriptor=not values.get("skip-service-descriptor", False),
        exit_on_service_eof=bool(values.get("exit-on-service-eof", False)),
        exit_on_client_eof=bool(values.get("exit-on-client-eof", False)),
        wait_for_session=bool(values.get("wait-for-session", False)),
        force_user=str(values["force-user"]) if "force-user" in values else None,
        ignored=tuple(ignored),
    )
    if config.force_user is not None:
        for key, flag in (
            ("skip-service-descriptor", not config.send_service_descriptor),
            ("exit-on-client-eof", config.exit_on_client_eof),
            ("exit-on-service-eof", config.exit_on_service_eof),
        ):
            if flag:
                raise RpcConfigError(f"{source}: cannot set force-user if {key}=true")
    return config


def _check_type(where: str, key: str, value: Value) -> None:
    if key == "force-user":
        if not isinstance(value, str):
            raise RpcConfigError(f"{where}: {key} expects a quoted user name, not {value!r}")
    elif key == "wait-for-session":
        if not isinstance(value, bool) and not (isinstance(value, int) and value in (0, 1)):
            raise RpcConfigError(f"{where}: {key} expects true, false, 0 or 1, not {value!r}")
    elif not isinstance(value, bool):
        raise RpcConfigError(f"{where}: {key} expects true or false, not {value!r}")
