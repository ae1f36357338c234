"""Both forms of qubes.ConnectTCP fail closed, identically, on every unusable allowlist.

The allowlist searched first is put in each state a broken or hostile tree can
show (a dangling symbolic link, on the file or on a directory of its path, a
link loop, an unreadable file, a directory, a FIFO, an invalid line, bytes
that are not UTF-8), while the one searched second serves every port: a
service that mistook the first for "no allowlist", or skipped it, would serve
the call. Both services must refuse it; the executable tells the caller one
generic line (no path, no line, no other qube's name) and exits 126, the
socket service closes the call without a byte, and both log the details.

The services run as processes, as qrexec runs them. As root, they run without
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (setpriv), so that a mode-000 file is
as unreadable to them as it is to a service running unprivileged.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qconnect.service.install import install_into_rpc_dir
from tests.conftest import recv_all
from tests.servers import ThreadedTCPServer, echo

TIMEOUT = 20.0

#: A second allowlist that serves every port to every caller.
SERVES_ALL = "1-65535\n"

# Runs a command without the capabilities that let root read any file.
WITHOUT_DAC = (
    [
        "setpriv",
        "--inh-caps=-dac_override,-dac_read_search",
        "--bounding-set=-dac_override,-dac_read_search",
    ]
    if os.geteuid() == 0
    else []
)


def _dangling_link(path: Path) -> None:
    path.symlink_to(path.parent / "nowhere.allow")


def _dangling_directory_link(path: Path) -> None:
    """The file is "missing" only because its directory is a link to nothing."""
    shutil.rmtree(path.parent)
    path.parent.symlink_to(path.parent.parent / "missing-directory")


def _link_loop(path: Path) -> None:
    path.symlink_to(path.name)


def _unreadable(path: Path) -> None:
    path.write_text("1-65535\n")
    path.chmod(0)


def _directory(path: Path) -> None:
    path.mkdir()


def _fifo(path: Path) -> None:
    os.mkfifo(path)  # nobody writes it: a blocking open would hang the service


def _invalid_line(path: Path) -> None:
    path.write_text("80 web-secrets\n8080 @anyvm\n")


def _not_utf8(path: Path) -> None:
    path.write_bytes(b"80 \xff\xfe\n")


STATES: dict[str, Callable[[Path], None]] = {
    "dangling-link": _dangling_link,
    "dangling-directory-link": _dangling_directory_link,
    "link-loop": _link_loop,
    "unreadable": _unreadable,
    "directory": _directory,
    "fifo": _fifo,
    "invalid-line": _invalid_line,
    "not-utf8": _not_utf8,
}


class World:
    """The two allowlists, an echo server, the executable and one socket service process."""

    def __init__(self, root: Path) -> None:
        self.first = root / "usrlocal" / "connecttcp.allow"
        self.second = root / "etc" / "connecttcp.allow"
        self.second.parent.mkdir()
        self.second.write_text(SERVES_ALL)
        self.reset()
        allow_files = [str(self.first), str(self.second)]
        self.executable = install_into_rpc_dir(root / "rpc", allow_files=allow_files)
        self.server = ThreadedTCPServer(echo)
        self.socket_path = root / "qubes.ConnectTCP"
        self.log = root / "service.log"
        argv = [*WITHOUT_DAC, sys.executable, "-m", "qconnect.cli", "service", "run"]
        argv += ["--socket", str(self.socket_path)]
        argv += ["--allow-file", str(self.first), "--allow-file", str(self.second)]
        with open(self.log, "wb") as log:
            self.service = subprocess.Popen(argv, stderr=log, env=_env())
        deadline = time.monotonic() + TIMEOUT
        while " socket service listening on " not in self.log.read_text():  # listen() done
            assert self.service.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "socket service did not start"
            time.sleep(0.02)

    def reset(self) -> None:
        """Nothing at the first allowlist's path (its directory exists)."""
        parent = self.first.parent
        if parent.is_symlink() or parent.is_file():
            parent.unlink()
        elif parent.exists():
            shutil.rmtree(parent)
        parent.mkdir()

    def close(self) -> None:
        self.service.send_signal(signal.SIGTERM)
        self.service.wait(TIMEOUT)
        self.server.close()

    def call_socket_service(self, caller: str) -> bytes:
        """A call as qrexec-agent makes it; returns every byte the caller got back."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(self.socket_path))
            sock.sendall(f"qubes.ConnectTCP+{self.server.port} {caller}\0hello".encode())
            sock.shutdown(socket.SHUT_WR)
            try:
                return recv_all(sock, TIMEOUT)
            except ConnectionResetError:
                return b""

    def logged(self, caller: str) -> str:
        """The socket service's log line about ``caller``'s call (waits for it)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            lines = [
                line for line in self.log.read_text().splitlines() if f"call from {caller} " in line
            ]
            if lines:
                assert len(lines) == 1, lines
                return lines[0]
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.02)

    def run_executable(self, caller: str) -> "subprocess.CompletedProcess[bytes]":
        port = str(self.server.port)
        env = _env(QREXEC_REMOTE_DOMAIN=caller, QREXEC_SERVICE_ARGUMENT=port)
        return subprocess.run(
            [*WITHOUT_DAC, str(self.executable), port],
            input=b"hello",
            capture_output=True,
            env=env,
            timeout=TIMEOUT,
            check=False,
        )

    def executable_journal(self, caller: str) -> str:
        """What the executable service sends its journal for this call (its ``log``)."""
        code = (
            "import sys\n"
            "from qconnect.service.execservice import serve\n"
            f"sys.exit(serve({str(self.server.port)!r}, {caller!r}, "
            f"allow_files=[{str(self.first)!r}, {str(self.second)!r}], "
            "log=lambda message, fields: print(message)))\n"
        )
        result = subprocess.run(
            [*WITHOUT_DAC, sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=_env(),
            timeout=TIMEOUT,
            check=False,
        )
        assert result.returncode == 126, result
        return result.stdout.decode()


def _env(**extra: str) -> dict[str, str]:
    project = str(Path(__file__).resolve().parent.parent)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": project}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    world = World(tmp_path_factory.mktemp("states"))
    yield world
    world.close()


def test_a_missing_allowlist_falls_through_to_the_next_and_a_call_is_served(
    world: World,
) -> None:
    world.reset()
    assert world.call_socket_service("plain-caller") == b"hello"
    result = world.run_executable("plain-caller")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"hello", b"")


@pytest.mark.parametrize("state", STATES)
def test_an_unusable_allowlist_refuses_the_call_in_both_services(world: World, state: str) -> None:
    world.reset()
    STATES[state](world.first)
    caller = f"from-{state}"
    assert world.call_socket_service(caller) == b""
    line = world.logged(caller)
    assert "refused: allowlist broken, refusing every call" in line
    assert str(world.first) in line

    result = world.run_executable(caller)
    assert result.returncode == 126 and result.stdout == b""
    assert result.stderr.decode() == (
        f"qubes.ConnectTCP: port {world.server.port} is not served by this qube's allowlist\n"
    )
    journal = world.executable_journal(caller)
    assert "allowlist broken, refusing every call" in journal and str(world.first) in journal
    if state == "invalid-line":  # the details are the target's: its line, other qubes' names
        assert ":2: invalid caller '@anyvm'" in journal and ":2:" in line
