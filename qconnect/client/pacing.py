"""Fit a burst of calls into dom0's data-port table, and tell "no channel" from "denied".

The mechanism (qubes-core-qrexec, ``daemon/qrexec-daemon.c``): every call
allowed by the policy takes a port of the *target* qube's table in dom0, from
the half shared by all the callers on one side of the target's domain id
(128 ports), and gives it back only when the target's agent reports the
connection terminated, after the caller's qrexec-client-vm has exited. A
full half refuses the call with 126, "Request refused", exactly as a policy
denial does. Sampled through real qrexec in a 200-connection burst of short
calls: with 64 qrexec-client-vm alive the target held 117-125 calls and
48-62 calls were refused, so ports outlive their callers by at least as long
as the callers lived.

What the client does about it, pure here (the caller passes the clock):

1. **Count a call until its port is likely back** (:class:`TargetPacer`): a
   call to a target counts against that target's window while it runs *and*
   for ``LINGER_FACTOR`` x its own lifetime after (at most ``MAX_LINGER``).
   The window starts at ``START_WINDOW`` = 112 (the half, less 16 for the
   target's other callers and this qube's own calls), so a burst of short
   calls keeps about 56 alive instead of 64 and the ports it holds stay
   under 128.
2. **Pace after a refusal that was a lack of channel**: the window is halved
   (at most once per pause, never below ``MIN_WINDOW``) and call starts to
   that target are spaced by a pause that doubles from ``MIN_PAUSE`` to
   ``MAX_PAUSE`` while refusals go on, and halves again with each call
   served. Each served call widens the window by one.
3. **Retry only what the evidence calls "no channel"** (:class:`Evidence`):
   dom0 decides a binding's calls all alike (same source, target, service
   and argument), so once one of them was allowed (exit 0, 125 or 127),
   a 126 within ``EVIDENCE_SECONDS`` is a lack of channel and the connection
   is called again. Without that evidence a 126 is a denial: the connection
   is refused once and never called again, because every evaluation of a
   ``deny`` rule makes dom0 show a notification (qubes-core-qrexec,
   ``qrexec/policy/parser.py``: ``Deny`` has ``notify`` on unless the rule
   says ``notify=no``; ``qrexec_policy_exec.py`` sends ``policy.Notify``).
   A policy changed to deny in the middle of a burst costs at most the
   paced retries of ``EVIDENCE_SECONDS``: about 17 extra evaluations
   (pauses 10, 20, ... 640 ms, then 1 s), not one per connection.
"""

import heapq
import math
from dataclasses import dataclass, field

#: Ports of a target's table for the callers on one side of it (qrexec-daemon's MAX_CLIENTS / 2).
TABLE_HALF = 128

#: The window a target starts with: the half, less 16 for its other callers
#: and this qube's own calls (the same reserve as PROCESS_MAX_CONNECTIONS).
START_WINDOW = TABLE_HALF - 16

#: The smallest window after refusals: a handful of calls still make progress
#: when other qubes hold almost the whole half.
MIN_WINDOW = 8

#: A call counts for this many times its own lifetime after it ended: the
#: real sample had ports held for at least twice their callers' lifetime.
LINGER_FACTOR = 1.0

#: ...but never longer than this: a long call's port comes back as soon as
#: dom0 reads the agent's message; the lag only grows with dom0's load.
MAX_LINGER = 5.0

#: Spacing of call starts after the first refusal for lack of a channel, and
#: its ceiling while refusals go on. 10 ms is about one real call's
#: connect+echo (p50 7.9 ms); 1 s bounds what a policy changed to deny in the
#: middle of a burst costs (see the module docstring).
MIN_PAUSE = 0.01
MAX_PAUSE = 1.0

#: How long an allowed call is evidence that the policy allows the binding.
EVIDENCE_SECONDS = 10.0

#: Calls a connection may make in all (the first and its retries): a bound on
#: one connection's share of dom0's work, far above what a burst needs.
MAX_ATTEMPTS = 20

#: How long a refused call without evidence waits for the outcome of the
#: binding's calls that started before it (one of them may prove the policy
#: allows it): a few real calls' time; a denial is then reported that late.
HOLD_SECONDS = 1.0


@dataclass
class TargetPacer:
    """The calls of this process to one target: how many may start, and when.

    ``wait(now)`` says how long a new call must wait (0: start now;
    ``math.inf``: until a call ends); ``started``/``ended``/``refused`` keep
    the count. Every time is in seconds of one monotonic clock.
    """

    window: float = START_WINDOW
    live: int = 0
    pause: float = 0.0
    not_before: float = 0.0
    last_cut: float = -math.inf
    _lingering: list[float] = field(default_factory=list)  #: heap of expiry times

    def in_flight(self, now: float) -> int:
        """Calls counted now: running ones, and ended ones whose port may not be back yet."""
        while self._lingering and self._lingering[0] <= now:
            heapq.heappop(self._lingering)
        return self.live + len(self._lingering)

    def wait(self, now: float) -> float:
        if now < self.not_before:
            return self.not_before - now
        if self.in_flight(now) < int(self.window):
            return 0.0
        if self._lingering:
            return self._lingering[0] - now
        return math.inf

    def started(self, now: float) -> None:
        self.live += 1
        if self.pause:
            self.not_before = max(self.not_before, now) + self.pause

    def ended(self, now: float, lived: float) -> None:
        """A call that held a port ended (served, or failed after the policy allowed it)."""
        self.live -= 1
        linger = min(MAX_LINGER, LINGER_FACTOR * max(0.0, lived))
        if linger > 0:
            heapq.heappush(self._lingering, now + linger)
        self.window = min(float(START_WINDOW), self.window + 1)
        self.pause = self.pause / 2 if self.pause / 2 >= MIN_PAUSE else 0.0

    def refused(self, now: float, *, no_channel: bool) -> None:
        """A call was refused (it held no port); ``no_channel``: the table was full."""
        self.live -= 1
        if not no_channel:
            return  # a denial says nothing about the table
        if now - self.last_cut >= max(self.pause, MIN_PAUSE):
            self.window = max(float(MIN_WINDOW), self.window / 2)
            self.last_cut = now
        self.pause = min(MAX_PAUSE, max(MIN_PAUSE, self.pause * 2))
        self.not_before = max(self.not_before, now + self.pause)


@dataclass
class Evidence:
    """Whether dom0's policy allows a binding's calls, as far as its calls have shown."""

    allowed_at: float = -math.inf

    def allowed(self, now: float) -> None:
        self.allowed_at = max(self.allowed_at, now)

    def says_allowed(self, now: float) -> bool:
        return now - self.allowed_at <= EVIDENCE_SECONDS
