"""Test support for ``qconnect expose``: network namespaces, a Qubes-like firewall, nginx.

The world: an "outside" namespace joined by a veth pair to a "sys-net"
namespace whose end is called eth0, as in a Qubes net qube. Only
documentation addresses are used (192.0.2.0/24, 2001:db8::/32). sys-net's
firewall has the shape of Qubes' own (``ip qubes``/``ip6 qubes`` tables whose
``input`` chain jumps to ``custom-input`` first and refuses what nothing
accepted); it ends with a TCP reset instead of Qubes' silent drop, so that a
refused connection shows at once instead of after a timeout.
"""

import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

#: sys-net's outside addresses, and two hosts outside: one allowed, one not.
SYS_NET_V4, SYS_NET_V6 = "192.0.2.1", "2001:db8::1"
ALLOWED_V4, ALLOWED_V6 = "192.0.2.10", "2001:db8::10"
OTHER_V4, OTHER_V6 = "192.0.2.20", "2001:db8::20"

# How long a step may take before the test calls it a failure (the machine is shared).
WAIT = 20.0

_numbers = itertools.count()

QUBES_LIKE_RULESET = """
table ip qubes {
    chain custom-input {
    }
    chain input {
        type filter hook input priority filter; policy drop;
        jump custom-input
        ct state invalid counter drop
        ct state related,established accept
        iif lo accept
        meta l4proto tcp counter reject with tcp reset
        counter
    }
}
table ip6 qubes {
    chain custom-input {
    }
    chain input {
        type filter hook input priority filter; policy drop;
        jump custom-input
        ct state invalid counter drop
        ct state related,established accept
        meta l4proto ipv6-icmp accept
        iif lo accept
        meta l4proto tcp counter reject with tcp reset
        counter
    }
}
"""


def skip_reason() -> str | None:
    """Why the namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and nftables)"
    for tool in ("ip", "nft", "systemd-socket-activate"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    probe = subprocess.run(
        ["ip", "netns", "add", f"qxprobe{os.getpid()}"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", f"qxprobe{os.getpid()}"], check=False)
    return None


def _sh(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{argv}: {result.stderr}"
    return result.stdout


@dataclass(frozen=True)
class World:
    outside: str  #: the outside namespace
    sys_net: str  #: sys-net's namespace

    def in_sys_net(self, *argv: str) -> str:
        return _sh("ip", "netns", "exec", self.sys_net, *argv)

    def ruleset(self) -> str:
        return self.in_sys_net("nft", "--stateless", "list", "ruleset")

    def connect(self, source: str, destination: str, port: int, send: bytes) -> dict[str, str]:
        """From ``source`` in the outside namespace: connect, send, read to EOF."""
        result = subprocess.run(
            ["ip", "netns", "exec", self.outside, sys.executable, "-c", _CLIENT,
             source, destination, str(port), send.hex(), str(WAIT)],
            capture_output=True, text=True, timeout=WAIT * 2, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        answer: dict[str, str] = json.loads(result.stdout)
        return answer


# Run in the outside namespace: one connection, its outcome as JSON.
_CLIENT = """
import json, socket, sys
source, destination, port, payload, wait = sys.argv[1:]
family = socket.AF_INET6 if ":" in destination else socket.AF_INET
conn = socket.socket(family, socket.SOCK_STREAM)
conn.settimeout(float(wait))
try:
    conn.bind((source, 0))
    conn.connect((destination, int(port)))
    conn.sendall(bytes.fromhex(payload))
    chunks = []
    while True:
        data = conn.recv(65536)
        if not data:
            break
        chunks.append(data)
    print(json.dumps({"outcome": "answered", "data": b"".join(chunks).decode("latin-1")}))
except ConnectionRefusedError:
    print(json.dumps({"outcome": "refused"}))
except ConnectionResetError:
    print(json.dumps({"outcome": "reset"}))
except socket.timeout:
    print(json.dumps({"outcome": "timeout"}))
"""


def load_qubes_like_ruleset(netns: str) -> None:
    """Qubes' firewall tables, as a net qube has them after boot (empty custom chains)."""
    subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-f", "-"],
        input=QUBES_LIKE_RULESET, text=True, check=True,
    )  # fmt: skip


@contextlib.contextmanager
def namespaces() -> Iterator[World]:
    """Create the outside and sys-net namespaces, joined, with sys-net's firewall."""
    number = f"{os.getpid() % 100000}{next(_numbers)}"
    world = World(outside=f"qxout{number}", sys_net=f"qxnet{number}")
    veth_out, veth_net = f"qxo{number}", f"qxn{number}"
    try:
        _sh("ip", "netns", "add", world.outside)
        _sh("ip", "netns", "add", world.sys_net)
        _sh("ip", "link", "add", veth_out, "type", "veth", "peer", "name", veth_net)
        _sh("ip", "link", "set", veth_out, "netns", world.outside)
        _sh("ip", "link", "set", veth_net, "netns", world.sys_net)
        out = ("ip", "netns", "exec", world.outside, "ip")
        net = ("ip", "netns", "exec", world.sys_net, "ip")
        _sh(*net, "link", "set", veth_net, "name", "eth0")
        for address in (f"{ALLOWED_V4}/24", f"{OTHER_V4}/24"):
            _sh(*out, "address", "add", address, "dev", veth_out)
        for address in (f"{ALLOWED_V6}/64", f"{OTHER_V6}/64"):
            _sh(*out, "address", "add", address, "dev", veth_out, "nodad")
        _sh(*net, "address", "add", f"{SYS_NET_V4}/24", "dev", "eth0")
        _sh(*net, "address", "add", f"{SYS_NET_V6}/64", "dev", "eth0", "nodad")
        for prefix, device in ((out, veth_out), (net, "eth0"), (out, "lo"), (net, "lo")):
            _sh(*prefix, "link", "set", device, "up")
        _sh(*net, "route", "add", "default", "via", "192.0.2.254", "dev", "eth0", "onlink")
        load_qubes_like_ruleset(world.sys_net)
        yield world
    finally:
        for name in (world.outside, world.sys_net):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@dataclass
class Nginx:
    port: int
    access_log: Path
    process: "subprocess.Popen[bytes]"

    def wait_logged(self, count: int) -> list[str]:
        """The access log once it has ``count`` lines (nginx logs after answering)."""
        deadline = time.monotonic() + WAIT
        while True:
            lines = self.access_log.read_text().splitlines() if self.access_log.exists() else []
            if len(lines) >= count:
                return lines
            assert time.monotonic() < deadline, f"nginx logged {lines}"
            assert self.process.poll() is None, "nginx exited"
            time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def nginx(directory: Path) -> Iterator[Nginx]:
    """Debian's nginx on 127.0.0.1 with ``proxy_protocol``, logging the PROXY address."""
    executable = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(executable, os.X_OK):
        pytest.skip("needs nginx (Debian package nginx)")
    directory.mkdir()
    port = free_port()
    temp = {name: directory / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    conf = directory / "nginx.conf"
    conf.write_text(
        f"""
daemon off;
master_process off;
pid {directory}/nginx.pid;
error_log {directory}/error.log;
events {{ worker_connections 64; }}
http {{
    log_format proxied '$proxy_protocol_addr $proxy_protocol_port $remote_addr';
    access_log {directory}/access.log proxied;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        location / {{ return 200 "hello from web\\n"; }}
    }}
}}
"""
    )
    process = subprocess.Popen(
        [executable, "-c", str(conf), "-p", str(directory)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert process.poll() is None, (directory / "error.log").read_text()
            assert time.monotonic() < deadline, "nginx did not listen"
            time.sleep(0.02)
        yield Nginx(port, directory / "access.log", process)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the NAT way: outside -> sys-net -> sys-firewall -> web, each a namespace -------------

#: sys-net <-> sys-firewall and sys-firewall <-> web, halves of 198.51.100.0/24.
FIREWALL_IP, WEB_IP = "198.51.100.2", "198.51.100.130"
SYS_NET_DOWN, FIREWALL_DOWN = "198.51.100.1", "198.51.100.129"
#: ... and their IPv6 links, 2001:db8:1::/64 and 2001:db8:2::/64 (the outside is 2001:db8::/64).
FIREWALL_IP6, WEB_IP6 = "2001:db8:1::2", "2001:db8:2::2"
SYS_NET_DOWN6, FIREWALL_DOWN6 = "2001:db8:1::1", "2001:db8:2::1"

QUBES_LIKE_NETVM_RULESET = """
table ip qubes {
    chain custom-input {
    }
    chain custom-forward {
    }
    chain input {
        type filter hook input priority filter; policy drop;
        jump custom-input
        ct state invalid counter drop
        ct state related,established accept
        meta l4proto icmp accept
        iif lo accept
        meta l4proto tcp counter reject with tcp reset
        counter reject
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        jump custom-forward
        ct state invalid counter drop
        ct state related,established accept
        oifname "eth0" accept
        meta l4proto tcp counter reject with tcp reset
        counter reject
    }
}
table ip6 qubes {
    chain custom-input {
    }
    chain custom-forward {
    }
    chain input {
        type filter hook input priority filter; policy drop;
        jump custom-input
        ct state invalid counter drop
        ct state related,established accept
        meta l4proto ipv6-icmp accept
        iif lo accept
        meta l4proto tcp counter reject with tcp reset
        counter reject
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        jump custom-forward
        ct state invalid counter drop
        ct state related,established accept
        oifname "eth0" accept
        meta l4proto tcp counter reject with tcp reset
        counter reject
    }
}
"""


@dataclass(frozen=True)
class NatWorld:
    outside: str
    sys_net: str
    sys_firewall: str
    web: str

    def ns(self, qube: str) -> str:
        return {"sys-net": self.sys_net, "sys-firewall": self.sys_firewall, "web": self.web}[qube]

    def run_in(self, qube: str, *argv: str) -> str:
        return _sh("ip", "netns", "exec", self.ns(qube), *argv)

    def rulesets(self) -> dict[str, str]:
        return {
            qube: self.run_in(qube, "nft", "--stateless", "list", "ruleset")
            for qube in ("sys-net", "sys-firewall", "web")
        }


def _link(
    upper: str,
    upper_name: str,
    upper_ip: str,
    lower: str,
    lower_ip: str,
    tag: str,
    ip6: tuple[str, str],
) -> None:
    """A veth pair: ``upper_name`` in ``upper``, eth0 in ``lower`` (a netvm and its client)."""
    _sh("ip", "link", "add", f"qxa{tag}", "type", "veth", "peer", "name", f"qxb{tag}")
    _sh("ip", "link", "set", f"qxa{tag}", "netns", upper)
    _sh("ip", "link", "set", f"qxb{tag}", "netns", lower)
    up = ("ip", "netns", "exec", upper, "ip")
    low = ("ip", "netns", "exec", lower, "ip")
    _sh(*up, "link", "set", f"qxa{tag}", "name", upper_name)
    _sh(*low, "link", "set", f"qxb{tag}", "name", "eth0")
    _sh(*up, "address", "add", f"{upper_ip}/25", "dev", upper_name)
    _sh(*low, "address", "add", f"{lower_ip}/25", "dev", "eth0")
    _sh(*up, "link", "set", upper_name, "up")
    _sh(*low, "link", "set", "eth0", "up")
    _sh(*low, "link", "set", "lo", "up")
    _sh(*low, "route", "add", "default", "via", upper_ip)
    _sh(*up, "address", "add", f"{ip6[0]}/64", "dev", upper_name, "nodad")
    _sh(*low, "address", "add", f"{ip6[1]}/64", "dev", "eth0", "nodad")
    _sh(*low, "-6", "route", "add", "default", "via", ip6[0])


@contextlib.contextmanager
def nat_namespaces() -> Iterator[NatWorld]:
    number = f"{os.getpid() % 100000}{next(_numbers)}"
    world = NatWorld(*(f"qx{kind}{number}" for kind in ("out", "net", "fw", "web")))
    try:
        for name in (world.outside, world.sys_net, world.sys_firewall, world.web):
            _sh("ip", "netns", "add", name)
        # outside <-> sys-net: the outside network (sys-net's uplink is called eth0 too).
        _sh("ip", "link", "add", f"qxo{number}", "type", "veth", "peer", "name", f"qxn{number}")
        _sh("ip", "link", "set", f"qxo{number}", "netns", world.outside)
        _sh("ip", "link", "set", f"qxn{number}", "netns", world.sys_net)
        out = ("ip", "netns", "exec", world.outside, "ip")
        net = ("ip", "netns", "exec", world.sys_net, "ip")
        _sh(*net, "link", "set", f"qxn{number}", "name", "eth0")
        for address in (f"{ALLOWED_V4}/24", f"{OTHER_V4}/24"):
            _sh(*out, "address", "add", address, "dev", f"qxo{number}")
        _sh(*net, "address", "add", f"{SYS_NET_V4}/24", "dev", "eth0")
        for address in (f"{ALLOWED_V6}/64", f"{OTHER_V6}/64"):
            _sh(*out, "address", "add", address, "dev", f"qxo{number}", "nodad")
        _sh(*net, "address", "add", f"{SYS_NET_V6}/64", "dev", "eth0", "nodad")
        for prefix, device in ((out, f"qxo{number}"), (out, "lo"), (net, "eth0"), (net, "lo")):
            _sh(*prefix, "link", "set", device, "up")
        _link(
            world.sys_net, "vif2.0", SYS_NET_DOWN, world.sys_firewall, FIREWALL_IP, f"{number}1",
            (SYS_NET_DOWN6, FIREWALL_IP6),
        )  # fmt: skip
        _link(
            world.sys_firewall, "vif3.0", FIREWALL_DOWN, world.web, WEB_IP, f"{number}2",
            (FIREWALL_DOWN6, WEB_IP6),
        )  # fmt: skip
        _sh(*net, "route", "add", "198.51.100.128/25", "via", FIREWALL_IP)
        _sh(*net, "-6", "route", "add", "2001:db8:2::/64", "via", FIREWALL_IP6)
        for name in (world.sys_net, world.sys_firewall):
            _sh("ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
            _sh("ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
        for name in (world.sys_net, world.sys_firewall, world.web):
            subprocess.run(
                ["ip", "netns", "exec", name, "nft", "-f", "-"],
                input=QUBES_LIKE_NETVM_RULESET, text=True, check=True,
            )  # fmt: skip
        yield world
    finally:
        for name in (world.outside, world.sys_net, world.sys_firewall, world.web):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


# Run in web's namespace: echo servers that answer with the peer's address.
ECHO_SERVERS = """
import socket, sys, threading
port = int(sys.argv[1])
# IPv6 sockets that take IPv4 too (V6ONLY off), so both families reach one server.
tcp = socket.socket(socket.AF_INET6); tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
tcp.bind(("::", port)); tcp.listen(8)
udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); udp.bind(("::", port))
def shown(peer):
    host = peer[0]
    return host[7:] if host.startswith("::ffff:") else host
def serve_udp():
    while True:
        data, peer = udp.recvfrom(2048)
        udp.sendto(b"udp from " + shown(peer).encode() + b": " + data, peer)
threading.Thread(target=serve_udp, daemon=True).start()
print("ready", flush=True)
while True:
    conn, peer = tcp.accept()
    conn.sendall(b"tcp from " + shown(peer).encode())
    conn.close()
"""

# Run in the outside namespace: one UDP exchange; its outcome as JSON.
UDP_CLIENT = """
import json, socket, sys
source, destination, port, wait = sys.argv[1:]
family = socket.AF_INET6 if ":" in destination else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.settimeout(float(wait))
sock.bind((source, 0))
sock.connect((destination, int(port)))
sock.send(b"ping")
try:
    print(json.dumps({"outcome": "answered", "data": sock.recv(2048).decode()}))
except ConnectionRefusedError:
    print(json.dumps({"outcome": "refused"}))
except socket.timeout:
    print(json.dumps({"outcome": "timeout"}))
"""
