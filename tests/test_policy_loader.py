"""Reading a policy directory as dom0 does: file names, C order, includes, !compat-4.0, R4.0."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qconnect.core.errors import PolicyError
from qconnect.policy.evaluate import evaluate_call, evaluate_legacy_call
from qconnect.policy.loader import load_legacy_policy, load_policy
from qconnect.policy.system_info import SystemInfo

SYSTEM = SystemInfo.from_dict(
    {
        "domains": {
            "dom0": {"type": "AdminVM"},
            "untrusted": {"type": "AppVM"},
            "a": {"type": "AppVM"},
            "b": {"type": "AppVM"},
            "c": {"type": "AppVM"},
        }
    }
)


def machine(tmp_path: Path) -> tuple[Path, Path]:
    policy_dir = tmp_path / "etc" / "qubes" / "policy.d"
    legacy_dir = tmp_path / "etc" / "qubes-rpc" / "policy"
    policy_dir.mkdir(parents=True)
    legacy_dir.mkdir(parents=True)
    return policy_dir, legacy_dir


def target_of(policy_dir: Path, argument: str = "+444", target: str = "") -> str | None:
    return evaluate_call(
        policy_dir,
        SYSTEM,
        source="untrusted",
        target=target,
        service="qubes.ConnectTCP",
        argument=argument,
    ).target


def test_files_are_read_in_c_order_of_their_names(tmp_path: Path) -> None:
    policy_dir, _ = machine(tmp_path)
    # C order: "-" (0x2d) < "0" < "_" (0x5f) < "a"; 100 sorts before 20 as text
    for name, target in [
        ("30-z.policy", "c"),
        ("100-first.policy", "a"),
        ("20_x.policy", "b"),
        ("20-x.policy", "b"),
    ]:
        (policy_dir / name).write_text(
            f"qubes.ConnectTCP +444 untrusted @default allow target={target}\n"
        )
    policy = load_policy(policy_dir)
    assert [path.name for path in policy.files] == [
        "100-first.policy",
        "20-x.policy",
        "20_x.policy",
        "30-z.policy",
    ]
    assert target_of(policy_dir) == "a"


def test_files_without_policy_suffix_and_dot_files_are_ignored(tmp_path: Path) -> None:
    policy_dir, _ = machine(tmp_path)
    (policy_dir / "README").write_text("this is not policy\n")
    (policy_dir / "30-x.policy~").write_text("garbage\n")
    (policy_dir / ".30-x.policy.swp.policy").write_text("garbage\n")
    (policy_dir / "Upper.txt").write_text("garbage\n")
    (policy_dir / "40-x.policy").write_text("qubes.ConnectTCP +444 untrusted a allow\n")
    assert [path.name for path in load_policy(policy_dir).files] == ["40-x.policy"]


@pytest.mark.parametrize(
    "name", ["30-User.policy", "30 user.policy", "30-usér.policy", "30+a.policy"]
)
def test_an_invalid_policy_file_name_refuses_the_whole_policy(tmp_path: Path, name: str) -> None:
    policy_dir, _ = machine(tmp_path)
    (policy_dir / "10-good.policy").write_text("qubes.ConnectTCP +444 untrusted a allow\n")
    (policy_dir / name).write_text("qubes.ConnectTCP +444 untrusted a allow\n")
    with pytest.raises(PolicyError, match=re.escape(f"invalid policy file name {name!r}")):
        load_policy(policy_dir)


def test_include_reads_the_file_where_the_directive_stands(tmp_path: Path) -> None:
    policy_dir, _ = machine(tmp_path)
    (policy_dir / "include").mkdir()
    (policy_dir / "include" / "connect").write_text(
        "qubes.ConnectTCP +444 untrusted @default allow target=b\n"
    )
    (policy_dir / "30-x.policy").write_text(
        "!include include/connect\nqubes.ConnectTCP +444 untrusted @default allow target=a\n"
    )
    policy = load_policy(policy_dir)
    assert [str(rule.location) for rule in policy.rules] == ["include/connect:1", "30-x.policy:2"]
    assert target_of(policy_dir) == "b"


def test_include_dir_reads_its_policy_files_in_order(tmp_path: Path) -> None:
    policy_dir, _ = machine(tmp_path)
    extra = tmp_path / "extra.d"
    extra.mkdir()
    (extra / "2.policy").write_text("qubes.ConnectTCP +444 untrusted @default allow target=b\n")
    (extra / "1.policy").write_text("qubes.ConnectTCP +444 untrusted @default allow target=c\n")
    (extra / "ignored").write_text("garbage\n")
    (policy_dir / "30-x.policy").write_text(f"!include-dir {extra}\n")
    assert target_of(policy_dir) == "c"


def test_include_service_reads_an_r40_file_for_that_service(tmp_path: Path) -> None:
    policy_dir, _ = machine(tmp_path)
    (policy_dir / "old").write_text("$anyvm $default allow,target=b\n")
    (policy_dir / "30-x.policy").write_text("!include-service qubes.ConnectTCP +444 old\n")
    assert target_of(policy_dir) == "b"
    assert target_of(policy_dir, argument="+445") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("!include nowhere\n", "30-x.policy:1: not a file: .*nowhere"),
        ("!include-dir nowhere\n", "30-x.policy:1: not a directory: .*nowhere"),
        ("!include-service qubes.ConnectTCP +1 nowhere\n", "30-x.policy:1: not a file"),
        ("!include 30-x.policy\n", "30-x.policy:1: include loop: 30-x.policy includes itself"),
    ],
)
def test_broken_includes_refuse_the_policy(tmp_path: Path, content: str, message: str) -> None:
    policy_dir, _ = machine(tmp_path)
    (policy_dir / "30-x.policy").write_text(content)
    with pytest.raises(PolicyError, match=message):
        load_policy(policy_dir)


def test_an_error_in_an_included_file_names_that_file(tmp_path: Path) -> None:
    policy_dir, _ = machine(tmp_path)
    (policy_dir / "inc").write_text("\nqubes.ConnectTCP +1 a b alow\n")
    (policy_dir / "30-x.policy").write_text("!include inc\n")
    with pytest.raises(PolicyError, match=r"^inc:2: unknown action 'alow'"):
        load_policy(policy_dir)


def test_compat_40_reads_legacy_files_plus_arg_first_with_implicit_deny(tmp_path: Path) -> None:
    policy_dir, legacy_dir = machine(tmp_path)
    (legacy_dir / "qubes.ConnectTCP").write_text("untrusted @default allow,target=a\n")
    (legacy_dir / "qubes.ConnectTCP+445").write_text("untrusted @default allow,target=b\n")
    (legacy_dir / "qubes.ConnectTCP+446").write_text("# nothing allowed\n")
    (legacy_dir / ".hidden").write_text("garbage\n")
    (legacy_dir / "qubes.ConnectTCP.rpmnew").write_text("garbage\n")
    (policy_dir / "35-compat.policy").write_text("!compat-4.0\n")
    (policy_dir / "90-default.policy").write_text("qubes.ConnectTCP * @anyvm @anyvm deny\n")
    assert target_of(policy_dir, "+444") == "a"
    assert target_of(policy_dir, "+445") == "b"
    # an R4.0 +ARG file is used instead of the plain one, with an implicit deny at its end
    resolution = evaluate_call(
        policy_dir,
        SYSTEM,
        source="untrusted",
        target="",
        service="qubes.ConnectTCP",
        argument="+446",
    )
    assert resolution.action == "deny"
    assert resolution.rule is not None and resolution.rule.endswith("qubes.ConnectTCP+446:end")


def test_compat_40_without_the_legacy_directory_refuses_the_policy(tmp_path: Path) -> None:
    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir()
    (policy_dir / "35-compat.policy").write_text("!compat-4.0\n")
    with pytest.raises(PolicyError, match=r"35-compat.policy:1: !compat-4.0: legacy policy"):
        load_policy(policy_dir)


def test_compat_40_is_not_recursive(tmp_path: Path) -> None:
    policy_dir, legacy_dir = machine(tmp_path)
    (legacy_dir / "qubes.ConnectTCP").write_text("!compat-4.0\n")
    (policy_dir / "35-compat.policy").write_text("!compat-4.0\n")
    with pytest.raises(PolicyError, match=r"qubes.ConnectTCP:1: unknown directive '!compat-4.0'"):
        load_policy(policy_dir)


def test_legacy_r40_evaluation_uses_the_arg_file_instead_of_the_plain_one(tmp_path: Path) -> None:
    _, legacy_dir = machine(tmp_path)
    (legacy_dir / "qubes.ConnectTCP").write_text("$anyvm $anyvm allow\n")
    (legacy_dir / "qubes.ConnectTCP+22").write_text("untrusted a allow\n")

    def call(argument: str, target: str) -> str:
        return evaluate_legacy_call(
            legacy_dir,
            SYSTEM,
            source="untrusted",
            target=target,
            service="qubes.ConnectTCP",
            argument=argument,
        ).action

    assert call("+22", "a") == "allow"
    assert call("+22", "b") == "deny"
    assert call("+80", "b") == "allow"
    assert [str(r.location) for r in load_legacy_policy(legacy_dir).rules] == [
        "qubes.ConnectTCP+22:1",
        "qubes.ConnectTCP+22:end",
        "qubes.ConnectTCP+22:end",
        "qubes.ConnectTCP:1",
    ]


def test_non_utf8_policy_file_is_refused(tmp_path: Path) -> None:
    policy_dir, _ = machine(tmp_path)
    (policy_dir / "30-x.policy").write_bytes(b"# caf\xe9\n")
    with pytest.raises(PolicyError, match=r"30-x.policy: not valid UTF-8"):
        load_policy(policy_dir)


def test_missing_policy_directory_is_an_error_not_a_crash(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy directory"):
        load_policy(tmp_path / "nowhere")


def test_system_info_refuses_malformed_descriptions(tmp_path: Path) -> None:
    path = tmp_path / "qubes.json"
    for content, message in [
        ("[]", 'expected a JSON object {"domains"'),
        ('{"domains": {"a": {"tags": "work"}}}', "qube 'a': 'tags' is 'work'"),
        ('{"domains": {"a": {"template_for_dispvms": 1}}}', "'template_for_dispvms' is 1"),
        ("{", "not valid JSON"),
    ]:
        path.write_text(content)
        with pytest.raises(PolicyError, match=message):
            SystemInfo.load(path)
    with pytest.raises(PolicyError, match="cannot read qubes description"):
        SystemInfo.load(tmp_path / "missing.json")


def test_system_info_outside_dom0_says_what_to_do() -> None:
    with pytest.raises(PolicyError) as raised:
        SystemInfo.from_running_system()
    message = str(raised.value)
    assert "this is not dom0: no qubesd-query" in message
    assert "no Admin API (the qubesadmin module is missing)" in message
    assert message.endswith("pass --qubes FILE with the JSON of qubesd's internal.GetSystemInfo")


# dom0's Admin API client cannot exist here; this stand-in answers as it does.
FAKE_QUBESADMIN = """
class _Features(dict):
    pass

class _VM:
    def __init__(self, name, klass, tags, state, **props):
        self.name, self.klass, self.tags = name, klass, set(tags)
        self._state = state
        self.features = _Features(props.pop("features", {}))
        for key, value in props.items():
            setattr(self, key, value)
    def get_power_state(self):
        return self._state

class Qubes:
    domains = [
        _VM("dom0", "AdminVM", [], "Running"),
        _VM("work", "AppVM", ["work"], "Halted", default_dispvm="dvm",
            template_for_dispvms=False),
        _VM("dvm", "AppVM", [], "Halted", default_dispvm=None, template_for_dispvms=True,
            features={"internal": "1"}),
    ]
"""


def test_system_info_from_the_admin_api_when_qubesd_is_out_of_reach(tmp_path: Path) -> None:
    (tmp_path / "qubesadmin.py").write_text(FAKE_QUBESADMIN)
    script = (
        "from qconnect.policy.system_info import SystemInfo\n"
        "for q in SystemInfo.from_running_system():\n"
        "    print(q.name, q.type, sorted(q.tags), q.default_dispvm, q.template_for_dispvms,"
        " q.power_state, q.internal)\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "dom0 AdminVM [] None False Running False",
        "work AppVM ['work'] dvm False Halted False",
        "dvm AppVM [] None True Halted True",
    ]
