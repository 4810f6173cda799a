"""Read QEMU's filter-dump capture and sort every frame the guest sent into a
class: the few a kill switch must let out (DHCP, ARP and its IPv6 counterparts,
the VPN endpoint) and everything else, which is a leak.

The pcap format is a 24-byte file header and a 16-byte header per record, so a
reader is a few lines; no third-party dissector is needed or trusted here.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from earlyfw.config import Endpoint, IPAddress, Transport

# The MAC address QEMU gives the guest's NIC (set explicitly on -device), which
# tells the guest's frames from slirp's in a capture of both directions.
GUEST_MAC = "52:54:00:12:34:56"

ETH_ARP = 0x0806
ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
IPPROTO_ICMP = 1
IPPROTO_IGMP = 2
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
IPV6_EXTENSION_HEADERS = {0, 43, 60}  # hop-by-hop (MLD carries one), routing, destination options

ICMPV6_ND = {133, 135, 136}  # router solicitation, neighbour solicitation and advertisement
ICMPV6_MLD_REPORT = {131, 143}

LINK_LOCAL_V6 = ipaddress.IPv6Network("fe80::/10")
MULTICAST_LINK_V6 = ipaddress.IPv6Network("ff02::/16")


class Kind(StrEnum):
    """What a frame the guest sent is, and whether a kill switch may let it out."""

    ARP = "arp"
    DHCP = "dhcp"
    DHCPV6 = "dhcpv6"
    # IPv6's ARP and router discovery. Hop limit 255 makes it link-scoped
    # whatever the addresses: a router would lower it, and RFC 4861 receivers
    # drop any ND message whose hop limit is not 255.
    NDP = "ndp"
    MLD = "mld"  # IPv6 multicast membership reports: link-scoped, hop limit 1
    ENDPOINT = "endpoint"
    DNS = "dns"
    NTP = "ntp"
    STUN = "stun"
    TCP = "tcp"
    ICMP = "icmp"
    UDP = "udp"
    OTHER = "other"

    @property
    def allowed(self) -> bool:
        """Link-local plumbing that never crosses a router, and the endpoint."""
        return self in {Kind.ARP, Kind.DHCP, Kind.DHCPV6, Kind.NDP, Kind.MLD, Kind.ENDPOINT}


@dataclass(frozen=True)
class Frame:
    time: float  # seconds, as QEMU stamped it
    data: bytes

    @property
    def source_mac(self) -> str:
        return ":".join(f"{b:02x}" for b in self.data[6:12])


@dataclass(frozen=True)
class Packet:
    """One outbound frame, classified."""

    time: float
    kind: Kind
    summary: str
    version: int = 0  # IP version, 0 for ARP and the like
    payload: bytes = b""  # UDP payload, kept for the endpoint probes only


def read(path: Path) -> list[Frame]:
    data = path.read_bytes()
    if len(data) < 24:
        raise ValueError(f"{path}: {len(data)} bytes, not a pcap file (QEMU did not start capturing?)")
    magic = data[:4]
    if magic == b"\xd4\xc3\xb2\xa1":
        endian, nano = "<", False
    elif magic == b"\xa1\xb2\xc3\xd4":
        endian, nano = ">", False
    elif magic == b"\x4d\x3c\xb2\xa1":
        endian, nano = "<", True
    elif magic == b"\xa1\xb2\x3c\x4d":
        endian, nano = ">", True
    else:
        raise ValueError(f"{path}: bad pcap magic {magic.hex()}")
    (linktype,) = struct.unpack_from(endian + "I", data, 20)
    if linktype != 1:
        raise ValueError(f"{path}: link type {linktype}, expected Ethernet (1)")
    frames: list[Frame] = []
    offset = 24
    divisor = 1e9 if nano else 1e6
    while offset + 16 <= len(data):
        seconds, fraction, captured, _ = struct.unpack_from(endian + "IIII", data, offset)
        offset += 16
        # A record QEMU was still writing when it was killed is cut short: drop it.
        if offset + captured > len(data):
            break
        frames.append(Frame(seconds + fraction / divisor, data[offset : offset + captured]))
        offset += captured
    return frames


def outbound(frames: Iterable[Frame], mac: str = GUEST_MAC) -> Iterator[Frame]:
    return (f for f in frames if f.source_mac == mac)


def classify(frame: Frame, endpoints: Iterable[Endpoint]) -> Packet:
    data = frame.data
    if len(data) < 14:
        return Packet(frame.time, Kind.OTHER, f"runt frame of {len(data)} bytes")
    (ethertype,) = struct.unpack_from("!H", data, 12)
    payload = data[14:]
    if ethertype == ETH_ARP:
        return Packet(frame.time, Kind.ARP, "arp")
    if ethertype == ETH_IPV4:
        return _ipv4(frame.time, payload, tuple(endpoints))
    if ethertype == ETH_IPV6:
        return _ipv6(frame.time, payload, tuple(endpoints))
    return Packet(frame.time, Kind.OTHER, f"ethertype {ethertype:#06x}")


def _ipv4(time: float, ip: bytes, endpoints: tuple[Endpoint, ...]) -> Packet:
    if len(ip) < 20:
        return Packet(time, Kind.OTHER, "truncated IPv4 header")
    header = (ip[0] & 0x0F) * 4
    proto = ip[9]
    src = ipaddress.IPv4Address(ip[12:16])
    dst = ipaddress.IPv4Address(ip[16:20])
    return _transport(time, src, dst, proto, ip[header:], endpoints, hop_limit=ip[8])


def _ipv6(time: float, ip: bytes, endpoints: tuple[Endpoint, ...]) -> Packet:
    if len(ip) < 40:
        return Packet(time, Kind.OTHER, "truncated IPv6 header")
    proto = ip[6]
    hop_limit = ip[7]
    src = ipaddress.IPv6Address(ip[8:24])
    dst = ipaddress.IPv6Address(ip[24:40])
    rest = ip[40:]
    while proto in IPV6_EXTENSION_HEADERS and len(rest) >= 8:
        proto, length = rest[0], (rest[1] + 1) * 8
        rest = rest[length:]
    return _transport(time, src, dst, proto, rest, endpoints, hop_limit=hop_limit)


def _transport(  # noqa: PLR0917 - the header fields of one IP packet
    time: float,
    src: IPAddress,
    dst: IPAddress,
    proto: int,
    segment: bytes,
    endpoints: tuple[Endpoint, ...],
    *,
    hop_limit: int,
) -> Packet:
    ports = struct.unpack_from("!HH", segment) if proto in (IPPROTO_TCP, IPPROTO_UDP) and len(segment) >= 4 else None
    where = f"{src} -> {dst}"
    packet = _Maker(time, src.version)
    if ports is not None:
        sport, dport = ports
        protocol = Transport.TCP if proto == IPPROTO_TCP else Transport.UDP
        where = f"{protocol} {_host(src)}:{sport} -> {_host(dst)}:{dport}"
        if Endpoint(dst, dport, protocol) in endpoints:
            return Packet(time, Kind.ENDPOINT, where, src.version, segment[8:] if protocol is Transport.UDP else b"")
        return packet(_by_port(src, dst, protocol, sport, dport), where)
    if proto == IPPROTO_ICMPV6 and segment:
        icmp_type = segment[0]
        where = f"icmpv6 type {icmp_type} {where} hlim {hop_limit}"
        if icmp_type in ICMPV6_ND and hop_limit == 255:
            return packet(Kind.NDP, where)
        if icmp_type in ICMPV6_MLD_REPORT and hop_limit == 1 and dst in MULTICAST_LINK_V6:
            return packet(Kind.MLD, where)
        return packet(Kind.ICMP, where)
    if proto == IPPROTO_ICMP:
        return packet(Kind.ICMP, f"icmp type {segment[0] if segment else '?'} {where}")
    if proto == IPPROTO_IGMP:
        return packet(Kind.OTHER, f"igmp {where}")
    return packet(Kind.OTHER, f"ip proto {proto} {where}")


@dataclass(frozen=True)
class _Maker:
    time: float
    version: int

    def __call__(self, kind: Kind, summary: str) -> Packet:
        return Packet(self.time, kind, summary, self.version)


def _by_port(src: IPAddress, dst: IPAddress, protocol: Transport, sport: int, dport: int) -> Kind:
    if protocol is Transport.UDP and (sport, dport) == (68, 67) and src.version == 4:
        return Kind.DHCP
    if (
        protocol is Transport.UDP
        and (sport, dport) == (546, 547)
        and src in LINK_LOCAL_V6
        and (dst in LINK_LOCAL_V6 or dst == ipaddress.IPv6Address("ff02::1:2"))
    ):
        return Kind.DHCPV6
    if dport in (53, 853, 5353, 5355):
        return Kind.DNS
    if protocol is Transport.UDP and dport == 123:
        return Kind.NTP
    if dport in (3478, 5349, 19302):
        return Kind.STUN
    return Kind.TCP if protocol is Transport.TCP else Kind.UDP


def _host(address: IPAddress) -> str:
    return f"[{address}]" if address.version == 6 else str(address)


@dataclass(frozen=True)
class Capture:
    """Everything the guest sent, classified, with times relative to power-on."""

    packets: tuple[Packet, ...]
    inbound: int
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def leaks(self) -> tuple[Packet, ...]:
        return tuple(p for p in self.packets if not p.kind.allowed)

    @property
    def first_packet(self) -> float | None:
        return self.packets[0].time if self.packets else None

    @property
    def first_leak(self) -> float | None:
        return self.leaks[0].time if self.leaks else None

    def count(self, kind: Kind) -> int:
        return self.counts.get(kind.value, 0)

    @property
    def uptime_offset(self) -> float | None:
        """Seconds from power-on to the guest kernel's uptime zero, from the
        endpoint probes, which carry the uptime they were sent at. The smallest
        difference is the probe sent soonest after it read the clock."""
        offsets = [p.time - u for p in self.packets if (u := probe_uptime(p)) is not None]
        return round(min(offsets), 3) if offsets else None

    def as_uptime(self, time: float | None) -> float | None:
        offset = self.uptime_offset
        return None if time is None or offset is None else round(time - offset, 3)


PROBE_UPTIME = re.compile(rb"earlyfw-qemu endpoint probe uptime=(\d+\.\d+)")


def probe_uptime(packet: Packet) -> float | None:
    m = PROBE_UPTIME.search(packet.payload) if packet.kind is Kind.ENDPOINT else None
    return float(m.group(1)) if m else None


def analyse(path: Path, endpoints: Iterable[Endpoint], *, epoch: float = 0.0) -> Capture:
    """Classify every frame the guest sent; `epoch` is subtracted from QEMU's
    time stamps so times count from power-on."""
    frames = read(path)
    ends = tuple(endpoints)
    mine = list(outbound(frames))
    packets = tuple(
        Packet(round(p.time - epoch, 6), p.kind, p.summary, p.version, p.payload)
        for p in (classify(f, ends) for f in mine)
    )
    counts = Counter(p.kind.value for p in packets)
    return Capture(packets, inbound=len(frames) - len(mine), counts=dict(sorted(counts.items())))
