"""The relaxed state with a real WireGuard tunnel, in network namespaces.

`world` runs a WireGuard server (wireguard-go; this kernel has no wireguard
module) on the endpoint 198.51.100.7:51820 with inner address 10.64.0.1, which
is also the VPN's DNS resolver (dnsmasq), and owns an "internet" host the
client reaches through the tunnel. `client` runs wireguard-go with 10.64.0.2
and routes everything into the tunnel except the endpoint.

Each probe expects a real answer (echo reply, TCP handshake, UDP echo, DNS
answer) and runs with no ruleset (control), relaxed and blocked. A capture on
world's end of the veth shows what crossed the physical link: WireGuard to the
endpoint, and nothing else.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import pytest
from qemu.pcap import ETH_ARP

from earlyfw import config as configuration
from earlyfw import policy
from earlyfw.policy import State
from tests import netns
from tests.conftest import require
from tests.netns import WORLD_V4, Frame, IPAddress

pytestmark = pytest.mark.netns

ENDPOINT = ipaddress.IPv4Address("198.51.100.7")
ENDPOINT_PORT = 51820
SERVER = ipaddress.IPv4Address("10.64.0.1")  # the server's inner address and the VPN's resolver
CLIENT = ipaddress.IPv4Address("10.64.0.2")
SERVER_V6 = ipaddress.IPv6Address("fd64::1")
CLIENT_V6 = ipaddress.IPv6Address("fd64::2")
INTERNET = ipaddress.IPv4Address("203.0.113.50")  # reached through the tunnel
OTHER_RESOLVER = ipaddress.IPv4Address("203.0.113.53")  # a public resolver, not the VPN's
TCP_PORT, UDP_ECHO_PORT = 8080, 7777
NAME = "probe.test"

# wireguard-go refuses to start on kernels that could have the module.
WG_ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
UAPI_DIR = Path("/var/run/wireguard")


class Mode(StrEnum):
    CONTROL = "control"  # no ruleset
    RELAXED = "relaxed"
    BLOCKED = "blocked"


@dataclass
class Tunnel:
    pair: netns.ClientWorld
    client_wg: str
    server_wg: str
    server_key: str  # the server's public key
    client_key_file: Path
    config: configuration.Config
    capture: netns.Capture

    @property
    def client(self) -> netns.Namespace:
        return self.pair.client

    def use(self, mode: Mode) -> None:
        if f"table inet {policy.TABLE}" in self.client.exec(["nft", "list", "tables"]):
            self.client.exec(["nft", "delete", "table", "inet", policy.TABLE])
        if mode is not Mode.CONTROL:
            self.client.nft(policy.render(self.config, State(mode.value)))

    def latest_handshake(self) -> int:
        out = self.client.exec(["wg", "show", self.client_wg, "latest-handshakes"])
        return int(out.split()[1]) if out.split() else 0

    def readd_peer(self) -> None:
        """Forget the session and configure the peer again: wireguard-go then
        starts a fresh handshake at once (persistent keepalive turns on)."""
        self.client.exec(["wg", "set", self.client_wg, "peer", self.server_key, "remove"])
        self.client.exec(
            [
                "wg",
                "set",
                self.client_wg,
                "peer",
                self.server_key,
                "endpoint",
                f"{ENDPOINT}:{ENDPOINT_PORT}",
                "allowed-ips",
                "0.0.0.0/0,::/0",
                "persistent-keepalive",
                "1",
            ]
        )

    @contextlib.contextmanager
    def outside(self, dst: IPAddress) -> Iterator[None]:
        """Route `dst` past the tunnel, straight out of the veth."""
        self.client.ip("route", "replace", f"{dst}/32", "via", str(WORLD_V4), "dev", self.pair.client_if)
        try:
            yield
        finally:
            self.client.ip("route", "del", f"{dst}/32")


def wireguard(lab: netns.Lab, ns: netns.Namespace, ifname: str, workdir: Path) -> None:
    """wireguard-go in the foreground (so its pid is ours to stop); at teardown
    the link goes first, then the process, then any UAPI socket it left."""
    sock = UAPI_DIR / f"{ifname}.sock"
    lab.callback(sock.unlink, missing_ok=True)
    lab.spawn(ns, ["wireguard-go", "-f", ifname], env=WG_ENV, log=workdir / f"{ifname}.log")
    lab.callback(ns.ip, "link", "del", ifname, check=False)
    netns.wait_until(sock.exists, 5, f"wireguard-go to create {sock}")


def keypair(workdir: Path, name: str) -> tuple[Path, str]:
    private = workdir / f"{name}.key"
    private.write_text(netns.run(["wg", "genkey"]))
    private.chmod(0o600)
    return private, netns.run(["wg", "pubkey"], input=private.read_text()).strip()


def echo_server(lab: netns.Lab, ns: netns.Namespace, addresses: tuple[IPAddress, ...]) -> None:
    """A UDP echo service on each of `addresses` (bound one by one, so each
    answer comes from the address asked), on a thread that stops at teardown."""
    socks = [lab.own(ns.socket(family_of(a), socket.SOCK_DGRAM)) for a in addresses]
    for sock, address in zip(socks, addresses, strict=True):
        sock.bind((str(address), UDP_ECHO_PORT))
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            for sock in select.select(socks, [], [], 0.1)[0]:
                data, peer = sock.recvfrom(2048)
                sock.sendto(data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    lab.callback(thread.join)
    lab.callback(done.set)


def listener(lab: netns.Lab, ns: netns.Namespace, address: str, port: int) -> None:
    """A listening TCP socket: the kernel completes handshakes without accept()."""
    sock = lab.own(ns.socket(socket.AF_INET, socket.SOCK_STREAM))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(64)


@pytest.fixture(scope="module")
def tunnel(module_lab: netns.Lab, tmp_path_factory: pytest.TempPathFactory) -> Tunnel:
    require("wireguard-go", "wg", "dnsmasq", "ss")
    lab, workdir = module_lab, tmp_path_factory.mktemp("wireguard")
    pair = netns.client_world(lab, (ENDPOINT, INTERNET, OTHER_RESOLVER), tag="wv")
    suffix = secrets.token_hex(3)
    client_wg, server_wg = f"wgc{suffix}", f"wgs{suffix}"
    client_key, client_pub = keypair(workdir, "client")
    server_key, server_pub = keypair(workdir, "server")

    # The server first, so the client's first handshake finds it.
    wireguard(lab, pair.world, server_wg, workdir)
    pair.world.exec(
        [
            *("wg", "set", server_wg, "private-key", str(server_key), "listen-port", str(ENDPOINT_PORT)),
            *("peer", client_pub, "allowed-ips", f"{CLIENT}/32,{CLIENT_V6}/128"),
        ]
    )
    pair.world.ip_batch(
        [
            f"addr add {SERVER}/24 dev {server_wg}",
            f"addr add {SERVER_V6}/64 dev {server_wg} nodad",
            f"link set {server_wg} up",
        ]
    )
    netns.resolver(
        lab, pair.world, [str(SERVER), str(SERVER_V6), str(OTHER_RESOLVER)], [f"--address=/{NAME}/192.0.2.99"], workdir
    )
    echo_server(lab, pair.world, (SERVER, INTERNET))
    listener(lab, pair.world, "", TCP_PORT)
    listener(lab, pair.world, str(OTHER_RESOLVER), 853)

    wireguard(lab, pair.client, client_wg, workdir)
    pair.client.exec(["wg", "set", client_wg, "private-key", str(client_key)])
    tunnel = Tunnel(pair, client_wg, server_wg, server_pub, client_key, _config(workdir, client_wg), pair.capture())
    lab.callback(tunnel.capture.close)
    pair.client.ip_batch(
        [
            f"addr add {CLIENT}/32 dev {client_wg}",
            f"addr add {CLIENT_V6}/64 dev {client_wg} nodad",
            f"link set {client_wg} up",
            # Everything into the tunnel but the endpoint, as wg-quick would.
            f"route add {ENDPOINT}/32 via {WORLD_V4} dev {pair.client_if}",
            f"route replace default dev {client_wg}",
        ]
    )
    tunnel.readd_peer()
    netns.wait_until(lambda: tunnel.latest_handshake() > 0, 10, "the first WireGuard handshake")
    return tunnel


def _config(workdir: Path, interface: str) -> configuration.Config:
    path = workdir / "earlyfw.toml"
    path.write_text(
        f'[tunnel]\nkind = "wireguard"\ninterface = "{interface}"\n'
        f'[[endpoint]]\naddress = "{ENDPOINT}"\nport = {ENDPOINT_PORT}\nprotocol = "udp"\n'
        f'[dns]\nservers = ["{SERVER}"]\n'
    )
    return configuration.load(path)


# --- probes: each wants a real answer ------------------------------------------


def family_of(address: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


def ping(t: Tunnel, dst: IPAddress) -> str:
    v4 = dst.version == 4
    marker = b"earlyfw-ping:" + secrets.token_hex(4).encode()
    message = struct.pack("!BBHHH", 8 if v4 else 128, 0, 0, 0x4548, 1) + marker
    if v4:
        message = message[:2] + struct.pack("!H", netns.checksum(message)) + message[4:]
    proto = socket.IPPROTO_ICMP if v4 else socket.IPPROTO_ICMPV6
    with t.client.socket(family_of(dst), socket.SOCK_RAW, proto) as s:
        try:
            s.sendto(message, (str(dst), 0))
        except OSError as e:
            return f"send: {e.strerror}"
        deadline = time.monotonic() + 1
        while (left := deadline - time.monotonic()) > 0:
            if select.select([s], [], [], left)[0]:
                data, source = s.recvfrom(2048)
                data = data[(data[0] & 0x0F) * 4 :] if v4 else data
                if data[0] == (0 if v4 else 129) and data[8:] == marker:
                    return "ok" if ipaddress.ip_address(source[0]) == dst else f"reply from {source[0]}"
    return "no reply"


def tcp(t: Tunnel, dst: IPAddress, port: int) -> str:
    with t.client.socket(family_of(dst), socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect((str(dst), port))
        except TimeoutError:
            return "timed out"
        except OSError as e:
            return f"connect: {e.strerror}"
    return "ok"


def udp_echo(t: Tunnel, dst: IPAddress) -> str:
    marker = b"earlyfw-echo:" + secrets.token_hex(4).encode()
    with t.client.socket(family_of(dst), socket.SOCK_DGRAM) as s:
        s.settimeout(1)
        try:
            s.sendto(marker, (str(dst), UDP_ECHO_PORT))
            data, source = s.recvfrom(2048)
            return "ok" if (data, ipaddress.ip_address(source[0])) == (marker, dst) else f"wrong echo from {source}"
        except TimeoutError:
            return "no echo"
        except OSError as e:
            return f"send: {e.strerror}"


def dns(t: Tunnel, dst: IPAddress, proto: str) -> str:
    ident = secrets.randbits(16)
    query = netns.dns_query(NAME, ident)
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    with t.client.socket(family_of(dst), kind) as s:
        s.settimeout(1.5)
        try:
            if proto == "udp":
                s.sendto(query, (str(dst), 53))
                reply = s.recv(2048)
            else:
                s.connect((str(dst), 53))
                s.sendall(struct.pack("!H", len(query)) + query)
                reply = s.recv(2048)[2:]
        except TimeoutError:
            return "no answer"
        except OSError as e:
            return f"{proto}: {e.strerror}"
    return "ok" if netns.dns_answers(reply, ident) >= 1 else f"bad answer {reply!r}"


@dataclass(frozen=True)
class Probe:
    name: str
    dst: IPAddress
    kind: str  # ping | tcp | udp | dns-udp | dns-tcp | dot
    passes: frozenset[Mode] = field(default_factory=frozenset)  # besides CONTROL
    outside: bool = False  # routed straight out of the veth, past the tunnel

    def run(self, t: Tunnel) -> str:
        with t.outside(self.dst) if self.outside else contextlib.nullcontext():
            match self.kind:
                case "ping":
                    return ping(t, self.dst)
                case "tcp":
                    return tcp(t, self.dst, TCP_PORT)
                case "dot":
                    return tcp(t, self.dst, 853)
                case "udp":
                    return udp_echo(t, self.dst)
                case _:
                    return dns(t, self.dst, self.kind.removeprefix("dns-"))

    def must_pass(self, mode: Mode) -> bool:
        return mode is Mode.CONTROL or mode in self.passes


RELAXED = frozenset({Mode.RELAXED})

PROBES = (
    # Through the tunnel: to the server itself and to a host beyond it.
    Probe("tunnel-ping-server", SERVER, "ping", RELAXED),
    Probe("tunnel-ping-server-v6", SERVER_V6, "ping", RELAXED),
    Probe("tunnel-tcp-server", SERVER, "tcp", RELAXED),
    Probe("tunnel-udp-server", SERVER, "udp", RELAXED),
    Probe("tunnel-ping-internet", INTERNET, "ping", RELAXED),
    Probe("tunnel-tcp-internet", INTERNET, "tcp", RELAXED),
    Probe("tunnel-udp-internet", INTERNET, "udp", RELAXED),
    # DNS through the tunnel: only to the VPN's resolver.
    Probe("tunnel-dns-udp-vpn-resolver", SERVER, "dns-udp", RELAXED),
    Probe("tunnel-dns-tcp-vpn-resolver", SERVER, "dns-tcp", RELAXED),
    Probe("tunnel-dns-udp-other-resolver", OTHER_RESOLVER, "dns-udp"),
    Probe("tunnel-dns-tcp-other-resolver", OTHER_RESOLVER, "dns-tcp"),
    Probe("tunnel-dot-other-resolver", OTHER_RESOLVER, "dot"),
    # The config names no IPv6 resolver, so no IPv6 DNS at all.
    Probe("tunnel-dns-udp-v6-server", SERVER_V6, "dns-udp"),
    # The same traffic past the tunnel, straight out of the veth.
    Probe("outside-ping-internet", INTERNET, "ping", outside=True),
    Probe("outside-tcp-internet", INTERNET, "tcp", outside=True),
    Probe("outside-udp-internet", INTERNET, "udp", outside=True),
    Probe("outside-ping-server", SERVER, "ping", outside=True),
    Probe("outside-dns-vpn-resolver", SERVER, "dns-udp", outside=True),
)


def wireguard_to_endpoint(frame: Frame) -> bool:
    return frame.proto == 17 and frame.dst == ENDPOINT and frame.dport == ENDPOINT_PORT


def background(frame: Frame) -> bool:
    """ARP, neighbour discovery and MLD: always allowed on the link."""
    if frame.ethertype == ETH_ARP:
        return True
    return frame.proto == 58 and frame.icmp_type in {130, 131, 132, 133, 134, 135, 136, 143}


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.name)
def test_probe(tunnel: Tunnel, probe: Probe, mode: Mode) -> None:
    tunnel.use(mode)
    start = tunnel.capture.mark()
    result = probe.run(tunnel)
    tunnel.capture.poll(0.05)
    plain = [f for f in tunnel.capture.since(start) if f.incoming and f.dst == probe.dst]
    if probe.must_pass(mode):
        assert result == "ok", f"{probe.name} failed in mode {mode}: {result}"
    else:
        assert result != "ok", f"LEAK: {probe.name} got an answer in mode {mode}"
        assert not plain, f"LEAK: {probe.name} crossed the physical link in mode {mode}: {netns.describe(plain)}"


@pytest.mark.parametrize("mode", [Mode.RELAXED, Mode.BLOCKED])
def test_only_wireguard_crosses_the_link(tunnel: Tunnel, mode: Mode) -> None:
    """All probes under one capture, after forcing a fresh handshake: the only
    frames on the physical link are WireGuard to the endpoint (and ARP/ND), the
    handshake completes even when blocked, and in relaxed the probes meant to
    pass did, inside it."""
    tunnel.use(mode)
    start = tunnel.capture.mark()
    before = tunnel.latest_handshake()
    time.sleep(1.05)  # handshake times have one-second resolution
    tunnel.readd_peer()
    results = {p.name: p.run(tunnel) for p in PROBES}
    netns.wait_until(lambda: tunnel.latest_handshake() > before, 10, f"a new handshake in mode {mode}")
    tunnel.capture.poll(0.2)
    frames = [f for f in tunnel.capture.since(start) if f.incoming]
    others = [f for f in frames if not (wireguard_to_endpoint(f) or background(f))]
    assert not others, f"frames other than WireGuard left the client in mode {mode}: {netns.describe(others)}"
    initiations = [f for f in frames if wireguard_to_endpoint(f) and f.payload[:1] == b"\x01" and len(f.payload) == 148]
    assert initiations, "no WireGuard handshake initiation reached the endpoint"
    wrong = {n: r for n, r in results.items() if (r == "ok") != any(p.name == n and p.must_pass(mode) for p in PROBES)}
    assert not wrong, f"unexpected results in mode {mode}: {wrong}"
