"""A real WireGuard pair in two namespaces, and `earlyfw watch` running in one.

Built on tests/netns.py's client/world topology: the client (where earlyfw
runs) reaches the world over a veth; the world plays the VPN server, running
wireguard-go on 192.0.2.1:51820. Both ends are userspace WireGuard
(wireguard-go over /dev/net/tun), so the watcher reads peers over the UAPI
socket, exactly as on a machine using wireguard-go or boringtun.

Used by tests/test_watch_netns.py and bench/relax.py.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from earlyfw import config as configuration
from earlyfw import policy
from earlyfw.config import Config, Endpoint, TunnelKind
from earlyfw.linux.watcher.daemon import verdict_path
from tests import netns
from tests.netns import Lab, Namespace

TUNNEL_SERVER = ipaddress.IPv4Address("198.51.100.1")
TUNNEL_CLIENT = ipaddress.IPv4Address("198.51.100.2")
WG_PORT = 51820
UAPI_DIR = Path("/var/run/wireguard")
# A port nothing listens on, outside the tunnel: what a leak would look like.
PROBE_PORT = 9
PYTHON_MODULE: tuple[str, ...] = (sys.executable, "-m", "earlyfw")
# The watcher runs as its unit has it: only CAP_NET_ADMIN, no_new_privs, and no
# memory that is ever writable and executable (the kernel's own
# PR_SET_MDWE, the check MemoryDenyWriteExecute= makes with seccomp).
MDWE = (
    sys.executable,
    "-c",
    "import ctypes, os, sys\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0):\n"
    "    sys.exit('PR_SET_MDWE failed: Linux 6.3 or newer is needed')\n"
    "os.execvp(sys.argv[1], sys.argv[1:])",
)
RESTRICTED = (*MDWE, "setpriv", "--bounding-set=-all,+net_admin", "--no-new-privs")
TOOLS = ("wireguard-go", "wg", "setpriv")


def keypair() -> tuple[str, str]:
    private = netns.run(["wg", "genkey"]).strip()
    return private, netns.run(["wg", "pubkey"], input=private + "\n").strip()


def _quiet(ns: Namespace, argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns.name, *argv],
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@dataclass
class WireGuard:
    """One wireguard-go interface in a namespace."""

    lab: Lab
    ns: Namespace
    name: str
    private: str
    public: str
    process: subprocess.Popen[bytes] | None = None

    def start(self, address: ipaddress.IPv4Address, listen_port: int | None = None) -> None:
        self.process = _quiet(self.ns, ["wireguard-go", "-f", self.name], env={"WG_PROCESS_FOREGROUND": "1"})
        self.lab.callback(self.stop)
        netns.wait_until(self.uapi_socket.exists, 10, f"{self.name}'s UAPI socket")
        key_file = self.lab.enter_context(_Secret(self.private))
        argv = ["wg", "set", self.name, "private-key", str(key_file.path)]
        if listen_port is not None:
            argv += ["listen-port", str(listen_port)]
        self.ns.exec(argv)
        self.ns.ip_batch([f"addr add {address}/24 dev {self.name}", f"link set {self.name} up"])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        # wireguard-go removes its socket on a clean exit; make sure.
        self.uapi_socket.unlink(missing_ok=True)

    @property
    def uapi_socket(self) -> Path:
        return UAPI_DIR / f"{self.name}.sock"

    def set_peer(
        self,
        public: str,
        *,
        allowed: str,
        endpoint: str | None = None,
        keepalive: int | None = None,
    ) -> None:
        argv = ["wg", "set", self.name, "peer", public, "allowed-ips", allowed]
        if endpoint is not None:
            argv += ["endpoint", endpoint]
        if keepalive is not None:
            argv += ["persistent-keepalive", str(keepalive)]
        self.ns.exec(argv)

    def remove_peer(self, public: str) -> None:
        self.ns.exec(["wg", "set", self.name, "peer", public, "remove"])

    def transfer(self, public: str) -> tuple[int, int]:
        """Bytes received from and sent to peer `public`, handshakes included."""
        for line in self.ns.exec(["wg", "show", self.name, "transfer"]).splitlines():
            key, _, counts = line.partition("\t")
            if key == public:
                rx, _, tx = counts.partition("\t")
                return int(rx), int(tx)
        return 0, 0

    def latest_handshake(self, public: str) -> float:
        for line in self.ns.exec(["wg", "show", self.name, "latest-handshakes"]).splitlines():
            key, _, seconds = line.partition("\t")
            if key == public:
                return float(seconds)
        return 0.0


class _Secret:
    """A private key in a 0600 file for `wg set private-key`, removed afterwards."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.path = Path()

    def __enter__(self) -> _Secret:
        fd, name = _mkstemp()
        with os.fdopen(fd, "w") as f:
            f.write(self.text + "\n")
        self.path = Path(name)
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _mkstemp() -> tuple[int, str]:
    return tempfile.mkstemp(prefix="efw-wgkey-")


@dataclass
class WgPair:
    """client (earlyfw + wireguard-go) <-> world (wireguard-go server on 192.0.2.1:51820)."""

    lab: Lab
    topology: netns.ClientWorld
    client_wg: WireGuard
    server_wg: WireGuard
    endpoint: str
    # The client's PersistentKeepalive; None: off, as in many providers' configs.
    keepalive: int | None = 1

    @property
    def client(self) -> Namespace:
        return self.topology.client

    @property
    def world(self) -> Namespace:
        return self.topology.world

    def accept_client(self) -> None:
        """Let the server answer the client's handshakes."""
        self.server_wg.set_peer(self.client_wg.public, allowed=f"{TUNNEL_CLIENT}/32")

    def rehandshake(self) -> None:
        """A fresh handshake now: drop the client's session by re-adding the peer
        (its persistent keepalive, or the watcher, makes it initiate at once)."""
        self.client_wg.remove_peer(self.server_wg.public)
        self.connect_client()

    def connect_client(self) -> None:
        self.client_wg.set_peer(
            self.server_wg.public, allowed=f"{TUNNEL_SERVER}/32", endpoint=self.endpoint, keepalive=self.keepalive
        )

    def client_keepalive(self) -> str:
        """The client peer's persistent keepalive as `wg` shows it ("off" or seconds)."""
        out = self.client.exec(["wg", "show", self.client_wg.name, "persistent-keepalive"])
        return out.split("\t")[1].strip() if "\t" in out else ""

    def client_tx(self) -> int:
        """Bytes the client's WireGuard sent to the server, handshakes included."""
        return self.client_wg.transfer(self.server_wg.public)[1]

    def latest_handshake(self) -> float:
        return self.client_wg.latest_handshake(self.server_wg.public)

    def tunnel_listener(self) -> socket.socket:
        """A UDP socket on the server's tunnel address: what arrives came through the tunnel."""
        sock = self.lab.own(self.world.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sock.bind((str(TUNNEL_SERVER), PROBE_PORT))
        sock.settimeout(0.05)
        return sock

    def outside_listener(self) -> socket.socket:
        sock = self.lab.own(self.world.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sock.bind((str(netns.WORLD_V4), PROBE_PORT))
        sock.settimeout(0.05)
        return sock


def wg_pair(
    lab: Lab,
    *,
    accept: bool = True,
    endpoint: ipaddress.IPv4Address = netns.WORLD_V4,
    keepalive: int | None = 1,
    connect: bool = True,
) -> WgPair:
    topology = netns.client_world(lab, [], tag="ew")
    client_key, server_key = keypair(), keypair()
    client_wg = WireGuard(lab, topology.client, netns.unique("efwc"), *client_key)
    server_wg = WireGuard(lab, topology.world, netns.unique("efws"), *server_key)
    server_wg.start(TUNNEL_SERVER, listen_port=WG_PORT)
    client_wg.start(TUNNEL_CLIENT)
    pair = WgPair(lab, topology, client_wg, server_wg, f"{endpoint}:{WG_PORT}", keepalive)
    if accept:
        pair.accept_client()
    if connect:
        pair.connect_client()
    return pair


def config_for(
    interface: str,
    endpoints: Sequence[tuple[str, int]] = ((str(netns.WORLD_V4), WG_PORT),),
    *,
    kind: TunnelKind = TunnelKind.WIREGUARD,
    lan_allow: bool = False,
    reject_after: int = 180,
    management: Path | None = None,
) -> Config:
    return Config(
        tunnel_kind=kind,
        interface=interface,
        endpoints=tuple(Endpoint(ipaddress.ip_address(a), p) for a, p in endpoints),
        lan_allow=lan_allow,
        reject_after_seconds=reject_after,
        openvpn_management=management,
    )


def write_config(directory: Path, config: Config, name: str = "earlyfw.toml") -> Path:
    path = directory / name
    path.write_text(config.to_toml())
    return path


# --- the watcher ------------------------------------------------------------------

_CLAIM = re.compile(rf'comment "{policy.CLAIM}(\w+)"')


def live_state(ns: Namespace, table: str = "earlyfw") -> str | None:
    """The state table inet `table` claims in `ns`, or None if it is absent."""
    result = ns.exec_result(["nft", "-s", "list", "table", "inet", table])
    if result.returncode != 0:
        return None
    match = _CLAIM.search(result.stdout)
    return match[1] if match else "unknown"


@dataclass
class Watcher:
    """`earlyfw watch` in a namespace, its log in a file."""

    ns: Namespace
    argv: tuple[str, ...]
    log_path: Path
    # Before the privileges are dropped, e.g. `nice -n -10` as the unit has it.
    prefix: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.ns.name, *self.prefix, *RESTRICTED, *self.argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self) -> list[str]:
        return self.log.splitlines()

    def wait_for(self, pattern: str, timeout: float = 15, *, after: int = 0) -> str:
        """The first log line from line `after` on matching `pattern`."""
        found: list[str] = []

        def seen() -> bool:
            if self.process.poll() is not None and not found:
                raise netns.NetnsError(f"watcher exited ({self.process.returncode}):\n{self.log}")
            found[:] = [line for line in self.lines()[after:] if re.search(pattern, line)]
            return bool(found)

        try:
            netns.wait_until(seen, timeout, f"watcher log line /{pattern}/")
        except netns.NetnsError as e:
            raise netns.NetnsError(f"{e}\n--- watcher log ---\n{self.log}") from None
        return found[0]

    def signal(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_watcher(
    lab: Lab,
    ns: Namespace,
    executable: Sequence[str],
    config_path: Path,
    *extra: str,
    log_dir: Path,
    prefix: Sequence[str] = (),
) -> Watcher:
    watcher = Watcher(
        ns,
        (*executable, "--config", str(config_path), "watch", *extra),
        log_dir / f"watch-{time.monotonic_ns()}.log",
        tuple(prefix),
    )
    lab.callback(watcher.stop)
    # What it publishes for `earlyfw status` (on the host's /run: names are unique).
    lab.callback(verdict_path(configuration.load(config_path).interface).unlink, missing_ok=True)
    watcher.wait_for(r"^blocked: watcher started")
    return watcher


def send_udp(ns: Namespace, host: ipaddress.IPv4Address, port: int, payload: bytes = b"probe", count: int = 1) -> int:
    """Send `count` datagrams from `ns`; how many the local stack accepted."""
    sent = 0
    sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        for _ in range(count):
            try:
                sock.sendto(payload, (str(host), port))
                sent += 1
            except OSError:
                pass
    return sent


def received(sock: socket.socket, wait: float = 1.0) -> list[bytes]:
    """Everything `sock` gets within `wait` seconds."""
    got: list[bytes] = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(2048))
        except TimeoutError:
            continue
    return got


def echo_through_tunnel(pair: WgPair, payload: bytes, wait: float = 5.0) -> bytes:
    """A datagram from the client into the tunnel, answered by the server
    through it: the reply, or an AssertionError naming what failed (an
    application error on send, or no answer)."""
    with (
        pair.world.socket(socket.AF_INET, socket.SOCK_DGRAM) as server,
        pair.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        server.bind((str(TUNNEL_SERVER), PROBE_PORT))
        server.settimeout(0.05)
        client.settimeout(wait)
        try:
            client.sendto(payload, (str(TUNNEL_SERVER), PROBE_PORT))
        except OSError as e:
            raise AssertionError(f"the application got an error sending into the tunnel: {e}") from None
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                data, source = server.recvfrom(2048)
            except TimeoutError:
                continue
            server.sendto(data, source)
            break
        try:
            return client.recv(2048)
        except TimeoutError:
            raise AssertionError("no answer through the tunnel") from None
