"""The R4.0 policy format: one file per service, ``/etc/qubes-rpc/policy/SERVICE[+ARG]``.

Lines are ``SOURCE TARGET ACTION[,key=value...]`` with ``$`` for ``@``, and
``$include:PATH``. R4.0 used ``SERVICE+ARG`` *instead of* ``SERVICE`` when it
existed; R4.1's ``!compat-4.0`` keeps that meaning by reading the files in a
fixed order and closing every ``+ARG`` file with implicit denies
(qubes-core-qrexec ``qrexec/policy/parser_compat.py``). This module does the
same, so a legacy directory evaluates as R4.0 (and as R4.1's compat) would.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qconnect.core.errors import PolicyError
from qconnect.policy.parser import (
    SERVICE_CHARS,
    ErrorSink,
    Include,
    build_rule,
    fail,
    split_lines,
)
from qconnect.policy.rules import Location, Rule

#: Where R4.0 keeps its policy (and where R4.1's !compat-4.0 reads it).
LEGACY_POLICY_DIR = Path("/etc/qubes-rpc/policy")

# Editor leftovers and package-manager copies !compat-4.0 skips.
IGNORED_SUFFIXES = (".rpmsave", ".rpmnew", ".swp")

# The implicit end of an R4.0 "+ARG" file: nothing falls through to the
# plain SERVICE file (nor to any later new-format rule).
IMPLICIT_DENY_LINES = ("@anyvm @anyvm deny", "@anyvm @adminvm deny")


def translate_line(line: str) -> str:
    """R4.0 spellings to the new ones, as !compat-4.0 does (``$``→``@``, ``,``→space)."""
    return line.replace("$include:", "!include ").replace("$", "@").replace(",", " ")


def parse_legacy_text(
    text: str,
    file: str,
    service: str | None,
    argument: str | None,
    *,
    on_error: ErrorSink = None,
) -> list[Rule | Include]:
    """The rules of one R4.0 file for ``service``/``argument`` (None: ``*``), in order."""
    entries: list[Rule | Include] = []
    for number, raw_line in enumerate(split_lines(text), start=1):
        location = Location(file, number)
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            entries.append(_parse_legacy_line(translate_line(line), service, argument, location))
        except PolicyError as error:
            if on_error is None:
                raise
            on_error(error)
    return entries


def _parse_legacy_line(
    line: str, service: str | None, argument: str | None, location: Location
) -> Rule | Include:
    words = line.split()
    if words[0].startswith("!"):
        if words[0] != "!include":
            raise fail(location, f"unknown directive {words[0]!r}: expected $include:PATH")
        if len(words) != 2:
            raise fail(location, f"!include takes 1 parameter, got {len(words) - 1}")
        return Include(words[1], location)
    if len(words) < 3:
        raise fail(
            location,
            f"wrong number of fields in {line!r}: expected SOURCE TARGET ACTION[,PARAMS]",
        )
    return build_rule(
        service or "*",
        argument or "*",
        words[0],
        words[1],
        words[2],
        words[3:],
        location,
    )


def implicit_denies(service: str, argument: str, file: str) -> list[Rule]:
    """The denies that close an R4.0 ``SERVICE+ARG`` file."""
    location = Location(file, None)
    rules = []
    for line in IMPLICIT_DENY_LINES:
        source, target, action = line.split()
        rules.append(build_rule(service, argument, source, target, action, [], location))
    return rules


def split_file_name(name: str) -> tuple[str, str | None]:
    """``SERVICE+ARG`` to (service, "+ARG"); a plain ``SERVICE`` to (service, None)."""
    service, plus, argument = name.partition("+")
    return service, (plus + argument) if plus else None


@dataclass(frozen=True)
class LegacyFile:
    """One R4.0 policy file and the call it governs."""

    service: str
    argument: str | None
    path: Path


def is_legacy_file_name(name: str) -> bool:
    """Whether !compat-4.0 reads a file of that name (others are skipped, not refused)."""
    return (
        not name.startswith(".")
        and not name.endswith(IGNORED_SUFFIXES)
        and set(name) <= SERVICE_CHARS
    )


def order_legacy_files(paths: Iterable[Path]) -> list[LegacyFile]:
    """!compat-4.0's order: by service, then each ``+ARG`` file before the plain one."""
    files = [LegacyFile(*split_file_name(path.name), path) for path in paths]
    return sorted(files, key=lambda f: (f.service, f.argument is None, f.argument or ""))


def legacy_file_name(service: str, argument: str | None) -> str:
    """The R4.0 file governing ``service`` with ``argument`` (``+ARG`` or None)."""
    return service + (argument or "")
