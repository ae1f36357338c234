"""A policy rule and its action as value objects that render back to the text they came from.

Parameters are kept as written (``None`` when absent), so that rendering a
parsed rule gives the same line, while ``effective_*`` properties give what
dom0 applies when a parameter is absent (deny notifies, allow and ask do not;
autostart is on).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

from qconnect.core.errors import PolicyError
from qconnect.policy.tokens import Token


def _one_line(words: Sequence[str]) -> str:
    """``words`` joined by spaces, refused unless dom0 splits the line back into exactly them.

    dom0 splits a policy line with ``str.split()`` (any Unicode whitespace)
    and a file into lines at ``\\n`` and ``\\r``, both whitespace too. A word
    that is empty or holds whitespace would change the rule, or add one; the
    command line checks every value first, so this is the last line of defence.
    """
    for word in words:
        if word.split() != [word]:
            raise PolicyError(f"refusing to write {word!r} into a policy line: not one word")
    return " ".join(words)


@dataclass(frozen=True)
class Location:
    """Where a rule was read: the file as shown to the user and the line (None: implicit)."""

    file: str
    line: int | None

    def __str__(self) -> str:
        return f"{self.file}:{self.line if self.line is not None else 'end'}"


def _params(*pairs: tuple[str, Token | str | bool | None]) -> list[str]:
    """``key=value`` words for the parameters given (None: absent), in dom0's spelling."""
    words = []
    for key, value in pairs:
        if isinstance(value, bool):
            words.append(f"{key}={'yes' if value else 'no'}")
        elif isinstance(value, Token):
            words.append(f"{key}={value.text}")
        elif value is not None:
            words.append(f"{key}={value}")
    return words


class _Running:
    """What allow and ask share: a call that runs, maybe starting its target."""

    notify: bool | None
    autostart: bool | None

    @property
    def effective_notify(self) -> bool:
        return bool(self.notify)

    @property
    def effective_autostart(self) -> bool:
        return True if self.autostart is None else self.autostart


@dataclass(frozen=True)
class Deny:
    """``deny [notify=yes|no]``."""

    notify: bool | None = None

    name = "deny"

    @property
    def effective_notify(self) -> bool:
        return True if self.notify is None else self.notify

    def params(self) -> list[str]:
        return _params(("notify", self.notify))


@dataclass(frozen=True)
class Allow(_Running):
    """``allow [target=Q] [user=U] [notify=yes|no] [autostart=yes|no]``."""

    target: Token | None = None
    user: str | None = None
    notify: bool | None = None
    autostart: bool | None = None

    name = "allow"

    def params(self) -> list[str]:
        return _params(
            ("target", self.target),
            ("user", self.user),
            ("notify", self.notify),
            ("autostart", self.autostart),
        )


@dataclass(frozen=True)
class Ask(_Running):
    """``ask [target=Q] [default_target=Q] [user=U] [notify=yes|no] [autostart=yes|no]``."""

    target: Token | None = None
    default_target: Token | None = None
    user: str | None = None
    notify: bool | None = None
    autostart: bool | None = None

    name = "ask"

    def params(self) -> list[str]:
        return _params(
            ("target", self.target),
            ("default_target", self.default_target),
            ("user", self.user),
            ("notify", self.notify),
            ("autostart", self.autostart),
        )


Action = Deny | Allow | Ask


@dataclass(frozen=True)
class Rule:
    """``SERVICE ARGUMENT SOURCE TARGET ACTION [PARAMS]``; ``None`` service/argument mean ``*``.

    ``location`` says where it was read and takes no part in equality, so a
    rule rendered and parsed again equals the original.
    """

    service: str | None
    argument: str | None
    source: Token
    target: Token
    action: Action
    location: Location | None = field(default=None, compare=False)

    def render(self) -> str:
        """The rule as one line of a new-format policy file."""
        words = [
            self.service if self.service is not None else "*",
            self.argument if self.argument is not None else "*",
            self.source.text,
            self.target.text,
            self.action.name,
            *self.action.params(),
        ]
        return _one_line(words)

    def render_legacy(self) -> str:
        """The rule as one line of an R4.0 file (``SOURCE TARGET ACTION[,PARAM...]``)."""
        return _one_line(
            [
                self.source.text,
                self.target.text,
                ",".join([self.action.name, *self.action.params()]),
            ]
        )

    def __str__(self) -> str:
        return self.render()
