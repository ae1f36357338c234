"""`qconnect policy`: edits, listing, explaining, lint, and every bad input refused cleanly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qconnect.policy.fence import BEGIN_MARKER, END_MARKER
from tests.cli_refusals import assert_one_refusal
from tests.policy_world import Dom0


@pytest.fixture
def dom0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Dom0:
    return Dom0(tmp_path, capsys)


# -- every bad input: one line naming the value, non-zero exit, nothing written --


BAD_PORTS = ["0", "65536", "080", "+80", "-1", "0x50", "8e1", ""]


@pytest.mark.parametrize("port", BAD_PORTS)
@pytest.mark.parametrize("action", ["allow", "deny", "explain"])
def test_bad_ports_are_refused(dom0: Dom0, port: str, action: str) -> None:
    before = dom0.snapshot()
    if action == "explain":
        status, _out, err = dom0.run("explain", "untrusted", "mytcp-service", port)
    elif action == "allow":
        status, _out, err = dom0.run(
            "allow", "untrusted", f"--port={port}", "--target", "mytcp-service"
        )
    else:
        status, _out, err = dom0.run("deny", "untrusted", f"--port={port}")
    assert_one_refusal(status, err, 2, f"invalid port {port!r}", "from 1 to 65535")
    assert dom0.snapshot() == before


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (
            ["allow", "ghost", "--port", "444", "--target", "mytcp-service"],
            "unknown source 'ghost'",
        ),
        (["allow", "untrusted", "--port", "444", "--target", "ghost"], "unknown target 'ghost'"),
        (
            ["allow", "untrusted", "--port", "444", "--default-target", "ghost"],
            "unknown default target 'ghost'",
        ),
        (["deny", "ghost", "--port", "444"], "unknown source 'ghost'"),
        (["explain", "ghost", "mytcp-service", "444"], "unknown source 'ghost'"),
        (
            ["allow", "@default", "--port", "444", "--target", "mytcp-service"],
            "'@default' cannot be a source",
        ),
        (
            ["allow", "@tag:", "--port", "444", "--target", "mytcp-service"],
            "'@tag:' has no name after '@tag:'",
        ),
        (["deny", "untrusted", "--port", "444", "--target", "@tag:"], "'@tag:' has no name"),
        (
            ["allow", "untrusted", "--port", "444", "--target", "@default"],
            "invalid target '@default': use --default-target",
        ),
        (
            ["allow", "untrusted", "--port", "444", "--default-target", "@anyvm"],
            "'@anyvm' cannot be a redirect",
        ),
        (
            ["allow", "untrusted#x", "--port", "444", "--target", "mytcp-service"],
            "invalid source: 'untrusted#x' is not a qube name",
        ),
        (
            [
                "allow",
                "untrusted",
                "--port",
                "444",
                "--target",
                "x",
                "--file",
                "30-Qconnect.policy",
            ],
            "invalid policy file name '30-Qconnect.policy'",
        ),
        (
            ["allow", "untrusted", "--port", "444", "--target", "x", "--file", "../escape.policy"],
            "invalid policy file name '../escape.policy'",
        ),
        (["remove", "untrusted", "--port", "444"], "no rule added by qconnect matches"),
        (["remove"], "say which rules to remove"),
    ],
)
def test_bad_values_are_refused_by_name(dom0: Dom0, words: list[str], message: str) -> None:
    before = dom0.snapshot()
    status, _out, err = dom0.run(*words)
    # Only the policy or the qubes can tell "no rule matches" or "no such qube" (exit 1);
    # the others are wrong command lines whatever the machine (exit 2).
    needs_the_machine = "no rule added" in message or message.startswith("unknown ")
    assert_one_refusal(status, err, 1 if needs_the_machine else 2, message)
    assert dom0.snapshot() == before


@pytest.mark.parametrize(
    ("existing", "message"),
    [
        ("qubes.ConnectTCP +22 work b allow # temporary\n", "inline comment '# temporary'"),
        ("qubes.ConnectTCP +22 work b allow user=a user=b\n", "parameter 'user' given twice"),
        ("qubes.ConnectTCP +22 work b allow colour=red\n", "unknown parameter 'colour'"),
        ("qubes.ConnectTCP +22 work @default allow\n", "allow to @default needs target=QUBE"),
    ],
)
def test_an_edit_is_refused_while_the_directory_does_not_parse(
    dom0: Dom0, existing: str, message: str
) -> None:
    (dom0.policy_dir / "20-user.policy").write_text(existing)
    before = dom0.snapshot()
    status, _, err = dom0.run("allow", "untrusted", "--port", "444", "--target", "mytcp-service")
    assert status != 0 and err.count("\n") == 1
    assert "refusing the edit, the policy does not parse now" in err
    assert f"20-user.policy:1: {message}" in err
    assert dom0.snapshot() == before
    status, out, _ = dom0.run("lint")
    assert status == 1 and f"20-user.policy:1: {message}" in out


def test_an_invalid_file_name_in_the_directory_refuses_edits(dom0: Dom0) -> None:
    (dom0.policy_dir / "30-User.policy").write_text("")
    before = dom0.snapshot()
    status, _, err = dom0.run("deny", "untrusted", "--port", "444")
    assert status != 0 and "invalid policy file name '30-User.policy'" in err
    assert dom0.snapshot() == before


def test_an_edit_that_would_not_parse_is_refused(dom0: Dom0) -> None:
    # 20-user.policy reads our file as an R4.0 file: fine while it holds only comments,
    # broken by any new-format rule line, so the edit must be refused, not written
    (dom0.policy_dir / "20-user.policy").write_text(
        "!include-service qubes.ConnectTCP +444 30-qconnect.policy\n"
    )
    dom0.ours.write_text("# reserved\n")
    before = dom0.snapshot()
    assert dom0.run("lint")[0] == 0
    status, _, err = dom0.run("deny", "untrusted", "--port", "444")
    assert status != 0 and err.count("\n") == 1
    assert "refusing the edit, the policy would not parse afterwards: 30-qconnect.policy:" in err
    assert dom0.snapshot() == before


def test_unknown_qubes_are_only_checked_when_the_qubes_are_known(dom0: Dom0) -> None:
    status, out, _ = dom0.run(
        "allow", "someone", "--port", "444", "--target", "elsewhere", qubes=False
    )
    assert status == 0 and "added:" in out


def test_explain_without_a_description_outside_dom0_says_so(dom0: Dom0) -> None:
    status, _, err = dom0.run("explain", "untrusted", "mytcp-service", "444", qubes=False)
    assert status != 0 and err.count("\n") == 1
    assert "this is not dom0" in err and "--qubes FILE" in err


# -- edits ----------------------------------------------------------------------


def test_allow_writes_one_rule_per_port_in_our_block(dom0: Dom0) -> None:
    status, out, _ = dom0.run(
        "allow", "untrusted", "--port", "444", "--port", "445", "--default-target", "mytcp-service"
    )
    assert status == 0
    text = dom0.ours.read_text()
    assert text.startswith(BEGIN_MARKER + "\n# Last change: qconnect policy allow untrusted")
    assert text.endswith(END_MARKER + "\n")
    assert "qubes.ConnectTCP +444 untrusted @default allow target=mytcp-service\n" in text
    assert "qubes.ConnectTCP +445 untrusted @default allow target=mytcp-service\n" in text
    assert out.count("added:") == 2
    assert oct(dom0.ours.stat().st_mode & 0o777) == "0o644"


@pytest.mark.parametrize(
    ("words", "rule"),
    [
        (
            ["allow", "untrusted", "--port", "22", "--target", "work", "--ask"],
            "qubes.ConnectTCP +22 untrusted work ask default_target=work",
        ),
        (
            ["allow", "untrusted", "--port", "22", "--default-target", "work", "--ask"],
            "qubes.ConnectTCP +22 untrusted @default ask target=work default_target=work",
        ),
        (
            ["allow", "@tag:work", "--port", "22", "--target", "@tag:work", "--ask"],
            "qubes.ConnectTCP +22 @tag:work @tag:work ask",
        ),
        (
            ["allow", "untrusted", "--port", "22", "--target", "work", "--no-autostart"],
            "qubes.ConnectTCP +22 untrusted work allow autostart=no",
        ),
        (["deny", "untrusted", "--port", "22"], "qubes.ConnectTCP +22 untrusted @anyvm deny"),
        (
            ["deny", "untrusted", "--port", "22", "--target", "work"],
            "qubes.ConnectTCP +22 untrusted work deny",
        ),
        (
            ["deny", "untrusted", "--port", "22", "--target", "@default"],
            "qubes.ConnectTCP +22 untrusted @default deny",
        ),
    ],
)
def test_each_command_writes_the_rule_a_user_means(dom0: Dom0, words: list[str], rule: str) -> None:
    assert dom0.run(*words)[0] == 0
    assert f"\n{rule}\n" in dom0.ours.read_text()


def test_the_ask_rules_really_ask(dom0: Dom0) -> None:
    dom0.run("allow", "untrusted", "--port", "22", "--default-target", "work", "--ask")
    _status, out, _ = dom0.run("explain", "untrusted", "@default", "22", "--json")
    assert json.loads(out) == {
        "decision": "ask",
        "target": "work",
        "rule": "30-qconnect.policy:6",
    }


def test_newest_command_wins_and_replaces_the_same_rule(dom0: Dom0) -> None:
    dom0.run("allow", "untrusted", "--port", "444", "--target", "mytcp-service")
    status, out, _ = dom0.run("deny", "untrusted", "--port", "444", "--target", "mytcp-service")
    assert status == 0 and "replaced: qubes.ConnectTCP +444 untrusted mytcp-service allow" in out
    rules = [line for line in dom0.ours.read_text().splitlines() if line.startswith("qubes.")]
    assert rules == ["qubes.ConnectTCP +444 untrusted mytcp-service deny"]
    status, out, _ = dom0.run("explain", "untrusted", "mytcp-service", "444", "--json")
    assert json.loads(out)["decision"] == "deny"


def test_dry_run_prints_the_diff_and_writes_nothing(dom0: Dom0) -> None:
    before = dom0.snapshot()
    status, out, _ = dom0.run(
        "allow", "untrusted", "--port", "444", "--target", "mytcp-service", "--dry-run"
    )
    assert status == 0
    assert "--- /dev/null" in out and f"+++ {dom0.ours}" in out
    assert "+qubes.ConnectTCP +444 untrusted mytcp-service allow" in out
    assert "(dry run: nothing written)" in out
    assert dom0.snapshot() == before


def test_user_lines_around_our_block_are_kept_byte_for_byte(dom0: Dom0) -> None:
    user_head = "# my own rules\r\nqubes.ConnectTCP +80 work mytcp-service allow\r\n"
    dom0.ours.write_bytes(user_head.encode() + b"qubes.ConnectTCP +81 work mytcp-service deny")
    os.chmod(dom0.ours, 0o600)
    dom0.run("allow", "untrusted", "--port", "444", "--target", "mytcp-service")
    dom0.run("allow", "untrusted", "--port", "445", "--target", "mytcp-service")
    data = dom0.ours.read_bytes()
    original = user_head.encode() + b"qubes.ConnectTCP +81 work mytcp-service deny"
    assert data.startswith(original + b"\n" + BEGIN_MARKER.encode())
    assert oct(dom0.ours.stat().st_mode & 0o777) == "0o600"
    tail = b"# after our block\n"
    dom0.ours.write_bytes(data + tail)
    dom0.run("remove", "untrusted", "--port", "444")
    after = dom0.ours.read_bytes()
    assert after.startswith(original + b"\n" + BEGIN_MARKER.encode())
    assert after.endswith(END_MARKER.encode() + b"\n" + tail)
    dom0.run("remove", "--all")
    assert dom0.ours.read_bytes() == original + b"\n" + tail


def test_remove_only_touches_our_rules_and_drops_a_file_that_was_all_ours(dom0: Dom0) -> None:
    (dom0.policy_dir / "20-user.policy").write_text("qubes.ConnectTCP +80 work b allow\n")
    dom0.run("allow", "untrusted", "--port", "444", "--port", "445", "--target", "mytcp-service")
    status, _, err = dom0.run("remove", "work", "--port", "80")
    assert status != 0 and "never removed" in err
    status, out, _ = dom0.run("remove", "untrusted", "--port", "444")
    assert status == 0 and out.count("removed:") == 1
    assert "+445" in dom0.ours.read_text() and "+444" not in dom0.ours.read_text()
    status, out, _ = dom0.run("remove", "untrusted")
    assert status == 0
    assert not dom0.ours.exists()
    assert (dom0.policy_dir / "20-user.policy").read_text() == "qubes.ConnectTCP +80 work b allow\n"


def test_remove_by_default_target(dom0: Dom0) -> None:
    dom0.run("allow", "untrusted", "--port", "444", "--default-target", "mytcp-service")
    dom0.run("allow", "untrusted", "--port", "444", "--target", "mytcp-service")
    status, out, _ = dom0.run("remove", "untrusted", "--default-target", "mytcp-service")
    assert status == 0 and "removed:  qubes.ConnectTCP +444 untrusted @default allow" in out
    assert "untrusted mytcp-service allow" in dom0.ours.read_text()


def test_a_damaged_block_is_never_guessed_at(dom0: Dom0) -> None:
    dom0.ours.write_text(f"{BEGIN_MARKER}\nqubes.ConnectTCP +1 a b deny\n")
    before = dom0.snapshot()
    status, _, err = dom0.run("deny", "untrusted", "--port", "444")
    assert status != 0 and "markers are damaged" in err
    assert dom0.snapshot() == before
    status, out, _ = dom0.run("lint")
    assert status == 1
    assert "30-qconnect.policy: qconnect's BEGIN/END markers are damaged" in out


def test_lint_reports_foreign_lines_in_our_block(dom0: Dom0) -> None:
    dom0.ours.write_text(f"{BEGIN_MARKER}\n!include-dir /nowhere\n{END_MARKER}\n")
    status, out, _ = dom0.run("lint")
    assert status == 1
    assert "30-qconnect.policy:2: not a directory: /nowhere" in out
    assert "30-qconnect.policy:2: only rules belong between qconnect's markers" in out


def test_a_rule_shadowed_by_an_earlier_file_is_reported(dom0: Dom0) -> None:
    (dom0.policy_dir / "20-lockdown.policy").write_text("qubes.ConnectTCP * @anyvm @anyvm deny\n")
    status, out, err = dom0.run("allow", "untrusted", "--port", "444", "--target", "mytcp-service")
    assert status == 0 and "wrote" in out
    assert "warning: 30-qconnect.policy:6: the new rule never matches" in err
    assert "20-lockdown.policy:1 (qubes.ConnectTCP * @anyvm @anyvm deny)" in err


def test_legacy_edits_use_per_port_files(dom0: Dom0) -> None:
    legacy_dir = dom0.root / "etc" / "qubes-rpc" / "policy"
    status, _, _ = dom0.run(
        "allow", "untrusted", "--port", "444", "--default-target", "mytcp-service", "--legacy"
    )
    assert status == 0
    text = (legacy_dir / "qubes.ConnectTCP+444").read_text()
    assert "\nuntrusted @default allow,target=mytcp-service\n" in text
    status, out, _ = dom0.run("list", "--legacy")
    assert out.splitlines()[0].split() == [
        "qubes.ConnectTCP+444:6",
        "untrusted",
        "@default",
        "allow,target=mytcp-service",
    ]
    status, out, _ = dom0.run("explain", "untrusted", "@default", "444", "--legacy", "--json")
    assert json.loads(out)["target"] == "mytcp-service"
    assert dom0.run("remove", "--all", "--legacy")[0] == 0
    assert not (legacy_dir / "qubes.ConnectTCP+444").exists()


# -- reading -------------------------------------------------------------------


def test_list_shows_every_connecttcp_rule_in_evaluation_order(dom0: Dom0) -> None:
    (dom0.policy_dir / "50-other.policy").write_text(
        "qubes.Filecopy * @anyvm @anyvm ask\n* * work @adminvm deny\n"
    )
    dom0.run("allow", "untrusted", "--port", "444", "--target", "mytcp-service")
    status, out, _ = dom0.run("list")
    assert status == 0
    assert [line.split()[0] for line in out.splitlines()] == [
        "30-qconnect.policy:6",
        "50-other.policy:2",
        "90-default.policy:3",
    ]
    status, out, _ = dom0.run("list", "--json")
    assert json.loads(out)[0] == {
        "rule": "30-qconnect.policy:6",
        "text": "qubes.ConnectTCP +444 untrusted mytcp-service allow",
    }


def test_explain_prints_decision_target_and_rule(dom0: Dom0) -> None:
    dom0.run("allow", "untrusted", "--port", "444", "--default-target", "mytcp-service")
    status, out, _ = dom0.run("explain", "untrusted", "@default", "444")
    assert status == 0
    assert "decision: allow" in out and "target:   mytcp-service" in out
    assert "rule:     30-qconnect.policy:6  qubes.ConnectTCP +444 untrusted @default" in out
    status, out, _ = dom0.run("explain", "untrusted", "", "445", "--json")
    assert json.loads(out) == {"decision": "deny", "target": None, "rule": "90-default.policy:3"}


def test_lint_reports_every_problem_with_file_and_line(dom0: Dom0) -> None:
    (dom0.policy_dir / "20-user.policy").write_text(
        "qubes.ConnectTCP +22 work b alow\n"
        "qubes.ConnectTCP * untrusted @anyvm deny\n"
        "qubes.ConnectTCP +444 untrusted mytcp-service allow\n"
        "qubes.ConnectTCP +445 untrusted ghost allow\n"
        "qubes.ConnectTCP +446 @tag:work @default allow\n"
        "qubes.ConnectTCP +447 work #mytcp-service deny\n"
    )
    status, out, err = dom0.run("lint")
    assert status == 1
    lines = out.splitlines()
    assert lines[0].startswith("20-user.policy:1: unknown action 'alow'")
    assert lines[1].startswith("20-user.policy:3: rule never matches: 20-user.policy:2")
    assert lines[2].startswith("20-user.policy:4: rule never matches")
    assert lines[3] == "20-user.policy:4: target 'ghost' names no qube of this machine"
    assert lines[4].startswith("20-user.policy:5: allow to @default needs target=QUBE")
    assert lines[5].startswith("20-user.policy:6: target '#mytcp-service' contains '#'")
    assert lines[6] == "20-user.policy:6: target '#mytcp-service' names no qube of this machine"
    assert "90-default.policy" not in out
    assert err == "7 problem(s)\n"


def test_values_dom0_accepts_but_no_qube_can_match_are_read_and_linted(dom0: Dom0) -> None:
    # dom0's grammar takes any characters after @tag: and in a name: the file parses
    # (so edits go on), and lint says the rule can never match.
    (dom0.policy_dir / "20-user.policy").write_text(
        "qubes.ConnectTCP +1 @tag:wo.rk work allow\n"
        "qubes.ConnectTCP +2 work @type:App$VM allow\n"
        "qubes.ConnectTCP +3 work mytcp-service allow target=my\x1bqube\n"
    )
    assert dom0.run("allow", "untrusted", "--port", "444", "--target", "work")[0] == 0
    status, out, _ = dom0.run("lint")
    assert status == 1
    assert "20-user.policy:1: source never matches: tag 'wo.rk' in '@tag:wo.rk'" in out
    assert "20-user.policy:2: target never matches: type 'App$VM'" in out
    assert "20-user.policy:3: target= never matches: 'my\\x1bqube' is not a qube name" in out


def test_rules_from_a_hand_written_file_are_printed_escaped(dom0: Dom0) -> None:
    # dom0 accepts any non-space character in a qube name, escape sequences included:
    # list, explain and lint show them escaped, never sent to the terminal.
    (dom0.policy_dir / "20-user.policy").write_text(
        "qubes.ConnectTCP +444 untrusted \x1b[2Jx allow\n"
        "qubes.ConnectTCP +444 untrusted \x1b[2Jx deny\n"
        "qubes.ConnectTCP +444 untrusted @anyvm deny\n"
    )
    for words in (["list"], ["lint"], ["explain", "untrusted", "work", "444"]):
        _status, out, err = dom0.run(*words)
        assert "\x1b" not in out + err, words
    _status, out, _ = dom0.run("list")
    assert "qubes.ConnectTCP +444 untrusted \\x1b[2Jx allow\n" in out


def test_lint_checks_single_files_and_their_names(dom0: Dom0, tmp_path: Path) -> None:
    bad = tmp_path / "30-User.policy"
    bad.write_text("qubes.ConnectTCP +1 a b allow target=c target=c\n")
    status, out, _ = dom0.run("lint", str(bad))
    assert status == 1
    assert f"{bad}: invalid policy file name '30-User.policy'" in out
    assert f"{bad}:1: parameter 'target' given twice" in out
    good = tmp_path / "30-good.policy"
    good.write_text("qubes.ConnectTCP +1 untrusted work allow\n")
    assert dom0.run("lint", str(good))[0] == 0


def test_lint_orders_problems_by_line_whatever_the_file_name(dom0: Dom0, tmp_path: Path) -> None:
    # A path with ':' and digits in it once defeated the FILE:LINE regex lint used to
    # read problems back from their text, so line 10 came before line 2.
    odd = tmp_path / "at 10:2: here"
    odd.mkdir()
    bad = odd / "30-user.policy"
    # Found in this order: the parse error of line 2, then the '#' warning of line 1.
    bad.write_text("qubes.ConnectTCP +1 work #b deny\nqubes.ConnectTCP +1 a b alow\n")
    status, out, _ = dom0.run("lint", str(bad))
    assert status == 1
    numbers = [int(line[len(str(bad)) + 1 :].split(":")[0]) for line in out.splitlines()]
    assert numbers == sorted(numbers) and set(numbers) == {1, 2}


def test_lint_of_a_clean_directory_passes(dom0: Dom0) -> None:
    dom0.run("allow", "untrusted", "--port", "444", "--target", "mytcp-service")
    status, out, _ = dom0.run("lint")
    assert (status, out) == (0, "no problems (2 rules)\n")


# -- processes -------------------------------------------------------------------


def test_the_policy_tool_never_imports_trio(dom0: Dom0) -> None:
    dom0.run("allow", "untrusted", "--port", "444", "--target", "mytcp-service")
    script = (
        "import sys, contextlib, io\n"
        "from qconnect.cli import main\n"
        "import qconnect.policy.cli, qconnect.policy.editor, qconnect.policy.lint\n"
        "import qconnect.policy.evaluate, qconnect.policy.system_info, qconnect.demo\n"
        "d, q = sys.argv[1], sys.argv[2]\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    for words in (['list'], ['lint'], ['explain', 'untrusted', '@default', '444'],\n"
        "                  ['deny', 'untrusted', '--port', '22']):\n"
        "        assert main(['policy', *words, '--policy-dir', d, '--qubes', q]) == 0\n"
        "print(sorted(m for m in sys.modules if m == 'trio' or m.startswith('trio.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(dom0.policy_dir), str(dom0.qubes)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"
    imported = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "qconnect.cli", "policy", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert imported.returncode == 0
    modules = [line.rsplit("|", 1)[-1].strip() for line in imported.stderr.splitlines()]
    assert "qconnect.policy.editor" in modules  # the policy tool was really loaded
    assert not [m for m in modules if m == "trio" or m.startswith("trio.")]


def test_the_policy_tool_runs_without_any_installed_package(dom0: Dom0) -> None:
    """As in dom0: Python's standard library and the qconnect sources, nothing else."""
    source_root = Path(__file__).resolve().parent.parent
    environment = {**os.environ, "PYTHONPATH": str(source_root)}
    options = ["--policy-dir", str(dom0.policy_dir), "--qubes", str(dom0.qubes)]

    def bare_python(*words: str) -> subprocess.CompletedProcess[str]:
        # -S: no site-packages, so trio and every other installed package are out of reach
        return subprocess.run(
            [sys.executable, "-S", *words],
            capture_output=True,
            text=True,
            env=environment,
            timeout=60,
            check=False,
        )

    assert bare_python("-c", "import trio").returncode != 0
    policy = ["-m", "qconnect.cli", "policy"]
    edit = bare_python(
        *policy,
        "allow",
        "untrusted",
        "--port",
        "444",
        "--default-target",
        "mytcp-service",
        *options,
    )
    assert edit.returncode == 0, edit.stderr
    explain = bare_python(*policy, "explain", "untrusted", "@default", "444", "--json", *options)
    assert json.loads(explain.stdout) == {
        "decision": "allow",
        "target": "mytcp-service",
        "rule": "30-qconnect.policy:6",
    }
    lint = bare_python(*policy, "lint", *options)
    assert (lint.returncode, lint.stdout) == (0, "no problems (2 rules)\n")


def test_concurrent_edits_are_serialized_and_none_is_lost(dom0: Dom0) -> None:
    command = [sys.executable, "-m", "qconnect.cli", "policy", "allow", "untrusted"]
    options = ["--target", "mytcp-service", "--policy-dir", str(dom0.policy_dir)]
    processes = [
        subprocess.Popen(
            [*command, "--port", str(port), *options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for port in range(1001, 1009)
    ]
    for process in processes:
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
    text = dom0.ours.read_text()
    assert all(f"+{port} untrusted mytcp-service allow" in text for port in range(1001, 1009))


def test_errors_are_one_line_without_traceback_in_a_real_process(dom0: Dom0) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qconnect.cli", "policy", "deny", "untrusted", "--port", "0x50"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    line = assert_one_refusal(done.returncode, done.stderr, 2, "invalid port '0x50'")
    assert line.startswith("qconnect policy deny: error: argument --port: ")
