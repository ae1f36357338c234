# ruff: noqa: E501 (the tables read best one case a line)
"""One rule for every command: exit 2 when the command line is wrong, 1 when it could not be done.

Each wrong command line, whatever the subcommand, gives argparse's usage
block (that subcommand's) and exactly one error line naming the bad value;
each failure gives one line and exit 1; nothing ever prints a traceback. The
property tests throw random words at both front doors to hold that for the
whole class of inputs, not only the ones listed here.
"""

import contextlib
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qconnect import cli
from qconnect.client import cli as client_cli
from qconnect.demo import DEFAULT_POLICY, SAMPLE_QUBES
from tests.cli_refusals import assert_one_refusal, refusal_lines

Main = Callable[[Sequence[str]], int]


def run_main(main: Main, words: Sequence[str]) -> tuple[int, str, str]:
    """A front door run in this process (a child per case would take minutes)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(words))
        except SystemExit as exit_:  # argparse: --help, --version and its refusals
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch directory as the current one, with a policy directory and a qube tree.

    PATH has no qrexec-client-vm, so a qvm-connect-tcp that got past its
    command line stops there (exit 1) before binding anything.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir()
    (policy_dir / "90-default.policy").write_text(DEFAULT_POLICY)
    (tmp_path / "legacy").mkdir()
    (tmp_path / "qubes.json").write_text(json.dumps({"domains": SAMPLE_QUBES}))
    (tmp_path / "root").mkdir()
    return tmp_path


def policy_options(world: Path) -> list[str]:
    return ["--policy-dir", str(world / "policy.d"), "--qubes", str(world / "qubes.json")]


# (front door, words, exit code, texts the error line names, usage line's command)
WRONG_COMMAND_LINES: list[tuple[str, list[str], str, str]] = [
    # qvm-connect-tcp
    ("client", [], "no binding given", "qvm-connect-tcp"),
    ("client", ["8080"], "invalid binding '8080'", "qvm-connect-tcp"),
    ("client", ["8080:web:80", "--max-connections", "0"], "invalid number '0'", "qvm-connect-tcp"),
    ("client", ["--grace", "soon", "8080:web:80"], "invalid duration 'soon'", "qvm-connect-tcp"),
    ("client", ["--call-timeout", "inf", "1:a:2"], "invalid duration 'inf'", "qvm-connect-tcp"),
    ("client", ["1:a:2", "--bind", "here", "3:b:4"], "invalid bind address 'here'", "qvm-connect-tcp"),
    ("client", ["1:a:2", "1:b:3"], "given twice", "qvm-connect-tcp"),
    ("client", ["--systemd", "1:a:2"], "give no SPEC", "qvm-connect-tcp"),
    ("client", ["--bogus", "1:a:2"], "unrecognized arguments: --bogus", "qvm-connect-tcp"),
    # qconnect itself
    ("qconnect", ["frobnicate"], "invalid choice: 'frobnicate'", "qconnect"),
    ("qconnect", [], "the following arguments are required: COMMAND", "qconnect"),
    # list and stop
    ("qconnect", ["list", "--bogus"], "unrecognized arguments: --bogus", "qconnect list"),
    ("qconnect", ["stop"], "expected SPEC... or --all", "qconnect stop"),
    ("qconnect", ["stop", "8080"], "invalid binding '8080'", "qconnect stop"),
    ("qconnect", ["stop", "--all", "--timeout", "-1"], "invalid duration '-1'", "qconnect stop"),
    ("qconnect", ["stop", "--bogus"], "unrecognized arguments: --bogus", "qconnect stop"),
    # service
    ("qconnect", ["service", "run", "--max-calls", "0"], "invalid number '0'", "qconnect service run"),
    (
        "qconnect",
        ["service", "run", "--max-calls-per-caller", "+3"],
        "invalid number '+3'",
        "qconnect service run",
    ),
    (
        "qconnect",
        ["service", "run", "--connect-timeout", "0"],
        "invalid duration '0'",
        "qconnect service run",
    ),
    ("qconnect", ["service", "run", "--bogus"], "unrecognized arguments", "qconnect service run"),
    ("qconnect", ["service", "frob"], "invalid choice: 'frob'", "qconnect service"),
    ("qconnect", ["service", "install", "--root", "root"], "give --layout", "qconnect service install"),
    (
        "qconnect",
        ["service", "install", "--rpc-config-dir", "root"],
        "--rpc-config-dir goes with --rpc-dir",
        "qconnect service install",
    ),
    ("qconnect", ["service", "uninstall", "--root", ""], "invalid path ''", "qconnect service uninstall"),
    # persist
    ("qconnect", ["persist", "add", "8080", "--root", "root"], "invalid binding '8080'", "qconnect persist add"),
    (
        "qconnect",
        ["persist", "add", "8080:web:80", "--max-connections", "0", "--root", "root"],
        "invalid number '0'",
        "qconnect persist add",
    ),
    (
        "qconnect",
        ["persist", "add", "8080:web:80", "--socat", "socat", "--root", "root"],
        "invalid --socat path 'socat'",
        "qconnect persist add",
    ),
    (
        "qconnect",
        ["persist", "add", "80:web:80", "--user", "--root", "root"],
        "local port 80",
        "qconnect persist add",
    ),
    (
        "qconnect",
        ["persist", "add", "8080:web:80", "--mode", "daemon", "--max-connections", "3"],
        "apply to --mode per-connection only",
        "qconnect persist add",
    ),
    ("qconnect", ["persist", "show", "1:2:3:4:5"], "invalid binding '1:2:3:4:5'", "qconnect persist show"),
    ("qconnect", ["persist", "remove"], "one of the arguments SPEC --all is required", "qconnect persist remove"),
    ("qconnect", ["persist", "list", "--bogus"], "unrecognized arguments", "qconnect persist list"),
    # policy
    (
        "qconnect",
        ["policy", "allow", "work", "--port", "0x50", "--target", "web"],
        "invalid port '0x50'",
        "qconnect policy allow",
    ),
    ("qconnect", ["policy", "deny", "@tag:", "--port", "80"], "'@tag:' has no name", "qconnect policy deny"),
    ("qconnect", ["policy", "explain", "bad name", "web", "80"], "'bad name'", "qconnect policy explain"),
    ("qconnect", ["policy", "explain", "work", "web", "080"], "invalid port '080'", "qconnect policy explain"),
    (
        "qconnect",
        ["policy", "remove", "work", "--all"],
        "--all removes every rule this tool added: give it alone",
        "qconnect policy remove",
    ),
    (
        "qconnect",
        ["policy", "allow", "work", "--port", "80", "--target", "web", "--file", "x.conf"],
        "invalid policy file name 'x.conf'",
        "qconnect policy allow",
    ),
    ("qconnect", ["policy", "lint", "--bogus"], "unrecognized arguments: --bogus", "qconnect policy lint"),
    # loopback and demo
    ("qconnect", ["loopback", "init", "m", "--qube", "bad name"], "'bad name'", "qconnect loopback init"),
    ("qconnect", ["loopback", "init", "m", "--qube", "w", "--ask", "maybe"], "invalid answer 'maybe'", "qconnect loopback init"),
    ("qconnect", ["loopback", "run", "m", "bad name", "--", "true"], "invalid qube name 'bad name'", "qconnect loopback run"),
    ("qconnect", ["loopback", "run", "m", "work"], "no command given", "qconnect loopback run"),
    ("qconnect", ["loopback", "init", "m", "--qube", "w", "--policy", "a b c"], "wrong number of fields in 'a b c'", "qconnect loopback init"),
    ("qconnect", ["loopback", "init", "m", "--qube", "w", "--policy", "* * w w allow\n* * * * allow"], "expected one line", "qconnect loopback init"),
    ("qconnect", ["loopback", "init", "m", "--qube", "w", "--qube", "w"], "--qube 'w' given twice", "qconnect loopback init"),
    ("qconnect", ["demo", "--bogus"], "unrecognized arguments: --bogus", "qconnect demo"),
]  # fmt: skip

FRONT_DOORS: dict[str, Main] = {"client": client_cli.main, "qconnect": cli.main}


@pytest.mark.parametrize(
    ("door", "words", "named", "command"),
    WRONG_COMMAND_LINES,
    ids=[" ".join([door, *words]) or door for door, words, _, _ in WRONG_COMMAND_LINES],
)
def test_a_wrong_command_line_is_the_usage_and_one_line_and_exit_2(
    world: Path, door: str, words: list[str], named: str, command: str
) -> None:
    before = sorted(path for path in world.rglob("*"))
    code, out, err = run_main(FRONT_DOORS[door], words)
    assert out == ""
    line = assert_one_refusal(code, err, 2, named)
    assert line.startswith(f"{command}: error: "), err
    assert err.startswith(f"usage: {command} "), err
    assert sorted(path for path in world.rglob("*")) == before


# Command lines that are right, for something that cannot be done here.
FAILURES: list[tuple[str, list[str], str]] = [
    ("client", ["8080:web:80"], "qrexec-client-vm not found on PATH"),
    ("client", ["--systemd"], "qrexec-client-vm not found on PATH"),
    ("qconnect", ["persist", "list", "--root", "nowhere"], "invalid --root 'nowhere'"),
    ("qconnect", ["persist", "remove", "8080:web:80", "--root", "root"], "no binding"),
    ("qconnect", ["policy", "lint", "missing.policy"], "cannot lint missing.policy"),
    ("qconnect", ["policy", "allow", "ghost", "--port", "80", "--target", "web"], "unknown source 'ghost'"),
    ("qconnect", ["policy", "remove", "work", "--port", "80"], "no rule added by qconnect matches"),
    ("qconnect", ["loopback", "run", "nowhere", "work", "--", "true"], "nowhere"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("door", "words", "named"),
    FAILURES,
    ids=[" ".join([door, *words]) for door, words, _ in FAILURES],
)
def test_what_cannot_be_done_is_one_line_and_exit_1(
    world: Path, door: str, words: list[str], named: str
) -> None:
    if words[:1] == ["policy"]:
        words = [*words, *policy_options(world)]
    code, _out, err = run_main(FRONT_DOORS[door], words)
    line = assert_one_refusal(code, err, 1, named)
    assert refusal_lines(err) == [line]  # no usage: the command line was right


def test_options_may_come_between_specs() -> None:
    args = client_cli.build_parser().parse_args(["1:a:2", "--bind", "::1", "3:b:4", "-f"])
    assert args.specs == ["1:a:2", "3:b:4"]
    assert (args.bind, args.foreground) == ("::1", True)
    specs = client_cli.parse_specs(args.specs, args.bind)
    assert [str(spec) for spec in specs] == ["[::1]:1:a:2", "[::1]:3:b:4"]


def test_stop_takes_options_between_specs_too() -> None:
    words = ["stop", "1:a:2", "--timeout", "5", "3:b:4"]
    args = cli.build_parser(words).parse_args(words)
    assert [str(spec) for spec in args.specs] == ["127.0.0.1:1:a:2", "127.0.0.1:3:b:4"]
    assert args.timeout == 5.0


HELPS = [("client", []), ("qconnect", []), ("qconnect", ["list"]), ("qconnect", ["stop"]),
         ("qconnect", ["service", "run"]), ("qconnect", ["service", "install"]),
         ("qconnect", ["persist", "add"]), ("qconnect", ["policy", "allow"]),
         ("qconnect", ["loopback", "init"]), ("qconnect", ["demo"])]  # fmt: skip


@pytest.mark.parametrize(("door", "command"), HELPS, ids=[" ".join(c) or d for d, c in HELPS])
def test_every_help_documents_the_exit_codes(door: str, command: list[str]) -> None:
    code, out, _err = run_main(FRONT_DOORS[door], [*command, "--help"])
    assert code == 0
    text = " ".join(out.split())
    assert "exit status: 0 done; 1 it could not be done" in text
    assert "2 the command line is wrong" in text


def test_a_reader_that_goes_away_is_141_without_a_traceback() -> None:
    def handler(_args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    parser = cli.Parser(prog="p")
    code, _out, err = run_main(lambda words: cli.run_command("p", parser, words, handler), [])
    assert (code, err) == (141, "")


def test_ctrl_c_is_130_without_a_traceback() -> None:
    def handler(_args: object) -> int:
        raise KeyboardInterrupt

    parser = cli.Parser(prog="p")
    code, _out, err = run_main(lambda words: cli.run_command("p", parser, words, handler), [])
    assert (code, err) == (130, "")


def test_a_system_failure_nothing_caught_is_one_line_and_1() -> None:
    def handler(_args: object) -> int:
        return len(Path("/nonexistent/qconnect-test").read_text())

    parser = cli.Parser(prog="p")
    code, _out, err = run_main(lambda words: cli.run_command("p", parser, words, handler), [])
    assert (code, err) == (1, "p: error: /nonexistent/qconnect-test: No such file or directory\n")


# --- the property: any words, exit 0, 1 or 2, never a traceback ----------------------

# Values that sit on the edges of the grammars, and text of every kind.
VALUES = st.one_of(
    st.sampled_from(
        ["0", "-1", "1", "80", "65535", "65536", "080", "1e3", "nan", "inf", "", "x", "-",
         "--", "8080:web:80", "::80", "1:2:3:4:5", "[::1]:1:a:2", "@default", "@anyvm",
         "@tag:", "web", "dom0", "a\nb", "\x1b[2J", "\0", "../x", "root", "policy.d"]
    ),
    st.text(max_size=12),
)  # fmt: skip


def words_for(options: Sequence[str]) -> st.SearchStrategy[list[str]]:
    """Random command-line words: the command's own option names among random values."""
    return st.lists(st.one_of(st.sampled_from(list(options)), VALUES), max_size=8)


CLIENT_OPTIONS = ["--bind", "--max-connections", "--grace", "--call-timeout", "--systemd",
                  "--relay", "-f", "--log-file", "-v"]  # fmt: skip
# (command words, its options, options put last so they win: nothing leaves the scratch tree)
QCONNECT_COMMANDS: list[tuple[list[str], list[str], list[str]]] = [
    (["policy", "allow"], ["--port", "--target", "--default-target", "--ask", "--no-autostart",
                           "--file", "--legacy"], ["--dry-run"]),
    (["policy", "deny"], ["--port", "--target", "--file", "--legacy"], ["--dry-run"]),
    (["policy", "remove"], ["--port", "--target", "--default-target", "--all"], ["--dry-run"]),
    (["policy", "explain"], ["--json", "--legacy"], []),
    (["policy", "list"], ["--json", "--legacy"], []),
    (["persist", "add"], ["--user", "--system", "--mode", "--max-connections", "--relay",
                          "--socat", "--persistence", "--replace"], ["--root", "root"]),
    (["persist", "show"], ["--user", "--system"], ["--root", "root"]),
    (["persist", "remove"], ["--all", "--user", "--system"], ["--root", "root"]),
    (["service", "uninstall"], ["--root"], ["--root", "root"]),
    ([], ["--version"], []),
]  # fmt: skip

PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def assert_clean_exit(code: int, err: str) -> None:
    assert code in (0, 1, 2), (code, err)
    assert "Traceback" not in err, err
    if code != 0:
        assert len(refusal_lines(err)) == 1, err


@PROPERTY_SETTINGS
@given(words=words_for(CLIENT_OPTIONS))
def test_any_words_to_qvm_connect_tcp_exit_0_1_or_2_without_traceback(
    world: Path, words: list[str]
) -> None:
    code, _out, err = run_main(client_cli.main, words)
    assert_clean_exit(code, err)


@pytest.mark.parametrize(
    ("command", "options", "last"),
    QCONNECT_COMMANDS,
    ids=[" ".join(command) or "qconnect" for command, _, _ in QCONNECT_COMMANDS],
)
def test_any_words_to_qconnect_exit_0_1_or_2_without_traceback(
    world: Path, command: list[str], options: list[str], last: list[str]
) -> None:
    scratch = [*last, *(policy_options(world) if command[:1] == ["policy"] else [])]

    @PROPERTY_SETTINGS
    @given(words=words_for(options))
    def one_run(words: list[str]) -> None:
        code, _out, err = run_main(cli.main, [*command, *words, *scratch])
        assert_clean_exit(code, err)

    one_run()
    assert os.getcwd() == str(world)
