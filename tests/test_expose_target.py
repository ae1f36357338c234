"""Step 3 of dom0's ``qconnect expose``: dom0 asks the target what would answer the call.

The question goes through the loopback machine's ``qvm-run``, so the target's
own shell follows qrexec's search path (the loopback qube's directories) and
judges real files: symbolic links, sockets, executables, rpc-config files.
"""

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qconnect.core.qrexec import SERVICE
from qconnect.core.unixpath import bind_unix
from qconnect.expose import target
from qconnect.loopback import qvmrun
from qconnect.loopback.machine import Machine

MakeMachine = Callable[..., Machine]
PORT = 8443


def check(machine: Machine, qube: str = "web") -> list[str]:
    return target.check(qube, "sys-net", PORT, env=qvmrun.dom0_env(machine.directory))


def warnings(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("warning:")]


@pytest.fixture
def stock(loopback_machine: MakeMachine) -> Machine:
    """A machine whose web has what today's Qubes ships (qrexec's /dev/tcp service)."""
    machine = loopback_machine("sys-net", "web")
    qvmrun.install(machine.directory)
    return machine


def test_stock_service_is_named_with_where_it_connects(stock: Machine) -> None:
    lines = check(stock)
    service = stock.root_dir("web") / "etc/qubes-rpc" / SERVICE
    assert lines[0].startswith(f"web answers with {service}: qrexec's built-in service")
    assert f"127.0.0.1:{PORT}" in lines[0]
    assert "qconnect service install" in lines[0]
    assert warnings(lines) == []


def test_missing_service_says_what_to_run_in_the_qube_or_its_template(
    loopback_machine: MakeMachine,
) -> None:
    machine = loopback_machine("sys-net", "web", stock_connect_tcp=False)
    qvmrun.install(machine.directory)
    (lines,) = check(machine)
    assert lines.startswith("warning: web has no qubes.ConnectTCP service")
    assert "run `qconnect service install` in web" in lines
    assert "template" not in lines  # a qube without a template (standalone): no such advice
    qvmrun.set_pref(machine.directory, "web", "template", "debian-12")
    (lines,) = check(machine)
    assert "`qconnect service install --layout template` in its template debian-12" in lines


def install_service(machine: Machine, *form: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "qconnect", "service", "install", "--root",
         str(machine.root_dir("web")), "--layout", "app-qube", *form],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def test_qconnects_executable_service_is_recognised(stock: Machine) -> None:
    install_service(stock, "--exec")
    lines = check(stock)
    service = stock.root_dir("web") / "usr/local/etc/qubes-rpc" / SERVICE
    assert lines == [f"web answers with {service}: qconnect's executable service"]


@pytest.fixture
def socket_service(stock: Machine) -> Iterator[Path]:
    """A socket service where qconnect's socket unit puts it: /run/qubes-rpc."""
    path = stock.root_dir("web") / "run/qubes-rpc" / SERVICE
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as listener:
        bind_unix(listener, str(path))
        yield path


def test_socket_service_needs_an_rpc_config_that_passes_the_descriptor(
    stock: Machine, socket_service: Path
) -> None:
    lines = check(stock)
    assert lines[0] == f"web answers with {socket_service}: a socket service"
    # The stock rpc-config (skip-service-descriptor=true) is the one qrexec reads.
    (warning,) = warnings(lines)
    assert "skip-service-descriptor=true" in warning and "qconnect service install" in warning
    # qconnect's install adds its rpc-config, searched before the stock one.
    install_service(stock, "--socket")
    assert check(stock) == [
        f"web answers with {socket_service}: a socket service (qconnect's, with its rpc-config)"
    ]
    # Any rpc-config earlier in the search that passes the descriptor will do, too.
    config = stock.root_dir("web") / "run/qubes/rpc-config" / SERVICE
    config.parent.mkdir(parents=True)
    config.write_text("skip-service-descriptor = false\nexit-on-service-eof=false\n")
    assert check(stock) == [f"web answers with {socket_service}: a socket service"]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda path: path.write_text("#!/bin/sh\n"), "a file that is not executable"),
        (lambda path: path.symlink_to("/nonexistent/socket"), "a symbolic link to nothing"),
        (lambda path: path.mkdir(), "neither a socket nor an executable file"),
    ],
)
def test_a_service_qrexec_cannot_use_is_a_warning(
    stock: Machine, make: Callable[[Path], None], reason: str
) -> None:
    path = stock.root_dir("web") / "usr/local/etc/qubes-rpc" / SERVICE
    path.parent.mkdir(parents=True)
    make(path)
    (line,) = check(stock)
    assert line == (
        f"warning: web's {path} is {reason}, so qrexec cannot serve any call from sys-net: "
        "run `qconnect service install` in web"
    )


def test_a_port_specific_service_comes_first_in_every_directory(stock: Machine) -> None:
    # qrexec tries SERVICE+ARG in all directories before SERVICE: the stock
    # /etc one (last directory) wins over a plain qubes.ConnectTCP earlier.
    specific = stock.root_dir("web") / "etc/qubes-rpc" / f"{SERVICE}+{PORT}"
    specific.write_text("#!/bin/sh\nexec cat\n")
    specific.chmod(0o755)
    install_service(stock, "--exec")
    (line,) = check(stock)
    assert line == f"web answers with {specific}: an executable"


def test_an_unknown_qube_is_not_checked_and_the_command_still_says_how(stock: Machine) -> None:
    (line,) = check(stock, "nosuch")
    assert line.startswith("warning: nosuch's qubes.ConnectTCP service not checked")
    assert "qconnect service install" in line


@given(st.text(max_size=400))
def test_any_answer_is_read_without_error_and_shown_printable(text: str) -> None:
    answer = target.parse_answer(text)
    for line in target.judge("web", "sys-net", PORT, answer, None):
        assert line.isprintable()
    kinds = (None, "tcp", "socket", "dangling", "executable", "not-executable", "other")
    assert answer.kind in kinds


def test_a_hostile_answer_cannot_forge_lines() -> None:
    answer = target.parse_answer(
        "service=/x\n\x1b[2Jfake\nkind=tcp\ntcp=1.2.3.4\x1b]0;t\x07\nkind=socket\n"
    )
    (line,) = target.judge("web", "sys-net", PORT, answer, None)[:1]
    assert answer.kind == "tcp" and "\x1b" not in line and "\x07" not in line
