"""Real packets through earlyfw's Linux policy, in network namespaces.

A `client` namespace runs the rendered ruleset; one veth connects it to
`world`, which owns every remote address: router, DHCP server (dnsmasq),
public resolvers, the VPN endpoints and random internet hosts. A packet socket
on world's end of the veth records what actually left the client.

Every probe runs in four modes: with no ruleset (the control: the probe must
arrive, which proves the probe and the capture work), in the blocked state, in
the blocked state with `[lan] allow = true`, and in the initramfs state (the
stateless, nf_tables-only ruleset loaded before udev) with a Tang server in
`[initramfs] allow`. Each (probe, mode) pair is its
own test case, so a report names exactly which traffic leaked or was lost.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import pytest
from qemu.pcap import ETH_ARP

from earlyfw import config as configuration
from earlyfw import policy
from earlyfw.linux import nft
from earlyfw.policy import State
from tests import netns
from tests.conftest import require
from tests.netns import (
    CLIENT_LL,
    CLIENT_V4,
    CLIENT_V6,
    WORLD_LAN_V4,
    WORLD_LL,
    WORLD_V6,
    Frame,
    IPAddress,
)

pytestmark = pytest.mark.netns


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


ENDPOINT_V4 = ip("198.51.100.7")
ENDPOINT_V6 = ip("2001:db8::7")
ENDPOINT_PORT = 51820
ENDPOINT_TCP = ip("203.0.113.8")  # an OpenVPN-over-TCP style endpoint
ENDPOINT_TCP_PORT = 443
# Reached through world's global address, as a static server config would
# ("gateway 2001:db8:1::1"): the neighbour to resolve has a global address.
ENDPOINT_V6_GW = ip("2001:db8::8")
HOST_V4 = ip("203.0.113.5")
HOST2_V4 = ip("198.51.100.20")
HOST_V6 = ip("2001:db8:99::5")
RESOLVER_V4 = ip("203.0.113.53")
RESOLVER_V6 = ip("2001:db8:53::53")
VPN_DNS = ip("10.64.0.1")  # the VPN's resolver: only ever reachable through the tunnel
# An [initramfs] allow host (a Tang server unlocking the root disk): reachable
# from inside the initramfs only.
TANG_V4 = ip("203.0.113.80")
TANG_V6 = ip("2001:db8:80::80")
TANG_PORT = 7500

WORLD_HOSTS = (
    ENDPOINT_V4,
    ENDPOINT_V6,
    ENDPOINT_TCP,
    ENDPOINT_V6_GW,
    HOST_V4,
    HOST2_V4,
    HOST_V6,
    RESOLVER_V4,
    RESOLVER_V6,
    VPN_DNS,
    TANG_V4,
    TANG_V6,
)

MDNS_V4, MDNS_V6 = ip("224.0.0.251"), ip("ff02::fb")
LLMNR_V4, LLMNR_V6 = ip("224.0.0.252"), ip("ff02::1:3")
SSDP_V4 = ip("239.255.255.250")
DHCPV6_SERVERS = ip("ff02::1:2")

MARK = b"earlyfw-probe:"


def config_text(*, lan: bool, egress: tuple[str, ...] = (), initramfs: bool = False) -> str:
    endpoints = "".join(
        f'[[endpoint]]\naddress = "{a}"\nport = {p}\nprotocol = "{proto}"\n'
        for a, p, proto in (
            (ENDPOINT_V4, ENDPOINT_PORT, "udp"),
            (ENDPOINT_V6, ENDPOINT_PORT, "udp"),
            (ENDPOINT_TCP, ENDPOINT_TCP_PORT, "tcp"),
            (ENDPOINT_V6_GW, ENDPOINT_PORT, "udp"),
        )
    )
    egress_table = f"[egress]\ninterfaces = {json.dumps(list(egress))}\n" if egress else ""
    if initramfs:
        egress_table += "".join(
            f'[[initramfs.allow]]\naddress = "{a}"\nport = {TANG_PORT}\nprotocol = "tcp"\n' for a in (TANG_V4, TANG_V6)
        )
    return (
        '[tunnel]\nkind = "wireguard"\ninterface = "wg0"\n'
        + endpoints
        + f'[dns]\nservers = ["{VPN_DNS}"]\n[lan]\nallow = {str(lan).lower()}\n'
        + egress_table
    )


class Mode(StrEnum):
    CONTROL = "control"  # no ruleset at all
    BLOCKED = "blocked"
    LAN = "lan-allow"  # blocked, with [lan] allow = true
    INITRAMFS = "initramfs"  # the initramfs state, with [initramfs] allow

    @property
    def state(self) -> State:
        return State.INITRAMFS if self is Mode.INITRAMFS else State.BLOCKED


# --- the lab -------------------------------------------------------------------


@dataclass
class Outcome:
    """What the sender saw: the error its socket call raised, and for
    exchanges (DHCP, neighbour discovery) whether the answer came back."""

    error: str | None = None
    reply: bool | None = None

    def __str__(self) -> str:
        parts = [f"error={self.error}" if self.error else "sent"]
        if self.reply is not None:
            parts.append("answered" if self.reply else "unanswered")
        return ", ".join(parts)


@dataclass
class PolicyLab:
    pair: netns.ClientWorld
    capture: netns.Capture
    configs: dict[Mode, configuration.Config]
    config_files: dict[Mode, Path]
    client_mac: bytes
    world_mac: bytes
    sentinels: int = 0

    @property
    def client(self) -> netns.Namespace:
        return self.pair.client

    @property
    def world(self) -> netns.Namespace:
        return self.pair.world

    def use(self, mode: Mode) -> None:
        """Put the client's firewall in `mode`, from scratch."""
        self.unload()
        if mode is not Mode.CONTROL:
            self.client.nft(policy.render(self.configs[mode], mode.state))

    def unload(self) -> None:
        tables = self.client.exec(["nft", "list", "tables"])
        if f"table inet {policy.TABLE}" in tables:
            self.client.exec(["nft", "delete", "table", "inet", policy.TABLE])

    def settle(self, family: int) -> None:
        """Wait until everything the client sent so far has crossed the veth: a
        sentinel (allowed in every mode) sent now arrives after anything sent
        before it on the same path."""
        self.sentinels += 1
        marker = b"earlyfw-sentinel:%d" % self.sentinels
        start = len(self.capture.frames)
        send_udp(self, ENDPOINT_V4 if family == 4 else ENDPOINT_V6, ENDPOINT_PORT, marker)
        if self.capture.wait_for(lambda f: f.incoming and f.payload == marker, 3, start=start) is None:
            raise AssertionError(f"lab broken: the IPv{family} sentinel to the endpoint never reached world")
        self.capture.poll(0.1)

    def cli(self, mode: Mode, *args: str) -> str:
        return self.client.exec(
            [sys.executable, "-m", "earlyfw", "-q", "--config", str(self.config_files[mode]), *args]
        )

    def status(self, mode: Mode) -> dict[str, object]:
        result = self.client.exec_result(
            [sys.executable, "-m", "earlyfw", "-q", "--config", str(self.config_files[mode]), "status", "--json"]
        )
        assert result.returncode in (0, 3), result.stderr
        data: dict[str, object] = json.loads(result.stdout)
        return data


def start_dnsmasq(lab: netns.Lab, pair: netns.ClientWorld, workdir: Path) -> None:
    """A real DHCPv4 server on world's side of the link (DNS disabled: the
    resolvers only need to exist as addresses, the capture shows arrival)."""
    lab.spawn(
        pair.world,
        [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--port=0",
            f"--interface={pair.world_if}",
            "--bind-interfaces",
            "--dhcp-range=192.0.2.100,192.0.2.150,255.255.255.0,10m",
            f"--dhcp-leasefile={workdir / 'leases'}",
            f"--pid-file={workdir / 'dnsmasq.pid'}",
            "--no-ping",
            "--user=root",
        ],
    )
    netns.wait_until(
        lambda: ":67 " in pair.world.exec(["ss", "-Hlun"]), 5, "dnsmasq to listen on port 67 in the world netns"
    )


@pytest.fixture(scope="module")
def policy_lab(module_lab: netns.Lab, tmp_path_factory: pytest.TempPathFactory) -> PolicyLab:
    require("dnsmasq", "ss")
    workdir = tmp_path_factory.mktemp("policy")
    pair = netns.client_world(module_lab, WORLD_HOSTS)
    pair.client.ip("route", "add", f"{ENDPOINT_V6_GW}/128", "via", str(WORLD_V6), "dev", pair.client_if)
    start_dnsmasq(module_lab, pair, workdir)
    files = {}
    configs = {}
    for mode in (Mode.BLOCKED, Mode.LAN, Mode.INITRAMFS):
        files[mode] = workdir / f"{mode}.toml"
        files[mode].write_text(config_text(lan=mode is Mode.LAN, initramfs=mode is Mode.INITRAMFS))
        configs[mode] = configuration.load(files[mode])
    capture = pair.capture()
    module_lab.callback(capture.close)
    return PolicyLab(pair, capture, configs, files, pair.client.mac(pair.client_if), pair.world.mac(pair.world_if))


# --- senders -------------------------------------------------------------------

Sender = Callable[[PolicyLab], Outcome]
Matcher = Callable[[Frame], bool]


def family_of(address: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


def sockaddr(lab: PolicyLab, address: IPAddress, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    if address.version == 4:
        return (str(address), port)
    scoped = address.is_link_local or address.is_multicast
    return (str(address), port, 0, lab.pair.client_ifindex() if scoped else 0)


def errname(e: OSError) -> str:
    if isinstance(e, TimeoutError) and e.errno is None:
        return "timed out"
    return f"{type(e).__name__}({e.errno}, {e.strerror})"


def send_udp(lab: PolicyLab, dst: IPAddress, port: int, payload: bytes, *, sport: int = 0) -> Outcome:
    with lab.client.socket(family_of(dst), socket.SOCK_DGRAM) as s:
        if dst.is_multicast and dst.version == 4:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, CLIENT_V4.packed)
        elif dst.is_multicast:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, lab.pair.client_ifindex())
        if sport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", sport) if dst.version == 4 else ("::", sport, 0, 0))  # noqa: S104 - inside the netns
        try:
            s.sendto(payload, sockaddr(lab, dst, port))
        except OSError as e:
            return Outcome(error=errname(e))
    return Outcome()


def udp(dst: IPAddress, port: int, name: str, *, sport: int = 0) -> tuple[Sender, Matcher]:
    payload = MARK + name.encode()

    def send(lab: PolicyLab) -> Outcome:
        return send_udp(lab, dst, port, payload, sport=sport)

    def matches(f: Frame) -> bool:
        return f.incoming and f.proto == 17 and f.dst == dst and f.dport == port and f.payload == payload

    return send, matches


def tcp(dst: IPAddress, port: int) -> tuple[Sender, Matcher]:
    def send(lab: PolicyLab) -> Outcome:
        with lab.client.socket(family_of(dst), socket.SOCK_STREAM) as s:
            s.setblocking(False)
            # A non-blocking connect puts the SYN on the wire before returning.
            code = s.connect_ex(sockaddr(lab, dst, port))
        return Outcome(error=None if code in (0, 115) else os.strerror(code))

    def matches(f: Frame) -> bool:
        return f.incoming and f.proto == 6 and f.dst == dst and f.dport == port and f.tcp_flags == 0x02

    return send, matches


def tcp_exchange(dst: IPAddress, port: int) -> tuple[Sender, Matcher]:
    """A whole TCP handshake attempt: world has no listener, so its kernel
    answers the SYN with a RST, and the answer counts as a reply. In the
    initramfs state the answer gets in only by its source address and port,
    there being no conntrack."""

    def send(lab: PolicyLab) -> Outcome:
        with lab.client.socket(family_of(dst), socket.SOCK_STREAM) as s:
            s.settimeout(2)
            try:
                s.connect(sockaddr(lab, dst, port))
            except ConnectionRefusedError:
                return Outcome(error="ECONNREFUSED", reply=True)
            except OSError as e:
                return Outcome(error=errname(e), reply=False)
        return Outcome(reply=True)

    return send, tcp(dst, port)[1]


def icmp_echo(dst: IPAddress, name: str) -> tuple[Sender, Matcher]:
    payload = MARK + name.encode()
    request = 8 if dst.version == 4 else 128

    def send(lab: PolicyLab) -> Outcome:
        proto = socket.IPPROTO_ICMP if dst.version == 4 else socket.IPPROTO_ICMPV6
        message = struct.pack("!BBHHH", request, 0, 0, 0x4546, 1) + payload
        if dst.version == 4:  # the kernel checksums ICMPv6 only
            message = message[:2] + struct.pack("!H", netns.checksum(message)) + message[4:]
        with lab.client.socket(family_of(dst), socket.SOCK_RAW, proto) as s:
            try:
                s.sendto(message, sockaddr(lab, dst, 0))
            except OSError as e:
                return Outcome(error=errname(e))
        return Outcome()

    def matches(f: Frame) -> bool:
        return f.incoming and f.dst == dst and f.icmp_type == request and f.payload[4:] == payload

    return send, matches


def bootp(xid: int, mac: bytes, options: list[tuple[int, bytes]]) -> bytes:
    header = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, *(b"\0" * 4,) * 4, mac, b"", b"")
    body = b"".join(bytes([code, len(value)]) + value for code, value in options)
    return header + b"\x63\x82\x53\x63" + body + b"\xff"


def dhcp_reply(data: bytes, xid: int) -> tuple[int, bytes, bytes] | None:
    """(message type, yiaddr, server id) of a reply to `xid`, or None."""
    if len(data) < 240 or struct.unpack("!I", data[4:8])[0] != xid:
        return None
    options, i, kind, server = data[240:], 0, 0, b""
    while i + 1 < len(options) and options[i] != 255:
        code, length = options[i], options[i + 1]
        value = options[i + 2 : i + 2 + length]
        if code == 53:
            kind = value[0]
        elif code == 54:
            server = value
        i += 2 + length
    return kind, data[16:20], server


def dhcp_exchange(lab: PolicyLab) -> Outcome:
    """DISCOVER, OFFER, REQUEST, ACK with dnsmasq, over a UDP socket on port 68
    (what a renewing client uses; discovery over packet sockets is covered by
    the egress test)."""
    xid = secrets.randbits(32)
    with lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, lab.pair.client_if.encode())
        s.bind(("0.0.0.0", 68))  # noqa: S104 - a DHCP client, inside the netns
        s.settimeout(0.2)

        def ask(options: list[tuple[int, bytes]], want: int) -> tuple[int, bytes, bytes] | None:
            deadline = time.monotonic() + 3
            s.sendto(bootp(xid, lab.client_mac, options), ("255.255.255.255", 67))
            while time.monotonic() < deadline:
                try:
                    reply = dhcp_reply(s.recv(2048), xid)
                except TimeoutError:
                    continue
                if reply and reply[0] == want:
                    return reply
            return None

        try:
            offer = ask([(53, b"\x01")], 2)
            if offer is None:
                return Outcome(reply=False)
            ack = ask([(53, b"\x03"), (50, offer[1]), (54, offer[2])], 5)
        except OSError as e:
            return Outcome(error=errname(e), reply=False)
    return Outcome(reply=ack is not None)


def dhcp() -> tuple[Sender, Matcher]:
    def matches(f: Frame) -> bool:
        return f.incoming and f.src == CLIENT_V4 and f.sport == 68 and f.dport == 67

    return dhcp_exchange, matches


def neighbour_discovery(
    src: ipaddress.IPv6Address, target: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, *, from_world: bool = False
) -> tuple[Sender, Matcher]:
    """One NS sent by hand (hop limit 255, as RFC 4861 requires) and the NA it
    must draw. From the client, arrival is the NS at world; from world, it is
    the client's NA."""

    def send(lab: PolicyLab) -> Outcome:
        ns = lab.world if from_world else lab.client
        ifindex = lab.pair.world_ifindex() if from_world else lab.pair.client_ifindex()
        mac = lab.world_mac if from_world else lab.client_mac
        with ns.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
            s.bind((str(src), 0, 0, ifindex))
            try:
                s.sendto(netns.neighbor_solicitation(target, mac), (str(dst), 0, 0, ifindex))
            except OSError as e:
                return Outcome(error=errname(e), reply=False)
            deadline = time.monotonic() + 1
            while (left := deadline - time.monotonic()) > 0:
                if select.select([s], [], [], left)[0] and netns.is_neighbor_advert(s.recv(2048), target):
                    return Outcome(reply=True)
        return Outcome(reply=False)

    def matches(f: Frame) -> bool:
        if not f.incoming or f.proto != 58 or f.payload[4:20] != target.packed:
            return False
        return f.icmp_type == 136 if from_world else (f.icmp_type == 135 and f.src == src)

    return send, matches


def endpoint_via_global_gateway() -> tuple[Sender, Matcher]:
    """The kernel's own neighbour discovery for a global next hop: forget the
    neighbour, then send to an endpoint routed via 2001:db8:1::1."""
    send_packet, matches = udp(ENDPOINT_V6_GW, ENDPOINT_PORT, "endpoint-v6-global-gateway")

    def send(lab: PolicyLab) -> Outcome:
        lab.client.ip("-6", "neigh", "flush", "dev", lab.pair.client_if, "to", str(WORLD_V6))
        lab.world.ip("-6", "neigh", "flush", "dev", lab.pair.world_if, "to", str(CLIENT_V6))
        start = lab.capture.mark()
        outcome = send_packet(lab)
        # The datagram waits for the neighbour, so the sentinel could overtake it.
        lab.capture.wait_for(matches, 2, start=start)
        return outcome

    return send, matches


# --- the probes ----------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    name: str
    family: int
    sender: tuple[Sender, Matcher]
    passes: frozenset[Mode] = field(default_factory=frozenset)  # besides CONTROL
    exchange: bool = False  # an answer must come back too (DHCP, ND)

    def send(self, lab: PolicyLab) -> Outcome:
        return self.sender[0](lab)

    def matches(self, frame: Frame) -> bool:
        return self.sender[1](frame)

    def must_arrive(self, mode: Mode) -> bool:
        return mode is Mode.CONTROL or mode in self.passes


EARLY = frozenset({Mode.BLOCKED, Mode.LAN, Mode.INITRAMFS})  # what blocked lets through
LAN = frozenset({Mode.LAN})
INITRAMFS = frozenset({Mode.INITRAMFS})

PROBES = (
    # Allowed before the tunnel: the endpoints exactly as configured, DHCP, ND.
    Probe("endpoint-v4-udp", 4, udp(ENDPOINT_V4, ENDPOINT_PORT, "endpoint-v4-udp"), EARLY),
    Probe("endpoint-v6-udp", 6, udp(ENDPOINT_V6, ENDPOINT_PORT, "endpoint-v6-udp"), EARLY),
    Probe("endpoint-v4-tcp", 4, tcp(ENDPOINT_TCP, ENDPOINT_TCP_PORT), EARLY),
    Probe("endpoint-v6-global-gateway", 6, endpoint_via_global_gateway(), EARLY),
    Probe("dhcpv4-exchange", 4, dhcp(), EARLY, exchange=True),
    Probe("dhcpv6-solicit", 6, udp(DHCPV6_SERVERS, 547, "dhcpv6-solicit", sport=546), EARLY),
    Probe(
        "nd-linklocal",
        6,
        neighbour_discovery(CLIENT_LL, WORLD_LL, netns.solicited_node(WORLD_LL)),
        EARLY,
        exchange=True,
    ),
    Probe(
        "nd-global-multicast",
        6,
        neighbour_discovery(CLIENT_V6, WORLD_V6, netns.solicited_node(WORLD_V6)),
        EARLY,
        exchange=True,
    ),
    Probe("nd-global-unicast", 6, neighbour_discovery(CLIENT_V6, WORLD_V6, WORLD_V6), EARLY, exchange=True),
    Probe(
        "nd-from-world-linklocal",
        6,
        neighbour_discovery(WORLD_LL, CLIENT_V6, netns.solicited_node(CLIENT_V6), from_world=True),
        EARLY,
        exchange=True,
    ),
    Probe(
        "nd-from-world-global",
        6,
        neighbour_discovery(WORLD_V6, CLIENT_V6, netns.solicited_node(CLIENT_V6), from_world=True),
        EARLY,
        exchange=True,
    ),
    # [initramfs] allow hosts: from the initramfs only, and only as configured.
    Probe("initramfs-host-v4-tcp", 4, tcp_exchange(TANG_V4, TANG_PORT), INITRAMFS, exchange=True),
    Probe("initramfs-host-v6-tcp", 6, tcp_exchange(TANG_V6, TANG_PORT), INITRAMFS, exchange=True),
    Probe("initramfs-host-v4-wrong-port", 4, tcp(TANG_V4, TANG_PORT + 1)),
    Probe("initramfs-host-v4-udp", 4, udp(TANG_V4, TANG_PORT, "initramfs-host-v4-udp")),
    # The endpoints any other way.
    Probe("endpoint-v4-wrong-port", 4, udp(ENDPOINT_V4, ENDPOINT_PORT + 1, "endpoint-v4-wrong-port")),
    Probe("endpoint-v6-wrong-port", 6, udp(ENDPOINT_V6, ENDPOINT_PORT + 1, "endpoint-v6-wrong-port")),
    Probe("endpoint-v4-wrong-protocol", 4, tcp(ENDPOINT_V4, ENDPOINT_PORT)),
    Probe("endpoint-v6-wrong-protocol", 6, tcp(ENDPOINT_V6, ENDPOINT_PORT)),
    Probe("endpoint-tcp-as-udp", 4, udp(ENDPOINT_TCP, ENDPOINT_TCP_PORT, "endpoint-tcp-as-udp")),
    Probe("endpoint-v4-ping", 4, icmp_echo(ENDPOINT_V4, "endpoint-v4-ping")),
    Probe("endpoint-v6-ping", 6, icmp_echo(ENDPOINT_V6, "endpoint-v6-ping")),
    # Random internet hosts.
    Probe("host-v4-udp", 4, udp(HOST_V4, 9999, "host-v4-udp")),
    Probe("host-v4-tcp", 4, tcp(HOST2_V4, 80)),
    Probe("host-v4-ping", 4, icmp_echo(HOST_V4, "host-v4-ping")),
    Probe("host-v6-udp", 6, udp(HOST_V6, 9999, "host-v6-udp")),
    Probe("host-v6-tcp", 6, tcp(HOST_V6, 80)),
    Probe("host-v6-ping", 6, icmp_echo(HOST_V6, "host-v6-ping")),
    Probe("stun-v4", 4, udp(HOST_V4, 3478, "stun-v4")),
    Probe("stun-v6", 6, udp(HOST_V6, 3478, "stun-v6")),
    Probe("ntp-v4", 4, udp(HOST2_V4, 123, "ntp-v4")),
    Probe("ntp-v6", 6, udp(HOST_V6, 123, "ntp-v6")),
    Probe("quic-v4", 4, udp(HOST_V4, 443, "quic-v4")),
    Probe("quic-v6", 6, udp(HOST_V6, 443, "quic-v6")),
    # DNS anywhere but through the tunnel.
    Probe("dns-udp-v4", 4, udp(RESOLVER_V4, 53, "dns-udp-v4")),
    Probe("dns-tcp-v4", 4, tcp(RESOLVER_V4, 53)),
    Probe("dns-udp-v6", 6, udp(RESOLVER_V6, 53, "dns-udp-v6")),
    Probe("dns-tcp-v6", 6, tcp(RESOLVER_V6, 53)),
    Probe("dot-v4", 4, tcp(RESOLVER_V4, 853)),
    Probe("dot-v6", 6, tcp(RESOLVER_V6, 853)),
    Probe("doq-v4", 4, udp(RESOLVER_V4, 853, "doq-v4")),
    Probe("dns-vpn-resolver-outside-tunnel", 4, udp(VPN_DNS, 53, "dns-vpn-resolver-outside-tunnel")),
    # LAN discovery: only with [lan] allow.
    Probe("mdns-v4", 4, udp(MDNS_V4, 5353, "mdns-v4", sport=5353), LAN),
    Probe("mdns-v6", 6, udp(MDNS_V6, 5353, "mdns-v6", sport=5353), LAN),
    Probe("llmnr-v4", 4, udp(LLMNR_V4, 5355, "llmnr-v4"), LAN),
    Probe("llmnr-v6", 6, udp(LLMNR_V6, 5355, "llmnr-v6"), LAN),
    Probe("ssdp-v4", 4, udp(SSDP_V4, 1900, "ssdp-v4"), LAN),
    # LAN hosts: only with [lan] allow, and never their DNS.
    Probe("lan-v4-udp", 4, udp(WORLD_LAN_V4, 9999, "lan-v4-udp"), LAN),
    Probe("lan-v4-tcp", 4, tcp(WORLD_LAN_V4, 80), LAN),
    Probe("lan-v4-ping", 4, icmp_echo(WORLD_LAN_V4, "lan-v4-ping"), LAN),
    Probe("lan-v6-linklocal-udp", 6, udp(WORLD_LL, 9999, "lan-v6-linklocal-udp"), LAN),
    Probe("lan-v6-linklocal-ping", 6, icmp_echo(WORLD_LL, "lan-v6-linklocal-ping"), LAN),
    Probe("lan-dns-udp-v4", 4, udp(WORLD_LAN_V4, 53, "lan-dns-udp-v4")),
    Probe("lan-dns-tcp-v4", 4, tcp(WORLD_LAN_V4, 53)),
    Probe("lan-dot-v4", 4, tcp(WORLD_LAN_V4, 853)),
    Probe("lan-dns-udp-v6-linklocal", 6, udp(WORLD_LL, 53, "lan-dns-udp-v6-linklocal")),
)


def background(frame: Frame) -> bool:
    """What may always cross the link whatever the probes do: ARP, neighbour
    discovery and MLD (ICMPv6 130-136, 143) and DHCP client traffic."""
    if frame.ethertype == ETH_ARP:
        return True
    if frame.proto == 58 and frame.icmp_type in {130, 131, 132, 133, 134, 135, 136, 143}:
        return True
    return frame.proto == 17 and (frame.sport, frame.dport) in {(68, 67), (546, 547)}


def sentinel(frame: Frame) -> bool:
    return frame.payload.startswith(b"earlyfw-sentinel:")


# --- every probe, every mode ---------------------------------------------------


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.name)
def test_probe(policy_lab: PolicyLab, probe: Probe, mode: Mode) -> None:
    policy_lab.use(mode)
    start = policy_lab.capture.mark()
    outcome = probe.send(policy_lab)
    policy_lab.settle(probe.family)
    arrived = [f for f in policy_lab.capture.since(start) if probe.matches(f)]
    if probe.must_arrive(mode):
        assert arrived, f"{probe.name} did not reach world in mode {mode} ({outcome})"
        if probe.exchange:
            assert outcome.reply, f"{probe.name}: the answer did not come back in mode {mode} ({outcome})"
    else:
        assert not arrived, f"LEAK in mode {mode}: {probe.name} reached world: {netns.describe(arrived)} ({outcome})"


@pytest.mark.parametrize("mode", [Mode.BLOCKED, Mode.LAN, Mode.INITRAMFS])
def test_only_allowed_frames_leave(policy_lab: PolicyLab, mode: Mode) -> None:
    """All probes back to back under one capture: every frame that reached world
    is one the mode allows (or ARP/ND/DHCP), and every allowed probe got through."""
    policy_lab.use(mode)
    start = policy_lab.capture.mark()
    outcomes = {probe.name: probe.send(policy_lab) for probe in PROBES}
    policy_lab.settle(4)
    policy_lab.settle(6)
    policy_lab.capture.poll(0.5)
    frames = [f for f in policy_lab.capture.since(start) if f.incoming]
    allowed = [p for p in PROBES if p.must_arrive(mode)]
    unexpected = [f for f in frames if not (background(f) or sentinel(f) or any(p.matches(f) for p in allowed))]
    assert not unexpected, f"frames that should not have left the client: {netns.describe(unexpected)}"
    missing = [p.name for p in allowed if not any(p.matches(f) for f in frames)]
    assert not missing, f"allowed probes that did not arrive: {missing}"
    unanswered = [p.name for p in allowed if p.exchange and not outcomes[p.name].reply]
    assert not unanswered, f"exchanges that got no answer: {unanswered}"
    assert len(frames) > len(allowed)


# --- failing fast, and silence inbound -----------------------------------------


def timed_attempt(lab: PolicyLab, proto: str, dst: IPAddress, timeout: float) -> tuple[str, float]:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with lab.client.socket(family_of(dst), kind) as s:
        s.settimeout(timeout)
        begin = time.monotonic()
        try:
            if proto == "tcp":
                s.connect(sockaddr(lab, dst, 80))
            else:
                s.sendto(b"x", sockaddr(lab, dst, 9999))
        except OSError as e:
            return errname(e), time.monotonic() - begin
    return "no error", time.monotonic() - begin


@pytest.mark.parametrize("dst", [HOST_V4, HOST_V6], ids=["v4", "v6"])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_local_traffic_fails_fast(policy_lab: PolicyLab, proto: str, dst: IPAddress) -> None:
    """Refused local traffic errors out at once (reject, not drop), so programs
    do not hang until the tunnel is up. TCP over IPv6 needs one SYN
    retransmission (1 s): the first ICMPv6 error reaches the socket while
    connect() still holds it and only counts as a soft error."""
    policy_lab.use(Mode.BLOCKED)
    error, took = timed_attempt(policy_lab, proto, dst, 10)
    assert error != "no error" and "timed out" not in error, error
    assert took < 2.0, f"{proto} to {dst} took {took:.2f} s to fail ({error})"


@pytest.mark.parametrize("dst", [HOST_V4, HOST_V6], ids=["v4", "v6"])
def test_control_plain_drop_hangs(policy_lab: PolicyLab, dst: IPAddress) -> None:
    """The control for the test above: the same connect() under a drop-only
    policy just waits, so that test can tell rejecting from dropping."""
    policy_lab.use(Mode.CONTROL)
    policy_lab.client.nft("table inet efdrop {\n chain o { type filter hook output priority 0; policy drop; }\n}\n")
    try:
        error, took = timed_attempt(policy_lab, "tcp", dst, 2.5)
    finally:
        policy_lab.client.exec(["nft", "delete", "table", "inet", "efdrop"])
    assert "timed out" in error and took >= 2.4, (error, took)


@dataclass(frozen=True)
class Inbound:
    name: str
    proto: str
    dst: IPAddress


INBOUND = (
    Inbound("udp-v4", "udp", CLIENT_V4),
    Inbound("udp-v6", "udp", CLIENT_V6),
    Inbound("tcp-v4", "tcp", CLIENT_V4),
    Inbound("tcp-v6", "tcp", CLIENT_V6),
    Inbound("ping-v4", "icmp", CLIENT_V4),
    Inbound("ping-v6", "icmp", CLIENT_V6),
)


def unsolicited(lab: PolicyLab, probe: Inbound) -> bool:
    """Send `probe` from a world host to the client; True if it got in (the
    client's listener received it, the handshake completed, the ping was answered)."""
    family = family_of(probe.dst)
    address = sockaddr(lab, probe.dst, 0 if probe.proto == "icmp" else 5000)
    if probe.proto == "icmp":
        proto = socket.IPPROTO_ICMP if probe.dst.version == 4 else socket.IPPROTO_ICMPV6
        request, reply = (8, 0) if probe.dst.version == 4 else (128, 129)
        message = struct.pack("!BBHHH", request, 0, 0, 0x4547, 1) + MARK
        if probe.dst.version == 4:
            message = message[:2] + struct.pack("!H", netns.checksum(message)) + message[4:]
        with lab.world.socket(family, socket.SOCK_RAW, proto) as s:
            s.sendto(message, address)
            deadline = time.monotonic() + 0.5
            while (left := deadline - time.monotonic()) > 0:
                if select.select([s], [], [], left)[0]:
                    data = s.recv(2048)
                    data = data[(data[0] & 0x0F) * 4 :] if probe.dst.version == 4 else data
                    if data[0] == reply and data[8:] == MARK:
                        return True
        return False
    kind = socket.SOCK_STREAM if probe.proto == "tcp" else socket.SOCK_DGRAM
    with lab.client.socket(family, kind) as listener, lab.world.socket(family, kind) as s:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        if probe.proto == "udp":
            s.sendto(MARK, address)
            return bool(select.select([listener], [], [], 0.5)[0])
        listener.listen()
        s.settimeout(1)
        try:
            s.connect(address)
        except OSError:
            return False
        return True


@pytest.mark.parametrize("mode", [Mode.CONTROL, Mode.BLOCKED, Mode.INITRAMFS])
@pytest.mark.parametrize("probe", INBOUND, ids=lambda p: p.name)
def test_unsolicited_inbound_is_dropped_silently(policy_lab: PolicyLab, probe: Inbound, mode: Mode) -> None:
    policy_lab.use(mode)
    start = policy_lab.capture.mark()
    got_in = unsolicited(policy_lab, probe)
    answers = [
        f
        for f in policy_lab.capture.since(start)
        if f.incoming and f.src == probe.dst and not background(f) and not sentinel(f)
    ]
    if mode is Mode.CONTROL:
        assert got_in, f"control: {probe.name} from world did not reach the client"
    else:
        assert not got_in, f"{probe.name} from world reached the client in mode {mode}"
        assert not answers, f"the client answered an unsolicited {probe.name}: {netns.describe(answers)}"


# --- loading: atomic, idempotent, leaves other tables alone ---------------------


class Flood(threading.Thread):
    """Sends numbered UDP datagrams to a random host as fast as it can."""

    def __init__(self, sock: socket.socket, dst: tuple[str, int]) -> None:
        super().__init__(daemon=True)
        self.sock, self.dst = sock, dst
        self.seq = 0
        self.refused = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.seq += 1
            try:
                self.sock.sendto(b"earlyfw-leak:%d" % self.seq, self.dst)
            except OSError:
                self.refused += 1
            time.sleep(0.0005)


def leak_seq(frame: Frame) -> int | None:
    if frame.incoming and frame.payload.startswith(b"earlyfw-leak:"):
        return int(frame.payload.split(b":")[1])
    return None


def test_reloads_are_atomic_and_idempotent(policy_lab: PolicyLab) -> None:
    """A sender runs flat out while the ruleset is loaded, reloaded, and swapped
    blocked -> relaxed -> blocked, 30 times. Before the first load its datagrams
    arrive (control); after, not one does, and the reloaded table is identical."""
    lab = policy_lab
    lab.use(Mode.CONTROL)
    config = lab.configs[Mode.BLOCKED]
    start = lab.capture.mark()
    sender = Flood(lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM), (str(HOST_V4), 7777))
    sender.start()
    try:
        assert lab.capture.wait_for(lambda f: leak_seq(f) is not None, 3, start=start), "control: no datagram arrived"
        lab.client.nft(policy.render(config, State.BLOCKED))
        boundary = sender.seq  # every datagram numbered above this was sent after the load returned
        first = lab.client.exec(["nft", "-s", "list", "table", "inet", policy.TABLE])
        for _ in range(10):
            lab.client.nft(policy.render(config, State.BLOCKED))
            lab.client.nft(policy.render(config, State.RELAXED))
            lab.client.nft(policy.render(config, State.BLOCKED))
        last = lab.client.exec(["nft", "-s", "list", "table", "inet", policy.TABLE])
        refused_before_stop, seq_before_stop = sender.refused, sender.seq
    finally:
        sender.stop.set()
        sender.join()
        sender.sock.close()
    lab.settle(4)
    seqs = [s for f in lab.capture.since(start) if (s := leak_seq(f)) is not None]
    leaked = [s for s in seqs if s > boundary]
    assert seqs and min(seqs) <= boundary, "control: the sender's datagrams did not arrive before the load"
    assert not leaked, f"{len(leaked)} datagrams leaked during reloads (first: #{leaked[0]})"
    assert seq_before_stop - boundary > 100 and refused_before_stop > 100, "the sender was not running during reloads"
    assert first == last, "reloading changed the table"
    tables = lab.client.exec(["nft", "list", "tables"]).split("\n")
    assert tables.count(f"table inet {policy.TABLE}") == 1


def test_other_tables_are_left_alone(policy_lab: PolicyLab) -> None:
    """A pre-existing `table inet other` survives a load unchanged, and its
    accept-everything chain cannot open what earlyfw refuses."""
    lab = policy_lab
    lab.use(Mode.CONTROL)
    lab.client.nft(
        "table inet other {\n"
        "  chain out { type filter hook output priority -10; policy accept; counter accept; }\n"
        "  set keep { type ipv4_addr; elements = { 192.0.2.77 } }\n"
        "}\n"
    )
    try:
        before = lab.client.exec(["nft", "-s", "list", "table", "inet", "other"])
        send, matches = udp(HOST_V4, 9999, "other-table")
        start = lab.capture.mark()
        send(lab)
        lab.settle(4)
        assert any(matches(f) for f in lab.capture.since(start)), "control: probe did not arrive"

        lab.client.nft(policy.render(lab.configs[Mode.BLOCKED], State.BLOCKED))
        lab.client.nft(policy.render(lab.configs[Mode.BLOCKED], State.BLOCKED))
        after = lab.client.exec(["nft", "-s", "list", "table", "inet", "other"])
        start = lab.capture.mark()
        send(lab)
        lab.settle(4)
        leaked = [f for f in lab.capture.since(start) if matches(f)]
        status = lab.status(Mode.BLOCKED)
    finally:
        lab.client.exec(["nft", "delete", "table", "inet", "other"])
    assert before == after
    assert not leaked, f"another table's accept opened earlyfw: {netns.describe(leaked)}"
    assert status["other_tables"] == ["inet other"]
    assert status["state"] == "blocked" and status["intact"] is True


def test_status_counts_what_was_refused(policy_lab: PolicyLab) -> None:
    """`earlyfw status --json`, run inside the client namespace, reports the
    state and counts exactly the probes refused meanwhile."""
    lab = policy_lab
    lab.use(Mode.CONTROL)
    absent = lab.status(Mode.BLOCKED)
    assert absent["present"] is False and absent["intact"] is False

    lab.cli(Mode.BLOCKED, "apply", "--state", "blocked")
    before = lab.status(Mode.BLOCKED)
    assert before["present"] is True and before["state"] == "blocked" and before["intact"] is True
    for n in range(3):
        assert send_udp(lab, HOST_V4, 9999, b"count-%d" % n).error
    for n in range(2):
        assert send_udp(lab, RESOLVER_V4, 53, b"dns-%d" % n).error
    assert not unsolicited(lab, Inbound("udp-v4", "udp", CLIENT_V4))
    after = lab.status(Mode.BLOCKED)

    def packets(status: dict[str, object], name: str) -> int:
        counters = status["counters"]
        assert isinstance(counters, dict)
        return int(counters[name]["packets"])

    assert packets(after, "refused_out") - packets(before, "refused_out") == 3
    assert packets(after, "refused_dns") - packets(before, "refused_dns") == 2
    assert packets(after, "dropped_in") - packets(before, "dropped_in") >= 1

    # A state change carries the counts over.
    lab.cli(Mode.BLOCKED, "apply", "--state", "relaxed")
    relaxed = lab.status(Mode.BLOCKED)
    assert relaxed["state"] == "relaxed"
    assert packets(relaxed, "refused_out") == packets(after, "refused_out")


# --- raw sockets and the netdev egress chain -----------------------------------


@dataclass
class EgressLab:
    pair: netns.ClientWorld
    config_file: Path
    client_mac: bytes
    world_mac: bytes


@pytest.fixture(scope="module")
def egress_lab(module_lab: netns.Lab, tmp_path_factory: pytest.TempPathFactory) -> EgressLab:
    pair = netns.client_world(module_lab, WORLD_HOSTS, tag="eg")
    path = tmp_path_factory.mktemp("egress") / "earlyfw.toml"
    path.write_text(config_text(lan=False, egress=(pair.client_if,)))
    return EgressLab(pair, path, pair.client.mac(pair.client_if), pair.world.mac(pair.world_if))


def raw_frame(lab: EgressLab, dst: IPAddress, dport: int, payload: bytes) -> bytes:
    src = CLIENT_V4 if dst.version == 4 else CLIENT_V6
    return netns.udp_frame(
        src_mac=lab.client_mac, dst_mac=lab.world_mac, src=src, dst=dst, sport=40000, dport=dport, payload=payload
    )


def raw_dhcp_discover(lab: EgressLab) -> bytes:
    """DISCOVER as DHCP clients really send it: from 0.0.0.0 over a packet socket."""
    return netns.udp_frame(
        src_mac=lab.client_mac,
        dst_mac=b"\xff" * 6,
        src=ipaddress.IPv4Address("0.0.0.0"),  # noqa: S104 - a DHCP client has no address yet
        dst=ipaddress.IPv4Address("255.255.255.255"),
        sport=68,
        dport=67,
        payload=bootp(secrets.randbits(32), lab.client_mac, [(53, b"\x01")]),
    )


def raw_refused(ns: netns.Namespace) -> int:
    listing = ns.exec(["nft", "-j", "list", "counter", "netdev", policy.EGRESS_TABLE, "refused_raw"])
    return nft.parse_counters(listing)[("netdev", policy.EGRESS_TABLE)]["refused_raw"][0]


@pytest.mark.parametrize("family", [4, 6], ids=["v4", "v6"])
@pytest.mark.parametrize("mode", ["inet-only", "egress"])
def test_raw_frames(egress_lab: EgressLab, mode: str, family: int) -> None:
    """Hand-made frames sent on an AF_PACKET socket skip every inet hook. With
    only table inet earlyfw loaded (the control) a frame to a random host
    leaves; `earlyfw apply` with [egress] interfaces adds the netdev egress
    chain, which drops it and still lets the endpoint and DHCP through."""
    lab, client = egress_lab, egress_lab.pair.client
    client.exec(["nft", "flush", "ruleset"])
    config = configuration.load(lab.config_file)
    if mode == "inet-only":
        client.nft(policy.render(config, State.BLOCKED))
    else:
        client.exec(
            [sys.executable, "-m", "earlyfw", "-q", "--config", str(lab.config_file), "apply", "--state", "blocked"]
        )
        assert f"table netdev {policy.EGRESS_TABLE}" in client.exec(["nft", "list", "tables"])
    host, endpoint = (HOST_V4, ENDPOINT_V4) if family == 4 else (HOST_V6, ENDPOINT_V6)
    frames = {
        "host": raw_frame(lab, host, 9999, MARK + b"raw-host"),
        "dhcp": raw_dhcp_discover(lab),
        "endpoint": raw_frame(lab, endpoint, ENDPOINT_PORT, MARK + b"raw-endpoint"),  # last: it closes the window
    }
    with lab.pair.capture() as capture, client.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
        raw.bind((lab.pair.client_if, 0))
        errors = {}
        for name, frame in frames.items():
            try:
                raw.send(frame)
            except OSError as e:  # a drop at the egress hook surfaces as ENOBUFS
                errors[name] = errname(e)
        capture.wait_for(lambda f: f.incoming and f.payload == MARK + b"raw-endpoint", 2)
        capture.poll(0.1)
        arrived = {name for name, frame in frames.items() if any(f.incoming and f.raw == frame for f in capture.frames)}
    assert "endpoint" in arrived, f"{mode}: the raw frame to the endpoint was lost ({errors})"
    assert "dhcp" in arrived, f"{mode}: the raw DHCP DISCOVER was lost"
    if mode == "inet-only":
        assert "host" in arrived, "control: a raw frame to a random host should bypass the inet table"
    else:
        assert "host" not in arrived, "LEAK: a raw frame to a random host left despite the egress chain"
        assert raw_refused(client) >= 1
