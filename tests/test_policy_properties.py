"""Properties of the policy engine and editor, over generated rules, files, qubes and calls."""

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qconnect.core.errors import PolicyError
from qconnect.policy import fence
from qconnect.policy.editor import NewFormat, PolicyEditor
from qconnect.policy.evaluate import Call, evaluate
from qconnect.policy.legacy import parse_legacy_text
from qconnect.policy.loader import Policy
from qconnect.policy.parser import parse_line, parse_text
from qconnect.policy.rules import Action, Allow, Ask, Deny, Location, Rule
from qconnect.policy.system_info import SystemInfo
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
    TypeVM,
    Wildcard,
)

NAMES = ["dom0", "untrusted", "work", "svc", "dvm", "tmpl"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
NAME_CHARS = LETTERS + "0123456789_.-"
name = st.sampled_from(NAMES) | st.builds(
    str.__add__, st.sampled_from(LETTERS), st.text(NAME_CHARS, max_size=6)
)
word = st.text(NAME_CHARS + "ABCXYZ", min_size=1, max_size=6)

qube_token = name.map(QubeName)
redirect = st.one_of(qube_token, st.just(AdminVM()), st.just(DispVM()), name.map(DispVMTemplate))
source_token = st.one_of(
    qube_token,
    st.just(Wildcard()),
    st.just(AnyVM()),
    st.just(AdminVM()),
    word.map(TagVM),
    word.map(TypeVM),
    name.map(DispVMTemplate),
    word.map(DispVMTag),
)
target_token = st.one_of(source_token, st.just(DefaultVM()), st.just(DispVM()))
flag = st.none() | st.booleans()
user = st.none() | word

action = st.one_of(
    st.builds(Deny, notify=flag),
    st.builds(Allow, target=st.none() | redirect, user=user, notify=flag, autostart=flag),
    st.builds(
        Ask,
        target=st.none() | redirect,
        default_target=st.none() | redirect,
        user=user,
        notify=flag,
        autostart=flag,
    ),
)
service = st.sampled_from(["qubes.ConnectTCP", "qubes.Other"])
argument = st.one_of(
    st.none(),
    st.sampled_from(["+444", "+22", "+"]),
    st.text(NAME_CHARS + "+", max_size=5).map(lambda text: "+" + text),
)


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    rule_service = draw(st.none() | service)
    rule_argument = None if rule_service is None else draw(argument)
    target = draw(target_token)
    rule_action = draw(action)
    if isinstance(target, DefaultVM) and isinstance(rule_action, Allow):
        rule_action = Allow(draw(redirect), rule_action.user, rule_action.notify, None)
    return Rule(rule_service, rule_argument, draw(source_token), target, rule_action)


@given(rules())
def test_rendered_rules_parse_back_to_themselves(rule: Rule) -> None:
    parsed = parse_line(rule.render(), Location("x.policy", 1))
    assert parsed == rule
    assert isinstance(parsed, Rule) and parsed.render() == rule.render()


@given(rules())
def test_rendered_legacy_rules_parse_back_to_themselves(rule: Rule) -> None:
    legacy_rule = Rule("qubes.ConnectTCP", "+444", rule.source, rule.target, rule.action)
    (parsed,) = parse_legacy_text(
        legacy_rule.render_legacy(), "qubes.ConnectTCP+444", "qubes.ConnectTCP", "+444"
    )
    assert parsed == legacy_rule


# -- the fence -------------------------------------------------------------------

# Any text at all around our block, including line ends of every kind and non-ASCII.
user_text = st.text(alphabet="ab #\n\r\t-=+é\u2028\x0b", max_size=60)
rule_lines = st.lists(rules().map(Rule.render), max_size=4)


@given(before=user_text, after=user_text, first=rule_lines, second=rule_lines)
def test_replacing_our_block_never_changes_a_byte_outside_it(
    before: str, after: str, first: list[str], second: list[str]
) -> None:
    # a block appended to a file without one: the user's text stays a prefix
    added = fence.replace(fence.split(before, "f"), first, "cmd one")
    if not first:
        assert added == before
        return
    assert added.startswith(before)
    # with text after the block too, a second edit keeps both sides
    text = added + after
    fenced = fence.split(text, "f")
    assert fenced.before + fenced.block + fenced.after == text
    assert list(fenced.body[-len(first) :]) == first
    edited = fence.replace(fenced, second, "cmd two")
    if second:
        refenced = fence.split(edited, "f")
        assert (refenced.before, refenced.after) == (fenced.before, fenced.after)
        assert list(refenced.body[-len(second) :]) == second
    else:
        assert edited == fenced.before + fenced.after


line_end = st.sampled_from(["\n", "\r\n", "\r"])
user_line = st.one_of(
    st.just(""),
    st.text("abc #=+-", max_size=20).map(lambda text: "# " + text),
    rules().map(Rule.render),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    head=st.lists(st.tuples(user_line, line_end), max_size=5),
    tail=st.lists(st.tuples(user_line, line_end), max_size=5),
    ports=st.lists(st.integers(1, 65535), min_size=1, max_size=3),
    final_newline=st.booleans(),
)
def test_an_edit_of_a_real_file_keeps_every_user_byte(
    head: list[tuple[str, str]],
    tail: list[tuple[str, str]],
    ports: list[int],
    final_newline: bool,
) -> None:
    head_text = "".join(line + end for line, end in head)
    if not final_newline:
        head_text = head_text.rstrip("\r\n")
    tail_text = "".join(line + end for line, end in tail)
    with tempfile.TemporaryDirectory() as directory:
        policy_dir = Path(directory)
        path = policy_dir / "30-qconnect.policy"
        editor = PolicyEditor(NewFormat(policy_dir))
        path.write_bytes(head_text.encode())
        new_rules = [
            Rule("qubes.ConnectTCP", f"+{port}", QubeName("untrusted"), QubeName("svc"), Allow())
            for port in ports
        ]
        editor.add(new_rules, command="first")
        written = path.read_bytes().decode()
        separator = "\n" if head_text and not head_text.endswith(("\n", "\r")) else ""
        assert written.startswith(head_text + separator + fence.BEGIN_MARKER)
        path.write_bytes((written + tail_text).encode())
        editor.add(new_rules[:1], command="second")
        again = path.read_bytes().decode()
        assert again.startswith(head_text + separator + fence.BEGIN_MARKER)
        assert again.endswith(fence.END_MARKER + "\n" + tail_text)
        editor.remove(lambda rule: True, command="third")
        user_bytes = head_text + separator + tail_text
        if user_bytes:
            assert path.read_bytes().decode() == user_bytes
        else:  # the file held nothing but our block: it goes with it
            assert not path.exists()


# -- evaluation --------------------------------------------------------------------

qube_entry = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["AppVM", "TemplateVM", "AdminVM", "DispVM"]),
        "tags": st.lists(word, max_size=2),
        "default_dispvm": st.none() | name,
        "template_for_dispvms": st.booleans(),
        "power_state": st.sampled_from(["Running", "Halted"]),
        "internal": st.booleans(),
    }
)
systems = st.builds(
    lambda known, extra: SystemInfo.from_dict({"domains": {**extra, **known}}),
    st.fixed_dictionaries({qube: qube_entry for qube in NAMES}),
    st.dictionaries(name, qube_entry, max_size=2),
)
junk_line = st.text(alphabet=" \t#!@:*+=,$abdeglnoqstuwyCT.0123", max_size=30)
rule_line = rules().map(Rule.render)
# Rules likely to match the calls below, so that allow and ask are reached too.
common_token = st.sampled_from(NAMES).map(QubeName) | st.sampled_from([AnyVM(), Wildcard()])


def _likely(source: Token, target: Token, rule_action: Action, port: str | None) -> Rule:
    if isinstance(target, DefaultVM) and isinstance(rule_action, Allow) and not rule_action.target:
        rule_action = Allow(QubeName("svc"), rule_action.user, rule_action.notify)
    return Rule("qubes.ConnectTCP", port, source, target, rule_action)


likely_rule = st.builds(
    _likely,
    common_token,
    common_token | st.sampled_from([DefaultVM(), DispVM()]),
    action,
    st.sampled_from([None, "+444"]),
).map(Rule.render)
# Mostly rules (so that evaluation is reached), sometimes a line of junk dom0 refuses.
policy_text = st.builds(
    lambda lines, junk: "\n".join([*lines, junk]),
    st.lists(st.one_of(likely_rule, likely_rule, likely_rule, rule_line), max_size=10),
    st.sampled_from(["", "", "", "# comment"]) | junk_line,
)
requested = st.one_of(
    st.sampled_from(["", "@default", "@dispvm", "@adminvm", "@anyvm", "*", "@dispvm:dvm"]),
    name,
    st.text("@:*$#é-a1 ", max_size=8),
)
calls = st.builds(
    Call,
    source=st.sampled_from(NAMES) | name,
    target=requested,
    service=st.sampled_from(["qubes.ConnectTCP", "qubes.ConnectTCP", "qubes.Other"]),
    argument=st.sampled_from(["+444", "+444", "+", ""]) | argument.map(lambda a: a or "+"),
)


@settings(max_examples=200, deadline=None)
@given(text=policy_text, system=systems, call=calls)
def test_random_policies_and_calls_never_crash_and_are_deterministic(
    text: str, system: SystemInfo, call: Call
) -> None:
    try:
        entries = parse_text(text, "x.policy")
    except PolicyError as error:
        assert str(error).startswith("x.policy:")
        event("refused by the parser")
        return
    policy = Policy(tuple(entry for entry in entries if isinstance(entry, Rule)))
    first = evaluate(policy, system, call)
    event(f"evaluated: {first.action}")
    assert first.action in ("allow", "deny", "ask")
    assert first.reason
    if first.action == "allow":
        assert first.target is not None and first.rule is not None
    if first.action == "deny":
        assert first.target is None
    reparsed = Policy(tuple(e for e in parse_text(text, "x.policy") if isinstance(e, Rule)))
    assert evaluate(reparsed, system, call) == first
