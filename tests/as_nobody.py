"""Run a program as an unprivileged user from a test that runs as root.

``subprocess.run([*as_nobody(), program, ...])`` runs ``program`` as uid and
gid nobody with no capability but CAP_DAC_READ_SEARCH and the ones asked
for, so the kernel refuses it what it refuses any user (port 80, another
user's files). Reading any file is kept because this interpreter may live in
root's 0700 home. The capabilities are ambient, effective from the next
program on (hence ``env`` after setpriv).

``as_nobody_keeping_real_root()`` with ``preexec_fn=become_nobody`` does the
same with the real uid left at 0: what lets a stand-in sudo become root again
(a process may set its effective uid to its real one).
"""

import os
import shutil

NOBODY = 65534

_ENV = shutil.which("env", path="/usr/bin:/bin") or "/usr/bin/env"


def _caps(capabilities: tuple[str, ...]) -> list[str]:
    caps = ",".join(f"+{name}" for name in ("dac_read_search", *capabilities))
    return [f"--inh-caps={caps}", f"--ambient-caps={caps}"]


def as_nobody(*capabilities: str) -> list[str]:
    """The command prefix that runs a program entirely as nobody (see the module)."""
    return [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        *_caps(capabilities),
        "--",
        _ENV,
    ]


def become_nobody() -> None:
    """preexec_fn for as_nobody_keeping_real_root: effective uid and gid nobody, no groups."""
    os.setgroups([])
    os.setegid(NOBODY)
    os.seteuid(NOBODY)


def as_nobody_keeping_real_root(*capabilities: str) -> list[str]:
    """The prefix for a program whose effective uid is nobody and real uid root (see the module)."""
    return ["setpriv", *_caps(capabilities), "--", _ENV]


def can_play_nobody() -> bool:
    """Whether this test run can do it: root, with setpriv."""
    return os.geteuid() == 0 and shutil.which("setpriv") is not None
