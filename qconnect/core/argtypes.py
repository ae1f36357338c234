"""argparse ``type=`` validators: every command-line value that has a grammar is checked here.

A validator takes the word as typed and returns the value, or raises
``argparse.ArgumentTypeError`` whose message names the bad word and what was
expected. argparse then prints its usage line and ``PROG: error: argument
--OPTION: MESSAGE`` and exits 2: the command line is wrong (see
:mod:`qconnect.core.errors` for the rule). So no command body ever sees a
malformed port, count, duration, qube name, spec or path, and every command
refuses them the same way, before doing anything.

The grammars are the core's own (:func:`qconnect.core.qrexec.parse_port`,
:func:`qconnect.core.spec.parse_spec`…): a validator only translates their
error into argparse's. Standard library only (dom0's ``qconnect policy`` uses
them too).
"""

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path

from qconnect.core.errors import QconnectError
from qconnect.core.qrexec import is_valid_qube_name, parse_port
from qconnect.core.spec import BindingSpec, parse_bind_address, parse_spec

# Words longer than this are cut in messages: the message stays one line.
_SHOWN_MAX = 40

# A count as a person types it: ASCII digits only (int() would also take
# "+5", " 5", "5_0" and digits of other scripts).
_COUNT = re.compile(r"[0-9]{1,9}")


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN_MAX else text[:_SHOWN_MAX] + "...")


def _from_core(parse: Callable[[str], object], text: str) -> None:
    """Run a core parser, turning its QconnectError into argparse's refusal."""
    try:
        parse(text)
    except QconnectError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def port(text: str) -> int:
    """A TCP port by qrexec's rule: 1 to 65535, decimal, no sign or leading zero."""
    _from_core(parse_port, text)
    return int(text)


def count(low: int = 1, high: int | None = None) -> Callable[[str], int]:
    """A whole number from ``low`` to ``high`` (no limit when None): connections, calls."""
    expected = f"{low} to {high}" if high is not None else f"{low} or more"

    def parse_count(text: str) -> int:
        if not _COUNT.fullmatch(text) or not low <= int(text) <= (high or int(text)):
            raise argparse.ArgumentTypeError(
                f"invalid number {_shown(text)}: expected a whole number from {expected}"
            )
        return int(text)

    return parse_count


def seconds(*, zero: str | None = None) -> Callable[[str], float]:
    """A duration in seconds, finite and positive; 0 too when ``zero`` says what it means."""
    expected = f"0 ({zero}) or more seconds" if zero else "a positive number of seconds"

    def parse_seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(
                f"invalid duration {_shown(text)}: expected {expected}"
            )
        return value

    return parse_seconds


def qube_name(text: str) -> str:
    """A qube's name as Qubes allows it (not a keyword such as ``@default``)."""
    if not is_valid_qube_name(text):
        raise argparse.ArgumentTypeError(
            f"invalid qube name {_shown(text)}: expected a letter, then up to 30 letters, "
            "digits, '_', '.' or '-'"
        )
    return text


def spec(text: str) -> BindingSpec:
    """A binding ``[BIND:]LOCALPORT:[VMNAME]:PORT`` (127.0.0.1 when BIND is left out)."""
    _from_core(parse_spec, text)
    return parse_spec(text)


def spec_text(text: str) -> str:
    """A binding checked as :func:`spec` does, kept as typed: a later ``--bind`` fills BIND."""
    _from_core(parse_spec, text)
    return text


def bind_address(text: str) -> str:
    """An IP literal to listen on (``localhost`` and ``*`` too), normalised."""
    _from_core(parse_bind_address, text)
    return parse_bind_address(text)


def path(text: str) -> Path:
    """A file name the system can take: not empty, no NUL byte (no system call takes one)."""
    if not text or "\0" in text:
        raise argparse.ArgumentTypeError(
            f"invalid path {_shown(text)}: expected a file name without NUL bytes"
        )
    return Path(text)


def path_text(text: str) -> str:
    """A :func:`path` kept as text, for the callees that take a ``str`` (socket addresses)."""
    return str(path(text))


def absolute_path(text: str) -> Path:
    """A :func:`path` that must not depend on the current directory."""
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"invalid path {_shown(text)}: expected an absolute path")
    return path(text)
