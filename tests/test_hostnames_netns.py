"""Provider files that name their servers by hostname (issue 16), in network
namespaces with real DNS and a real OpenVPN.

`world` plays the provider: dnsmasq on 192.0.2.1 is the public DNS that
answers for the server names (what the client machine's resolv.conf points
at, through `ip netns exec`'s /etc/netns/NAME/resolv.conf); an OpenVPN server
(static key, --multihome) listens on every server address; once the tunnel is
up, a second dnsmasq on the server's inner address 10.8.0.1 is the VPN's own
resolver, answering with the addresses the provider rotated to. A capture on
world's end of the veth sees everything that crosses the physical link.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from earlyfw import config as configuration
from earlyfw.config import IPAddress
from earlyfw.linux.watcher.daemon import read_verdict
from tests import netns
from tests.conftest import require
from tests.test_relaxed_wireguard import UDP_ECHO_PORT, echo_server
from tests.test_watch_openvpn import openvpn
from tests.watch_lab import PYTHON_MODULE, Watcher, live_state, send_udp, start_watcher

pytestmark = pytest.mark.netns

NAME_1, NAME_2 = "nl-free-01.example-vpn.net", "nl-free-02.example-vpn.net"
X, X6 = ipaddress.ip_address("203.0.113.7"), ipaddress.ip_address("2001:db8:7::7")
Y, Z = ipaddress.ip_address("203.0.113.8"), ipaddress.ip_address("203.0.113.9")
W = ipaddress.ip_address("203.0.113.10")
PORT = 1194
TUNNEL_SERVER, TUNNEL_CLIENT = "10.8.0.1", "10.8.0.2"
CONNECTED = re.compile(r"Peer Connection Initiated with \[AF_INET6?\](\S+)")


def provider_file(interface: str, *, random: bool) -> str:
    """A typical provider file: two hostnames, remote-random, resolv-retry."""
    return f"""\
# example-vpn.net, Netherlands
dev {interface}
dev-type tun
proto udp
remote {NAME_1} {PORT}
remote {NAME_2} {PORT}
{"remote-random" if random else ""}
resolv-retry infinite
nobind
ifconfig {TUNNEL_CLIENT} {TUNNEL_SERVER}
dhcp-option DNS {TUNNEL_SERVER}
"""


def dnsmasq(lab: netns.Lab, ns: netns.Namespace, listen: str, records: dict[str, str], workdir: Path) -> Path:
    log = workdir / f"dnsmasq-{listen}.log"
    options = [
        # Answer for the provider's domain alone: NODATA, not REFUSED, for a missing AAAA.
        "--local=/example-vpn.net/",
        *(f"--host-record={name},{addresses}" for name, addresses in records.items()),
        "--log-queries",
        f"--log-facility={log}",
    ]
    netns.resolver(lab, ns, [listen], options, workdir)
    return log


@dataclass
class Provider:
    lab: netns.Lab
    pair: netns.ClientWorld
    workdir: Path
    key: Path
    tun: str  # the client's tunnel interface
    public_dns_log: Path

    @property
    def client(self) -> netns.Namespace:
        return self.pair.client

    def earlyfw(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.client.exec_result([*PYTHON_MODULE, *args])

    def write(self, name: str, text: str) -> Path:
        path = self.workdir / name
        path.write_text(text)
        return path

    def import_resolved(self, source: Path) -> tuple[Path, Path]:
        out, companion = self.workdir / "earlyfw.toml", self.workdir / "client-pinned.ovpn"
        result = self.earlyfw(
            "--config", str(out), "import", "openvpn", "--resolve", "--client-out", str(companion), str(source)
        )
        assert result.returncode == 0, result.stderr
        return out, companion

    def client_openvpn(self, config_file: Path, log: Path) -> subprocess.Popen[bytes]:
        return openvpn(self.lab, self.client, self.key, "1", "--config", str(config_file), log=log)


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[Provider]:
    require("openvpn", "dnsmasq", "ss")
    with netns.Lab() as lab:
        pair = netns.client_world(lab, [X, X6, Y, Z, W], tag="eh")
        # What `ip netns exec` mounts over /etc/resolv.conf inside the client.
        etc = Path("/etc/netns") / pair.client.name
        etc.mkdir(parents=True)
        lab.callback(shutil.rmtree, etc, ignore_errors=True)
        (etc / "resolv.conf").write_text(f"nameserver {netns.WORLD_V4}\n")
        log = dnsmasq(lab, pair.world, str(netns.WORLD_V4), {NAME_1: f"{X},{X6}", NAME_2: str(Y)}, tmp_path)
        key = tmp_path / "static.key"
        subprocess.run(["openvpn", "--genkey", "secret", str(key)], check=True, capture_output=True)
        server_if = netns.unique("efhs")
        openvpn(
            lab,
            pair.world,
            key,
            "0",
            # udp6: one dual-stack socket, so a client that picks the IPv6 pin
            # (remote-random) finds the server there too.
            *("--dev", server_if, "--proto", "udp6", "--lport", str(PORT), "--multihome"),
            *("--ifconfig", TUNNEL_SERVER, TUNNEL_CLIENT),
            log=tmp_path / "server.log",
        )
        yield Provider(lab, pair, tmp_path, key, netns.unique("efhc"), log)


def dns_frames(frames: list[netns.Frame]) -> list[str]:
    return [f.describe() for f in frames if f.proto in (6, 17) and 53 in (f.sport, f.dport)]


def wait_connected(log: Path, timeout: float) -> str | None:
    found: list[str] = []

    def seen() -> bool:
        found[:] = CONNECTED.findall(log.read_text(errors="replace")) if log.exists() else []
        return bool(found)

    try:
        netns.wait_until(seen, timeout, "OpenVPN's Peer Connection Initiated")
    except netns.NetnsError:
        return None
    return found[0]


def test_import_resolve_pins_every_address_and_writes_the_companion(provider: Provider) -> None:
    source = provider.write("provider.ovpn", provider_file(provider.tun, random=True))
    original = source.read_bytes()
    with provider.pair.capture() as capture:
        out, companion = provider.import_resolved(source)
        # Control: the capture sees DNS on the wire; this import ran unblocked.
        assert dns_frames(capture.since(0)), "the capture saw no DNS: it could not prove the tests below"
    imported = configuration.load(out)
    assert [(str(e), e.host) for e in imported.endpoints] == [
        (f"{X}:{PORT}/udp", NAME_1),
        (f"[{X6}]:{PORT}/udp", NAME_1),
        (f"{Y}:{PORT}/udp", NAME_2),
    ]
    assert imported.interface == provider.tun
    assert [str(a) for a in imported.dns_servers] == [TUNNEL_SERVER]
    text = out.read_text()
    assert f'host = "{NAME_1}"' in text
    pinned = companion.read_text()
    remotes = [line for line in pinned.splitlines() if line.startswith("remote ")]
    assert remotes == [f"remote {X} {PORT}", f"remote {X6} {PORT}", f"remote {Y} {PORT}"]
    assert "remote-random" in pinned
    assert "resolv-retry infinite" in pinned
    assert companion.stat().st_mode & 0o777 == 0o600
    assert source.read_bytes() == original, "the original file must never be rewritten"

    wg = provider.write("wg0.conf", f"[Interface]\nDNS = 10.64.0.1\n\n[Peer]\nEndpoint = {NAME_1}:51820\n")
    wg_out, wg_client = provider.workdir / "wg.toml", provider.workdir / "wg-pinned.conf"
    result = provider.earlyfw(
        "--config", str(wg_out), "import", "wg", "--resolve", "--client-out", str(wg_client), str(wg)
    )
    assert result.returncode == 0, result.stderr
    assert [(str(e), e.host) for e in configuration.load(wg_out).endpoints] == [
        (f"{X}:51820/udp", NAME_1),
        (f"[{X6}]:51820/udp", NAME_1),
    ]
    assert f"Endpoint = {X}:51820\n" in wg_client.read_text()


def test_import_resolve_is_refused_while_blocked(provider: Provider) -> None:
    source = provider.write("provider.ovpn", provider_file(provider.tun, random=True))
    out = provider.workdir / "earlyfw.toml"
    typed = provider.write(
        "typed.toml",
        configuration.Config(
            tunnel_kind=configuration.TunnelKind.OPENVPN,
            interface=provider.tun,
            endpoints=(configuration.Endpoint(X, PORT),),
        ).to_toml(),
    )
    locked = provider.earlyfw("--config", str(typed), "lock")
    assert locked.returncode == 0, locked.stderr
    with provider.pair.capture() as capture:
        result = provider.earlyfw("--config", str(out), "import", "openvpn", "--resolve", str(source))
        assert dns_frames(capture.since(0)) == []
    assert result.returncode == 1
    first = result.stderr.splitlines()[0]
    assert first == "earlyfw: error: earlyfw is blocked: DNS is blocked, so hostnames cannot be resolved now"
    assert "before `earlyfw install`" in result.stderr
    assert not out.exists()


def test_companion_connects_through_the_block_with_no_dns_on_the_wire(provider: Provider) -> None:
    source = provider.write("provider.ovpn", provider_file(provider.tun, random=True))
    out, companion = provider.import_resolved(source)
    locked = provider.earlyfw("--config", str(out), "lock")
    assert locked.returncode == 0, locked.stderr
    assert live_state(provider.client) == "blocked"

    with provider.pair.capture() as capture:
        # Control first: the provider's own file resolves its hostnames at
        # connect time, which the block refuses, so it never connects.
        control_log = provider.workdir / "control.log"
        control = provider.client_openvpn(source, control_log)
        assert wait_connected(control_log, 8) is None, control_log.read_text()
        assert "RESOLVE: Cannot resolve host address" in control_log.read_text()
        control.terminate()
        control.wait(10)

        log = provider.workdir / "pinned.log"
        provider.client_openvpn(companion, log)
        peer = wait_connected(log, 20)
        assert peer is not None, log.read_text()
        assert peer.rsplit(":", 1)[0] in {str(X), str(X6), str(Y)}
        frames = capture.since(0)
    assert dns_frames(frames) == []
    assert any(f.dport == PORT and f.outgoing is False for f in frames), "no OpenVPN packet crossed the link"
    assert live_state(provider.client) == "blocked"


class Pinger:
    """A UDP echo request through the tunnel every 10 ms, each numbered, on a
    thread: `lost()` is every request that never came back."""

    def __init__(self, provider: Provider) -> None:
        echo_server(provider.lab, provider.pair.world, (ipaddress.ip_address(TUNNEL_SERVER),))
        self.sock = provider.lab.own(provider.client.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self.sock.connect((TUNNEL_SERVER, UDP_ECHO_PORT))
        self.sock.settimeout(0.005)
        self.sent, self.received = 0, set[int]()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        next_send = time.monotonic()
        while not self.done.is_set() or time.monotonic() < next_send + 1:
            if not self.done.is_set() and time.monotonic() >= next_send:
                self.sock.send(struct.pack("!I", self.sent))
                self.sent += 1
                next_send += 0.01
            with contextlib.suppress(TimeoutError):
                self.received.add(struct.unpack("!I", self.sock.recv(16))[0])

    def stop(self) -> list[int]:
        """Stop sending, wait a second for the last answers: the lost numbers."""
        self.done.set()
        self.thread.join(5)
        return sorted(set(range(self.sent)) - self.received)


def live_set(provider: Provider, version: int, table: str = "earlyfw") -> str:
    return provider.client.exec(["nft", "list", "set", "inet", table, f"endpoints_v{version}"])


def connected_and_relaxed(provider: Provider, *, watch: bool = False) -> tuple[Path, Watcher | None]:
    """Imported, blocked, connected with the companion file (to X, the first
    remote), then relaxed, as the OpenVPN hook would relax it; with `watch`,
    under a running `earlyfw watch` (hook mode: it follows the relax)."""
    source = provider.write("provider.ovpn", provider_file(provider.tun, random=False))
    out, companion = provider.import_resolved(source)
    assert provider.earlyfw("--config", str(out), "lock").returncode == 0
    log = provider.workdir / "pinned.log"
    provider.client_openvpn(companion, log)
    assert wait_connected(log, 20) == f"{X}:{PORT}", log.read_text()
    watcher = (
        start_watcher(provider.lab, provider.client, PYTHON_MODULE, out, log_dir=provider.workdir) if watch else None
    )
    relaxed = provider.earlyfw("--config", str(out), "relax")
    assert relaxed.returncode == 0, relaxed.stderr
    if watcher is not None:
        watcher.wait_for(r"^relaxed: asked by")
    return out, watcher


def reaches(provider: Provider, address: IPAddress) -> bool:
    """Whether a datagram to `address`:PORT from outside the tunnel gets
    through the client's tables (main and guard) onto the wire."""
    assert isinstance(address, ipaddress.IPv4Address)
    payload = f"probe-{time.monotonic_ns()}".encode()
    with provider.pair.capture() as capture:
        send_udp(provider.client, address, PORT, payload)
        seen = capture.wait_for(lambda f: f.dst == address and f.dport == PORT and payload in f.raw, 1)
    return seen is not None


def test_refresh_while_relaxed_asks_only_through_the_tunnel_and_swaps_without_a_gap(provider: Provider) -> None:
    """With `earlyfw watch` running: the refresh reloads it, so its owned
    guard table takes the new pins with the main table and the old-only pins
    leave both (without the reload the guard kept the old pins and refused
    the new ones: checked against the code before it)."""
    out, watcher = connected_and_relaxed(provider, watch=True)
    assert watcher is not None
    # Control: before the refresh the new address W is refused.
    assert not reaches(provider, W)
    # The provider rotated nl-free-01 from X (which the tunnel is using) to W,
    # and nl-free-02 from Y to Z; the VPN's resolver knows.
    vpn_dns_log = dnsmasq(
        provider.lab, provider.pair.world, TUNNEL_SERVER, {NAME_1: f"{W},{X6}", NAME_2: str(Z)}, provider.workdir
    )
    before = configuration.load(out)
    with provider.pair.capture() as capture:
        pinger = Pinger(provider)
        netns.wait_until(lambda: len(pinger.received) > 20, 5, "echo answers through the tunnel")
        result = provider.earlyfw("--config", str(out), "endpoints", "refresh")
        time.sleep(0.5)
        # Enough echoes around the swap however fast the refresh was (one
        # took under a second, leaving 99 sent).
        netns.wait_until(lambda: pinger.sent > 100, 5, "100 echo requests sent")
        lost = pinger.stop()
        frames = capture.since(0)
    assert result.returncode == 0, result.stderr
    assert pinger.sent > 100
    assert lost == [], f"{len(lost)} of {pinger.sent} echoes lost through the tunnel during the refresh"
    assert dns_frames(frames) == [], "a refresh query left outside the tunnel"
    queries = vpn_dns_log.read_text()
    assert re.search(rf"query\[A\] {re.escape(NAME_2)} from {TUNNEL_CLIENT}", queries), queries

    after = configuration.load(out)
    assert [(str(e), e.host) for e in after.endpoints] == [
        (f"{W}:{PORT}/udp", NAME_1),
        (f"[{X6}]:{PORT}/udp", NAME_1),
        (f"{X}:{PORT}/udp", NAME_1),  # out of DNS, but the running tunnel's: kept
        (f"{Z}:{PORT}/udp", NAME_2),
    ]
    assert before.endpoints != after.endpoints
    assert f"earlyfw: added {W}:{PORT}/udp ({NAME_1})" in result.stdout
    assert f"earlyfw: kept {X}:{PORT}/udp ({NAME_1}): no longer in DNS, but the tunnel is using it" in result.stdout
    assert f"earlyfw: added {Z}:{PORT}/udp ({NAME_2})" in result.stdout
    assert f"earlyfw: removed {Y}:{PORT}/udp ({NAME_2})" in result.stdout
    for table in ("earlyfw", "earlyfw_guard"):
        v4, v6 = live_set(provider, 4, table), live_set(provider, 6, table)
        assert all(str(a) in v4 for a in (X, W, Z)) and str(Y) not in v4, (table, v4)
        assert str(X6) in v6, (table, v6)
    watcher.wait_for(rf"^reloaded {re.escape(str(out))}: \+2 -1 endpoint\(s\); still relaxed")
    assert f"earlyfw watch (pid {watcher.process.pid}, its guard table too) now pin" in result.stdout
    assert reaches(provider, W), "the new pin passes the main table and the guard"
    assert not reaches(provider, Y), "the old-only pin is gone from both"
    # (Not `earlyfw status`: nft 1.0.6 can abort listing the watcher's owned tables.)
    verdict = read_verdict(provider.tun)
    assert verdict is not None and verdict["running"] and verdict["state"] == "relaxed", verdict
    assert verdict["endpoints"] == [str(e) for e in after.endpoints]
    assert live_state(provider.client) == "relaxed"


def test_refresh_that_cannot_resolve_keeps_the_pins(provider: Provider) -> None:
    out, _ = connected_and_relaxed(provider)
    before = out.read_bytes()
    # No VPN resolver answers on 10.8.0.1: every query fails.
    result = provider.earlyfw("--config", str(out), "endpoints", "refresh")
    assert result.returncode == 0, result.stderr
    assert f"earlyfw: kept the pins of {NAME_1}" in result.stdout
    assert "earlyfw: endpoints unchanged" in result.stdout
    assert out.read_bytes() == before
    assert str(Y) in live_set(provider, 4)


def test_refresh_while_blocked_is_refused(provider: Provider) -> None:
    source = provider.write("provider.ovpn", provider_file(provider.tun, random=False))
    out, _ = provider.import_resolved(source)
    assert provider.earlyfw("--config", str(out), "lock").returncode == 0
    before = out.read_bytes()
    sets = live_set(provider, 4)
    with provider.pair.capture() as capture:
        result = provider.earlyfw("--config", str(out), "endpoints", "refresh")
        assert dns_frames(capture.since(0)) == []
    assert result.returncode == 1
    assert result.stderr.splitlines()[0].startswith("earlyfw: error: earlyfw is blocked: refresh resolves only")
    assert out.read_bytes() == before
    assert live_set(provider, 4) == sets
