"""Atomic writes: readers see old or new, never a mix; symlinks are never written through."""

import os
import threading
from pathlib import Path

import pytest

from qconnect.core.atomic import locked, remove_file, write_atomic
from qconnect.core.errors import FileWriteError


def test_new_file_gets_content_and_mode(tmp_path: Path) -> None:
    target = tmp_path / "x.policy"
    write_atomic(target, "hello\n", mode=0o640)
    assert target.read_text() == "hello\n"
    assert target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["x.policy"]


def test_existing_file_keeps_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "x.policy"
    target.write_text("old\n")
    target.chmod(0o600)
    write_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert target.stat().st_mode & 0o777 == 0o600


def test_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "x.policy"
    link.symlink_to(victim)
    with pytest.raises(FileWriteError, match="symbolic link"):
        write_atomic(link, "evil\n")
    assert victim.read_text() == "precious\n"
    assert link.is_symlink()


def test_unwritable_directory_leaves_old_content(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores directory permissions; a missing directory fails the same way
        target = tmp_path / "missing" / "x.policy"
    else:
        target = tmp_path / "x.policy"
        target.write_text("old\n")
        tmp_path.chmod(0o500)
    try:
        with pytest.raises(FileWriteError, match="cannot write"):
            write_atomic(target, "new\n")
    finally:
        tmp_path.chmod(0o700)


def test_lock_serialises_writers(tmp_path: Path) -> None:
    target = tmp_path / "counter"
    target.write_text("0")

    def bump() -> None:
        for _ in range(50):
            with locked(tmp_path):
                value = int(target.read_text())
                write_atomic(target, str(value + 1))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert target.read_text() == "200"


def test_remove_file_reports_presence(tmp_path: Path) -> None:
    target = tmp_path / "gone"
    target.write_text("x")
    assert remove_file(target) is True
    assert remove_file(target) is False


def test_locking_the_directory_itself_leaves_no_file(tmp_path: Path) -> None:
    with locked(tmp_path):
        assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileWriteError, match="cannot lock"), locked(tmp_path / "absent"):
        pass
