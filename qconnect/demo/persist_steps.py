"""``qconnect persist``'s part of ``qconnect demo``: the firewall doc's permanent binding.

The doc has the user write a socket unit and a service unit in untrusted and
copy them to /lib/systemd/system from rc.local. Here one command writes them
into an image of untrusted (``--root``), the demo shows the files it wrote and
its rc.local lines, lists the binding, removes it and shows rc.local back as
Qubes made it. Every command shown is run as shown (plus ``--root``).
"""

import contextlib
import shlex
from pathlib import Path

from qconnect.demo import Machine, Step

#: /rw/config/rc.local as a new Qubes app qube has it (qubes-core-agent's setup-rw.sh).
QUBES_RC_LOCAL = """\
#!/bin/sh

# This script will be executed at every VM startup, you can place your own
# custom commands here. This includes overriding some configuration in /etc,
# starting services etc.
"""

SPEC = "444:@default:444"
SOCKET = "qconnect-bind-127.0.0.1-444-\\x40default-444.socket"
SERVICE = "qconnect-bind-127.0.0.1-444-\\x40default-444@.service"


def _qube_root(machine: Machine) -> Path:
    return machine.root / "untrusted"


def _persist(machine: Machine, *words: str) -> int:
    """Run ``qconnect persist WORDS --root $MACHINE/untrusted``, showing it and its output."""
    from qconnect.cli import main

    root = _qube_root(machine)
    machine.say("$ qconnect persist " + shlex.join(words) + " --root $MACHINE/untrusted")
    with contextlib.redirect_stdout(machine.out), contextlib.redirect_stderr(machine.out):
        status = main(["persist", *words, "--root", str(root)])
    if status != 0:
        machine.say(f"(exit status {status})")
    return status


def _add(machine: Machine) -> None:
    root = _qube_root(machine)
    for directory in ("usr/local/lib", "etc/systemd/system", "home/user", "rw/config"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    rc_local = root / "rw/config/rc.local"
    rc_local.write_text(QUBES_RC_LOCAL)
    rc_local.chmod(0o755)
    machine.say(
        "The doc's 'Permanent port binding' for scenario 1, in untrusted (an app qube, so\n"
        "the units go to /usr/local and rc.local starts them; port 444 needs --system):"
    )
    _persist(machine, "add", SPEC, "--persistence", "rw-only", "--relay", "handoff")
    units = root / "usr/local/lib/systemd/system"
    machine.show_file(units / SOCKET)
    machine.show_file(units / SERVICE)
    machine.show_file(rc_local)
    machine.say("The same command again changes nothing:")
    _persist(machine, "add", SPEC, "--persistence", "rw-only", "--relay", "handoff")
    _persist(machine, "list")


def _remove(machine: Machine) -> None:
    _persist(machine, "remove", SPEC)
    machine.show_file(_qube_root(machine) / "rw/config/rc.local")


def persist_steps() -> list[Step]:
    """Permanent bindings (issue 5), on the sample machine's untrusted."""
    return [
        Step("Firewall doc, permanent port binding: qconnect persist", _add),
        Step("Removing it leaves untrusted as it was", _remove),
    ]
