"""The qube tokens of a policy rule, one small class per kind, each knowing how it matches.

A rule names qubes in three places: its SOURCE column, its TARGET column and
the ``target=``/``default_target=`` parameters (a *redirect*). Not every
token is allowed everywhere (``@default`` only as a target, ``@dispvm`` never
as a source...); each class lists where it may appear, as qrexec's own
parser does by inheritance.

``match(other, ...)`` compares the token with what a call supplies: for a
source, the calling qube's name; for a target, the *intended target*, which is
a qube name (or ``uuid:UUID``), ``@default``, ``@adminvm``, ``@dispvm`` or
``@dispvm:NAME`` (see ``evaluate.intended_target``).

Two grammars: dom0's parser (qubes-core-qrexec ``qrexec/policy/parser.py``,
``VMToken.__new__``) checks only the keyword and that a prefix has a value; a
tag or a qube name with any other characters is accepted and simply never
matches. Reading a file, we accept what dom0 accepts (``strict=False``), so
our view of a policy is dom0's. Writing one, every value must also be in
Qubes' own character set for it (``strict=True``, the default): nothing a
command line carries can then add a word, a line or a control character to a
policy file.
"""

import enum
import string
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from qconnect.core.qrexec import is_valid_qube_name
from qconnect.policy.system_info import QubeInfo, SystemInfo, is_dom0

# What qubesd accepts in a tag (qubes-core-admin, qubes/vm/__init__.py,
# Tags.validate_tag: letters, digits, '-' and '_', not empty). A qube's type is
# its class name (AppVM, DispVM, TemplateVM...); the same set covers them all.
TAG_CHARS = frozenset(string.ascii_letters + string.digits + "-_")
TYPE_CHARS = TAG_CHARS
_QUBE_NAME_RULE = "a letter, then up to 30 letters, digits, '_', '.' or '-'"


class Place(enum.Enum):
    """Where in a rule a token stands."""

    SOURCE = "source"
    TARGET = "target"
    REDIRECT = "redirect"


class TokenError(ValueError):
    """A token that is not valid where it stands; the parser adds file and line."""


class EvaluationFailure(Exception):
    """dom0's own evaluator fails on this token for this call, so dom0 refuses the call.

    qubes-core-qrexec raises (AttributeError, KeyError) rather than deciding in
    two corners of ``@dispvm:NAME``; the call is refused there, and so here.
    """


class Token(ABC):
    """A qube specification in a rule."""

    allowed: ClassVar[frozenset[Place]]

    @property
    @abstractmethod
    def text(self) -> str:
        """The token as written in a policy file."""

    @abstractmethod
    def match(self, other: str, system: SystemInfo, source: str | None = None) -> bool:
        """Whether this token covers ``other`` (a source name or an intended target)."""

    @abstractmethod
    def expand(self, system: SystemInfo) -> Iterator[str]:
        """Every concrete target this token stands for (the choices of an ``ask``)."""

    def __str__(self) -> str:
        return self.text


def _dispvm_template_of(source: str | None, system: SystemInfo) -> str | None:
    """The template a ``@dispvm`` call from ``source`` starts a disposable of."""
    qube = system.lookup(source) if source is not None else None
    return qube.default_dispvm if qube is not None else None


@dataclass(frozen=True)
class QubeName(Token):
    """A qube by name (or ``uuid:UUID``); ``dom0`` also matches ``@adminvm``."""

    name: str
    allowed: ClassVar[frozenset[Place]] = frozenset(Place)

    @property
    def text(self) -> str:
        return self.name

    def match(self, other: str, system: SystemInfo, source: str | None = None) -> bool:
        if is_dom0(self.name):
            return is_dom0(other)
        return system.canonical(self.name) == system.canonical(other)

    def expand(self, system: SystemInfo) -> Iterator[str]:
        qube = system.lookup(self.name)
        if qube is not None:
            yield qube.name


@dataclass(frozen=True)
class Wildcard(Token):
    """``*``: every qube, dom0 included, and every keyword target."""

    allowed: ClassVar[frozenset[Place]] = frozenset({Place.SOURCE, Place.TARGET})

    @property
    def text(self) -> str:
        return "*"

    def match(self, other: str, system: SystemInfo, source: str | None = None) -> bool:
        return True

    def expand(self, system: SystemInfo) -> Iterator[str]:
        for qube in system:
            yield qube.name
            if qube.template_for_dispvms:
                yield f"@dispvm:{qube.name}"
        yield "@dispvm"


@dataclass(frozen=True)
class AnyVM(Token):
    """``@anyvm``: everything ``*`` covers except dom0 (including ``@default`` calls)."""

    allowed: ClassVar[frozenset[Place]] = frozenset({Place.SOURCE, Place.TARGET})

    @property
    def text(self) -> str:
        return "@anyvm"

    def match(self, other: str, system: SystemInfo, source: str | None = None) -> bool:
        return not is_dom0(other)

    def expand(self, system: SystemInfo) -> Iterator[str]:
        for qube in system:
            if not is_dom0(qube.name):
                yield qube.name
            if qube.template_for_dispvms:
                yield f"@dispvm:{qube.name}"
        yield "@dispvm"


@dataclass(frozen=True)
class AdminVM(Token):
    """``@adminvm``: dom0."""

    allowed: ClassVar[frozenset[Place]] = frozenset(Place)

    @property
    def text(self) -> str:
        return "@adminvm"

    def match(self, other: str, system: SystemInfo, source: str | None = None) -> bool:
        return is_dom0(other)

    def expand(self, system: SystemInfo) -> Iterator[str]:
        yield "@adminvm"


@dataclass(frozen=True)
class DefaultVM(Token):
    """``@default``: only a call that named no target (or a qube that does not exist)."""

    allowed: ClassVar[frozenset[Place]] = frozenset({Place.TARGET})

    @property
    def text(self) -> str:
        return "@default"

    def match(self, other: str, system: SystemInfo, source: str | None = None) -> bool:
        return other == "@default"

    def expand(self, system: SystemInfo) -> Iterator[str]:
        yield from ()


class _QubeProperty(Token):
    """A token naming the qubes that have some property (a type, a tag)."""

    @abstractmethod
    def has_property(self, qube: QubeInfo) -> bool: ...

    def match(self, other: str, system: SystemInfo, source: str | None = None) -> bool:
        qube = None if other.startswith("@") else system.lookup(other)
        return qube is not None and self.has_property(qube)

    def expand(self, system: SystemInfo) -> Iterator[str]:
        yield from (qube.name for qube in system if self.has_property(qube))


@dataclass(frozen=True)
class TypeVM(_QubeProperty):
    """``@type:TYPE``: qubes of that class (``AppVM``, ``AdminVM``...)."""

    type_name: str
    allowed: ClassVar[frozenset[Place]] = frozenset({Place.SOURCE, Place.TARGET})
    prefix: ClassVar[str] = "@type:"

    @property
    def text(self) -> str:
        return self.prefix + self.type_name

    def has_property(self, qube: QubeInfo) -> bool:
        return qube.type == self.type_name


@dataclass(frozen=True)
class TagVM(_QubeProperty):
    """``@tag:TAG``: qubes carrying that tag."""

    tag: str
    allowed: ClassVar[frozenset[Place]] = frozenset({Place.SOURCE, Place.TARGET})
    prefix: ClassVar[str] = "@tag:"

    @property
    def text(self) -> str:
        return self.prefix + self.tag

    def has_property(self, qube: QubeInfo) -> bool:
        return self.tag in qube.tags


@dataclass(frozen=True)
class DispVM(Token):
    """``@dispvm``: a new disposable of the caller's ``default_dispvm``."""

    allowed: ClassVar[frozenset[Place]] = frozenset({Place.TARGET, Place.REDIRECT})

    @property
    def text(self) -> str:
        return "@dispvm"

    def match(self, other: str, system: SystemInfo, source: str | None = None) -> bool:
        return other == "@dispvm"

    def expand(self, system: SystemInfo) -> Iterator[str]:
        yield "@dispvm"


@dataclass(frozen=True)
class DispVMTemplate(Token):
    """``@dispvm:NAME``: a new disposable of template NAME; also a ``@dispvm`` call
    whose caller's ``default_dispvm`` is NAME."""

    template: str
    allowed: ClassVar[frozenset[Place]] = frozenset(Place)
    prefix: ClassVar[str] = "@dispvm:"

    @property
    def text(self) -> str:
        return self.prefix + self.template

    def match(self, other: str, system: SystemInfo, source: str | None = None) -> bool:
        if other == "@dispvm" and source is not None:
            template = _dispvm_template_of(source, system)
            if template is None:
                raise EvaluationFailure(
                    f"{self.text} meets a @dispvm call from {source}, which has no default_dispvm"
                )
            # dom0 compares "@dispvm:" + default_dispvm with the rule's text as
            # plain strings here (match_strings only resolves a leading "uuid:"),
            # so a rule naming the template by uuid: does not match a @dispvm call.
            return template == self.template
        if not other.startswith(self.prefix):
            # A calling qube's name is never "@dispvm:...": as a source this
            # token matches nothing, exactly as in qrexec.
            return False
        return system.canonical(self.template) == system.canonical(other[len(self.prefix) :])

    def expand(self, system: SystemInfo) -> Iterator[str]:
        qube = system.lookup(self.template)
        if qube is None:
            raise EvaluationFailure(f"{self.text} names no qube, while collecting ask choices")
        if qube.template_for_dispvms:
            yield self.prefix + qube.name


@dataclass(frozen=True)
class DispVMTag(Token):
    """``@dispvm:@tag:TAG``: a new disposable of any template carrying TAG."""

    tag: str
    allowed: ClassVar[frozenset[Place]] = frozenset({Place.SOURCE, Place.TARGET})
    prefix: ClassVar[str] = "@dispvm:@tag:"

    @property
    def text(self) -> str:
        return self.prefix + self.tag

    def match(self, other: str, system: SystemInfo, source: str | None = None) -> bool:
        if other == "@dispvm":
            template = _dispvm_template_of(source, system)
        elif other.startswith("@dispvm:"):
            template = other[len("@dispvm:") :]
        else:
            return False
        if template is None:
            return False
        qube = system.lookup(template)
        if qube is None:
            # dom0 indexes its qubes by the template's name here and fails (KeyError).
            raise EvaluationFailure(f"{self.text} meets a call for {template!r}, no qube")
        return qube.template_for_dispvms and self.tag in qube.tags

    def expand(self, system: SystemInfo) -> Iterator[str]:
        for qube in system:
            if qube.template_for_dispvms and self.tag in qube.tags:
                yield f"@dispvm:{qube.name}"


# Keyword tokens by their exact text, and prefixed ones longest prefix first
# (so "@dispvm:@tag:" wins over "@dispvm:").
_EXACT: dict[str, Token] = {
    "*": Wildcard(),
    "@anyvm": AnyVM(),
    "@adminvm": AdminVM(),
    "@default": DefaultVM(),
    "@dispvm": DispVM(),
}
_PREFIXED: tuple[tuple[str, type[Token]], ...] = (
    (DispVMTag.prefix, DispVMTag),
    (DispVMTemplate.prefix, DispVMTemplate),
    (TypeVM.prefix, TypeVM),
    (TagVM.prefix, TagVM),
)


def _check_qube_name(text: str, name: str) -> None:
    if not (is_valid_qube_name(name) or is_dom0(name)):
        shown = "" if name == text else f" in {text!r}"
        raise TokenError(f"{name!r}{shown} is not a qube name: expected {_QUBE_NAME_RULE}")


def _check_word(text: str, value: str, what: str, allowed: frozenset[str]) -> None:
    bad = sorted(set(value) - allowed)
    if bad or not value:
        raise TokenError(
            f"{what} {value!r} in {text!r} has characters Qubes never puts in a {what} "
            f"({''.join(bad)!r}): expected letters, digits, '-' or '_'"
        )


def check_value(token: Token) -> None:
    """TokenError unless every value in ``token`` is in Qubes' own character set for it.

    Qube names follow qubes-core-admin's ``validate_name`` (``dom0`` and its
    ``uuid:`` form included), tags and types ``TAG_CHARS``. Keywords have no
    value. This is what makes a written token one word of printable ASCII.
    """
    if isinstance(token, QubeName):
        _check_qube_name(token.text, token.name)
    elif isinstance(token, DispVMTemplate):
        _check_qube_name(token.text, token.template)
    elif isinstance(token, TagVM | DispVMTag):
        _check_word(token.text, token.tag, "tag", TAG_CHARS)
    elif isinstance(token, TypeVM):
        _check_word(token.text, token.type_name, "type", TYPE_CHARS)


def parse_token(text: str, place: Place, *, strict: bool = True) -> Token:
    """The token ``text`` stands for in ``place``; TokenError says why it cannot stand there.

    ``strict`` (the default, for every value that is going to be written)
    also checks the value against Qubes' character set (``check_value``);
    ``strict=False`` is dom0's own grammar, for reading policy files.
    """
    what = place.value
    if not text:
        raise TokenError(f"empty {what} token")
    token: Token
    if text in _EXACT:
        token = _EXACT[text]
    elif not text.startswith("@"):
        token = QubeName(text)
    else:
        for prefix, token_class in _PREFIXED:
            if text.startswith(prefix):
                value = text[len(prefix) :]
                if not value:
                    raise TokenError(f"{what} token {text!r} has no name after {prefix!r}")
                if value.startswith("@"):
                    raise TokenError(f"invalid {what} token {text!r}")
                token = token_class(value)  # type: ignore[call-arg]
                break
        else:
            raise TokenError(
                f"invalid {what} token {text!r}: expected a qube name, *, @anyvm, @adminvm, "
                "@default, @dispvm, @dispvm:NAME, @tag:TAG or @type:TYPE"
            )
    if place not in token.allowed:
        raise TokenError(f"{text!r} cannot be a {what}")
    if strict:
        check_value(token)
    return token
