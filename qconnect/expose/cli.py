"""``qconnect expose``: a qube's port reachable from the outside world, the qrexec way.

Run in dom0, it acts on two qubes: the via qube (``qvm-run --pass-io --user
root VIA 'qconnect expose --here ...'``, which listens on the outside
address and hands each connection to qrexec) and dom0's policy (the via
qube may call that one port of the target, through ``qconnect policy``),
then asks the target what would answer the call (:mod:`.target`). With
``--template``, the via qube's disposable template gets the files its
disposables boot with (``--here --template-apply``, at the addresses the via
qube answered to ``--here --resolve``). Run in the via qube (or with
``--here``), it does the via qube's part and prints the one dom0 command
left to type.

The dom0 side uses the standard library only (dom0 has no trio): this
module imports :mod:`.via` (which does not import trio either) only when it
acts here.
"""

import argparse
import contextlib
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from qconnect.core import atomic
from qconnect.core.exposure import ROOT_ENV, ExposureError, parse_networks
from qconnect.core.qrexec import parse_port, validate_target
from qconnect.expose import model
from qconnect.expose import target as target_check
from qconnect.expose.model import ExposeError, ExposeFailure, Request

DEFAULT_VIA = "sys-net"

# The longest request or answer passed between dom0 and a qube as JSON.
_MAX_JSON = 1 << 16

#: dom0's record of the NAT exposures it made, read by --reapply. dom0 keeps
#: it (a NAT exposure's rules depend on facts only dom0 knows); nothing read
#: from a qube ever decides what dom0 runs.
DEFAULT_STATE_DIR = "/var/lib/qconnect/expose"

#: dom0's tool to run a command in a qube (qubes-core-admin-client).
QVM_RUN = "qvm-run"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Make QUBE:PORT reachable from the outside world: the via qube (sys-net) "
        "listens on its outside address and sends each connection over qrexec."
    )
    parser.add_argument("target", metavar="QUBE:PORT", nargs="?", help="the server: qube and port")
    actions = parser.add_mutually_exclusive_group()
    actions.add_argument(
        "--list", action="store_true", help="show the exposed ports of the via qube"
    )
    actions.add_argument(
        "--remove", metavar="QUBE:PORT", help="undo the exposure of QUBE:PORT (in via and dom0)"
    )
    parser.add_argument(
        "--from",
        dest="allow_from",
        metavar="CIDR[,CIDR...]",
        help="who may connect (required; 'any' for everyone, with a warning); enforced by "
        "the via qube's firewall and again by its listener",
    )
    parser.add_argument(
        "--via", default=DEFAULT_VIA, metavar="QUBE",
        help=f"the qube with the outside network (default {DEFAULT_VIA})",
    )  # fmt: skip
    parser.add_argument("--listen-port", metavar="PORT", help="the port outside (default: PORT)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--listen", action="append", default=[], metavar="ADDRESS",
        help="an address of the via qube to listen on (repeatable)",
    )  # fmt: skip
    where.add_argument(
        "--interface", metavar="IFACE",
        help="listen on every global address of IFACE (default: the default route's interface)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-qube-facing", action="store_true",
        help="allow listening on an interface facing the via qube's client qubes (vif*)",
    )  # fmt: skip
    parser.add_argument(
        "--proxy-protocol", choices=["v1", "v2"],
        help="start each call with a PROXY protocol header (v1: text; v2: binary, relayed) "
        "carrying the outside client's address",
    )  # fmt: skip
    parser.add_argument(
        "--nat", action="store_true",
        help="the NAT way: route the packets down the netvm chain (DNAT in every qube on it) "
        "instead of qrexec; IPv4 and IPv6; needs --interface",
    )  # fmt: skip
    parser.add_argument("--udp", action="store_true", help="with --nat: UDP instead of TCP")
    parser.add_argument("--nat-apply", metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument(
        "--template", metavar="QUBE",
        help="dom0: the via qube is a disposable (a disposable sys-net): also write what must "
        "last into its disposable template QUBE, so every restart of via brings it back",
    )  # fmt: skip
    parser.add_argument("--resolve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--template-apply", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help="say every change; change nothing")
    parser.add_argument(
        "--here", action="store_true",
        help="act in this qube (the via qube); the default when qvm-run is not on PATH",
    )  # fmt: skip
    parser.add_argument(
        "--root", metavar="DIR",
        help="with --here: prefix every file path with DIR (an image of the qube)",
    )  # fmt: skip
    parser.add_argument(
        "--reapply", action="store_true",
        help="dom0: apply every NAT exposure again (after an IP or netvm change)",
    )  # fmt: skip
    parser.add_argument(
        "--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
        help=f"dom0: where the NAT exposures are recorded for --reapply "
        f"(default {DEFAULT_STATE_DIR})",
    )  # fmt: skip
    parser.add_argument("--policy-dir", metavar="DIR", help="dom0: the policy directory")
    parser.add_argument(
        "--qubes", metavar="FILE", help="dom0: the qubes as JSON (see qconnect policy)"
    )


def _in_dom0(args: argparse.Namespace) -> bool:
    """dom0 has qvm-run and no qrexec-client-vm; a qube the other way round."""
    if args.here:
        return False
    return shutil.which(QVM_RUN) is not None and shutil.which("qrexec-client-vm") is None


def _request(args: argparse.Namespace) -> Request:
    if args.target is None:
        raise ExposeError("say what to expose: QUBE:PORT, or --list, or --remove QUBE:PORT")
    target = model.parse_target(args.target)
    if args.allow_from is None:
        raise ExposeError(
            "--from is required: the networks that may connect, such as 192.0.2.0/24 "
            "(write --from any to let everyone connect)"
        )
    try:
        allow_from = parse_networks(args.allow_from)
    except ExposureError as error:
        raise ExposeError(f"--from: {error}") from None
    if args.allow_from == "any":
        print(
            "qconnect expose: warning: --from any: every host that can reach the via qube's "
            f"address can reach {target}",
            file=sys.stderr,
        )
    listen_port = (
        target.port
        if args.listen_port is None
        else parse_port(args.listen_port, what="--listen-port")
    )
    interface = None if args.interface is None else model.parse_interface(args.interface)
    listen = tuple(model.parse_listen_address(address) for address in args.listen)
    return Request(
        target, listen_port, listen, interface, allow_from, args.proxy_protocol,
        args.allow_qube_facing,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.reapply and (args.target or args.allow_from or args.list or args.remove):
        raise ExposeError("--reapply takes nothing else: it applies every recorded NAT exposure")
    if args.list and (args.target or args.allow_from):
        raise ExposeError("--list takes no QUBE:PORT or --from")
    if args.remove is not None and (args.target or args.allow_from):
        raise ExposeError("--remove QUBE:PORT takes no other QUBE:PORT or --from")
    if _in_dom0(args):
        if args.root is not None:
            raise ExposeError("--root applies with --here only (in the via qube)")
        return _run_dom0(args)
    return _run_here(args)


# --- in the via qube -----------------------------------------------------------------


def _run_here(args: argparse.Namespace) -> int:
    from qconnect.expose import via

    root = Path(args.root or os.environ.get(ROOT_ENV) or "/")
    if not root.is_dir():
        raise ExposeError(f"invalid --root {str(root)!r}: expected an existing directory")
    context = via.Context(root=root, dry_run=args.dry_run)
    if args.reapply:
        raise ExposeError("--reapply runs in dom0 (it reads the netvm chain there)")
    if args.resolve:
        # dom0 asks which addresses this exposure would listen on (for --template).
        print(json.dumps(via.resolved(_request(args))))
        return 0
    if args.template_apply:
        # A disposable template's part; dom0 sends the request, addresses resolved, on stdin.
        context.live = False
        request = model.request_from_json(sys.stdin.read(_MAX_JSON))
        via.add(request, context)
        verb = "would write" if args.dry_run else "wrote"
        print(f"{verb} the exposure of {request.target} for this template's disposables")
        return 0
    if args.nat_apply is not None:
        # One qube's part of a NAT exposure; dom0 sends the nft file on stdin.
        port = parse_port(args.nat_apply, what="--nat-apply")
        via.nat_apply(context, port, sys.stdin.read(1 << 20))
        return 0
    if args.nat and args.remove is not None:
        target = model.parse_target(args.remove)
        count = via.nat_remove(context, target)
        print(
            f"{'would remove' if args.dry_run else 'removed'} {count} NAT exposure(s) of {target}"
        )
        return 0
    if args.nat:
        raise ExposeError("--nat is made from dom0 (it reads the netvm chain there)")
    if args.list:
        rows = via.listing(context)
        for row in rows:
            print(row)
        if not rows:
            print("no port of this qube is exposed")
        return 0
    if args.remove is not None:
        target = model.parse_target(args.remove)
        if via.remove(target, context) == 0:
            raise ExposeFailure(
                f"{target} is not exposed by this qube; see: qconnect expose --list"
            )
        print(f"{'would remove' if args.dry_run else 'removed'} the exposure of {target} here")
        if not args.here:
            from qconnect.client.qrexec_call import this_qube_name

            command = shlex.join(
                ["qconnect", "policy", "remove", this_qube_name(), "--port", str(target.port),
                 "--target", target.qube]
            )  # fmt: skip
            print(f"one step is left, in dom0: {command}")
        return 0
    request = _request(args)
    via.add(request, context)
    verb = "would expose" if args.dry_run else "exposed"
    print(f"{verb} {request.target} on port {request.listen_port} of this qube")
    if not args.here:
        from qconnect.client.qrexec_call import this_qube_name

        print("one step is left, in dom0 (the via qube may call that one port of the target):")
        print(f"  {model.dom0_policy_command(this_qube_name(), request.target)}")
    return 0


# --- in dom0 -----------------------------------------------------------------------------


def _qvm_run(via: str, words: list[str]) -> int:
    """Run ``qconnect WORDS`` as root in ``via``; its output is ours (--pass-io)."""
    argv = [QVM_RUN, "--pass-io", "--user", "root", "--no-gui", via, shlex.join(words)]
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, check=False).returncode
    except OSError as error:
        raise ExposeFailure(f"cannot run {QVM_RUN}: {error.strerror}") from None


def _policy(args: argparse.Namespace, *words: str) -> int:
    """``qconnect policy WORDS`` in this process (standard library only)."""
    from qconnect import cli

    options = []
    if args.policy_dir is not None:
        options += ["--policy-dir", args.policy_dir]
    if args.qubes is not None:
        options += ["--qubes", args.qubes]
    if args.dry_run:
        options.append("--dry-run")
    argv = ["policy", *words, *options]
    return cli.run_command("qconnect policy", cli.build_parser(argv), argv)


def _run_dom0(args: argparse.Namespace) -> int:
    via = validate_target(args.via)
    dry = ["--dry-run"] if args.dry_run else []
    template = None if args.template is None else validate_target(args.template)
    if template is not None and (args.nat or args.reapply):
        raise ExposeError("--template goes with the qrexec way (not --nat or --reapply)")
    if template == via:
        raise ExposeError(f"--template {template}: expected the disposable template of {via}")
    if args.reapply:
        return _reapply(args)
    if args.nat and not args.list:
        return _run_dom0_nat(args, via)
    if args.list:
        print(f"# {via}:")
        code = _qvm_run(via, ["qconnect", "expose", "--here", "--list"])
        if template is not None:
            print(f"# {template} (what {via} starts with):")
            code = _qvm_run(template, ["qconnect", "expose", "--here", "--list"]) or code
        return code
    if args.remove is not None:
        target = model.parse_target(args.remove)
        print(f"# {via}:")
        code = _qvm_run(via, ["qconnect", "expose", "--here", "--remove", str(target), *dry])
        if template is not None:
            print(f"# {template}:")
            words = ["qconnect", "expose", "--here", "--remove", str(target), *dry]
            code = _qvm_run(template, words) or code
        print("# dom0:")
        policy_code = _policy(
            args, "remove", via, "--port", str(target.port), "--target", target.qube
        )
        return code or policy_code
    if args.udp:
        raise ExposeError("--udp needs --nat (qrexec carries TCP only)")
    request = _request(args)
    print(f"# {via}:")
    code = _qvm_run(via, [*request.command(), *dry])
    if code != 0:
        raise ExposeFailure(
            f"the via qube {via} did not make its part (exit {code}, see above); "
            "dom0's policy was not changed"
        )
    undo = ["qconnect", "expose", "--here", "--remove", str(request.target), *dry]
    if template is not None:
        print(f"# {template} (the disposable template of {via}):")
        if _template_part(via, template, request, dry) != 0:
            _qvm_run(via, undo)
            raise ExposeFailure(
                f"the disposable template {template} did not take its part (see above); "
                f"{via}'s part was undone and dom0's policy was not changed"
            )
    print("# dom0:")
    policy_code = _policy(
        args, "allow", via, "--port", str(request.target.port), "--target", request.target.qube
    )
    if policy_code != 0:
        _qvm_run(via, undo)
        if template is not None:
            _qvm_run(template, undo)
        raise ExposeFailure("dom0's policy could not be changed; the qubes' parts were undone")
    print(f"# {request.target.qube}:")
    for line in target_check.check(request.target.qube, via, request.target.port):
        print(line)
    return 0


def _template_part(via: str, template: str, request: Request, dry: list[str]) -> int:
    """Write the exposure into ``via``'s disposable template, at the addresses ``via`` uses.

    The template has not via's interfaces, so dom0 asks via which addresses
    the exposure listens on (the answer is checked as any command-line
    address would be) and sends the template the whole request.
    """
    argv = [QVM_RUN, "--pass-io", "--user", "root", "--no-gui", via,
            shlex.join([*request.command(), "--resolve"])]  # fmt: skip
    try:
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ExposeFailure(f"cannot ask {via} for its listen addresses: {error}") from None
    if result.returncode != 0:
        sys.stderr.write(result.stderr[:_MAX_JSON].decode(errors="replace"))
        return result.returncode
    listen, interface = model.parse_resolved(result.stdout[:_MAX_JSON].decode(errors="replace"))
    resolved = Request(
        request.target, request.listen_port, listen, interface, request.allow_from,
        request.proxy_protocol, request.allow_qube_facing,
    )  # fmt: skip
    words = ["qconnect", "expose", "--here", "--template-apply", *dry]
    return _qvm_run_input(template, words, model.request_to_json(resolved))


# --- the NAT way, from dom0 ------------------------------------------------------------

QVM_PREFS = "qvm-prefs"


def _pref(qube: str, name: str) -> str:
    try:
        result = subprocess.run(
            [QVM_PREFS, "--get", qube, name], stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=60, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ExposeFailure(f"cannot run {QVM_PREFS}: {error}") from None
    if result.returncode != 0:
        raise ExposeFailure(f"{QVM_PREFS} {qube} {name}: {result.stderr.strip()}")
    value = result.stdout.strip()
    return "" if value in ("None", "-") else value


def _netvm_chain(via: str, target: model.Target) -> list[str]:
    """The qubes from ``via`` down to the target, read from dom0 (via first)."""
    chain = [target.qube]
    while chain[-1] != via:
        netvm = _pref(chain[-1], "netvm")
        if not netvm:
            raise ExposeFailure(
                f"{chain[-1]} has no netvm, so {target.qube}'s packets never pass {via}: "
                "the NAT way needs a netvm chain (the qrexec way does not)"
            )
        if netvm in chain or len(chain) > 16:
            raise ExposeFailure(f"the netvm chain of {target.qube} loops at {netvm}")
        chain.append(validate_target(netvm))
    return list(reversed(chain))


def _qvm_run_input(qube: str, words: list[str], text: str) -> int:
    argv = [QVM_RUN, "--pass-io", "--user", "root", "--no-gui", qube, shlex.join(words)]
    try:
        return subprocess.run(argv, input=text, text=True, check=False).returncode
    except OSError as error:
        raise ExposeFailure(f"cannot run {QVM_RUN}: {error.strerror}") from None


def _record_path(args: argparse.Namespace, via: str, listen_port: int) -> Path:
    return Path(args.state_dir) / f"nat-{via}-{listen_port}.json"


def _records(args: argparse.Namespace) -> list[tuple[Path, list[str]]]:
    """dom0's recorded NAT exposures: (file, the words after ``qconnect expose``)."""
    directory = Path(args.state_dir)
    found = []
    for path in sorted(directory.glob("nat-*.json")) if directory.is_dir() else []:
        try:
            words = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ExposeFailure(f"cannot read the record {path}: {error}") from None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ExposeFailure(f"{path}: not a record of qconnect expose --nat")
        found.append((path, words))
    return found


def _reapply(args: argparse.Namespace) -> int:
    """Run every recorded NAT exposure again (each re-reads the chain and the addresses)."""
    from qconnect import cli

    records = _records(args)
    if not records:
        print(f"no NAT exposure recorded in {args.state_dir}; nothing to re-apply")
        return 0
    worst = 0
    for _path, words in records:
        argv = [
            "expose",
            *words,
            "--state-dir",
            args.state_dir,
            *(["--dry-run"] if args.dry_run else []),
        ]
        print(f"## qconnect {shlex.join(argv)}")
        worst = max(worst, cli.run_command("qconnect expose", cli.build_parser(argv), argv))
    return worst


#: The qvm-prefs property holding a qube's address, per IP version (qubes-core-admin).
_ADDRESS_PREFS = {4: "ip", 6: "ip6"}


def _nat_addresses(
    qubes: list[str], request: Request, any_source: bool
) -> tuple[list[int], dict[int, dict[str, str]]]:
    """The IP versions to carry and each qube's address in them (read from dom0).

    A version a ``--from`` network names needs an address on every qube below
    the via qube; with ``--from any``, IPv6 is left out (and said so) when a
    qube has none (IPv6 is not enabled for it).
    """
    families = model.nat_families(request.allow_from)
    found: dict[int, dict[str, str]] = {}
    for version in families:
        prop = _ADDRESS_PREFS[version]
        found[version] = {}
        for qube in qubes:
            text = _pref(qube, prop)
            if not text and version == 6 and any_source:
                print(f"IPv6 left out: {qube} has no IPv6 address (qvm-prefs {qube} ip6 is empty)")
                del found[version]
                break
            try:
                address = model.parse_listen_address(text)
            except ExposeError:
                address = ""
            if ipaddress.ip_address(address or "0.0.0.0").version != version or not address:
                hint = " (enable IPv6 for it: qvm-features NETVM ipv6 1)" if version == 6 else ""
                raise ExposeFailure(
                    f"{qube}'s {prop} {text!r} is not an IPv{version} address{hint}: "
                    f"--from names IPv{version} networks, so every qube below the via qube "
                    "needs one"
                )
            found[version][qube] = address
    return [version for version in families if version in found], found


def _run_dom0_nat(args: argparse.Namespace, via: str) -> int:
    dry = ["--dry-run"] if args.dry_run else []
    if args.remove is not None:
        target = model.parse_target(args.remove)
        codes = []
        for qube in _netvm_chain(via, target):
            print(f"# {qube}:")
            words = ["qconnect", "expose", "--here", "--nat", "--remove", str(target), *dry]
            codes.append(_qvm_run(qube, words))
        for path, words in _records(args):
            recorded_via = words[words.index("--via") + 1] if "--via" in words[:-1] else None
            if words[:1] == [str(target)] and recorded_via == via and not args.dry_run:
                atomic.remove_file(path)
        with contextlib.suppress(OSError):
            Path(args.state_dir).rmdir()
        return max(codes)
    if args.proxy_protocol is not None:
        raise ExposeError("--proxy-protocol needs the qrexec way: NAT keeps the client's address")
    if args.interface is None:
        raise ExposeError("--nat needs --interface IFACE: the via qube's outside interface")
    request = _request(args)
    if request.listen:
        raise ExposeError("--nat takes --interface, not --listen")
    chain = _netvm_chain(via, request.target)
    families, addresses = _nat_addresses(chain[1:], request, args.allow_from == "any")
    protocol = "udp" if args.udp else "tcp"
    command = shlex.join([*request.command(here=False), "--nat", *(["--udp"] if args.udp else [])])
    hops = model.nat_chain(
        via, request.target, request.listen_port, request.interface or "", chain, addresses
    )
    shown = " and ".join(f"IPv{version}" for version in families)
    print(f"NAT chain: {' -> '.join(chain)} ({protocol}, {shown})")
    print("  it breaks when an IP address on it changes or a disposable netvm restarts: "
          "run this command again then")  # fmt: skip
    done: list[str] = []
    # The target first, the via qube last: the door opens when the path is complete.
    for hop in reversed(hops):
        text = model.render_nat_hop(
            hop, protocol, request.allow_from, request.listen_port, request.target, command,
            families,
        )  # fmt: skip
        print(f"# {hop.qube}:")
        words = ["qconnect", "expose", "--here", "--nat-apply", str(request.listen_port), *dry]
        if _qvm_run_input(hop.qube, words, text) != 0:
            for qube in done:
                _qvm_run(qube, ["qconnect", "expose", "--here", "--nat", "--remove",
                                str(request.target)])  # fmt: skip
            raise ExposeFailure(
                f"{hop.qube} did not take its part (see above); the others were undone"
            )
        done.append(hop.qube)
    if not args.dry_run:
        words = [*request.command(here=False)[2:], "--nat", "--via", via]
        if args.udp:
            words.append("--udp")
        path = _record_path(args, via, request.listen_port)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_atomic(path, json.dumps(words) + "\n")
    return 0
