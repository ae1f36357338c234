"""The firewall doc's three ConnectTCP scenarios: generated, parsed, evaluated, both formats."""

import itertools
import shutil
from pathlib import Path

import pytest

from qconnect.cli import main
from qconnect.demo import DEFAULT_POLICY, SAMPLE_QUBES
from qconnect.policy.evaluate import evaluate_call, evaluate_legacy_call
from qconnect.policy.system_info import SystemInfo

READY = Path(__file__).resolve().parent.parent / "policy"
SYSTEM = SystemInfo.from_dict({"domains": SAMPLE_QUBES})

# scenario directory -> (the commands that write it, {(target, port): documented outcome})
SCENARIOS: dict[str, tuple[list[list[str]], dict[tuple[str, int], str | None]]] = {
    "1-simple-port-binding": (
        [["allow", "untrusted", "--port", "444", "--default-target", "mytcp-service"]],
        # qvm-connect-tcp 444:@default:444 (and ::444)
        {("@default", 444): "mytcp-service", ("", 444): "mytcp-service"},
    ),
    "2-naming-the-target-qube": (
        [["allow", "untrusted", "--port", "444", "--target", "mytcp-service"]],
        # qvm-connect-tcp 10444:mytcp-service:444
        {("mytcp-service", 444): "mytcp-service", ("@default", 444): None},
    ),
    "3-ports-to-different-qubes": (
        [
            ["allow", "untrusted", "--port", "444", "--default-target", "mytcp-service"],
            ["allow", "untrusted", "--port", "445", "--default-target", "mytcp-service-bis"],
        ],
        # ::444 still reaches mytcp-service, ::445 reaches mytcp-service-bis
        {("", 444): "mytcp-service", ("", 445): "mytcp-service-bis"},
    ),
}


def new_machine(root: Path) -> Path:
    policy_dir = root / "etc" / "qubes" / "policy.d"
    policy_dir.mkdir(parents=True)
    (root / "etc" / "qubes-rpc" / "policy").mkdir(parents=True)
    (policy_dir / "90-default.policy").write_text(DEFAULT_POLICY)
    return policy_dir


def legacy_decision(
    legacy_dir: Path, source: str, target: str, port: int
) -> tuple[str, str | None]:
    resolution = evaluate_legacy_call(
        legacy_dir,
        SYSTEM,
        source=source,
        target=target,
        service="qubes.ConnectTCP",
        argument=f"+{port}",
    )
    return resolution.action, resolution.target


def served_by(policy_dir: Path, target: str, port: int, source: str = "untrusted") -> str | None:
    resolution = evaluate_call(
        policy_dir,
        SYSTEM,
        source=source,
        target=target,
        service="qubes.ConnectTCP",
        argument=f"+{port}",
    )
    assert resolution.action in ("allow", "deny"), resolution
    return resolution.target if resolution.allowed else None


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_tool_generates_the_ready_file_byte_for_byte(tmp_path: Path, scenario: str) -> None:
    policy_dir = new_machine(tmp_path)
    commands, _ = SCENARIOS[scenario]
    for command in commands:
        assert main(["policy", *command, "--policy-dir", str(policy_dir)]) == 0
    generated = (policy_dir / "30-qconnect.policy").read_bytes()
    assert generated == (READY / scenario / "30-qconnect.policy").read_bytes()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_ready_new_format_file_gives_the_documented_outcome(tmp_path: Path, scenario: str) -> None:
    policy_dir = new_machine(tmp_path)
    shutil.copy(READY / scenario / "30-qconnect.policy", policy_dir)
    _, outcomes = SCENARIOS[scenario]
    for (target, port), expected in outcomes.items():
        assert served_by(policy_dir, target, port) == expected, (target, port)
    # nobody else, and no other port, gets through
    assert served_by(policy_dir, "", 444, source="work") is None
    assert served_by(policy_dir, "mytcp-service", 22) is None


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_ready_r40_files_give_the_documented_outcome(tmp_path: Path, scenario: str) -> None:
    legacy_dir = tmp_path / "policy"
    shutil.copytree(READY / scenario / "qubes-rpc-policy", legacy_dir)
    _, outcomes = SCENARIOS[scenario]
    for (target, port), expected in outcomes.items():
        assert legacy_decision(legacy_dir, "untrusted", target, port)[1] == expected, (target, port)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_ready_r40_files_work_under_compat_40(tmp_path: Path, scenario: str) -> None:
    policy_dir = new_machine(tmp_path)
    legacy_dir = tmp_path / "etc" / "qubes-rpc" / "policy"
    for path in (READY / scenario / "qubes-rpc-policy").iterdir():
        shutil.copy(path, legacy_dir)
    (policy_dir / "35-compat.policy").write_text("!compat-4.0\n")
    _, outcomes = SCENARIOS[scenario]
    for (target, port), expected in outcomes.items():
        assert served_by(policy_dir, target, port) == expected, (target, port)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_legacy_generation_gives_the_documented_outcome(tmp_path: Path, scenario: str) -> None:
    legacy_dir = tmp_path / "policy"
    legacy_dir.mkdir()
    commands, outcomes = SCENARIOS[scenario]
    for command in commands:
        assert main(["policy", *command, "--legacy", "--legacy-dir", str(legacy_dir)]) == 0
    assert sorted(p.name for p in legacy_dir.iterdir() if not p.name.startswith(".")) == sorted(
        {f"qubes.ConnectTCP+{command[3]}" for command in commands}
    )
    for (target, port), expected in outcomes.items():
        assert legacy_decision(legacy_dir, "untrusted", target, port)[1] == expected


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_import_legacy_keeps_every_decision(tmp_path: Path, scenario: str) -> None:
    policy_dir = new_machine(tmp_path)
    legacy_dir = tmp_path / "etc" / "qubes-rpc" / "policy"
    for path in (READY / scenario / "qubes-rpc-policy").iterdir():
        shutil.copy(path, legacy_dir)
    assert main(["policy", "import-legacy", "--policy-dir", str(policy_dir)]) == 0
    sources = ["untrusted", "work", "mytcp-service"]
    targets = ["", "mytcp-service", "mytcp-service-bis", "work", "ghost", "@dispvm"]
    for source, target, port in itertools.product(sources, targets, [22, 444, 445]):
        after = evaluate_call(
            policy_dir,
            SYSTEM,
            source=source,
            target=target,
            service="qubes.ConnectTCP",
            argument=f"+{port}",
        )
        before = legacy_decision(legacy_dir, source, target, port)
        assert (after.action, after.target) == before, (source, target, port)
