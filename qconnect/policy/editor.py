"""Edits to the ConnectTCP rules this tool owns, checked against the whole directory first.

An edit is planned in memory (new text per file), the whole policy
directory is parsed *as it would be* after it, and only then written: a
change that would make dom0 refuse every call is refused instead. Writes
are atomic and serialized by a lock in the directory (``qconnect.core.atomic``).

Our rules live in our block (``fence``) of ``30-qconnect.policy`` (new
format) or of ``/etc/qubes-rpc/policy/qubes.ConnectTCP+PORT`` (R4.0). In the
block the newest command comes first, replacing an older rule for the same
argument, source and target, so the last command a user typed is the one
that decides.
"""

import contextlib
import difflib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qconnect.core.atomic import locked, remove_file, write_atomic
from qconnect.core.errors import PolicyError
from qconnect.core.fence import Fenced
from qconnect.core.printable import printable
from qconnect.core.qrexec import SERVICE
from qconnect.policy import fence, legacy
from qconnect.policy.lint import shadowing_rule
from qconnect.policy.loader import Overrides, Policy, load_legacy_policy, load_policy
from qconnect.policy.parser import parse_line
from qconnect.policy.rules import Location, Rule
from qconnect.policy.system_info import SystemInfo

#: The file our new-format rules go to: sorts before 35-compat and 90-default.
QCONNECT_FILE = "30-qconnect.policy"

# A policy file dom0 reads is world-readable and root-owned; a new one gets that mode.
NEW_FILE_MODE = 0o644


def rule_key(rule: Rule) -> tuple[str | None, str | None, str, str]:
    """Two rules with the same key compete for the same calls; a new one replaces the old."""
    return (rule.service, rule.argument, rule.source.text, rule.target.text)


@dataclass(frozen=True)
class Change:
    """One file's content before and after (None: absent)."""

    path: Path
    old: str | None
    new: str | None

    def diff(self) -> str:
        old = (self.old or "").splitlines(keepends=True)
        new = (self.new or "").splitlines(keepends=True)
        lines = difflib.unified_diff(
            old,
            new,
            fromfile=str(self.path) if self.old is not None else "/dev/null",
            tofile=str(self.path) if self.new is not None else "/dev/null",
        )
        return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


@dataclass(frozen=True)
class EditResult:
    """What an edit did (or, dry, would do)."""

    changes: tuple[Change, ...]
    added: tuple[Rule, ...] = ()
    replaced: tuple[Rule, ...] = ()
    removed: tuple[Rule, ...] = ()
    warnings: tuple[str, ...] = ()
    written: bool = False


class PolicyFormat(ABC):
    """Where our rules live and how they are written, parsed and loaded: R4.1+ or R4.0."""

    directory: Path

    @abstractmethod
    def file_for(self, rule: Rule) -> Path: ...

    @abstractmethod
    def managed_files(self, overrides: Overrides) -> list[Path]: ...

    @abstractmethod
    def render(self, rule: Rule) -> str: ...

    @abstractmethod
    def parse_body(self, body: Sequence[str], first_line: int, path: Path) -> list[Rule]: ...

    @abstractmethod
    def load(self, overrides: Overrides | None = None) -> Policy: ...

    def display(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.directory))
        except ValueError:
            return str(path)


@dataclass
class NewFormat(PolicyFormat):
    """``/etc/qubes/policy.d``: our rules in one file."""

    directory: Path
    file_name: str = QCONNECT_FILE
    legacy_dir: Path | None = None

    def file_for(self, rule: Rule) -> Path:
        return self.directory / self.file_name

    def managed_files(self, overrides: Overrides) -> list[Path]:
        return [self.directory / self.file_name]

    def render(self, rule: Rule) -> str:
        return rule.render()

    def parse_body(self, body: Sequence[str], first_line: int, path: Path) -> list[Rule]:
        rules = []
        for offset, line in enumerate(body):
            entry = parse_line(line, Location(self.display(path), first_line + offset))
            if entry is None:
                continue
            if not isinstance(entry, Rule):
                raise PolicyError(
                    "only rules belong between qconnect's markers",
                    file=self.display(path),
                    line=first_line + offset,
                )
            rules.append(entry)
        return rules

    def load(self, overrides: Overrides | None = None) -> Policy:
        return load_policy(self.directory, legacy_dir=self.legacy_dir, overrides=overrides)


@dataclass
class LegacyFormat(PolicyFormat):
    """``/etc/qubes-rpc/policy``: our rules in each ``SERVICE+ARG`` file."""

    directory: Path

    def file_for(self, rule: Rule) -> Path:
        assert rule.service is not None
        return self.directory / legacy.legacy_file_name(rule.service, rule.argument)

    def managed_files(self, overrides: Overrides) -> list[Path]:
        try:
            names = {path.name for path in self.directory.iterdir() if path.is_file()}
        except OSError:
            names = set()
        names |= {path.name for path in overrides if path.parent == self.directory}
        return [
            self.directory / name
            for name in sorted(names)
            if legacy.split_file_name(name)[0] == SERVICE
        ]

    def render(self, rule: Rule) -> str:
        return rule.render_legacy()

    def parse_body(self, body: Sequence[str], first_line: int, path: Path) -> list[Rule]:
        service, argument = legacy.split_file_name(path.name)
        padded = "\n" * (first_line - 1) + "\n".join(body)
        entries = legacy.parse_legacy_text(padded, self.display(path), service, argument)
        rules = [entry for entry in entries if isinstance(entry, Rule)]
        if len(rules) != len(entries):
            raise PolicyError(
                "only rules belong between qconnect's markers", file=self.display(path)
            )
        return rules

    def load(self, overrides: Overrides | None = None) -> Policy:
        return load_legacy_policy(self.directory, overrides=overrides)


@dataclass
class _Plan:
    """Texts being built for one edit: read once, changed in memory."""

    policy_format: PolicyFormat
    command: str
    texts: dict[Path, str | None] = field(default_factory=dict)
    originals: dict[Path, str | None] = field(default_factory=dict)

    def text(self, path: Path) -> str | None:
        if path not in self.texts:
            self.originals[path] = self.texts[path] = _read(path)
        return self.texts[path]

    def our_rules(self, path: Path) -> tuple[Fenced, list[Rule]]:
        text = self.text(path) or ""
        display = self.policy_format.display(path)
        fenced = fence.split(text, display)
        return fenced, self.policy_format.parse_body(fenced.body, fenced.body_first_line, path)

    def set_rules(self, path: Path, fenced: Fenced, rules: Sequence[Rule]) -> None:
        lines = [self.policy_format.render(rule) for rule in rules]
        original = self.originals.get(path)
        if not lines and (original is None or _only_ours(original)):
            self.texts[path] = None  # nothing of ours left in a file that was all ours
        else:
            self.texts[path] = fence.replace(fenced, lines, self.command)

    def changes(self) -> tuple[Change, ...]:
        return tuple(
            Change(path, self.originals[path], new)
            for path, new in self.texts.items()
            if new != self.originals[path]
        )


def _only_ours(text: str | None) -> bool:
    """Whether a file held nothing but our block (so removing the block removes the file)."""
    if text is None:
        return False
    fenced = fence.split(text, "")
    return fenced.present and not fenced.before and not fenced.after


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise PolicyError("not valid UTF-8; refusing to edit it", file=str(path)) from None
    except OSError as error:
        raise PolicyError(f"cannot read {path}: {error.strerror}") from None


def _remove_stale_temporaries(directory: Path, names: Iterator[str]) -> None:
    """Drop temporary files a killed writer left (dot-files, which dom0 ignores anyway)."""
    for name in names:
        for leftover in directory.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                os.unlink(leftover)


class PolicyEditor:
    """Adds and removes our ConnectTCP rules in one policy directory."""

    def __init__(self, policy_format: PolicyFormat, system: SystemInfo | None = None) -> None:
        self.format = policy_format
        self.system = system

    def add(self, rules: Sequence[Rule], *, command: str, dry_run: bool = False) -> EditResult:
        """Put ``rules`` first in our block(s), replacing our older rules with the same key."""

        def plan(p: _Plan) -> tuple[list[Rule], list[Rule], list[Rule]]:
            added: list[Rule] = []
            replaced: list[Rule] = []
            by_file: dict[Path, list[Rule]] = {}
            for rule in rules:
                by_file.setdefault(self.format.file_for(rule), []).append(rule)
            for path, new_rules in by_file.items():
                fenced, existing = p.our_rules(path)
                unique = list({rule_key(rule): rule for rule in reversed(new_rules)}.values())
                unique.reverse()
                new_keys = {rule_key(rule) for rule in unique}
                kept = [rule for rule in existing if rule_key(rule) not in new_keys]
                replaced.extend(rule for rule in existing if rule_key(rule) in new_keys)
                added.extend(unique)
                p.set_rules(path, fenced, [*unique, *kept])
            return added, replaced, []

        return self._edit(plan, command=command, dry_run=dry_run)

    def remove(
        self, matches: Callable[[Rule], bool], *, command: str, dry_run: bool = False
    ) -> EditResult:
        """Drop our rules for which ``matches`` is true; rules outside our block stay."""

        def plan(p: _Plan) -> tuple[list[Rule], list[Rule], list[Rule]]:
            removed: list[Rule] = []
            for path in self.format.managed_files({}):
                if p.text(path) is None:
                    continue
                fenced, existing = p.our_rules(path)
                gone = [rule for rule in existing if matches(rule)]
                if gone:
                    removed.extend(gone)
                    p.set_rules(path, fenced, [rule for rule in existing if not matches(rule)])
            return [], [], removed

        return self._edit(plan, command=command, dry_run=dry_run)

    def managed(self) -> list[Rule]:
        """Our rules, in the order they stand."""
        p = _Plan(self.format, "")
        rules: list[Rule] = []
        for path in self.format.managed_files({}):
            if p.text(path) is not None:
                rules.extend(p.our_rules(path)[1])
        return rules

    def _edit(
        self,
        plan: Callable[[_Plan], tuple[list[Rule], list[Rule], list[Rule]]],
        *,
        command: str,
        dry_run: bool,
    ) -> EditResult:
        lock = contextlib.nullcontext() if dry_run else locked(self.format.directory)
        if not self.format.directory.is_dir():
            raise PolicyError(f"policy directory {self.format.directory} does not exist")
        with lock:
            p = _Plan(self.format, command)
            added, replaced, removed = plan(p)
            changes = p.changes()
            overrides = {change.path: change.new for change in changes}
            try:
                policy = self.format.load(overrides)
            except PolicyError as error:
                raise self._refusal(error) from None
            if not dry_run:
                _remove_stale_temporaries(
                    self.format.directory, (change.path.name for change in changes)
                )
                for change in changes:
                    if change.new is None:
                        remove_file(change.path)
                    else:
                        write_atomic(change.path, change.new, mode=NEW_FILE_MODE)
        warnings = tuple(self._shadow_warnings(policy, added))
        return EditResult(
            changes, tuple(added), tuple(replaced), tuple(removed), warnings, not dry_run
        )

    def _refusal(self, error: PolicyError) -> PolicyError:
        """Why an edit is refused: the policy is broken already, or the edit would break it."""
        try:
            self.format.load()
        except PolicyError:
            when = "does not parse now"
        else:
            when = "would not parse afterwards"
        return PolicyError(f"refusing the edit, the policy {when}: {error}")

    def _shadow_warnings(self, policy: Policy, added: Sequence[Rule]) -> Iterator[str]:
        rules = policy.rules
        for rule in added:
            display = self.format.display(self.format.file_for(rule))
            index = next(
                (
                    i
                    for i, placed in enumerate(rules)
                    if placed == rule and placed.location and placed.location.file == display
                ),
                None,
            )
            if index is None:
                continue
            shadow = shadowing_rule(rules[:index], rule, self.system)
            if shadow is not None:
                yield (
                    f"{rules[index].location}: the new rule never matches: {shadow.location} "
                    f"({printable(shadow.render())}) comes first and decides every call it covers"
                )
