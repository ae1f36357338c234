"""Nothing outside --root is ever created, replaced or removed, whatever the tree holds.

The class test plants a symbolic link at every component of every path each
installer writes or removes (to a directory and to a file outside the root),
runs the installer and its removal, and compares a sentinel tree outside the
root byte for byte. Then hostile manifests: absolute, ``..`` and unknown paths.
"""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from qconnect.cli import main
from qconnect.core.errors import TreeError
from qconnect.core.install.tree import Tree
from tests.persist_tree import QUBE_HOME, make_qube_tree, snapshot

INSTALLERS = {
    "persist-user": ["persist", "add", "8080:web:80", "--user", "--relay", "handoff"],
    "persist-rc-local": ["persist", "add", "444::444", "--system", "--relay", "handoff",
                         "--persistence", "rw-only"],
    "persist-enabled": ["persist", "add", "445::445", "--system", "--relay", "handoff",
                        "--persistence", "full"],
    "persist-daemon": ["persist", "add", "9000:web:90", "--user", "--mode", "daemon",
                       "--qvm-connect-tcp", "/usr/bin/true"],
    "service-app-qube": ["service", "install", "--socket", "--layout", "app-qube"],
    "service-template": ["service", "install", "--socket", "--layout", "template"],
}  # fmt: skip
REMOVERS = {"persist": ["persist", "remove", "--all"], "service": ["service", "uninstall"]}


@pytest.fixture(autouse=True)
def _qube_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", QUBE_HOME)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    # Hundreds of installs: where bytes go is under test here, not when they reach the disk.
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def run(argv: list[str], root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run one qconnect command in this process on ``root``: (exit status, stderr)."""
    capsys.readouterr()
    status = main([*argv, "--root", str(root)])
    return status, capsys.readouterr().err


def outside_world(base: Path) -> Path:
    """A sentinel tree outside every root: a directory with a file, and a lone file."""
    outside = base / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "dir" / "precious").write_text("keep me\n")
    (outside / "file").write_text("keep me too\n")
    return outside


def components(root: Path, before: dict[str, object]) -> list[str]:
    """Every component (as a path under ``root``) of every path an install made or changed."""
    after = snapshot(root)
    changed = {path for path, state in after.items() if before.get(path) != state}
    return sorted({str(Path(*Path(path).parts[:n])) for path in changed
                   for n in range(1, len(Path(path).parts) + 1)})  # fmt: skip


def plant(root: Path, component: str, target: Path) -> None:
    """Replace ``component`` under ``root`` (whatever is there, if anything) by a link."""
    path = root / component
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def assert_refused_or_harmless(status: int, err: str, component: str, final: bool) -> None:
    """A link on the way to a path: one line, exit 1.

    A link in place of a last component is never followed, so it is only
    "not ours": left alone (0), or the request refused as for any file that
    is not ours (one line).
    """
    assert "Traceback" not in err
    if final and status in (0, 2):
        assert status == 0 or len(err.strip().splitlines()) == 1, (component, err)
        return
    assert status == 1, (component, status, err)
    assert len(err.strip().splitlines()) == 1, (component, err)


def each_planted_tree(
    tmp_path: Path, make: Callable[[Path], None], installer: str
) -> list[tuple[Path, str, Path, bool]]:
    """(root, component, link target, whether it is a last component) for every plant."""
    probe = make_qube_tree(tmp_path / "probe")
    before = snapshot(probe)
    make(probe)
    touched = components(probe, before)
    finals = {path for path in snapshot(probe) if path in touched and not (probe / path).is_dir()}
    outside = outside_world(tmp_path)
    cases = []
    for number, component in enumerate(touched):
        for kind, target in (("dir", outside / "dir"), ("file", outside / "file")):
            root = tmp_path / f"{installer}-{number}-{kind}"
            cases.append((root, component, target, component in finals))
    return cases


@pytest.mark.parametrize("installer", sorted(INSTALLERS))
def test_no_installer_writes_through_a_link_planted_on_its_paths(
    tmp_path: Path, installer: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = INSTALLERS[installer]

    def install(root: Path) -> None:
        assert run(argv, root, capsys)[0] == 0

    outside = tmp_path / "outside"
    for root, component, target, final in each_planted_tree(tmp_path, install, installer):
        make_qube_tree(root)
        plant(root, component, target)
        sentinel = snapshot(outside)
        status, err = run(argv, root, capsys)
        assert snapshot(outside) == sentinel, component
        assert_refused_or_harmless(status, err, component, final)
        shutil.rmtree(root)


@pytest.mark.parametrize("installer", sorted(INSTALLERS))
def test_no_removal_deletes_through_a_link_planted_on_its_paths(
    tmp_path: Path, installer: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Installed first, then a component is swapped for a link: reinstall and remove stay in."""
    argv = INSTALLERS[installer]
    remover = REMOVERS[installer.split("-")[0]]

    def install(root: Path) -> None:
        assert run(argv, root, capsys)[0] == 0

    outside = tmp_path / "outside"
    for root, component, target, final in each_planted_tree(tmp_path, install, installer):
        for command in (argv, remover):
            make_qube_tree(root)
            install(root)
            plant(root, component, target)
            sentinel = snapshot(outside)
            status, err = run(command, root, capsys)
            assert snapshot(outside) == sentinel, (component, command)
            assert_refused_or_harmless(status, err, component, final)
            shutil.rmtree(root)


HOSTILE_ENTRIES = [
    "/etc/passwd",
    "../outside/file",
    "usr/local/etc/qconnect/../../../../outside/file",
    "home/user/.bashrc",
    "usr/local/etc/qubes-rpc",
    "",
]


@pytest.mark.parametrize("field", ["files", "links", "directories"])
@pytest.mark.parametrize("entry", HOSTILE_ENTRIES)
@pytest.mark.parametrize("command", ["install", "uninstall"])
def test_a_manifest_naming_what_is_not_ours_is_refused_whole(
    tmp_path: Path, field: str, entry: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if field == "directories" and entry == "usr/local/etc/qubes-rpc":
        pytest.skip("a directory the installer does make")
    outside = outside_world(tmp_path)
    root = make_qube_tree(tmp_path / "qube")
    (root / "home/user/.bashrc").write_text("the user's\n")
    argv = INSTALLERS["service-app-qube"]
    assert run(argv, root, capsys)[0] == 0
    manifest_path = root / "usr/local/etc/qconnect/service-install.json"
    manifest = json.loads(manifest_path.read_text())
    if field == "links":
        manifest["links"][entry] = "/outside"
    else:
        manifest[field].append(entry)
    manifest_path.write_text(json.dumps(manifest))
    inside, sentinel = snapshot(root), snapshot(outside)
    status, err = run(argv if command == "install" else ["service", "uninstall"], root, capsys)
    assert (status, len(err.strip().splitlines())) == (1, 1), err
    assert "refusing the manifest" in err and "Traceback" not in err
    assert snapshot(root) == inside
    assert snapshot(outside) == sentinel


@pytest.mark.parametrize(
    "manifest",
    [
        "[]",
        '{"form": "socket", "files": "usr/local/etc/qubes-rpc/qubes.ConnectTCP"}',
        '{"form": "socket", "links": ["run/qubes-rpc/qubes.ConnectTCP"]}',
        '{"form": "../../x"}',
        '{"form": "socket", "layout": ["app-qube"]}',
        '{"form": "socket", "files": [["usr"]]}',
        '{"form": "socket", "links": {"run/qubes-rpc/qubes.ConnectTCP": 7}}',
        '{"form": "socket", "extra": 1}',
        "not json",
    ],
)
def test_a_malformed_manifest_is_one_line_and_changes_nothing(
    tmp_path: Path, manifest: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_qube_tree(tmp_path / "qube")
    path = root / "usr/local/etc/qconnect/service-install.json"
    path.parent.mkdir(parents=True)
    path.write_text(manifest)
    inside = snapshot(root)
    status, err = run(["service", "uninstall"], root, capsys)
    assert status in (1, 2) and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "service-install.json" in err
    assert snapshot(root) == inside


# --- the tree itself -------------------------------------------------------------------


def test_links_inside_the_tree_are_followed_and_links_out_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "rw/usrlocal").mkdir(parents=True)
    (root / "usr").mkdir()
    (root / "usr/local").symlink_to("../rw/usrlocal")  # relative, stays inside
    (root / "etc").symlink_to(str(root / "rw"))  # absolute, names a place inside the root
    (root / "opt").symlink_to("/tmp")  # absolute, outside
    (root / "srv").symlink_to("../../..")  # relative, climbs out
    tree = Tree(root)
    tree.make_dirs(root / "usr/local/lib")
    tree.write(root / "usr/local/lib/a", b"x", 0o644)
    assert (root / "rw/usrlocal/lib/a").read_bytes() == b"x"
    tree.write(root / "etc/b", b"y", 0o600)
    assert (root / "rw/b").read_bytes() == b"y"
    for path in ("opt/x", "srv/x", "opt/sub/x"):
        with pytest.raises(TreeError, match="refusing"):
            tree.write(root / path, b"z", 0o644)
        with pytest.raises(TreeError, match="refusing"):
            tree.make_dirs(root / path)
        with pytest.raises(TreeError, match="refusing"):
            tree.remove(root / path)
    with pytest.raises(TreeError, match="not under"):
        tree.write(tmp_path / "elsewhere", b"z", 0o644)
    with pytest.raises(TreeError, match=r"'\.\.'"):
        tree.remove(root / "usr/../../elsewhere")


def test_a_link_loop_is_refused_in_one_line(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("a")
    with pytest.raises(TreeError, match="too many symbolic links"):
        Tree(root).make_dirs(root / "a/c")


def test_the_last_component_is_never_followed(tmp_path: Path) -> None:
    outside = outside_world(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside / "file")
    tree = Tree(root)
    with pytest.raises(TreeError, match="symbolic link"):
        tree.read_bytes(root / "link")
    with pytest.raises(TreeError, match="symbolic link"):
        tree.write(root / "link", b"x", 0o644)
    assert tree.remove(root / "link")
    assert (outside / "file").read_text() == "keep me too\n"
