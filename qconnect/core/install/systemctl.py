"""Talking to a running systemd (the system's or a user's manager), always with a timeout.

Nothing here decides anything: installers plan, this module only runs
``systemctl`` and turns its failures into one-line :class:`SystemctlError`.
"""

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from qconnect.core.errors import SystemctlError

# How long one systemctl call may take. Starting a socket or reloading is
# quick; a manager that does not answer within this is treated as broken
# rather than hanging the command forever.
SYSTEMCTL_TIMEOUT = 60

# States of ``systemctl is-system-running`` in which the manager answers.
_ANSWERING = frozenset(
    {"initializing", "starting", "running", "degraded", "maintenance", "stopping"}
)

# Exists exactly when systemd is the running init (sd_booted(3)).
_BOOTED_MARK = Path("/run/systemd/system")


@dataclass(frozen=True)
class Systemd:
    """One systemd manager: ``scope`` "system", or "user" (``systemctl --user``)."""

    scope: str = "system"
    systemctl: str = "systemctl"

    def _argv(self, *args: str) -> list[str]:
        user = ["--user"] if self.scope == "user" else []
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
            raise SystemctlError(f"{' '.join(self._argv(*args))} failed: {error}") from None

    def reachable(self) -> bool:
        """Whether this manager runs and answers (not so in a chroot, a container, a --root)."""
        try:
            result = self._run("is-system-running")
        except SystemctlError:
            return False
        return result.stdout.strip() in _ANSWERING

    def call(self, *args: str) -> None:
        """Run one systemctl command; SystemctlError with its message if it fails."""
        result = self._run(*args)
        if result.returncode != 0:
            reason = (result.stderr.strip() or result.stdout.strip()).splitlines()
            raise SystemctlError(
                f"{' '.join(self._argv(*args))} failed: {reason[-1] if reason else 'no reason'}"
            )

    def call_or_warn(self, *args: str) -> None:
        """Run systemctl when systemd runs this system; a failure is a warning on stderr.

        For changes that are already complete on disk (the service installer):
        systemd only needs telling, and the user can retry by hand.
        """
        if not _BOOTED_MARK.is_dir() or shutil.which(self.systemctl) is None:
            return
        try:
            result = self._run(*args)
        except SystemctlError as error:
            print(f"qconnect: warning: {error}", file=sys.stderr)
            return
        if result.returncode != 0:
            message = result.stderr.strip().splitlines()[-1:] or ["failed"]
            print(f"qconnect: warning: systemctl {' '.join(args)}: {message[0]}", file=sys.stderr)

    def state(self, unit: str) -> str:
        """``active (listening)``, ``inactive (dead)``, ... as systemctl shows it."""
        result = self._run("show", "--property=ActiveState,SubState", "--value", unit)
        words = result.stdout.split()
        if result.returncode != 0 or len(words) != 2:
            return "unknown"
        return f"{words[0]} ({words[1]})"
