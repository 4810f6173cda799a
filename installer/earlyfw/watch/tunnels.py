"""What counts as proof that the tunnel is live, per tunnel kind.

The verdict functions are pure (config, observations, clock in; state and
reason out) so each rule is tested on its own; the Tunnel classes gather the
observations and say when to look again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from earlyfw.config import Config, IPAddress, TunnelKind
from earlyfw.config import Protocol as Transport
from earlyfw.policy import State
from earlyfw.run import Runner
from earlyfw.watch import openvpn
from earlyfw.watch.openvpn import Management, StateEvent
from earlyfw.watch.sources import (
    SYS_CLASS_NET,
    InterfaceGone,
    Peer,
    PeerSource,
    SourceError,
    SourceKind,
    format_endpoint,
    make_source,
)

# The wall clock, read when the verdict is made.
Clock = Callable[[], float]

# How long a watcher with nothing to wait for sleeps between looks: a relaxed
# tunnel's interface and handshake age, a missing interface, a closed
# management socket. Netlink link events and the handshake deadline cut it short.
IDLE_POLL = 1.0
# A handshake stamped up to this far in the future (clock granularity between
# the tunnel and the watcher) still counts.
CLOCK_SLACK = 1.0
# After this long blocked with no handshake, say why WireGuard may not be trying.
KEEPALIVE_HINT_AFTER = 15.0
# After a handshake packet arrives, poll fast this long: WireGuard records the
# handshake a moment after the packet (the responder, after the first data).
WAKE_BURST = 1.0


@dataclass(frozen=True)
class Verdict:
    state: State
    reason: str
    # Seconds after which the verdict may change with no event: a handshake
    # ages out, a poll is due.
    recheck: float = IDLE_POLL


def _udp_endpoints(config: Config) -> frozenset[tuple[IPAddress, int]]:
    return frozenset((e.address, e.port) for e in config.endpoints if e.protocol is Transport.UDP)


def wireguard_verdict(config: Config, peers: tuple[Peer, ...], *, now: float, not_before: float) -> Verdict:
    """RELAXED iff a peer whose endpoint is a configured UDP endpoint completed
    a handshake less than reject_after_seconds ago, and after `not_before`
    (the last lock request or resume from suspend)."""
    allowed = _udp_endpoints(config)
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


def openvpn_verdict(
    config: Config, event: StateEvent | None, *, seen_at: float, not_before: float, problem: str | None
) -> Verdict:
    """RELAXED iff OpenVPN's last state is CONNECTED to a configured endpoint,
    reported after `not_before`."""
    if problem is not None:
        return Verdict(State.BLOCKED, problem)
    if event is None:
        return Verdict(State.BLOCKED, "waiting for OpenVPN's state")
    if event.name != openvpn.CONNECTED:
        return Verdict(State.BLOCKED, f"OpenVPN is {event.name}")
    if event.remote not in {(e.address, e.port) for e in config.endpoints}:
        return Verdict(State.BLOCKED, f"OpenVPN is connected to {format_endpoint(event.remote)}, not an endpoint")
    if seen_at <= not_before:
        return Verdict(State.BLOCKED, "OpenVPN's CONNECTED predates the last lock or resume")
    return Verdict(State.RELAXED, f"OpenVPN CONNECTED to {format_endpoint(event.remote)}")


class Tunnel(Protocol):
    # True where an outside `earlyfw relax` / `earlyfw lock` is the decision
    # (manual, OpenVPN hook scripts); False where the watcher decides and an
    # outside relax is refused unless the proof holds.
    follows_requests: bool

    def fileno(self) -> int | None: ...

    def on_readable(self) -> None: ...

    def request(self, state: State) -> None: ...

    # `now` is read after the tunnel is observed: a first read can take
    # seconds (a library import under a slow CPU), and a handshake recorded
    # meanwhile must not look as if it came from the future.
    def evaluate(self, now: Clock, not_before: float) -> Verdict: ...

    def close(self) -> None: ...


class WireGuardTunnel:
    follows_requests = False

    def __init__(self, config: Config, source: PeerSource) -> None:
        self.config = config
        self.source = source
        self.hint: str | None = None
        self._blocked_since: float | None = None
        # True once handshake packets wake the watcher (see ruleset.wake_script):
        # then a blocked tunnel is polled fast only right after one.
        self.woken = False
        self._burst_until = 0.0

    def wake(self) -> None:
        self._burst_until = time.monotonic() + WAKE_BURST

    def fileno(self) -> int | None:
        return None

    def on_readable(self) -> None:
        pass

    def request(self, state: State) -> None:
        pass

    def evaluate(self, now: Clock, not_before: float) -> Verdict:
        try:
            peers = self.source.peers()
        except InterfaceGone as e:
            self._blocked_since = None
            return Verdict(State.BLOCKED, str(e))
        except SourceError as e:
            return Verdict(State.BLOCKED, f"cannot read {self.config.interface}'s peers: {e}")
        at = now()
        verdict = wireguard_verdict(self.config, peers, now=at, not_before=not_before)
        if verdict.state is State.RELAXED:
            self._blocked_since = None
            return Verdict(verdict.state, verdict.reason, recheck=min(IDLE_POLL, verdict.recheck))
        self._keepalive_hint(peers, at)
        waiting = not self.woken or time.monotonic() < self._burst_until
        return Verdict(verdict.state, verdict.reason, recheck=self.source.fast_poll if waiting else IDLE_POLL)

    def _keepalive_hint(self, peers: tuple[Peer, ...], now: float) -> None:
        # WireGuard starts a handshake only when it has a packet to send, and
        # while blocked nothing can be sent into the tunnel: without
        # PersistentKeepalive it may never try.
        if self._blocked_since is None:
            self._blocked_since = now
        ours = [p for p in peers if p.endpoint in _udp_endpoints(self.config)]
        if now - self._blocked_since > KEEPALIVE_HINT_AFTER and ours and not any(p.keepalive for p in ours):
            self.hint = (
                f"no handshake on {self.config.interface} and its peers have no PersistentKeepalive: "
                "WireGuard only starts a handshake when it has something to send, which the block "
                "prevents; set PersistentKeepalive = 25"
            )

    def close(self) -> None:
        self.source.close()


class OpenVPNTunnel:
    """With a management socket, OpenVPN's state decides. Without one, the
    --up/--down hook earlyfw installs runs `earlyfw relax` / `earlyfw lock`,
    and the watcher follows those, locking on its own if the interface goes."""

    def __init__(self, config: Config, sys_class_net: Path = SYS_CLASS_NET) -> None:
        self.config = config
        self.sys_class_net = sys_class_net
        path = config.openvpn_management
        self.management = Management(path) if path is not None else None
        self.follows_requests = self.management is None
        self.requested = State.BLOCKED
        self.last: StateEvent | None = None
        self.seen_at = 0.0
        # After OpenVPN closes the socket, wait a moment before reconnecting,
        # so the log says it stopped rather than that a reconnect failed.
        self._retry_at = 0.0

    def fileno(self) -> int | None:
        return self.management.fileno() if self.management else None

    def on_readable(self) -> None:
        if self.management is None:
            return
        for event in self.management.read():
            self.last = event
            # History lines carry OpenVPN's whole-second clock; a live
            # notification is "now" at sub-second precision.
            self.seen_at = time.time() if event.live else float(event.timestamp)
        if self.management.sock is None:
            self.last = None
            self._retry_at = time.monotonic() + IDLE_POLL

    def request(self, state: State) -> None:
        self.requested = state

    def evaluate(self, now: Clock, not_before: float) -> Verdict:
        if not (self.sys_class_net / self.config.interface).exists():
            self.requested = State.BLOCKED
            return Verdict(State.BLOCKED, f"interface {self.config.interface} does not exist")
        if self.management is None:
            return Verdict(self.requested, "as the OpenVPN hook asked")
        if self.management.sock is None and time.monotonic() >= self._retry_at and not self.management.connect():
            self.last = None
        return openvpn_verdict(
            self.config, self.last, seen_at=self.seen_at, not_before=not_before, problem=self.management.problem
        )

    def close(self) -> None:
        if self.management is not None:
            self.management.close()


class ManualTunnel:
    follows_requests = True

    def __init__(self) -> None:
        self.requested = State.BLOCKED

    def fileno(self) -> int | None:
        return None

    def on_readable(self) -> None:
        pass

    def request(self, state: State) -> None:
        self.requested = state

    def evaluate(self, now: Clock, not_before: float) -> Verdict:
        return Verdict(self.requested, "as `earlyfw relax` / `earlyfw lock` asked", recheck=60.0)

    def close(self) -> None:
        pass


def make_tunnel(config: Config, runner: Runner, source: SourceKind = SourceKind.AUTO) -> Tunnel:
    match config.tunnel_kind:
        case TunnelKind.WIREGUARD:
            return WireGuardTunnel(config, make_source(source, config.interface, runner))
        case TunnelKind.OPENVPN:
            return OpenVPNTunnel(config)
        case TunnelKind.MANUAL:
            return ManualTunnel()
