"""One qrexec call against the policy, decided as dom0 decides it.

The steps follow qubes-core-qrexec's ``qrexec/policy/parser.py``: ``Request``
reads the requested target as an ``IntendedTarget`` and ``verify``-s it (a
qube that does not exist becomes ``@default``; ``@dispvm:NAME`` must name a
disposable template; a word that is not an intended target at all is a
``PolicySyntaxError``), the first rule whose service, argument, source and
target all match decides, and nothing matching means deny. An ``allow`` can
still refuse: no target at all for a ``@default`` call, ``@dispvm`` without
a default disposable template, ``autostart=no`` towards a halted qube, or a
qube calling itself *by the same string* (``AllowResolution.execute``
compares ``request.source == target``, so a call to one's own ``uuid:`` is
allowed: we say so, and warn).

Before dom0's policy engine sees a target, the qube's ``qrexec-client-vm``
and dom0's ``qrexec-daemon`` rewrite it (``target_as_sent``): ``explain``
answers for what a qube types, ``evaluate`` for what the engine receives.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from qconnect.core.qrexec import sanitize_target
from qconnect.policy.loader import Policy, load_legacy_policy, load_policy
from qconnect.policy.rules import Allow, Ask, Deny, Rule
from qconnect.policy.system_info import SystemInfo, is_dom0
from qconnect.policy.tokens import EvaluationFailure, Token

# qrexec-client-vm copies TARGET into a 64-byte field with strncpy and a
# NUL kept at the end (qubes-core-qrexec agent/qrexec-client-vm.c,
# params.target_domain of MSG_TRIGGER_SERVICE4, libqrexec/qrexec.h): at most
# 63 bytes of what a qube types reach dom0.
TARGET_FIELD_BYTES = 63

# The words dom0's engine reads as an intended target besides qube names
# (parser.py: the IntendedTarget subclasses AdminVM, DefaultVM, DispVM and
# DispVMTemplate); any other "@..." word, and "*", is a PolicySyntaxError.
_INTENDED_KEYWORDS = frozenset({"@adminvm", "@default", "@dispvm"})
_DISPVM_PREFIX = "@dispvm:"


@dataclass(frozen=True)
class Call:
    """A call as dom0 receives it: ``source`` asks ``target`` for ``service`` with ``argument``."""

    source: str
    target: str
    service: str
    argument: str

    def describe(self) -> str:
        argument = self.argument if self.argument != "+" else ""
        return f"{self.service}{argument} {self.source} -> {self.target or '@default'}"


@dataclass(frozen=True)
class Resolution:
    """dom0's decision on one call.

    ``target`` is the qube that serves an allowed call (for ``ask``, the
    pre-selected ``default_target`` if any; for ``deny``, None). ``rule`` is
    ``FILE:LINE`` of the deciding rule, None when no rule matched.
    ``choices`` are the targets an ``ask`` offers.
    """

    action: str
    target: str | None
    rule: str | None
    user: str | None = None
    autostart: bool = False
    notify: bool = False
    reason: str = ""
    choices: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.action == "allow"


class _Refused(Exception):
    """A deny reached inside evaluation; carries the one-line reason."""

    def __init__(self, reason: str, *, notify: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.notify = notify


def target_as_sent(typed: str) -> str:
    """The target dom0's policy engine receives when a qube's call names ``typed``.

    qrexec-client-vm turns ``$`` into ``@`` (``convert_target_name_keyword``)
    and keeps the first 63 bytes; qrexec-daemon then replaces every byte
    outside ``[A-Za-z0-9_.-]`` and ``@:`` with ``_`` (``sanitize_name`` in
    daemon/qrexec-daemon.c, applied to every MSG_TRIGGER_SERVICE* target).
    So ``*`` arrives as ``_`` (no such qube: ``@default``), ``@tag:T`` as it is.
    """
    raw = typed.encode("utf-8", "surrogateescape")[:TARGET_FIELD_BYTES]
    # One character per byte, so that each byte of a multi-byte letter becomes one "_".
    return sanitize_target(raw.decode("latin-1"))


def intended_target(requested: str, system: SystemInfo) -> str:
    """The call's target as policy matching sees it, or _Refused with dom0's reason.

    As ``IntendedTarget(target).verify()`` in qrexec/policy/parser.py: empty
    means ``@default``; ``@adminvm``, ``@default`` and ``@dispvm`` stand as
    they are; ``@dispvm:NAME`` must name a disposable template (else
    ``AccessDenied``); any other keyword, and ``*``, is not an intended target
    (``PolicySyntaxError``: dom0 logs "error loading policy" and refuses
    without notifying). A name or ``uuid:UUID`` of no qube is read as
    ``@default``; an existing one is kept as written, ``uuid:`` included, as
    dom0 keeps it (matching resolves ``uuid:`` forms; the self-call check
    does not).
    """
    if requested in ("", "@default"):
        return "@default"
    if requested in _INTENDED_KEYWORDS:
        return requested
    if requested.startswith(_DISPVM_PREFIX):
        template_name = requested[len(_DISPVM_PREFIX) :]
        if not template_name:
            raise _Refused(
                f"dom0 refuses the target: invalid empty @dispvm: token: {requested!r}",
                notify=False,
            )
        if not template_name.startswith("@"):
            template = system.lookup(template_name)
            if template is None or not template.template_for_dispvms:
                raise _Refused(f"not a template for dispvm: {template_name}")
            return _DISPVM_PREFIX + template.name
    if requested.startswith("@") or requested == "*":
        raise _Refused(
            f"dom0 refuses the target: invalid intendedtarget token: {requested!r} "
            "(a call names a qube, uuid:UUID, @default, @adminvm, @dispvm or @dispvm:NAME)",
            notify=False,
        )
    if is_dom0(requested) or system.lookup(requested) is not None:
        return requested
    return "@default"


def served_qube(target: str, system: SystemInfo) -> str:
    """The name of the qube a resolved target designates (``uuid:`` forms resolved)."""
    if is_dom0(target):
        return "dom0"
    return system.canonical(target)


def _can_run_without_autostart(target: str, system: SystemInfo) -> bool:
    if is_dom0(target):
        return True
    if target.startswith("@dispvm"):
        return False
    qube = system.lookup(target)
    return qube is not None and qube.power_state == "Running"


def _rule_matches_but_target(rule: Rule, call: Call, system: SystemInfo) -> bool:
    return (
        (rule.service is None or rule.service == call.service)
        and (rule.argument is None or rule.argument == call.argument)
        and rule.source.match(call.source, system)
    )


def _expand_dispvm(target: str, source: str, system: SystemInfo) -> str | None:
    if target != "@dispvm":
        return target
    qube = system.lookup(source)
    if qube is None or qube.default_dispvm is None:
        return None
    return f"@dispvm:{qube.default_dispvm}"


def _allow(rule: Rule, action: Allow, call: Call, intended: str, system: SystemInfo) -> Resolution:
    where = str(rule.location)
    target = intended if action.target is None else _redirect(action.target, system, where)
    if target == "@default":
        raise _Refused(
            f"{where} allows the call but neither the caller nor the rule names a target"
        )
    if target == "@dispvm":
        expanded = _expand_dispvm(target, call.source, system)
        if expanded is None:
            raise _Refused(
                f"{where} allows the call to @dispvm but {call.source} has no default_dispvm"
            )
        target = expanded
    elif target == "@adminvm":
        target = "dom0"
    if not action.effective_autostart and not _can_run_without_autostart(target, system):
        raise _Refused(
            f"{where} says autostart=no and {target} is not running",
            notify=action.effective_notify,
        )
    # dom0 compares the strings (AllowResolution.execute: request.source == target).
    if target == call.source:
        raise _Refused(f"{where} would send {call.source}'s call to itself; qrexec refuses that")
    served = served_qube(target, system)
    warnings: tuple[str, ...] = ()
    if served == call.source:
        warnings = (
            f"{call.source} reaches itself through {target}: dom0's policy engine allows "
            "this, as its self-call check compares names and not the qubes they designate",
        )
    named = f" (named {target})" if served != target else ""
    redirected = intended != target and action.target is not None
    how = f" (redirected by target= from {intended})" if redirected else ""
    return Resolution(
        action="allow",
        target=served,
        rule=where,
        user=action.user,
        autostart=action.effective_autostart,
        notify=action.effective_notify,
        reason=f"allowed by {where}: {call.describe()} is served by {served}{named}{how}",
        warnings=warnings,
    )


def _redirect(token: Token, system: SystemInfo, where: str) -> str:
    """A ``target=`` value checked like a requested target (an unknown qube is no target)."""
    try:
        return intended_target(token.text, system)
    except _Refused as refusal:
        raise _Refused(f"{where}: target={token.text}: {refusal.reason}") from None


def collect_choices(policy: Policy, call: Call, system: SystemInfo) -> list[str]:
    """The targets an ``ask`` may offer: qrexec's ``collect_targets_for_ask``.

    Every rule for this service, argument and source contributes its target
    (or its ``target=``), later rules first so that an earlier ``deny`` removes
    what a later rule added.
    """
    choices: set[str] = set()
    for rule in reversed(policy.rules):
        if not _rule_matches_but_target(rule, call, system):
            continue
        redirect = getattr(rule.action, "target", None)
        token = redirect if isinstance(redirect, Token) else rule.target
        try:
            expansion = set(token.expand(system))
        except EvaluationFailure as failure:
            raise _Refused(f"{rule.location}: dom0's evaluator fails here: {failure}") from None
        if isinstance(rule.action, Deny):
            choices -= expansion
        else:
            choices |= expansion
    if "@dispvm" in choices:
        choices.discard("@dispvm")
        expanded = _expand_dispvm("@dispvm", call.source, system)
        if expanded is not None:
            choices.add(expanded)
    if "@adminvm" in choices:
        choices.discard("@adminvm")
        choices.add("dom0")
    choices.discard(call.source)
    for choice in list(choices):
        qube = system.lookup(choice.removeprefix("@dispvm:"))
        if qube is not None and qube.internal:
            choices.discard(choice)
    return sorted(choices)


def _ask(policy: Policy, rule: Rule, action: Ask, call: Call, system: SystemInfo) -> Resolution:
    where = str(rule.location)
    if action.target is not None:
        choices = ["dom0" if is_dom0(action.target.text) else action.target.text]
    else:
        choices = collect_choices(policy, call, system)
    if not action.effective_autostart:
        choices = [choice for choice in choices if _can_run_without_autostart(choice, system)]
    if not choices:
        raise _Refused(f"{where} says ask but offers no target to choose from")
    default: str | None = None
    if action.default_target is not None:
        default = action.default_target.text
        if default == "@dispvm":
            default = _expand_dispvm(default, call.source, system)
        elif is_dom0(default):
            default = "dom0"
        if default not in choices:
            default = None
    preselected = f", {default} preselected" if default else ""
    return Resolution(
        action="ask",
        target=default,
        rule=where,
        user=action.user,
        autostart=action.effective_autostart,
        notify=action.effective_notify,
        reason=(
            f"{where} asks the user: {call.describe()} may go to "
            f"{' or '.join(choices)}{preselected}"
        ),
        choices=tuple(choices),
    )


def _target_matches(rule: Rule, intended: str, call: Call, system: SystemInfo) -> bool:
    try:
        return rule.target.match(intended, system, call.source)
    except EvaluationFailure as failure:
        raise _Refused(f"{rule.location}: dom0's evaluator fails here: {failure}") from None


def evaluate(policy: Policy, system: SystemInfo, call: Call) -> Resolution:
    """dom0's decision on ``call`` under ``policy``; never raises, whatever the call."""
    call = Call(call.source, call.target, call.service, call.argument or "+")
    note = ""
    rule: Rule | None = None
    try:
        intended = intended_target(call.target, system)
        if intended == "@default" and call.target not in ("", "@default"):
            note = f" (requested target {call.target!r} does not exist: read as @default)"
        for candidate in policy.rules:
            rule = candidate
            if _rule_matches_but_target(candidate, call, system) and _target_matches(
                candidate, intended, call, system
            ):
                break
        else:
            rule = None
        if rule is None:
            raise _Refused(f"no rule matches {call.describe()}")
        action = rule.action
        if isinstance(action, Deny):
            raise _Refused(f"denied by {rule.location}", notify=action.effective_notify)
        if isinstance(action, Allow):
            resolution = _allow(rule, action, call, intended, system)
        else:
            resolution = _ask(policy, rule, action, call, system)
    except _Refused as refusal:
        return Resolution(
            action="deny",
            target=None,
            rule=str(rule.location) if rule is not None else None,
            notify=refusal.notify,
            reason=refusal.reason + note,
        )
    return dataclasses.replace(resolution, reason=resolution.reason + note)


def evaluate_call(
    policy_dir: Path,
    system: SystemInfo,
    *,
    source: str,
    target: str,
    service: str,
    argument: str,
    legacy_dir: Path | None = None,
) -> Resolution:
    """Load ``policy_dir`` (R4.1+ format) and decide one call.

    ``target`` is what the caller requested (``""``/``@default``, a qube,
    ``@dispvm``, ``@dispvm:NAME``); ``argument`` carries its ``+`` (``"+"``
    for none). Raises PolicyError when the directory does not parse: dom0
    then refuses every call. ``legacy_dir`` is where ``!compat-4.0`` reads
    (default: ``../../qubes-rpc/policy`` from ``policy_dir``, i.e.
    ``/etc/qubes-rpc/policy`` in dom0).
    """
    policy = load_policy(policy_dir, legacy_dir=legacy_dir)
    return evaluate(policy, system, Call(source, target, service, argument))


def evaluate_legacy_call(
    legacy_dir: Path,
    system: SystemInfo,
    *,
    source: str,
    target: str,
    service: str,
    argument: str,
) -> Resolution:
    """Decide one call as R4.0 does from its per-service files in ``legacy_dir``."""
    policy = load_legacy_policy(legacy_dir)
    return evaluate(policy, system, Call(source, target, service, argument))
