"""Data files are found in the source tree, and in share/qconnect after a wheel install."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from qconnect.core.resources import SOURCE_ROOT, data_path


def test_source_tree_files_are_found_first() -> None:
    assert data_path("systemd-units") == SOURCE_ROOT / "systemd-units"
    assert data_path("rpc-services", "qubes.ConnectTCP").is_file()


def test_installed_copy_is_used_when_the_source_tree_has_none(tmp_path: Path) -> None:
    installed = tmp_path / "share" / "qconnect" / "extra-dir"
    installed.mkdir(parents=True)
    assert data_path("extra-dir", prefix=str(tmp_path)) == installed
    assert data_path("missing", prefix=str(tmp_path)) == SOURCE_ROOT / "missing"


# What a build from a copy of the checkout leaves out: the venv, the VCS, caches
# and earlier build output (setuptools writes build/ and *.egg-info next to
# the pyproject.toml it builds, so the build runs on a copy, never in place).
_NOT_SOURCE = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


def test_wheel_ships_the_service_every_unit_template_and_the_license(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(SOURCE_ROOT, source, ignore=_NOT_SOURCE)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("qconnect-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = {name.split(".data/data/", 1)[1] for name in names if ".data/data/" in name}
    templates = {
        f"share/qconnect/systemd-units/{p.name}"
        for p in (SOURCE_ROOT / "systemd-units").glob("*.in")
    }
    assert templates and templates <= data
    assert "share/qconnect/rpc-services/qubes.ConnectTCP" in data
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: GPL-2.0-or-later" in metadata.splitlines()
