"""Test support for ``qconnect persist``: a qube-like file tree, snapshots, the command."""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

#: The home directory of the qube's user, as the qube sees it.
QUBE_HOME = "/home/user"

RC_LOCAL_OF_THE_USER = b"#!/bin/sh\n# the user's own line\necho started >/dev/null\nexit 0\n"


def make_qube_tree(root: Path, *, rc_local: bytes | None = RC_LOCAL_OF_THE_USER) -> Path:
    """The directories a Qubes app qube has, plus a few files of the user's own."""
    for directory in ("usr/local/lib", "etc/systemd/system", "home/user/.config", "rw/config"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "etc/systemd/system/users-own.service").write_text("[Service]\nExecStart=/bin/true\n")
    (root / "home/user/.config/editor.conf").write_text("theme=dark\n")
    if rc_local is not None:
        (root / "rw/config/rc.local").write_bytes(rc_local)
        (root / "rw/config/rc.local").chmod(0o755)
    return root


Snapshot = dict[str, tuple[str, int, bytes]]


def snapshot(root: Path) -> Snapshot:
    """Every path under ``root`` with its type, mode and bytes (or symlink target)."""
    result: Snapshot = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            info = os.lstat(path)
            mode = stat.S_IMODE(info.st_mode)
            relative = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                result[relative] = ("link", 0, os.readlink(path).encode())
            elif stat.S_ISDIR(info.st_mode):
                result[relative] = ("dir", mode, b"")
            else:
                result[relative] = ("file", mode, path.read_bytes())
    return result


def persist_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "XDG_CONFIG_HOME"}
    env["HOME"] = QUBE_HOME
    env.update(extra or {})
    return env


def run_persist(
    *args: str, env: dict[str, str] | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """``qconnect persist ARGS`` in a child process, as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "qconnect.cli", "persist", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=persist_env(env),
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def fake_executable(path: Path) -> Path:
    """A real executable file at ``path`` (systemd-analyze checks ExecStart= exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def install_analyze_support(root: Path) -> None:
    """What ``systemd-analyze verify --root`` needs besides our units: sysinit.target."""
    target = root / "usr/lib/systemd/system"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy("/usr/lib/systemd/system/sysinit.target", target / "sysinit.target")
