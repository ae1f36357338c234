"""What ``qconnect expose`` puts where: pure text in, values and file texts out.

One exposure is identified by its listen port in the via qube (two
exposures cannot listen on one port). It consists of, in the via qube:

- a settings file per listen address (``qconnect.client.exposure``): the
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
import re
import shlex
from dataclasses import dataclass

from qconnect.client.exposure import IPNetwork, render_networks
from qconnect.errors import QconnectError
from qconnect.fence import Markers
from qconnect.qrexec import is_valid_qube_name, parse_port

#: The nftables table of each family and the chain Qubes leaves to the user's
#: input rules (qubes-core-agent-linux, network/qubes-iptables: both tables'
#: ``input`` chains start with ``jump custom-input``).
NFT_TABLES = {4: "ip qubes", 6: "ip6 qubes"}
NFT_CHAIN = "custom-input"

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


class ExposeError(QconnectError):
    """An exposure cannot be made, shown or removed as asked."""


class ExposeFailure(ExposeError):
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
        if self.interface is not None:
            words += ["--interface", self.interface]
        words += ["--from", render_networks(self.allow_from)]
        if self.proxy_protocol is not None:
            words += ["--proxy-protocol", self.proxy_protocol]
        if self.allow_qube_facing:
            words.append("--allow-qube-facing")
        return words


def dom0_policy_command(via: str, target: Target) -> str:
    return shlex.join(
        ["qconnect", "policy", "allow", via, "--port", str(target.port), "--target", target.qube]
    )
