"""units/unitfile.py reads unit files as systemd does, and refuses what systemd would misread.

The reader is checked against the real ``systemd-analyze verify``: each
probe below puts an ``Accept=`` value of its own (never a boolean) behind
one rule of the syntax, and systemd reports every ``Accept=`` value it saw (never "y", "n", "t" or
"f": those are booleans to systemd)
("Failed to parse boolean value, ignoring: VALUE"). The reader must see
exactly those values, in the same order.
"""

import re
import shutil
import string
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qconnect.core.errors import PersistError
from qconnect.persist.render import load_templates
from qconnect.persist.unitfile import Directive, check_line, directives, exec_line
from tests.persist_tree import fake_executable, install_analyze_support

HEAD = "[Socket]\nListenStream=127.0.0.1:1\n"

# name -> (what follows HEAD, the Accept= values systemd sees)
PROBES: dict[str, tuple[str, list[str]]] = {
    "cr-ends-a-comment-line": ("# c\rAccept=cr\n", ["cr"]),
    "crlf-is-one-line-end": ("# c\r\nAccept=crlf\n", ["crlf"]),
    "nul-ends-a-line": ("# c\0Accept=nul\n", ["nul"]),
    "comment-is-never-continued": ("# c \\\nAccept=after\n", ["after"]),
    "semicolon-comment": ("; Accept=hidden\nAccept=shown\n", ["shown"]),
    "indented-comment": ("  # Accept=hidden \\\nAccept=next\n", ["next"]),
    "continuation-joins-with-a-space": ("Accept=a \\\nb\n", ["a  b"]),
    "comment-inside-a-continuation": ("Accept=c \\\n# x\nd\n", ["c  d"]),
    "empty-line-ends-a-continuation": ("Accept=e \\\n\nAccept=ef\n", ["e", "ef"]),
    "escaped-backslash-does-not-continue": ("Accept=g\\\\\nAccept=h\n", ["g\\\\", "h"]),
    "blanks-around-are-dropped": ("  Accept =  i  \n\tAccept=j\n", ["i", "j"]),
    "vertical-tab-is-no-line-end": ("# c\x0bAccept=hidden\nAccept=k\n", ["k"]),
    "unicode-separator-is-no-line-end": ("# c\u2028Accept=hidden\nAccept=l\n", ["l"]),
}

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)

_SEEN_RE = re.compile(r"^(?P<path>/[^:]+):\d+: Failed to parse boolean value, ignoring: (?P<v>.*)$")


def test_the_reader_sees_the_accept_values_systemd_sees(tmp_path: Path) -> None:
    units = {}
    for name, (body, _expected) in PROBES.items():
        path = tmp_path / f"probe-{name}.socket"
        path.write_bytes((HEAD + body).encode())
        (tmp_path / f"probe-{name}.service").write_text("[Service]\nExecStart=/bin/true\n")
        units[str(path)] = name
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    seen: dict[str, list[str]] = {name: [] for name in PROBES}
    for line in result.stderr.splitlines():
        match = _SEEN_RE.match(line)
        if match and match["path"] in units:
            seen[units[match["path"]]].append(match["v"])
    ours = {
        name: [item.value for item in directives(HEAD + body) if item.key == "Accept"]
        for name, (body, _expected) in PROBES.items()
    }
    assert seen == {name: expected for name, (_body, expected) in PROBES.items()}, result.stderr
    assert ours == seen


@pytest.mark.parametrize(
    "value",
    ["a\nb", "a\rb", "a\0b", "50%", "%i", "a\\", " a", "a ", "a\tb", "caf\u00e9", "\x1b[2J", ""],
)
def test_a_value_systemd_would_misread_is_refused_in_one_line(value: str) -> None:
    if value == "":
        assert check_line(value, "description") == ""  # an empty value is one value
        return
    with pytest.raises(PersistError) as caught:
        check_line(value, "description")
    assert "\n" not in str(caught.value) and "\r" not in str(caught.value)
    assert str(caught.value).startswith("invalid description '")


def test_plain_values_pass_unchanged() -> None:
    for value in ["qconnect binding [::1]:8080:@dispvm:x:80", "a\\x40b-80@.service", "$x 'q'"]:
        assert check_line(value, "value") == value


def test_exec_line_quotes_what_systemd_would_read_otherwise() -> None:
    argv = ["/usr/bin/q", "--", "@dispvm:x", "/bin/sh", "-c", 'exec a "b" ${X} 50% \\ ;']
    assert exec_line(argv) == (
        '/usr/bin/q -- @dispvm:x /bin/sh -c "exec a \\"b\\" $${X} 50%% \\\\ ;"'
    )
    assert exec_line(["/x", ";", ""]) == '/x ";" ""'


@pytest.mark.parametrize("argv", [[], ["x"], ["-/x"], ["/x y"], ["/x", "a\nb"], ["/x", "\u00e9"]])
def test_exec_line_refuses_what_it_cannot_write_plainly(argv: list[str]) -> None:
    with pytest.raises(PersistError):
        exec_line(argv)


_LINE_VALUES = st.text(st.sampled_from([*string.printable, "\0", "\x85", "\u2028", "%"]))
_COMMENTS = ("header", "relay_note")


@given(
    template=st.sampled_from(sorted(load_templates().texts)),
    value=_LINE_VALUES,
    comment=_LINE_VALUES,
)
def test_a_rendered_template_has_its_own_directives_or_is_refused(
    template: str, value: str, comment: str
) -> None:
    """Any text in every placeholder: refused in one line, or exactly the template's directives."""
    templates = load_templates()
    text = templates.texts[template]
    names = set(re.findall(r"\$\{(\w+)\}", text))
    values = {name: f"# {comment}" if name in _COMMENTS else value for name in names}
    try:
        rendered = templates.render(template, **values)
    except PersistError as error:
        assert "\n" not in str(error) and "\r" not in str(error)
        return
    skeleton = string.Template(text).safe_substitute({name: "#" for name in _COMMENTS})
    expected = [
        Directive(item.section, item.key, string.Template(item.value).substitute(values))
        for item in directives(skeleton)
    ]
    assert directives(rendered) == expected


def test_exec_line_keeps_a_semicolon_and_specifiers_one_word_for_systemd(tmp_path: Path) -> None:
    """Unquoted, ';' would start a second command and "%1" fail as a specifier; quoted, neither."""
    install_analyze_support(tmp_path)
    fake_executable(tmp_path / "bin" / "x")
    unit = tmp_path / "etc/systemd/system/probe-exec.service"
    unit.parent.mkdir(parents=True)

    def verify(exec_start: str) -> str:
        unit.write_text(f"[Service]\nExecStart={exec_start}\n")
        return subprocess.run(
            ["systemd-analyze", "verify", f"--root={tmp_path}", "--man=no",
             "/etc/systemd/system/probe-exec.service"],
            capture_output=True, text=True, timeout=60, check=False,
        ).stderr  # fmt: skip

    words = ["/bin/x", ";", "/nonexistent", "100%1", "a\\", '"', "$HOME"]
    assert verify(exec_line(words)) == ""
    assert "more than one ExecStart" in verify(" ".join(words[:3]))
    assert "specifier" in verify(" ".join(["/bin/x", words[3]]))
