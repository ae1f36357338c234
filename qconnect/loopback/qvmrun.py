"""The loopback machine's ``qvm-run``: dom0's way of running a command in a qube.

Real ``qvm-run`` (qubes-core-admin-client, ``qubesadmin/tools/qvm_run.py``)
asks qubesd to start ``COMMAND`` in ``VMNAME`` through qrexec
(``qubes.VMShell``), run by ``sh -c`` as ``--user`` (default: the qube's
default user); with ``--pass-io`` it joins its stdin, stdout and stderr to
the command's and exits with the command's exit code. Extra words after
COMMAND are appended to it, each quoted for the shell.

The loopback plays it for the tools that act from dom0 on a qube
(``qconnect expose``), with what one Linux host can give:

- the command runs in the qube's environment (``layout.env_for``: the
  loopback ``qrexec-client-vm`` first on PATH), with the directory of this
  Python (where ``qconnect`` is installed) next, and :data:`ROOT_ENV` naming
  the qube's root directory, which qconnect's tools take as the qube's ``/``,
  and qrexec-agent's ``QREXEC_SERVICE_PATH`` and ``QUBES_RPC_CONFIG_PATH``
  naming the qube's service and rpc-config directories (so a command can
  ask which file would serve a call, as the agent would);
- a qube given a network namespace (:func:`set_netns`) runs its commands in
  it (``ip netns exec``), so its listeners and firewall are its own;
- ``--user`` is accepted and checked but cannot switch users: the command
  runs as the caller;
- only ``--pass-io`` is supported: without it, real qvm-run returns before
  the command ends, which no test of ours needs.

Installed as ``DIR/dom0/bin/qvm-run`` by :func:`install`; dom0's tools find
it on PATH (``dom0_env``).
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from qconnect.core import atomic
from qconnect.core.errors import QconnectError
from qconnect.core.exposure import ROOT_ENV
from qconnect.core.qrexec import validate_target
from qconnect.loopback import layout

PROG = "qvm-run"

# The user names a Qubes qube has (root and the default user, "user").
_USERS = ("root", "user")

_USAGE = (
    f"usage: {PROG} [--pass-io] [--user USER] [--no-autostart] [--no-gui] VMNAME COMMAND [ARGS...]"
)


def dom0_bin(machine: Path) -> Path:
    return machine / "dom0" / "bin"


def netns_file(machine: Path, qube: str) -> Path:
    return layout.qube_dir(machine, qube) / "netns"


def set_netns(machine: Path, qube: str, netns: str | None) -> None:
    """Run ``qube``'s commands in the network namespace ``netns`` (None: the host's)."""
    path = netns_file(machine, qube)
    if netns is None:
        atomic.remove_file(path)
    else:
        atomic.write_atomic(path, netns + "\n")


def install(machine: Path) -> Path:
    """Write ``DIR/dom0/bin/qvm-run`` and ``qvm-prefs``; return qvm-run's path."""
    project = Path(__file__).resolve().parent.parent.parent
    for name, entry in ((PROG, "main"), (PREFS_PROG, "prefs_main")):
        script = (
            f"#!{sys.executable} -I\n"
            f"# The loopback machine's {name} (dom0's tool).\n"
            f"# Machine {machine}; remove the machine directory to remove it.\n"
            "import sys\n"
            f"sys.path.insert(0, {str(project)!r})\n"
            f"from qconnect.loopback.qvmrun import {entry}\n"
            f"{entry}(machine={str(machine)!r})\n"
        )
        path = dom0_bin(machine) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_atomic(path, script, mode=0o755)
    return dom0_bin(machine) / PROG


# --- qvm-prefs: a qube's properties, read-only --------------------------------------

PREFS_PROG = "qvm-prefs"

#: The properties the loopback keeps (qubes-core-admin's names): a qube's
#: netvm (empty: none), its IPv4 and IPv6 addresses as its netvm sees them
#: (ip6 empty: IPv6 not enabled), and its template (empty: none, as for a
#: standalone qube; real qvm-prefs fails then).
PROPERTIES = ("netvm", "ip", "ip6", "template")


def set_pref(machine: Path, qube: str, name: str, value: str) -> None:
    if name not in PROPERTIES:
        raise ValueError(f"the loopback keeps only {', '.join(PROPERTIES)}")
    directory = layout.qube_dir(machine, qube) / "prefs"
    directory.mkdir(exist_ok=True)
    atomic.write_atomic(directory / name, value + "\n")


def prefs_main(argv: list[str] | None = None, *, machine: str) -> NoReturn:
    """``qvm-prefs [--get] VMNAME PROPERTY``: print one property (a qube without netvm: empty)."""
    words = [w for w in (sys.argv[1:] if argv is None else argv) if w != "--get"]
    if len(words) != 2 or words[0].startswith("-"):
        print(
            f"usage: {PREFS_PROG} [--get] VMNAME PROPERTY (the loopback reads only)",
            file=sys.stderr,
        )
        sys.exit(2)
    qube, name = words
    directory = Path(machine)
    try:
        validate_target(qube)
    except QconnectError:
        qube = ""
    if not qube or not layout.qube_dir(directory, qube).is_dir():
        print(f"{PREFS_PROG}: error: no such domain: {words[0]!r}", file=sys.stderr)
        sys.exit(2)
    if name not in PROPERTIES:
        print(f"{PREFS_PROG}: error: no such property: {name!r}", file=sys.stderr)
        sys.exit(2)
    try:
        value = (layout.qube_dir(directory, qube) / "prefs" / name).read_text().strip()
    except FileNotFoundError:
        value = ""
    print(value)
    sys.exit(0)


def dom0_env(machine: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a dom0 process of the machine: its qvm-run first on PATH."""
    env = dict(os.environ if base is None else base)
    for name in (layout.MACHINE_ENV, layout.QUBE_ENV, ROOT_ENV):
        env.pop(name, None)
    env["PATH"] = os.pathsep.join([str(dom0_bin(machine)), env.get("PATH", os.defpath)])
    return env


class _Usage(Exception):
    pass


def parse(argv: list[str]) -> tuple[str, str, list[str]]:
    """(user, qube, command words); _Usage for what qvm-run would refuse or we cannot play."""
    user = "user"
    pass_io = False
    index = 0
    while index < len(argv) and argv[index].startswith("-"):
        word = argv[index]
        if word == "--":
            index += 1
            break
        if word in ("-p", "--pass-io"):
            pass_io = True
        elif word in ("-u", "--user") or word.startswith("--user="):
            if "=" in word:
                user = word.partition("=")[2]
            else:
                index += 1
                if index >= len(argv):
                    raise _Usage(f"{PROG}: error: argument --user: expected one argument")
                user = argv[index]
        elif word in (
            "-n",
            "--no-autostart",
            "--autostart",
            "--no-gui",
            "--nogui",
            "-q",
            "--quiet",
        ):
            pass
        else:
            raise _Usage(
                f"{PROG}: error: unrecognized (or, in the loopback, unsupported) option {word}"
            )
        index += 1
    if not pass_io:
        raise _Usage(f"{PROG}: error: the loopback's qvm-run supports --pass-io only")
    if user not in _USERS:
        raise _Usage(f"{PROG}: error: user {user!r}: the loopback's qubes have {', '.join(_USERS)}")
    rest = argv[index:]
    if len(rest) < 2:
        raise _Usage(_USAGE)
    return user, rest[0], rest[1:]


def main(argv: list[str] | None = None, *, machine: str) -> NoReturn:
    words = sys.argv[1:] if argv is None else argv
    directory = Path(machine)
    try:
        _user, qube, command = parse(words)
        validate_target(qube)
    except _Usage as usage:
        print(usage, file=sys.stderr)
        sys.exit(2)
    except QconnectError:  # an invalid qube name
        print(f"{PROG}: error: no such domain: {qube!r}", file=sys.stderr)
        sys.exit(2)
    if not layout.qube_dir(directory, qube).is_dir():
        print(f"{PROG}: error: no such domain: {qube!r}", file=sys.stderr)
        sys.exit(2)
    shell_command = command[0] if len(command) == 1 else shlex.join(command)
    env = layout.env_for(directory, qube)
    bin_path = env["PATH"].split(os.pathsep)
    env["PATH"] = os.pathsep.join([bin_path[0], str(Path(sys.executable).parent), *bin_path[1:]])
    root = layout.root_dir(directory, qube)
    root.mkdir(parents=True, exist_ok=True)
    env[ROOT_ENV] = str(root)
    # qrexec-agent's search paths in this qube, as its own variables name them
    # (a real qube's shell has neither: the agent then uses its defaults).
    env["QREXEC_SERVICE_PATH"] = os.pathsep.join(map(str, layout.service_path(directory, qube)))
    env["QUBES_RPC_CONFIG_PATH"] = os.pathsep.join(
        map(str, layout.rpc_config_path(directory, qube))
    )
    argv_run = ["/bin/sh", "-c", shell_command]
    try:
        netns = netns_file(directory, qube).read_text().strip()
    except FileNotFoundError:
        netns = ""
    if netns:
        argv_run = ["ip", "netns", "exec", netns, *argv_run]
    try:
        result = subprocess.run(argv_run, env=env, cwd=root, check=False)
    except OSError as error:
        print(f"{PROG}: error: cannot run in {qube}: {error.strerror}", file=sys.stderr)
        sys.exit(1)
    sys.exit(result.returncode if result.returncode >= 0 else 128 - result.returncode)
