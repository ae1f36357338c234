"""``qconnect policy``'s part of ``qconnect demo``: the firewall doc's three scenarios in dom0.

Standard library only, like the policy tool itself.
"""

import json

from qconnect.demo import DEFAULT_POLICY, SAMPLE_QUBES, Machine, Step


def _set_up(machine: Machine) -> None:
    machine.policy_dir.mkdir(parents=True)
    machine.legacy_dir.mkdir(parents=True)
    machine.qubes_file.write_text(json.dumps({"domains": SAMPLE_QUBES}, indent=1) + "\n")
    (machine.policy_dir / "90-default.policy").write_text(DEFAULT_POLICY)
    from qconnect.policy.system_info import SystemInfo

    machine.say(f"MACHINE={machine.root}")
    machine.say(
        "Every `qconnect policy` command below runs with --policy-dir "
        "$MACHINE/etc/qubes/policy.d --qubes $MACHINE/qubes.json"
    )
    machine.say("The qubes (from $MACHINE/qubes.json, as qubesd's internal.GetSystemInfo):")
    for qube in SystemInfo.load(machine.qubes_file):
        tags = f" tags={','.join(sorted(qube.tags))}" if qube.tags else ""
        machine.say(f"  {qube.name:<18} {qube.type:<8} {qube.power_state}{tags}")
    machine.show_file(machine.policy_dir / "90-default.policy")


def _scenario_1(machine: Machine) -> None:
    machine.say("So that `qvm-connect-tcp 444:@default:444` in untrusted reaches mytcp-service:")
    machine.policy("allow", "untrusted", "--port", "444", "--default-target", "mytcp-service")


def _scenario_2(machine: Machine) -> None:
    machine.say("So that `qvm-connect-tcp 10444:mytcp-service:444` in untrusted may name the qube:")
    machine.policy("allow", "untrusted", "--port", "444", "--target", "mytcp-service")


def _scenario_3(machine: Machine) -> None:
    machine.say("So that `qvm-connect-tcp ::445` in untrusted reaches mytcp-service-bis instead:")
    machine.policy("allow", "untrusted", "--port", "445", "--default-target", "mytcp-service-bis")


def _ask(machine: Machine) -> None:
    machine.say("So that qubes tagged work reach mytcp-service:444 once the user agrees in dom0:")
    machine.policy("allow", "@tag:work", "--port", "444", "--target", "mytcp-service", "--ask")


def _show(machine: Machine) -> None:
    machine.show_file(machine.policy_dir / "30-qconnect.policy")
    machine.policy("list")
    machine.policy("lint")


def _explain(machine: Machine) -> None:
    machine.say("Four calls as dom0 would decide them. Allowed:")
    machine.policy("explain", "untrusted", "mytcp-service", "444")
    machine.say("Redirected (the call names no target):")
    machine.policy("explain", "untrusted", "@default", "445")
    machine.say("Refused (no rule of ours for port 22):")
    machine.policy("explain", "untrusted", "mytcp-service", "22")
    machine.say("Asked (work is tagged work):")
    machine.policy("explain", "work", "mytcp-service", "444", "--json")


def policy_steps() -> list[Step]:
    """The dom0 policy tool on the sample machine (issue 2)."""
    return [
        Step("A sample Qubes machine", _set_up),
        Step("Firewall doc, scenario 1: simple port binding", _scenario_1),
        Step("Firewall doc, scenario 2: naming the target qube", _scenario_2),
        Step("Firewall doc, scenario 3: another port to another qube", _scenario_3),
        Step("Asking the user", _ask),
        Step("The policy as written", _show),
        Step("Four calls, explained", _explain),
    ]
