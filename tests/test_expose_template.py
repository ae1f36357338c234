"""``qconnect expose --template``: an exposure that survives a restart of a disposable sys-net.

A disposable sys-net starts every time from its disposable template's
private volume (/rw, and /usr/local which lives there): what the via qube
wrote in its own is gone at the next start. The loopback plays it with a
template qube and a via qube ("sys-net", in a network namespace) whose
/rw and /usr/local are thrown away and copied from the template at each
"boot", and whose firewall is rebuilt empty, as Qubes does.
"""

import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qconnect import cli
from qconnect.core.exposure import parse_networks
from qconnect.expose import cli as expose_cli
from qconnect.expose import model
from qconnect.loopback import qvmrun
from qconnect.loopback.machine import Machine
from tests import expose_world
from tests.expose_world import (
    ALLOWED_V4,
    ALLOWED_V6,
    OTHER_V4,
    SYS_NET_V4,
    SYS_NET_V6,
    World,
)
from tests.persist_tree import snapshot
from tests.test_expose_netns import REQUEST, dom0_expose, units_running, without_run

MakeMachine = Callable[..., Machine]
TEMPLATE = "sys-net-dvm"

needs_netns = pytest.mark.skipif(
    expose_world.skip_reason() is not None, reason=str(expose_world.skip_reason())
)


@pytest.fixture
def world() -> Iterator[World]:
    with expose_world.namespaces() as made:
        yield made


@pytest.fixture
def machine(loopback_machine: MakeMachine, world: World) -> Machine:
    made = loopback_machine("sys-net", TEMPLATE, "web")
    qvmrun.install(made.directory)
    qvmrun.set_netns(made.directory, "sys-net", world.sys_net)
    for qube in ("sys-net", TEMPLATE):
        root = made.root_dir(qube)
        for directory in ("rw/config", "usr/local/etc", "usr/local/lib", "run"):
            (root / directory).mkdir(parents=True, exist_ok=True)
        (root / "rw/config/rc.local").write_text("#!/bin/sh\n# the user's own line\n")
        (root / "rw/config/rc.local").chmod(0o755)
    return made


def boot_disposable(machine: Machine, world: World) -> None:
    """A restart of the disposable sys-net: its /rw and /usr/local come from the template."""
    root, template = machine.root_dir("sys-net"), machine.root_dir(TEMPLATE)
    for part in ("rw", "usr/local", "run"):
        shutil.rmtree(root / part)
    for part in ("rw", "usr/local"):
        shutil.copytree(template / part, root / part, symlinks=True)
    (root / "run").mkdir()
    world.in_sys_net("nft", "flush", "ruleset")  # Qubes rebuilds its tables at boot
    expose_world.load_qubes_like_ruleset(world.sys_net)
    world.in_sys_net("sysctl", "-q", "-w", "net.ipv4.ip_nonlocal_bind=0")
    # rc.local's block, as Qubes runs it at boot (paths under the loopback qube's root).
    text = (root / "rw/config/rc.local").read_text()
    block = text.partition("# BEGIN qconnect expose")[2].partition("# END")[0]
    for line in block.splitlines()[1:]:
        words = shlex.split(line, comments=True)
        if words[:2] == ["nft", "-f"]:
            words[2] = str(root / words[2].lstrip("/"))
        if words:
            world.in_sys_net(*words)


@needs_netns
def test_the_exposure_comes_back_after_the_disposable_sys_net_restarts(
    machine: Machine, world: World, tmp_path: Path
) -> None:
    template = machine.root_dir(TEMPLATE)
    template_before = snapshot(template)
    with expose_world.nginx(tmp_path / "nginx") as server:
        made = dom0_expose(
            machine, f"web:{server.port}", "--listen-port", "443", "--interface", "eth0",
            "--from", f"{ALLOWED_V4}/32,{ALLOWED_V6}/128", "--proxy-protocol", "v1",
            "--template", TEMPLATE,
        )  # fmt: skip
        assert made.returncode == 0, made.stdout + made.stderr
        assert f"# {TEMPLATE} (the disposable template of sys-net):" in made.stdout
        # The template got the files at sys-net's addresses, and loaded or started nothing.
        config = template / "usr/local/etc/qconnect/expose"
        assert sorted(p.name for p in config.iterdir()) == [
            f"{SYS_NET_V4}-443",
            f"{SYS_NET_V6.replace(':', '_')}-443",
            "rules-443.nft",
        ]
        assert "# BEGIN qconnect expose" in (template / "rw/config/rc.local").read_text()
        boot_disposable(machine, world)
        assert "qconnect expose port 443" in world.ruleset()
        with machine.server(), units_running(machine, world) as log:
            for source, address in ((ALLOWED_V4, SYS_NET_V4), (ALLOWED_V6, SYS_NET_V6)):
                answer = world.connect(source, address, 443, REQUEST)
                assert answer["outcome"] == "answered", (answer, log.read_text())
                assert "hello from web" in answer["data"]
            assert world.connect(OTHER_V4, SYS_NET_V4, 443, REQUEST)["outcome"] == "refused"
        listed = dom0_expose(machine, "--list", "--template", TEMPLATE)
        assert listed.returncode == 0, listed.stderr
        assert f"# {TEMPLATE} (what sys-net starts with):" in listed.stdout
        assert listed.stdout.count(f"{SYS_NET_V4}:443 -> web:{server.port}") == 2
    removed = dom0_expose(machine, "--remove", f"web:{server.port}", "--template", TEMPLATE)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert without_run(snapshot(template)) == without_run(template_before)


@needs_netns
def test_a_template_that_fails_undoes_the_via_part_and_leaves_the_policy(
    machine: Machine, world: World
) -> None:
    root = machine.root_dir("sys-net")
    before = snapshot(root)
    ruleset = world.ruleset()
    # A broken block in the template's rc.local: its part is refused, nothing changed.
    broken = "#!/bin/sh\n# BEGIN qconnect expose: firewall rules of exposed ports\n"
    (machine.root_dir(TEMPLATE) / "rw/config/rc.local").write_text(broken)
    made = dom0_expose(
        machine, "web:80", "--interface", "eth0", "--from", f"{ALLOWED_V4}/32",
        "--template", TEMPLATE,
    )  # fmt: skip
    assert made.returncode == 1, made.stdout + made.stderr
    assert f"the disposable template {TEMPLATE} did not take its part" in made.stderr
    assert without_run(snapshot(root)) == without_run(before)
    assert world.ruleset() == ruleset
    assert not (machine.policy_dir / "30-qconnect.policy").exists()


def test_template_must_not_be_the_via_qube() -> None:
    argv = ["expose", "web:80", "--from", "any", "--template", "sys-net", "--via", "sys-net"]
    args = cli.build_parser(argv).parse_args(argv)
    with pytest.raises(model.ExposeError, match="expected the disposable template of sys-net"):
        expose_cli._run_dom0(args)


def test_request_round_trips_through_json() -> None:
    request = model.Request(
        model.Target("web", 443), 8443, ("192.0.2.1", "2001:db8::1"), "eth0",
        parse_networks("192.0.2.0/24,2001:db8::/32"), "v1", False,
    )  # fmt: skip
    assert model.request_from_json(model.request_to_json(request)) == request


@given(st.text(max_size=300))
def test_any_resolve_answer_is_refused_or_holds_only_valid_values(text: str) -> None:
    try:
        listen, interface = model.parse_resolved(text)
    except model.ExposeFailure:
        return
    assert all(model.parse_listen_address(a) == a for a in listen)
    assert interface is None or model.parse_interface(interface) == interface


@pytest.mark.parametrize(
    "answer",
    [
        {"listen": ["0.0.0.0"], "interface": None},
        {"listen": ["192.0.2.1"], "interface": "eth0; reboot"},
        {"listen": [], "interface": "eth0"},
        {"listen": "192.0.2.1", "interface": "eth0"},
    ],
)
def test_a_hostile_resolve_answer_is_refused(answer: object) -> None:
    with pytest.raises(model.ExposeFailure):
        model.parse_resolved(json.dumps(answer))


@needs_netns
def test_dry_run_with_a_template_changes_nothing_anywhere(machine: Machine, world: World) -> None:
    roots = {qube: machine.root_dir(qube) for qube in ("sys-net", TEMPLATE)}
    before = {qube: snapshot(root) for qube, root in roots.items()}
    ruleset = world.ruleset()
    shown = dom0_expose(
        machine, "web:80", "--interface", "eth0", "--from", f"{ALLOWED_V4}/32",
        "--template", TEMPLATE, "--dry-run",
    )  # fmt: skip
    assert shown.returncode == 0, shown.stdout + shown.stderr
    template_part = shown.stdout.partition(f"# {TEMPLATE} (the disposable template")[2]
    assert "would write /rw/config/rc.local:" in template_part
    assert f"would write the units of: qconnect persist add {SYS_NET_V4}:80:web:80" in (
        template_part
    )
    assert {qube: snapshot(root) for qube, root in roots.items()} == before
    assert world.ruleset() == ruleset
    assert not (machine.policy_dir / "30-qconnect.policy").exists()


@pytest.mark.parametrize("stdin", ["", "[]", '{"target": "web:80"}', "\x00" * 10])
def test_template_apply_refuses_what_dom0_did_not_send(tmp_path: Path, stdin: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qconnect", "expose", "--here", "--template-apply",
         "--root", str(tmp_path)],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # What arrives on standard input is not the command line: a failure, exit 1.
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "not a request from dom0's qconnect expose" in result.stderr
    assert list(tmp_path.iterdir()) == []
