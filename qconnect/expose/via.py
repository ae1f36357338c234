"""``qconnect expose`` in the via qube: listener settings, firewall rules, bindings.

Everything runs as root in the via qube (dom0 calls it through
``qvm-run --user root``). Files are written under ``root`` (``/`` in a real
qube, a loopback qube's root directory in tests); the firewall rules go to
this qube's live nftables and to a file that rc.local loads at boot; the
bindings are made by ``qconnect persist``, run as its command line.

Order (add): settings files first, so the listener never exists without
its ``--from`` check; then the firewall; then rc.local; then the bindings.
Any failure undoes what was done, in reverse. Remove goes the other way:
bindings first (no listener is left without its check), then the rest.

The NAT way (``--nat``) gives each qube on the netvm chain one nft file made
by dom0 (:func:`nat_apply`), loaded now and by rc.local at boot.
"""

import contextlib
import functools
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from qconnect.core import atomic, exposure
from qconnect.core.errors import FenceError, FileWriteError, QconnectError
from qconnect.core.exposure import Exposure, ExposureError
from qconnect.expose import model
from qconnect.expose.model import ExposeError, ExposeFailure, Request, Target

RC_LOCAL = "rw/config/rc.local"
_SHEBANG = "#!/bin/sh\n"
_CREATED = " (file created by qconnect)"
_NEWLINE_ADDED = " (newline added by qconnect)"
# Qubes runs rc.local only when it is executable.
_RC_LOCAL_MODE = 0o755

# At boot the binding sockets start before the outside interface has its
# address (DHCP comes later); without this, binding that address would fail.
NONLOCAL_BIND = "sysctl -q -w net.ipv4.ip_nonlocal_bind=1 net.ipv6.ip_nonlocal_bind=1"

# How long one nft, ip or qconnect persist command may take.
_COMMAND_TIMEOUT = 60


@dataclass
class Context:
    """Where this run acts, and whether it only says what it would do."""

    root: Path
    dry_run: bool
    say: Callable[[str], None] = print
    undo: list[Callable[[], None]] = field(default_factory=list)
    #: False in a disposable template (``--template``): only the files that its
    #: disposables boot with are written; nothing is loaded or started here,
    #: since this qube is not the one with the outside network.
    live: bool = True

    @property
    def config_dir(self) -> Path:
        return exposure.config_dir(self.root)

    def seen(self, path: Path) -> str:
        """``path`` as the qube sees it (without ``root``)."""
        return "/" + str(path.relative_to(self.root)).lstrip("/")


def _run(argv: list[str], what: str) -> str:
    """Run a tool to completion; its stdout, or ExposeFailure with its own words."""
    try:
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=_COMMAND_TIMEOUT, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ExposeFailure(f"{what}: cannot run {argv[0]}: {error}") from None
    if result.returncode != 0:
        detail = " ".join((result.stderr or result.stdout).split())[:300]
        raise ExposeFailure(f"{what} failed ({shlex.join(argv)}): {detail}")
    return result.stdout


# --- addresses ---------------------------------------------------------------------


def default_interface() -> str:
    """The interface of this qube's default route: its outside interface."""
    for family in ("-4", "-6"):
        routes = json.loads(
            _run(["ip", "-j", family, "route", "show", "default"], "ip route") or "[]"
        )
        for route in routes:
            if isinstance(route, dict) and isinstance(route.get("dev"), str):
                return model.parse_interface(route["dev"])
    raise ExposeFailure(
        "this qube has no default route, so its outside interface is unknown: "
        "give --interface IFACE or --listen ADDRESS"
    )


def interface_addresses(interface: str) -> list[str]:
    """The global addresses of ``interface`` (IPv4 first)."""
    text = _run(
        ["ip", "-j", "address", "show", "dev", interface], f"ip address show dev {interface}"
    )
    found: list[str] = []
    for link in json.loads(text or "[]"):
        for info in link.get("addr_info", []) if isinstance(link, dict) else []:
            if info.get("scope") == "global" and isinstance(info.get("local"), str):
                found.append(ipaddress.ip_address(info["local"]).compressed)
    return sorted(found, key=lambda a: (ipaddress.ip_address(a).version, a))


def interface_of(address: str) -> str | None:
    """The interface holding ``address`` here, if any."""
    for link in json.loads(_run(["ip", "-j", "address", "show"], "ip address show") or "[]"):
        for info in link.get("addr_info", []) if isinstance(link, dict) else []:
            local = info.get("local")
            if isinstance(local, str) and ipaddress.ip_address(local).compressed == address:
                name = link.get("ifname")
                return name if isinstance(name, str) else None
    return None


def listen_addresses(request: Request) -> tuple[tuple[str, ...], str | None]:
    """(addresses to listen on, interface for the firewall rule or None)."""
    if request.listen:
        for address in request.listen:
            holder = interface_of(address)
            if holder is None:
                raise ExposeFailure(f"--listen {address}: no interface of this qube has it")
            if model.is_qube_facing(holder) and not request.allow_qube_facing:
                raise ExposeError(
                    f"--listen {address} is on {holder}, which faces this qube's client qubes: "
                    "refused unless --allow-qube-facing is given"
                )
        return request.listen, request.interface
    interface = request.interface or default_interface()
    if model.is_qube_facing(interface) and not request.allow_qube_facing:
        raise ExposeError(
            f"interface {interface} faces this qube's client qubes (vif*): "
            "refused unless --allow-qube-facing is given"
        )
    addresses = interface_addresses(interface)
    if not addresses:
        raise ExposeFailure(f"interface {interface} has no global address to listen on")
    return tuple(addresses), interface


def resolved(request: Request) -> dict[str, object]:
    """The addresses (and firewall interface) this exposure listens on here, for dom0."""
    addresses, interface = listen_addresses(request)
    families = model.families_needed(addresses, request.allow_from)
    chosen = [a for a in addresses if ipaddress.ip_address(a).version in families]
    if not chosen:
        raise ExposeError(
            f"no --from network is of the family of the listen addresses {', '.join(addresses)}"
        )
    return {"listen": chosen, "interface": interface}


# --- firewall ------------------------------------------------------------------------


def check_chains(families: list[int]) -> None:
    for version in families:
        table = model.NFT_TABLES[version]
        try:
            _run(["nft", "list", "chain", *table.split(), model.NFT_CHAIN], "nft list chain")
        except ExposeFailure:
            raise ExposeFailure(
                f"no nftables chain '{table} {model.NFT_CHAIN}' here: qconnect expose needs "
                "Qubes 4.2's firewall (nftables), where every qube has it"
            ) from None


def tagged_handles(version: int, listen_port: int, chain: str = model.NFT_CHAIN) -> list[int]:
    """The handles of our rules of one exposure in one chain of a family's ``qubes`` table."""
    table = model.NFT_TABLES[version].split()
    try:
        text = _run(["nft", "-j", "-a", "list", "chain", *table, chain], "nft list chain")
    except ExposeFailure:
        return []
    handles = []
    for item in json.loads(text).get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if isinstance(rule, dict) and rule.get("comment") == model.rule_tag(listen_port):
            handles.append(int(rule["handle"]))
    return handles


def delete_rules(context: Context, listen_port: int) -> None:
    for version, table in model.NFT_TABLES.items():
        for chain in (model.NFT_CHAIN, model.NFT_FORWARD_CHAIN):
            for handle in tagged_handles(version, listen_port, chain):
                argv = ["nft", "delete", "rule", *table.split(), chain, "handle", str(handle)]
                if context.dry_run:
                    context.say(f"would run: {shlex.join(argv)}")
                else:
                    _run(argv, "nft delete rule")
                    context.say(f"deleted the firewall rule {table} {chain} handle {handle}")


# --- files ---------------------------------------------------------------------------


def _write(context: Context, path: Path, text: str, *, mode: int = 0o644) -> None:
    try:
        old: bytes | None = path.read_bytes()
    except FileNotFoundError:
        old = None
    except OSError as error:
        raise ExposeFailure(f"cannot read {path}: {error.strerror}") from None
    if old == text.encode():
        return
    if context.dry_run:
        context.say(f"would write {context.seen(path)}:")
        for line in text.splitlines():
            context.say(f"  | {line}")
        return
    created = [parent for parent in reversed(path.parents) if not parent.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_atomic(path, text, mode=mode)
    context.say(f"wrote {context.seen(path)}")

    def undo() -> None:
        if old is None:
            atomic.remove_file(path)
        else:
            atomic.write_atomic(path, old)
        for directory in reversed(created):
            try:
                directory.rmdir()
            except OSError:
                break

    context.undo.append(undo)


def _remove(context: Context, path: Path) -> None:
    if not path.exists():
        return
    if context.dry_run:
        context.say(f"would remove {context.seen(path)}")
        return
    atomic.remove_file(path)
    context.say(f"removed {context.seen(path)}")


def _rc_local_with(text: str | None, lines: list[str]) -> str | None:
    """rc.local with our block holding ``lines`` (none: the block and its traces gone)."""
    markers = model.RC_LOCAL_MARKERS
    try:
        fenced = markers.split(_SHEBANG if text is None else text, before_exit=True)
    except FenceError:
        raise ExposeFailure(
            f"rc.local has a broken '{markers.begin}' block: fix or delete it by hand; "
            "nothing changed"
        ) from None
    if fenced.present:
        flag = fenced.flag
    elif text is None:
        flag = _CREATED
    else:
        flag = _NEWLINE_ADDED if fenced.needs_newline else ""
    if lines:
        block = [
            markers.begin + flag,
            "# Generated by qconnect expose: load the firewall rules of exposed ports",
            "# (Qubes rebuilds its nftables tables empty at every start), and let the",
            "# listeners bind their outside addresses before DHCP has configured them.",
            NONLOCAL_BIND,
            *lines,
            markers.end,
        ]
        return fenced.with_block("".join(line + "\n" for line in block))
    if not fenced.present:
        return text
    rest = fenced.without_block(newline_added=flag == _NEWLINE_ADDED)
    return None if flag == _CREATED and rest == _SHEBANG else rest


def _rc_local_lines(text: str | None) -> list[str]:
    if text is None:
        return []
    try:
        fenced = model.RC_LOCAL_MARKERS.split(text, before_exit=True)
    except FenceError:
        return []
    return [line for line in fenced.body if line.startswith("nft -f ")]


def update_rc_local(context: Context, listen_port: int, line: str | None) -> None:
    """Put ``line`` (or nothing) in our rc.local block for ``listen_port``."""
    path = context.root / RC_LOCAL
    try:
        text: str | None = path.read_text()
    except FileNotFoundError:
        text = None
    except (OSError, UnicodeDecodeError) as error:
        raise ExposeFailure(f"cannot read {path}: {error}") from None
    suffix = f"  # port {listen_port}"
    lines = [old for old in _rc_local_lines(text) if not old.endswith(suffix)]
    if line is not None:
        lines.append(line)
    new = _rc_local_with(text, sorted(lines))
    if new == text:
        return
    if new is None:
        _remove(context, path)
    else:
        _write(context, path, new, mode=_RC_LOCAL_MODE)


# --- persist ---------------------------------------------------------------------------


def _our_client() -> str:
    """qconnect's qvm-connect-tcp, installed with this qconnect (the units' daemon)."""
    beside = Path(sys.executable).parent / "qvm-connect-tcp"
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which("qvm-connect-tcp")
    if found is None:
        raise ExposeFailure("cannot find qconnect's qvm-connect-tcp here: install qconnect")
    return os.path.abspath(found)


def _persist_files_only(context: Context, spec: str) -> None:
    """``persist add SPEC --system --mode daemon --replace``, without telling systemd.

    In a disposable template the units must be written (its disposables
    start them at boot, from rc.local) but not started: the template does
    not hold the address they bind. persist's own engine writes them, told
    that no systemd manager runs here.
    """
    from qconnect.core.spec import parse_spec
    from qconnect.persist import install
    from qconnect.persist.install import AddRequest, Persistence, UnitPaths
    from qconnect.persist.render import Binding, Mode, Scope, check_executable_path, load_templates

    shown = shlex.join(["qconnect", "persist", "add", spec, "--system", "--mode", "daemon"])
    if context.dry_run:
        context.say(f"would write the units of: {shown} (not started here)")
        return
    binding = Binding(parse_spec(spec), Scope.SYSTEM, Mode.DAEMON)
    # A disposable template is an app qube: /usr/local and /rw reach its disposables.
    request = AddRequest(binding, Persistence.RW_ONLY, _our_client(), replace=True)
    paths = UnitPaths(root=context.root, config_home=PurePosixPath("/root/.config"))
    try:
        check_executable_path(request.qvm_connect_tcp or "", "qvm-connect-tcp")
        with install.scope_lock(paths):
            applied = install.apply(paths, install.plan_add(paths, request, load_templates()))
    except QconnectError as error:
        raise ExposeFailure(f"qconnect persist: {error}") from None
    report = applied.report
    context.say(f"wrote the units of: {shown} (started by this qube's disposables at boot)")
    for line in report:
        context.say(f"  {line}")


def _persist(context: Context, *words: str) -> None:
    argv = [sys.executable, "-m", "qconnect", "persist", *words, "--root", str(context.root)]
    shown = shlex.join(["qconnect", "persist", *words])
    if context.dry_run:
        context.say(f"would run: {shown}")
        return
    output = _run(argv, "qconnect persist")
    context.say(f"ran: {shown}")
    for line in output.splitlines():
        context.say(f"  {line}")


# --- the exposures here ------------------------------------------------------------------


@dataclass(frozen=True)
class Exposed:
    """One listen address of an exposure found in this qube's files."""

    address: str
    listen_port: int
    settings: Exposure


def find_exposed(context: Context) -> list[Exposed]:
    found = []
    try:
        names = sorted(os.listdir(context.config_dir))
    except FileNotFoundError:
        return []
    except OSError as error:
        raise ExposeFailure(f"cannot list {context.config_dir}: {error.strerror}") from None
    for name in names:
        address_text, dash, port_text = name.rpartition("-")
        if not dash or not port_text.isdigit():
            continue
        try:
            address = ipaddress.ip_address(address_text.replace("_", ":")).compressed
            settings = exposure.read_exposure(address, int(port_text), context.root)
        except (ValueError, ExposureError) as error:
            raise ExposeFailure(f"{context.config_dir / name}: {error}") from None
        if settings is not None:
            found.append(Exposed(address, int(port_text), settings))
    return found


@contextlib.contextmanager
def serialised(context: Context) -> Iterator[None]:
    """One expose command at a time per qube: rc.local and the settings are read-modify-write.

    The lock is on ``/usr/local`` (every qube has it; persist locks ``/``, so
    the two never wait for each other).
    """
    try:
        with atomic.locked(context.root / "usr/local"):
            yield
    except FileWriteError as error:
        raise ExposeFailure(str(error)) from None


def add(request: Request, context: Context) -> None:
    """Make the exposure in this qube (or, with dry_run, say every change)."""
    with serialised(context):
        _add(request, context)


def _add(request: Request, context: Context) -> None:
    if context.live:
        addresses, interface = listen_addresses(request)
    else:
        # dom0 found them in the via qube (this qube has not its interfaces).
        addresses, interface = request.listen, request.interface
        if not addresses:
            raise ExposeError("a disposable template's part needs the listen addresses")
    families = model.families_needed(addresses, request.allow_from)
    # A listener of a family no --from network is of could never be reached.
    addresses = tuple(a for a in addresses if ipaddress.ip_address(a).version in families)
    if not families:
        raise ExposeError(
            f"no --from network is of the family of the listen addresses {', '.join(addresses)}: "
            "nothing could ever connect"
        )
    for existing in find_exposed(context):
        if existing.listen_port == request.listen_port and (
            existing.settings.target != request.target.qube
            or existing.settings.remote_port != request.target.port
        ):
            old = f"{existing.settings.target}:{existing.settings.remote_port}"
            raise ExposeError(
                f"port {request.listen_port} already exposes {old}: remove it first "
                f"(qconnect expose --remove {old}) or give another --listen-port"
            )
    if (context.config_dir / model.nat_file_name(request.listen_port)).exists():
        raise ExposeError(
            f"port {request.listen_port} of this qube is part of a NAT exposure: "
            "give another --listen-port, or remove that one first"
        )
    if context.live:
        check_chains(families)
    command = shlex.join(request.command())
    remove = shlex.join(["qconnect", "expose", "--remove", str(request.target)])
    settings = Exposure(
        request.target.qube, request.target.port, request.allow_from, request.proxy_protocol
    )
    try:
        # 1. The client's own check, before any listener exists.
        for address in addresses:
            name = exposure.config_name(address, request.listen_port)
            _write(context, context.config_dir / name, exposure.render_exposure(settings, command))
        # 2. The firewall, now and at boot.
        rules = model.nft_rules(addresses, request.listen_port, request.allow_from, interface)
        rules_path = context.config_dir / model.rules_file_name(request.listen_port)
        _write(context, rules_path, model.render_rules_file(rules, command, remove))
        if not context.live:
            context.say(f"not loaded here: {context.seen(rules_path)} is loaded at boot")
        elif context.dry_run:
            delete_rules(context, request.listen_port)
            context.say(f"would run: nft -f {context.seen(rules_path)}")
        else:
            delete_rules(context, request.listen_port)
            _run(["nft", "-f", str(rules_path)], "nft -f")
            context.say(f"loaded the firewall rules of {context.seen(rules_path)}")
            context.undo.append(lambda: delete_rules(context, request.listen_port))
        line = model.rc_local_line(context.seen(rules_path), request.listen_port)
        update_rc_local(context, request.listen_port, line)
        # 3. The listeners.
        for address in addresses:
            spec = model.spec_text(address, request.listen_port, request.target)
            if not context.live:
                _persist_files_only(context, spec)
            else:
                _persist(context, "add", spec, "--system", "--mode", "daemon", "--replace")
            if not context.dry_run:
                context.undo.append(
                    functools.partial(_persist, context, "remove", spec, "--system")
                )
        # Older listen addresses of this port (the interface's address changed).
        for existing in find_exposed(context):
            if existing.listen_port == request.listen_port and existing.address not in addresses:
                spec = model.spec_text(existing.address, existing.listen_port, request.target)
                _persist_remove_quietly(context, spec)
                _remove(
                    context,
                    context.config_dir
                    / exposure.config_name(existing.address, existing.listen_port),
                )
    except QconnectError:
        _undo(context)
        raise


def _undo(context: Context) -> None:
    for step in reversed(context.undo):
        try:
            step()
        except QconnectError as error:
            print(f"qconnect expose: while undoing: {error}", file=sys.stderr)
    context.undo.clear()


def _persist_remove_quietly(context: Context, spec: str) -> None:
    """Remove a binding of ours; one that is already gone is no error."""
    try:
        _persist(context, "remove", spec, "--system")
    except ExposeFailure as error:
        if "is persisted" not in str(error):
            raise


def remove(target: Target, context: Context) -> int:
    """Undo every exposure of ``target`` here; how many listen ports were exposing it."""
    with serialised(context):
        return _remove_exposure(target, context)


def _remove_exposure(target: Target, context: Context) -> int:
    mine = [
        item
        for item in find_exposed(context)
        if item.settings.target == target.qube and item.settings.remote_port == target.port
    ]
    for item in mine:
        spec = model.spec_text(item.address, item.listen_port, target)
        _persist_remove_quietly(context, spec)
    ports = sorted({item.listen_port for item in mine})
    for port in ports:
        delete_rules(context, port)
        update_rc_local(context, port, None)
        _remove(context, context.config_dir / model.rules_file_name(port))
    for item in mine:
        _remove(context, context.config_dir / exposure.config_name(item.address, item.listen_port))
    if not context.dry_run:
        for directory in (context.config_dir, context.config_dir.parent):
            try:
                directory.rmdir()
            except OSError:
                break
    return len(ports)


def listing(context: Context) -> list[str]:
    rows = []
    try:
        names = sorted(os.listdir(context.config_dir))
    except OSError:
        names = []
    for name in names:
        stem = name.removeprefix("nat-").removesuffix(".nft")
        if name.startswith("nat-") and name.endswith(".nft") and stem.isdigit():
            text = (context.config_dir / name).read_text(errors="replace")
            rows.append(f"port {stem}: this qube's NAT part of {model.nat_exposes(text)}")
    for item in find_exposed(context):
        host = f"[{item.address}]" if ":" in item.address else item.address
        settings = item.settings
        proxy = f", PROXY {settings.proxy_protocol}" if settings.proxy_protocol else ""
        rows.append(
            f"{host}:{item.listen_port} -> {settings.target}:{settings.remote_port} "
            f"(from {exposure.render_networks(settings.allow_from)}{proxy})"
        )
    return rows


# --- the NAT way: one hop's part ------------------------------------------------------


def nat_apply(context: Context, listen_port: int, text: str) -> None:
    """Load a hop's nft file (made by dom0) now and at every boot of this qube."""
    if model.nat_exposes(text) is None or not text.startswith("#!/usr/sbin/nft -f\n"):
        raise ExposeFailure(
            "--nat-apply: standard input is not a file made by qconnect expose --nat"
        )
    with serialised(context):
        if any(item.listen_port == listen_port for item in find_exposed(context)):
            raise ExposeError(
                f"port {listen_port} of this qube already exposes a port the qrexec way: "
                "give another --listen-port, or remove that one first"
            )
        try:
            path = context.config_dir / model.nat_file_name(listen_port)
            _write(context, path, text)
            delete_rules(context, listen_port)
            if context.dry_run:
                context.say(f"would run: nft -f {context.seen(path)}")
            else:
                _run(["nft", "-f", str(path)], "nft -f")
                context.say(f"loaded the firewall and NAT rules of {context.seen(path)}")
                context.undo.append(lambda: _nat_unload(context, listen_port))
            update_rc_local(
                context, listen_port, model.rc_local_line(context.seen(path), listen_port)
            )
        except QconnectError:
            _undo(context)
            raise


def _nat_unload(context: Context, listen_port: int) -> None:
    delete_rules(context, listen_port)
    for family in model.NFT_FAMILY.values():
        table = [family, model.nat_table(listen_port)]
        try:
            _run(["nft", "list", "table", *table], "nft list table")
        except ExposeFailure:
            continue
        if context.dry_run:
            context.say(f"would run: nft delete table {' '.join(table)}")
        else:
            _run(["nft", "delete", "table", *table], "nft delete table")
            context.say(f"deleted the nftables table {' '.join(table)}")


def nat_remove(context: Context, target: Target) -> int:
    """Undo this hop's part of every NAT exposure of ``target``; how many there were."""
    with serialised(context):
        try:
            names = sorted(os.listdir(context.config_dir))
        except FileNotFoundError:
            names = []
        ports = []
        for name in names:
            stem = name.removeprefix("nat-").removesuffix(".nft")
            if not name.startswith("nat-") or not name.endswith(".nft") or not stem.isdigit():
                continue
            text = (context.config_dir / name).read_text(errors="replace")
            if model.nat_exposes(text) == str(target):
                ports.append(int(stem))
        for port in ports:
            _nat_unload(context, port)
            update_rc_local(context, port, None)
            _remove(context, context.config_dir / model.nat_file_name(port))
        if ports and not context.dry_run:
            for directory in (context.config_dir, context.config_dir.parent):
                try:
                    directory.rmdir()
                except OSError:
                    break
        return len(ports)
