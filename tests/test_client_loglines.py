"""The client's log lines and counters, from values alone: no sockets, no event loop.

Each kind of call result gives one line whose text, level and journal
fields are pinned here; the counters move by exactly one, the one the
result names.
"""

import logging

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from qconnect.client import loglines
from qconnect.client.loglines import CallContext, LogLine, call_line, hung_line
from qconnect.client.outcome import (
    CallResult,
    Ending,
    Hang,
    Kind,
    Relayed,
    describe_exit,
    exit_kind,
)
from qconnect.client.qrexec_call import Mode
from qconnect.client.server import Binding
from qconnect.core.printable import printable
from qconnect.core.spec import BindingSpec

WEB = BindingSpec("127.0.0.1", 8080, "web", 80)
CONTEXT = CallContext(WEB, "127.0.0.1:40000", Mode.HANDOFF, "work", call_timeout=30)
BASE = {
    "PEER": "127.0.0.1:40000",
    "BINDING": "127.0.0.1:8080:web:80",
    "TARGET": "web",
    "PORT": 80,
    "DURATION": "0.500",
    "MODE": "handoff",
}
ALLOW = "qconnect policy allow work --port 80 --target web"


@pytest.mark.parametrize(
    ("result", "line"),
    [
        (
            CallResult(0),
            LogLine(
                "127.0.0.1:40000 -> web:80 (0.50 s): closed",
                logging.INFO,
                {**BASE, "EXIT": 0, "OUTCOME": "ok"},
            ),
        ),
        (
            CallResult(0, b"chatter on stderr"),  # a served call's stderr is not shown
            LogLine(
                "127.0.0.1:40000 -> web:80 (0.50 s): closed",
                logging.INFO,
                {**BASE, "EXIT": 0, "OUTCOME": "ok"},
            ),
        ),
        (
            CallResult(None),
            LogLine("127.0.0.1:40000 -> web:80 (0.50 s): ended at shutdown", logging.INFO, BASE),
        ),
        (
            CallResult(125, b"connect\n  failed\n"),
            LogLine(
                "127.0.0.1:40000 -> web:80 (0.50 s): the target could not connect to its port "
                "80: nothing listening there, or a qrexec failure (exit code 125) "
                "[qrexec-client-vm: connect failed]",
                logging.WARNING,
                {**BASE, "EXIT": 125, "OUTCOME": "unreachable"},
            ),
        ),
        (
            CallResult(-9),
            LogLine(
                "127.0.0.1:40000 -> web:80 (0.50 s): qrexec-client-vm was killed by SIGKILL",
                logging.WARNING,
                {**BASE, "EXIT": -9, "OUTCOME": "signalled"},
            ),
        ),
        (
            CallResult(126, b"Request refused\n"),
            LogLine(
                "127.0.0.1:40000 -> web:80 (0.50 s): refused by dom0 policy, or no free qrexec "
                f"channel (exit code 126); to allow it, run in dom0: {ALLOW} "
                "[qrexec-client-vm: Request refused]",
                logging.WARNING,
                {"EVENT": "refused"},
                loglines.Burst(("refused", WEB), "calls to web:80 refused"),
            ),
        ),
    ],
)
def test_each_call_result_gives_its_line_and_fields(result: CallResult, line: LogLine) -> None:
    assert call_line(CONTEXT, result, 0.5) == line


def test_a_relayed_call_says_what_it_moved() -> None:
    relay = CallContext(WEB, "[::1]:40000", Mode.RELAY, "work", call_timeout=30)
    line = call_line(relay, CallResult(0, relayed=Relayed(out=12, back=3456)), 1.25)
    assert line.text == "[::1]:40000 -> web:80 (1.25 s, 12 bytes out, 3456 bytes in): closed"
    assert line.fields["BYTES_OUT"] == 12 and line.fields["BYTES_IN"] == 3456
    assert line.fields["MODE"] == "relay" and line.fields["PEER"] == "[::1]:40000"


def test_a_hung_call_names_what_to_check_in_dom0() -> None:
    line = hung_line(CONTEXT, Hang(waited=30.2, unread=17), 31.0)
    assert line.text == (
        "127.0.0.1:40000 -> web:80 (31.00 s): call not accepted after 30 s, the client's 17 "
        "byte(s) still unread; ended qrexec-client-vm and closed the connection. Check dom0 "
        "for a policy 'ask' prompt waiting for an answer, and that web (try: qvm-start web in "
        "dom0) starts; --call-timeout is 30 s"
    )
    assert line.level == logging.WARNING
    assert line.fields == {
        "EVENT": "hung",
        **BASE,
        "DURATION": "31.000",
        "OUTCOME": "hung",
        "UNREAD": 17,
    }
    assert line.burst == loglines.Burst(("hung", WEB), "calls to web:80 not accepted within 30 s")


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (loglines.start_failed_line(CONTEXT, OSError(24, "Too many open files")), "start-failed"),
        (loglines.no_channel_line(WEB), "no-channel"),
        (loglines.accept_failed_line(WEB, 24), "accept"),
        (loglines.binding_full_line(WEB, 64), "binding-full"),
        (loglines.process_full_line(112), "process-full"),
    ],
)
def test_every_burst_line_carries_its_event(line: LogLine, event: str) -> None:
    assert line.burst is not None and line.burst.key[0] == event
    assert line.fields == {"EVENT": event}
    assert line.level == logging.WARNING
    assert line.text.isprintable()


def test_a_bursts_count_says_how_many_of_what() -> None:
    line = loglines.suppressed_line("refused", 12, "calls to web:80 refused", 10.0)
    assert line.text == "... and 12 more calls to web:80 refused in the last 10 s"
    assert line.fields == {"EVENT": "refused", "COUNT": 12} and line.burst is None


results = st.builds(
    CallResult,
    returncode=st.none() | st.integers(-64, 300),
    stderr=st.binary(max_size=400),
    relayed=st.none() | st.builds(Relayed, st.integers(0, 2**40), st.integers(0, 2**40)),
    hang=st.none() | st.builds(Hang, st.floats(0, 1e6), st.integers(0, 2**20)),
)


@given(results, st.text(max_size=40))
def test_every_line_is_one_printable_line_with_its_fields_once(
    result: CallResult, peer: str
) -> None:
    context = CallContext(WEB, printable(peer), Mode.RELAY, "work", call_timeout=5)
    if result.hang is not None:
        line = hung_line(context, result.hang, 6.0)
    else:
        line = call_line(context, result, 6.0)
    assert line.text.isprintable()
    assert ("EVENT" in line.fields) == (line.burst is not None)
    if line.burst is None:
        assert line.fields["PEER"] == context.peer and line.fields["PORT"] == 80


@given(results)
def test_a_binding_counts_each_call_once_where_its_result_says(result: CallResult) -> None:
    binding = Binding(spec=WEB, listener=None, max_connections=1, slots=trio.Semaphore(1))  # type: ignore[arg-type]
    binding.count(result)
    counts = {Ending.SERVED: binding.served, Ending.REFUSED: binding.refused}
    counts[Ending.HUNG] = binding.hung
    assert counts == {ending: int(ending is result.ending) for ending in Ending}
    if result.hang is None and result.returncode == 126:
        assert result.ending is Ending.REFUSED  # dom0's or the service's own 126 alike


@given(st.integers(-(2**31), 2**31))
def test_an_exit_codes_kind_is_the_one_its_words_have(returncode: int) -> None:
    outcome = describe_exit(returncode, source_qube="work", target="web", remote_port=80)
    assert exit_kind(returncode) is outcome.kind
    assert (outcome.kind is Kind.OK) == (returncode == 0)
