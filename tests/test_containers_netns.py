"""Containers through the tunnel only: `[forward] via_tunnel`, with real packets.

`client` is a Docker host: a bridge `docker0` (172.17.0.1/16, fd00:17::1/64)
with a `container` namespace behind it, Docker's own iptables rules loaded
with the real iptables-restore (iptables-nft: FORWARD accepts what leaves
docker0, POSTROUTING masquerades it), and two ways out: its veth to `world`
(the internet, and a public resolver) and `tun0`, a veth to a `vpn`
namespace standing in for the tunnel (the VPN's resolver 10.64.0.1/fd64::1
answers there, and the same internet hosts live behind it).

Captures on world's and vpn's ends show what left the client and which way.
Where earlyfw must drop, its dropped_forward counter says when the container's
packets have been judged, so "nothing arrived" is read after the verdict.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu import pcap

from earlyfw import config as configuration
from earlyfw import policy
from earlyfw.policy import State
from tests import netns
from tests.conftest import require
from tests.netns import WORLD_LL, WORLD_V4, Frame
from tests.test_policy_netns import bootp, dhcp_reply

pytestmark = pytest.mark.netns

IPAddress = netns.IPAddress


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


HOST_V4, HOST_V6 = ip("203.0.113.5"), ip("2001:db8:99::5")
PUBLIC_DNS_V4, PUBLIC_DNS_V6 = ip("203.0.113.53"), ip("2001:db8:53::53")  # not the VPN's
VPN_DNS_V4, VPN_DNS_V6 = ip("10.64.0.1"), ip("fd64::1")  # the VPN server's side of tun0
TUNNEL_V4, TUNNEL_V6 = ip("10.64.0.2"), ip("fd64::2")  # the client's side
BRIDGE_V4, BRIDGE_V6 = ip("172.17.0.1"), ip("fd00:17::1")
CONTAINER_V4, CONTAINER_V6 = ip("172.17.0.2"), ip("fd00:17::2")
TUNNEL_IF, BRIDGE_IF = "tun0", "docker0"
NAME, ANSWER = "probe.test", "192.0.2.99"

BASE = f"""\
[tunnel]
kind = "manual"
interface = "{TUNNEL_IF}"
[[endpoint]]
address = "198.51.100.7"
port = 51820
[dns]
servers = ["{VPN_DNS_V4}", "{VPN_DNS_V6}"]
"""
CONFIGS = {"listed": BASE + f'[forward]\nvia_tunnel = ["{BRIDGE_IF}"]\n', "unlisted": BASE}

# What Docker 24 puts in place for its default bridge (`iptables-save`), the
# IPv6 half as `"ipv6": true` adds it.
DOCKER_RULES = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d {loopback} -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s {subnet} ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -i docker0 ! -o docker0 -j ACCEPT
-A FORWARD -i docker0 -o docker0 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
"""


@dataclass
class DockerHost:
    client: netns.Namespace
    container: netns.Namespace
    world_capture: netns.Capture  # world's end of the physical link
    tunnel_capture: netns.Capture  # vpn's end of tun0: what came through the tunnel
    client_if: str
    configs: dict[str, configuration.Config]
    workdir: Path

    def use(self, name: str | None, state: State = State.BLOCKED) -> None:
        if f"table inet {policy.TABLE}" in self.client.exec(["nft", "list", "tables"]):
            self.client.exec(["nft", "delete", "table", "inet", policy.TABLE])
        if name is not None:
            self.client.nft(policy.render(self.configs[name], state))

    def route_via(self, link: str) -> None:
        """The client's default routes: out of the physical link, or into the tunnel."""
        if link == "tunnel":
            routes = [f"via {VPN_DNS_V4} dev {TUNNEL_IF}", f"via {VPN_DNS_V6} dev {TUNNEL_IF}"]
        else:
            routes = [f"via {WORLD_V4} dev {self.client_if}", f"via {WORLD_LL} dev {self.client_if}"]
        self.client.ip_batch([f"route replace default {routes[0]}", f"route replace ::/0 {routes[1]}"])

    def counter(self, name: str) -> int:
        listing = self.client.exec(["nft", "-j", "list", "counter", "inet", policy.TABLE, name])
        return int(next(i["counter"]["packets"] for i in json.loads(listing)["nftables"] if "counter" in i))


@pytest.fixture(scope="module")
def host(module_lab: netns.Lab, tmp_path_factory: pytest.TempPathFactory) -> DockerHost:
    require("iptables-restore", "dnsmasq", "ss")
    lab, workdir = module_lab, tmp_path_factory.mktemp("containers")
    internet = [HOST_V4, HOST_V6, PUBLIC_DNS_V4, PUBLIC_DNS_V6]
    pair = netns.client_world(lab, internet, tag="ct")
    client = pair.client
    vpn, container = lab.namespace("ctv-"), lab.namespace("ctk-")
    for ns in (vpn, container):
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")
    vpn_if, bridge_port = netns.unique("ctvp"), netns.unique("ctbp")
    netns.veth(client, TUNNEL_IF, vpn, vpn_if)
    netns.veth(client, bridge_port, container, "eth0")
    vpn.ip_batch(
        [
            f"addr add {VPN_DNS_V4}/24 dev {vpn_if}",
            f"addr add {VPN_DNS_V6}/64 dev {vpn_if} nodad",
            *(f"addr add {h}/{h.max_prefixlen} dev lo" + (" nodad" if h.version == 6 else "") for h in internet),
            f"link set {vpn_if} up",
        ]
    )
    client.ip_batch(
        [
            f"addr add {TUNNEL_V4}/24 dev {TUNNEL_IF}",
            f"addr add {TUNNEL_V6}/64 dev {TUNNEL_IF} nodad",
            f"link set {TUNNEL_IF} up",
            f"link add {BRIDGE_IF} type bridge",
            f"addr add {BRIDGE_V4}/16 dev {BRIDGE_IF}",
            f"addr add {BRIDGE_V6}/64 dev {BRIDGE_IF} nodad",
            f"link set {bridge_port} master {BRIDGE_IF}",
            f"link set {bridge_port} up",
            f"link set {BRIDGE_IF} up",
        ]
    )
    container.ip_batch(
        [
            f"addr add {CONTAINER_V4}/16 dev eth0",
            f"addr add {CONTAINER_V6}/64 dev eth0 nodad",
            "link set eth0 up",
            f"route add default via {BRIDGE_V4}",
            f"route add ::/0 via {BRIDGE_V6}",
        ]
    )
    client.sysctl("net.ipv4.ip_forward", "1")
    client.sysctl("net.ipv6.conf.all.forwarding", "1")
    client.exec(["iptables-restore"], input=DOCKER_RULES.format(loopback="127.0.0.0/8", subnet="172.17.0.0/16"))
    client.exec(["ip6tables-restore"], input=DOCKER_RULES.format(loopback="::1/128", subnet="fd00:17::/64"))
    netns.resolver(lab, vpn, [str(VPN_DNS_V4), str(VPN_DNS_V6)], [f"--address=/{NAME}/{ANSWER}"], workdir)
    configs = {}
    for name, text in CONFIGS.items():
        path = workdir / f"{name}.toml"
        path.write_text(text)
        configs[name] = configuration.load(path)
    captures = (pair.capture(), netns.Capture(vpn, vpn_if))
    for capture in captures:
        lab.callback(capture.close)
    return DockerHost(client, container, *captures, pair.client_if, configs, workdir)


def family(address: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


def noise(frame: Frame) -> bool:
    """ARP, neighbour discovery and MLD: what crosses every link whatever the policy."""
    return frame.ethertype == pcap.ETH_ARP or (frame.proto == 58 and 130 <= (frame.icmp_type or 0) <= 143)


def arrived(capture: netns.Capture, start: int) -> list[Frame]:
    return [f for f in capture.since(start) if f.incoming and not noise(f)]


def describe(frames: list[Frame]) -> str:
    return "; ".join(f.describe() for f in frames) or "nothing"


# --- what a container sends -----------------------------------------------------


@dataclass(frozen=True)
class Probe:
    name: str
    proto: str
    dst: IPAddress
    port: int

    @property
    def payload(self) -> bytes:
        return b"earlyfw-container:" + self.name.encode()

    def send(self, host: DockerHost) -> None:
        kind = socket.SOCK_DGRAM if self.proto == "udp" else socket.SOCK_STREAM
        with host.container.socket(family(self.dst), kind) as s:
            if self.proto == "udp":
                s.sendto(self.payload, (str(self.dst), self.port))
            else:
                s.setblocking(False)
                s.connect_ex((str(self.dst), self.port))

    def arrived(self, frame: Frame) -> bool:
        return frame.incoming and self.matches(frame)

    def matches(self, frame: Frame) -> bool:
        if frame.dst != self.dst or frame.dport != self.port:
            return False
        return frame.payload == self.payload if self.proto == "udp" else frame.tcp_flags == 0x02


PROBES = (
    Probe("udp-v4", "udp", HOST_V4, 9999),
    Probe("tcp-v4", "tcp", HOST_V4, 443),
    Probe("udp-v6", "udp", HOST_V6, 9999),
)


def send_and_judge(host: DockerHost, probes: tuple[Probe, ...], *, earlyfw_drops: bool) -> None:
    """Send `probes` from the container; when earlyfw is to drop them, wait
    until its dropped_forward counter has counted each one."""
    before = host.counter("dropped_forward") if earlyfw_drops else 0
    for probe in probes:
        probe.send(host)
    if earlyfw_drops:
        netns.wait_until(
            lambda: host.counter("dropped_forward") >= before + len(probes), 5, "earlyfw to judge the probes"
        )


# (mode, route): the two controls have no forward chain of earlyfw's.
CASES = [
    ("docker-only", "world"),
    ("earlyfw-without-its-forward-chain", "world"),
    ("blocked", "world"),
    ("blocked", "tunnel"),
    ("relaxed", "world"),
    ("relaxed", "tunnel"),
]


@pytest.mark.parametrize(("mode", "route"), CASES, ids=[f"{m}-via-{r}" for m, r in CASES])
def test_forwarded_traffic_leaves_only_through_the_tunnel(host: DockerHost, mode: str, route: str) -> None:
    """With only Docker's rules the container reaches the internet (control);
    with earlyfw loaded beside them nothing leaves while blocked, and once
    relaxed its traffic appears only inside the tunnel, masqueraded to the
    tunnel's address, whichever way the host's routes point."""
    host.route_via(route)
    if mode == "docker-only":
        host.use(None)
    elif mode == "earlyfw-without-its-forward-chain":
        host.use("listed", State.BLOCKED)
        host.client.exec(["nft", "delete", "chain", "inet", policy.TABLE, "forward"])
    else:
        host.use("listed", State(mode))
    world, tunnel = host.world_capture.mark(), host.tunnel_capture.mark()
    leaves = mode in ("docker-only", "earlyfw-without-its-forward-chain") or (mode, route) == ("relaxed", "tunnel")
    send_and_judge(host, PROBES, earlyfw_drops=not leaves)

    if leaves:
        capture, start = (host.tunnel_capture, tunnel) if route == "tunnel" else (host.world_capture, world)
        for probe in PROBES:
            frame = capture.wait_for(probe.arrived, 3, start=start)
            assert frame is not None, f"{mode} via {route}: {probe.name} did not arrive"
            masqueraded = {4: TUNNEL_V4, 6: TUNNEL_V6} if route == "tunnel" else {4: netns.CLIENT_V4}
            if frame.src is not None and frame.src.version in masqueraded:
                assert frame.src == masqueraded[frame.src.version], frame.describe()
    outside = arrived(host.world_capture, world)
    inside = arrived(host.tunnel_capture, tunnel)
    if leaves and route == "world":
        assert not inside, f"control: {describe(inside)} went into the tunnel"
        return
    assert not outside, f"LEAK ({mode} via {route}): reached world: {describe(outside)}"
    if not leaves:
        assert not inside, f"{mode} via {route}: went through the tunnel: {describe(inside)}"


# --- DNS ----------------------------------------------------------------------------


def ask(host: DockerHost, server: IPAddress) -> int:
    """A query for NAME from the container to `server`: the answer count
    (-1: no answer within a second, or refused)."""
    ident = secrets.randbits(16)
    with host.container.socket(family(server), socket.SOCK_DGRAM) as s:
        s.settimeout(1)
        try:
            s.sendto(netns.dns_query(NAME, ident), (str(server), 53))
            return netns.dns_answers(s.recv(512), ident)
        except OSError:
            return -1


def dns_frames(capture: netns.Capture, start: int) -> list[Frame]:
    return [f for f in arrived(capture, start) if f.dport in (53, 853)]


@pytest.mark.parametrize("server", [PUBLIC_DNS_V4, PUBLIC_DNS_V6], ids=["v4", "v6"])
@pytest.mark.parametrize("mode", ["docker-only", "unlisted", "listed"])
def test_container_dns_goes_to_the_vpn_resolver(host: DockerHost, mode: str, server: IPAddress) -> None:
    """A container asking a public resolver (Docker's fallback when the host
    runs a stub resolver): with only Docker's rules the query goes to that
    resolver (control); relaxed with docker0 unlisted it is refused, like the
    host's own DNS to anyone but the VPN; listed, it is answered by the VPN's
    resolver, and no query leaves for anyone else."""
    host.route_via("tunnel")
    host.use(None if mode == "docker-only" else mode, State.RELAXED)
    world, tunnel = host.world_capture.mark(), host.tunnel_capture.mark()
    refused = 0 if mode == "docker-only" else host.counter("refused_dns")
    answers = ask(host, server)
    vpn_dns = VPN_DNS_V4 if server.version == 4 else VPN_DNS_V6
    queries = dns_frames(host.tunnel_capture, tunnel)
    assert not dns_frames(host.world_capture, world)
    if mode == "docker-only":
        assert any(f.dst == server for f in queries), f"control: the query did not reach {server}"
    elif mode == "unlisted":
        assert answers == -1 and not queries, f"unlisted: {describe(queries)} ({answers} answers)"
        assert host.counter("refused_dns") == refused + 1
    else:
        assert answers == 1, f"listed: the container got no answer ({answers})"
        assert [f.dst for f in queries] == [vpn_dns], f"listed: queries in the tunnel: {describe(queries)}"


def test_dns_over_tls_is_refused_not_redirected(host: DockerHost) -> None:
    """DoT cannot be redirected (the certificate names the server asked): to a
    public resolver it is refused; to the VPN's resolver it passes (control)."""
    host.route_via("tunnel")
    host.use("listed", State.RELAXED)
    tunnel = host.tunnel_capture.mark()
    refused = host.counter("refused_dns")
    Probe("dot-public", "tcp", PUBLIC_DNS_V4, 853).send(host)
    netns.wait_until(lambda: host.counter("refused_dns") == refused + 1, 5, "the refusal of DoT to a public resolver")
    to_vpn = Probe("dot-vpn", "tcp", VPN_DNS_V4, 853)
    to_vpn.send(host)
    assert host.tunnel_capture.wait_for(to_vpn.arrived, 3, start=tunnel)
    assert [f.dst for f in dns_frames(host.tunnel_capture, tunnel) if f.tcp_flags == 0x02] == [VPN_DNS_V4]


# --- DHCP for VMs ---------------------------------------------------------------------


@pytest.fixture
def bridge_dhcp(host: DockerHost, lab: netns.Lab) -> Iterator[None]:
    """A DHCP server on docker0, as libvirt runs dnsmasq on virbr0."""
    lab.spawn(
        host.client,
        [
            *("dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--bind-interfaces"),
            f"--interface={BRIDGE_IF}",
            "--dhcp-range=172.17.0.100,172.17.0.150,255.255.0.0,10m",
            f"--dhcp-leasefile={host.workdir / 'bridge.leases'}",
            f"--pid-file={host.workdir / 'bridge-dhcp.pid'}",
            "--no-ping",
            "--user=root",
        ],
    )
    netns.wait_until(lambda: ":67 " in host.client.exec(["ss", "-Hlun"]), 5, "dnsmasq on docker0")
    yield


def offered(host: DockerHost) -> bool:
    """A DISCOVER from the container (broadcast, as a booting VM sends it): an OFFER back?"""
    xid = secrets.randbits(32)
    mac = host.container.mac("eth0")
    with host.container.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
        s.bind(("0.0.0.0", 68))  # noqa: S104 - a DHCP client, inside the netns
        s.settimeout(1.5)
        s.sendto(bootp(xid, mac, [(53, b"\x01")]), ("255.255.255.255", 67))
        try:
            while True:
                reply = dhcp_reply(s.recv(2048), xid)
                if reply and reply[0] == 2:
                    return True
        except TimeoutError:
            return False


@pytest.mark.parametrize("name", ["listed", "unlisted"])
def test_a_listed_bridge_is_served_dhcp_while_blocked(host: DockerHost, bridge_dhcp: None, name: str) -> None:
    """A VM booted while blocked still gets its address from the host's DHCP
    server on its bridge; on a bridge not listed it gets none (control)."""
    host.use(name, State.BLOCKED)
    assert offered(host) is (name == "listed")
