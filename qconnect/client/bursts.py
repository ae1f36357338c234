"""Log a burst of identical failures once, with a count, instead of once per call.

A refused binding that a browser hammers with 1,000 connections would
otherwise write 1,000 identical lines. Pure: the caller passes the clock.
"""

from collections.abc import Hashable
from dataclasses import dataclass, field

#: How long a burst lasts: after the first line for a key, further events
#: with that key within this many seconds are only counted. Short enough
#: that a user fixing the policy sees the next refusal reported soon; long
#: enough that a retry loop produces a handful of lines, not thousands.
BURST_WINDOW = 10.0


@dataclass
class _Burst:
    started: float
    label: str
    suppressed: int = 0


@dataclass
class BurstCounter:
    """Decide which events of a burst to log, and report the rest as a count.

    ``record(key, now, label)`` answers whether to log this event in full;
    ``flush(now)`` returns ``(key, count, label)`` for every burst whose
    window has ended with events that were only counted. The label (what the
    counted events were, in words) travels with its burst, so a count is
    always reported with its own words, whichever window it belongs to.
    """

    window: float = BURST_WINDOW
    _bursts: dict[Hashable, _Burst] = field(default_factory=dict)
    _ended: list[tuple[Hashable, int, str]] = field(default_factory=list)

    def record(self, key: Hashable, now: float, label: str = "events") -> bool:
        burst = self._bursts.get(key)
        if burst is None or now - burst.started >= self.window:
            if burst is not None and burst.suppressed:
                self._ended.append((key, burst.suppressed, burst.label))
            self._bursts[key] = _Burst(started=now, label=label)
            return True
        burst.suppressed += 1
        return False

    def flush(self, now: float, *, everything: bool = False) -> list[tuple[Hashable, int, str]]:
        """Close the bursts whose window is over (all of them with ``everything``)."""
        done, self._ended = self._ended, []
        for key, burst in list(self._bursts.items()):
            if everything or now - burst.started >= self.window:
                del self._bursts[key]
                if burst.suppressed:
                    done.append((key, burst.suppressed, burst.label))
        return done

    def next_deadline(self) -> float | None:
        """When the earliest open burst's window ends (None when there is none)."""
        if not self._bursts:
            return None
        return min(burst.started for burst in self._bursts.values()) + self.window
