"""Read QEMU's filter-dump capture and sort every frame the guest sent into a
class: the few a kill switch must let out (DHCP, ARP and its IPv6 counterparts,
the VPN endpoint) and everything else, which is a leak.

The pcap format is a 24-byte file header and a 16-byte header per record, so a
reader is a few lines; no third-party dissector is needed or trusted here.
`dissect` is the one reading of an Ethernet frame's headers, for the QEMU
proofs and for the netns tests' captures (tests/netns.py) alike.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import cached_property
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
class Headers:
    """What one Ethernet frame says in its link, IP and transport headers."""

    ethertype: int
    src_mac: bytes
    dst_mac: bytes
    src: IPAddress | None = None  # None: not IP, or its header is cut short
    dst: IPAddress | None = None
    proto: int | None = None  # IP protocol number (after IPv6 extension headers)
    hop_limit: int | None = None
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None
    tcp_flags: int | None = None
    payload: bytes = b""  # what follows the TCP, UDP or ICMP header


def dissect(data: bytes) -> Headers:
    """The headers of a frame of at least an Ethernet header's 14 bytes;
    fields a short packet lacks stay None."""
    if len(data) < 14:
        raise ValueError(f"runt frame of {len(data)} bytes")
    (ethertype,) = struct.unpack_from("!H", data, 12)
    link = Headers(ethertype, src_mac=data[6:12], dst_mac=data[:6])
    ip = data[14:]
    if ethertype == ETH_IPV4 and len(ip) >= 20:
        proto, segment = ip[9], ip[(ip[0] & 0x0F) * 4 :]
        src: IPAddress = ipaddress.IPv4Address(ip[12:16])
        dst: IPAddress = ipaddress.IPv4Address(ip[16:20])
        hop_limit = ip[8]
    elif ethertype == ETH_IPV6 and len(ip) >= 40:
        proto, segment = ip[6], ip[40:]
        while proto in IPV6_EXTENSION_HEADERS and len(segment) >= 8:
            proto, segment = segment[0], segment[(segment[1] + 1) * 8 :]
        src, dst, hop_limit = ipaddress.IPv6Address(ip[8:24]), ipaddress.IPv6Address(ip[24:40]), ip[7]
    else:
        return link
    headers = replace(link, src=src, dst=dst, proto=proto, hop_limit=hop_limit)
    if proto in (IPPROTO_TCP, IPPROTO_UDP) and len(segment) >= 4:
        sport, dport = struct.unpack_from("!HH", segment)
        if proto == IPPROTO_TCP and len(segment) >= 20:
            return replace(
                headers, sport=sport, dport=dport, tcp_flags=segment[13], payload=segment[(segment[12] >> 4) * 4 :]
            )
        return replace(headers, sport=sport, dport=dport, payload=segment[8:])
    if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6) and segment:
        return replace(headers, icmp_type=segment[0], payload=segment[4:])
    return headers


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
    if len(frame.data) < 14:
        return Packet(frame.time, Kind.OTHER, f"runt frame of {len(frame.data)} bytes")
    headers = dissect(frame.data)
    if headers.ethertype == ETH_ARP:
        return Packet(frame.time, Kind.ARP, "arp")
    if headers.ethertype not in (ETH_IPV4, ETH_IPV6):
        return Packet(frame.time, Kind.OTHER, f"ethertype {headers.ethertype:#06x}")
    return _ip(frame.time, headers, tuple(endpoints))


def _ip(time: float, headers: Headers, endpoints: tuple[Endpoint, ...]) -> Packet:
    src, dst, proto, hop_limit = headers.src, headers.dst, headers.proto, headers.hop_limit
    if src is None or dst is None or proto is None or hop_limit is None:
        version = 4 if headers.ethertype == ETH_IPV4 else 6
        return Packet(time, Kind.OTHER, f"truncated IPv{version} header")
    where = f"{src} -> {dst}"
    packet = _Maker(time, src.version)
    if headers.sport is not None and headers.dport is not None:
        sport, dport = headers.sport, headers.dport
        protocol = Transport.TCP if proto == IPPROTO_TCP else Transport.UDP
        where = f"{protocol} {_host(src)}:{sport} -> {_host(dst)}:{dport}"
        if Endpoint(dst, dport, protocol) in endpoints:
            payload = headers.payload if protocol is Transport.UDP else b""
            return Packet(time, Kind.ENDPOINT, where, src.version, payload)
        return packet(_by_port(src, dst, protocol, sport, dport), where)
    icmp_type = headers.icmp_type
    if proto == IPPROTO_ICMPV6 and icmp_type is not None:
        where = f"icmpv6 type {icmp_type} {where} hlim {hop_limit}"
        if icmp_type in ICMPV6_ND and hop_limit == 255:
            return packet(Kind.NDP, where)
        if icmp_type in ICMPV6_MLD_REPORT and hop_limit == 1 and dst in MULTICAST_LINK_V6:
            return packet(Kind.MLD, where)
        return packet(Kind.ICMP, where)
    if proto == IPPROTO_ICMP:
        return packet(Kind.ICMP, f"icmp type {'?' if icmp_type is None else icmp_type} {where}")
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

    def until(self, time: float) -> Capture:
        """What the guest sent up to `time` (seconds from power-on): one
        window of a run that goes on past it. `inbound` stays the whole run's."""
        packets = tuple(p for p in self.packets if p.time <= time)
        counts = Counter(p.kind.value for p in packets)
        return Capture(packets, self.inbound, dict(sorted(counts.items())))

    @cached_property
    def uptime_offset(self) -> float | None:
        """Seconds from power-on to the guest kernel's uptime zero, from the
        endpoint probes, which carry the uptime they were sent at. The smallest
        difference is the probe sent soonest after it read the clock. (Once:
        as_uptime asks for it per packet, and a long run has tens of thousands.)"""
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
