"""Precise exceptions, with real packets: `[lan] allow = [networks]` and `[[allow]]`.

The `client` namespace has two links: its veth to `world` (the LAN
192.168.50.0/24 and 2001:db8:1::/64 on the same wire as the router 192.0.2.1,
link-local fe80::1 and the internet behind it), and `tailscale0`, a veth to a
`tailnet` namespace playing a side VPN (100.64.0.0/10, fd7a:115c:a1e0::/48,
its resolver 100.100.100.100, and an exit-node route for one internet host).

What left the client is read on the client's own end of each link (frames it
sent): every next hop is a permanent neighbour, so a datagram or SYN is on the
wire, or refused, by the time the send returns. Each config runs in every
state; a control with no ruleset shows every probe leaves and every inbound
probe gets in, and the `lan-off` and `allow-none` configs show what the
exceptions themselves opened.
"""

from __future__ import annotations

import ipaddress
import select
import socket
from dataclasses import dataclass, field

import pytest

from earlyfw import config as configuration
from earlyfw import policy
from earlyfw.policy import State
from tests import netns
from tests.conftest import require
from tests.netns import CLIENT_LAN_V4, CLIENT_V4, CLIENT_V6, WORLD_LAN_V4, WORLD_LL, WORLD_V4, WORLD_V6, Frame

pytestmark = pytest.mark.netns

IPAddress = netns.IPAddress


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


HOST_V4, HOST_V6 = ip("203.0.113.5"), ip("2001:db8:99::5")
MDNS_V4 = ip("224.0.0.251")
TS_IF = "tailscale0"  # interface names are per namespace: no clash with other tests
TS_CLIENT_V4, TS_GATEWAY_V4 = ip("100.100.1.2"), ip("100.100.1.1")
TS_CLIENT_V6, TS_GATEWAY_V6 = ip("fd7a:115c:a1e0::2"), ip("fd7a:115c:a1e0::1")
TS_PEER_V4, TS_PEER_V6 = ip("100.101.5.5"), ip("fd7a:115c:a1e0:ab::5")
TS_RESOLVER = ip("100.100.100.100")  # Tailscale's MagicDNS address
EXIT_HOST = ip("203.0.113.77")  # an internet host routed into tailscale0 (an exit node)

BASE = """\
[tunnel]
kind = "wireguard"
interface = "wg0"
[[endpoint]]
address = "198.51.100.7"
port = 51820
[dns]
servers = ["10.64.0.1"]
"""
TAILNET = '["100.64.0.0/10", "fd7a:115c:a1e0::/48"]'
CONFIGS = {
    "lan-list": '[lan]\nallow = ["192.168.50.0/24", "2001:db8:1::/64"]\n',
    "lan-off": "[lan]\nallow = false\n",  # control: the same LAN hosts, no exception
    "allow": f'[[allow]]\ninterface = "{TS_IF}"\nnetworks = {TAILNET}\n',
    "allow-dns": f'[[allow]]\ninterface = "{TS_IF}"\nnetworks = {TAILNET}\ndns = true\n',
    "allow-all": f'[[allow]]\ninterface = "{TS_IF}"\n',  # no networks: everything through it
    "allow-none": "",  # control: tailscale0 not listed
}
ALLOW = frozenset({"allow", "allow-dns", "allow-all"})
STATES = (State.BLOCKED, State.RELAXED, State.INITRAMFS)


@dataclass
class Lab:
    pair: netns.ClientWorld
    tailnet: netns.Namespace
    captures: dict[str, netns.Capture]  # by link: "world", "tailnet" (the client's end)
    configs: dict[str, configuration.Config]

    @property
    def client(self) -> netns.Namespace:
        return self.pair.client

    def use(self, name: str | None, state: State = State.BLOCKED) -> None:
        if f"table inet {policy.TABLE}" in self.client.exec(["nft", "list", "tables"]):
            self.client.exec(["nft", "delete", "table", "inet", policy.TABLE])
        if name is not None:
            self.client.nft(policy.render(self.configs[name], state))

    def ifindex(self, link: str) -> int:
        with self.client.entered():
            return socket.if_nametoindex(self.pair.client_if if link == "world" else TS_IF)


def family(address: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


# --- probes -------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One datagram or SYN from the client, and the configs that must let it out."""

    name: str
    link: str
    proto: str
    dst: IPAddress
    port: int
    passes: frozenset[str] = field(default_factory=frozenset)

    @property
    def payload(self) -> bytes:
        return b"earlyfw-exception:" + self.name.encode()

    def send(self, lab: Lab) -> None:
        kind = socket.SOCK_DGRAM if self.proto == "udp" else socket.SOCK_STREAM
        scope = lab.ifindex(self.link) if self.dst.version == 6 and (self.dst.is_link_local) else 0
        address = (str(self.dst), self.port) if self.dst.version == 4 else (str(self.dst), self.port, 0, scope)
        with lab.client.socket(family(self.dst), kind) as s:
            if self.dst.is_multicast:
                s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, CLIENT_V4.packed)
            try:
                if self.proto == "udp":
                    s.sendto(self.payload, address)
                else:
                    s.setblocking(False)
                    s.connect_ex(address)  # the SYN is on the wire (or refused) when this returns
            except OSError:
                pass  # refused: the capture says so

    def left(self, frame: Frame) -> bool:
        if not (frame.outgoing and frame.dst == self.dst and frame.dport == self.port):
            return False
        return frame.payload == self.payload if self.proto == "udp" else frame.tcp_flags == 0x02


LAN = frozenset({"lan-list"})
PROBES = (
    Probe("lan-v4-udp", "world", "udp", WORLD_LAN_V4, 9999, LAN),
    Probe("lan-v4-tcp", "world", "tcp", WORLD_LAN_V4, 445, LAN),
    Probe("lan-v6-udp", "world", "udp", WORLD_V6, 9999, LAN),
    # Outside the listed networks, though on the same wire (and in the built-in LAN ranges).
    Probe("router-v4-same-link", "world", "udp", WORLD_V4, 9999),
    Probe("linklocal-v6", "world", "udp", WORLD_LL, 9999),
    Probe("mdns-v4", "world", "udp", MDNS_V4, 5353),
    Probe("internet-v4", "world", "udp", HOST_V4, 9999),
    Probe("internet-v6", "world", "udp", HOST_V6, 9999),
    # DNS stays refused through the LAN exception.
    Probe("lan-dns-v4", "world", "udp", WORLD_LAN_V4, 53),
    Probe("lan-dot-v6", "world", "tcp", WORLD_V6, 853),
    # The side VPN: its networks, its DNS only with dns = true, the rest only without networks.
    Probe("tailnet-v4-udp", "tailnet", "udp", TS_PEER_V4, 9999, ALLOW),
    Probe("tailnet-v4-tcp", "tailnet", "tcp", TS_PEER_V4, 22, ALLOW),
    Probe("tailnet-v6-udp", "tailnet", "udp", TS_PEER_V6, 9999, ALLOW),
    Probe("tailnet-dns", "tailnet", "udp", TS_RESOLVER, 53, frozenset({"allow-dns"})),
    Probe("tailnet-dot-v6", "tailnet", "tcp", TS_PEER_V6, 853, frozenset({"allow-dns"})),
    Probe("tailnet-exit-node", "tailnet", "udp", EXIT_HOST, 9999, frozenset({"allow-all"})),
    # The tailnet's addresses reached any other way than through tailscale0.
    Probe("tailnet-address-off-tailscale0", "world", "udp", ip("100.64.9.9"), 9999),
)


@dataclass(frozen=True)
class Inbound:
    """A datagram to a client listener from `src` in world or tailnet."""

    name: str
    link: str
    src: IPAddress
    dst: IPAddress
    passes: frozenset[str] = field(default_factory=frozenset)

    def send(self, lab: Lab) -> None:
        sender_ns = lab.pair.world if self.link == "world" else lab.tailnet
        with sender_ns.socket(family(self.dst), socket.SOCK_DGRAM) as s:
            s.bind((str(self.src), 0))
            s.sendto(self.payload, (str(self.dst), self.port))

    @property
    def payload(self) -> bytes:
        return b"earlyfw-inbound:" + self.name.encode()

    @property
    def port(self) -> int:
        return 5000 + INBOUND.index(self)


INBOUND = (
    Inbound("from-lan-v4", "world", WORLD_LAN_V4, CLIENT_LAN_V4, LAN),
    Inbound("from-lan-v6", "world", WORLD_V6, CLIENT_V6, LAN),
    Inbound("from-router-v4", "world", WORLD_V4, CLIENT_V4),
    Inbound("from-tailnet-v4", "tailnet", TS_PEER_V4, TS_CLIENT_V4, ALLOW),
    Inbound("from-tailnet-v6", "tailnet", TS_PEER_V6, TS_CLIENT_V6, ALLOW),
    Inbound("from-exit-node", "tailnet", EXIT_HOST, TS_CLIENT_V4, frozenset({"allow-all"})),
)


# --- the lab ------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(module_lab: netns.Lab, tmp_path_factory: pytest.TempPathFactory) -> Lab:
    require()
    workdir = tmp_path_factory.mktemp("exceptions")
    pair = netns.client_world(module_lab, [HOST_V4, HOST_V6], tag="ex")
    tailnet = module_lab.namespace("ext-")
    tailnet.sysctl("net.ipv6.conf.all.accept_dad", "0")
    tailnet.sysctl("net.ipv6.conf.default.accept_dad", "0")
    tailnet_if = netns.unique("exts")
    netns.veth(pair.client, TS_IF, tailnet, tailnet_if)
    tailnet.ip_batch(
        [
            f"addr add {TS_GATEWAY_V4}/24 dev {tailnet_if}",
            f"addr add {TS_GATEWAY_V6}/64 dev {tailnet_if} nodad",
            *(f"addr add {a}/32 dev lo" for a in (TS_PEER_V4, TS_RESOLVER, EXIT_HOST)),
            f"addr add {TS_PEER_V6}/128 dev lo nodad",
            f"link set {tailnet_if} up",
        ]
    )
    world_mac, tailnet_mac = pair.world.mac(pair.world_if), tailnet.mac(tailnet_if)
    pair.client.ip_batch(
        [
            f"addr add {TS_CLIENT_V4}/24 dev {TS_IF}",
            f"addr add {TS_CLIENT_V6}/64 dev {TS_IF} nodad",
            f"link set {TS_IF} up",
            f"route add 100.64.0.0/10 via {TS_GATEWAY_V4} dev {TS_IF}",
            f"route add {EXIT_HOST}/32 via {TS_GATEWAY_V4} dev {TS_IF}",
            f"route add fd7a:115c:a1e0::/48 via {TS_GATEWAY_V6} dev {TS_IF}",
            # Off tailscale0: one tailnet address the client reaches over the LAN.
            f"route add 100.64.9.9/32 via {WORLD_V4} dev {pair.client_if}",
            # Every next hop known for good: a send is on the wire when it returns.
            *(
                f"neigh replace {hop} lladdr {world_mac.hex(':')} dev {pair.client_if} nud permanent"
                for hop in (WORLD_V4, WORLD_LAN_V4, WORLD_V6, WORLD_LL)
            ),
            *(
                f"neigh replace {hop} lladdr {tailnet_mac.hex(':')} dev {TS_IF} nud permanent"
                for hop in (TS_GATEWAY_V4, TS_GATEWAY_V6)
            ),
        ]
    )
    configs = {}
    for name, text in CONFIGS.items():
        path = workdir / f"{name}.toml"
        path.write_text(BASE + text)
        configs[name] = configuration.load(path)
    captures = {"world": netns.Capture(pair.client, pair.client_if), "tailnet": netns.Capture(pair.client, TS_IF)}
    for capture in captures.values():
        module_lab.callback(capture.close)
    return Lab(pair, tailnet, captures, configs)


def run_probes(lab: Lab) -> tuple[set[str], set[str]]:
    """Which probes left the client, and which inbound probes got in."""
    marks = {link: capture.mark() for link, capture in lab.captures.items()}
    for probe in PROBES:
        probe.send(lab)
    left = set()
    for probe in PROBES:
        capture = lab.captures[probe.link]
        if any(probe.left(f) for f in capture.since(marks[probe.link])):
            left.add(probe.name)
    return left, inbound(lab)


def inbound(lab: Lab) -> set[str]:
    """Every inbound probe sent at once, to one listener each; what arrived
    within half a second (a datagram crosses a veth in microseconds)."""
    listeners = {}
    try:
        for probe in INBOUND:
            listener = lab.client.socket(family(probe.dst), socket.SOCK_DGRAM)
            listeners[listener] = probe
            listener.bind((str(probe.dst), probe.port))
        for probe in INBOUND:
            probe.send(lab)
        arrived: set[str] = set()
        while len(arrived) < len(INBOUND) and (ready := select.select(list(listeners), [], [], 0.5)[0]):
            for listener in ready:
                if listener.recv(2048) == listeners[listener].payload:
                    arrived.add(listeners[listener].name)
        return arrived
    finally:
        for listener in listeners:
            listener.close()


def test_control_every_probe_leaves_and_gets_in(lab: Lab) -> None:
    lab.use(None)
    left, got_in = run_probes(lab)
    assert left == {p.name for p in PROBES}, f"control: probes that did not leave: {set(p.name for p in PROBES) - left}"
    assert got_in == {p.name for p in INBOUND}, (
        f"control: inbound that did not arrive: {set(p.name for p in INBOUND) - got_in}"
    )


@pytest.mark.parametrize("state", STATES, ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_exactly_the_exceptions_pass(lab: Lab, name: str, state: State) -> None:
    lab.use(name, state)
    left, got_in = run_probes(lab)
    want_out = {p.name for p in PROBES if name in p.passes}
    want_in = {p.name for p in INBOUND if name in p.passes}
    assert not left - want_out, f"LEAK ({name}, {state}): {sorted(left - want_out)} left the client"
    assert not want_out - left, f"({name}, {state}): {sorted(want_out - left)} were refused"
    assert not got_in - want_in, f"({name}, {state}): {sorted(got_in - want_in)} got in"
    assert not want_in - got_in, f"({name}, {state}): {sorted(want_in - got_in)} were dropped"


def test_dns_through_a_side_vpn_is_counted_as_refused_dns(lab: Lab) -> None:
    """The DNS refusal on tailscale0 is earlyfw's own DNS rule, not the catch-all."""
    lab.use("allow")

    def refused_dns() -> int:
        listing = lab.client.exec(["nft", "list", "counter", "inet", policy.TABLE, "refused_dns"])
        return int(listing.split("packets ")[1].split()[0])

    before = refused_dns()
    next(p for p in PROBES if p.name == "tailnet-dns").send(lab)
    assert refused_dns() == before + 1
