"""Problems in a policy: what dom0 refuses, and rules that can never decide anything.

dom0 stops at the first error and then refuses every call; lint goes on and
reports them all, each with FILE:LINE. It also finds rules *shadowed* by an
earlier rule that matches every call they match (first match wins, so the
later rule has no effect), and, given the qubes, names that match no qube.

Shadowing is judged conservatively: only when the earlier rule certainly
covers the later one (same or wider service, argument, source and target),
so every reported shadow is real.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qconnect.core.errors import PolicyError
from qconnect.core.printable import printable
from qconnect.policy import legacy
from qconnect.policy.loader import (
    POLICY_SUFFIX,
    Policy,
    invalid_file_name,
    load_legacy_policy,
    load_policy,
)
from qconnect.policy.parser import parse_text
from qconnect.policy.rules import Allow, Ask, Location, Rule
from qconnect.policy.system_info import SystemInfo, is_dom0
from qconnect.policy.tokens import (
    AdminVM,
    AnyVM,
    DefaultVM,
    DispVM,
    DispVMTag,
    DispVMTemplate,
    QubeName,
    TagVM,
    Token,
    TokenError,
    TypeVM,
    Wildcard,
    check_value,
)

# Tokens @anyvm always covers: they never designate dom0.
_NEVER_DOM0 = (DefaultVM, DispVM, DispVMTemplate, DispVMTag, AnyVM)


def covers(wide: Token, narrow: Token, system: SystemInfo | None = None) -> bool:
    """Whether ``wide`` certainly matches everything ``narrow`` matches."""
    if isinstance(wide, Wildcard) or wide == narrow:
        return True
    narrow_is_dom0 = isinstance(narrow, AdminVM) or (
        isinstance(narrow, QubeName) and is_dom0(narrow.name)
    )
    if isinstance(wide, AdminVM) or (isinstance(wide, QubeName) and is_dom0(wide.name)):
        return narrow_is_dom0
    if isinstance(wide, AnyVM):
        return isinstance(narrow, _NEVER_DOM0) or (
            isinstance(narrow, QubeName) and not narrow_is_dom0
        )
    if system is not None and isinstance(wide, TagVM | TypeVM) and isinstance(narrow, QubeName):
        return not narrow_is_dom0 and wide.match(narrow.name, system)
    if system is not None and isinstance(wide, DispVMTag) and isinstance(narrow, DispVMTemplate):
        return wide.match(narrow.text, system)
    return False


def covers_rule(wide: Rule, narrow: Rule, system: SystemInfo | None = None) -> bool:
    """Whether every call ``narrow`` matches is matched (and so decided) by ``wide`` first."""
    return (
        (wide.service is None or wide.service == narrow.service)
        and (wide.argument is None or wide.argument == narrow.argument)
        and covers(wide.source, narrow.source, system)
        and covers(wide.target, narrow.target, system)
    )


def shadowing_rule(
    rules: Iterable[Rule], rule: Rule, system: SystemInfo | None = None
) -> Rule | None:
    """The first of ``rules`` (those before ``rule``) that decides every call ``rule`` matches."""
    return next((earlier for earlier in rules if covers_rule(earlier, rule, system)), None)


@dataclass(frozen=True)
class Problem:
    """One finding, printed as ``FILE:LINE: message``.

    ``file`` and ``line`` are fields (None: not tied to a file, or to the
    whole file), taken from the rule or from the PolicyError's own fields,
    so sorting never depends on what a file name looks like.
    """

    file: str | None
    line: int | None
    message: str

    @classmethod
    def at(cls, location: Location | None, message: str) -> "Problem":
        if location is None:
            return cls(None, None, message)
        return cls(location.file, location.line, message)

    @property
    def where(self) -> str:
        if self.file is None:
            return ""
        return self.file if self.line is None else f"{self.file}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


def problem_from_error(error: PolicyError) -> Problem:
    """The finding a PolicyError stands for, at the file and line it carries."""
    return Problem(error.file, error.line, error.message)


def _rule_problems(rules: tuple[Rule, ...], system: SystemInfo | None) -> Iterator[Problem]:
    for index, rule in enumerate(rules):
        where = rule.location
        if rule.location is not None and rule.location.line is None:
            continue  # an implicit deny closing an R4.0 file: nothing to fix there
        shadow = shadowing_rule(rules[:index], rule, system)
        if shadow is not None:
            yield Problem.at(
                where,
                f"rule never matches: {shadow.location} ({printable(shadow.render())}) decides "
                "every call it covers first",
            )
        for column, token in _named_tokens(rule):
            if "#" in token.text:
                yield Problem.at(
                    where,
                    f"{column} {token.text!r} contains '#': dom0 reads it as a qube name, "
                    "not as a comment (comments start a line)",
                )
            elif not (isinstance(token, QubeName) and token.name.startswith("uuid:")):
                try:
                    check_value(token)
                except TokenError as error:
                    # dom0 accepts the line, but no qube can ever have such a name or tag.
                    yield Problem.at(where, f"{column} never matches: {error}")
        if isinstance(rule.source, DispVMTemplate):
            yield Problem.at(
                where, f"source {rule.source.text} never matches: callers are named qubes"
            )
        if system is not None:
            yield from _unknown_qubes(rule, where, system)


def _named_tokens(rule: Rule) -> list[tuple[str, Token]]:
    """Every token of ``rule`` with the column it stands in."""
    named: list[tuple[str, Token]] = [("source", rule.source), ("target", rule.target)]
    if isinstance(rule.action, Allow | Ask) and rule.action.target is not None:
        named.append(("target=", rule.action.target))
    if isinstance(rule.action, Ask) and rule.action.default_target is not None:
        named.append(("default_target=", rule.action.default_target))
    return named


def _unknown_qubes(rule: Rule, where: Location | None, system: SystemInfo) -> Iterator[Problem]:
    for column, token in _named_tokens(rule):
        name = token.name if isinstance(token, QubeName) else None
        if isinstance(token, DispVMTemplate):
            name = token.template
        if name is not None and not is_dom0(name) and name not in system:
            yield Problem.at(where, f"{column} {token.text!r} names no qube of this machine")


def lint_directory(
    directory: Path,
    *,
    system: SystemInfo | None = None,
    legacy_format: bool = False,
    legacy_dir: Path | None = None,
) -> tuple[list[Problem], Policy]:
    """Every problem of a policy directory (new format, or R4.0 with ``legacy_format``)."""
    errors: list[PolicyError] = []
    if legacy_format:
        policy = load_legacy_policy(directory, on_error=errors.append)
    else:
        policy = load_policy(directory, legacy_dir=legacy_dir, on_error=errors.append)
    problems = [problem_from_error(error) for error in errors]
    problems.extend(_rule_problems(policy.rules, system))
    return problems, policy


def lint_file(
    path: Path, *, system: SystemInfo | None = None, legacy_format: bool = False
) -> tuple[list[Problem], Policy]:
    """Every problem of one file, read on its own (its includes are not followed)."""
    errors: list[PolicyError] = []
    file = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not valid UTF-8"
        return [Problem(file, None, f"cannot read: {reason}")], Policy(())
    problems: list[Problem] = []
    rules: list[Rule] = []
    if legacy_format:
        service, argument = legacy.split_file_name(path.name)
        for entry in legacy.parse_legacy_text(
            text, file, service, argument, on_error=errors.append
        ):
            if isinstance(entry, Rule):
                rules.append(entry)
        if argument is not None:
            rules.extend(legacy.implicit_denies(service, argument, file))
    else:
        if path.suffix == POLICY_SUFFIX and invalid_file_name(path.name):
            problems.append(
                Problem(
                    file,
                    None,
                    f"invalid policy file name {path.name!r}: expected lowercase letters, "
                    "digits, '_', '.' or '-' (dom0 refuses every call while it is there)",
                )
            )
        elif path.suffix != POLICY_SUFFIX:
            problems.append(
                Problem(file, None, f"dom0 ignores {path.name!r}: policy files must end in .policy")
            )
        rules.extend(
            entry
            for entry in parse_text(text, file, on_error=errors.append)
            if isinstance(entry, Rule)
        )
    problems.extend(problem_from_error(error) for error in errors)
    policy = Policy(tuple(rules), (path,))
    problems.extend(_rule_problems(policy.rules, system))
    return problems, policy


def sort_problems(problems: list[Problem]) -> list[Problem]:
    """Stable order for output: by file, then line (implicit and unnumbered last)."""

    def key(problem: Problem) -> tuple[str, int]:
        # A problem of a whole file comes before that file's numbered lines.
        return (problem.file or "", problem.line if problem.line is not None else 0)

    return sorted(problems, key=key)
