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
a typo must never open more than the owner meant. The same holds for a file
that is there but cannot be used: a dangling or looping symbolic link (on the
file or on a directory of its path), a directory, a device, an unreadable or
non-UTF-8 file. Only a path at which nothing at all exists means "no
allowlist". Both forms of the service decide through :func:`check_call`, so
they refuse exactly the same calls, and tell the caller exactly the same
generic line (the file's path, its lines and the other qubes it names are the
target's business: they go to the target's log only).

Pure parsing plus one small file reader; standard library only (the per-call
executable uses it), and deliberately without dataclasses and pathlib, whose
imports would add ~25 ms to every call of the executable.
"""

import os
import stat
from collections.abc import Callable, Iterable

from qconnect.core.errors import AllowlistRefusal, QconnectError, ServiceError
from qconnect.core.printable import printable
from qconnect.core.qrexec import is_valid_qube_name, parse_port

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
                shown = printable(caller if len(caller) <= 40 else caller[:40] + "...")
                raise ServiceError(
                    f"{where}: invalid caller '{shown}': expected a qube name or '*'"
                )
        rules.append(AllowRule(low, high, frozenset(words[1:])))
    return Allowlist(tuple(rules), source)


def read_allowlist(path: AnyPath) -> Allowlist:
    """Read and parse the allowlist file ``path``; ServiceError when it cannot be used.

    The file is opened without blocking (a FIFO planted at the path must not
    stall the service) and must be a regular file; symbolic links are followed
    (Qubes keeps /usr/local on /rw), but one that leads nowhere is an error,
    not "no allowlist": the caller decides absence with :func:`find_allowlist`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise ServiceError(
            f"cannot read allowlist {path}: it or a directory on its path is a "
            "symbolic link to nothing"
        ) from None
    except OSError as error:
        raise ServiceError(f"cannot read allowlist {path}: {error.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise ServiceError(f"cannot read allowlist {path}: it is {kind}")
        chunks = []
        size = 0
        while size <= MAX_ALLOW_FILE and (chunk := os.read(fd, MAX_ALLOW_FILE + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as error:
        raise ServiceError(f"cannot read allowlist {path}: {error.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_ALLOW_FILE:
        raise ServiceError(f"allowlist {path} is larger than {MAX_ALLOW_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ServiceError(f"allowlist {path} is not UTF-8 text") from None
    return parse_allowlist(text, str(path))


def _nothing_at(path: AnyPath) -> bool:
    """Whether nothing at all is at ``path``: no file, no link, no dangling link on the way.

    Walks the path one component at a time: a component that is missing
    means absent; a component that is a symbolic link to nothing (or a loop),
    or that cannot be looked at (EACCES, ENOTDIR), means something was meant
    to be there, which must not be mistaken for "no allowlist".
    """
    prefix = ""
    for part in os.path.abspath(path).split("/")[1:]:
        prefix += "/" + part
        try:
            info = os.lstat(prefix)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        if stat.S_ISLNK(info.st_mode):
            try:
                os.stat(prefix)
            except OSError:
                return False
    return False


def find_allowlist(candidates: Iterable[AnyPath]) -> AnyPath | None:
    """The first of ``candidates`` at which something exists; None when there is none.

    "Something" includes what cannot be read (a dangling symbolic link, on the
    file or on a directory of its path): reading it then fails, and the call
    is refused, instead of silently falling through to a later candidate or
    to "every port is served".
    """
    for path in candidates:
        if not _nothing_at(path):
            return path
    return None


def load_allowlist(candidates: Iterable[AnyPath]) -> Allowlist | None:
    """The allowlist in force: the first candidate found, read; None when there is none."""
    path = find_allowlist(candidates)
    return read_allowlist(path) if path is not None else None


def check_call(port: int, caller: str, load: Callable[[], Allowlist | None]) -> None:
    """Raise AllowlistRefusal unless the allowlist ``load()`` returns serves ``port`` to ``caller``.

    ``load`` is :func:`load_allowlist` bound to the search list (the executable
    service) or :meth:`AllowlistCache.current` (the socket service); either
    raising ServiceError (an unusable file) refuses the call: fail closed.
    """
    try:
        allowlist = load()
    except ServiceError as error:
        raise AllowlistRefusal(port, f"allowlist broken, refusing every call: {error}") from None
    if allowlist is not None and not allowlist.allows(port, caller):
        raise AllowlistRefusal(
            port, f"port {port} is not served to {caller}: not in {allowlist.source}"
        )


class AllowlistCache:
    """The allowlist for a long-running service, re-read only when its file changes.

    One ``stat`` per call keeps edits effective at once without a restart, and
    costs far less than parsing. A file that fails to parse raises on every
    call until fixed (the service then refuses calls: fail closed).
    """

    def __init__(self, candidates: Iterable[AnyPath]) -> None:
        self._candidates = tuple(candidates)
        self._key: tuple[str, int, int, int, int, int] | None = None
        self._cached: Allowlist | None = None

    def current(self) -> Allowlist | None:
        path = find_allowlist(self._candidates)
        if path is None:
            self._key, self._cached = None, None
            return None
        try:
            info = os.stat(path)
        except OSError:
            self._key, self._cached = None, None
            return read_allowlist(path)  # raises what the executable service would say
        # ctime too: a chmod or a rename over the file changes it, not mtime.
        key = (
            str(path),
            info.st_dev,
            info.st_ino,
            info.st_mtime_ns,
            info.st_ctime_ns,
            info.st_size,
        )
        if key != self._key:
            self._cached = read_allowlist(path)
            self._key = key
        return self._cached
