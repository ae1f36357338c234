"""One policy file's text to rules and directives (the R4.1+ format), with dom0's refusals.

Pure: text in, entries or a ``PolicyError`` carrying FILE and LINE out. Files
are read and includes followed by ``loader``. The checks are those of qrexec's
own parser (qubes-core-qrexec ``qrexec/policy/parser.py``) with messages that
name the bad value and what was expected; a line dom0 would refuse is refused
here, on the same line.
"""

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qconnect.core.errors import PolicyError
from qconnect.policy.rules import Action, Allow, Ask, Deny, Location, Rule
from qconnect.policy.tokens import DefaultVM, Place, Token, TokenError, parse_token

# Characters qrexec allows in a service name and argument (RPCNAME_ALLOWED_CHARSET).
SERVICE_CHARS = frozenset(string.ascii_letters + string.digits + "+-._")

_ACTION_PARAMS: dict[str, tuple[str, ...]] = {
    "deny": ("notify",),
    "allow": ("target", "user", "notify", "autostart"),
    "ask": ("target", "default_target", "user", "notify", "autostart"),
}
_BOOLEAN_PARAMS = frozenset({"notify", "autostart"})
_TOKEN_PARAMS = frozenset({"target", "default_target"})


@dataclass(frozen=True)
class Include:
    """``!include PATH``: the file's rules, here."""

    path: str
    location: Location


@dataclass(frozen=True)
class IncludeDir:
    """``!include-dir DIR``: every policy file of DIR, in C order, here."""

    path: str
    location: Location


@dataclass(frozen=True)
class IncludeService:
    """``!include-service SERVICE ARGUMENT PATH``: an R4.0-format file for that service."""

    service: str | None
    argument: str | None
    path: str
    location: Location


@dataclass(frozen=True)
class Compat40:
    """``!compat-4.0``: every R4.0 file of /etc/qubes-rpc/policy, here."""

    location: Location


Directive = Include | IncludeDir | IncludeService | Compat40
Entry = Rule | Directive

#: Called with each error when parsing goes on past errors (lint); None: raise the first.
ErrorSink = Callable[[PolicyError], None] | None


def split_lines(text: str) -> list[str]:
    """The lines as dom0 reads them (Python text mode: ``\\r\\n`` and ``\\r`` end lines too)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def fail(location: Location | None, message: str) -> PolicyError:
    """The error for ``message`` at ``location``, with the file and line kept as fields."""
    if location is None:
        return PolicyError(message)
    return PolicyError(message, file=location.file, line=location.line)


def check_service_argument(
    service: str, argument: str, location: Location
) -> tuple[str | None, str | None]:
    """Validate the SERVICE and ARGUMENT columns; ``*`` becomes None."""
    service_value = None if service == "*" else service
    argument_value = None if argument == "*" else argument
    if service_value is not None:
        bad = sorted(set(service_value) - (SERVICE_CHARS - {"+"}))
        if bad:
            raise fail(
                location,
                f"invalid service {service!r}: characters {''.join(bad)!r} are not allowed "
                "(expected letters, digits, '-', '.', '_' or *)",
            )
    if argument_value is not None:
        if not argument_value.startswith("+"):
            raise fail(location, f"invalid argument {argument!r}: expected * or +ARGUMENT")
        bad = sorted(set(argument_value) - SERVICE_CHARS)
        if bad:
            raise fail(
                location,
                f"invalid argument {argument!r}: characters {''.join(bad)!r} are not allowed",
            )
        if service_value is None:
            raise fail(location, f"argument {argument!r} needs a service: * service takes * only")
    return service_value, argument_value


def _token(text: str, place: Place, location: Location) -> Token:
    try:
        # dom0's grammar: a value outside Qubes' character set is accepted (it
        # never matches), so a file dom0 reads is read here too; lint says so.
        return parse_token(text, place, strict=False)
    except TokenError as error:
        raise fail(location, str(error)) from None


def _inline_comment(words: Sequence[str], location: Location) -> PolicyError | None:
    """The error for a line dom0 refuses because of a ``# ...`` after its start, if that is why.

    dom0 has no inline comments: their words become fields, which breaks the
    line. Only a line dom0 refuses anyway gets this clearer message; a ``#``
    that dom0 takes as part of a qube name is lint's business, not an error.
    """
    for index, word in enumerate(words):
        if word.startswith("#"):
            comment = " ".join(words[index:])
            return fail(
                location,
                f"inline comment {comment!r} is not allowed: '#' starts a comment only "
                "at the beginning of a line",
            )
    return None


def parse_action(action: str, params: Sequence[str], location: Location) -> Action:
    """The ACTION column and its ``key=value`` parameters."""
    if action not in _ACTION_PARAMS:
        raise fail(location, f"unknown action {action!r}: expected allow, deny or ask")
    allowed = _ACTION_PARAMS[action]
    values: dict[str, object] = {}
    for param in params:
        key, equals, value = param.partition("=")
        if not equals:
            raise fail(location, f"invalid parameter {param!r}: expected key=value")
        if key not in allowed:
            raise fail(
                location,
                f"unknown parameter {key!r} for {action}: expected {', '.join(allowed)}",
            )
        if key in values:
            raise fail(location, f"parameter {key!r} given twice")
        if key in _BOOLEAN_PARAMS:
            if value not in ("yes", "no"):
                raise fail(location, f"{key}={value!r} is invalid: expected yes or no")
            values[key] = value == "yes"
        elif key in _TOKEN_PARAMS:
            values[key] = _token(value, Place.REDIRECT, location)
        else:
            values[key] = value
    if action == "deny":
        return Deny(**values)  # type: ignore[arg-type]
    if action == "allow":
        return Allow(**values)  # type: ignore[arg-type]
    return Ask(**values)  # type: ignore[arg-type]


def build_rule(
    service: str,
    argument: str,
    source: str,
    target: str,
    action: str,
    params: Sequence[str],
    location: Location,
) -> Rule:
    """A rule from its columns, with every check dom0 makes on one line."""
    try:
        service_value, argument_value = check_service_argument(service, argument, location)
        source_token = _token(source, Place.SOURCE, location)
        target_token = _token(target, Place.TARGET, location)
        parsed_action = parse_action(action, params, location)
        if (
            isinstance(target_token, DefaultVM)
            and isinstance(parsed_action, Allow)
            and parsed_action.target is None
        ):
            raise fail(
                location,
                "allow to @default needs target=QUBE: a call that names no target has "
                "nowhere else to go",
            )
    except PolicyError as error:
        words = [service, argument, source, target, action, *params]
        raise (_inline_comment(words, location) or error) from None
    return Rule(service_value, argument_value, source_token, target_token, parsed_action, location)


def _parse_directive(words: list[str], location: Location) -> Directive:
    try:
        return _directive(words, location)
    except PolicyError as error:
        raise (_inline_comment(words[1:], location) or error) from None


def _directive(words: list[str], location: Location) -> Directive:
    directive, params = words[0], words[1:]
    expected = {"!include": 1, "!include-dir": 1, "!include-service": 3, "!compat-4.0": 0}
    if directive not in expected:
        raise fail(
            location,
            f"unknown directive {directive!r}: expected !include, !include-dir, "
            "!include-service or !compat-4.0",
        )
    if len(params) != expected[directive]:
        raise fail(
            location,
            f"{directive} takes {expected[directive]} parameter(s), got {len(params)}",
        )
    if directive == "!include":
        return Include(params[0], location)
    if directive == "!include-dir":
        return IncludeDir(params[0], location)
    if directive == "!include-service":
        service, argument = check_service_argument(params[0], params[1], location)
        return IncludeService(service, argument, params[2], location)
    return Compat40(location)


def parse_line(line: str, location: Location) -> Entry | None:
    """One line: a rule, a directive, or None for a blank or comment line."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    words = stripped.split()
    if stripped.startswith("!"):
        return _parse_directive(words, location)
    if len(words) < 5:
        raise _inline_comment(words, location) or fail(
            location,
            f"wrong number of fields in {stripped!r}: expected "
            "SERVICE ARGUMENT SOURCE TARGET ACTION [PARAMS...]",
        )
    service, argument, source, target, action = words[:5]
    return build_rule(service, argument, source, target, action, words[5:], location)


def parse_text(text: str, file: str, *, on_error: ErrorSink = None) -> list[Entry]:
    """Every entry of a new-format policy file, in order.

    With ``on_error`` the parse goes on past a bad line (for lint) and hands
    each error to it; without, the first error is raised, as dom0 stops.
    """
    entries: list[Entry] = []
    for number, line in enumerate(split_lines(text), start=1):
        try:
            entry = parse_line(line, Location(file, number))
        except PolicyError as error:
            if on_error is None:
                raise
            on_error(error)
            continue
        if entry is not None:
            entries.append(entry)
    return entries
