"""A WireGuard handshake as proof that the tunnel is live, on any platform.

Each platform's watcher reads its peers its own way (earlyfw.linux.watcher
through the UAPI socket, netlink or `wg`; earlyfw.windows.watcher through
`wg.exe show TUNNEL dump`) and decides with the one rule here: a peer at a
configured UDP endpoint completed a handshake recently enough, and after the
last lock.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from earlyfw.config import Config, IPAddress, Transport
from earlyfw.errors import EarlyfwError
from earlyfw.policy import State

# How long a watcher with nothing to wait for waits before it looks again: a
# relaxed tunnel's interface and counters, a missing interface, a closed
# management socket. Events and the handshake deadline cut it short.
IDLE_POLL = 1.0
# A handshake stamped up to this far in the future (clock granularity between
# the tunnel and the watcher) still counts.
CLOCK_SLACK = 1.0


class SourceError(EarlyfwError):
    """The peers could not be read; the watcher stays (or becomes) blocked."""


@dataclass(frozen=True)
class Peer:
    public_key: str  # base64, as `wg` shows it
    # Where the peer's packets come from and go to: the address WireGuard last
    # authenticated a packet from (it roams), or the configured one.
    endpoint: tuple[IPAddress, int] | None
    last_handshake: float | None  # wall-clock seconds since the epoch; None: never
    keepalive: int = 0
    # Bytes received from and sent to the peer, handshake messages included:
    # what tells an idle tunnel (nothing sent) from a dead one (sent, unanswered).
    rx: int = 0
    tx: int = 0

    def describe(self) -> str:
        return f"peer {self.public_key[:8]}… at {format_endpoint(self.endpoint)}"


def format_endpoint(endpoint: tuple[IPAddress, int] | None) -> str:
    if endpoint is None:
        return "(no endpoint)"
    address, port = endpoint
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def parse_endpoint(text: str) -> tuple[IPAddress, int]:
    """'192.0.2.1:51820' or '[2001:db8::1]:51820'; IPv4-mapped IPv6 becomes IPv4."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise SourceError(f"endpoint {text!r} is not ADDRESS:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise SourceError(f"endpoint {text!r} has no IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address, int(port)


def handshake_time(seconds: int, nanoseconds: int) -> float | None:
    """WireGuard's last-handshake timestamp; all zero means never."""
    return None if seconds == 0 and nanoseconds == 0 else seconds + nanoseconds / 1e9


def parse_wg_dump(text: str) -> tuple[Peer, ...]:
    """`wg show IF dump`: the interface line (4 fields), then per peer
    public-key, preshared-key, endpoint, allowed-ips, latest-handshake,
    transfer-rx, transfer-tx, persistent-keepalive, tab-separated."""
    lines = [line for line in text.splitlines() if line]
    if not lines:
        raise SourceError("wg show dump: empty output")
    if len(lines[0].split("\t")) != 4:
        raise SourceError(f"wg show dump: unexpected interface line {lines[0]!r}")
    peers = []
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) != 8:
            raise SourceError(f"wg show dump: unexpected peer line {line!r}")
        key, _psk, endpoint, _ips, latest, rx, tx, keepalive = fields
        for name, value in (("latest-handshake", latest), ("transfer-rx", rx), ("transfer-tx", tx)):
            if not value.isdigit():
                raise SourceError(f"wg show dump: {name} {value!r} is not a number")
        peers.append(
            Peer(
                key,
                None if endpoint == "(none)" else parse_endpoint(endpoint),
                handshake_time(int(latest), 0),
                0 if keepalive == "off" else int(keepalive),
                int(rx),
                int(tx),
            )
        )
    return tuple(peers)


@dataclass(frozen=True)
class Verdict:
    state: State
    reason: str
    # Seconds after which the verdict may change with no event: a handshake
    # ages out, a poll is due.
    recheck: float = IDLE_POLL
    situation: str = ""


def udp_endpoints(config: Config) -> frozenset[tuple[IPAddress, int]]:
    """Where a WireGuard peer may be: WireGuard speaks UDP only."""
    return frozenset((e.address, e.port) for e in config.endpoints if e.protocol is Transport.UDP)


def wireguard_verdict(config: Config, peers: tuple[Peer, ...], *, now: float, not_before: float) -> Verdict:
    """RELAXED iff a peer whose endpoint is a configured UDP endpoint completed
    a handshake less than reject_after_seconds ago, and after `not_before`
    (the last lock request or resume from suspend)."""
    allowed = udp_endpoints(config)
    limit = config.reject_after_seconds
    best: tuple[Peer, float] | None = None
    why = f"no peer of {config.interface} has completed a handshake"
    for peer in peers:
        if peer.endpoint not in allowed:
            if peer.last_handshake is not None:
                why = f"{peer.describe()} is not a configured endpoint"
            continue
        if peer.last_handshake is None:
            continue
        age = now - peer.last_handshake
        if peer.last_handshake <= not_before:
            why = f"{peer.describe()}: last handshake predates the last lock or resume"
        elif age >= limit:
            why = f"{peer.describe()}: last handshake {age:.0f}s ago, over {limit}s"
        elif age < -CLOCK_SLACK:
            why = f"{peer.describe()}: handshake time is {-age:.0f}s in the future"
        elif best is None or peer.last_handshake > best[0].last_handshake:  # type: ignore[operator]
            best = (peer, age)
    if best is None:
        return Verdict(State.BLOCKED, why)
    peer, age = best
    return Verdict(State.RELAXED, f"{peer.describe()}: handshake {max(age, 0.0):.3f}s ago", recheck=limit - age)
