"""The registry of running bindings cannot be spoofed by another local user.

``qconnect list`` and ``stop`` use a directory chain only when no other user
could have made or changed it, believe an answer only from a process of
their own user (SO_PEERCRED), and print what a process says escaped; a
client process answers only its own user and root.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qconnect.client import registry
from qconnect.client.control import STATUS, ProcessStatus, ask_all
from qconnect.client.list_command import format_table
from qconnect.core.errors import ClientError
from qconnect.core.unixpath import bind_unix
from qconnect.loopback.machine import Machine
from tests.as_nobody import NOBODY, as_nobody, can_play_nobody
from tests.client_world import free_port

needs_root = pytest.mark.skipif(not can_play_nobody(), reason="plays another user: needs root")

#: Another local user, the one who plants things.
OTHER_UID = 12345

REPO = Path(__file__).resolve().parent.parent

HOSTILE_STATUS = {
    "pid": 4242,
    "started": 0,
    "mode": "handoff\x1b]0;owned\x07",
    "systemd": False,
    "log": "/tmp/x.log\nlog: /etc/shadow",
    "bindings": [
        {
            "spec": "127.0.0.1:8080:web\x1b[2J:80",
            "open": "\r0",
            "max": 64,
            "served": 1,
            "refused": 0,
            "stopping": False,
        }
    ],
}


def qconnect(
    env: dict[str, str], *args: str, **kwargs: object
) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [sys.executable, "-m", "qconnect.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,  # type: ignore[call-overload]
    )


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """QCONNECT_RUNTIME_DIR: the registry is base/client."""
    directory = tmp_path / "base"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv(registry.RUNTIME_DIR_ENV, str(directory))
    return directory


class Answerer:
    """A fake client process: answers every request on ``sock`` with ``status``; keeps requests."""

    def __init__(self, sock: socket.socket, status: dict[str, object]) -> None:
        self.sock, self.status, self.requests = sock, status, list[bytes]()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.requests.append(conn.recv(512))
                conn.sendall(json.dumps(self.status).encode() + b"\n")

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=10)


@pytest.fixture
def answer_at() -> Iterator[Callable[[Path, dict[str, object]], Answerer]]:
    started: list[Answerer] = []

    def start(path: Path, status: dict[str, object]) -> Answerer:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bind_unix(sock, str(path))  # a worker's tmp_path can be longer than sun_path
        sock.listen()
        answerer = Answerer(sock, status)
        started.append(answerer)
        return answerer

    yield start
    for answerer in started:
        answerer.close()


# -- the directory chain -------------------------------------------------------


def _other_users_base(base: Path) -> None:
    os.chown(base, OTHER_UID, OTHER_UID)


def _base_writable_by_all(base: Path) -> None:
    base.chmod(0o777)


def _registry_of_another_user(base: Path) -> None:
    (base / "client").mkdir(mode=0o700)
    os.chown(base / "client", OTHER_UID, OTHER_UID)


def _registry_readable_by_others(base: Path) -> None:
    (base / "client").mkdir()
    (base / "client").chmod(0o755)


def _registry_is_a_symlink(base: Path) -> None:
    (base / "elsewhere").mkdir(mode=0o700)
    (base / "client").symlink_to(base / "elsewhere")


def _registry_is_a_file(base: Path) -> None:
    (base / "client").write_text("")


HOSTILE_CHAINS = {
    "base of another user": (_other_users_base, "base belongs to uid 12345"),
    "base writable by all": (_base_writable_by_all, "base is writable by others (mode 0777)"),
    "registry of another user": (_registry_of_another_user, "client belongs to uid 12345"),
    "registry readable by others": (_registry_readable_by_others, "client has mode 0755"),
    "registry is a symlink": (_registry_is_a_symlink, "client is not a directory"),
    "registry is a file": (_registry_is_a_file, "client is not a directory"),
}


@needs_root
@pytest.mark.parametrize("case", sorted(HOSTILE_CHAINS))
def test_a_chain_another_user_could_change_is_refused_with_one_line(
    base: Path, case: str, answer_at: Callable[[Path, dict[str, object]], Answerer]
) -> None:
    spoil, problem = HOSTILE_CHAINS[case]
    spoil(base)
    before = sorted(str(path) for path in base.rglob("*"))
    for attempt in (registry.ensure_runtime_dir, lambda: ask_all(STATUS)):
        with pytest.raises(ClientError) as raised:
            attempt()
        message = str(raised.value)
        assert message.startswith(f"refusing to use {base / 'client'}: ")
        assert problem in message and "\n" not in message
    assert sorted(str(path) for path in base.rglob("*")) == before  # nothing made, nothing fixed
    env = dict(os.environ)
    result = qconnect(env, "list")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stdout == ""


@needs_root
def test_a_sticky_base_writable_by_all_is_fine_when_the_registry_is_ours(base: Path) -> None:
    base.chmod(0o1777)  # like /tmp
    assert registry.ensure_runtime_dir() == base / "client"
    assert ask_all(STATUS) == []


@needs_root
def test_without_xdg_runtime_dir_a_tmp_directory_planted_by_another_user_is_not_used(
    tmp_path: Path, answer_at: Callable[[Path, dict[str, object]], Answerer]
) -> None:
    # Another user made /tmp/qconnect-UID first, and answers in it as if it were
    # one of nobody's client processes.
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    temporary.chmod(0o1777)
    planted = temporary / f"qconnect-{NOBODY}" / "client"
    planted.mkdir(parents=True)
    for directory in (planted, planted.parent):
        directory.chmod(0o777)
        os.chown(directory, OTHER_UID, OTHER_UID)
    spoof = answer_at(planted / "4242.sock", HOSTILE_STATUS)
    os.chmod(planted / "4242.sock", 0o777)
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("QCONNECT_") and name != "XDG_RUNTIME_DIR"
    }
    env["TMPDIR"] = str(temporary)
    for command in (["list"], ["stop", "--all"]):
        result = subprocess.run(
            [*as_nobody(), sys.executable, "-m", "qconnect.cli", *command],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert result.stderr.splitlines() == [
            f"qconnect: error: refusing to use {planted}: {planted} belongs to uid "
            f"{OTHER_UID}; expected a directory of uid {NOBODY} with mode 0700"
        ]
    assert spoof.requests == []


# -- the peer's uid, and what it says -----------------------------------------------


@needs_root
def test_an_answer_from_another_users_process_is_not_believed(base: Path) -> None:
    directory = registry.ensure_runtime_dir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(directory / "4242.sock"))
    # It listens as nobody: SO_PEERCRED reports who called listen().
    answerer = subprocess.Popen(
        [
            *as_nobody(),
            sys.executable,
            "-c",
            "import json, socket, sys\n"
            "sock = socket.socket(fileno=int(sys.argv[1])); sock.listen()\n"
            "print('listening', flush=True)\n"
            "while True:\n"
            "    conn, _ = sock.accept()\n"
            "    try:\n"
            "        request = conn.recv(512)\n"
            "        if request: print(repr(request), flush=True)\n"
            "        conn.sendall(sys.argv[2].encode() + b'\\n')\n"
            "    except OSError: pass\n"
            "    conn.close()\n",
            str(sock.fileno()),
            json.dumps(HOSTILE_STATUS),
        ],
        pass_fds=[sock.fileno()],
        stdout=subprocess.PIPE,
        text=True,
    )
    sock.close()
    try:
        assert answerer.stdout is not None
        assert answerer.stdout.readline() == "listening\n"
        for command in (["list"], ["list", "--json"], ["stop", "--all"]):
            result = qconnect(dict(os.environ), *command)
            assert result.returncode == 1, result.stdout
            assert result.stderr.splitlines() == [
                f"qconnect: error: {directory / '4242.sock'}: answered by a process of uid "
                f"{NOBODY}, not of this user (uid 0); not believed"
            ]
            assert "web" not in result.stdout
    finally:
        answerer.kill()
        requests, _ = answerer.communicate(timeout=30)
    assert requests == ""  # not even asked: no "stop" reached it


def test_what_a_process_says_is_printed_escaped(
    base: Path, answer_at: Callable[[Path, dict[str, object]], Answerer]
) -> None:
    directory = registry.ensure_runtime_dir()
    answer_at(directory / "4242.sock", HOSTILE_STATUS)
    result = qconnect(dict(os.environ), "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(line.isprintable() for line in lines), lines
    assert "127.0.0.1:8080:web\\x1b[2J:80" in lines[1]
    assert "handoff\\x1b]0;owned\\x07" in lines[1] and "\\r0/64" in lines[1]
    assert "log: /tmp/x.log\\nlog: /etc/shadow" in lines
    stop = qconnect(dict(os.environ), "stop", "--all")
    assert stop.returncode == 1
    assert stop.stderr.isprintable() or stop.stderr[:-1].isprintable()
    assert len(stop.stderr.splitlines()) == 1
    assert "web\\x1b[2J" in stop.stderr


@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "pid": st.integers(),
                "mode": st.text(),
                "systemd": st.booleans(),
                "bindings": st.lists(
                    st.fixed_dictionaries(
                        {
                            "spec": st.text(),
                            "open": st.one_of(st.integers(), st.text()),
                            "max": st.integers(),
                            "served": st.one_of(st.integers(), st.text()),
                            "refused": st.integers(),
                            "hung": st.text(),
                            "stopping": st.booleans(),
                        }
                    ),
                    max_size=3,
                ),
            }
        ),
        max_size=3,
    )
)
def test_the_list_table_is_printable_whatever_the_processes_say(
    answers: list[dict[str, object]],
) -> None:
    for line in format_table([ProcessStatus.from_json(answer) for answer in answers]):
        assert line.isprintable()


def test_an_answer_of_the_wrong_shape_is_one_line_not_a_traceback(
    base: Path, answer_at: Callable[[Path, dict[str, object]], Answerer]
) -> None:
    directory = registry.ensure_runtime_dir()
    answer_at(directory / "1.sock", {"pid": 1, "bindings": [{"open": 1}]})  # no spec
    result = qconnect(dict(os.environ), "stop", "--all")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"qconnect: error: {directory / '1.sock'}: no valid answer"
    ]


# -- the client process's side ----------------------------------------------------------


@needs_root
def test_a_client_process_ignores_requests_from_another_user(
    base: Path, loopback_machine: Callable[..., Machine], echo_server: int
) -> None:
    machine = loopback_machine("untrusted", "web")
    env = machine.env_for("untrusted")
    env.pop("NOTIFY_SOCKET", None)
    port = free_port()
    client = subprocess.Popen(
        [sys.executable, "-m", "qconnect.client.cli", "-f", f"{port}:web:{echo_server}"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().startswith("Binding TCP")
        control = base / "client" / f"{client.pid}.sock"
        # nobody, with the right to open any file: as if the socket had leaked to it
        asked = subprocess.run(
            [
                *as_nobody("dac_override"),
                sys.executable,
                "-c",
                "import socket, sys\n"
                "sock = socket.socket(socket.AF_UNIX); sock.connect(sys.argv[1])\n"
                "try: sock.sendall(b'stop\\n'); print(repr(sock.recv(65536)))\n"
                "except (BrokenPipeError, ConnectionResetError): print(repr(b''))\n",
                str(control),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert asked.returncode == 0, asked.stderr
        assert asked.stdout == "b''\n"  # closed without a word
        (answer,) = ask_all(STATUS)  # its own user still gets answers
        assert answer.pid == client.pid
        assert [binding.stopping for binding in answer.bindings] == [False]
    finally:
        client.terminate()
        _, log = client.communicate(timeout=60)
    assert f"control socket: ignored a request from uid {NOBODY}" in log


@needs_root
def test_a_user_is_pointed_to_roots_registry_it_cannot_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qconnect.client import list_command

    outer = Path(tempfile.mkdtemp(prefix="qconnect-root-hint-"))
    try:
        outer.chmod(0o755)
        roots = outer / "client"
        roots.mkdir(mode=0o700)
        monkeypatch.setattr(list_command, "ROOT_REGISTRY", str(roots))
        hints = []
        for content in ([], ["1.sock"]):
            for name in content:
                (roots / name).write_text("")
            os.seteuid(NOBODY)
            try:
                hints.append(list_command.root_hint())
            finally:
                os.seteuid(0)
            hints.append(list_command.root_hint())  # root itself: no hint
        assert hints == [
            "root may also run bindings here: see them with 'sudo qconnect list'",
            None,
            "root may also run bindings here: see them with 'sudo qconnect list'",
            None,
        ]
        roots.chmod(0o755)  # a registry a user can read: the hint only when it has entries
        os.seteuid(NOBODY)
        try:
            assert list_command.root_hint() == (
                "root also runs bindings here: see them with 'sudo qconnect list'"
            )
        finally:
            os.seteuid(0)
        monkeypatch.setattr(list_command, "ROOT_REGISTRY", str(outer / "missing"))
        os.seteuid(NOBODY)
        try:
            assert list_command.root_hint() is None
        finally:
            os.seteuid(0)
    finally:
        shutil.rmtree(outer)
