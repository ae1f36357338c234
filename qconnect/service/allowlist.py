"""The target qube's allowlist: which ports it serves through qubes.ConnectTCP, to whom.

dom0's policy decides which qube may call which qube; the allowlist is the
target's own, second line: even a call dom0 allowed reaches only the ports
listed here. Without a file every port is served, as today's Qubes does.

Grammar (one rule per line; ``#`` starts a comment anywhere; blank lines ignored)::

    PORT[-PORT] [CALLER ...]

``PORT`` follows qrexec's port rule; ``LOW-HIGH`` is an inclusive range.
``CALLER`` is a qube name or ``*``; no caller means any caller. A call is
served when some rule's range holds its port and names its caller (or any).
A file that exists but holds no rule serves nothing. A bad line is an error
naming ``file:line``, and then the service refuses every call (fail closed):
a typo must never open more than the owner meant.

Pure parsing plus one small file reader; standard library only (the per-call
executable uses it), and deliberately without dataclasses and pathlib, whose
imports would add ~25 ms to every call of the executable.
"""

import os
from collections.abc import Iterable

from qconnect.errors import QconnectError, ServiceError
from qconnect.qrexec import is_valid_qube_name, parse_port

#: Where the allowlist is looked for, first existing wins. /usr/local survives
#: an app qube's reboot (it lives on the qube's private volume, /rw/usrlocal);
#: /etc is the template's and so serves every app qube based on it.
DEFAULT_ALLOW_FILES = (
    "/usr/local/etc/qconnect/connecttcp.allow",
    "/etc/qconnect/connecttcp.allow",
)

#: A file path as this module takes it (str or pathlib.Path).
AnyPath = str | os.PathLike[str]

# Larger than any sensible allowlist (one line per port or range), small
# enough that a mistaken path (a log file, a device) is refused, not read.
MAX_ALLOW_FILE = 1024 * 1024

ANY_CALLER = "*"


class AllowRule:
    """Ports ``low``..``high`` (inclusive) for ``callers`` (empty: any caller)."""

    __slots__ = ("callers", "high", "low")

    def __init__(self, low: int, high: int, callers: frozenset[str]) -> None:
        self.low, self.high, self.callers = low, high, callers

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AllowRule):
            return NotImplemented
        return (self.low, self.high, self.callers) == (other.low, other.high, other.callers)

    def __hash__(self) -> int:
        return hash((self.low, self.high, self.callers))

    def __repr__(self) -> str:
        return f"AllowRule({self.low}, {self.high}, {sorted(self.callers)})"

    def allows(self, port: int, caller: str) -> bool:
        if not self.low <= port <= self.high:
            return False
        return not self.callers or ANY_CALLER in self.callers or caller in self.callers


class Allowlist:
    """A parsed allowlist file; ``source`` names it in messages."""

    __slots__ = ("rules", "source")

    def __init__(self, rules: tuple[AllowRule, ...], source: str) -> None:
        self.rules, self.source = rules, source

    def allows(self, port: int, caller: str) -> bool:
        return any(rule.allows(port, caller) for rule in self.rules)


def _parse_ports(word: str, where: str) -> tuple[int, int]:
    low_text, dash, high_text = word.partition("-")
    try:
        low = parse_port(low_text)
        high = parse_port(high_text) if dash else low
    except QconnectError as error:
        raise ServiceError(f"{where}: {error}") from None
    if high < low:
        raise ServiceError(
            f"{where}: empty port range {word!r}: expected LOW-HIGH with LOW <= HIGH"
        )
    return low, high


def parse_allowlist(text: str, source: str = "<allowlist>") -> Allowlist:
    """Parse an allowlist file's text; errors name ``source:line``."""
    rules = []
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{source}:{number}"
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        low, high = _parse_ports(words[0], where)
        for caller in words[1:]:
            if caller != ANY_CALLER and not (is_valid_qube_name(caller) or caller == "dom0"):
                shown = caller if len(caller) <= 40 else caller[:40] + "..."
                raise ServiceError(
                    f"{where}: invalid caller {shown!r}: expected a qube name or '*'"
                )
        rules.append(AllowRule(low, high, frozenset(words[1:])))
    return Allowlist(tuple(rules), source)


def read_allowlist(path: AnyPath) -> Allowlist | None:
    """Read and parse ``path``; None when it does not exist (every port is served)."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_ALLOW_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ServiceError(f"cannot read allowlist {path}: {error.strerror}") from None
    if len(data) > MAX_ALLOW_FILE:
        raise ServiceError(f"allowlist {path} is larger than {MAX_ALLOW_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ServiceError(f"allowlist {path} is not UTF-8 text") from None
    return parse_allowlist(text, str(path))


def find_allowlist(candidates: Iterable[AnyPath]) -> AnyPath | None:
    """The first of ``candidates`` that exists (a broken symlink counts: it is an error)."""
    for path in candidates:
        if os.path.lexists(path):
            return path
    return None


class AllowlistCache:
    """The allowlist for a long-running service, re-read only when its file changes.

    One ``stat`` per call keeps edits effective at once without a restart, and
    costs far less than parsing. A file that fails to parse raises on every
    call until fixed (the service then refuses calls: fail closed).
    """

    def __init__(self, candidates: Iterable[AnyPath]) -> None:
        self._candidates = tuple(candidates)
        self._key: tuple[str, int, int, int] | None = None
        self._cached: Allowlist | None = None

    def current(self) -> Allowlist | None:
        path = find_allowlist(self._candidates)
        if path is None:
            self._key, self._cached = None, None
            return None
        try:
            info = os.stat(path)
        except OSError as error:
            raise ServiceError(f"cannot read allowlist {path}: {error.strerror}") from None
        key = (str(path), info.st_ino, info.st_mtime_ns, info.st_size)
        if key != self._key:
            self._cached = read_allowlist(path)
            self._key = key
        return self._cached
