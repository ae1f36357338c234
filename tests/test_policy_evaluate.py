"""Evaluating a call as dom0 does: matching, first match, @default, redirects, ask, deny."""

from pathlib import Path

import pytest

from qconnect.core.errors import PolicyError
from qconnect.policy.evaluate import Call, Resolution, evaluate, evaluate_call
from qconnect.policy.loader import Policy
from qconnect.policy.parser import parse_text
from qconnect.policy.rules import Rule
from qconnect.policy.system_info import SystemInfo

SYSTEM = SystemInfo.from_dict(
    {
        "domains": {
            "dom0": {"type": "AdminVM", "tags": ["dom0-tag"], "power_state": "Running"},
            "untrusted": {
                "type": "AppVM",
                "tags": [],
                "default_dispvm": "default-dvm",
                "power_state": "Running",
            },
            "mytcp-service": {"type": "AppVM", "tags": [], "power_state": "Running"},
            "sleeping": {"type": "AppVM", "tags": [], "power_state": "Halted"},
            "work": {"type": "AppVM", "tags": ["work"], "power_state": "Running"},
            "work-2": {"type": "AppVM", "tags": ["work"], "power_state": "Running"},
            "nodisp": {"type": "AppVM", "tags": [], "default_dispvm": None},
            "tmpl": {"type": "TemplateVM", "tags": [], "power_state": "Running"},
            "default-dvm": {
                "type": "AppVM",
                "tags": ["dvm"],
                "template_for_dispvms": True,
                "power_state": "Halted",
            },
            "hidden": {"type": "AppVM", "tags": ["work"], "internal": True},
        }
    }
)


def decide(policy_text: str, source: str, target: str, argument: str = "+444") -> Resolution:
    rules = tuple(e for e in parse_text(policy_text, "30-user.policy") if isinstance(e, Rule))
    return evaluate(Policy(rules), SYSTEM, Call(source, target, "qubes.ConnectTCP", argument))


@pytest.mark.parametrize(
    ("policy", "source", "target", "action", "resolved", "rule"),
    [
        # @default in a rule matches only calls that name no target...
        (
            "qubes.ConnectTCP +444 untrusted @default allow target=mytcp-service",
            "untrusted",
            "",
            "allow",
            "mytcp-service",
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP +444 untrusted @default allow target=mytcp-service",
            "untrusted",
            "@default",
            "allow",
            "mytcp-service",
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP +444 untrusted @default allow target=mytcp-service",
            "untrusted",
            "work",
            "deny",
            None,
            None,
        ),
        # ...and calls naming a qube that does not exist (read as @default).
        (
            "qubes.ConnectTCP +444 untrusted @default allow target=mytcp-service",
            "untrusted",
            "no-such-qube",
            "allow",
            "mytcp-service",
            "30-user.policy:1",
        ),
        # first match wins
        (
            "qubes.ConnectTCP +444 untrusted work deny\nqubes.ConnectTCP +444 untrusted work allow",
            "untrusted",
            "work",
            "deny",
            None,
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP +444 untrusted work allow\nqubes.ConnectTCP +444 untrusted work deny",
            "untrusted",
            "work",
            "allow",
            "work",
            "30-user.policy:1",
        ),
        # argument is an exact string; * covers every argument
        (
            "qubes.ConnectTCP +444 untrusted work allow",
            "untrusted",
            "work",
            "allow",
            "work",
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP * untrusted work allow",
            "untrusted",
            "work",
            "allow",
            "work",
            "30-user.policy:1",
        ),
        ("* * untrusted work allow", "untrusted", "work", "allow", "work", "30-user.policy:1"),
        ("qubes.ConnectTCP +4444 untrusted work allow", "untrusted", "work", "deny", None, None),
        ("qubes.Other * untrusted work allow", "untrusted", "work", "deny", None, None),
        # @anyvm excludes dom0, * includes it
        ("qubes.ConnectTCP * @anyvm @anyvm allow", "untrusted", "dom0", "deny", None, None),
        ("qubes.ConnectTCP * @anyvm @anyvm allow", "dom0", "work", "deny", None, None),
        ("qubes.ConnectTCP * * * allow", "dom0", "work", "allow", "work", "30-user.policy:1"),
        (
            "qubes.ConnectTCP * untrusted * allow",
            "untrusted",
            "@adminvm",
            "allow",
            "dom0",
            "30-user.policy:1",
        ),
        # @adminvm and dom0 are the same qube
        (
            "qubes.ConnectTCP * untrusted @adminvm allow",
            "untrusted",
            "dom0",
            "allow",
            "dom0",
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP * untrusted dom0 allow",
            "untrusted",
            "@adminvm",
            "allow",
            "dom0",
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP * @adminvm work allow",
            "dom0",
            "work",
            "allow",
            "work",
            "30-user.policy:1",
        ),
        # @tag: and @type:
        (
            "qubes.ConnectTCP * @tag:work mytcp-service allow",
            "work-2",
            "mytcp-service",
            "allow",
            "mytcp-service",
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP * @tag:work mytcp-service allow",
            "untrusted",
            "mytcp-service",
            "deny",
            None,
            None,
        ),
        (
            "qubes.ConnectTCP * untrusted @tag:work allow",
            "untrusted",
            "work-2",
            "allow",
            "work-2",
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP * untrusted @type:TemplateVM allow",
            "untrusted",
            "tmpl",
            "allow",
            "tmpl",
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP * untrusted @type:TemplateVM allow",
            "untrusted",
            "work",
            "deny",
            None,
            None,
        ),
        (
            "qubes.ConnectTCP * @tag:dom0-tag work allow",
            "dom0",
            "work",
            "allow",
            "work",
            "30-user.policy:1",
        ),
        # @tag: and @type: never match a keyword target
        ("qubes.ConnectTCP * untrusted @tag:work allow", "untrusted", "", "deny", None, None),
        # @dispvm: resolves to the caller's default_dispvm
        (
            "qubes.ConnectTCP * untrusted @dispvm allow",
            "untrusted",
            "@dispvm",
            "allow",
            "@dispvm:default-dvm",
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP * nodisp @dispvm allow",
            "nodisp",
            "@dispvm",
            "deny",
            None,
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP * untrusted @dispvm:default-dvm allow",
            "untrusted",
            "@dispvm",
            "allow",
            "@dispvm:default-dvm",
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP * untrusted @dispvm:default-dvm allow",
            "untrusted",
            "@dispvm:default-dvm",
            "allow",
            "@dispvm:default-dvm",
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP * untrusted @dispvm:@tag:dvm allow",
            "untrusted",
            "@dispvm:default-dvm",
            "allow",
            "@dispvm:default-dvm",
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP * untrusted @dispvm:@tag:dvm allow",
            "untrusted",
            "@dispvm",
            "allow",
            "@dispvm:default-dvm",
            "30-user.policy:1",
        ),
        # @dispvm:NAME only for qubes with template_for_dispvms
        ("qubes.ConnectTCP * untrusted * allow", "untrusted", "@dispvm:work", "deny", None, None),
        ("qubes.ConnectTCP * untrusted * allow", "untrusted", "@dispvm:ghost", "deny", None, None),
        # @anyvm as a rule's target also matches @default calls: allow then has nowhere to go
        (
            "qubes.ConnectTCP * untrusted @anyvm allow",
            "untrusted",
            "",
            "deny",
            None,
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP * untrusted @anyvm allow target=work",
            "untrusted",
            "",
            "allow",
            "work",
            "30-user.policy:1",
        ),
        # a redirect to a qube that does not exist has nowhere to go either
        (
            "qubes.ConnectTCP * untrusted @default allow target=ghost",
            "untrusted",
            "",
            "deny",
            None,
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP * untrusted @default allow target=@dispvm:work",
            "untrusted",
            "",
            "deny",
            None,
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP * untrusted @default allow target=@adminvm",
            "untrusted",
            "",
            "allow",
            "dom0",
            "30-user.policy:1",
        ),
        # autostart=no: only a running target
        (
            "qubes.ConnectTCP * untrusted * allow autostart=no",
            "untrusted",
            "sleeping",
            "deny",
            None,
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP * untrusted * allow autostart=no",
            "untrusted",
            "work",
            "allow",
            "work",
            "30-user.policy:1",
        ),
        (
            "qubes.ConnectTCP * untrusted * allow autostart=no",
            "untrusted",
            "@dispvm",
            "deny",
            None,
            "30-user.policy:1",
        ),
        # a qube never serves its own call
        (
            "qubes.ConnectTCP * untrusted * allow",
            "untrusted",
            "untrusted",
            "deny",
            None,
            "30-user.policy:1",
        ),
        # requested keywords that cannot be a call's target are refused outright
        ("qubes.ConnectTCP * * * allow", "untrusted", "@anyvm", "deny", None, None),
        ("qubes.ConnectTCP * * * allow", "untrusted", "@tag:work", "deny", None, None),
        ("qubes.ConnectTCP * * * allow", "untrusted", "*", "deny", None, None),
        # nothing matches: deny
        ("", "untrusted", "work", "deny", None, None),
        # @dispvm:NAME as a source never matches (callers are named qubes)
        (
            "qubes.ConnectTCP * @dispvm:default-dvm * allow",
            "default-dvm",
            "work",
            "deny",
            None,
            None,
        ),
    ],
)
def test_decisions_match_dom0(
    policy: str,
    source: str,
    target: str,
    action: str,
    resolved: str | None,
    rule: str | None,
) -> None:
    resolution = decide(policy, source, target)
    assert (resolution.action, resolution.target, resolution.rule) == (action, resolved, rule), (
        resolution.reason
    )
    assert resolution.reason


def test_redirect_is_explained_and_unknown_target_noted() -> None:
    resolution = decide(
        "qubes.ConnectTCP +444 untrusted @default allow target=mytcp-service", "untrusted", "ghost"
    )
    assert "redirected by target= from @default" in resolution.reason
    assert "'ghost' does not exist: read as @default" in resolution.reason


def test_allow_carries_user_notify_and_autostart() -> None:
    resolution = decide(
        "qubes.ConnectTCP * untrusted work allow user=root notify=yes autostart=no",
        "untrusted",
        "work",
    )
    assert (resolution.user, resolution.notify, resolution.autostart) == ("root", True, False)


def test_deny_notifies_unless_told_not_to() -> None:
    assert decide("qubes.ConnectTCP * untrusted work deny", "untrusted", "work").notify is True
    quiet = decide("qubes.ConnectTCP * untrusted work deny notify=no", "untrusted", "work")
    assert quiet.notify is False


def test_ask_offers_what_later_rules_allow_minus_what_earlier_rules_deny() -> None:
    resolution = decide(
        "qubes.ConnectTCP * untrusted work-2 deny\n"
        "qubes.ConnectTCP * untrusted @default ask default_target=work\n"
        "qubes.ConnectTCP * untrusted @tag:work allow\n"
        "qubes.ConnectTCP * untrusted mytcp-service allow\n",
        "untrusted",
        "",
    )
    assert resolution.action == "ask"
    assert resolution.rule == "30-user.policy:2"
    # work-2 denied earlier, "hidden" is internal, untrusted cannot be its own target
    assert resolution.choices == ("mytcp-service", "work")
    assert resolution.target == "work"


def test_ask_with_target_offers_that_target_and_ignores_a_foreign_default() -> None:
    resolution = decide(
        "qubes.ConnectTCP * untrusted @default ask target=mytcp-service default_target=work",
        "untrusted",
        "",
    )
    assert resolution.choices == ("mytcp-service",)
    assert resolution.target is None


def test_ask_without_any_choice_is_a_deny() -> None:
    resolution = decide("qubes.ConnectTCP * untrusted @default ask", "untrusted", "")
    assert (resolution.action, resolution.rule) == ("deny", "30-user.policy:1")
    assert "no target" in resolution.reason


def test_ask_autostart_no_offers_only_running_qubes() -> None:
    resolution = decide(
        "qubes.ConnectTCP * untrusted * ask autostart=no\n", "untrusted", "sleeping"
    )
    assert "sleeping" not in resolution.choices
    assert "work" in resolution.choices


def test_evaluate_call_reads_the_directory(tmp_path: Path) -> None:
    (tmp_path / "30-user.policy").write_text(
        "qubes.ConnectTCP +444 untrusted @default allow target=mytcp-service\n"
    )
    resolution = evaluate_call(
        tmp_path,
        SYSTEM,
        source="untrusted",
        target="",
        service="qubes.ConnectTCP",
        argument="+444",
    )
    assert (resolution.action, resolution.target, resolution.rule) == (
        "allow",
        "mytcp-service",
        "30-user.policy:1",
    )


def test_evaluate_call_raises_when_the_directory_does_not_parse(tmp_path: Path) -> None:
    (tmp_path / "30-user.policy").write_text("\n\nqubes.ConnectTCP +444 a b alow\n")
    with pytest.raises(PolicyError, match=r"^30-user.policy:3: unknown action 'alow'"):
        evaluate_call(
            tmp_path, SYSTEM, source="a", target="b", service="qubes.ConnectTCP", argument="+444"
        )


def test_empty_argument_is_plus() -> None:
    assert decide("qubes.ConnectTCP + untrusted work allow", "untrusted", "work", "+").allowed
    assert decide("qubes.ConnectTCP + untrusted work allow", "untrusted", "work", "").allowed
    assert not decide("qubes.ConnectTCP + untrusted work allow", "untrusted", "work").allowed


def test_dispvm_template_rule_meeting_a_dispvm_call_without_default_refuses_like_dom0() -> None:
    # qubes-core-qrexec fails (AttributeError) on this rule for this call: dom0 refuses it,
    # even though a later rule would allow it
    resolution = decide(
        "qubes.ConnectTCP * nodisp @dispvm:default-dvm allow\n"
        "qubes.ConnectTCP * nodisp @dispvm allow target=work\n",
        "nodisp",
        "@dispvm",
    )
    assert (resolution.action, resolution.rule) == ("deny", "30-user.policy:1")
    assert "dom0's evaluator fails here" in resolution.reason


def test_ask_choices_naming_an_unknown_dispvm_template_refuse_like_dom0() -> None:
    resolution = decide(
        "qubes.ConnectTCP * untrusted @default ask\n"
        "qubes.ConnectTCP * untrusted @anyvm allow target=@dispvm:ghost\n",
        "untrusted",
        "",
    )
    assert (resolution.action, resolution.rule) == ("deny", "30-user.policy:1")
    assert "30-user.policy:2: dom0's evaluator fails here" in resolution.reason
