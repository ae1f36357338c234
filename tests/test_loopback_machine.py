"""The loopback machine directory, its Python API and ``qconnect loopback init/run``."""

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from qconnect.core.errors import LoopbackError
from qconnect.loopback.machine import Machine, QubeSpec
from qconnect.policy.system_info import SystemInfo
from tests.cli_refusals import assert_one_refusal

MakeMachine = Callable[..., Machine]

TIMEOUT = 30


def qconnect(*args: str, cwd: Path | None = None) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [sys.executable, "-m", "qconnect.cli", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd,
        check=False,
    )


def test_init_creates_qubes_dom0_policy_and_stock_service(tmp_path: Path) -> None:
    result = qconnect(
        "loopback",
        "init",
        str(tmp_path / "m"),
        "--qube",
        "work",
        "--qube",
        "web:StandaloneVM:server,public",
        "--policy",
        "qubes.ConnectTCP +80 work @default allow target=web",
    )
    assert result.returncode == 0, result.stderr
    machine = Machine(tmp_path / "m")
    domains = json.loads(machine.qubes_json.read_text())["domains"]
    assert domains["dom0"]["type"] == "AdminVM"
    assert domains["web"]["type"] == "StandaloneVM"
    assert domains["web"]["tags"] == ["server", "public"]
    assert domains["work"]["power_state"] == "Running"
    assert sorted(machine.qubes()) == ["web", "work"]
    assert (machine.policy_dir / "30-loopback.policy").read_text() == (
        "qubes.ConnectTCP +80 work @default allow target=web\n"
    )
    stock = machine.root_dir("web") / "etc/qubes-rpc/qubes.ConnectTCP"
    assert os.readlink(stock) == "/dev/tcp/127.0.0.1"
    assert (machine.root_dir("web") / "etc/qubes/rpc-config/qubes.ConnectTCP").read_text() == (
        "skip-service-descriptor=true\nexit-on-service-eof=true\n"
    )
    assert machine.rpc_dir("work").is_dir() and machine.rpc_config_dir("work").is_dir()
    assert os.access(machine.qrexec_client_vm, os.X_OK)
    # dom0's policy engine reads the system info as written.
    system = SystemInfo.load(machine.qubes_json)
    assert "web" in system and "dom0" in system


def test_policy_tokens_match_loopback_types_and_tags(
    loopback_machine: MakeMachine, echo_server: int
) -> None:
    machine = loopback_machine(
        "work:AppVM:trusted", "web::server", "db", policy=["* * @tag:trusted @type:AppVM allow"]
    )
    service = f"qubes.ConnectTCP+{echo_server}"
    for source, target, code in [("work", "web", 0), ("web", "work", 126), ("work", "db", 0)]:
        result = machine.run(
            source,
            ["qrexec-client-vm", target, service],
            input=b"x",
            capture_output=True,
            timeout=TIMEOUT,
        )
        assert result.returncode == code, (source, target)


def test_init_without_stock_services_has_no_connect_tcp(tmp_path: Path) -> None:
    result = qconnect("loopback", "init", str(tmp_path / "m"), "--qube", "a", "--no-stock-services")
    assert result.returncode == 0
    assert not (tmp_path / "m/qubes/a/root").exists()


def test_init_ask_answer_is_stored(tmp_path: Path) -> None:
    result = qconnect("loopback", "init", str(tmp_path / "m"), "--qube", "a", "--ask", "allow")
    assert result.returncode == 0
    assert (tmp_path / "m/ask").read_text() == "allow\n"


@pytest.mark.parametrize(
    ("qube", "message"),
    [
        ("9lives", "invalid qube name '9lives'"),
        ("dom0", "invalid qube name 'dom0'"),
        ("a:Laptop", "unknown qube type 'Laptop'"),
        ("a:AppVM:bad tag", "invalid tag 'bad tag'"),
        ("a:b:c:d", "at most two ':'"),
        ("x" * 32, "invalid qube name"),
    ],
)
def test_init_refuses_bad_qubes_with_one_line(tmp_path: Path, qube: str, message: str) -> None:
    result = qconnect("loopback", "init", str(tmp_path / "m"), "--qube", qube)
    assert_one_refusal(result.returncode, result.stderr, 2, "argument --qube: ", message)
    assert not (tmp_path / "m").exists()


def test_init_refuses_a_non_empty_directory_and_duplicates(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "file").write_text("x")
    result = qconnect("loopback", "init", str(tmp_path / "m"), "--qube", "a")
    assert_one_refusal(result.returncode, result.stderr, 1, "not empty")
    result = qconnect("loopback", "init", str(tmp_path / "n"), "--qube", "a", "--qube", "a:AppVM")
    assert_one_refusal(result.returncode, result.stderr, 2, "--qube 'a' given twice")
    result = qconnect("loopback", "init", str(tmp_path / "o"), "--qube", "a", "--ask", "maybe")
    assert_one_refusal(result.returncode, result.stderr, 2, "--ask: invalid answer 'maybe'")


def test_run_puts_the_loopback_client_first_on_path(tmp_path: Path) -> None:
    machine = Machine.create(tmp_path / "m", ["work"])
    result = qconnect(
        "loopback",
        "run",
        str(machine.directory),
        "work",
        "--",
        "sh",
        "-c",
        'echo "$QCONNECT_LOOPBACK_QUBE $(command -v qrexec-client-vm)"; exit 7',
    )
    assert result.returncode == 7
    assert result.stdout == f"work {machine.qrexec_client_vm}\n"


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["work", "--", "/nonexistent/program"], "cannot run '/nonexistent/program' in work", 1),
        (["nosuch", "--", "true"], "no qube 'nosuch'", 1),
        (["work"], "no command given", 2),
    ],
)
def test_run_mistakes_are_one_line(
    tmp_path: Path, args: list[str], message: str, code: int
) -> None:
    machine = Machine.create(tmp_path / "m", ["work"])
    result = qconnect("loopback", "run", str(machine.directory), *args)
    assert_one_refusal(result.returncode, result.stderr, code, message)


def test_run_outside_a_machine_is_a_clear_error(tmp_path: Path) -> None:
    result = qconnect("loopback", "run", str(tmp_path), "work", "--", "true")
    assert_one_refusal(result.returncode, result.stderr, 1, "is not a loopback machine")


def test_machine_api_paths_and_environment(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine("work", "web")
    env = machine.env_for("web", {"PATH": "/usr/bin", "KEEP": "1"})
    assert env["PATH"] == f"{machine.bin_dir}:/usr/bin"
    assert (env["QCONNECT_LOOPBACK_QUBE"], env["KEEP"]) == ("web", "1")
    assert env["QCONNECT_LOOPBACK_MACHINE"] == str(machine.directory)
    # A nested env_for does not pile up bin directories.
    assert machine.env_for("work", env)["PATH"] == f"{machine.bin_dir}:/usr/bin"
    assert machine.rpc_dir("web") == machine.directory / "qubes/web/rpc"
    with pytest.raises(LoopbackError, match="no qube 'nosuch'"):
        machine.rpc_dir("nosuch")
    with pytest.raises(LoopbackError, match=re.escape("no qube '../web'")):
        machine.rpc_dir("../web")
    assert machine.call_argv("web", "my.Svc+1", "--use-stdin-socket") == [
        str(machine.qrexec_client_vm),
        "--use-stdin-socket",
        "web",
        "my.Svc+1",
    ]


def test_machine_add_policy_appends(loopback_machine: MakeMachine) -> None:
    machine = loopback_machine("work", policy=["a * work work deny"])
    path = machine.add_policy(["b * work work deny"])
    assert path.read_text() == "a * work work deny\nb * work work deny\n"
    other = machine.add_policy(["c * work work deny"], name="10-first.policy")
    assert other.read_text() == "c * work work deny\n"


def test_qube_spec_parse() -> None:
    assert QubeSpec.parse("web") == QubeSpec("web")
    assert QubeSpec.parse("web::a,b") == QubeSpec("web", "AppVM", ("a", "b"))
    assert QubeSpec.parse("tpl:TemplateVM") == QubeSpec("tpl", "TemplateVM")


def test_init_old_client_flag(tmp_path: Path) -> None:
    result = qconnect("loopback", "init", str(tmp_path / "m"), "--qube", "a", "--old-client")
    assert result.returncode == 0
    assert (tmp_path / "m/old-qrexec-client-vm").exists()
