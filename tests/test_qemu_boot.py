"""The QEMU boot proof (qemu/): real Debian 12 guests booted under QEMU TCG with
a capture on the NIC from power-on, inside a network namespace holding only
loopback. Each variant is one boot; `python3 -m qemu` runs the same boots and
prints the per-boot report.

The controls (same guests, no earlyfw) and the ip-only mutant must leak: each
of those tests FAILS if its capture shows no leak, because then the leak
sources or the capture are broken and the no-leak results prove nothing.

The first tests are fast checks of the harness itself: the capture parser on
hand-built frames, the mutant's ruleset, and the namespace guard.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from qemu import REPO, boot, guest, pcap, proof
from qemu.guest import VARIANTS, Change, Variant

from earlyfw import policy
from earlyfw.config import Endpoint, Transport

ENDPOINTS = (Endpoint(ipaddress.ip_address("10.0.2.2"), 51820, Transport.UDP),)
UNSPECIFIED = str(ipaddress.IPv4Address(0))  # a DHCP client's source address
GUEST_MAC = bytes.fromhex(pcap.GUEST_MAC.replace(":", ""))
SLIRP_MAC = bytes.fromhex("525500000202")
HOP_BY_HOP = b"\x3a\x00" + b"\x00" * 6  # an empty hop-by-hop header, next header ICMPv6, as MLD sends
QEMU_TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "mmdebstrap": "mmdebstrap", "mke2fs": "e2fsprogs"}


# -- the capture parser, on frames built by hand ------------------------------


def ether(payload: bytes, ethertype: int, source: bytes = GUEST_MAC) -> bytes:
    return b"\xff" * 6 + source + struct.pack("!H", ethertype) + payload


def ipv4(proto: int, src: str, dst: str, segment: bytes, ttl: int = 64) -> bytes:
    header = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(segment), 0, 0, ttl, proto, 0)
    return ether(header + socket.inet_aton(src) + socket.inet_aton(dst) + segment, pcap.ETH_IPV4)


def ipv6(proto: int, src: str, dst: str, segment: bytes, hop_limit: int = 64) -> bytes:
    header = struct.pack("!IHBB", 6 << 28, len(segment), proto, hop_limit)
    addresses = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
    return ether(header + addresses + segment, pcap.ETH_IPV6)


def udp(sport: int, dport: int, payload: bytes = b"x") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 5 << 4, 0x02, 1024, 0, 0)


def kind_of(frame: bytes) -> pcap.Kind:
    return pcap.classify(pcap.Frame(0.0, frame), ENDPOINTS).kind


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        pytest.param(ether(b"\x00" * 28, pcap.ETH_ARP), pcap.Kind.ARP, id="arp"),
        pytest.param(ipv4(17, UNSPECIFIED, "255.255.255.255", udp(68, 67)), pcap.Kind.DHCP, id="dhcp"),
        pytest.param(ipv4(17, "10.0.2.15", "10.0.2.2", udp(40000, 51820)), pcap.Kind.ENDPOINT, id="endpoint"),
        pytest.param(ipv4(17, "10.0.2.15", "9.9.9.9", udp(40000, 53)), pcap.Kind.DNS, id="dns-v4"),
        pytest.param(ipv4(6, "10.0.2.15", "198.51.100.53", tcp(40000, 853)), pcap.Kind.DNS, id="dot-tcp"),
        pytest.param(ipv4(17, "10.0.2.15", "192.0.2.123", udp(123, 123)), pcap.Kind.NTP, id="ntp"),
        pytest.param(ipv4(17, "10.0.2.15", "198.51.100.3", udp(40000, 3478)), pcap.Kind.STUN, id="stun"),
        pytest.param(ipv4(6, "10.0.2.15", "198.51.100.80", tcp(40000, 443)), pcap.Kind.TCP, id="tcp"),
        pytest.param(ipv4(1, "10.0.2.15", "192.0.2.1", b"\x08\x00\x00\x00"), pcap.Kind.ICMP, id="icmp-echo"),
        # The endpoint is a protocol and port too: TCP to it, or another UDP port, is a leak.
        pytest.param(ipv4(6, "10.0.2.15", "10.0.2.2", tcp(40000, 51820)), pcap.Kind.TCP, id="tcp-to-endpoint"),
        pytest.param(ipv4(17, "10.0.2.15", "10.0.2.2", udp(40000, 51821)), pcap.Kind.UDP, id="udp-other-port"),
        pytest.param(ipv6(58, "fe80::1", "ff02::2", b"\x85\x00", hop_limit=255), pcap.Kind.NDP, id="ndp-rs"),
        pytest.param(ipv6(58, "::", "ff02::1:ff12:3456", b"\x87\x00", hop_limit=255), pcap.Kind.NDP, id="ndp-dad"),
        # A neighbour advertisement answering a neighbour with a global address.
        pytest.param(ipv6(58, "fec0::15", "fec0::2", b"\x88\x00", hop_limit=255), pcap.Kind.NDP, id="ndp-na-global"),
        # Neighbour discovery that a router could forward (hop limit below 255) is not link-local plumbing.
        pytest.param(ipv6(58, "fe80::1", "ff02::2", b"\x85\x00", hop_limit=64), pcap.Kind.ICMP, id="nd-hlim-64"),
        pytest.param(ipv6(58, "fec0::15", "2001:db8::1", b"\x80\x00"), pcap.Kind.ICMP, id="icmpv6-echo"),
        pytest.param(ipv6(0, "fe80::1", "ff02::16", HOP_BY_HOP + b"\x8f\x00", hop_limit=1), pcap.Kind.MLD, id="mld"),
        pytest.param(ipv6(17, "fe80::1", "ff02::1:2", udp(546, 547)), pcap.Kind.DHCPV6, id="dhcpv6"),
        pytest.param(ipv6(17, "fec0::15", "2001:db8::53", udp(40000, 53)), pcap.Kind.DNS, id="dns-v6"),
        pytest.param(ether(b"", 0x88CC), pcap.Kind.OTHER, id="lldp"),
    ],
)
def test_classify(frame: bytes, kind: pcap.Kind) -> None:
    assert kind_of(frame) is kind


def test_only_plumbing_and_the_endpoint_are_allowed() -> None:
    allowed = {k for k in pcap.Kind if k.allowed}
    assert allowed == {"arp", "dhcp", "dhcpv6", "ndp", "mld", "endpoint"}


def write_pcap(path: Path, frames: list[tuple[float, bytes]]) -> None:
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65536, 1))
        for time, data in frames:
            f.write(struct.pack("<IIII", int(time), round(time % 1 * 1e6), len(data), len(data)) + data)


def test_analyse_counts_only_what_the_guest_sent(tmp_path: Path) -> None:
    epoch = boot.RTC_EPOCH
    probe = b"earlyfw-qemu endpoint probe uptime=7.25"
    write_pcap(
        tmp_path / "c.pcap",
        [
            (epoch + 5.0, ipv4(17, UNSPECIFIED, "255.255.255.255", udp(68, 67))),
            # slirp's answer: inbound, never counted as sent.
            (epoch + 5.1, ipv4(17, "10.0.2.2", "255.255.255.255", udp(67, 68)).replace(GUEST_MAC, SLIRP_MAC, 1)),
            (epoch + 9.5, ipv4(17, "10.0.2.15", "10.0.2.2", udp(40000, 51820, probe))),
            (epoch + 9.75, ipv4(17, "10.0.2.15", "9.9.9.9", udp(40000, 53))),
        ],
    )
    capture = pcap.analyse(tmp_path / "c.pcap", ENDPOINTS, epoch=epoch)
    assert capture.counts == {"dhcp": 1, "dns": 1, "endpoint": 1}
    assert capture.inbound == 1
    assert capture.first_packet == 5.0
    assert [p.kind for p in capture.leaks] == [pcap.Kind.DNS]
    assert capture.first_leak == 9.75
    # The probe left 9.5 s after power-on at uptime 7.25: the kernel started 2.25 s in.
    assert capture.uptime_offset == 2.25
    assert capture.as_uptime(9.75) == 7.5


def test_a_record_cut_short_by_the_kill_is_dropped(tmp_path: Path) -> None:
    write_pcap(tmp_path / "c.pcap", [(1.0, ether(b"\x00" * 28, pcap.ETH_ARP))])
    with (tmp_path / "c.pcap").open("ab") as f:
        f.write(struct.pack("<IIII", 2, 0, 100, 100) + b"\x00" * 10)
    assert len(pcap.read(tmp_path / "c.pcap")) == 1


def test_parse_report() -> None:
    text = (
        "@@login 12.50\r\n@@window-end 16.00\r\n@@dmesg\r\n"
        "[    3.100000] virtnet: registered device eth0 with 1 RX and TX vq's\r\n"
        "[    2.900000] earlyfw: blocked: /etc/earlyfw/initramfs.nft loaded; only the VPN endpoints are reachable\r\n"
        "@@nft-tables\r\ntable inet earlyfw\r\n"
        '@@earlyfw-table\r\n\tcomment "earlyfw state=blocked"\r\n@@failed-units\r\n@@journal\r\n'
        "[   30.500000] guest systemd[1]: Starting earlyfw-block.service - earlyfw: block all traffic...\r\n"
        "[   30.750000] guest systemd[1]: Finished earlyfw-block.service - earlyfw: block all traffic.\r\n"
        "@@timeline\r\n"
        "[   31.000000] guest systemd[1]: Starting systemd-networkd.service - Network Configuration...\r\n"
        "[   32.500000] guest systemd[1]: Reached target network-online.target - Network is Online.\r\n"
        "@@done\r\n"
    )
    report = boot.parse_report(text)
    assert report.complete
    assert report.login_uptime == 12.5
    assert report.window_end_uptime == 16.0
    assert report.block_live == 2.9
    assert report.nic_registered == 3.1
    assert report.nft_tables == ("table inet earlyfw",)
    assert report.earlyfw_state == "blocked"
    assert report.unit_seconds("earlyfw-block.service") == 0.25
    assert report.unit_seconds("earlyfw-initrd.service") is None
    assert report.unit_times("systemd-networkd.service") == {"start": 31.0}
    assert report.unit_times("network-online.target") == {"end": 32.5}


# -- the mutant and the namespace guard ---------------------------------------


def test_ip_only_mutant_loads_and_has_no_ipv6_rule() -> None:
    """The mutant must load (else it is the broken-ruleset case) and must
    filter nothing IPv6; `nft -c` runs in a private namespace."""
    for state in policy.State:
        mutant = guest.ip_only(policy.render(guest.guest_config(), state))
        assert "table ip earlyfw {" in mutant
        assert "ip6 " not in mutant
        assert "reject with" not in mutant
        check = subprocess.run(
            ["unshare", "--map-root-user", "--net", "nft", "-c", "-f", "-"],
            input=mutant.encode(),
            capture_output=True,
            check=False,
        )
        assert check.returncode == 0, check.stderr.decode()


def run_isolated(*prefix: str) -> int:
    argv = [*prefix, sys.executable, "-m", "qemu.isolated", "--", "true"]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    return subprocess.run(argv, cwd=REPO, env=env, check=False).returncode


def test_qemu_only_starts_in_a_namespace_with_only_loopback() -> None:
    assert socket.if_nameindex() != [(1, "lo")], "this test needs a host namespace with a real interface"
    assert run_isolated() == 99
    assert run_isolated("unshare", "--map-root-user", "--net", "--") == 0


# -- the boots ------------------------------------------------------------------


@pytest.fixture(scope="module")
def qemu_tools() -> None:
    missing = [package for tool, package in QEMU_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the QEMU boot proof needs: apt-get install {' '.join(missing)}", pytrace=False)


def boot_variant(name: str) -> proof.Verdict:
    verdict = proof.run(VARIANTS[name])
    print(proof.table([verdict]))
    if "wireguard" in (figures := proof.summary(verdict)):
        print(figures["wireguard"])
    return verdict


def by_kind(verdict: proof.Verdict) -> dict[str, int]:
    return verdict.outcome.capture.counts


@pytest.mark.qemu
@pytest.mark.usefixtures("qemu_tools")
@pytest.mark.parametrize("name", ["control-dracut", "control-initramfs-tools"])
def test_control_guest_leaks(name: str) -> None:
    """Without earlyfw the same guest leaks DNS, NTP, STUN, TCP and ICMP."""
    verdict = boot_variant(name)
    assert verdict.passed, verdict.explain()
    leaked = {p.kind for p in verdict.outcome.capture.leaks}
    assert {pcap.Kind.DNS, pcap.Kind.TCP, pcap.Kind.ICMP} <= leaked, by_kind(verdict)


@pytest.mark.qemu
@pytest.mark.usefixtures("qemu_tools")
@pytest.mark.parametrize("name", ["dracut", "initramfs-tools"])
def test_earlyfw_guest_leaks_nothing(name: str) -> None:
    """From power-on to login only DHCP, ARP, IPv6 link-local plumbing and the
    endpoint; the block live before virtio_net registered the NIC."""
    verdict = boot_variant(name)
    assert verdict.passed, verdict.explain()


@pytest.mark.qemu
@pytest.mark.usefixtures("qemu_tools")
def test_ip_only_mutant_is_caught() -> None:
    """A kill switch in an `ip` table lets IPv6 out, and the capture says so."""
    variant = VARIANTS["mutant-ip-only"]
    assert variant.change is Change.IP_ONLY and variant.expect_leaks
    verdict = boot_variant(variant.name)
    assert verdict.passed, verdict.explain()
    assert any(p.version == 6 for p in verdict.outcome.capture.leaks)
    # The same checks that pass the real guests fail this one.
    honest = Variant("mutant-judged-as-earlyfw", variant.generator)
    assert proof.check(honest, verdict.outcome), "the no-leak checks did not catch the mutant"


@pytest.mark.qemu
@pytest.mark.usefixtures("qemu_tools")
@pytest.mark.parametrize("name", ["broken-dracut", "broken-initramfs-tools"])
def test_broken_ruleset_fails_closed(name: str) -> None:
    """Rulesets nft cannot load: the guest still reaches login (a user can
    recover), earlyfw's table is there, and nothing leaks."""
    verdict = boot_variant(name)
    assert verdict.passed, verdict.explain()


@pytest.mark.qemu
@pytest.mark.usefixtures("qemu_tools")
def test_nftables_service_flush_opens_nothing() -> None:
    """Debian's nftables.service with its default nftables.conf (`flush
    ruleset`) starts in the guest: earlyfw's table survives and nothing leaks."""
    verdict = boot_variant("nftables-service")
    assert verdict.passed, verdict.explain()
    assert "table inet filter" in verdict.outcome.report.nft_tables


@pytest.mark.qemu
@pytest.mark.usefixtures("qemu_tools")
def test_break_glass_loads_nothing_of_earlyfw() -> None:
    """The nftables-service guest booted with `earlyfw=on earlyfw=off` (the
    last one wins): the admin's own nftables.conf is in force, no earlyfw
    table at login, and the initramfs and earlyfw-off.service warn on the
    console. It leaks, as a machine without earlyfw does."""
    variant = VARIANTS["nftables-service-off"]
    assert variant.break_glass and variant.expect_leaks
    verdict = boot_variant(variant.name)
    assert verdict.passed, verdict.explain()
    assert verdict.outcome.report.nft_tables == ("table inet filter",)
    console = (verdict.outcome.run_dir / "console.log").read_text(errors="replace")
    assert console.count(proof.BREAK_GLASS_WARNING) >= 2, console  # the initramfs loader, earlyfw-off.service


@pytest.mark.qemu
@pytest.mark.usefixtures("qemu_tools")
def test_raw_socket_control_leaks_past_the_inet_table() -> None:
    """The control for the next test: earlyfw installed without [egress], a
    raw-socket (AF_PACKET) leak source from early boot. Its frames skip every
    inet hook and reach the capture; nothing else leaks."""
    variant = VARIANTS["control-raw-egress"]
    assert variant.expect_leaks and not variant.egress
    verdict = boot_variant(variant.name)
    assert verdict.passed, verdict.explain()
    assert proof.raw_leaks(verdict.outcome) > 0
    assert {p.kind for p in verdict.outcome.capture.leaks} == {pcap.Kind.UDP}, by_kind(verdict)


@pytest.mark.qemu
@pytest.mark.usefixtures("qemu_tools")
def test_raw_socket_egress_is_filtered_from_the_moment_the_nic_exists() -> None:
    """The same guest with [egress] interfaces = the NIC: earlyfw-egress (from
    earlyfw-block.service and the udev rule) attached the egress chain before
    any network manager set the link up: not one raw frame, no leak at all,
    while DHCP and the endpoint got out."""
    verdict = boot_variant("raw-egress")
    assert verdict.passed, verdict.explain()
    assert proof.raw_leaks(verdict.outcome) == 0
    assert "table netdev earlyfw_egress" in verdict.outcome.report.nft_tables
    # Attached by earlyfw-block.service, and again by the udev rule on coldplug.
    attached = [line for line in verdict.outcome.report.kernel_log if proof.EGRESS_ATTACHED in line.text]
    assert len(attached) >= 2, attached
