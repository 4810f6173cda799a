"""The endpoint hole is for the tunnel only (issue 13, part 4), with real
packets in network namespaces.

What each tunnel's packets look like to nft, measured here and in the QEMU
guest: wireguard-go and OpenVPN open their sockets as root (`meta skuid 0`);
an OpenVPN that drops to `user nobody` re-opens its socket as nobody on a
restart (`meta skuid 65534`), keeping its `mark`; kernel WireGuard's socket is
the kernel's, with no file, so `meta skuid` does not evaluate at all (see
tests/test_qemu_wireguard.py). So the blocked state refuses a packet to
endpoint:port whose socket has an owner other than root, unless it carries
[tunnel] mark; an unprivileged program cannot set a mark (SO_MARK needs
CAP_NET_ADMIN or CAP_NET_RAW).

Each test has its control: with no ruleset, and with the same ruleset minus
the owner rule (the policy before this change), the unprivileged packet
arrives; so its absence under earlyfw is earlyfw's doing.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from earlyfw import policy
from earlyfw.config import Config, Endpoint, Transport, TunnelKind
from earlyfw.policy import State
from tests import netns
from tests.conftest import require
from tests.test_watch_openvpn import OPENVPN_PORT, openvpn
from tests.watch_lab import PROBE_PORT, WG_PORT, received, wg_pair

pytestmark = pytest.mark.netns

MARKER = b"earlyfw-endpoint-probe:"
TCP_PORT = 443
# What OpenVPN's `mark` sets on its socket (decimal: OpenVPN reads it with atoi).
OPENVPN_MARK = 17734

# Run as the sender: one UDP datagram and one TCP connect to the endpoint, and
# an attempt at SO_MARK; prints what each call said. With "nobody" it first
# becomes uid and gid 65534 with no groups, which also clears its capabilities,
# as any unprivileged program is.
SENDER = r"""
import json, os, socket, sys
host, udp_port, tcp_port, tag, who = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
if who == "nobody":
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
family = socket.AF_INET6 if ":" in host else socket.AF_INET
out = {}
def attempt(name, call):
    try:
        call()
        out[name] = "ok"
    except OSError as e:
        out[name] = type(e).__name__ if e.errno is None else __import__("errno").errorcode[e.errno]
with socket.socket(family, socket.SOCK_DGRAM) as s:
    attempt("mark", lambda: s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 1))
    attempt("udp", lambda: s.sendto(b"%s" + tag.encode(), (host, udp_port)))
with socket.socket(family, socket.SOCK_STREAM) as s:
    s.settimeout(2)
    attempt("tcp", lambda: s.connect((host, tcp_port)))
print(json.dumps(out))
""".replace("%s", MARKER.decode())


@pytest.fixture
def lab() -> Iterator[netns.Lab]:
    require("wireguard-go", "wg", "openvpn")
    with netns.Lab() as lab:
        yield lab


def endpoint_config(kind: TunnelKind, interface: str, endpoints: list[Endpoint], mark: int | None = None) -> Config:
    return Config(tunnel_kind=kind, interface=interface, endpoints=tuple(endpoints), tunnel_mark=mark)


def without_owner_rule(script: str) -> str:
    """The same ruleset as the policy was before the endpoint hole checked
    the owner: the control."""
    return "".join(line for line in script.splitlines(keepends=True) if 'name "refused_endpoint"' not in line)


def send(ns: netns.Namespace, host: str, *, as_nobody: bool, tag: str, udp_port: int = WG_PORT) -> dict[str, str]:
    who = "nobody" if as_nobody else "root"
    argv = [sys.executable, "-c", SENDER, host, str(udp_port), str(TCP_PORT), tag, who]
    return dict(json.loads(ns.exec(argv)))


def refused_endpoint(ns: netns.Namespace) -> int:
    data = json.loads(ns.exec(["nft", "-j", "list", "counter", "inet", policy.TABLE, "refused_endpoint"]))
    return int(next(i["counter"]["packets"] for i in data["nftables"] if "counter" in i))


@dataclass
class Arrived:
    udp: bool
    tcp: bool


def arrived(capture: netns.Capture, start: int, tag: str) -> Arrived:
    frames = capture.since(start)
    return Arrived(
        udp=any(f.incoming and f.payload == MARKER + tag.encode() for f in frames),
        tcp=any(f.incoming and f.dport == TCP_PORT and f.tcp_flags == 0x02 for f in frames),
    )


# --- who may send to the endpoint ----------------------------------------------------


@pytest.mark.parametrize("family", [4, 6], ids=["v4", "v6"])
@pytest.mark.parametrize("rules", ["none", "without-owner-rule", "blocked", "initramfs"])
def test_only_the_tunnels_sockets_reach_the_endpoint(lab: netns.Lab, rules: str, family: int) -> None:
    """An unprivileged program's UDP datagram and TCP SYN to endpoint:port are
    refused in the blocked and initramfs states (the initramfs drops, so its
    TCP connect times out instead), and it cannot set a mark to pass; root's
    go out in every mode. The controls let the unprivileged packets out."""
    pair = netns.client_world(lab, [], tag="eh")
    host = netns.WORLD_V4 if family == 4 else netns.WORLD_V6
    endpoints = [Endpoint(host, WG_PORT), Endpoint(host, TCP_PORT, Transport.TCP)]
    script = policy.render(endpoint_config(TunnelKind.WIREGUARD, "wg0", endpoints, mark=7), State.BLOCKED)
    if rules == "initramfs":
        script = policy.render(endpoint_config(TunnelKind.WIREGUARD, "wg0", endpoints, mark=7), State.INITRAMFS)
    if rules == "without-owner-rule":
        script = without_owner_rule(script)
        assert "skuid" not in script
    if rules != "none":
        pair.client.nft(script)
    with pair.capture() as capture:
        start = capture.mark()
        nobody = send(pair.client, str(host), as_nobody=True, tag="nobody")
        time.sleep(0.3)
        nobody_arrived = arrived(capture, start, "nobody")
        start = capture.mark()
        root = send(pair.client, str(host), as_nobody=False, tag="root")
        time.sleep(0.3)
        root_arrived = arrived(capture, start, "root")

    assert nobody["mark"] == "EPERM", "an unprivileged program could set the mark that passes"
    assert root_arrived == Arrived(udp=True, tcp=True), f"root's packets to the endpoint were stopped: {root}"
    if rules in ("none", "without-owner-rule"):
        assert nobody_arrived == Arrived(udp=True, tcp=True), f"the control lost the probe: {nobody}"
        return
    assert nobody_arrived == Arrived(udp=False, tcp=False), f"an unprivileged program reached the endpoint: {nobody}"
    if rules == "blocked":
        # Refused at once (the reject), not left to time out.
        assert nobody["udp"] == "EPERM" and nobody["tcp"] not in ("ok", "TimeoutError"), nobody
        assert refused_endpoint(pair.client) >= 2


@pytest.mark.parametrize("rules", ["without-owner-rule", "blocked"])
def test_wireguard_go_comes_up_while_others_are_refused(lab: netns.Lab, rules: str) -> None:
    """wireguard-go (root, as it runs) completes its handshake through the
    blocked state's endpoint hole; an unprivileged program started at the
    same moment sending to the same endpoint:port gets nothing out. The
    control (the hole without the owner rule) lets that program through."""
    pair = wg_pair(lab, connect=False)
    config = endpoint_config(TunnelKind.WIREGUARD, pair.client_wg.name, [Endpoint(netns.WORLD_V4, WG_PORT)])
    script = policy.render(config, State.BLOCKED)
    pair.client.nft(without_owner_rule(script) if rules == "without-owner-rule" else script)
    with pair.topology.capture() as capture:
        start = capture.mark()
        pair.connect_client()
        nobody = send(pair.client, str(netns.WORLD_V4), as_nobody=True, tag="beside-wg")
        netns.wait_until(lambda: pair.latest_handshake() > 0, 15, "wireguard-go's handshake through the block")
        time.sleep(0.3)
        nobody_arrived = arrived(capture, start, "beside-wg")
    if rules == "without-owner-rule":
        assert nobody_arrived.udp, f"the control lost the probe: {nobody}"
        return
    assert not nobody_arrived.udp and nobody["udp"] == "EPERM", nobody
    assert refused_endpoint(pair.client) == 1, "only the unprivileged datagram was refused at the endpoint"


# --- relaxed: a kernel tunnel's packets carry the socket of what they carry ------------------

VXLAN_PORT = 4789
INNER_CLIENT, INNER_WORLD = "10.77.0.2", "10.77.0.1"
# Datagrams to HOST:PORT, as root or as nobody (WHO), COUNT of them.
DATAGRAMS = r"""
import os, socket, sys
host, port, count, who = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if who == "nobody":
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for i in range(count):
        try:
            s.sendto(f"{who}-{i}".encode(), (host, port))
            print("sent")
        except OSError as e:
            print(os.strerror(e.errno))
"""


def datagrams(ns: netns.Namespace, host: str, port: int, count: int, who: str) -> list[str]:
    return ns.exec([sys.executable, "-c", DATAGRAMS, host, str(port), str(count), who]).splitlines()


def vxlan_tunnel(lab: netns.Lab, tag: str) -> netns.ClientWorld:
    """A client and a world joined by vx0, a kernel tunnel whose outer flow
    is VXLAN_PORT both ways (as a WireGuard flow is the listen port and the
    endpoint's). No IPv6 on vx0: its solicitations would keep that flow alive
    on their own; the tests make it, as a handshake would."""
    pair = netns.client_world(lab, [], tag=tag)
    for ns, local, remote, inner in (
        (pair.client, netns.CLIENT_V4, netns.WORLD_V4, INNER_CLIENT),
        (pair.world, netns.WORLD_V4, netns.CLIENT_V4, INNER_WORLD),
    ):
        ns.ip_batch(
            [
                f"link add vx0 type vxlan id 42 local {local} remote {remote} dstport {VXLAN_PORT} "
                f"srcport {VXLAN_PORT} {VXLAN_PORT + 1}",
                f"addr add {inner}/24 dev vx0",
                "link set vx0 addrgenmode none",
                "link set vx0 up",
            ]
        )
    return pair


def open_the_flow(pair: netns.ClientWorld, inside: socket.socket) -> None:
    """Root's datagram through the tunnel and the far end's answer: the
    tunnel's flow, established (kernel WireGuard's opens with its handshake
    and the peer's response)."""
    assert datagrams(pair.client, INNER_WORLD, PROBE_PORT, 1, "root") == ["sent"]
    assert received(inside, 1.0) == [b"root-0"]
    assert datagrams(pair.world, INNER_CLIENT, PROBE_PORT, 1, "root") == ["sent"]


@pytest.mark.parametrize("rules", ["plain-owner-rule", "relaxed"])
def test_relaxed_a_kernel_tunnel_carries_every_users_traffic(lab: netns.Lab, rules: str) -> None:
    """VXLAN stands in for kernel WireGuard (not in this kernel; the QEMU
    guest has it): both wrap a packet in the kernel and send the outer packet
    with the inner packet's socket, so a non-root user's traffic through the
    tunnel reaches the endpoint as that user's (measured in the guest and
    here). Relaxed, it still arrives, while nobody's own datagram to
    endpoint:port is refused. The control, the relaxed state with the plain
    owner rule (no exemption for the tunnel's established flow), refuses the
    tunnelled traffic: what that would do to every non-root user."""
    pair = vxlan_tunnel(lab, "ev")
    config = endpoint_config(TunnelKind.MANUAL, "vx0", [Endpoint(netns.WORLD_V4, VXLAN_PORT)])
    script = policy.render(config, State.RELAXED)
    if rules == "plain-owner-rule":
        script = script.replace("ct state != established ", "")
        assert "ct state != established" not in script
    pair.client.nft(script)
    inside = lab.own(pair.world.socket(socket.AF_INET, socket.SOCK_DGRAM))
    inside.bind((INNER_WORLD, PROBE_PORT))
    inside.settimeout(0.2)

    open_the_flow(pair, inside)
    assert datagrams(pair.client, INNER_WORLD, PROBE_PORT, 3, "nobody") == ["sent"] * 3
    tunnelled = received(inside, 1.0)
    direct = datagrams(pair.client, str(netns.WORLD_V4), VXLAN_PORT, 1, "nobody")
    assert direct == ["Operation not permitted"], "nobody's own datagram to the endpoint was not refused"
    if rules == "plain-owner-rule":
        assert tunnelled == [], "the control let nobody's tunnelled traffic out: the tunnel does not carry the socket"
        assert refused_endpoint(pair.client) == 4
        return
    assert tunnelled == [b"nobody-0", b"nobody-1", b"nobody-2"], "nobody's traffic through the tunnel was lost"
    assert refused_endpoint(pair.client) == 1


# A mark the tunnel puts on every packet it sends (kernel WireGuard's FwMark;
# wg-quick sets 51820 for a full tunnel), here put on what enters vx0 and kept
# by VXLAN on the outer packet, as WireGuard does.
TUNNEL_FWMARK = 51820
MARKS_VX0 = f"""
table inet fwmark_test {{
	chain output {{
		type filter hook output priority mangle; policy accept;
		oifname "vx0" meta mark set {TUNNEL_FWMARK}
	}}
}}
"""


# Binds a UDP socket to PORT on every address as nobody, with SO_REUSEADDR and
# SO_REUSEPORT as each try asks; prints what each bind said.
BINDS = r"""
import errno, json, os, socket, sys
port = int(sys.argv[1])
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
out = {}
for name, options in (("plain", ()), ("reuseaddr", (socket.SO_REUSEADDR,)),
                      ("reuseport", (socket.SO_REUSEPORT,)), ("both", (socket.SO_REUSEADDR, socket.SO_REUSEPORT))):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for option in options:
            s.setsockopt(socket.SOL_SOCKET, option, 1)
        try:
            s.bind(("0.0.0.0", port))
            out[name] = "bound"
        except OSError as e:
            out[name] = errno.errorcode[e.errno]
print(json.dumps(out))
"""


def nobody_binds(ns: netns.Namespace, port: int) -> dict[str, str]:
    return dict(json.loads(ns.exec([sys.executable, "-c", BINDS, str(port)])))


def test_only_the_tunnels_socket_holds_its_listen_port(lab: netns.Lab) -> None:
    """What exempting the listen port rests on: a port a socket holds without
    SO_REUSEADDR or SO_REUSEPORT (kernel WireGuard's, wireguard-go's) cannot
    be bound by an unprivileged program, whatever flags it sets; VXLAN's
    kernel socket (no file, like WireGuard's) neither. The control: the same
    program binds the port once it is free."""
    pair = vxlan_tunnel(lab, "eb")
    refused = dict.fromkeys(("plain", "reuseaddr", "reuseport", "both"), "EADDRINUSE")
    assert nobody_binds(pair.client, VXLAN_PORT) == refused, "nobody shares the kernel tunnel's port"
    held = lab.own(pair.client.socket(socket.AF_INET, socket.SOCK_DGRAM))
    held.bind(("0.0.0.0", WG_PORT))  # noqa: S104 (in the test's namespace, as WireGuard binds)
    assert nobody_binds(pair.client, WG_PORT) == refused, "nobody shares root's port"
    held.close()
    assert nobody_binds(pair.client, WG_PORT)["plain"] == "bound", "the control: nobody cannot bind at all"


@pytest.mark.parametrize(
    ("mark", "port"),
    [(None, None), (TUNNEL_FWMARK, None), (None, VXLAN_PORT)],
    ids=["no-mark", "fwmark-and-tunnel-mark", "listen-port"],
)
def test_relaxed_a_kernel_tunnel_after_conntrack_forgot_its_flow(
    lab: netns.Lab, mark: int | None, port: int | None
) -> None:
    """The README's limit and its remedies. Conntrack forgets an idle UDP flow
    (30 s after a short exchange, 120 s after a longer one; 1 s here, through
    this namespace's own timeouts) while WireGuard's session key may still be
    valid (180 s): the next packet the kernel tunnel carries for a non-root
    program is then a new flow with that program's socket, refused like the
    program's own packet to the endpoint (no-mark: the control). With the
    tunnel's FwMark named as [tunnel] mark, or its listen port known to the
    watcher (VXLAN's source port is fixed, as WireGuard's listen port is), the
    tunnel's packets pass whoever's socket they carry; nobody's own datagram
    to the endpoint, from any other port, is still refused."""
    pair = vxlan_tunnel(lab, "ec")
    for key in ("net.netfilter.nf_conntrack_udp_timeout", "net.netfilter.nf_conntrack_udp_timeout_stream"):
        pair.client.sysctl(key, "1")
    config = endpoint_config(TunnelKind.MANUAL, "vx0", [Endpoint(netns.WORLD_V4, VXLAN_PORT)], mark=mark)
    script = policy.render(config, State.RELAXED, tunnel_port=port)
    pair.client.nft(script + (MARKS_VX0 if mark is not None else ""))
    inside = lab.own(pair.world.socket(socket.AF_INET, socket.SOCK_DGRAM))
    inside.bind((INNER_WORLD, PROBE_PORT))
    inside.settimeout(0.2)

    open_the_flow(pair, inside)
    assert datagrams(pair.client, INNER_WORLD, PROBE_PORT, 1, "nobody") == ["sent"]
    assert received(inside, 1.0) == [b"nobody-0"], "the flow was not established: no control"
    time.sleep(3)  # the flow is forgotten; the neighbour entry (30 s) is not, so no ARP renews it
    datagrams(pair.client, INNER_WORLD, PROBE_PORT, 3, "nobody")
    tunnelled = received(inside, 1.0)
    if mark is None and port is None:
        assert tunnelled == [], "the forgotten flow's next packets passed: the README's limit is not what it says"
        assert refused_endpoint(pair.client) == 3
        return
    assert tunnelled == [b"nobody-0", b"nobody-1", b"nobody-2"], "the tunnel's packets were refused"
    assert refused_endpoint(pair.client) == 0
    direct = datagrams(pair.client, str(netns.WORLD_V4), VXLAN_PORT, 1, "nobody")
    assert direct == ["Operation not permitted"], "nobody's own datagram to the endpoint was not refused"
    assert refused_endpoint(pair.client) == 1


# --- raw frames: the netdev egress chain ------------------------------------------

# A raw frame from a program that holds CAP_NET_RAW but is not root (a
# capability-granted tool): it keeps its capabilities over the uid change
# (PR_SET_KEEPCAPS), raises CAP_NET_RAW again, and sends on a packet socket.
RAW_SENDER = r"""
import ctypes, os, socket, sys
ifname, frame, who = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3]
if who == "nobody":
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(8, 1, 0, 0, 0) == 0  # PR_SET_KEEPCAPS
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    net_raw = 1 << 13
    data = (ctypes.c_uint32 * 6)(net_raw, net_raw, 0, 0, 0, 0)  # effective, permitted, inheritable
    assert libc.capset(header, data) == 0, ctypes.get_errno()
with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
    s.bind((ifname, 0))
    try:
        s.send(frame)
        print("sent")
    except OSError as e:  # the egress drop says ENOBUFS
        print(os.strerror(e.errno))
"""


def carrying(payload: bytes) -> Callable[[netns.Frame], bool]:
    return lambda frame: frame.incoming and frame.payload == payload


@pytest.mark.parametrize("rules", ["inet-only", "egress"])
def test_raw_frames_to_the_endpoint_need_root(lab: netns.Lab, rules: str) -> None:
    """A raw frame skips the inet hooks; with [egress] interfaces the netdev
    chain refuses one to endpoint:port from a non-root sender holding
    CAP_NET_RAW, and still passes root's (a DHCP client's, a tunnel's).
    The control, the inet table alone, lets the unprivileged frame out."""
    pair = netns.client_world(lab, [], tag="er")
    config = Config(
        tunnel_kind=TunnelKind.WIREGUARD,
        interface="wg0",
        endpoints=(Endpoint(netns.WORLD_V4, WG_PORT),),
        egress_interfaces=(pair.client_if,),
    )
    devices = (pair.client_if,) if rules == "egress" else ()
    pair.client.nft(policy.render(config, State.BLOCKED, egress_devices=devices))
    client_mac, world_mac = pair.client.mac(pair.client_if), pair.world.mac(pair.world_if)
    seen, said = {}, {}
    with pair.capture() as capture:
        for who in ("nobody", "root"):
            payload = MARKER + f"raw-{who}".encode()
            frame = netns.udp_frame(
                src_mac=client_mac, dst_mac=world_mac, src=netns.CLIENT_V4, dst=netns.WORLD_V4,
                sport=40000, dport=WG_PORT, payload=payload,
            )  # fmt: skip
            start = capture.mark()
            said[who] = pair.client.exec([sys.executable, "-c", RAW_SENDER, pair.client_if, frame.hex(), who]).strip()
            seen[who] = capture.wait_for(carrying(payload), 0.5, start=start)
    assert seen["root"] is not None and said["root"] == "sent", f"root's raw frame to the endpoint was stopped: {said}"
    if rules == "inet-only":
        assert seen["nobody"] is not None, "the control lost the unprivileged raw frame"
    else:
        assert seen["nobody"] is None, "a non-root raw frame reached the endpoint past the egress chain"


# --- OpenVPN, root at first and `user nobody` after a restart --------------------------


def _completions(log: Path) -> int:
    return len(re.findall(r"Initialization Sequence Completed", log.read_text(errors="replace")))


@pytest.mark.parametrize("mark", [True, False], ids=["with-mark", "without-mark"])
def test_openvpn_reconnects_as_nobody_only_with_its_mark(lab: netns.Lab, tmp_path: Path, mark: bool) -> None:
    """A real OpenVPN client that drops to `user nobody`: its first socket is
    root's and connects through the block either way. A soft restart (what
    ping-restart does) opens a new socket as nobody; with `mark` in both
    OpenVPN and [tunnel] it carries the mark and reconnects, while an
    unprivileged program beside it is refused; without the mark the restarted
    OpenVPN is refused like any other program (the case [tunnel] mark exists for)."""
    pair = netns.client_world(lab, [], tag="eo")
    key = tmp_path / "static.key"
    subprocess.run(["openvpn", "--genkey", "secret", str(key)], check=True, capture_output=True)
    server_if, client_if = netns.unique("efhs"), netns.unique("efhc")
    config = endpoint_config(
        TunnelKind.OPENVPN, client_if, [Endpoint(netns.WORLD_V4, OPENVPN_PORT)], OPENVPN_MARK if mark else None
    )
    pair.client.nft(policy.render(config, State.BLOCKED))
    openvpn(
        lab, pair.world, key, "0", "--dev", server_if, "--lport", str(OPENVPN_PORT),
        "--ifconfig", "10.98.0.1", "10.98.0.2", log=tmp_path / "server.log",
    )  # fmt: skip
    log = tmp_path / "client.log"
    client = openvpn(
        lab, pair.client, key, "1", "--dev", client_if, "--remote", str(netns.WORLD_V4), str(OPENVPN_PORT),
        "--ifconfig", "10.98.0.2", "10.98.0.1", "--user", "nobody", "--group", "nogroup",
        "--persist-key", "--persist-tun", "--mark", str(OPENVPN_MARK), log=log,
    )  # fmt: skip
    netns.wait_until(lambda: _completions(log) >= 1, 30, "OpenVPN's first connection (as root)")
    refused_before = refused_endpoint(pair.client)

    with pair.capture() as capture:
        client.send_signal(signal.SIGUSR1)
        netns.wait_until(lambda: "process restarting" in log.read_text(errors="replace"), 10, "OpenVPN's restart")
        start = capture.mark()
        if mark:
            netns.wait_until(lambda: _completions(log) >= 2, 30, "OpenVPN's reconnect from nobody's marked socket")
        else:
            time.sleep(5)
        sent = [f for f in capture.since(start) if f.incoming and f.dport == OPENVPN_PORT]
    sockets = pair.client.exec(["ss", "-Huanpe"])
    assert re.search(rf"openvpn.*uid:65534 .*fwmark:{OPENVPN_MARK:#x}", sockets), sockets
    if not mark:
        assert not sent, f"OpenVPN's restarted socket (nobody's) got {len(sent)} packet(s) out without the mark"
        assert refused_endpoint(pair.client) > refused_before
        return
    assert sent, "the reconnect sent nothing to the server"
    nobody = send(pair.client, str(netns.WORLD_V4), as_nobody=True, tag="beside-openvpn", udp_port=OPENVPN_PORT)
    assert nobody["udp"] == "EPERM", nobody
    assert refused_endpoint(pair.client) - refused_before == 1
