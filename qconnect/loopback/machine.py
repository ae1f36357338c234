"""A loopback Qubes machine: several "qubes", dom0's policy and qrexec, in one directory.

Tests, the demo and new users run the same code a Qubes user runs, with only
``qrexec-client-vm`` swapped for the loopback one. A process runs "inside" a
qube when its environment says so (``Machine.env_for``); the loopback client
found first on its PATH then acts as that qube's qrexec: dom0's policy, the
target qube's agent and the byte streams in between (see
``qconnect.loopback.client``).

Typical use in a test::

    machine = Machine.create(tmp_path / "machine", ["work", "web:AppVM:server"])
    machine.add_policy(["qubes.ConnectTCP +80 work @default allow target=web"])
    (machine.rpc_dir("web") / "my.Service").symlink_to(...)
    result = machine.run("work", ["qrexec-client-vm", "web", "my.Service"], capture_output=True)
"""

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import qconnect
from qconnect.core import atomic
from qconnect.core.errors import PolicyError, QconnectError
from qconnect.core.qrexec import SERVICE, is_valid_qube_name
from qconnect.loopback import channels, forkcall, layout


class LoopbackError(QconnectError):
    """A loopback machine cannot be created or used as asked."""


# The qube types a loopback qube may have (Qubes' class names, as the policy's
# @type: token uses them); dom0 is always there as the AdminVM.
QUBE_TYPES = ("AppVM", "DispVM", "StandaloneVM", "TemplateVM")

# A stable namespace so a qube's uuid depends only on its name (readable diffs
# of qubes.json across runs).
_UUID_NAMESPACE = uuid.UUID("6f1c0a52-9a4e-4d35-9d0c-4b2f3c1e7a10")

# The stock rpc-config of qubes.ConnectTCP shipped by today's Qubes
# (qubes-core-agent-linux): the built-in TCP service, no descriptor, and the
# stream ends when the server's side ends.
STOCK_CONNECT_TCP_TARGET = "/dev/tcp/127.0.0.1"
STOCK_CONNECT_TCP_CONFIG = "skip-service-descriptor=true\nexit-on-service-eof=true\n"

_DEFAULT_POLICY_FILE = "30-loopback.policy"

# Seconds the fork-server may take to listen (imports on a busy 2-core
# machine), and to finish the calls still running once asked to stop.
SERVER_START_SECONDS = 30.0
SERVER_STOP_SECONDS = 10.0


@dataclass(frozen=True)
class QubeSpec:
    """One qube of a loopback machine: ``NAME[:TYPE][:TAG,...]`` on the command line."""

    name: str
    type: str = "AppVM"
    tags: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "QubeSpec":
        """Parse ``NAME[:TYPE][:TAG,...]``; the type may be left empty (``NAME::TAG``)."""
        parts = text.split(":")
        if len(parts) > 3:
            raise LoopbackError(
                f"invalid qube {text!r}: expected NAME[:TYPE][:TAG,...] (at most two ':')"
            )
        name = parts[0]
        qube_type = parts[1] if len(parts) > 1 and parts[1] else "AppVM"
        tags = tuple(tag for tag in parts[2].split(",") if tag) if len(parts) > 2 else ()
        spec = cls(name, qube_type, tags)
        spec.validate()
        return spec

    def validate(self) -> None:
        if not is_valid_qube_name(self.name) or self.name == "dom0":
            raise LoopbackError(
                f"invalid qube name {self.name!r}: expected a letter, then up to 30 letters, "
                "digits, '_', '.' or '-' (and not dom0, which every machine has)"
            )
        if self.type not in QUBE_TYPES:
            raise LoopbackError(
                f"unknown qube type {self.type!r} for {self.name!r}: expected one of "
                f"{', '.join(QUBE_TYPES)} (tags go third: NAME:TYPE:TAG,...)"
            )
        for tag in self.tags:
            if not all(c.isascii() and (c.isalnum() or c in "_-") for c in tag):
                raise LoopbackError(
                    f"invalid tag {tag!r} for {self.name!r}: expected letters, digits, '_' or '-'"
                )


def _domain_info(spec: QubeSpec) -> dict[str, Any]:
    return {
        "type": spec.type,
        "tags": list(spec.tags),
        "default_dispvm": None,
        "template_for_dispvms": False,
        "power_state": "Running",
        "icon": "adminvm-black" if spec.type == "AdminVM" else "appvm-red",
        "guivm": None,
        "relayvm": None,
        "uuid": str(uuid.uuid5(_UUID_NAMESPACE, spec.name)),
    }


def _launcher(machine: Path) -> str:
    """The generated bin/qrexec-client-vm: this interpreter, isolated (-I) and without site (-S).

    -S skips site-packages processing, the largest part of the interpreter's
    start-up; the project directory is put on sys.path by hand instead. It
    hands the call to the machine's fork-server when one runs, and runs it
    in-process otherwise (``qconnect.loopback.forkcall``).
    """
    project = Path(qconnect.__file__).resolve().parent.parent
    return (
        f"#!{sys.executable} -IS\n"
        "# Generated by `qconnect loopback init`: the loopback qrexec-client-vm of the\n"
        f"# machine {machine}. Remove the machine directory to remove it.\n"
        "import sys\n"
        f"sys.path.insert(0, {str(project)!r})\n"
        "from qconnect.loopback.forkcall import main\n"
        f"main(machine={str(machine)!r})\n"
    )


def _check_policy(lines: Iterable[str], name: str = _DEFAULT_POLICY_FILE) -> None:
    """Refuse policy lines dom0 could not parse (PolicyError naming the line), as dom0 would.

    A line with a newline in it is refused too: it would be two lines in the file.
    """
    from qconnect.policy.parser import parse_text

    lines = list(lines)
    for number, line in enumerate(lines, start=1):
        if "\n" in line or "\r" in line:
            raise PolicyError(f"policy line {number} holds a line break", file=name, line=number)
    parse_text("".join(f"{line}\n" for line in lines), name)


class Machine:
    """A loopback machine directory (see ``qconnect.loopback.layout`` for its layout).

    Build one with ``Machine.create``, or open an existing one with
    ``Machine(path)``. Every path it hands out is absolute.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory).resolve()
        if not self.qubes_json.is_file():
            raise LoopbackError(
                f"{self.directory} is not a loopback machine: {self.qubes_json.name} is missing "
                "(create one with `qconnect loopback init DIR --qube NAME`)"
            )

    @classmethod
    def create(
        cls,
        directory: Path | str,
        qubes: Iterable[QubeSpec | str],
        *,
        policy: Sequence[str] = (),
        stock_connect_tcp: bool = True,
    ) -> "Machine":
        """Create a machine with ``qubes`` (QubeSpec or ``NAME[:TYPE][:TAG,...]``) and dom0.

        ``policy`` lines go to ``policy.d/30-loopback.policy``. With
        ``stock_connect_tcp`` every qube has what today's Qubes ships:
        ``/etc/qubes-rpc/qubes.ConnectTCP -> /dev/tcp/127.0.0.1`` and its
        rpc-config (under the qube's ``root/``); a service put in the qube's
        ``rpc/`` directory comes first and overrides it, as ``/run/qubes-rpc``
        does. ``directory`` must not exist or be empty.
        """
        path = Path(directory).resolve()
        _check_policy(policy)  # before anything is made: a bad line leaves no half machine
        specs = [q if isinstance(q, QubeSpec) else QubeSpec.parse(q) for q in qubes]
        for spec in specs:
            spec.validate()
        names = [spec.name for spec in specs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise LoopbackError(f"qube {duplicates[0]!r} given twice")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise LoopbackError(f"cannot create a loopback machine in {path}: it is not empty")
        try:
            path.mkdir(parents=True, exist_ok=True)
            for sub in ("policy.d", "bin", "log", "run/channels"):
                (path / sub).mkdir(parents=True, exist_ok=True)
            domains = {"dom0": _domain_info(QubeSpec("dom0", "AdminVM"))}
            for domid, spec in enumerate(specs, start=1):
                domains[spec.name] = _domain_info(spec)
                layout.rpc_dir(path, spec.name).mkdir(parents=True)
                layout.rpc_config_dir(path, spec.name).mkdir()
                layout.domid_file(path, spec.name).write_text(f"{domid}\n")
                if stock_connect_tcp:
                    cls._install_stock_connect_tcp(path, spec.name)
        except OSError as error:
            raise LoopbackError(f"cannot create a loopback machine in {path}: {error}") from None
        atomic.write_atomic(path / "qubes.json", json.dumps({"domains": domains}, indent=2) + "\n")
        atomic.write_atomic(layout.bin_dir(path) / layout.CLIENT_NAME, _launcher(path), mode=0o755)
        machine = cls(path)
        if policy:
            machine.add_policy(policy)
        return machine

    @staticmethod
    def _install_stock_connect_tcp(path: Path, qube: str) -> None:
        root = layout.root_dir(path, qube)
        service_dir = root / layout.SERVICE_PATH[-1]
        config_dir = root / layout.RPC_CONFIG_PATH[-1]
        service_dir.mkdir(parents=True)
        config_dir.mkdir(parents=True)
        (service_dir / SERVICE).symlink_to(STOCK_CONNECT_TCP_TARGET)
        atomic.write_atomic(config_dir / SERVICE, STOCK_CONNECT_TCP_CONFIG)

    # -- paths --------------------------------------------------------------

    @property
    def qubes_json(self) -> Path:
        """dom0's system info (the internal.GetSystemInfo JSON) the policy is evaluated with."""
        return self.directory / "qubes.json"

    @property
    def policy_dir(self) -> Path:
        """dom0's policy directory, ``/etc/qubes/policy.d`` in a real dom0."""
        return self.directory / "policy.d"

    @property
    def bin_dir(self) -> Path:
        """The directory put first on PATH inside every qube (holds qrexec-client-vm)."""
        return layout.bin_dir(self.directory)

    @property
    def qrexec_client_vm(self) -> Path:
        return self.bin_dir / layout.CLIENT_NAME

    @property
    def log_file(self) -> Path:
        """Where the emulated qrexec-daemon and agents log (one line per event)."""
        return self.directory / "log" / "qrexec.log"

    @property
    def server_socket(self) -> Path:
        """The fork-server's socket; present while ``qconnect loopback serve DIR`` runs."""
        return self.directory.joinpath(*forkcall.SOCKET_PATH)

    @property
    def server_log(self) -> Path:
        """Where ``Machine.server()`` sends the fork-server's own log lines."""
        return self.directory / "log" / "server.log"

    def qube_dir(self, qube: str) -> Path:
        self._check_qube(qube)
        return layout.qube_dir(self.directory, qube)

    def rpc_dir(self, qube: str) -> Path:
        """The qube's first qubes-rpc directory (plays ``/run/qubes-rpc``): put services here."""
        self._check_qube(qube)
        return layout.rpc_dir(self.directory, qube)

    def rpc_config_dir(self, qube: str) -> Path:
        """The qube's first rpc-config directory (plays ``/run/qubes/rpc-config``)."""
        self._check_qube(qube)
        return layout.rpc_config_dir(self.directory, qube)

    def root_dir(self, qube: str) -> Path:
        """The qube's root: ``root/etc/qubes-rpc`` etc. continue the search paths."""
        self._check_qube(qube)
        return layout.root_dir(self.directory, qube)

    # -- contents -----------------------------------------------------------

    def qubes(self) -> list[str]:
        """The qubes' names, dom0 excluded."""
        domains = json.loads(self.qubes_json.read_text())["domains"]
        return [name for name, info in domains.items() if info.get("type") != "AdminVM"]

    def _check_qube(self, qube: str) -> None:
        if not layout.qube_dir(self.directory, qube).is_dir() or not is_valid_qube_name(qube):
            raise LoopbackError(f"no qube {qube!r} in the loopback machine {self.directory}")

    def add_policy(self, lines: Iterable[str], name: str = _DEFAULT_POLICY_FILE) -> Path:
        """Append policy lines to ``policy.d/NAME`` (created if missing); return its path."""
        path = self.policy_dir / name
        old = path.read_text() if path.exists() else ""
        lines = list(lines)
        _check_policy(lines, name)
        text = "".join(f"{line}\n" for line in lines)
        atomic.write_atomic(path, old + text)
        return path

    def set_ask_answer(self, answer: str | None) -> None:
        """How ``ask`` rules are answered: ``"allow"``, ``"allow QUBE"``, ``"deny"`` or None (deny).

        A real dom0 asks the user; the loopback reads this instead. ``allow``
        without a qube uses the rule's ``default_target``; with none, the call
        is refused as if the user had closed the dialog.
        """
        path = self.directory / "ask"
        if answer is None:
            atomic.remove_file(path)
        else:
            atomic.write_atomic(path, answer + "\n")

    def set_old_client(self, old: bool) -> None:
        """Play an older qrexec-client-vm, without ``--use-stdin-socket`` (or the current one).

        The option is then unknown (usage error, exit 2) and missing from
        ``--help``, as in qrexec releases before it existed: what a client
        that detects the option must fall back from.
        """
        flag = layout.old_client_flag(self.directory)
        if old:
            atomic.write_atomic(flag, "qrexec-client-vm without --use-stdin-socket\n")
        else:
            atomic.remove_file(flag)

    def calls_in_flight(self, qube: str) -> int:
        """How many calls made by or to ``qube`` are running now (their processes alive)."""
        self._check_qube(qube)
        return channels.live_calls(self.directory, qube)

    def channels_held(self, qube: str) -> int:
        """Ports of ``qube``'s qrexec-daemon table held now: running calls, and ended ones
        whose release has not come yet (see ``set_channel_release_lag``)."""
        self._check_qube(qube)
        return len(channels.held_ports(self.directory, qube))

    def domain_id(self, qube: str) -> int:
        """The qube's domain id (1, 2, ... in the order given to ``create``; dom0 is 0)."""
        self._check_qube(qube)
        return layout.domain_id(self.directory, qube)

    def set_domain_id(self, qube: str, domid: int) -> None:
        """Give ``qube`` another domain id: which half of a target's port table its calls take."""
        self._check_qube(qube)
        if not 1 <= domid < 0x7FF0:  # Xen's DOMID_FIRST_RESERVED
            raise LoopbackError(f"invalid domain id {domid} for {qube!r}: expected 1 to 32751")
        atomic.write_atomic(layout.domid_file(self.directory, qube), f"{domid}\n")

    def set_channel_release_lag(self, seconds: float | None, per_call: float = 0.0) -> None:
        """When a data port comes back: ``seconds`` plus ``per_call`` times the call's lifetime
        after the call ended (None: the default, see ``qconnect.loopback.channels``).

        Real qrexec frees a port only when the target's agent reports the
        connection terminated, after the caller has exited, and dom0's
        daemon has read that message.
        """
        path = channels.release_lag_file(self.directory)
        if seconds is None:
            atomic.remove_file(path)
            return
        if not 0.0 <= seconds <= channels.MAX_RELEASE_LAG:
            raise LoopbackError(
                f"invalid channel release lag {seconds!r}: expected 0 to "
                f"{channels.MAX_RELEASE_LAG:g} seconds"
            )
        if not 0.0 <= per_call <= channels.MAX_RELEASE_PER_CALL:
            raise LoopbackError(
                f"invalid channel release lag per call {per_call!r}: expected 0 to "
                f"{channels.MAX_RELEASE_PER_CALL:g} times the call's lifetime"
            )
        atomic.write_atomic(path, f"{seconds!r} {per_call!r}\n")

    # -- the fork-server -----------------------------------------------------

    @contextlib.contextmanager
    def server(self) -> "Iterator[subprocess.Popen[bytes]]":
        """Run this machine's fork-server for the ``with`` block (see ``forkserver``).

        Calls made meanwhile cost a fork instead of a Python start; yields the
        server process once it listens. On exit: SIGTERM (no new calls; those
        running finish), then after SERVER_STOP_SECONDS SIGKILL to the server
        and every process of its group, so nothing it started outlives it.
        """
        project = str(Path(qconnect.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [project, env.get("PYTHONPATH")]))
        with open(self.server_log, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "qconnect.cli", "loopback", "serve", str(self.directory)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        try:
            self._wait_listening(process)
            yield process
        finally:
            _stop_server(process)

    def _wait_listening(self, process: "subprocess.Popen[bytes]") -> None:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], SERVER_START_SECONDS)
        line = process.stdout.readline() if ready else b""
        if not line.startswith(b"listening"):
            tail = self.server_log.read_text(errors="replace").strip().splitlines()[-1:]
            raise LoopbackError(
                f"the fork-server of {self.directory} did not start"
                + (f": {tail[0]}" if tail else f" within {SERVER_START_SECONDS:.0f} s")
            )

    # -- running things inside a qube ---------------------------------------

    def env_for(self, qube: str, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a process inside ``qube`` (``base`` defaults to os.environ).

        PATH starts with ``bin_dir``, so ``qrexec-client-vm`` is the loopback
        client, and QCONNECT_LOOPBACK_MACHINE / QCONNECT_LOOPBACK_QUBE say
        where it runs.
        """
        if qube != "dom0":
            self._check_qube(qube)
        return layout.env_for(self.directory, qube, base)

    def popen(
        self, qube: str, argv: Sequence[str | os.PathLike[str]], **popen_kwargs: Any
    ) -> "subprocess.Popen[Any]":
        """Start ``argv`` inside ``qube`` (subprocess.Popen; ``env=`` is used as the base).

        A bare program name is looked up on the qube's PATH (subprocess does
        that with the ``env`` it is given), so ``qrexec-client-vm`` works.
        """
        env = self.env_for(qube, popen_kwargs.pop("env", None))
        return subprocess.Popen(argv, env=env, **popen_kwargs)

    def run(
        self, qube: str, argv: Sequence[str | os.PathLike[str]], **run_kwargs: Any
    ) -> "subprocess.CompletedProcess[Any]":
        """Run ``argv`` inside ``qube`` to completion (subprocess.run; ``env=`` is the base)."""
        env = self.env_for(qube, run_kwargs.pop("env", None))
        return subprocess.run(argv, env=env, **run_kwargs)

    def call_argv(self, target: str, service: str, *options: str) -> list[str]:
        """``[qrexec-client-vm, *options, target, service]``, the client by its full path."""
        return [str(self.qrexec_client_vm), *options, target, service]


def _stop_server(process: "subprocess.Popen[bytes]") -> None:
    """SIGTERM, a grace period, then SIGKILL to the whole process group; reaped either way."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + SERVER_STOP_SECONDS
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(max(0.0, deadline - time.monotonic()))
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    if process.stdout is not None:
        process.stdout.close()
