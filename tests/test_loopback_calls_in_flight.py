"""dom0's data-port table: 256 per target qube, a half per side, released after the caller.

The model (qconnect.loopback.channels) follows qubes-core-qrexec's
qrexec-daemon: a call takes a port of the *target's* table, from the odd half
when the caller's domain id is larger and the even half otherwise; a full
half refuses the call as a denial does (126, "Request refused"); the port
is released only once the call's process has gone and the release lag has
passed. Ports are held here by a ``sleep`` process written into the table,
as a call in flight would hold them, so a test can fill a half in
milliseconds and free it by killing one process.
"""

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from qconnect.core.errors import LoopbackError
from qconnect.core.qrexec import EXIT_REFUSED
from qconnect.loopback import channels
from qconnect.loopback.machine import Machine
from tests.conftest import BOTH_LOOPBACK_MODES

MakeMachine = Callable[..., Machine]

# Every test runs in-process and through the fork-server: the same table.
LOOPBACK_MODES = BOTH_LOOPBACK_MODES

TIMEOUT = 30


class Holder:
    """A process that holds ports of a table, as running calls would."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(["sleep", "3600"])

    def hold(self, machine: Machine, target: str, caller: str, count: int) -> None:
        """Take ``count`` free ports of ``target``'s half for ``caller`` (the daemon's choice)."""
        me = self.process.pid
        start = channels.process_start(me)
        assert start is not None
        first = channels.half_start(machine.domain_id(caller), machine.domain_id(target))
        with channels.Table(machine.directory, target) as table:
            free = [i for i in range(first, channels.MAX_CLIENTS, 2) if i not in table.entries]
            assert len(free) >= count
            for index in free[:count]:
                table.put(channels.Entry(index, caller, me, start, 0.0))

    def end(self) -> None:
        self.process.kill()
        self.process.wait(TIMEOUT)


@pytest.fixture
def holders() -> Iterator[Callable[[], Holder]]:
    started: list[Holder] = []

    def make() -> Holder:
        holder = Holder()
        started.append(holder)
        return holder

    yield make
    for holder in started:
        holder.end()


def call(machine: Machine, qube: str = "work") -> "subprocess.CompletedProcess[bytes]":
    return machine.run(
        qube,
        ["qrexec-client-vm", "web", "my.Cat"],
        input=b"x",
        capture_output=True,
        timeout=TIMEOUT,
    )


def machine_with_cat(make: MakeMachine) -> Machine:
    """work (id 1) < web (id 2) < other (id 3): work takes even ports of web, other odd ones."""
    machine = make("work", "web", "other", policy=["* * @anyvm web allow"])
    script = machine.rpc_dir("web") / "my.Cat"
    script.write_text("#!/bin/sh\nexec cat\n")
    script.chmod(0o755)
    machine.set_channel_release_lag(0)
    return machine


def wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_qubes_get_domain_ids_in_the_order_they_were_given(loopback_machine: MakeMachine) -> None:
    machine = machine_with_cat(loopback_machine)
    assert [machine.domain_id(q) for q in ("work", "web", "other")] == [1, 2, 3]


def test_a_full_half_refuses_the_call_exactly_as_a_denial_does(
    loopback_machine: MakeMachine, holders: Callable[[], Holder]
) -> None:
    machine = machine_with_cat(loopback_machine)
    holders().hold(machine, "web", "work", channels.HALF - 1)
    last = holders()
    last.hold(machine, "web", "work", 1)
    assert machine.channels_held("web") == channels.HALF
    refused = call(machine)
    assert refused.returncode == EXIT_REFUSED
    assert refused.stderr == b"Request refused\n"  # not one word more than real qrexec says
    log = machine.log_file.read_text()
    assert "qrexec-daemon[web][" in log  # the target's daemon says so
    assert "]: Failed to allocate new vchan port, too many clients?" in log
    last.end()  # one call ends: its port is free (lag 0)
    allowed = call(machine)
    assert (allowed.returncode, allowed.stdout) == (0, b"x")


def test_callers_on_the_other_side_of_the_target_have_their_own_half(
    loopback_machine: MakeMachine, holders: Callable[[], Holder]
) -> None:
    machine = machine_with_cat(loopback_machine)
    holders().hold(machine, "web", "work", channels.HALF)
    assert call(machine, "work").returncode == EXIT_REFUSED
    assert call(machine, "other").returncode == 0


def test_every_caller_on_one_side_shares_the_half(
    loopback_machine: MakeMachine, holders: Callable[[], Holder]
) -> None:
    machine = machine_with_cat(loopback_machine)
    machine.set_domain_id("web", 1)
    machine.set_domain_id("work", 2)  # work and other are both larger than web now
    holders().hold(machine, "web", "other", channels.HALF)
    assert call(machine, "work").returncode == EXIT_REFUSED


def test_the_calling_qubes_own_table_takes_no_port(
    loopback_machine: MakeMachine, holders: Callable[[], Holder]
) -> None:
    machine = machine_with_cat(loopback_machine)
    holders().hold(machine, "work", "web", channels.HALF)  # web's calls to work: work's table
    assert call(machine, "work").returncode == 0
    assert machine.channels_held("work") == channels.HALF


def test_a_refused_policy_call_takes_no_port(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine("work", "web")
    result = call(machine)
    assert result.returncode == EXIT_REFUSED
    assert machine.channels_held("web") == 0
    assert "vchan" not in machine.log_file.read_text()


def test_a_port_outlives_its_call_by_the_release_lag(loopback_machine: MakeMachine) -> None:
    machine = machine_with_cat(loopback_machine)
    lag = 1.0
    machine.set_channel_release_lag(lag)
    result = call(machine)
    ended = time.monotonic()
    assert result.returncode == 0
    assert machine.calls_in_flight("work") == 0  # the call is over...
    assert machine.channels_held("web") == 1  # ...but dom0 has not released its port yet
    wait_for(lambda: machine.channels_held("web") == 0)
    assert time.monotonic() - ended >= lag * 0.9  # the lag is counted from just before the exit


def test_by_default_a_port_outlives_its_call_by_about_as_long_as_the_call(
    loopback_machine: MakeMachine,
) -> None:
    machine = machine_with_cat(loopback_machine)
    machine.set_channel_release_lag(None)
    process = machine.popen("work", ["qrexec-client-vm", "web", "my.Cat"], stdin=subprocess.PIPE)
    started = time.monotonic()
    wait_for(lambda: machine.calls_in_flight("work") == 1)
    time.sleep(0.5)  # the call's lifetime is what this test is about
    assert process.communicate(b"", timeout=TIMEOUT) == (None, None)
    ended = time.monotonic()
    assert machine.channels_held("web") == 1
    wait_for(lambda: machine.channels_held("web") == 0)
    # held after the call's end for at least its lifetime (0.5 s or more) times PER_CALL
    assert time.monotonic() - ended >= 0.5 * channels.DEFAULT_RELEASE_PER_CALL * 0.9
    assert process.returncode == 0 and ended - started >= 0.5


def test_with_no_lag_the_port_is_free_when_the_caller_has_its_exit_code(
    loopback_machine: MakeMachine,
) -> None:
    machine = machine_with_cat(loopback_machine)
    assert call(machine).returncode == 0
    assert machine.channels_held("web") == 0


def test_a_bad_release_lag_is_refused_by_name(loopback_machine: MakeMachine) -> None:
    machine = machine_with_cat(loopback_machine)
    for bad in (-1.0, float("nan"), 1e9):
        with pytest.raises(LoopbackError, match="invalid channel release lag"):
            machine.set_channel_release_lag(bad)
        with pytest.raises(LoopbackError, match="invalid channel release lag per call"):
            machine.set_channel_release_lag(0, bad)
    default = (channels.DEFAULT_RELEASE_FIXED, channels.DEFAULT_RELEASE_PER_CALL)
    for junk in ("junk\n", "1\n", "nan 1\n", "1 -1\n"):
        channels.release_lag_file(machine.directory).write_text(junk)
        assert channels.release_lag(machine.directory) == default


def test_a_junk_table_line_frees_that_port_and_breaks_nothing(
    loopback_machine: MakeMachine,
) -> None:
    machine = machine_with_cat(loopback_machine)
    table = machine.directory / "run" / "channels" / "web"
    junk = [
        b"garbage",
        b"work 1 2",
        b"work -5 1 0.0",
        b"w\xff 1 1 0.0",
        b"work 1 1 nan",
        b"work 1 1 inf",
    ]
    table.write_bytes(b"".join(line.ljust(channels.RECORD - 1) + b"\n" for line in junk) + b"x")
    assert call(machine).returncode == 0
    assert machine.channels_held("web") == 0


def test_a_call_holds_its_port_while_in_flight_and_a_killed_call_frees_it(
    loopback_machine: MakeMachine,
) -> None:
    machine = machine_with_cat(loopback_machine)
    machine.set_channel_release_lag(600)  # a killed call never reaches its release
    process = machine.popen(
        "work",
        ["qrexec-client-vm", "web", "my.Cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(b"ping\n")
        process.stdin.flush()
        assert process.stdout.readline() == b"ping\n"
        assert machine.calls_in_flight("work") == 1
        assert machine.calls_in_flight("web") == 1
        assert machine.channels_held("web") == 1
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(TIMEOUT)
        wait_for(lambda: machine.channels_held("web") == 0)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(TIMEOUT)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


@pytest.mark.slow
def test_129th_concurrent_real_call_is_refused(loopback_machine: MakeMachine) -> None:
    """128 real calls in flight at once, then one more (slow: 129 processes)."""
    machine = machine_with_cat(loopback_machine)
    calls = []
    try:
        for _ in range(channels.HALF):
            calls.append(
                machine.popen(
                    "work",
                    ["qrexec-client-vm", "web", "my.Cat"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                )
            )
        wait_for(lambda: machine.calls_in_flight("work") == channels.HALF, timeout=120)
        assert call(machine).returncode == EXIT_REFUSED
        first = calls.pop(0)
        assert first.stdin is not None
        first.stdin.close()
        assert first.wait(TIMEOUT) == 0
        assert call(machine).returncode == 0
    finally:
        for process in calls:
            if process.stdin is not None:
                process.stdin.close()
        for process in calls:
            process.wait(TIMEOUT)
