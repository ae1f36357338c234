"""Hostile values on `qconnect policy`'s command line: refused, or exactly the rule asked for.

dom0's policy is the most trusted file on a Qubes machine. A value that
carries a newline, a space or a control character into it could add a rule
of its own (``@tag:work web allow\\nqubes.ConnectTCP * @anyvm web allow``),
and a value outside Qubes' own character set is at best a rule that never
matches. The class test below tries arbitrary text in every argument of
``allow``, ``deny`` and ``remove`` and checks, with oracles written here and
not taken from the code under test, that each run either refuses with one
line and leaves every byte as it was, or changes the policy by exactly the
rules asked for, and that no call's decision changes except where those
rules match.
"""

import contextlib
import io
import json
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qconnect.cli import main
from qconnect.demo import DEFAULT_POLICY, SAMPLE_QUBES
from qconnect.policy.cli import shell_word
from qconnect.policy.evaluate import Call, Resolution, evaluate
from qconnect.policy.fence import BEGIN_MARKER, END_MARKER
from qconnect.policy.loader import Policy, load_policy
from qconnect.policy.rules import Rule
from qconnect.policy.system_info import SystemInfo
from tests.cli_refusals import refusal_lines
from tests.policy_world import Dom0

SERVICE = "qubes.ConnectTCP"

# -- oracles: Qubes' own character sets, written out independently --------------

_NAME = r"[A-Za-z][A-Za-z0-9_.-]{0,30}"
_WORD = r"[A-Za-z0-9_-]+"  # tags and types (qubes-core-admin's Tags.validate_tag)
_DOM0_UUID = "uuid:00000000-0000-0000-0000-000000000000"
_TOKEN = re.compile(
    rf"\*|@anyvm|@adminvm|@default|@dispvm|@dispvm:{_NAME}|@dispvm:@tag:{_WORD}"
    rf"|@tag:{_WORD}|@type:{_WORD}|{_NAME}|{_DOM0_UUID}"
)
_REDIRECT = re.compile(rf"@adminvm|@dispvm|@dispvm:{_NAME}|{_NAME}|{_DOM0_UUID}")
_FILE = re.compile(r"[0-9a-z_-][0-9a-z_.-]*\.policy")
_PORT = re.compile(r"[1-9][0-9]{0,4}")

# -- the dom0 every example starts from -------------------------------------------

USER_FILE = "25-mine.policy"
USER_TEXT = "# the user's own\nqubes.ConnectTCP +8080 work mytcp-service allow\n"
SETUP = [
    ["allow", "untrusted", "--port", "444", "--target", "mytcp-service"],
    ["allow", "@tag:work", "--port", "22", "--default-target", "work", "--ask"],
    ["deny", "untrusted", "--port", "80", "--target", "work"],
]

QUBES = SystemInfo.from_dict({"domains": SAMPLE_QUBES})


def _run(words: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(["policy", *words])
        except SystemExit as exit_:  # argparse's refusal of a value outside its grammar
            status = exit_.code if isinstance(exit_.code, int) else 1
    return status, out.getvalue(), err.getvalue()


@dataclass
class World:
    """One dom0 reused by every example: reset to the same bytes before each."""

    root: Path
    start: dict[str, bytes] = field(default_factory=dict)
    start_rules: list[Rule] = field(default_factory=list)

    @property
    def policy_dir(self) -> Path:
        return self.root / "etc" / "qubes" / "policy.d"

    @property
    def options(self) -> list[str]:
        return [f"--policy-dir={self.policy_dir}", f"--qubes={self.root / 'qubes.json'}"]

    def build(self) -> None:
        self.policy_dir.mkdir(parents=True)
        (self.root / "etc" / "qubes-rpc" / "policy").mkdir(parents=True)
        (self.policy_dir / "90-default.policy").write_text(DEFAULT_POLICY)
        (self.policy_dir / USER_FILE).write_text(USER_TEXT)
        (self.root / "qubes.json").write_text(json.dumps({"domains": SAMPLE_QUBES}))
        for words in SETUP:
            assert _run([*words, *self.options])[0] == 0
        self.start = self.snapshot()
        self.start_rules = self.rules()

    def snapshot(self) -> dict[str, bytes]:
        return {
            str(path.relative_to(self.root)): path.read_bytes()
            for path in sorted(self.root.rglob("*"))
            if path.is_file()
        }

    def reset(self, now: dict[str, bytes]) -> None:
        """Back to the start from the files as they are ``now`` (only changed ones are touched)."""
        for name in now.keys() - self.start.keys():
            (self.root / name).unlink()
        for name, data in self.start.items():
            if now.get(name) != data:
                (self.root / name).write_bytes(data)

    def rules(self) -> list[Rule]:
        return list(load_policy(self.policy_dir).rules)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with tempfile.TemporaryDirectory() as directory:
        built = World(Path(directory))
        built.build()
        yield built


# -- hostile values ------------------------------------------------------------------

SOURCES = ["untrusted", "work", "@anyvm", "@tag:work", "@type:AppVM", "dom0", "@adminvm", "*"]
TARGETS = [
    "mytcp-service",
    "work",
    "@anyvm",
    "@tag:work",
    "@type:AppVM",
    "@dispvm",
    "@dispvm:default-dvm",
    "@dispvm:@tag:work",
    "@default",
    "@adminvm",
    "*",
]
REDIRECTS = ["mytcp-service", "work", "@dispvm", "@dispvm:default-dvm", "@adminvm", "dom0"]
PORTS = ["80", "444", "22", "8080"]
FILES = ["30-qconnect.policy", USER_FILE, "20-new.policy"]
SEPARATORS = ["\n", "\r", "\r\n", " ", "\t", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\x00"]
SEPARATORS += ["\x1b[2J", "#", "=", ",", "$", "'", "\\", "/", ":", "é", "\udcff"]
PAYLOADS = ["qubes.ConnectTCP * @anyvm mytcp-service allow", "allow", "# x", "", "x"]
# The attack: finish the line, add a rule, and comment out the words that follow.
_EXTRA_RULE = "qubes.ConnectTCP * @anyvm mytcp-service allow"
INJECTIONS = [
    f" mytcp-service allow\n{_EXTRA_RULE}\n#",  # after a source
    f" allow\n{_EXTRA_RULE}\n#",  # after a target
    f"\n{_EXTRA_RULE}\n#",  # after the last word (target=QUBE)
    f" allow\r{_EXTRA_RULE}\r#",
]


# Characters Qubes allows in a tag, and many it does not, for values after a prefix.
VALUE_CHARS = [*"ab09_-", ".", "é", ":", "@", "/", "$", "#", "\x1b", "\x85", " ", "\n"]


def hostile(good: list[str], *, bad_in_ten: int = 3) -> st.SearchStrategy[str]:
    """A good value, or (``bad_in_ten`` times in ten) a spliced, injected or any text."""
    ok = st.sampled_from(good)
    spliced = st.builds(
        lambda value, separator, payload: value + separator + payload,
        ok,
        st.sampled_from(SEPARATORS),
        st.sampled_from(PAYLOADS),
    )
    prefixed = st.builds(
        str.__add__,
        st.sampled_from(["@tag:", "@type:", "@dispvm:", "@dispvm:@tag:"]),
        st.text(st.sampled_from(VALUE_CHARS), min_size=1, max_size=8),
    )
    # dom0's grammar takes anything after "@tag:" or "@type:": the way in for an attack.
    prefixes = ("@tag:", "@type:", "@dispvm:")
    keywords = [value for value in good if value.startswith(prefixes)] or good
    injected = st.builds(str.__add__, st.sampled_from(keywords), st.sampled_from(INJECTIONS))
    bad = st.one_of(injected, injected, injected, spliced, prefixed, st.text(max_size=24))
    # Mostly good values, so that whole commands pass often enough to check what they write.
    return st.integers(0, 9).flatmap(lambda dice: bad if dice < bad_in_ten else ok)


@dataclass(frozen=True)
class Command:
    action: str
    source: str | None
    ports: tuple[str, ...]
    target: str | None = None
    default_target: str | None = None
    flags: tuple[str, ...] = ()
    file: str | None = None

    def words(self, options: list[str]) -> list[str]:
        words = [self.action, *(f"--port={port}" for port in self.ports)]
        if self.target is not None:
            words.append(f"--target={self.target}")
        if self.default_target is not None:
            words.append(f"--default-target={self.default_target}")
        if self.file is not None:
            words.append(f"--file={self.file}")
        words += [*self.flags, *options]
        return words + (["--", self.source] if self.source is not None else [])

    def values(self) -> list[str]:
        return [
            value
            for value in (self.source, self.target, self.default_target, *self.ports, self.file)
            if value is not None
        ]


@st.composite
def commands(draw: st.DrawFn) -> Command:
    action = draw(st.sampled_from(["allow", "deny", "remove"]))
    file = draw(st.none() | hostile(FILES, bad_in_ten=1))
    if action == "allow":
        ports = draw(st.lists(hostile(PORTS, bad_in_ten=1), min_size=1, max_size=2))
        flags = draw(st.lists(st.sampled_from(["--ask", "--no-autostart"]), unique=True))
        if draw(st.booleans()):
            return Command(
                action,
                draw(hostile(SOURCES)),
                tuple(ports),
                target=draw(hostile(TARGETS)),
                flags=tuple(flags),
                file=file,
            )
        return Command(
            action,
            draw(hostile(SOURCES)),
            tuple(ports),
            default_target=draw(hostile(REDIRECTS)),
            flags=tuple(flags),
            file=file,
        )
    if action == "deny":
        ports = draw(st.lists(hostile(PORTS, bad_in_ten=1), min_size=1, max_size=2))
        target = draw(st.none() | hostile(TARGETS))
        return Command(action, draw(hostile(SOURCES)), tuple(ports), target=target, file=file)
    if draw(st.integers(0, 5)) == 0:
        return Command(action, None, (), flags=("--all",), file=file)
    ports = draw(st.lists(hostile(PORTS, bad_in_ten=1), max_size=2))
    which = draw(st.sampled_from(["none", "target", "default"]))
    return Command(
        action,
        draw(hostile(SOURCES)),
        tuple(ports),
        target=draw(hostile(TARGETS)) if which == "target" else None,
        default_target=draw(hostile(REDIRECTS)) if which == "default" else None,
        file=file,
    )


# -- what a run must have done ----------------------------------------------------------


def _valid(command: Command) -> bool:
    """Whether every value is in Qubes' character set (the only runs that may write)."""
    tokens = [command.source, command.target]
    return (
        all(token is None or _TOKEN.fullmatch(token) for token in tokens)
        and (command.default_target is None or bool(_REDIRECT.fullmatch(command.default_target)))
        and all(_PORT.fullmatch(port) for port in command.ports)
        and (command.file is None or bool(_FILE.fullmatch(command.file)))
    )


def _asked_lines(command: Command) -> list[str]:
    """The rule lines an accepted allow or deny must add, spelled out by hand."""
    lines = []
    autostart = " autostart=no" if "--no-autostart" in command.flags else ""
    ask = "--ask" in command.flags
    for port in dict.fromkeys(command.ports):
        head = f"{SERVICE} +{port} {command.source}"
        if command.action == "deny":
            lines.append(f"{head} {command.target or '@anyvm'} deny")
        elif command.target is not None:
            if not ask:
                lines.append(f"{head} {command.target} allow{autostart}")
            elif _REDIRECT.fullmatch(command.target):
                default = f" default_target={command.target}"
                lines.append(f"{head} {command.target} ask{default}{autostart}")
            else:
                lines.append(f"{head} {command.target} ask{autostart}")
        else:
            redirect = command.default_target
            if ask:
                action = f"ask target={redirect} default_target={redirect}"
            else:
                action = f"allow target={redirect}"
            lines.append(f"{head} @default {action}{autostart}")
    return lines


def _block(text: str) -> list[str]:
    lines = text.splitlines()
    if BEGIN_MARKER not in lines:
        return []
    begin = lines.index(BEGIN_MARKER)
    return [line for line in lines[begin : lines.index(END_MARKER)] if line.startswith(SERVICE)]


def _key(line: str) -> tuple[str, ...]:
    return tuple(line.split()[:4])


def _removable(command: Command, line: str) -> bool:
    """Whether ``remove`` as asked may drop this rule line of our block."""
    if "--all" in command.flags:
        return True
    _service, argument, source, target, _action, *params = line.split()
    if source != command.source:
        return False
    if command.ports and argument not in {f"+{port}" for port in command.ports}:
        return False
    if command.target is not None:
        return target == command.target
    if command.default_target is not None:
        return target == "@default" and f"target={command.default_target}" in params
    return True


def _touches(rules: list[Rule], call: Call, before: Resolution, after: Resolution) -> bool:
    """Whether one of ``rules`` matches ``call`` (for an ask: its service, argument, source)."""
    for rule in rules:
        alone = evaluate(Policy((rule,)), QUBES, call)
        if alone.rule is not None:
            return True
        asking = "ask" in (before.action, after.action)
        if (
            asking
            and rule.argument in (None, call.argument)
            and rule.source.match(call.source, QUBES)
        ):
            return True
    return False


CALLS = st.builds(
    Call,
    st.sampled_from(["untrusted", "work", "mytcp-service", "default-dvm"]),
    st.sampled_from(["", "mytcp-service", "work", "untrusted", "@dispvm", "@dispvm:default-dvm"]),
    st.just(SERVICE),
    st.sampled_from(["+80", "+444", "+22", "+8080", "+1"]),
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(command=commands(), calls=st.lists(CALLS, min_size=3, max_size=3))
def test_any_text_in_any_argument_is_refused_or_writes_exactly_the_rule_asked_for(
    world: World, command: Command, calls: list[Call]
) -> None:
    before_files = world.start
    before_rules = world.start_rules
    status, out, err = _run(command.words(world.options))
    after_files = world.snapshot()
    after_rules = world.rules() if status == 0 else []
    world.reset(after_files)
    event(f"{command.action}: {'written' if status == 0 else 'refused'}")
    if status != 0:
        assert status in (1, 2)
        assert out == "" and err.endswith("\n")
        [line] = refusal_lines(err)  # after argparse's usage block, if any
        assert line.startswith(("qconnect: error: ", "qconnect policy ")), err
        assert line.isprintable(), err  # one line, no raw control character
        assert "Traceback" not in err
        assert after_files == before_files
        return
    assert _valid(command), f"accepted a value outside Qubes' character set: {command.values()}"
    for name, data in after_files.items():
        text = data.decode()
        assert all(line.isprintable() for line in text.split("\n")), name
    file = "etc/qubes/policy.d/" + (command.file or "30-qconnect.policy")
    for name in set(before_files) | set(after_files):
        if name != file:
            assert before_files.get(name) == after_files.get(name), name
    old_text = before_files.get(file, b"").decode()
    new_text = after_files.get(file, b"").decode()
    old_block, new_block = _block(old_text), _block(new_text)
    if command.action == "remove":
        gone = Counter(old_block) - Counter(new_block)
        assert gone and not Counter(new_block) - Counter(old_block)
        assert all(_removable(command, line) for line in gone)
        assert not [line for line in new_block if _removable(command, line)]
    else:
        asked = _asked_lines(command)
        keys = {_key(line) for line in asked}
        assert new_block == asked + [line for line in old_block if _key(line) not in keys]
    outside = [line for line in new_text.splitlines() if not line.startswith(SERVICE)]
    assert all(line.startswith("#") for line in outside if line not in USER_TEXT.splitlines())

    changed = [r for r in after_rules if r not in before_rules]
    changed += [r for r in before_rules if r not in after_rules]
    for call in calls:
        old = evaluate(Policy(tuple(before_rules)), QUBES, call)
        new = evaluate(Policy(tuple(after_rules)), QUBES, call)
        if (old.action, old.target) != (new.action, new.target):
            assert _touches(changed, call, old, new), (call, old, new)


# -- the examples the class test generalises ---------------------------------------------------


@pytest.fixture
def dom0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Dom0:
    return Dom0(tmp_path, capsys)


INJECTION = "@tag:work web allow\nqubes.ConnectTCP * @anyvm web allow\n#"


@pytest.mark.parametrize(
    "words",
    [
        # the reported example: a second rule letting every qube reach every port of web
        [INJECTION, "--port", "80", "--target", "mytcp-service"],
        ["@type:AppVM\nqubes.ConnectTCP", "--port", "80", "--target", "mytcp-service"],
        ["@dispvm:@tag:a b", "--port", "80", "--target", "mytcp-service"],
        ["untrusted", "--port", "80", "--target", "@tag:work\r* * @anyvm @anyvm allow"],
        ["untrusted", "--port", "80", "--target", "@type:App\x1b[2JVM"],
        ["untrusted", "--port", "80", "--target", "@dispvm:@tag:wo\trk"],
        ["untrusted", "--port", "80", "--target", "@tag:wo.rk"],
        ["untrusted", "--port", "80", "--default-target", "mytcp-service\n* * * * allow"],
        ["untrusted", "--port", "80", "--target", "x", "--file", "30-a\n.policy"],
        ["untrusted", "--port", "80", "--target", "x", "--file", ".hidden.policy"],
    ],
)
def test_a_value_that_would_add_a_word_or_a_line_is_refused(dom0: Dom0, words: list[str]) -> None:
    before = dom0.snapshot()
    status, out, err = dom0.run("allow", *words)
    assert status == 2 and out == ""
    [line] = refusal_lines(err)  # argparse's usage block, then one line
    assert line.isprintable(), err
    assert dom0.snapshot() == before


@pytest.mark.parametrize(
    "words",
    [
        ["deny", "@tag:a\nb", "--port", "80"],
        ["deny", "untrusted", "--port", "80", "--target", "@type:A B"],
        ["remove", "@tag:work\n* * * * allow"],
        ["remove", "untrusted", "--target", "@tag:x\ny"],
        ["remove", "untrusted", "--default-target", "a\x1bb"],
    ],
)
def test_deny_and_remove_refuse_such_values_too(dom0: Dom0, words: list[str]) -> None:
    dom0.run("allow", "untrusted", "--port", "80", "--target", "mytcp-service")
    before = dom0.snapshot()
    status, _, err = dom0.run(*words)
    assert status == 2
    [line] = refusal_lines(err)  # argparse's usage block, then one line
    assert line.isprintable(), err
    assert dom0.snapshot() == before


def test_tags_and_types_in_qubes_character_set_are_written(dom0: Dom0) -> None:
    status, _, _ = dom0.run("allow", "@tag:my_work-2", "--port", "80", "--target", "@type:AppVM")
    assert status == 0
    assert "\nqubes.ConnectTCP +80 @tag:my_work-2 @type:AppVM allow\n" in dom0.ours.read_text()


def test_the_recorded_command_line_is_one_quoted_line(dom0: Dom0) -> None:
    # import-legacy records its --legacy-dir, a path the user chose: here with a
    # newline, an escape sequence and a quote, which must stay inside the comment.
    legacy = dom0.root / "old\nqubes.ConnectTCP * @anyvm @anyvm allow\n\x1b[31m'"
    legacy.mkdir()
    (legacy / "qubes.ConnectTCP+444").write_text("untrusted mytcp-service allow\n")
    status, _, err = dom0.run("import-legacy", "--legacy-dir", str(legacy))
    assert status == 0, err
    lines = dom0.ours.read_text().splitlines()
    recorded = [line for line in lines if line.startswith("# Last change: ")]
    assert len(recorded) == 1 and recorded[0].isprintable()
    assert "\\n" in recorded[0] and "\\x1b" in recorded[0]
    rules = [line for line in lines if line and not line.startswith("#")]
    assert "qubes.ConnectTCP +444 untrusted mytcp-service allow" in rules
    assert all(line.startswith("qubes.ConnectTCP +444 ") for line in rules)
    command = recorded[0].removeprefix("# Last change: ")
    assert command.startswith("qconnect policy import-legacy --legacy-dir $'")
    words = command.split(" ", 4)
    assert _bash_word(words[4]) == str(legacy).encode()


def _bash_word(quoted: str) -> bytes:
    """What bash makes of one quoted word."""
    done = subprocess.run(
        ["bash", "-c", f"printf %s {quoted}"],
        capture_output=True,
        timeout=30,
        check=True,
        env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"},
    )
    return done.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@settings(max_examples=40, deadline=None)
@given(st.text(min_size=1, max_size=12).filter(lambda text: "\x00" not in text))
def test_a_shell_word_pasted_into_bash_gives_the_word_back(word: str) -> None:
    quoted = shell_word(word)
    assert quoted.isprintable()
    assert _bash_word(quoted) == word.encode("utf-8", "surrogateescape")
