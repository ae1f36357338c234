"""``qconnect demo``: qconnect at work on a sample Qubes machine in a temporary directory.

Every line the demo prints is the real output of a real command run on the
sample machine; nothing is canned. The demo is a list of steps: modules
listed in ``STEP_PROVIDERS`` contribute theirs (imported only when the demo
runs, so the policy part stays standard-library only), and each step gets
the same ``Machine``. The temporary directory is removed at the end.
"""

import argparse
import contextlib
import importlib
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

#: The sample machine: the firewall doc's qubes, and a qube tagged "work".
SAMPLE_QUBES: dict[str, dict[str, object]] = {
    "dom0": {"type": "AdminVM", "tags": [], "power_state": "Running"},
    "untrusted": {
        "type": "AppVM",
        "tags": [],
        "default_dispvm": "default-dvm",
        "power_state": "Running",
    },
    "mytcp-service": {"type": "AppVM", "tags": [], "power_state": "Running"},
    "mytcp-service-bis": {"type": "AppVM", "tags": [], "power_state": "Running"},
    "work": {"type": "AppVM", "tags": ["work"], "power_state": "Running"},
    "default-dvm": {
        "type": "AppVM",
        "tags": [],
        "template_for_dispvms": True,
        "power_state": "Halted",
    },
}

# What Qubes ships in /etc/qubes/policy.d/90-default.policy for this service:
# without a rule of ours, every ConnectTCP call is refused.
DEFAULT_POLICY = """\
# As shipped by Qubes in 90-default.policy: refuse qubes.ConnectTCP unless an
# earlier file allows it.
qubes.ConnectTCP * @anyvm @anyvm deny
"""

#: "module:function" returning the module's demo steps, in the order they run.
STEP_PROVIDERS: list[str] = [
    "qconnect.demo.policy_steps:policy_steps",
    "qconnect.demo.client_steps:client_steps",
    "qconnect.demo.persist_steps:persist_steps",
]


@dataclass
class Machine:
    """The sample machine: dom0's policy directory and the qubes' description."""

    root: Path
    out: TextIO

    @property
    def policy_dir(self) -> Path:
        return self.root / "etc" / "qubes" / "policy.d"

    @property
    def legacy_dir(self) -> Path:
        return self.root / "etc" / "qubes-rpc" / "policy"

    @property
    def qubes_file(self) -> Path:
        return self.root / "qubes.json"

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def show_file(self, path: Path) -> None:
        self.say(f"$ cat {self.shown(path)}")
        self.out.write(path.read_text())
        self.out.flush()

    def shown(self, path: Path) -> str:
        return "$MACHINE/" + str(path.relative_to(self.root))

    def policy(self, *words: str) -> int:
        """Run ``qconnect policy WORDS`` on this machine, showing the command and its output."""
        from qconnect.cli import main

        self.say("$ qconnect policy " + shlex.join(words))
        options = ["--policy-dir", str(self.policy_dir), "--qubes", str(self.qubes_file)]
        with contextlib.redirect_stdout(self.out), contextlib.redirect_stderr(self.out):
            status = main(["policy", *words, *options])
        if status != 0:
            self.say(f"(exit status {status})")
        return status


@dataclass(frozen=True)
class Step:
    """One part of the demo: a title and what it does on the machine."""

    title: str
    run: Callable[[Machine], None]


def steps() -> Iterator[Step]:
    for provider in STEP_PROVIDERS:
        module_name, _, function_name = provider.partition(":")
        yield from getattr(importlib.import_module(module_name), function_name)()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep", action="store_true", help="keep the sample machine's directory afterwards"
    )


def run(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        if args.keep:
            root = Path(tempfile.mkdtemp(prefix="qconnect-demo-"))
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qconnect-demo-")))
        machine = Machine(root, sys.stdout)
        for number, step in enumerate(steps(), start=1):
            machine.say()
            machine.say(f"== {number}. {step.title}")
            step.run(machine)
    machine.say()
    machine.say(f"kept the sample machine in {root}" if args.keep else f"removed {root}")
    return 0
