"""What ``qconnect expose`` puts where: pure text in, values and file texts out.

One exposure is identified by its listen port in the via qube (two
exposures cannot listen on one port). It consists of, in the via qube:

- a settings file per listen address (``qconnect.core.exposure``): the
  client's own ``--from`` check and the PROXY header;
- an nftables rule per address family, in the chain Qubes provides for the
  user's input rules (``custom-input`` of the ``ip qubes`` and ``ip6 qubes``
  tables, jumped to first by their ``input`` chains, whose policy is drop),
  tagged with a comment so that exactly our rules are found and deleted;
- a file of those rules, and a line in ``/rw/config/rc.local`` loading it at
  boot (the ``qubes`` tables are rebuilt empty at every start);
- a daemon-mode binding of ``qconnect persist`` per listen address;

and in dom0 the policy rule that lets only the via qube call that one port.
"""

import ipaddress
import json
import re
import shlex
from dataclasses import dataclass

from qconnect.core.errors import CommandLineError, QconnectError
from qconnect.core.exposure import ExposureError, IPNetwork, parse_networks, render_networks
from qconnect.core.fence import Markers
from qconnect.core.qrexec import is_valid_qube_name, parse_port

#: The nftables table of each family and the chain Qubes leaves to the user's
#: input rules (qubes-core-agent-linux, network/qubes-iptables: both tables'
#: ``input`` chains start with ``jump custom-input``).
NFT_TABLES = {4: "ip qubes", 6: "ip6 qubes"}
NFT_CHAIN = "custom-input"
#: ... and the one for the user's forward rules (the NAT way).
NFT_FORWARD_CHAIN = "custom-forward"

#: The interfaces of a net qube that face its client qubes (vif<domid>.<n>);
#: a listener there would be reachable from every qube behind the via qube.
QUBE_FACING_PREFIX = "vif"

#: rc.local's block of ours (persist's own block has other markers).
RC_LOCAL_MARKERS = Markers(
    "# BEGIN qconnect expose: firewall rules of exposed ports",
    "# END qconnect expose",
    flagged=True,
)

# Linux interface names: at most 15 bytes (IFNAMSIZ 16), no '/', no blanks;
# we take the characters that need no quoting in nft or a shell.
_INTERFACE_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


class ExposeError(CommandLineError):
    """An exposure cannot be made, shown or removed as asked: the command line is wrong (exit 2)."""


class ExposeFailure(QconnectError):
    """A step failed after the command line was accepted (exit 1)."""

    exit_code = 1


@dataclass(frozen=True)
class Target:
    qube: str
    port: int

    def __str__(self) -> str:
        return f"{self.qube}:{self.port}"


def parse_target(text: str) -> Target:
    """``QUBE:PORT`` (the qube that runs the server, and the server's port)."""
    qube, colon, port = text.rpartition(":")
    if not colon or not is_valid_qube_name(qube):
        raise ExposeError(
            f"invalid target {text!r}: expected QUBE:PORT, such as web:443 "
            "(a qube name, not @default or @dispvm)"
        )
    return Target(qube, parse_port(port, what=f"port of {text!r}"))


def parse_interface(text: str) -> str:
    if not _INTERFACE_RE.fullmatch(text):
        raise ExposeError(
            f"invalid interface {text!r}: expected a Linux interface name "
            "(1 to 15 letters, digits, '_', '.' or '-')"
        )
    return text


def parse_listen_address(text: str) -> str:
    """One address to listen on; not a wildcard (it would listen on the qube-facing side too)."""
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise ExposeError(f"invalid --listen {text!r}: expected an IPv4 or IPv6 address") from None
    if address.is_unspecified or address.is_loopback or address.is_multicast:
        raise ExposeError(
            f"invalid --listen {text!r}: expected one address of the outside interface "
            "(not a wildcard, loopback or multicast address)"
        )
    return address.compressed


def is_qube_facing(interface: str) -> bool:
    return interface.startswith(QUBE_FACING_PREFIX)


def spec_text(address: str, listen_port: int, target: Target) -> str:
    """The ``qconnect persist`` binding of one listen address."""
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{listen_port}:{target.qube}:{target.port}"


def rule_tag(listen_port: int) -> str:
    """The comment that marks our nft rules of one exposure."""
    return f"qconnect expose port {listen_port}"


def nft_rules(
    addresses: tuple[str, ...],
    listen_port: int,
    allow_from: tuple[IPNetwork, ...],
    interface: str | None,
) -> list[str]:
    """``add rule`` lines: ``allow_from`` may reach ``addresses:listen_port``, per family."""
    rules = []
    for version, table in NFT_TABLES.items():
        family = "ip" if version == 4 else "ip6"
        destinations = [a for a in addresses if ipaddress.ip_address(a).version == version]
        sources = tuple(n for n in allow_from if n.version == version)
        if not destinations or not sources:
            continue
        words = [f"add rule {table} {NFT_CHAIN}"]
        if interface is not None:
            words.append(f'iifname "{interface}"')
        words.append(f"{family} daddr {{ {', '.join(destinations)} }}")
        if sources != (ipaddress.ip_network("0.0.0.0/0" if version == 4 else "::/0"),):
            words.append(f"{family} saddr {{ {', '.join(str(s) for s in sources)} }}")
        words.append(f'tcp dport {listen_port} counter accept comment "{rule_tag(listen_port)}"')
        rules.append(" ".join(words))
    return rules


def families_needed(addresses: tuple[str, ...], allow_from: tuple[IPNetwork, ...]) -> list[int]:
    """The address families that get a rule (an address and a source network of each)."""
    have = {ipaddress.ip_address(a).version for a in addresses}
    return [v for v in NFT_TABLES if v in have and any(n.version == v for n in allow_from)]


def render_rules_file(rules: list[str], command: str, remove: str) -> str:
    return (
        "\n".join(
            [
                "#!/usr/sbin/nft -f",
                "# Generated by qconnect expose.",
                f"# Command: {command}",
                f"# Remove with: {remove}",
                *rules,
            ]
        )
        + "\n"
    )


def rules_file_name(listen_port: int) -> str:
    return f"rules-{listen_port}.nft"


def rc_local_line(rules_path: str, listen_port: int) -> str:
    """The boot-time line of one exposure: load its rules (after Qubes' tables exist)."""
    return f"nft -f {shlex.quote(rules_path)}  # port {listen_port}"


@dataclass(frozen=True)
class Request:
    """One ``qconnect expose`` in the via qube, checked."""

    target: Target
    listen_port: int
    listen: tuple[str, ...]
    interface: str | None
    allow_from: tuple[IPNetwork, ...]
    proxy_protocol: str | None
    allow_qube_facing: bool

    def command(self, *, here: bool = True) -> list[str]:
        """The qconnect command line that makes exactly this exposure."""
        words = ["qconnect", "expose"]
        if here:
            words.append("--here")
        words += [str(self.target), "--listen-port", str(self.listen_port)]
        for address in self.listen:
            words += ["--listen", address]
        if self.interface is not None and not self.listen:
            # (with --listen, the interface is the one dom0 found them on: implied)
            words += ["--interface", self.interface]
        words += ["--from", render_networks(self.allow_from)]
        if self.proxy_protocol is not None:
            words += ["--proxy-protocol", self.proxy_protocol]
        if self.allow_qube_facing:
            words.append("--allow-qube-facing")
        return words


# --- a disposable via qube (--template): dom0 <-> qubes, as JSON -------------------------


def parse_resolved(text: str) -> tuple[tuple[str, ...], str | None]:
    """The via qube's answer to ``--resolve``, checked as the command line's values would be.

    It comes from the least trusted qube: only addresses a ``--listen`` could
    name and an interface name ``--interface`` could take pass.
    """
    try:
        answer = json.loads(text)
    except ValueError:
        raise ExposeFailure("the via qube's listen addresses are not JSON") from None
    listen = answer.get("listen") if isinstance(answer, dict) else None
    interface = answer.get("interface") if isinstance(answer, dict) else None
    if (
        not isinstance(listen, list)
        or not 0 < len(listen) <= 64
        or not all(isinstance(a, str) for a in listen)
        or not (interface is None or isinstance(interface, str))
    ):
        raise ExposeFailure("the via qube's listen addresses are not a list of addresses")
    try:
        addresses = tuple(parse_listen_address(address) for address in listen)
        return addresses, None if interface is None else parse_interface(interface)
    except ExposeError as error:
        raise ExposeFailure(f"the via qube answered {error}") from None


def request_to_json(request: Request) -> str:
    return json.dumps(
        {
            "target": str(request.target),
            "listen_port": request.listen_port,
            "listen": list(request.listen),
            "interface": request.interface,
            "from": render_networks(request.allow_from),
            "proxy_protocol": request.proxy_protocol,
            "allow_qube_facing": request.allow_qube_facing,
        }
    )


def request_from_json(text: str) -> Request:
    """dom0's request to a disposable template (``--template-apply``), checked field by field."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError
        listen = data["listen"]
        proxy = data["proxy_protocol"]
        interface = data["interface"]
        if (
            not isinstance(listen, list)
            or not all(isinstance(a, str) for a in listen)
            or proxy not in (None, "v1", "v2")
            or not (interface is None or isinstance(interface, str))
            or not isinstance(data["allow_qube_facing"], bool)
            or not isinstance(data["from"], str)
            or not isinstance(data["target"], str)
            or not isinstance(data["listen_port"], int)
        ):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ExposeFailure(
            "--template-apply: standard input is not a request from dom0's qconnect expose"
        ) from None
    try:
        allow_from = parse_networks(data["from"])
    except ExposureError as error:
        raise ExposeError(f"--template-apply: from: {error}") from None
    return Request(
        parse_target(data["target"]),
        parse_port(str(data["listen_port"]), what="listen_port"),
        tuple(parse_listen_address(address) for address in listen),
        None if interface is None else parse_interface(interface),
        allow_from,
        proxy,
        data["allow_qube_facing"],
    )


def dom0_policy_command(via: str, target: Target) -> str:
    return shlex.join(
        ["qconnect", "policy", "allow", via, "--port", str(target.port), "--target", target.qube]
    )


# --- the NAT way (--nat) ------------------------------------------------------------------
#
# Packets keep their outside source address along the whole netvm chain:
# each upstream qube (the via qube, then every netvm between it and the
# target) rewrites the destination to the next qube down (DNAT, in a table
# of our own) and lets it through its ``custom-forward`` chain; the target
# lets it in through ``custom-input``. Per address family: Qubes' ``ip6
# qubes`` table has the same two chains, jumped to first by its ``input`` and
# ``forward`` chains (qubes-core-agent-linux, network/qubes-ipv6.nft, since
# R4.2.0), and a qube has an IPv6 address (qvm-prefs ``ip6``) when IPv6 is
# enabled for it; an IPv6 exposure needs one on every qube below the via qube.

#: The uplink of every qube below the via qube (Qubes names it eth0).
UPLINK = "eth0"

NAT_PROTOCOLS = ("tcp", "udp")

#: nft's family keyword per IP version.
NFT_FAMILY = {4: "ip", 6: "ip6"}


def nat_table(listen_port: int) -> str:
    return f"qconnect-expose-{listen_port}"


def nat_file_name(listen_port: int) -> str:
    return f"nat-{listen_port}.nft"


@dataclass(frozen=True)
class NatHop:
    """One qube's part of a NAT exposure: forward to the next qube, or accept (the target)."""

    qube: str
    interface: str  #: where the packets come in
    in_port: int
    #: the next qube's address per IP version; empty for the target
    next_addresses: dict[int, str]
    out_port: int


def nat_chain(
    via: str,
    target: Target,
    listen_port: int,
    interface: str,
    chain: list[str],
    addresses: dict[int, dict[str, str]],
) -> list[NatHop]:
    """The hops from the via qube down to the target (``chain``: via first, target last).

    ``addresses``: per IP version, each qube's address below the via qube.
    """
    if len(chain) < 2 or chain[0] != via or chain[-1] != target.qube:
        raise ExposeError(
            f"the netvm chain {' -> '.join(chain)} does not lead from {via} to {target}"
        )
    hops = []
    for index, qube in enumerate(chain):
        last = index == len(chain) - 1
        hops.append(
            NatHop(
                qube=qube,
                interface=interface if index == 0 else UPLINK,
                in_port=listen_port if index == 0 else target.port,
                next_addresses={}
                if last
                else {version: found[chain[index + 1]] for version, found in addresses.items()},
                out_port=target.port,
            )
        )
    return hops


def nat_families(allow_from: tuple[IPNetwork, ...]) -> list[int]:
    """The IP versions a NAT exposure carries: those of the ``--from`` networks."""
    return [version for version in NFT_FAMILY if any(n.version == version for n in allow_from)]


def render_nat_hop(
    hop: NatHop,
    protocol: str,
    allow_from: tuple[IPNetwork, ...],
    listen_port: int,
    target: Target,
    command: str,
    families: list[int],
) -> str:
    """The nft file of one hop; loading it twice gives the same rules (the tables are replaced)."""
    if not families:
        raise ExposeError("--nat: no --from network of an address family to carry")
    lines = [
        "#!/usr/sbin/nft -f",
        "# Generated by qconnect expose --nat.",
        f"# Exposes {target} ({protocol}) on port {listen_port} of the via qube.",
        f"# Command: {command}",
        f"# Remove with: qconnect expose --nat --remove {target}",
    ]
    tag = f'comment "{rule_tag(listen_port)}"'
    table = nat_table(listen_port)
    for version in families:
        family = NFT_FAMILY[version]
        sources = [str(n) for n in allow_from if n.version == version]
        everyone = "0.0.0.0/0" if version == 4 else "::/0"
        source = "" if sources == [everyone] else f"{family} saddr {{ {', '.join(sources)} }} "
        match = f'iifname "{hop.interface}" {source}{protocol} dport'
        if not hop.next_addresses:
            lines.append(
                f"add rule {family} qubes custom-input {match} {hop.in_port} counter accept {tag}"
            )
            continue
        address = hop.next_addresses[version]
        destination = f"{address}:{hop.out_port}" if version == 4 else f"[{address}]:{hop.out_port}"
        lines += [
            f"table {family} {table}",
            f"delete table {family} {table}",
            f"table {family} {table} {{",
            "    chain prerouting {",
            "        type nat hook prerouting priority dstnat; policy accept;",
            f"        {match} {hop.in_port} dnat to {destination}",
            "    }",
            "}",
            f"add rule {family} qubes custom-forward {match} {hop.out_port} "
            f"{family} daddr {address} counter accept {tag}",
        ]
    return "\n".join(lines) + "\n"


def nat_exposes(text: str) -> str | None:
    """``QUBE:PORT`` a hop's nft file says it exposes (its header), or None."""
    for line in text.splitlines()[:4]:
        if line.startswith("# Exposes "):
            return line.split()[2]
    return None
