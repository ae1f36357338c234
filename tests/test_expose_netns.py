"""``qconnect expose`` end to end: an outside host, sys-net's firewall, qrexec, nginx.

dom0's ``qconnect expose`` drives the loopback machine's qube "sys-net"
through the loopback ``qvm-run``; sys-net's commands run in a network
namespace of their own, joined to an "outside" namespace. The generated
units run under systemd-socket-activate in sys-net's namespace; each call
goes through the loopback qrexec (its fork-server, in the host's namespace)
to qube "web", whose stock qubes.ConnectTCP reaches nginx on 127.0.0.1.
The kernel judges the firewall: the tests only connect.
"""

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qconnect.loopback import layout, qvmrun
from qconnect.loopback.machine import Machine
from qconnect.persist.render import exec_start_of, listen_of
from tests import expose_world
from tests.expose_world import (
    ALLOWED_V4,
    ALLOWED_V6,
    OTHER_V4,
    OTHER_V6,
    SYS_NET_V4,
    SYS_NET_V6,
    WAIT,
    World,
)
from tests.persist_tree import Snapshot, snapshot

pytestmark = pytest.mark.skipif(
    expose_world.skip_reason() is not None, reason=str(expose_world.skip_reason())
)

MakeMachine = Callable[..., Machine]

SYSTEM_UNITS = "usr/local/lib/systemd/system"
REQUEST = b"GET / HTTP/1.0\r\nHost: web\r\n\r\n"


@pytest.fixture
def world() -> Iterator[World]:
    with expose_world.namespaces() as made:
        yield made


@pytest.fixture
def machine(loopback_machine: MakeMachine, world: World) -> Machine:
    made = loopback_machine("sys-net", "web")
    qvmrun.install(made.directory)
    qvmrun.set_netns(made.directory, "sys-net", world.sys_net)
    root = made.root_dir("sys-net")
    for directory in ("rw/config", "usr/local/etc", "usr/local/lib", "run"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "rw/config/rc.local").write_text("#!/bin/sh\n# the user's own line\n")
    (root / "rw/config/rc.local").chmod(0o755)
    return made


def dom0_expose(machine: Machine, *words: str) -> subprocess.CompletedProcess[str]:
    """``qconnect expose WORDS`` in the machine's dom0."""
    argv = [sys.executable, "-m", "qconnect", "expose", *words, "--via", "sys-net"]
    argv += ["--policy-dir", str(machine.policy_dir), "--qubes", str(machine.qubes_json)]
    return subprocess.run(
        argv, env=qvmrun.dom0_env(machine.directory), capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


@contextlib.contextmanager
def units_running(machine: Machine, world: World) -> Iterator[Path]:
    """Run sys-net's daemon-mode units as systemd would: sockets first, one client for all."""
    units = machine.root_dir("sys-net") / SYSTEM_UNITS
    sockets = sorted(units.glob("qconnect-bind-*.socket"))
    assert len(sockets) == 2, sorted(p.name for p in units.iterdir())
    exec_start = exec_start_of((units / "qconnect-bindings.service").read_text()).split()
    env = machine.env_for("sys-net")
    env[qvmrun.ROOT_ENV] = str(machine.root_dir("sys-net"))
    command = ["ip", "netns", "exec", world.sys_net, "systemd-socket-activate"]
    for name in (layout.MACHINE_ENV, layout.QUBE_ENV, qvmrun.ROOT_ENV, "PATH"):
        command += ["--setenv", name]
    names = []
    for path in sockets:
        text = path.read_text()
        command += ["--listen", listen_of(text)]
        names.append(
            next(
                line for line in text.splitlines() if line.startswith("FileDescriptorName=")
            ).partition("=")[2]
        )
    command += ["--fdname", ":".join(names), "--", *exec_start]
    log = machine.directory / "sys-net-client.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT
        while log.read_text().count("Listening on") < 2:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        yield log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.parametrize("proxy", ["v1", "v2"])
def test_outside_host_in_from_reaches_nginx_with_its_address_others_are_refused(
    machine: Machine, world: World, tmp_path: Path, proxy: str
) -> None:
    root = machine.root_dir("sys-net")
    files_before = snapshot(root)
    policy_before = snapshot(machine.policy_dir)
    ruleset_before = world.ruleset()
    with expose_world.nginx(tmp_path / "nginx") as server:
        made = dom0_expose(
            machine, f"web:{server.port}", "--listen-port", "443", "--interface", "eth0",
            "--from", f"{ALLOWED_V4}/32,{ALLOWED_V6}/128", "--proxy-protocol", proxy,
        )  # fmt: skip
        assert made.returncode == 0, made.stdout + made.stderr
        stock = machine.root_dir("web") / "etc/qubes-rpc/qubes.ConnectTCP"
        assert f"web answers with {stock}: qrexec's built-in service" in made.stdout
        policy = (machine.policy_dir / "30-qconnect.policy").read_text()
        assert f"qubes.ConnectTCP +{server.port} sys-net web allow" in policy
        # A reboot of sys-net: Qubes rebuilds its tables empty; rc.local's block runs.
        exposed_ruleset = world.ruleset()
        for table in ("ip", "ip6"):
            world.in_sys_net("nft", "flush", "chain", table, "qubes", "custom-input")
        rc_local = (root / "rw/config/rc.local").read_text()
        block = rc_local.partition("# BEGIN qconnect expose")[2].partition("# END")[0]
        for line in block.splitlines()[1:]:
            words = shlex.split(line, comments=True)
            if words[:2] == ["nft", "-f"]:  # the qube's path, under the loopback qube's root
                words[2] = str(root / words[2].lstrip("/"))
            if words:
                world.in_sys_net(*words)
        assert world.ruleset() == exposed_ruleset
        assert world.in_sys_net("sysctl", "-n", "net.ipv4.ip_nonlocal_bind").strip() == "1"
        with machine.server(), units_running(machine, world) as log:
            for source, address in ((ALLOWED_V4, SYS_NET_V4), (ALLOWED_V6, SYS_NET_V6)):
                answer = world.connect(source, address, 443, REQUEST)
                assert answer["outcome"] == "answered", (answer, log.read_text())
                assert "hello from web" in answer["data"], (answer, log.read_text())
            logged = server.wait_logged(2)
            # One line per outside connection in sys-net's journal: peer, target, outcome
            # (written when the call has ended, which may be just after the client saw EOF).
            for peer in (f"{ALLOWED_V4}:", f"[{ALLOWED_V6}]:"):
                wait_for_line(log, peer, f"-> web:{server.port}")
            assert logged[0].split()[0] == ALLOWED_V4, logged
            assert logged[1].split()[0] == ALLOWED_V6, logged
            assert all(line.split()[2] == "127.0.0.1" for line in logged), logged
            # qconnect list in sys-net shows the exposed bindings as such (once is enough).
            if proxy == "v1":
                listed = subprocess.run(
                    [str(qvmrun.dom0_bin(machine.directory) / "qvm-run"), "-p", "sys-net",
                     "qconnect list"],
                    env=qvmrun.dom0_env(machine.directory), capture_output=True, text=True,
                    timeout=60, check=False,
                )  # fmt: skip
                assert listed.returncode == 0, listed.stdout + listed.stderr
                assert (
                    f"exposed: {SYS_NET_V4}:443:web:{server.port} to the outside world, from "
                    f"{ALLOWED_V4}/32,{ALLOWED_V6}/128 only, PROXY {proxy} header" in listed.stdout
                ), listed.stdout
            # The firewall refuses the other host (IPv4 and IPv6) before any listener sees it.
            for source, address in ((OTHER_V4, SYS_NET_V4), (OTHER_V6, SYS_NET_V6)):
                assert world.connect(source, address, 443, REQUEST)["outcome"] == "refused"
            assert "allow-from" not in log.read_text()
            # With the firewall opened wide by mistake, the client itself still refuses.
            too_wide = ["tcp", "dport", "443", "accept", "comment", '"test: too wide"']
            world.in_sys_net("nft", "insert", "rule", "ip", "qubes", "custom-input", *too_wide)
            # (It sends nothing, so the close is an orderly one, not a reset for unread data.)
            answer = world.connect(OTHER_V4, SYS_NET_V4, 443, b"")
            assert answer == {"outcome": "answered", "data": ""}, answer
            wait_for_line(log, f"{OTHER_V4}:", "closed, never forwarded: not in allow-from")
            handle = next(
                line.rpartition("# handle ")[2]
                for line in world.in_sys_net(
                    "nft", "-a", "list", "chain", "ip", "qubes", "custom-input"
                ).splitlines()
                if "test: too wide" in line
            )
            world.in_sys_net(
                "nft", "delete", "rule", "ip", "qubes", "custom-input", "handle", handle
            )
        assert len(server.wait_logged(2)) == 2  # nothing from the refused host reached nginx
    if proxy == "v1":
        listed = dom0_expose(machine, "--list")
        assert listed.returncode == 0, listed.stderr
        assert f"{SYS_NET_V4}:443 -> web:{server.port}" in listed.stdout
        assert f"[{SYS_NET_V6}]:443 -> web:{server.port}" in listed.stdout
    removed = dom0_expose(machine, "--remove", f"web:{server.port}")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert world.ruleset() == ruleset_before
    # /run is a tmpfs in a qube: the client's registry there is the running client's.
    assert without_run(snapshot(root)) == without_run(files_before)
    assert snapshot(machine.policy_dir) == policy_before


def wait_for_line(log: Path, *parts: str) -> str:
    """The first line of ``log`` holding every one of ``parts``, once it is written."""
    deadline = time.monotonic() + WAIT
    while True:
        for line in log.read_text().splitlines():
            if all(part in line for part in parts):
                return line
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)


def without_run(files: Snapshot) -> Snapshot:
    return {path: value for path, value in files.items() if not path.startswith("run/")}


def test_dry_run_changes_nothing_on_any_qube(machine: Machine, world: World) -> None:
    root = machine.root_dir("sys-net")
    files_before = snapshot(root)
    policy_before = snapshot(machine.policy_dir)
    ruleset_before = world.ruleset()
    (machine.root_dir("web") / "etc/qubes-rpc/qubes.ConnectTCP").unlink()
    shown = dom0_expose(
        machine, "web:8443", "--listen-port", "443", "--from", "192.0.2.0/24,2001:db8::/32",
        "--dry-run",
    )  # fmt: skip
    assert shown.returncode == 0, shown.stdout + shown.stderr
    out = shown.stdout
    # Every change on every qube is said: sys-net's files, firewall, bindings; dom0's policy.
    assert "would write /usr/local/etc/qconnect/expose/192.0.2.1-443:" in out
    assert "would write /usr/local/etc/qconnect/expose/2001_db8__1-443:" in out
    assert "add rule ip qubes custom-input" in out and "add rule ip6 qubes custom-input" in out
    assert "would run: nft -f /usr/local/etc/qconnect/expose/rules-443.nft" in out
    assert "would write /rw/config/rc.local:" in out
    assert "would run: qconnect persist add 192.0.2.1:443:web:8443" in out
    assert "qubes.ConnectTCP +8443 sys-net web allow" in out
    assert "warning: web has no qubes.ConnectTCP service" in out
    assert world.ruleset() == ruleset_before
    assert snapshot(root) == files_before
    assert snapshot(machine.policy_dir) == policy_before


def test_qube_facing_interfaces_are_refused_unless_asked(machine: Machine, world: World) -> None:
    world.in_sys_net("ip", "link", "add", "vif5.0", "type", "veth", "peer", "name", "qube5")
    world.in_sys_net("ip", "address", "add", "198.51.100.1/24", "dev", "vif5.0")
    world.in_sys_net("ip", "link", "set", "vif5.0", "up")
    root = machine.root_dir("sys-net")
    files_before = snapshot(root)
    ruleset_before = world.ruleset()
    for where in (["--interface", "vif5.0"], ["--listen", "198.51.100.1"]):
        refused = dom0_expose(machine, "web:80", *where, "--from", "198.51.100.0/24")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "faces this qube's client qubes" in refused.stderr or "faces" in refused.stdout
        assert "--allow-qube-facing" in refused.stderr + refused.stdout
    asked = dom0_expose(
        machine, "web:80", "--listen", "198.51.100.1", "--from", "198.51.100.0/24",
        "--allow-qube-facing", "--dry-run",
    )  # fmt: skip
    assert asked.returncode == 0, asked.stdout + asked.stderr
    assert "would run: qconnect persist add 198.51.100.1:80:web:80" in asked.stdout
    assert world.ruleset() == ruleset_before
    assert snapshot(root) == files_before
    assert not (machine.policy_dir / "30-qconnect.policy").exists()


def test_run_in_the_via_qube_alone_it_prints_the_dom0_command(
    machine: Machine, world: World
) -> None:
    qvm_run = str(qvmrun.dom0_bin(machine.directory) / "qvm-run")
    result = subprocess.run(
        [qvm_run, "--pass-io", "--user", "root", "sys-net",
         "qconnect expose web:443 --from 192.0.2.0/24 --dry-run"],
        env=qvmrun.dom0_env(machine.directory), capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "would run: qconnect persist add 192.0.2.1:443:web:443" in result.stdout
    assert "qconnect policy allow sys-net --port 443 --target web" in result.stdout
    assert not (machine.policy_dir / "30-qconnect.policy").exists()
