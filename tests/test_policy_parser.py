"""The policy grammar: every token, action, parameter and directive, and dom0's refusals."""

import pytest

from qconnect.core.errors import PolicyError
from qconnect.policy.legacy import parse_legacy_text, translate_line
from qconnect.policy.parser import (
    Compat40,
    Include,
    IncludeDir,
    IncludeService,
    parse_text,
)
from qconnect.policy.rules import Allow, Ask, Deny, Rule
from qconnect.policy.tokens import (
    AdminVM,
    AnyVM,
    DefaultVM,
    DispVM,
    DispVMTag,
    DispVMTemplate,
    Place,
    QubeName,
    TagVM,
    TokenError,
    TypeVM,
    Wildcard,
    parse_token,
)


@pytest.mark.parametrize(
    ("text", "place", "expected"),
    [
        ("untrusted", Place.SOURCE, QubeName("untrusted")),
        ("*", Place.SOURCE, Wildcard()),
        ("@anyvm", Place.TARGET, AnyVM()),
        ("@adminvm", Place.SOURCE, AdminVM()),
        ("@adminvm", Place.REDIRECT, AdminVM()),
        ("@default", Place.TARGET, DefaultVM()),
        ("@dispvm", Place.TARGET, DispVM()),
        ("@dispvm", Place.REDIRECT, DispVM()),
        ("@dispvm:default-dvm", Place.SOURCE, DispVMTemplate("default-dvm")),
        ("@dispvm:default-dvm", Place.REDIRECT, DispVMTemplate("default-dvm")),
        ("@dispvm:@tag:work", Place.TARGET, DispVMTag("work")),
        ("@tag:work", Place.SOURCE, TagVM("work")),
        ("@type:AppVM", Place.TARGET, TypeVM("AppVM")),
    ],
)
def test_each_token_kind_parses_where_it_may_stand(
    text: str, place: Place, expected: object
) -> None:
    token = parse_token(text, place)
    assert token == expected
    assert token.text == text


@pytest.mark.parametrize(
    ("text", "place", "message"),
    [
        ("@default", Place.SOURCE, "'@default' cannot be a source"),
        ("@dispvm", Place.SOURCE, "'@dispvm' cannot be a source"),
        ("@anyvm", Place.REDIRECT, "'@anyvm' cannot be a redirect"),
        ("*", Place.REDIRECT, "'*' cannot be a redirect"),
        ("@tag:work", Place.REDIRECT, "'@tag:work' cannot be a redirect"),
        ("@dispvm:@tag:x", Place.REDIRECT, "'@dispvm:@tag:x' cannot be a redirect"),
        ("@tag:", Place.SOURCE, "'@tag:' has no name after '@tag:'"),
        ("@type:", Place.TARGET, "'@type:' has no name"),
        ("@dispvm:", Place.TARGET, "'@dispvm:' has no name"),
        ("@dispvm:@tag:", Place.TARGET, "'@dispvm:@tag:' has no name"),
        ("@dispvm:@anyvm", Place.TARGET, "invalid target token '@dispvm:@anyvm'"),
        ("@anything", Place.TARGET, "invalid target token '@anything'"),
        ("", Place.SOURCE, "empty source token"),
    ],
)
def test_tokens_refused_where_dom0_refuses_them(text: str, place: Place, message: str) -> None:
    with pytest.raises(TokenError, match=message):
        parse_token(text, place)


def rules_of(text: str) -> list[Rule]:
    return [entry for entry in parse_text(text, "30-user.policy") if isinstance(entry, Rule)]


@pytest.mark.parametrize(
    "line",
    [
        "qubes.ConnectTCP +444 untrusted @default allow target=mytcp-service",
        "qubes.ConnectTCP +444 untrusted mytcp-service allow",
        "qubes.ConnectTCP * @anyvm @anyvm deny",
        "qubes.ConnectTCP * @anyvm @anyvm deny notify=no",
        "* * @adminvm @anyvm allow",
        "qubes.ConnectTCP +22 @tag:work @default ask target=vault default_target=vault",
        "qubes.ConnectTCP +22 @type:AppVM @dispvm allow user=root notify=yes autostart=no",
        "qubes.ConnectTCP +22 work @dispvm:default-dvm ask default_target=@dispvm:default-dvm",
        "qubes.ConnectTCP + work @dispvm:@tag:x allow target=@dispvm",
        "qubes.ConnectTCP +1 work dom0 allow target=@adminvm user=u",
    ],
)
def test_valid_lines_parse_and_render_back_unchanged(line: str) -> None:
    (rule,) = rules_of(line)
    assert rule.render() == line
    assert rule.location is not None and str(rule.location) == "30-user.policy:1"


def test_parameters_are_typed_and_defaults_are_dom0s() -> None:
    deny, allow, ask = rules_of(
        "qubes.ConnectTCP +1 a b deny\n"
        "qubes.ConnectTCP +1 a b allow autostart=no\n"
        "qubes.ConnectTCP +1 a b ask default_target=b\n"
    )
    assert isinstance(deny.action, Deny) and deny.action.effective_notify is True
    assert isinstance(allow.action, Allow)
    assert allow.action.effective_autostart is False and allow.action.effective_notify is False
    assert isinstance(ask.action, Ask) and ask.action.default_target == QubeName("b")
    assert ask.action.effective_autostart is True


def test_whitespace_comments_and_blank_lines_are_skipped_with_line_numbers_kept() -> None:
    text = "# a comment\n\n   # indented comment\n\tqubes.ConnectTCP\t+1  a   b  deny  \r\n"
    (rule,) = rules_of(text)
    assert rule.location is not None and rule.location.line == 4


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("qubes.ConnectTCP +1 a b alow", "30-user.policy:1: unknown action 'alow'"),
        (
            "qubes.ConnectTCP +1 a @default allow",
            "30-user.policy:1: allow to @default needs target=QUBE",
        ),
        (
            "qubes.ConnectTCP +1 a b allow target=c target=d",
            "30-user.policy:1: parameter 'target' given twice",
        ),
        (
            "qubes.ConnectTCP +1 a b allow colour=red",
            "30-user.policy:1: unknown parameter 'colour' for allow",
        ),
        (
            "qubes.ConnectTCP +1 a b deny target=c",
            "30-user.policy:1: unknown parameter 'target' for deny",
        ),
        (
            "qubes.ConnectTCP +1 a b allow default_target=c",
            "unknown parameter 'default_target' for allow",
        ),
        (
            "qubes.ConnectTCP +1 a b allow notify=true",
            "notify='true' is invalid: expected yes or no",
        ),
        ("qubes.ConnectTCP +1 a b allow autostart", "invalid parameter 'autostart': expected key"),
        (
            "qubes.ConnectTCP +1 a b allow # let a in",
            "30-user.policy:1: inline comment '# let a in' is not allowed",
        ),
        (
            "qubes.ConnectTCP +1 a b deny #comment",
            "inline comment '#comment' is not allowed",
        ),
        ("qubes.ConnectTCP +1 a b", "30-user.policy:1: wrong number of fields"),
        ("qubes.ConnectTCP 444 a b deny", "invalid argument '444': expected \\* or \\+ARGUMENT"),
        ("qubes.ConnectTCP +4/4 a b deny", "invalid argument '\\+4/4'"),
        ("qubes.Connect+TCP +1 a b deny", "invalid service 'qubes.Connect\\+TCP'"),
        ("* +444 a b deny", "argument '\\+444' needs a service"),
        ("qubes.ConnectTCP +1 @default b deny", "'@default' cannot be a source"),
        ("qubes.ConnectTCP +1 @tag: b deny", "source token '@tag:' has no name"),
        ("qubes.ConnectTCP +1 a b allow target=@anyvm", "'@anyvm' cannot be a redirect"),
        ("qubes.ConnectTCP +1 a b allow target=", "empty redirect token"),
        ("!include", "30-user.policy:1: !include takes 1 parameter"),
        ("!include-service qubes.ConnectTCP +1", "!include-service takes 3 parameter"),
        ("!compat-4.0 now", "!compat-4.0 takes 0 parameter"),
        ("!include-everything x", "unknown directive '!include-everything'"),
    ],
)
def test_bad_lines_are_refused_with_file_line_and_value(line: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message) as raised:
        parse_text(line, "30-user.policy")
    assert str(raised.value).startswith("30-user.policy:1: ")
    assert "\n" not in str(raised.value)
    with pytest.raises(PolicyError, match=r"^30-user.policy:3: ") as raised:
        parse_text("# a comment\n\n" + line, "30-user.policy")
    # The place is kept as fields (as qrexec's parser keeps filepath and lineno),
    # the message without it: nobody needs to parse the text back.
    assert (raised.value.file, raised.value.line) == ("30-user.policy", 3)
    assert str(raised.value) == f"30-user.policy:3: {raised.value.message}"
    assert not raised.value.message.startswith("30-user.policy")


def test_directives_parse_to_their_values() -> None:
    entries = parse_text(
        "!include include/extra\n!include-dir more.d\n"
        "!include-service qubes.ConnectTCP +444 old/file\n!compat-4.0\n",
        "x.policy",
    )
    assert [type(entry) for entry in entries] == [Include, IncludeDir, IncludeService, Compat40]
    service = entries[2]
    assert isinstance(service, IncludeService)
    assert (service.service, service.argument, service.path) == (
        "qubes.ConnectTCP",
        "+444",
        "old/file",
    )


def test_lint_style_parse_collects_every_error_and_keeps_good_lines() -> None:
    errors: list[PolicyError] = []
    entries = parse_text(
        "qubes.ConnectTCP +1 a b alow\nqubes.ConnectTCP +1 a b deny\nx +1 a b allow z=1\n",
        "f.policy",
        on_error=errors.append,
    )
    assert len(entries) == 1
    assert [str(e).split(": ")[0] for e in errors] == ["f.policy:1", "f.policy:3"]


def test_legacy_lines_use_dollar_and_commas() -> None:
    assert translate_line("$anyvm $default allow,target=x") == "@anyvm @default allow target=x"
    entries = parse_legacy_text(
        "# comment\n$anyvm $dispvm allow,user=root\nuntrusted @default allow,target=svc\n"
        "$include:/etc/qubes-rpc/policy/other\n",
        "qubes.ConnectTCP+444",
        "qubes.ConnectTCP",
        "+444",
    )
    first, second, include = entries
    assert isinstance(first, Rule) and first.render() == (
        "qubes.ConnectTCP +444 @anyvm @dispvm allow user=root"
    )
    assert isinstance(second, Rule) and second.render_legacy() == (
        "untrusted @default allow,target=svc"
    )
    assert isinstance(include, Include) and include.path == "/etc/qubes-rpc/policy/other"


def test_legacy_plain_file_rules_cover_every_argument() -> None:
    (rule,) = parse_legacy_text("untrusted mytcp-service allow", "qubes.ConnectTCP", "x", None)
    assert isinstance(rule, Rule) and rule.argument is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("untrusted @default allow", "qubes.ConnectTCP:1: allow to @default needs target"),
        ("untrusted", "qubes.ConnectTCP:1: wrong number of fields"),
        ("untrusted b allow,colour=red", "unknown parameter 'colour'"),
        ("untrusted b allow # note", "inline comment '# note'"),
    ],
)
def test_bad_legacy_lines_are_refused(line: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_legacy_text(line, "qubes.ConnectTCP", "qubes.ConnectTCP", None)


def test_a_hash_that_dom0_reads_as_a_qube_name_is_not_an_error() -> None:
    # dom0 takes "#a" as a (non-existent) qube name here: the line parses there too
    (rule,) = rules_of("qubes.ConnectTCP +1 #a b deny")
    assert rule.source == QubeName("#a")
