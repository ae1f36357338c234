"""dom0's data-channel table of each qube: the loopback's copy of qrexec-daemon's vchan ports.

What real qrexec does (qubes-core-qrexec 4.4, ``daemon/qrexec-daemon.c``):

- Each qube's qrexec-daemon in dom0 has a table of ``MAX_CLIENTS`` = 256 data
  ports (``MAX_FDS`` in ``libqrexec/qrexec.h``). A call *to* the qube takes
  one in ``handle_cmdline_body_from_client``: ``allocate_vchan_port(caller)``
  scans the odd entries when the caller's domain id is larger than the
  qube's, the even ones otherwise (so the two daemons of a pair of qubes
  never hand out the same port number). So a qube serves at most 128 calls
  at once from all the qubes with a larger id, and 128 from all those with a
  smaller one, whoever calls.
- The calling qube's daemon gets the port already chosen
  (``MSG_SERVICE_CONNECT`` with ``connect_port`` set) and takes none: its
  own table counts only the calls *it* serves.
- No free port: the daemon logs "Failed to allocate new vchan port, too many
  clients?", the call fails after the policy allowed it, and the caller's
  ``qrexec-client-vm`` prints "Request refused" and exits 126, exactly as
  for a policy denial.
- ``release_vchan_port`` runs when the target's agent sends
  ``MSG_CONNECTION_TERMINATED``: after the service side of the call has
  ended *and* the caller's end of the vchan has closed, i.e. after the
  caller's ``qrexec-client-vm`` exited, and then only once dom0's daemon gets
  to the message. That lag is why a caller that keeps 64 calls alive still
  has 117-125 ports held at the target during a burst (sampled through real
  qrexec; see the README).

The loopback has no daemon: every call is its own process, so each qube's
table is a small file, ``DIR/run/channels/QUBE``, read and changed under an
``flock`` on it by every call of the machine (fork-server children
and in-process calls alike). An entry says which port is held, by which
call (pid and start time, so a reused pid is not mistaken for it), for which
caller, and, once the call has ended, when the port is released. A call
whose process died without saying so (SIGKILL) frees its port as soon as
someone looks: the real agent reports a broken vchan at once.
"""

import contextlib
import fcntl
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

#: Ports in one qube's table (``MAX_CLIENTS`` = ``MAX_FDS`` in qubes-core-qrexec).
MAX_CLIENTS = 256

#: Calls a qube can serve at once from the callers on one side of its domain id.
HALF = MAX_CLIENTS // 2

# When a port comes back, when the machine does not say otherwise
# (``Machine.set_channel_release_lag``): FIXED seconds plus PER_CALL times
# the caller's lifetime after the call ended (see ``release``). Sampled
# through real qrexec during a 200-connection burst of short calls: 64
# qrexec-client-vm alive, 117-125 calls still alive on the target's side
# and 48-62 calls refused, so the half (128) was full: ports held were at
# least twice the callers alive, i.e. a port outlived its caller by at
# least the caller's own lifetime. Real calls took milliseconds there,
# loopback calls take tens to hundreds (a Python start each on a shared
# machine), so the lag is proportional to the caller's life, which keeps
# that ratio on any machine: ports held = callers alive x (1 + PER_CALL).
# PER_CALL = 1.0 is the sample's lower bound; FIXED = 5 ms is dom0 reading
# the agent's message when nothing else is going on.
DEFAULT_RELEASE_FIXED = 0.005
DEFAULT_RELEASE_PER_CALL = 1.0

# The largest lag a machine may set: a test's "the table stays full" needs
# seconds, not hours (a typo would otherwise wedge every call).
MAX_RELEASE_LAG = 600.0
MAX_RELEASE_PER_CALL = 100.0


def _table_dir(machine: Path) -> Path:
    return machine / "run" / "channels"


def release_lag_file(machine: Path) -> Path:
    """``DIR/channel-release-lag``: ``FIXED PER_CALL`` (seconds, factor); absent: the default."""
    return machine / "channel-release-lag"


def release_lag(machine: Path) -> tuple[float, float]:
    """The machine's (fixed seconds, per-call factor); the default when missing or malformed."""
    default = (DEFAULT_RELEASE_FIXED, DEFAULT_RELEASE_PER_CALL)
    try:
        words = release_lag_file(machine).read_text().split()
        fixed, per_call = float(words[0]), float(words[1])
    except (OSError, ValueError, UnicodeDecodeError, IndexError):
        return default
    # "not <=" also refuses nan
    if not (0.0 <= fixed <= MAX_RELEASE_LAG and 0.0 <= per_call <= MAX_RELEASE_PER_CALL):
        return default
    return fixed, per_call


# One fixed-size text record per port, so a change is one pwrite() of its
# record under the lock: a writer killed half-way cannot leave a torn
# table, and nothing is renamed (ext4 flushes a file renamed over another,
# which cost ~2 ms a call). Fields: caller (a qube name has at most 31
# characters), pid, start time, release time.
RECORD = 82
_NAME_WIDTH = 31


@dataclass(frozen=True)
class Entry:
    """One held port of a qube's table."""

    index: int  #: 0..MAX_CLIENTS-1 (the port is VCHAN_BASE_DATA_PORT + index)
    caller: str  #: the calling qube
    pid: int  #: the process of the call
    start: int  #: its start time (/proc/PID/stat field 22), against pid reuse
    release_at: float  #: CLOCK_MONOTONIC seconds; 0 while the call runs

    def render(self) -> bytes:
        text = (
            f"{self.caller[:_NAME_WIDTH]:<{_NAME_WIDTH}} {self.pid:>10} {self.start:>20} "
            f"{self.release_at:>17.6f}"
        )
        return text.encode("ascii", "replace")[: RECORD - 1].ljust(RECORD - 1) + b"\n"

    @classmethod
    def parse(cls, index: int, record: bytes) -> "Entry | None":
        """The entry of a record, or None for a free or unreadable one (that port is free)."""
        words = record.split()
        if len(words) != 4:
            return None
        try:
            caller = words[0].decode("ascii")
            entry = cls(index, caller, int(words[1]), int(words[2]), float(words[3]))
        except (UnicodeDecodeError, ValueError):
            return None
        if entry.pid <= 0 or not 0 <= entry.release_at < math.inf:
            return None
        return entry


_FREE = b" " * (RECORD - 1) + b"\n"


def process_start(pid: int) -> int | None:
    """The start time of a live (not zombie) process, or None when it has ended."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = text[text.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X") or not fields[19].isdigit():
        return None
    return int(fields[19])


def _alive(entry: Entry) -> bool:
    return process_start(entry.pid) == entry.start


def _held(entry: Entry, now: float) -> bool:
    """Whether the port is still taken: its call runs, or it ended less than the lag ago.

    A port is released only after its call's process has gone, as the real
    one is released only after the caller's qrexec-client-vm has exited.
    """
    if entry.release_at and now >= entry.release_at:
        return _alive(entry)
    return entry.release_at != 0 or _alive(entry)


def half_start(caller_id: int, target_id: int) -> int:
    """The first index ``allocate_vchan_port`` scans: odd ports for a caller with a larger id."""
    return 1 if caller_id > target_id else 0


class Table:
    """One qube's table, opened for one change under its lock (``with Table(...) as table``)."""

    def __init__(self, machine: Path, qube: str) -> None:
        self.directory = _table_dir(machine)
        self.path = self.directory / qube
        self.entries: dict[int, Entry] = {}
        self._fd = -1

    def __enter__(self) -> "Table":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            content = os.pread(fd, RECORD * MAX_CLIENTS, 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        for index in range(min(len(content) // RECORD, MAX_CLIENTS)):
            entry = Entry.parse(index, content[index * RECORD : (index + 1) * RECORD])
            if entry is not None:
                self.entries[index] = entry
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # drops the lock

    def put(self, entry: Entry) -> None:
        """Write one entry's record (one pwrite: a killed writer leaves the old record)."""
        self.entries[entry.index] = entry
        os.pwrite(self._fd, entry.render(), entry.index * RECORD)

    def clear(self, index: int) -> None:
        self.entries.pop(index, None)
        os.pwrite(self._fd, _FREE, index * RECORD)

    def held(self, now: float) -> list[Entry]:
        return [entry for entry in self.entries.values() if _held(entry, now)]


def allocate(machine: Path, target: str, target_id: int, caller: str, caller_id: int) -> int | None:
    """Take a port of ``target``'s table for a call from ``caller``; None when its half is full.

    The port is held by this process until :func:`release` (or its death).
    """
    now = time.monotonic()
    me = os.getpid()
    start = process_start(me)
    assert start is not None
    with Table(machine, target) as table:
        index = _free_index(table, half_start(caller_id, target_id), now)
        if index is None:
            return None
        table.put(Entry(index, caller, me, start, 0.0))
        return index


def _free_index(table: Table, first: int, now: float) -> int | None:
    """A free port of the half starting at ``first``, looking at /proc as little as it can.

    Never-used entries first (no look at all), then ports whose lag has
    passed (their process has almost always gone), then calls that may have
    died without releasing (killed). The real daemon takes the lowest free
    port; which free port a call gets changes nothing the caller can see.
    """
    half = range(first, MAX_CLIENTS, 2)
    for index in half:
        if index not in table.entries:
            return index
    expired = [i for i in half if 0 < table.entries[i].release_at <= now]
    running = [i for i in half if table.entries[i].release_at == 0]
    for index in expired + running:
        if not _alive(table.entries[index]):
            return index
    return None


def release(machine: Path, target: str, index: int, caller_lived: float, held: float) -> None:
    """The call on port ``index`` has ended: the port is free once the lag has passed.

    Called by the call's process just before it exits. ``caller_lived`` is
    how long the caller's qrexec-client-vm has lived, ``held`` how long this
    port has been taken. A real caller takes its port right after the
    policy, so its port is taken for nearly all its life; a loopback caller
    spends most of its life starting Python before the policy is even
    asked. The port is therefore held for the caller's whole life, then the
    lag (FIXED + PER_CALL x that life), so the table holds as many ports for
    as many callers alive as real qrexec's does. With PER_CALL = 0 the lag
    is FIXED alone (a plain delay, for tests). The port also stays held
    until this process has gone.
    """
    fixed, per_call = release_lag(machine)
    lived = max(0.0, caller_lived)
    lag = fixed
    if per_call > 0:
        lag += per_call * lived + max(0.0, lived - held)
    with contextlib.suppress(OSError), Table(machine, target) as table:
        entry = table.entries.get(index)
        if entry is not None and entry.pid == os.getpid():
            table.put(Entry(index, entry.caller, entry.pid, entry.start, time.monotonic() + lag))


def process_age(pid: int) -> float:
    """Seconds since process ``pid`` started (0 when it has gone): /proc's start time."""
    start = process_start(pid)
    if start is None:
        return 0.0
    started = start / os.sysconf("SC_CLK_TCK")
    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)


def held_ports(machine: Path, qube: str) -> list[Entry]:
    """The ports of ``qube``'s table held now (its calls running, or released within the lag)."""
    with Table(machine, qube) as table:
        return table.held(time.monotonic())


def live_calls(machine: Path, qube: str) -> int:
    """Calls made by or to ``qube`` whose process still runs (every table looked at)."""
    directory = _table_dir(machine)
    count = 0
    with contextlib.suppress(FileNotFoundError):
        for path in directory.iterdir():
            with Table(machine, path.name) as table:
                count += sum(
                    1
                    for entry in table.entries.values()
                    if entry.release_at == 0
                    and (entry.caller == qube or path.name == qube)
                    and _alive(entry)
                )
    return count
