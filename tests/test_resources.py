"""Data files are found in the source tree, and in share/qconnect after a wheel install."""

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


def test_wheel_ships_the_service_and_every_unit_template(tmp_path: Path) -> None:
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
            str(SOURCE_ROOT),
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
