"""``qconnect expose --nat``: DNAT down the netvm chain, each qube a network namespace.

outside -> sys-net -> sys-firewall -> web, wired as Qubes wires them (each
client's uplink is eth0, each netvm's downlink a vif), with Qubes-shaped
firewalls. dom0 reads the chain and the addresses with the loopback
``qvm-prefs`` and acts in each qube with the loopback ``qvm-run``. The kernel
judges: the allowed host reaches web's servers (TCP and UDP) with its own
address, the other host is refused, and --remove restores every ruleset
and file.
"""

import json
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from qconnect.loopback import qvmrun
from qconnect.loopback.machine import Machine
from tests import expose_world
from tests.expose_world import (
    ALLOWED_V4,
    ALLOWED_V6,
    FIREWALL_IP,
    FIREWALL_IP6,
    OTHER_V4,
    OTHER_V6,
    SYS_NET_V4,
    SYS_NET_V6,
    WAIT,
    WEB_IP,
    WEB_IP6,
    NatWorld,
)
from tests.persist_tree import snapshot

pytestmark = pytest.mark.skipif(
    expose_world.skip_reason() is not None, reason=str(expose_world.skip_reason())
)

QUBES = ("sys-net", "sys-firewall", "web")
SERVER_PORT = 8080


@pytest.fixture
def world() -> Iterator[NatWorld]:
    with expose_world.nat_namespaces() as made:
        yield made


@pytest.fixture
def machine(loopback_machine: Callable[..., Machine], world: NatWorld) -> Machine:
    made = loopback_machine(*QUBES)
    qvmrun.install(made.directory)
    for qube in QUBES:
        qvmrun.set_netns(made.directory, qube, world.ns(qube))
        for directory in ("rw/config", "usr/local/etc"):
            (made.root_dir(qube) / directory).mkdir(parents=True, exist_ok=True)
    qvmrun.set_pref(made.directory, "web", "netvm", "sys-firewall")
    qvmrun.set_pref(made.directory, "web", "ip", WEB_IP)
    qvmrun.set_pref(made.directory, "sys-firewall", "netvm", "sys-net")
    qvmrun.set_pref(made.directory, "sys-firewall", "ip", FIREWALL_IP)
    return made


@pytest.fixture
def servers(world: NatWorld) -> Iterator[None]:
    process = subprocess.Popen(
        ["ip", "netns", "exec", world.web, sys.executable, "-c", expose_world.ECHO_SERVERS,
         str(SERVER_PORT)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        yield
    finally:
        process.kill()
        process.wait()


def dom0_expose(machine: Machine, *words: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qconnect", "expose", "--nat", *words, "--via", "sys-net"]
    argv += ["--state-dir", str(machine.directory / "dom0" / "state")]
    return subprocess.run(
        argv, env=qvmrun.dom0_env(machine.directory), capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


def sys_net_address(source: str) -> str:
    """sys-net's outside address of the source's family."""
    return SYS_NET_V6 if ":" in source else SYS_NET_V4


def tcp(world: NatWorld, source: str, port: int) -> dict[str, str]:
    return expose_world.World(world.outside, world.sys_net).connect(
        source, sys_net_address(source), port, b""
    )


def udp(world: NatWorld, source: str, port: int) -> dict[str, str]:
    result = subprocess.run(
        ["ip", "netns", "exec", world.outside, sys.executable, "-c", expose_world.UDP_CLIENT,
         source, sys_net_address(source), str(port), str(WAIT)],
        capture_output=True, text=True, timeout=WAIT * 2, check=True,
    )  # fmt: skip
    answer: dict[str, str] = json.loads(result.stdout)
    return answer


def test_nat_chain_carries_tcp_and_udp_with_the_client_address_and_removes_cleanly(
    machine: Machine, world: NatWorld, servers: None
) -> None:
    files_before = {qube: snapshot(machine.root_dir(qube)) for qube in QUBES}
    rulesets_before = world.rulesets()
    assert tcp(world, ALLOWED_V4, 80)["outcome"] == "refused"  # nothing exposed yet
    common = ["--interface", "eth0", "--from", f"{ALLOWED_V4}/32"]
    made = dom0_expose(machine, f"web:{SERVER_PORT}", "--listen-port", "80", *common)
    assert made.returncode == 0, made.stdout + made.stderr
    assert "NAT chain: sys-net -> sys-firewall -> web" in made.stdout
    made = dom0_expose(machine, f"web:{SERVER_PORT}", "--listen-port", "5353", "--udp", *common)
    assert made.returncode == 0, made.stdout + made.stderr
    # Routed, not relayed: web sees the outside host's own address.
    assert tcp(world, ALLOWED_V4, 80) == {"outcome": "answered", "data": f"tcp from {ALLOWED_V4}"}
    assert udp(world, ALLOWED_V4, 5353) == {
        "outcome": "answered",
        "data": f"udp from {ALLOWED_V4}: ping",
    }
    assert tcp(world, OTHER_V4, 80)["outcome"] == "refused"
    assert udp(world, OTHER_V4, 5353)["outcome"] == "refused"
    # web gets another address: the chain's rules are stale until dom0 re-applies them.
    moved = "198.51.100.131"
    world.run_in("web", "ip", "address", "del", f"{WEB_IP}/25", "dev", "eth0")
    world.run_in("web", "ip", "address", "add", f"{moved}/25", "dev", "eth0")
    world.run_in("web", "ip", "route", "replace", "default", "via", "198.51.100.129")
    qvmrun.set_pref(machine.directory, "web", "ip", moved)
    reapplied = subprocess.run(
        [sys.executable, "-m", "qconnect", "expose", "--reapply",
         "--state-dir", str(machine.directory / "dom0" / "state")],
        env=qvmrun.dom0_env(machine.directory), capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert reapplied.returncode == 0, reapplied.stdout + reapplied.stderr
    assert reapplied.stdout.count("NAT chain: sys-net -> sys-firewall -> web") == 2
    assert tcp(world, ALLOWED_V4, 80) == {"outcome": "answered", "data": f"tcp from {ALLOWED_V4}"}
    removed = dom0_expose(machine, "--remove", f"web:{SERVER_PORT}")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert world.rulesets() == rulesets_before
    assert {qube: snapshot(machine.root_dir(qube)) for qube in QUBES} == files_before
    assert tcp(world, ALLOWED_V4, 80)["outcome"] == "refused"
    assert not (machine.directory / "dom0" / "state").exists()  # dom0's records went too


def test_nat_over_ipv6_carries_tcp_and_udp_beside_ipv4_and_removes_cleanly(
    machine: Machine, world: NatWorld, servers: None
) -> None:
    qvmrun.set_pref(machine.directory, "web", "ip6", WEB_IP6)
    qvmrun.set_pref(machine.directory, "sys-firewall", "ip6", FIREWALL_IP6)
    files_before = {qube: snapshot(machine.root_dir(qube)) for qube in QUBES}
    rulesets_before = world.rulesets()
    common = ["--interface", "eth0", "--from", f"{ALLOWED_V4}/32,{ALLOWED_V6}/128"]
    for extra in ([], ["--udp"]):
        made = dom0_expose(machine, f"web:{SERVER_PORT}", "--listen-port", "80", *common, *extra)
        assert made.returncode == 0, made.stdout + made.stderr
        assert "(tcp, IPv4 and IPv6)" in made.stdout or "(udp, IPv4 and IPv6)" in made.stdout
        assert (
            f"dnat to [{FIREWALL_IP6}]:{SERVER_PORT}"
            in (
                machine.root_dir("sys-net") / "usr/local/etc/qconnect/expose/nat-80.nft"
            ).read_text()
        )
        if not extra:
            assert tcp(world, ALLOWED_V6, 80) == {
                "outcome": "answered",
                "data": f"tcp from {ALLOWED_V6}",
            }
            assert tcp(world, ALLOWED_V4, 80)["outcome"] == "answered"
            assert tcp(world, OTHER_V6, 80)["outcome"] == "refused"
    # The UDP exposure replaced the TCP one on port 80 (one exposure per listen port).
    assert udp(world, ALLOWED_V6, 80) == {
        "outcome": "answered",
        "data": f"udp from {ALLOWED_V6}: ping",
    }
    assert udp(world, OTHER_V6, 80)["outcome"] == "refused"
    removed = dom0_expose(machine, "--remove", f"web:{SERVER_PORT}")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert world.rulesets() == rulesets_before
    assert {qube: snapshot(machine.root_dir(qube)) for qube in QUBES} == files_before


def test_nat_over_ipv6_needs_an_ipv6_address_on_every_qube_below_via(
    machine: Machine, world: NatWorld
) -> None:
    qvmrun.set_pref(machine.directory, "web", "ip6", WEB_IP6)  # sys-firewall has none
    rulesets_before = world.rulesets()
    refused = dom0_expose(machine, "web:80", "--interface", "eth0", "--from", f"{ALLOWED_V6}/128")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "sys-firewall's ip6 '' is not an IPv6 address" in refused.stderr
    assert "qvm-features NETVM ipv6 1" in refused.stderr
    assert world.rulesets() == rulesets_before
    # --from any carries IPv4 only then, and says so.
    shown = dom0_expose(machine, "web:80", "--interface", "eth0", "--from", "any", "--dry-run")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "IPv6 left out: sys-firewall has no IPv6 address" in shown.stdout
    assert "(tcp, IPv4)" in shown.stdout
    assert "table ip6" not in shown.stdout and "ip6 qubes" not in shown.stdout


def test_nat_needs_a_netvm_chain_through_via(machine: Machine, world: NatWorld) -> None:
    qvmrun.set_pref(machine.directory, "web", "netvm", "")
    rulesets_before = world.rulesets()
    refused = dom0_expose(machine, "web:80", "--interface", "eth0", "--from", "192.0.2.0/24")
    assert refused.returncode == 1
    assert "web has no netvm" in refused.stderr and "qrexec way" in refused.stderr
    assert world.rulesets() == rulesets_before


def test_nat_dry_run_says_each_qubes_part_and_changes_nothing(
    machine: Machine, world: NatWorld
) -> None:
    files_before = {qube: snapshot(machine.root_dir(qube)) for qube in QUBES}
    rulesets_before = world.rulesets()
    shown = dom0_expose(
        machine, "web:8080", "--listen-port", "80", "--interface", "eth0", "--from", "any",
        "--dry-run",
    )  # fmt: skip
    assert shown.returncode == 0, shown.stdout + shown.stderr
    out = shown.stdout
    assert out.index("# web:") < out.index("# sys-firewall:") < out.index("# sys-net:")
    assert f'iifname "eth0" tcp dport 80 dnat to {FIREWALL_IP}:8080' in out
    assert f'iifname "eth0" tcp dport 8080 dnat to {WEB_IP}:8080' in out
    assert 'add rule ip qubes custom-input iifname "eth0" tcp dport 8080 counter accept' in out
    assert out.count("would run: nft -f /usr/local/etc/qconnect/expose/nat-80.nft") == 3
    assert world.rulesets() == rulesets_before
    assert {qube: snapshot(machine.root_dir(qube)) for qube in QUBES} == files_before
