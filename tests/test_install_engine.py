"""The install engine: a plan is applied all or nothing, and undone from its snapshots.

Every installer's transaction is this one, so the property is proved here once
for any plan: whichever step fails, the tree is afterwards exactly as before.
"""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qconnect.core.errors import PersistError, TreeError
from qconnect.core.install import engine
from qconnect.core.install.tree import Tree
from tests.persist_tree import snapshot

PATHS = ["f", "a/f", "a/b/f", "c/link", "d/e/new"]


def world(root: Path) -> None:
    """A tree with a file, a nested file, a link and nothing yet at d/."""
    (root / "a/b").mkdir(parents=True)
    (root / "a/f").write_text("old a/f\n")
    (root / "a/b/f").write_bytes(b"old a/b/f\n")
    (root / "a/b/f").chmod(0o600)
    (root / "c").mkdir()
    (root / "c/link").symlink_to("/somewhere")


steps = st.lists(
    st.tuples(st.sampled_from(["write", "link", "delete"]), st.sampled_from(PATHS)),
    min_size=1,
    max_size=6,
)


def plan_of(root: Path, chosen: list[tuple[str, str]]) -> engine.Plan:
    plan = engine.Plan()
    for number, (kind, relative) in enumerate(chosen):
        path = root / relative
        if kind == "write":
            plan.steps.append(engine.Write(path, f"new {number}\n".encode(), 0o640, "test"))
        elif kind == "link":
            plan.steps.append(engine.Link(path, f"target-{number}"))
        else:
            plan.steps.append(engine.Delete(path))
    return plan


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(chosen=steps, data=st.data())
def test_a_failure_at_any_step_leaves_the_tree_as_it_was(
    tmp_path_factory: pytest.TempPathFactory, chosen: list[tuple[str, str]], data: st.DataObject
) -> None:
    root = tmp_path_factory.mktemp("tree")
    world(root)
    before = snapshot(root)
    failing = data.draw(st.integers(0, len(chosen) - 1))
    tree = Tree(root)
    calls = {"count": 0, "failed": False}

    class Failing(Tree):
        """Fails the step numbered ``failing``; once anything failed, the undo runs clean."""

        def _count(self) -> None:
            calls["count"] += 1
            if calls["count"] == failing + 1 and not calls["failed"]:
                calls["failed"] = True
                raise TreeError("injected failure")

        def write(self, path: Path, data: bytes, mode: int) -> None:
            self._count()
            try:
                super().write(path, data, mode)
            except TreeError:
                calls["failed"] = True
                raise

        def symlink(self, path: Path, target: str) -> None:
            self._count()
            super().symlink(path, target)

        def remove(self, path: Path) -> bool:
            self._count()
            return super().remove(path)

    failing_tree = Failing(root)
    with pytest.raises(TreeError, match=r"(injected failure|symbolic link); nothing was changed"):
        engine.apply(failing_tree, plan_of(root, chosen), PersistError)
    assert snapshot(root) == before

    # Without the fault: done (and undone later), or refused (a write over a
    # link the plan made) and then, again, nothing changed.
    try:
        applied = engine.apply(tree, plan_of(root, chosen), PersistError)
    except TreeError as error:
        assert "symbolic link" in str(error)
    else:
        assert len(applied.report) == len(chosen)
        applied.undo()
    assert snapshot(root) == before


def test_a_refused_step_undoes_the_steps_before_it(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir/fifo").mkdir()
    plan = engine.Plan([engine.Write(tmp_path / "x", b"x", 0o644, "x")])
    plan.steps.append(engine.Write(tmp_path / "dir/fifo", b"x", 0o644, "not a file"))
    before = snapshot(tmp_path)
    with pytest.raises(TreeError, match="not a regular file; nothing was changed"):
        engine.apply(Tree(tmp_path), plan, PersistError)
    assert snapshot(tmp_path) == before
    assert not os.path.lexists(tmp_path / "x")


def test_prune_removes_only_empty_directories(tmp_path: Path) -> None:
    (tmp_path / "empty/inner").mkdir(parents=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full/keep").write_text("k")
    plan = engine.Plan(prune=[tmp_path / "empty/inner", tmp_path / "empty", tmp_path / "full"])
    engine.apply(Tree(tmp_path), plan, PersistError)
    assert not (tmp_path / "empty").exists() and (tmp_path / "full/keep").exists()


def test_undo_after_a_prune_brings_the_directory_back_with_its_files(tmp_path: Path) -> None:
    (tmp_path / "units").mkdir()
    (tmp_path / "units/a.socket").write_text("ours\n")
    before = snapshot(tmp_path)
    plan = engine.Plan([engine.Delete(tmp_path / "units/a.socket")], prune=[tmp_path / "units"])
    applied = engine.apply(Tree(tmp_path), plan, PersistError)
    assert not (tmp_path / "units").exists()
    applied.undo()  # e.g. systemd refused what came next
    assert snapshot(tmp_path) == before
