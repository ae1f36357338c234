"""``persist add`` with hostile text in any option: refused in one line, or exactly the units meant.

Issue 9, defect 6: a bind address with an IPv6 zone id put an
``ExecStartPre=`` of the caller's choosing into a root unit. The class test
gives hostile text to one option of ``persist add`` at a time (the spec,
every option, and the spec with one hostile character slipped into a valid
one) and asks of every run: refused with one line, no traceback, nothing
written; or every unit file written is printable ASCII, reads back (with
systemd's own syntax, :mod:`qconnect.persist.unitfile`, itself checked
against systemd in ``test_unit_syntax.py``) to exactly the directives the
options ask for, ``persist list`` shows the binding, and the real
``systemd-analyze verify`` accepts every unit without a word. The verify
runs once per batch of units at the end, not once per example, to keep
the test to a few seconds.
"""

import contextlib
import io
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qconnect import cli
from qconnect.core.spec import BindingSpec, parse_spec
from qconnect.persist.unitfile import Directive, directives
from tests.cli_refusals import assert_one_refusal
from tests.persist_tree import (
    QUBE_HOME,
    fake_executable,
    install_analyze_support,
    make_qube_tree,
    run_persist,
    snapshot,
)

SYSTEM_UNITS = "usr/local/lib/systemd/system"
USER_UNITS = "home/user/.config/systemd/user"
DOCUMENTATION = "https://www.qubes-os.org/doc/firewall/"

#: The example of issue 9: a zone id carrying a directive of the caller's choosing.
ISSUE_EXAMPLE = "[::1%x\nExecStartPre=touch pwned\n#]:8080:web:80"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def test_the_zone_id_injection_of_issue_9_is_refused_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    tree = make_qube_tree(tmp_path / "qube")
    before = snapshot(tree)
    result = run_persist(
        "add", ISSUE_EXAMPLE, "--root", str(tree), "--system",
        "--relay", "handoff", "--persistence", "full",
    )  # fmt: skip
    assert result.stdout == ""
    assert_one_refusal(
        result.returncode, result.stderr, 2, "[::1%x\\nExecStartPre=touch pwned\\n#]", "zone"
    )
    assert snapshot(tree) == before


# --- the class test ----------------------------------------------------------------

# Characters that mean something to systemd, a shell, argparse or a terminal.
_NASTY = [*"\n\r\0\t \\%$\"';#[]=@:/.-_+*~`{}", "\x1b", "\x85", "\u2028", "\u00e9"]
HOSTILE = st.text(st.one_of(st.sampled_from(_NASTY), st.characters()), max_size=24)

QUBE_NAMES = st.from_regex(r"[a-z][a-z0-9_.-]{0,8}", fullmatch=True).filter(
    lambda name: name not in ("none", "default")
)
TARGETS = st.one_of(
    st.sampled_from(["", "@default", "$default", "@dispvm", "$dispvm"]),
    QUBE_NAMES,
    QUBE_NAMES.map(lambda name: f"@dispvm:{name}"),
)
BINDS = st.one_of(
    st.sampled_from(["", "localhost:", "*:", "0.0.0.0:"]),
    st.ip_addresses(v=4).map(lambda address: f"{address}:"),
    st.ip_addresses(v=6).map(lambda address: f"[{address}]:"),
)
# Mostly ports a user's systemd may bind, so that --user is accepted often.
PORTS = st.one_of(st.integers(1024, 65535), st.integers(1024, 65535), st.integers(1, 65535)).map(
    str
)
VALID_SPECS = st.builds(
    lambda bind, local, target, remote: f"{bind}{local}:{target}:{remote}",
    BINDS, st.one_of(st.just(""), PORTS), TARGETS, PORTS,
)  # fmt: skip

# Stand-ins for the fake executables, which exist only once the test runs.
QCV, OLD_QCV, SOCAT, CLIENT = "<qcv>", "<old-qcv>", "<socat>", "<client>"
PLAIN_PATHS = st.from_regex(r"(/[A-Za-z0-9_.+-]{1,6}){1,3}", fullmatch=True)


@st.composite
def spec_texts(draw: st.DrawFn, hostile: bool) -> str:
    if not hostile:
        return draw(VALID_SPECS)
    kind = draw(st.sampled_from(["text", "insert", "zone"]))
    if kind == "text":
        return draw(HOSTILE)
    if kind == "zone":
        address = draw(st.ip_addresses(v=6))
        return f"[{address}%{draw(HOSTILE)}]:{draw(PORTS)}:{draw(TARGETS)}:{draw(PORTS)}"
    valid = draw(VALID_SPECS)
    where = draw(st.integers(0, len(valid)))
    return valid[:where] + draw(HOSTILE.filter(bool)) + valid[where:]


# A directory name of hostile text (what a file name can hold): --root must
# not reach the content of any file written under it.
DIRECTORY_NAMES = HOSTILE.filter(
    lambda name: name not in ("", ".", "..") and "/" not in name and "\0" not in name
)


@st.composite
def add_arguments(draw: st.DrawFn) -> tuple[list[str], str]:
    """``persist add`` words (without --root) and the name of the directory above the root.

    Valid settings, one of them maybe hostile.
    """
    hostile = draw(
        st.sampled_from(
            [None, None, None, None, "spec", "spec", "spec", "mode", "max-connections", "relay",
             "qrexec-client-vm", "socat", "qvm-connect-tcp", "persistence", "scope", "root"]
        )
    )  # fmt: skip
    words = [draw(spec_texts(hostile == "spec"))]

    def option(name: str, valid: st.SearchStrategy[str | None]) -> None:
        value = draw(HOSTILE if hostile == name else valid)
        if value is not None:
            words.extend([f"--{name}", value])

    if hostile == "scope":
        words.append(draw(HOSTILE))
    else:
        words.extend(draw(st.sampled_from([[], [], ["--user"], ["--system"]])))
    mode = draw(st.sampled_from([None, None, "per-connection", "daemon"]))
    option("mode", st.just(mode))
    # Mostly coherent settings (per-connection options with per-connection
    # mode, executables that exist), so that many runs are accepted; now
    # and then not, so that those refusals are exercised too.
    per_connection = mode != "daemon" or draw(st.integers(0, 9)) == 0
    if per_connection or hostile == "max-connections":
        counts = st.one_of(st.integers(1, 128), st.integers(1, 128), st.sampled_from([0, 129]))
        option("max-connections", st.one_of(st.none(), counts.map(str)))
    if per_connection or hostile == "relay":
        option("relay", st.sampled_from([None, "auto", "handoff", "handoff", "socat"]))
    option(
        "qrexec-client-vm",
        st.one_of(st.sampled_from([QCV, QCV, OLD_QCV, None]), PLAIN_PATHS)
        if draw(st.integers(0, 4)) == 0
        else st.sampled_from([QCV, OLD_QCV]),
    )
    option("socat", st.one_of(st.just(SOCAT), st.just(None), PLAIN_PATHS))
    option("qvm-connect-tcp", st.one_of(st.sampled_from([None, CLIENT, CLIENT]), PLAIN_PATHS))
    option("persistence", st.sampled_from([None, "full", "rw-only", "none"]))
    if draw(st.booleans()):
        words.append("--replace")
    return words, draw(DIRECTORY_NAMES) if hostile == "root" else "plain"


def run_qconnect(*words: str) -> tuple[int, str, str]:
    """``qconnect WORDS`` in this process (a child per example would take minutes)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(words))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def assert_refused_in_one_line(code: int, out: str, err: str) -> None:
    """One error line: after the usage lines with exit 2 (a wrong command line), alone
    with exit 1 (the command line was fine, but it could not be done: a missing program).
    """
    assert code in (1, 2), (code, out, err)
    assert "Traceback" not in err and out == ""
    lines = err.split("\n")  # what a terminal breaks lines at ("\x1e" is no break)
    assert lines[-1] == "" and _ERROR_LINE_RE.match(lines[-2]), err
    assert all(char.isprintable() for char in lines[-2]), err
    if code == 2:  # argparse's way: "usage: ..." and its indented continuation lines
        assert lines[0].startswith("usage: "), err
        assert all(line.startswith(" ") for line in lines[1:-2]), err
    else:
        assert len(lines) == 2, err


_ERROR_LINE_RE = re.compile(r"qconnect(?: persist add)?: error: ")


@dataclass(frozen=True)
class Meant:
    """What a run of ``persist add`` asked for, read from its words alone."""

    spec: BindingSpec
    scope: str
    mode: str
    max_connections: int
    relay: str
    qrexec_client_vm: str
    socat: str
    client: str


def _option(words: list[str], name: str, default: str) -> str:
    """The value of option ``name``; an empty value asks for the default, as not giving it."""
    return (words[words.index(name) + 1] if name in words else "") or default


def meant(words: list[str], fakes: dict[str, str]) -> Meant:
    spec = parse_spec(words[0])
    scope = "user" if spec.local_port >= 1024 else "system"
    scope = "user" if "--user" in words else "system" if "--system" in words else scope
    qcv = _option(words, "--qrexec-client-vm", "/usr/bin/qrexec-client-vm")
    relay = _option(words, "--relay", "auto")
    if relay == "auto":
        relay = "handoff" if qcv == fakes[QCV] else "socat"
    return Meant(
        spec,
        scope,
        _option(words, "--mode", "per-connection"),
        int(_option(words, "--max-connections", "64")),
        relay,
        qcv,
        _option(words, "--socat", "/usr/bin/socat"),
        _option(words, "--qvm-connect-tcp", str(Path(sys.executable).parent / "qvm-connect-tcp")),
    )


def expected_units(asked: Meant) -> dict[str, list[Directive]]:
    """Suffix of each unit file (socket, service) -> its directives, from the templates' text."""
    spec = asked.spec
    bind = f"[{spec.bind_address}]" if ":" in spec.bind_address else spec.bind_address
    listen = Directive("Socket", "ListenStream", f"{bind}:{spec.local_port}")
    install = Directive("Install", "WantedBy", "sockets.target")
    call = f"-- {spec.target} qubes.ConnectTCP+{spec.remote_port}"
    if asked.mode == "daemon":
        fd_name = f"{spec.target.replace(':', '=')}+{spec.remote_port}"
        return {
            ".socket": [
                Directive(
                    "Unit", "Description",
                    f"qconnect binding {spec} (served by qconnect-bindings.service)",
                ),
                Directive("Unit", "Documentation", DOCUMENTATION),
                listen,
                Directive("Socket", "Accept", "no"),
                Directive("Socket", "FileDescriptorName", fd_name),
                Directive("Socket", "Service", "qconnect-bindings.service"),
                install,
            ],
            "qconnect-bindings.service": [
                Directive(
                    "Unit", "Description", "qconnect client serving every daemon-mode binding"
                ),
                Directive("Unit", "Documentation", DOCUMENTATION),
                Directive("Service", "Type", "notify"),
                Directive("Service", "ExecStart", f"{asked.client} --systemd"),
            ],
        }  # fmt: skip
    if asked.relay == "handoff":
        exec_start = f"{asked.qrexec_client_vm} --use-stdin-socket {call}"
    else:
        relay = (
            f"exec {asked.socat} -t 31536000 STDIN!!STDOUT,shut-down FD:$${{SAVED_FD_0}},shut-down"
        )
        exec_start = f'{asked.qrexec_client_vm} {call} /bin/sh -c "{relay}"'
    return {
        ".socket": [
            Directive(
                "Unit", "Description", f"qconnect binding {spec} (one qrexec call per connection)"
            ),
            Directive("Unit", "Documentation", DOCUMENTATION),
            listen,
            Directive("Socket", "Accept", "yes"),
            Directive("Socket", "MaxConnections", str(asked.max_connections)),
            install,
        ],
        "@.service": [
            Directive("Unit", "Description", f"qconnect binding {spec}: one connection"),
            Directive("Unit", "Documentation", DOCUMENTATION),
            Directive("Unit", "CollectMode", "inactive-or-failed"),
            Directive("Service", "ExecStart", exec_start),
            Directive("Service", "StandardInput", "socket"),
            Directive("Service", "StandardOutput", "journal"),
            Directive("Service", "StandardError", "journal"),
        ],
    }


@dataclass
class Batch:
    """Unit files and the executables they run, verified together in one tree."""

    units: dict[str, str]
    executables: set[str]

    def takes(self, units: dict[str, str], executables: set[str]) -> bool:
        """Whether no unit name and no executable path (file against directory) clashes."""
        paths = self.executables | executables
        return all(self.units.get(name, text) == text for name, text in units.items()) and not any(
            other.startswith(path + "/") for path in paths for other in paths
        )


@dataclass
class Batches:
    """Unit files to verify, in trees whose names never clash (one verify call per tree)."""

    base: Path
    batches: list[Batch]

    def add(self, units: dict[str, str], executables: set[str]) -> None:
        for batch in self.batches:
            if batch.takes(units, executables):
                batch.units.update(units)
                batch.executables.update(executables)
                return
        self.batches.append(Batch(dict(units), set(executables)))

    def verify(self) -> Iterator[subprocess.CompletedProcess[str]]:
        for number, batch in enumerate(self.batches):
            root = self.base / f"verify-{number}"
            (root / SYSTEM_UNITS).mkdir(parents=True)
            install_analyze_support(root)
            for path in batch.executables:
                fake_executable(root / path.lstrip("/"))
            for name, text in batch.units.items():
                (root / SYSTEM_UNITS / name).write_text(text)
            yield subprocess.run(
                ["systemd-analyze", "verify", f"--root={root}", "--man=no",
                 *(f"/{SYSTEM_UNITS}/{name}" for name in sorted(batch.units))],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip


def executables_of(asked: "Meant") -> set[str]:
    """The executables the units of a run start (systemd-analyze checks they exist)."""
    if asked.mode == "daemon":
        return {asked.client}
    return {asked.qrexec_client_vm, *([asked.socat] if asked.relay == "socat" else [])}


@pytest.fixture
def fakes(tmp_path: Path) -> dict[str, str]:
    """The executables a run may name: qrexec-client-vm with and without handoff, and so on."""
    bin_dir = tmp_path / "bin"
    current = fake_executable(bin_dir / "qrexec-client-vm")
    current.write_text("#!/bin/sh\necho '  --use-stdin-socket  use fd 0 for both directions'\n")
    return {
        QCV: str(current),
        OLD_QCV: str(fake_executable(bin_dir / "old" / "qrexec-client-vm")),
        SOCAT: str(fake_executable(bin_dir / "socat")),
        CLIENT: str(fake_executable(bin_dir / "qvm-connect-tcp")),
    }


def test_hostile_options_are_refused_or_give_exactly_the_units_meant(
    tmp_path: Path, fakes: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", QUBE_HOME)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    batches = Batches(tmp_path, [])
    accepted: list[list[str]] = []

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(add_arguments())
    def one_run(arguments: tuple[list[str], str]) -> None:
        words = [fakes.get(word, word) for word in arguments[0]]
        above = Path(tempfile.mkdtemp(dir=tmp_path))
        try:
            (above / arguments[1]).mkdir()
            above /= arguments[1]
        except (OSError, UnicodeEncodeError):  # a name this file system cannot hold
            pass
        tree = make_qube_tree(above / "qube")
        before = snapshot(tree)
        code, out, err = run_qconnect("persist", "add", *words, "--root", str(tree))
        if code != 0:
            assert_refused_in_one_line(code, out, err)
            assert snapshot(tree) == before
            return
        assert err == ""
        asked = meant(words, fakes)
        unit_dir = tree / (USER_UNITS if asked.scope == "user" else SYSTEM_UNITS)
        written = {
            path.name: path.read_bytes()
            for path in unit_dir.iterdir()
            if path.is_file() and not path.is_symlink()
        }
        for data in written.values():
            assert all(0x20 <= byte < 0x7F or byte == 0x0A for byte in data)
        texts = {name: data.decode() for name, data in written.items()}
        expected = expected_units(asked)
        assert len(texts) == len(expected)
        for suffix, wanted in expected.items():
            [name] = [name for name in texts if name.endswith(suffix)]
            assert directives(texts[name]) == wanted, texts[name]
        code, out, err = run_qconnect("persist", "list", "--root", str(tree))
        rows = [line.split() for line in out.splitlines()[1:]]
        assert (code, err) == (0, "")
        assert [row[:3] for row in rows] == [[str(asked.spec), asked.mode, asked.scope]]
        batches.add(texts, executables_of(asked))
        accepted.append(words)

    one_run()
    assert len(accepted) >= 10, "too few accepted runs to say anything of the units"
    for result in batches.verify():
        assert (result.returncode, result.stdout + result.stderr) == (0, ""), result.args
