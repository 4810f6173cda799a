"""Throwaway network namespaces for real-packet tests and benchmarks.

Everything here acts only inside namespaces it created (`ip netns add` with a
random suffix), so tests can load rulesets, add documentation-range addresses
(RFC 5737/3849) and send packets without touching the host's own network.

The pieces:

- `Namespace`: one named netns; `ip()`/`exec()`/`spawn()` run commands in it,
  `socket()` opens a socket in it (the socket stays there, whatever thread later
  uses it), `nft()` loads a script into it.
- `Lab`: an ExitStack owning namespaces and processes, so one `close()` (or
  `with`) tears everything down even when a test fails half-way.
- `veth()`: a veth pair between two namespaces.
- `Capture`: an AF_PACKET socket on an interface that records every frame
  (both directions) from the moment it is opened; `Frame` is one frame, its
  headers read by the QEMU proof's own reader (qemu.pcap.dissect).
- `client_world()`: the standard two-namespace topology (a client wired to a
  `world` that plays router and every remote host), with its address plan.
- `udp_frame()`, `neighbor_solicitation()`, `dns_query()`...: packets built by
  hand, for raw sockets and for checking answers.
- `require_tools()`: the tools a test needs, and which Debian package brings
  each, so a missing tool fails with an install hint instead of a skip.

Typical use:

    with Lab() as lab:
        pair = client_world(lab, hosts=[ipaddress.ip_address("203.0.113.5")])
        pair.client.nft(script)
        with pair.capture() as capture, pair.client.socket(AF_INET, SOCK_DGRAM) as s:
            s.sendto(b"x", ("203.0.113.5", 9))
            seen = capture.wait_for(lambda f: f.incoming and f.dport == 9, timeout=1)

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN for setns, CAP_NET_RAW for captures).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qemu.pcap import ETH_ARP, ETH_IPV4, ETH_IPV6, Headers, dissect

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4

# Tool -> Debian package that ships it.
PACKAGES = {
    "ip": "iproute2",
    "ss": "iproute2",
    "sysctl": "procps",
    "nft": "nftables",
    "dnsmasq": "dnsmasq-base",
    "wireguard-go": "wireguard-go",
    "wg": "wireguard-tools",
    "iptables-restore": "iptables",
    "tcpdump": "tcpdump",
}

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    pass


def missing_tools(tools: Sequence[str]) -> list[str]:
    """Install hints for the tools in `tools` that are not on PATH."""
    return [f"{tool} (apt-get install {PACKAGES.get(tool, tool)})" for tool in tools if shutil.which(tool) is None]


def require_tools(tools: Sequence[str]) -> None:
    missing = missing_tools(tools)
    if os.geteuid() != 0:
        missing.insert(0, "root (network namespaces need CAP_NET_ADMIN and CAP_SYS_ADMIN)")
    if missing:
        raise NetnsError("missing: " + ", ".join(missing))


def unique(prefix: str, length: int = 15) -> str:
    """`prefix` plus a random hex suffix, short enough for an interface name."""
    name = prefix + secrets.token_hex(4)
    return name[:length]


def run(argv: Sequence[str], *, input: str | None = None, check: bool = True, timeout: float = 60) -> str:
    """Run a command, return its stdout; on failure raise with its stderr."""
    result = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass(frozen=True)
class Namespace:
    name: str

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def ip(self, *args: str, check: bool = True) -> str:
        return run(["ip", "-n", self.name, *args], check=check)

    def ip_batch(self, commands: Sequence[str]) -> None:
        """Several `ip` commands in one process: much faster than one each."""
        run(["ip", "-n", self.name, "-batch", "-"], input="".join(c + "\n" for c in commands))

    def exec(self, argv: Sequence[str], *, input: str | None = None, check: bool = True, timeout: float = 60) -> str:
        return run(["ip", "netns", "exec", self.name, *argv], input=input, check=check, timeout=timeout)

    def exec_result(self, argv: Sequence[str], *, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv], input=input, capture_output=True, text=True, check=False
        )

    def spawn(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, log: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process in the namespace, its output going to
        `log` (never to a pipe nobody reads, which would stall it once full).
        `ip netns exec` execs the command, so the Popen's pid is the process itself."""
        with open(log or os.devnull, "ab") as output:
            return subprocess.Popen(
                ["ip", "netns", "exec", self.name, *argv],
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def nft(self, script: str) -> None:
        self.exec(["nft", "-f", "-"], input=script)

    def sysctl(self, key: str, value: str) -> None:
        self.exec(["sysctl", "-qw", f"{key}={value}"])

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the body with this thread inside the namespace. Sockets opened
        here belong to the namespace for their whole life."""
        with open("/proc/thread-self/ns/net", "rb") as home, open(self.path, "rb") as there:
            _setns(there.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())

    def socket(self, family: int, type: int, proto: int = 0) -> socket.socket:
        with self.entered():
            return socket.socket(family, type, proto)

    def mac(self, ifname: str) -> bytes:
        out = self.ip("-o", "link", "show", "dev", ifname)
        return bytes.fromhex(out.split("link/ether ", 1)[1].split()[0].replace(":", ""))


def create_namespace(prefix: str) -> Namespace:
    ns = Namespace(unique(prefix, 64))
    run(["ip", "netns", "add", ns.name])
    ns.ip("link", "set", "lo", "up")
    return ns


def delete_namespace(ns: Namespace) -> None:
    """Delete a namespace; the kernel then destroys its links (a veth's peer in
    another namespace too) and its nft tables. Processes still inside keep it
    alive, so stop those first (Lab does)."""
    if ns.path.exists():
        run(["ip", "netns", "del", ns.name], check=False)


def veth(a: Namespace, a_name: str, b: Namespace, b_name: str) -> None:
    """A veth pair, `a_name` in `a` and `b_name` in `b`, both down. Created
    directly inside the namespaces, so nothing ever appears on the host."""
    run(["ip", "link", "add", a_name, "netns", a.name, "type", "veth", "peer", "name", b_name, "netns", b.name])


def stop(process: subprocess.Popen[bytes], timeout: float = 5) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


class Lab(contextlib.ExitStack):
    """Owns namespaces and processes; closing it undoes everything, in reverse."""

    def namespace(self, prefix: str) -> Namespace:
        ns = create_namespace(prefix)
        self.callback(delete_namespace, ns)
        return ns

    def spawn(
        self, ns: Namespace, argv: Sequence[str], *, env: Mapping[str, str] | None = None, log: Path | None = None
    ) -> subprocess.Popen[bytes]:
        process = ns.spawn(argv, env=env, log=log)
        self.callback(stop, process)
        return process

    def own(self, sock: socket.socket) -> socket.socket:
        self.callback(sock.close)
        return sock


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise NetnsError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def resolver(lab: Lab, ns: Namespace, listen: Sequence[str], options: Sequence[str], workdir: Path) -> None:
    """A DNS server of the test's own in `ns` (dnsmasq with no config file, no
    upstream, no hosts file): it answers only what `options` say, on `listen`."""
    name = f"dnsmasq-{listen[0]}"
    lab.spawn(
        ns,
        [
            *("dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts"),
            "--bind-interfaces",
            *(f"--listen-address={address}" for address in listen),
            *options,
            f"--pid-file={workdir / f'{name}.pid'}",
            "--user=root",
        ],
        log=workdir / f"{name}.out",
    )
    wait_until(lambda: f"{listen[0]}:53 " in ns.exec(["ss", "-Hlun"]), 5, f"dnsmasq on {listen[0]}:53")


# --- captures ---------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Frame(Headers):
    """One Ethernet frame as seen on the captured interface."""

    outgoing: bool = False  # sent by the capturing namespace, not received by it
    raw: bytes = b""

    @classmethod
    def captured(cls, data: bytes, *, outgoing: bool) -> Frame:
        return cls(**vars(dissect(data)), outgoing=outgoing, raw=data)

    @property
    def incoming(self) -> bool:
        return not self.outgoing

    @property
    def family(self) -> int | None:
        return None if self.src is None else self.src.version

    def describe(self) -> str:
        if self.ethertype == ETH_ARP:
            return "ARP"
        if self.src is None:
            return f"ethertype 0x{self.ethertype:04x}"
        where = f"{self.src} -> {self.dst}"
        name = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}.get(self.proto or -1, f"proto {self.proto}")
        if self.sport is not None:
            return f"{name} {where} sport {self.sport} dport {self.dport}"
        if self.icmp_type is not None:
            return f"{name} {where} type {self.icmp_type}"
        return f"{name} {where}"


def describe(frames: Sequence[Frame]) -> str:
    """Frames for an assertion's message."""
    return "; ".join(f.describe() for f in frames) or "nothing"


class Capture:
    """Every frame on `ifname` in `ns` from now on, as the kernel hands it to a
    packet socket: after the sender's netfilter hooks, before the receiver's.

    Reading is on demand (the kernel buffers meanwhile), so no thread is needed.
    """

    def __init__(self, ns: Namespace, ifname: str, *, buffer: int = 8 << 20) -> None:
        self.sock = ns.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        self.sock.bind((ifname, 0))
        self.sock.setblocking(False)
        self.frames: list[Frame] = []

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def poll(self, timeout: float = 0.0) -> list[Frame]:
        """Read what has arrived (waiting up to `timeout` for the first frame)."""
        new: list[Frame] = []
        ready, _, _ = select.select([self.sock], [], [], timeout)
        while ready:
            try:
                data, address = self.sock.recvfrom(65535)
            except BlockingIOError:
                break
            new.append(Frame.captured(data, outgoing=address[2] == PACKET_OUTGOING))
        self.frames.extend(new)
        return new

    def mark(self) -> int:
        """Drain what is queued and return a position; `since(mark)` is what came after."""
        self.poll()
        return len(self.frames)

    def since(self, mark: int) -> list[Frame]:
        self.poll()
        return self.frames[mark:]

    def wait_for(self, predicate: Callable[[Frame], bool], timeout: float, *, start: int = 0) -> Frame | None:
        """The first frame from `start` on that satisfies `predicate`, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        checked = start
        while True:
            self.poll()
            for frame in self.frames[checked:]:
                if predicate(frame):
                    return frame
            checked = len(self.frames)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.poll(min(left, 0.05))


# --- packets built by hand ----------------------------------------------------


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(
    *, src_mac: bytes, dst_mac: bytes, src: IPAddress, dst: IPAddress, sport: int, dport: int, payload: bytes
) -> bytes:
    """A complete Ethernet frame carrying one UDP datagram, checksums and all,
    for sending through an AF_PACKET socket (which no inet hook sees)."""
    length = 8 + len(payload)
    if src.version == 4:
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, 17, length)
    else:
        pseudo = src.packed + dst.packed + struct.pack("!IxxxB", length, 17)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    if src.version == 4:
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0x4000, 64, 17, 0, src.packed, dst.packed)
        header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
        return dst_mac + src_mac + struct.pack("!H", ETH_IPV4) + header + udp
    header = struct.pack("!IHBB16s16s", 6 << 28, length, 17, 64, src.packed, dst.packed)
    return dst_mac + src_mac + struct.pack("!H", ETH_IPV6) + header + udp


def solicited_node(address: ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(b"\xff\x02" + b"\0" * 9 + b"\x01\xff" + address.packed[13:])


def neighbor_solicitation(target: ipaddress.IPv6Address, mac: bytes) -> bytes:
    """An ICMPv6 NS body (type 135) with a source link-layer address option;
    the kernel fills in the checksum for raw ICMPv6 sockets."""
    return struct.pack("!BBHI", 135, 0, 0, 0) + target.packed + bytes([1, 1]) + mac


def is_neighbor_advert(data: bytes, target: ipaddress.IPv6Address) -> bool:
    return len(data) >= 24 and data[0] == 136 and data[8:24] == target.packed


def dns_query(name: str, ident: int) -> bytes:
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 1, 1)


def dns_answers(reply: bytes, ident: int) -> int:
    """How many answers a DNS reply to query `ident` carries (-1: not a reply to it)."""
    if len(reply) < 12:
        return -1
    got, flags, _, answers = struct.unpack("!HHHH", reply[:8])
    return int(answers) if got == ident and flags & 0x8000 else -1


# --- the client/world topology -------------------------------------------------

# Documentation ranges only, and only inside namespaces created here.
WORLD_V4 = ipaddress.IPv4Address("192.0.2.1")
CLIENT_V4 = ipaddress.IPv4Address("192.0.2.2")
WORLD_V6 = ipaddress.IPv6Address("2001:db8:1::1")
CLIENT_V6 = ipaddress.IPv6Address("2001:db8:1::2")
WORLD_LL = ipaddress.IPv6Address("fe80::1")
CLIENT_LL = ipaddress.IPv6Address("fe80::2")
# A private "LAN" on the same link, for [lan] allow.
WORLD_LAN_V4 = ipaddress.IPv4Address("192.168.50.1")
CLIENT_LAN_V4 = ipaddress.IPv4Address("192.168.50.2")


@dataclass(frozen=True)
class ClientWorld:
    """`client` (where the firewall runs) wired by one veth to `world`, which
    plays router and every remote host: each address in `hosts` is local to
    world, so packets to them end there and a capture on `world_if` sees
    exactly what left the client."""

    client: Namespace
    world: Namespace
    client_if: str
    world_if: str

    def client_ifindex(self) -> int:
        with self.client.entered():
            return socket.if_nametoindex(self.client_if)

    def world_ifindex(self) -> int:
        with self.world.entered():
            return socket.if_nametoindex(self.world_if)

    def capture(self) -> Capture:
        return Capture(self.world, self.world_if)


def client_world(lab: Lab, hosts: Sequence[IPAddress], *, tag: str = "ef") -> ClientWorld:
    """Two fresh namespaces: the client has 192.0.2.2/24, 2001:db8:1::2/64,
    fe80::2 and 192.168.50.2/24 on its veth, default routes via world
    (IPv4 via 192.0.2.1, IPv6 via fe80::1 as a router advertisement would set),
    and world owns `hosts` on its loopback."""
    client, world = lab.namespace(f"{tag}c-"), lab.namespace(f"{tag}w-")
    for ns in (client, world):
        # Addresses usable at once: no duplicate address detection delay.
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")
    suffix = secrets.token_hex(4)
    pair = ClientWorld(client, world, f"{tag}c{suffix}", f"{tag}w{suffix}")
    veth(client, pair.client_if, world, pair.world_if)
    world.ip_batch(
        [
            f"addr add {WORLD_V4}/24 dev {pair.world_if}",
            f"addr add {WORLD_LAN_V4}/24 dev {pair.world_if}",
            f"addr add {WORLD_V6}/64 dev {pair.world_if} nodad",
            f"addr add {WORLD_LL}/64 dev {pair.world_if} nodad",
            *(f"addr add {h}/{h.max_prefixlen} dev lo" + (" nodad" if h.version == 6 else "") for h in hosts),
            f"link set {pair.world_if} up",
        ]
    )
    client.ip_batch(
        [
            f"addr add {CLIENT_V4}/24 dev {pair.client_if}",
            f"addr add {CLIENT_LAN_V4}/24 dev {pair.client_if}",
            f"addr add {CLIENT_V6}/64 dev {pair.client_if} nodad",
            f"addr add {CLIENT_LL}/64 dev {pair.client_if} nodad",
            f"link set {pair.client_if} up",
            f"route add default via {WORLD_V4} dev {pair.client_if}",
            f"route add ::/0 via {WORLD_LL} dev {pair.client_if}",
        ]
    )
    return pair
