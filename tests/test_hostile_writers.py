"""Hostile file systems under the file writers (``qconnect policy``, and the one install
engine under ``qconnect persist`` and ``qconnect service install``):
a symlink planted where the file will be written, a read-only directory, a full
disk, two writers at once. Expected every time: the old content intact, one
clear line on stderr and a non-zero exit (or, for two writers, both edits
made), never a write through the symlink, no temporary file left behind.

Read-only directories and full disks are real: a read-only tmpfs and a 64 KiB
tmpfs mounted for the test (tests run as root here); without the privilege to
mount, those tests are skipped, not faked.
"""

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.persist_tree import make_qube_tree, persist_env, snapshot

POLICY_FILE = "30-qconnect.policy"
OLD_POLICY = "# the user's own rule, kept byte for byte\nqubes.ConnectTCP +22 work vault deny\n"
UNITS = "home/user/.config/systemd/user"
UNIT = "qconnect-bind-127.0.0.1-8080-web-80.socket"


def qconnect(*args: str, env: dict[str, str] | None = None) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [sys.executable, "-m", "qconnect.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def allow(policy_dir: Path, port: int = 444) -> "subprocess.CompletedProcess[str]":
    return qconnect(
        "policy", "allow", "untrusted", "--port", str(port), "--target", "web",
        "--policy-dir", str(policy_dir),
    )  # fmt: skip


def persist_add(root: Path, spec: str = "8080:web:80") -> "subprocess.CompletedProcess[str]":
    return qconnect(
        "persist", "add", spec, "--root", str(root), "--user", "--relay", "handoff",
        env=persist_env(),
    )  # fmt: skip


def service_install(root: Path) -> "subprocess.CompletedProcess[str]":
    return qconnect("service", "install", "--socket", "--layout", "app-qube", "--root", str(root))


#: Each installer: the directory of the unit it writes, that unit, and how to run it.
INSTALLERS = {
    "persist": (UNITS, UNIT, persist_add),
    "service": ("usr/local/lib/systemd/system", "qconnect-connecttcp.socket", service_install),
}


def assert_one_line_error(result: "subprocess.CompletedProcess[str]") -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("qconnect: error:"), lines


def leftovers(directory: Path, keep: set[str]) -> list[str]:
    """Files other than ``keep``: a temporary file or a lock file left behind is a bug."""
    return sorted(name for name in os.listdir(directory) if name not in keep)


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def fill(directory: Path) -> None:
    """Write until the file system is full (ENOSPC)."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)


# -- the policy editor ----------------------------------------------------------------


def test_policy_refuses_to_write_through_a_planted_symlink(tmp_path: Path) -> None:
    policy_dir, victim = tmp_path / "policy.d", tmp_path / "victim"
    policy_dir.mkdir()
    victim.write_text(OLD_POLICY)
    (policy_dir / POLICY_FILE).symlink_to(victim)
    assert_one_line_error(allow(policy_dir))
    assert victim.read_text() == OLD_POLICY
    assert (policy_dir / POLICY_FILE).is_symlink()


def test_policy_in_a_read_only_directory_fails_cleanly(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "policy.d", "size=1m") as policy_dir:
        (policy_dir / POLICY_FILE).write_text(OLD_POLICY)
        remount_read_only(policy_dir)
        assert_one_line_error(allow(policy_dir))
        assert (policy_dir / POLICY_FILE).read_text() == OLD_POLICY
        assert leftovers(policy_dir, {POLICY_FILE}) == []


def test_policy_on_a_full_disk_keeps_the_old_file(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "policy.d", "size=64k") as policy_dir:
        (policy_dir / POLICY_FILE).write_text(OLD_POLICY)
        fill(policy_dir)
        assert_one_line_error(allow(policy_dir))
        assert (policy_dir / POLICY_FILE).read_text() == OLD_POLICY
        assert leftovers(policy_dir, {POLICY_FILE, "filler"}) == []


def test_two_policy_writers_at_once_both_land(tmp_path: Path) -> None:
    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir()
    (policy_dir / POLICY_FILE).write_text(OLD_POLICY)
    ports = range(1000, 1008)
    argv = [sys.executable, "-m", "qconnect.cli", "policy", "allow", "untrusted", "--target", "web"]
    writers = [
        subprocess.Popen(
            [*argv, "--port", str(port), "--policy-dir", str(policy_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for port in ports
    ]
    for writer in writers:
        _, stderr = writer.communicate(timeout=60)
        assert writer.returncode == 0, stderr
    text = (policy_dir / POLICY_FILE).read_text()
    assert text.startswith(OLD_POLICY)
    for port in ports:
        assert f"+{port} untrusted web allow" in " ".join(text.split())
    assert qconnect("policy", "lint", "--policy-dir", str(policy_dir)).returncode == 0
    assert leftovers(policy_dir, {POLICY_FILE}) == []


# -- the installers (one engine) ---------------------------------------------------------


@pytest.mark.parametrize("installer", sorted(INSTALLERS))
def test_an_installer_refuses_to_write_through_a_planted_symlink(
    tmp_path: Path, installer: str
) -> None:
    units_dir, unit, install = INSTALLERS[installer]
    root = make_qube_tree(tmp_path / "qube")
    units, victim = root / units_dir, tmp_path / "victim"
    units.mkdir(parents=True, exist_ok=True)
    victim.write_text("[Unit]\nDescription=the user's own\n")
    (units / unit).symlink_to(victim)
    assert_one_line_error(install(root))
    assert victim.read_text() == "[Unit]\nDescription=the user's own\n"
    assert (units / unit).is_symlink()


@pytest.mark.parametrize("installer", sorted(INSTALLERS))
def test_an_installer_in_a_read_only_directory_fails_cleanly_and_writes_nothing(
    tmp_path: Path, installer: str
) -> None:
    units_dir, _unit, install = INSTALLERS[installer]
    root = make_qube_tree(tmp_path / "qube")
    with tmpfs(root / units_dir, "size=1m") as units:
        remount_read_only(units)
        before = snapshot(root)
        assert_one_line_error(install(root))
        assert os.listdir(units) == []
        assert snapshot(root) == before


@pytest.mark.parametrize("installer", sorted(INSTALLERS))
def test_an_installer_on_a_full_disk_leaves_nothing_half_written(
    tmp_path: Path, installer: str
) -> None:
    units_dir, _unit, install = INSTALLERS[installer]
    root = make_qube_tree(tmp_path / "qube")
    with tmpfs(root / units_dir, "size=64k") as units:
        fill(units)
        before = snapshot(root)
        assert_one_line_error(install(root))
        assert leftovers(units, {"filler"}) == []
        assert snapshot(root) == before


def test_two_persist_writers_at_once_both_land_or_one_says_why(tmp_path: Path) -> None:
    root = make_qube_tree(tmp_path / "qube")
    specs = [f"{8080 + index}:web:80" for index in range(4)]
    argv = [sys.executable, "-m", "qconnect.cli", "persist", "add"]
    writers = [
        subprocess.Popen(
            [*argv, spec, "--root", str(root), "--user", "--relay", "handoff"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=persist_env(),
        )
        for spec in specs
    ]
    landed = 0
    for writer in writers:
        _, stderr = writer.communicate(timeout=60)
        if writer.returncode == 0:
            landed += 1
        else:
            assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    listing = qconnect("persist", "list", "--root", str(root), env=persist_env())
    assert listing.returncode == 0, listing.stderr
    assert sum(f"{8080 + index}:web:80" in listing.stdout for index in range(4)) == landed
    assert landed >= 1
