"""`qconnect demo`: the policy tool at work on the sample machine, cleaned up afterwards."""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qconnect import demo


def test_demo_writes_lists_and_explains_four_calls_then_cleans_up() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qconnect.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    # the three scenarios and the ask rule were written by the real tool
    for rule in [
        "qubes.ConnectTCP +444 untrusted @default allow target=mytcp-service",
        "qubes.ConnectTCP +444 untrusted mytcp-service allow",
        "qubes.ConnectTCP +445 untrusted @default allow target=mytcp-service-bis",
        "qubes.ConnectTCP +444 @tag:work mytcp-service ask default_target=mytcp-service",
    ]:
        assert f"added:    {rule}" in out
        assert re.search(rf"^30-qconnect\.policy:\d+ +{re.escape(rule)}$", out, re.MULTILINE)
    assert "no problems (5 rules)" in out
    # four calls: allowed, redirected, refused, asked
    decisions = re.findall(r"decision: (\w+)\n  target:   (\S+)", out)
    assert decisions == [("allow", "mytcp-service"), ("allow", "mytcp-service-bis"), ("deny", "-")]
    assert "(redirected by target= from @default)" in out
    assert '{"decision": "ask", "target": "mytcp-service", "rule": "30-qconnect.policy:6"}' in out
    # the sample machine is gone
    root = re.search(r"^MACHINE=(\S+)$", out, re.MULTILINE)
    assert root is not None
    assert f"removed {root[1]}" in out
    assert not Path(root[1]).exists()
    assert "Traceback" not in done.stderr


def extra_steps() -> list["demo.Step"]:
    """A step another module would add (later issues: the real TCP flow)."""

    def look(machine: demo.Machine) -> None:
        machine.say(f"extra step sees {len(list(machine.policy_dir.iterdir()))} policy files")
        machine.policy("explain", "untrusted", "@default", "444", "--json")

    return [demo.Step("An added step", look)]


def test_other_modules_add_steps_that_run_on_the_same_machine(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        demo, "STEP_PROVIDERS", [*demo.STEP_PROVIDERS, "tests.test_policy_demo:extra_steps"]
    )
    assert demo.run(argparse.Namespace(keep=False)) == 0
    out = capsys.readouterr().out
    assert f"== {len(list(demo.steps()))}. An added step" in out
    # 90-default and 30-qconnect (the editor leaves no lock file)
    assert "extra step sees 2 policy files" in out
    assert '{"decision": "allow", "target": "mytcp-service", "rule": "30-qconnect.policy:9"}' in out
