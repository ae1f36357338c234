"""The re-run as root for a port below 1024: nothing from the user's directory or PATH runs as root.

The test plays the whole chain for real: ``qvm-connect-tcp`` runs as an
unprivileged user (effective uid nobody, so the kernel refuses it port 80
like any user), started in a directory where another account planted a
``qconnect`` package, with a ``qrexec-client-vm`` planted on its PATH. The
``sudo`` it finds on PATH is a stand-in that records how it was called, then
does what sudo does with the default sudoers: becomes root, resets the
environment (PATH becomes secure_path) and runs the command in the same
directory. The binding must work, inside its loopback qube, and neither
planted program may ever run.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qconnect.client import daemon, qrexec_call
from qconnect.core import qrexec_client
from qconnect.core.errors import ClientError
from qconnect.loopback.machine import Machine
from tests.as_nobody import NOBODY, as_nobody_keeping_real_root, become_nobody, can_play_nobody
from tests.conftest import recv_all, write_executable

pytestmark = pytest.mark.skipif(
    not can_play_nobody(), reason="plays an unprivileged user and sudo: needs root and setpriv"
)

#: The stand-in sudo: root again (its real uid is still 0, see below), the
#: environment reset as sudo's env_reset does, PATH = Debian's secure_path.
FAKE_SUDO = """\
#!{python}
import json, os, shutil, sys
SECURE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
caller = {{"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ), "euid": os.geteuid()}}
os.seteuid(0)
os.setresgid(0, 0, 0)
os.setgroups([])
os.setresuid(0, 0, 0)
with open({record!r}, "a") as record:
    record.write(json.dumps(caller) + "\\n")
args = sys.argv[1:]
assert args[0] == "-n", args
args = args[1:]
if args[0] == "--":
    args = args[1:]
program = args[0] if "/" in args[0] else shutil.which(args[0], path=SECURE_PATH)
env = {{"PATH": SECURE_PATH, "HOME": "/root", "USER": "root", "LOGNAME": "root",
       "SHELL": "/bin/sh", "SUDO_USER": "nobody", "SUDO_UID": "65534", "SUDO_GID": "65534"}}
os.execve(program, args, env)
"""


def free_privileged_port() -> int:
    """A port below 1024 that nothing listens on 127.0.0.1 now."""
    for port in random.sample(range(600, 1024), 424):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024 on 127.0.0.1")


@pytest.mark.parametrize("planted", ["package in the directory", "qrexec-client-vm on PATH"])
def test_root_rerun_runs_nothing_from_the_directory_or_the_users_path(
    tmp_path: Path, loopback_machine: object, echo_server: int, planted: str
) -> None:
    machine: Machine = loopback_machine(  # type: ignore[operator]
        "untrusted", "web", policy=[f"qubes.ConnectTCP +{echo_server} untrusted web allow"]
    )
    record = tmp_path / "sudo-calls.jsonl"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    write_executable(fake_bin / "sudo", FAKE_SUDO.format(python=sys.executable, record=str(record)))

    # What another account planted: a package in the directory the user is in,
    # or a qrexec-client-vm in a directory on the user's PATH (one at a time,
    # so each is shown to be kept out on its own).
    planted_dir, planted_bin = tmp_path / "shared", tmp_path / "planted-bin"
    planted_dir.mkdir()
    planted_bin.mkdir()
    package_ran, client_ran = tmp_path / "planted-package-ran", tmp_path / "planted-client-ran"
    if planted.startswith("package"):
        (planted_dir / "qconnect").mkdir()
        (planted_dir / "qconnect" / "__init__.py").write_text(
            f"open({str(package_ran)!r}, 'w').write('ran')\n"
        )
    else:
        write_executable(
            planted_bin / "qrexec-client-vm",
            f'#!/bin/sh\necho ran > {client_ran}\nexec {machine.qrexec_client_vm} "$@"\n',
        )

    env = machine.env_for("untrusted")
    env.pop("NOTIFY_SOCKET", None)
    env["PATH"] = os.pathsep.join([str(fake_bin), str(planted_bin), env["PATH"]])
    port = free_privileged_port()
    client = subprocess.Popen(
        [
            *as_nobody_keeping_real_root(),
            str(Path(sys.executable).parent / "qvm-connect-tcp"),
            "-f",
            f"{port}:web:{echo_server}",
        ],
        cwd=planted_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=become_nobody,
    )
    try:
        assert client.stdout is not None
        line = client.stdout.readline()
        assert line.startswith("Binding TCP"), (line, client.stderr and client.stderr.read())
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(b"ping")
            conn.shutdown(socket.SHUT_WR)
            assert recv_all(conn) == b"ping"
    finally:
        client.send_signal(signal.SIGTERM)
        _, log = client.communicate(timeout=60)
    assert client.returncode == 0, log
    assert not package_ran.exists(), "a package in the working directory ran as root"
    assert not client_ran.exists(), "a qrexec-client-vm from the user's PATH ran as root"

    calls = [json.loads(text) for text in record.read_text().splitlines()]
    assert [call["euid"] for call in calls] == [NOBODY, NOBODY]  # `sudo -n true`, the re-run
    rerun = calls[1]["argv"]
    command = rerun[rerun.index("--") + 1 :]
    assert os.path.isabs(command[0])  # env by its path, not looked up on the user's PATH
    assert not any(word.startswith("PATH=") for word in command)
    python = command.index(sys.executable)
    assert command[python + 1] == "-I"
    assert calls[1]["cwd"] == str(planted_dir)


def test_root_argv_names_programs_by_path_and_passes_only_the_loopback_variables() -> None:
    environ = {
        "PATH": "/home/user/bin:/usr/bin",
        "PYTHONPATH": "/home/user/evil",
        "QCONNECT_LOOPBACK_MACHINE": "/m",
        "QCONNECT_LOOPBACK_QUBE": "work",
    }
    argv = daemon.root_argv("/usr/bin/sudo", ["80:web:80"], environ)
    assert argv[:3] == ["/usr/bin/sudo", "-n", "--"]
    assert argv[3] in daemon.ENV_PROGRAMS
    assert argv[4:7] == [
        "QCONNECT_VIA_SUDO=1",
        "QCONNECT_LOOPBACK_MACHINE=/m",
        "QCONNECT_LOOPBACK_QUBE=work",
    ]
    assert argv[7:10] == [os.path.abspath(sys.executable), "-I", "-c"]
    assert argv[-1] == "80:web:80"
    # the entry runs from the directory qconnect really came from
    package_dir = Path(argv[-2])
    assert (package_dir / "qconnect" / "client" / "cli.py").is_file()


def test_root_rerun_skips_programs_others_could_have_planted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = tmp_path / "bin"
    planted.mkdir()
    write_executable(planted / "qrexec-client-vm", "#!/bin/sh\nexit 0\n")
    monkeypatch.delenv(qrexec_client.LOOPBACK_MACHINE_ENV, raising=False)
    monkeypatch.setenv(qrexec_call.SUDO_MARK_ENV, "1")
    monkeypatch.setenv("PATH", f"{planted}{os.pathsep}relative-dir")
    write_executable(planted / "qubesdb-read", f"#!/bin/sh\necho planted > {tmp_path}/ran\n")
    monkeypatch.delenv(qrexec_client.LOOPBACK_QUBE_ENV, raising=False)
    with pytest.raises(ClientError) as raised:
        qrexec_call.find_qrexec_client_vm()
    assert str(planted / "qrexec-client-vm") in str(raised.value)
    assert "skipped" in str(raised.value)
    assert qrexec_call.this_qube_name() == socket.gethostname()  # not the planted reader's
    assert not (tmp_path / "ran").exists()
    # the same PATH is fine for any other process: whoever started it chose it
    monkeypatch.delenv(qrexec_call.SUDO_MARK_ENV)
    assert qrexec_call.find_qrexec_client_vm() == str(planted / "qrexec-client-vm")


def test_only_root_can_change_a_system_program_but_not_one_under_tmp(tmp_path: Path) -> None:
    env_program = next(path for path in daemon.ENV_PROGRAMS if os.path.exists(path))
    assert qrexec_call._only_root_can_change(env_program)
    program = write_executable(tmp_path / "tool", "#!/bin/sh\n")
    assert not qrexec_call._only_root_can_change(str(program))  # /tmp is writable by all
