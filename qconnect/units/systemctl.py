"""Talking to a running systemd (system or user manager), when there is one.

Nothing here decides anything: :mod:`.install` plans, this module only runs
``systemctl`` and turns its failures into one-line PersistErrors.
"""

import subprocess
from dataclasses import dataclass

from qconnect.errors import PersistError
from qconnect.units.render import Scope

# How long one systemctl call may take. Starting a socket or reloading is
# quick; a manager that does not answer within this is treated as broken
# rather than hanging the command forever.
SYSTEMCTL_TIMEOUT = 60

# States of ``systemctl is-system-running`` in which the manager answers.
_ANSWERING = frozenset(
    {"initializing", "starting", "running", "degraded", "maintenance", "stopping"}
)


@dataclass(frozen=True)
class Systemd:
    """One systemd manager: the system's, or the user's (``systemctl --user``)."""

    scope: Scope
    systemctl: str = "systemctl"

    def _argv(self, *args: str) -> list[str]:
        user = ["--user"] if self.scope is Scope.USER else []
        return [self.systemctl, *user, *args]

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                self._argv(*args),
                capture_output=True,
                text=True,
                timeout=SYSTEMCTL_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise PersistError(f"{' '.join(self._argv(*args))} failed: {error}") from None

    def reachable(self) -> bool:
        """Whether this manager runs and answers (not so in a chroot, a container, a --root)."""
        try:
            result = self._run("is-system-running")
        except PersistError:
            return False
        return result.stdout.strip() in _ANSWERING

    def call(self, *args: str) -> None:
        """Run one systemctl command; PersistError with its message if it fails."""
        result = self._run(*args)
        if result.returncode != 0:
            reason = (result.stderr.strip() or result.stdout.strip()).splitlines()
            raise PersistError(
                f"{' '.join(self._argv(*args))} failed: {reason[-1] if reason else 'no reason'}"
            )

    def state(self, unit: str) -> str:
        """``active (listening)``, ``inactive (dead)``, ... as systemctl shows it."""
        result = self._run("show", "--property=ActiveState,SubState", "--value", unit)
        words = result.stdout.split()
        if result.returncode != 0 or len(words) != 2:
            return "unknown"
        return f"{words[0]} ({words[1]})"
