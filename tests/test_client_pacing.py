"""The pure pacing of calls to one target, and the evidence that tells "no channel" from "denied".

No event loop: the clock is a number the test moves.
"""

import itertools
import math

from hypothesis import given
from hypothesis import strategies as st

from qconnect.client import pacing
from qconnect.client.pacing import Evidence, TargetPacer


def test_a_call_counts_until_its_port_is_likely_back_not_until_it_exits() -> None:
    pacer = TargetPacer()
    pacer.started(0.0)
    pacer.ended(now=0.2, lived=0.2)
    assert pacer.in_flight(0.2) == 1  # exited, but its port is not back yet
    assert pacer.in_flight(0.2 + 0.2 * pacing.LINGER_FACTOR - 1e-6) == 1
    assert pacer.in_flight(0.2 + 0.2 * pacing.LINGER_FACTOR) == 0


def test_a_long_call_lingers_at_most_max_linger() -> None:
    pacer = TargetPacer()
    pacer.started(0.0)
    pacer.ended(now=3600.0, lived=3600.0)
    assert pacer.in_flight(3600.0 + pacing.MAX_LINGER) == 0


def test_the_window_leaves_room_for_the_targets_other_callers() -> None:
    pacer = TargetPacer()
    for _ in range(pacing.START_WINDOW):
        assert pacer.wait(0.0) == 0.0
        pacer.started(0.0)
    assert pacing.START_WINDOW < pacing.TABLE_HALF
    assert pacer.wait(0.0) == math.inf  # only a call's end frees room


def test_a_full_window_of_lingering_calls_says_when_room_comes() -> None:
    pacer = TargetPacer()
    for index in range(pacing.START_WINDOW):
        pacer.started(0.0)
        pacer.ended(now=1.0, lived=1.0 + index / 1000)
    assert pacer.wait(1.5) == 0.5  # the first linger ends at 2.0


def test_refusals_for_lack_of_channel_halve_the_window_once_per_pause_and_space_calls() -> None:
    pacer = TargetPacer()
    for _ in range(4):
        pacer.started(0.0)
    pacer.refused(1.0, no_channel=True)
    assert pacer.window == pacing.START_WINDOW / 2
    assert pacer.pause == pacing.MIN_PAUSE
    assert math.isclose(pacer.wait(1.0), pacing.MIN_PAUSE)
    pacer.refused(1.0, no_channel=True)  # the same wave of refusals: not halved again
    assert pacer.window == pacing.START_WINDOW / 2
    assert pacer.pause == 2 * pacing.MIN_PAUSE


def test_a_denial_leaves_window_and_pace_alone() -> None:
    pacer = TargetPacer()
    pacer.started(0.0)
    pacer.refused(0.0, no_channel=False)
    assert (pacer.window, pacer.pause, pacer.wait(0.0)) == (pacing.START_WINDOW, 0.0, 0.0)


def test_served_calls_widen_the_window_and_shorten_the_pause_back_to_none() -> None:
    pacer = TargetPacer()
    for _ in range(20):
        pacer.started(0.0)
    for step in range(8):
        pacer.refused(step * 2.0, no_channel=True)
    assert pacer.window == pacing.MIN_WINDOW
    assert pacer.pause == pacing.MAX_PAUSE
    for _ in range(12):
        pacer.ended(now=100.0, lived=0.0)
    assert pacer.pause == 0.0
    assert pacer.window == pacing.MIN_WINDOW + 12


def test_calls_during_a_pause_start_one_pause_apart() -> None:
    pacer = TargetPacer()
    pacer.started(0.0)
    pacer.refused(0.0, no_channel=True)
    starts = []
    now = 0.0
    for _ in range(3):
        now += pacer.wait(now)
        starts.append(now)
        pacer.started(now)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(math.isclose(gap, pacing.MIN_PAUSE) for gap in gaps)


def test_evidence_is_an_allowed_call_within_the_evidence_window() -> None:
    evidence = Evidence()
    assert not evidence.says_allowed(0.0)
    evidence.allowed(5.0)
    assert evidence.says_allowed(5.0 + pacing.EVIDENCE_SECONDS)
    assert not evidence.says_allowed(5.0 + pacing.EVIDENCE_SECONDS + 0.001)
    evidence.allowed(1.0)  # an older outcome reported late does not age the evidence
    assert evidence.says_allowed(5.0 + pacing.EVIDENCE_SECONDS)


def test_a_policy_changed_to_deny_mid_burst_costs_a_bounded_number_of_retries() -> None:
    """Retries are paced per target: after the last allowed call, at most ~17 in 10 s."""
    pacer, evidence = TargetPacer(), Evidence()
    evidence.allowed(0.0)
    now, retries = 0.0, 0
    while True:
        now += pacer.wait(now)
        if not evidence.says_allowed(now):
            break
        pacer.started(now)
        pacer.refused(now, no_channel=True)
        retries += 1
    assert retries <= 20


@given(
    st.lists(
        st.tuples(st.sampled_from(["start", "end", "refuse", "deny"]), st.floats(0, 2)),
        max_size=200,
    )
)
def test_the_count_never_goes_negative_and_the_window_stays_in_bounds(
    events: list[tuple[str, float]],
) -> None:
    pacer = TargetPacer()
    now = 0.0
    for kind, step in events:
        now += step
        if kind == "start":
            pacer.started(now)
        elif pacer.live:
            if kind == "end":
                pacer.ended(now, step)
            else:
                pacer.refused(now, no_channel=kind == "refuse")
        assert pacer.live >= 0
        assert pacing.MIN_WINDOW <= pacer.window <= pacing.START_WINDOW
        assert 0.0 <= pacer.pause <= pacing.MAX_PAUSE
        assert pacer.wait(now) >= 0.0


def test_only_qrexec_client_vms_own_refusal_counts_as_dom0s() -> None:
    """126 with exactly "Request refused" is dom0's; a service's own 126 has its own words."""
    from qconnect.client.outcome import CallResult

    def call(returncode: int, stderr: bytes) -> CallResult:
        return CallResult(returncode=returncode, stderr=stderr)

    assert call(126, b"Request refused\n").refused_by_dom0
    assert not call(126, b"qubes.ConnectTCP: port 80 not served to work\n").refused_by_dom0
    assert not call(126, b"").refused_by_dom0
    assert not call(125, b"Request refused\n").refused_by_dom0
