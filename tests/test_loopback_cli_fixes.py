"""Two README promises that did not hold: checked policy lines, persist inside a loopback qube."""

import subprocess
import sys
from pathlib import Path

import pytest

from qconnect.loopback.machine import Machine
from tests.cli_refusals import assert_one_refusal
from tests.persist_tree import make_qube_tree, persist_env, run_persist


@pytest.mark.parametrize(
    "line",
    [
        "garbage",
        "qubes.ConnectTCP +80 work @default allow",  # allow to @default needs target=
        "qubes.ConnectTCP +80 work web alow",
        "qubes.ConnectTCP +80 work web allow\nqubes.ConnectTCP * @anyvm web allow",
    ],
)
def test_loopback_init_refuses_a_policy_line_dom0_could_not_parse(
    tmp_path: Path, line: str
) -> None:
    directory = tmp_path / "machine"
    result = subprocess.run(
        [sys.executable, "-m", "qconnect", "loopback", "init", str(directory), "--qube", "work",
         "--qube", "web", "--policy", line],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert_one_refusal(result.returncode, result.stderr, 2, "policy")
    assert not directory.exists()  # nothing half-made


def test_persist_add_inside_a_loopback_qube_takes_the_machines_qrexec_client_vm(
    tmp_path: Path,
) -> None:
    machine = Machine.create(tmp_path / "m", ["work", "web"])
    tree = make_qube_tree(tmp_path / "qube")
    env = persist_env(machine.env_for("work"))
    run_persist(
        "add", "8080:web:80", "--root", str(tree), "--relay", "handoff", env=env, check=True
    )
    units = list(tree.rglob("*@.service"))
    assert len(units) == 1
    client = str(machine.directory / "bin" / "qrexec-client-vm")
    assert f"ExecStart={client} --use-stdin-socket" in units[0].read_text()
