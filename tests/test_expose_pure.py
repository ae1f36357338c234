"""``qconnect expose``'s pure parts: listener settings, PROXY header, nft rules, rc.local."""

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qconnect.core import exposure
from qconnect.core.errors import QconnectError
from qconnect.core.exposure import Admission, Exposure, ExposureError
from qconnect.expose import model, via
from qconnect.expose.model import ExposeError
from tests.cli_refusals import assert_one_refusal

V4 = ipaddress.IPv4Network
V6 = ipaddress.IPv6Network


def _network(address: object, prefix: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network((str(address), prefix), strict=False)


networks = st.one_of(
    st.builds(_network, st.ip_addresses(v=4), st.integers(0, 32)),
    st.builds(_network, st.ip_addresses(v=6), st.integers(0, 128)),
)


@given(
    allow=st.lists(networks, min_size=1, max_size=5).map(tuple),
    port=st.integers(1, 65535),
    proxy=st.sampled_from([None, "v1", "v2"]),
)
def test_settings_file_reads_back_as_written(allow: tuple, port: int, proxy: str | None) -> None:
    settings = Exposure("web", port, allow, proxy)
    assert (
        exposure.parse_exposure(exposure.render_exposure(settings, "qconnect expose x")) == settings
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "target web\nport 443\n",  # no allow-from: refused, never "everyone"
        "target web\nport 443\nallow-from 192.0.2.0/24\nallow-from 0.0.0.0/0\n",
        "target web\nport 0443\nallow-from 192.0.2.0/24\n",
        "target @default\nport 443\nallow-from 192.0.2.0/24\n".replace("@default", "we b"),
        "target web\nport 443\nallow-from 192.0.2.1/24\n",  # host bits set
        "target web\nport 443\nallow-from 192.0.2.0/24 \n",
        "target web\nport 443\nallow-from 192.0.2.0/24\nproxy-protocol v3\n",
        "target web\nport 443\nallow-from 192.0.2.0/24\nallow_from any\n",
    ],
)
def test_malformed_settings_are_refused(text: str) -> None:
    with pytest.raises(ExposureError):
        exposure.parse_exposure(text)


def write_settings(root: Path, name: str, data: bytes) -> None:
    directory = exposure.config_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(data)


def test_broken_settings_refuse_every_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(exposure.ROOT_ENV, str(tmp_path))
    write_settings(tmp_path, "192.0.2.1-443", b"target web\nport 443\nallow-from \xff\n")
    decision = exposure.admit(("192.0.2.1", 443), ("192.0.2.10", 5000))
    assert decision.refusal is not None and "broken" in decision.refusal
    write_settings(tmp_path, "192.0.2.1-443", b"# nothing else\n" * 10000)
    assert exposure.admit(("192.0.2.1", 443), ("192.0.2.10", 5000)).refusal is not None
    # A listener without settings is not exposed: the client serves it as before.
    assert exposure.admit(("192.0.2.1", 444), ("192.0.2.10", 5000)) == Admission(None)


def test_admission_by_source_and_proxy_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(exposure.ROOT_ENV, str(tmp_path))
    settings = Exposure("web", 8443, (V4("192.0.2.0/28"), V6("2001:db8::/64")), "v1")
    write_settings(tmp_path, "2001_db8__1-443", exposure.render_exposure(settings, "x").encode())
    local = ("2001:db8::1", 443, 0, 0)
    allowed = exposure.admit(local, ("2001:db8::10", 40000, 0, 0))
    assert allowed.refusal is None
    assert allowed.prefix == b"PROXY TCP6 2001:db8::10 2001:db8::1 40000 443\r\n"
    assert allowed.call_argv(["qrexec-client-vm", "--use-stdin-socket", "web", "s+1"]) == [
        "qrexec-client-vm",
        "--prefix-data=PROXY TCP6 2001:db8::10 2001:db8::1 40000 443\r\n",
        "--use-stdin-socket",
        "web",
        "s+1",
    ]
    refused = exposure.admit(local, ("2001:db8:1::10", 40000, 0, 0))
    assert refused.refusal == "not in allow-from 192.0.2.0/28,2001:db8::/64"


def test_ipv4_mapped_peer_is_judged_and_written_as_ipv4() -> None:
    settings = Exposure("web", 80, (V4("192.0.2.0/24"),))
    assert settings.admits("::ffff:192.0.2.7")
    assert not settings.admits("::ffff:198.51.100.7")
    header = exposure.proxy_v1_header(("::ffff:192.0.2.7", 1234), ("::ffff:192.0.2.1", 80))
    assert header == b"PROXY TCP4 192.0.2.7 192.0.2.1 1234 80\r\n"


def test_any_means_both_families() -> None:
    assert exposure.parse_networks("any") == (V4("0.0.0.0/0"), V6("::/0"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("web", "QUBE:PORT"),
        ("@default:443", "a qube name"),
        ("web:0443", "leading zero"),
        ("we;b:443", "QUBE:PORT"),
    ],
)
def test_bad_targets_are_named(text: str, message: str) -> None:
    with pytest.raises(QconnectError, match=message):
        model.parse_target(text)


@pytest.mark.parametrize("text", ["eth0;x", "", "a" * 16, "eth 0", 'eth"0'])
def test_bad_interfaces_are_refused(text: str) -> None:
    with pytest.raises(ExposeError):
        model.parse_interface(text)


@pytest.mark.parametrize("text", ["0.0.0.0", "::", "127.0.0.1", "::1", "224.0.0.1", "eth0"])
def test_wildcard_loopback_and_junk_listen_addresses_are_refused(text: str) -> None:
    with pytest.raises(ExposeError):
        model.parse_listen_address(text)


def test_rules_per_family_only_where_both_sides_exist() -> None:
    rules = model.nft_rules(
        ("192.0.2.1", "2001:db8::1"), 443, (V4("198.51.100.0/24"), V4("192.0.2.0/24")), "eth0"
    )
    assert rules == [
        'add rule ip qubes custom-input iifname "eth0" ip daddr { 192.0.2.1 } '
        "ip saddr { 198.51.100.0/24, 192.0.2.0/24 } tcp dport 443 counter accept "
        'comment "qconnect expose port 443"'
    ]
    everyone = model.nft_rules(("2001:db8::1",), 80, exposure.parse_networks("any"), None)
    assert everyone == [
        "add rule ip6 qubes custom-input ip6 daddr { 2001:db8::1 } tcp dport 80 counter accept "
        'comment "qconnect expose port 80"'
    ]


@pytest.mark.parametrize(
    "original",
    [None, "#!/bin/sh\n", "#!/bin/sh\necho mine\nexit 0\n", "#!/bin/sh\necho no final newline"],
)
def test_rc_local_block_goes_away_byte_for_byte(original: str | None) -> None:
    line = model.rc_local_line("/usr/local/etc/qconnect/expose/rules-443.nft", 443)
    added = via._rc_local_with(original, [line])
    assert added is not None and line in added
    if original is not None and "exit 0" in original:
        assert added.endswith("exit 0\n")  # before the final exit, or it would never run
    assert via._rc_local_lines(added) == [line]
    assert via._rc_local_with(added, []) == original


def test_command_line_mistakes_are_one_line_and_exit_2(tmp_path: Path) -> None:
    cases = [
        (["web:443", "--here"], "--from is required"),
        (["web:443", "--from", "192.0.2.1/24", "--here"], "host bits"),
        (["web:443", "--from", "any", "--interface", "eth0;reboot", "--here"], "invalid interface"),
        (["web:443", "--from", "any", "--listen", "0.0.0.0", "--here"], "wildcard"),
        (["--list", "web:443", "--here"], "--list takes no"),
        (["--here", "--root", str(tmp_path / "missing"), "--list"], "invalid --root"),
    ]
    for words, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "qconnect", "expose", *words],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        stderr = "\n".join(line for line in result.stderr.splitlines() if "warning" not in line)
        assert_one_refusal(result.returncode, stderr, 2, message)


def test_dom0_side_needs_no_trio() -> None:
    """dom0 has no trio: the whole command, both sides, runs on the standard library."""
    code = (
        "import sys; import qconnect.expose.cli, qconnect.expose.via, qconnect.loopback.qvmrun; "
        "sys.exit('trio' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_proxy_v2_header_is_haproxys_binary_format() -> None:
    header = exposure.proxy_v2_header(("192.0.2.10", 40000), ("192.0.2.1", 443))
    assert header == (
        b"\r\n\r\n\x00\r\nQUIT\n"  # the signature
        + bytes([0x21, 0x11, 0, 12])  # v2 PROXY, TCP over IPv4, 12 address bytes
        + bytes([192, 0, 2, 10, 192, 0, 2, 1])
        + (40000).to_bytes(2, "big")
        + (443).to_bytes(2, "big")
    )
    six = exposure.proxy_v2_header(("2001:db8::10", 1, 0, 0), ("2001:db8::1", 2, 0, 0))
    assert six[12:16] == bytes([0x21, 0x21, 0, 36]) and len(six) == 16 + 36
    assert six[16:32] == ipaddress.ip_address("2001:db8::10").packed


def test_v2_connections_are_relayed_with_the_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(exposure.ROOT_ENV, str(tmp_path))
    settings = Exposure("web", 8443, (V4("192.0.2.0/24"),), "v2")
    write_settings(tmp_path, "192.0.2.1-443", exposure.render_exposure(settings, "x").encode())
    decision = exposure.admit(("192.0.2.1", 443), ("192.0.2.10", 40000))
    assert decision.prefix == b"" and decision.relay_prefix.startswith(b"\r\n\r\n\x00")
    assert decision.call_argv(["q", "web", "s"]) == ["q", "web", "s"]
