"""`qconnect policy explain` answers what dom0 answers, for any target a qube can put in a call.

A qube's call may name anything as its target. Before dom0's policy engine
sees it, qrexec-client-vm turns ``$`` into ``@`` and keeps 63 bytes, and
qrexec-daemon replaces every other character than ``[A-Za-z0-9_.-@:]`` by
``_``; the engine then reads it as an intended target, refusing words that
are not one (``@anyvm``, ``@tag:T``...). ``explain`` must give that answer,
not refuse the question.
"""

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from qconnect.cli import main
from qconnect.demo import DEFAULT_POLICY
from qconnect.policy.evaluate import Call, evaluate, target_as_sent
from qconnect.policy.loader import Policy
from qconnect.policy.parser import parse_text
from qconnect.policy.rules import Rule
from qconnect.policy.system_info import SystemInfo

UUIDS = {
    "dom0": "00000000-0000-0000-0000-000000000000",
    "untrusted": "11111111-1111-1111-1111-111111111111",
    "mytcp-service": "22222222-2222-2222-2222-222222222222",
    "work": "33333333-3333-3333-3333-333333333333",
    "default-dvm": "44444444-4444-4444-4444-444444444444",
}
DOMAINS: dict[str, dict[str, object]] = {
    "dom0": {"type": "AdminVM", "power_state": "Running"},
    "untrusted": {"default_dispvm": "default-dvm", "power_state": "Running"},
    "mytcp-service": {"power_state": "Running"},
    "work": {"tags": ["work"], "power_state": "Running"},
    "default-dvm": {"tags": ["dvm"], "template_for_dispvms": True},
}
for _name, _uuid in UUIDS.items():
    DOMAINS[_name]["uuid"] = _uuid
SYSTEM = SystemInfo.from_dict({"domains": DOMAINS})

Explain = Callable[..., tuple[int, str, str]]

USER_POLICY = """\
qubes.ConnectTCP +444 untrusted @default allow target=mytcp-service
qubes.ConnectTCP +444 untrusted * allow
"""


@pytest.fixture
def explain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Explain:
    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir()
    (policy_dir / "90-default.policy").write_text(DEFAULT_POLICY)
    (policy_dir / "20-user.policy").write_text(USER_POLICY)
    qubes = tmp_path / "qubes.json"
    qubes.write_text(json.dumps({"domains": DOMAINS}))

    def run(target: str, *extra: str) -> tuple[int, str, str]:
        capsys.readouterr()
        words = ["policy", "explain", "untrusted", target, "444", *extra]
        status = main([*words, f"--policy-dir={policy_dir}", f"--qubes={qubes}"])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


@pytest.mark.parametrize(
    ("typed", "decision", "target", "rule"),
    [
        # what a call may name, each resolved as dom0 resolves it
        ("work", "allow", "work", "20-user.policy:2"),
        ("", "allow", "mytcp-service", "20-user.policy:1"),
        ("@default", "allow", "mytcp-service", "20-user.policy:1"),
        ("@adminvm", "allow", "dom0", "20-user.policy:2"),
        ("dom0", "allow", "dom0", "20-user.policy:2"),
        ("@dispvm", "allow", "@dispvm:default-dvm", "20-user.policy:2"),
        ("$dispvm", "allow", "@dispvm:default-dvm", "20-user.policy:2"),
        ("@dispvm:default-dvm", "allow", "@dispvm:default-dvm", "20-user.policy:2"),
        (f"uuid:{UUIDS['work']}", "allow", "work", "20-user.policy:2"),
        (f"uuid:{UUIDS['dom0']}", "allow", "dom0", "20-user.policy:2"),
        # a qube that does not exist is read as @default, by name or by uuid
        ("ghost", "allow", "mytcp-service", "20-user.policy:1"),
        ("uuid:99999999-9999-9999-9999-999999999999", "allow", "mytcp-service", "20-user.policy:1"),
        # qrexec-daemon turns "*" and every other stray character into "_": no such qube
        ("*", "allow", "mytcp-service", "20-user.policy:1"),
        ("wörk\n", "allow", "mytcp-service", "20-user.policy:1"),
        # words dom0's engine never resolves as a call's target: refused, no rule
        ("@anyvm", "deny", None, None),
        ("@tag:work", "deny", None, None),
        ("@type:AppVM", "deny", None, None),
        ("@dispvm:@tag:dvm", "deny", None, None),
        ("@dispvm:", "deny", None, None),
        # @dispvm:NAME must be a disposable template
        ("@dispvm:mytcp-service", "deny", None, None),
        ("@dispvm:ghost", "deny", None, None),
    ],
)
def test_explain_answers_for_every_target_a_qube_can_name(
    explain: Explain, typed: str, decision: str, target: str | None, rule: str | None
) -> None:
    status, out, err = explain(typed, "--json")
    assert status == 0, err
    document = json.loads(out)
    assert (document["decision"], document["target"], document["rule"]) == (
        decision,
        target,
        rule,
    )


@pytest.mark.parametrize(
    ("typed", "reason"),
    [
        ("@anyvm", "invalid intendedtarget token: '@anyvm'"),
        ("@tag:work", "invalid intendedtarget token: '@tag:work'"),
        ("@type:AppVM", "invalid intendedtarget token: '@type:AppVM'"),
        ("@dispvm:@tag:dvm", "invalid intendedtarget token: '@dispvm:@tag:dvm'"),
        ("@dispvm:", "invalid empty @dispvm: token: '@dispvm:'"),
        ("@dispvm:mytcp-service", "not a template for dispvm: mytcp-service"),
    ],
)
def test_a_refused_target_is_explained_with_dom0s_reason(
    explain: Explain, typed: str, reason: str
) -> None:
    status, out, _ = explain(typed)
    assert status == 0
    assert "decision: deny" in out and reason in out
    assert "does not exist" not in out  # refused as it is, not read as @default


def test_a_rewritten_target_is_shown_as_dom0_receives_it(explain: Explain) -> None:
    status, out, _ = explain("*\x1b[2J", "--json")
    assert status == 0 and json.loads(out)["requested_target"] == "___2J"
    status, out, _ = explain("w\x1b[2Jrk")
    assert status == 0
    assert all(line.isprintable() for line in out.splitlines())
    assert "sent as:  w__2Jrk (the qube typed 'w\\\\x1b[2Jrk'" in out


def test_a_call_to_its_own_uuid_is_allowed_as_dom0_allows_it_with_a_warning(
    explain: Explain,
) -> None:
    # dom0's self-call check compares the strings "untrusted" and "uuid:...": it passes.
    status, out, err = explain(f"uuid:{UUIDS['untrusted']}", "--json")
    assert status == 0
    document = json.loads(out)
    assert (document["decision"], document["target"]) == ("allow", "untrusted")
    assert "untrusted reaches itself" in document["warnings"][0]
    status, out, err = explain(f"uuid:{UUIDS['untrusted']}")
    assert "decision: allow" in out and "warning: untrusted reaches itself" in err
    # by name it is refused, as in dom0
    status, out, _ = explain("untrusted", "--json")
    assert json.loads(out)["decision"] == "deny"


def decide(policy_text: str, source: str, target: str) -> tuple[str, str | None]:
    rules = tuple(e for e in parse_text(policy_text, "30-user.policy") if isinstance(e, Rule))
    call = Call(source, target, "qubes.ConnectTCP", "+444")
    resolution = evaluate(Policy(rules), SYSTEM, call)
    return resolution.action, resolution.target


def test_a_redirect_to_the_callers_own_uuid_is_allowed_too() -> None:
    policy = f"qubes.ConnectTCP +444 untrusted @default allow target=uuid:{UUIDS['untrusted']}"
    assert decide(policy, "untrusted", "") == ("allow", "untrusted")


def test_a_dispvm_template_rule_by_uuid_does_not_match_a_dispvm_call() -> None:
    # dom0 compares "@dispvm:" + the caller's default_dispvm (a name) with the rule's
    # text as plain strings: the uuid: spelling of the same template does not match.
    policy = f"qubes.ConnectTCP +444 untrusted @dispvm:uuid:{UUIDS['default-dvm']} allow"
    assert decide(policy, "untrusted", "@dispvm") == ("deny", None)
    assert decide(policy, "untrusted", "@dispvm:default-dvm") == ("allow", "@dispvm:default-dvm")


def test_the_engine_itself_refuses_words_that_are_not_a_calls_target() -> None:
    # Without qrexec's rewriting (the loopback, a direct question): "*" is refused.
    assert decide("qubes.ConnectTCP * * * allow", "untrusted", "*") == ("deny", None)
    assert decide("qubes.ConnectTCP * * @anyvm allow", "untrusted", "@anyvm") == ("deny", None)


@pytest.mark.parametrize(
    ("typed", "sent"),
    [
        ("work", "work"),
        ("$dispvm:default-dvm", "@dispvm:default-dvm"),
        ("*", "_"),
        ("wörk", "w__rk"),  # two bytes, two "_"
        ("a b\nc", "a_b_c"),
        ("x" * 70, "x" * 63),
        ("é" * 40, "_" * 63),
        ("uuid:" + UUIDS["work"], "uuid:" + UUIDS["work"]),
    ],
)
def test_targets_are_rewritten_as_qrexec_rewrites_them(typed: str, sent: str) -> None:
    assert target_as_sent(typed) == sent
