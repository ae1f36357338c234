"""qrexec's limit on calls in flight: 128 per calling qube, the next refused until one ends.

The slots are lock files held with flock by each call's process, so the
state is shared across processes and freed by the kernel when a call's
process dies, however it dies.
"""

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from qconnect.loopback import layout, slots
from qconnect.loopback.machine import Machine
from qconnect.qrexec import EXIT_REFUSED, MAX_CALLS_IN_FLIGHT
from tests.conftest import BOTH_LOOPBACK_MODES

MakeMachine = Callable[..., Machine]

# Every test runs in-process and through the fork-server: the same behaviour.
LOOPBACK_MODES = BOTH_LOOPBACK_MODES

TIMEOUT = 30


def hold_slots(machine: Machine, qube: str, count: int) -> list[int]:
    """Take ``count`` of ``qube``'s call slots in this process (as calls in flight would)."""
    held = []
    for _ in range(count):
        fd = slots.acquire(layout.calls_dir(machine.directory, qube))
        assert fd is not None
        held.append(fd)
    return held


def release(held: list[int]) -> None:
    for fd in held:
        os.close(fd)
    held.clear()


@pytest.fixture
def held_slots() -> Iterator[list[list[int]]]:
    groups: list[list[int]] = []
    yield groups
    for group in groups:
        release(group)


def echo_call(machine: Machine, qube: str = "work") -> "subprocess.CompletedProcess[bytes]":
    return machine.run(
        qube,
        ["qrexec-client-vm", "web", "my.Cat"],
        input=b"x",
        capture_output=True,
        timeout=TIMEOUT,
    )


def machine_with_cat(make: MakeMachine) -> Machine:
    machine = make("work", "other", "web", policy=["* * @anyvm web allow"])
    script = machine.rpc_dir("web") / "my.Cat"
    script.write_text("#!/bin/sh\nexec cat\n")
    script.chmod(0o755)
    return machine


def test_call_beyond_the_limit_is_refused_until_one_ends(
    loopback_machine: MakeMachine, held_slots: list[list[int]]
) -> None:
    machine = machine_with_cat(loopback_machine)
    held = hold_slots(machine, "work", MAX_CALLS_IN_FLIGHT)
    held_slots.append(held)
    assert machine.calls_in_flight("work") == MAX_CALLS_IN_FLIGHT
    refused = echo_call(machine)
    assert refused.returncode == EXIT_REFUSED
    assert b"Failed to allocate new vchan port" in refused.stderr
    assert refused.stderr.endswith(b"Request refused\n")
    assert "Failed to allocate new vchan port" in machine.log_file.read_text()
    os.close(held.pop())
    allowed = echo_call(machine)
    assert (allowed.returncode, allowed.stdout) == (0, b"x")


def test_the_limit_counts_per_calling_qube(
    loopback_machine: MakeMachine, held_slots: list[list[int]]
) -> None:
    machine = machine_with_cat(loopback_machine)
    held_slots.append(hold_slots(machine, "work", MAX_CALLS_IN_FLIGHT))
    assert echo_call(machine, "work").returncode == EXIT_REFUSED
    assert echo_call(machine, "other").returncode == 0


def test_a_refused_policy_call_takes_no_slot(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine("work", "web")
    result = machine.run(
        "work", ["qrexec-client-vm", "web", "my.Cat"], capture_output=True, timeout=TIMEOUT
    )
    assert result.returncode == EXIT_REFUSED
    assert b"vchan" not in result.stderr
    assert machine.calls_in_flight("work") == 0


def wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_a_call_holds_its_slot_while_in_flight_and_a_killed_call_frees_it(
    loopback_machine: MakeMachine,
) -> None:
    machine = machine_with_cat(loopback_machine)
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
        # Kill the whole call (client and service) the hard way.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(TIMEOUT)
        wait_for(lambda: machine.calls_in_flight("work") == 0)
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
        for _ in range(MAX_CALLS_IN_FLIGHT):
            calls.append(
                machine.popen(
                    "work",
                    ["qrexec-client-vm", "web", "my.Cat"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                )
            )
        wait_for(lambda: machine.calls_in_flight("work") == MAX_CALLS_IN_FLIGHT, timeout=120)
        assert echo_call(machine).returncode == EXIT_REFUSED
        first = calls.pop(0)
        assert first.stdin is not None
        first.stdin.close()
        assert first.wait(TIMEOUT) == 0
        assert echo_call(machine).returncode == 0
    finally:
        for process in calls:
            if process.stdin is not None:
                process.stdin.close()
        for process in calls:
            process.wait(TIMEOUT)
