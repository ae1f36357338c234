"""Plan, then apply all or nothing, undoing from snapshots: how every installer changes a tree.

An installer reads the tree and decides (pure decisions over what is on
disk) a :class:`Plan`: files to write, links to make, paths to delete.
:func:`apply` carries it out one step at a time, first snapshotting each
path it touches (its bytes and mode, or its link target, or its absence),
and on any failure puts every snapshot back and removes every directory it
created, so a failed command leaves the tree as it found it. The returned
:class:`Applied` can undo the whole plan later still, e.g. when systemd then
refuses to start what was installed.

Every path goes through a :class:`~qconnect.core.install.tree.Tree`, so nothing
outside the root is ever read, created, replaced or removed; the whole
read-plan-apply sequence runs under :meth:`Tree.locked`.
"""

import contextlib
import stat
from dataclasses import dataclass, field
from pathlib import Path

from qconnect.core.errors import QconnectError, TreeError
from qconnect.core.install.tree import Tree

#: Said after every failure of a plan: the undo has run.
_UNDONE = "; nothing was changed"


@dataclass(frozen=True)
class Write:
    """Write ``data`` at ``path`` with exactly ``mode``."""

    path: Path
    data: bytes
    mode: int
    what: str  #: said to the user: "wrote PATH (WHAT)"


@dataclass(frozen=True)
class Link:
    """Make ``path`` a symbolic link to ``target`` (stored as given, as the qube reads it)."""

    path: Path
    target: str


@dataclass(frozen=True)
class Delete:
    """Delete ``path`` (a link itself, never its target) if it is there."""

    path: Path


Step = Write | Link | Delete


@dataclass
class Plan:
    """The file changes one command makes, in order, and what to say about them."""

    steps: list[Step] = field(default_factory=list)
    #: Directories removed after the steps if they are then empty, deepest first.
    prune: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def changes_files(self) -> bool:
        return bool(self.steps)

    def drop(self, path: Path) -> None:
        """Forget every step already planned for ``path`` (a later step decides it)."""
        self.steps = [step for step in self.steps if step.path != path]


@dataclass(frozen=True)
class _Before:
    """A path's state before a step, to put it back on undo."""

    path: Path
    data: bytes | None = None
    mode: int = 0
    link: str | None = None


def _snapshot(tree: Tree, path: Path) -> _Before:
    info = tree.lstat(path)
    if info is None:
        return _Before(path)
    if stat.S_ISLNK(info.st_mode):
        return _Before(path, link=tree.readlink(path))
    return _Before(path, data=tree.read_bytes(path), mode=stat.S_IMODE(info.st_mode))


def _restore(tree: Tree, before: _Before) -> None:
    with contextlib.suppress(OSError, QconnectError):
        if before.link is not None or before.data is not None:
            # A directory pruned after the steps comes back with what was in it.
            tree.make_dirs(before.path.parent)
        if before.link is not None:
            tree.symlink(before.path, before.link)
        elif before.data is not None:
            if tree.readlink(before.path) is not None:
                tree.remove(before.path)
            tree.write(before.path, before.data, before.mode)
        else:
            tree.remove(before.path)


@dataclass
class Applied:
    """A plan carried out: what was done (for the user) and how to undo it."""

    tree: Tree
    report: list[str] = field(default_factory=list)
    _before: list[_Before] = field(default_factory=list)
    _created: list[Path] = field(default_factory=list)

    def undo(self) -> None:
        """Put every changed path back and remove the directories created (best effort)."""
        for before in reversed(self._before):
            _restore(self.tree, before)
        for directory in reversed(self._created):
            self.tree.rmdir(directory)
        self._before, self._created = [], []


def apply(tree: Tree, plan: Plan, error: type[QconnectError]) -> Applied:
    """Carry out ``plan``'s steps in ``tree`` all or nothing.

    Error handling: the first failing step raises ``error`` (a TreeError
    stays a TreeError: the tree itself is hostile or broken), its message
    ending in "; nothing was changed", after every earlier step and every
    directory created has been undone.
    """
    applied = Applied(tree)
    try:
        for step in plan.steps:
            _apply_step(tree, step, applied)
    except TreeError as failure:
        applied.undo()
        raise TreeError(f"{failure}{_UNDONE}") from None
    except QconnectError as failure:
        applied.undo()
        raise error(f"{failure}{_UNDONE}") from None
    except BaseException:
        applied.undo()
        raise
    for directory in plan.prune:
        tree.rmdir(directory)
    return applied


def _apply_step(tree: Tree, step: Step, applied: Applied) -> None:
    if not isinstance(step, Delete):
        tree.make_dirs(step.path.parent, applied._created)
    applied._before.append(_snapshot(tree, step.path))
    if isinstance(step, Write):
        tree.write(step.path, step.data, step.mode)
        applied.report.append(f"wrote {step.path} ({step.what})")
    elif isinstance(step, Link):
        tree.symlink(step.path, step.target)
        applied.report.append(f"linked {step.path} -> {step.target}")
    else:
        tree.remove(step.path)
        applied.report.append(f"removed {step.path}")
