"""The loopback machine's ``qvm-run``: dom0 runs a command in a qube, as the real one does."""

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from qconnect.loopback import qvmrun
from qconnect.loopback.machine import Machine

MakeMachine = Callable[..., Machine]


@pytest.fixture
def qvm_run(loopback_machine: MakeMachine) -> tuple[Machine, Path]:
    machine = loopback_machine("web")
    return machine, qvmrun.install(machine.directory)


def run(
    qvm: tuple[Machine, Path], *words: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    machine, path = qvm
    return subprocess.run(
        [str(path), *words], input=stdin, env=qvmrun.dom0_env(machine.directory),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_pass_io_joins_streams_and_returns_the_exit_code(qvm_run: tuple[Machine, Path]) -> None:
    machine, _path = qvm_run
    script = 'read line; echo "$line in $QCONNECT_LOOPBACK_QUBE at $(pwd)"; echo oops >&2; exit 3'
    result = run(qvm_run, "--pass-io", "--user", "root", "web", script, stdin="hello\n")
    assert result.returncode == 3
    assert result.stdout == f"hello in web at {machine.root_dir('web')}\n"
    assert result.stderr == "oops\n"


def test_extra_words_are_quoted_for_the_shell(qvm_run: tuple[Machine, Path]) -> None:
    result = run(qvm_run, "-p", "web", "printf", "%s|", "a b", ";touch x", "$HOME")
    assert (result.returncode, result.stdout) == (0, "a b|;touch x|$HOME|")


def test_the_qube_sees_the_loopback_qrexec_client_and_its_root(
    qvm_run: tuple[Machine, Path],
) -> None:
    machine, _path = qvm_run
    result = run(
        qvm_run, "-p", "web", 'command -v qrexec-client-vm; echo "$QCONNECT_LOOPBACK_ROOT"'
    )
    assert result.stdout.splitlines() == [
        str(machine.qrexec_client_vm),
        str(machine.root_dir("web")),
    ]


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["-p", "nosuch", "true"], "no such domain: 'nosuch'"),
        (["-p", "-x", "web", "true"], "unsupported) option -x"),
        (["web", "true"], "supports --pass-io only"),
        (["-p", "--user", "alice", "web", "true"], "user 'alice'"),
        (["-p", "web"], "usage:"),
    ],
)
def test_mistakes_exit_2_with_one_line(
    qvm_run: tuple[Machine, Path], words: list[str], message: str
) -> None:
    result = run(qvm_run, *words)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
