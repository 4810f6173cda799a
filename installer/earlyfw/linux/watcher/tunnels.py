"""What counts as proof that the tunnel is live, per tunnel kind.

The verdict functions are pure (config, observations, clock in; state and
reason out) so each rule is tested on its own; the WireGuard one is every
platform's (earlyfw.handshake). The Tunnel classes gather the observations,
on the watcher's clock, and say when to look again.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from earlyfw.config import Config, TunnelKind
from earlyfw.errors import EarlyfwError
from earlyfw.handshake import (
    IDLE_POLL,
    Peer,
    SourceError,
    Verdict,
    format_endpoint,
    udp_endpoints,
    wireguard_verdict,
)
from earlyfw.linux.watcher import openvpn
from earlyfw.linux.watcher.openvpn import Management, StateEvent
from earlyfw.linux.watcher.sources import SYS_CLASS_NET, InterfaceGone, PeerSource, SourceKind, make_source
from earlyfw.policy import State
from earlyfw.run import Runner


@dataclass
class Clock:
    """The watcher's clocks, one object for the loop and its tunnel, so a
    test can drive both."""

    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    # Runs through suspend, where monotonic stops: the daemon tells sleep by the gap.
    boottime: Callable[[], float] = field(default=lambda: time.clock_gettime(time.CLOCK_BOOTTIME))


# After a handshake packet arrives, poll fast this long: WireGuard records the
# handshake a moment after the packet (the responder, after the first data).
WAKE_BURST = 1.0
IFF_UP = 0x1

# WireGuard's own timers (the kernel's messages.h, wireguard-go's constants.go).
# A session's keys are renewed by its initiator when it sends on keys this old,
REKEY_AFTER_TIME = 120
# and no packet is sent or accepted on keys this old: the next one needs a handshake;
REJECT_AFTER_TIME = 180
# a handshake is retried every REKEY_TIMEOUT (plus up to 1/3 s of jitter),
REKEY_TIMEOUT = 5
# and given up this long after the first attempt.
REKEY_ATTEMPT_TIME = 90
# Traffic that needed a new handshake and none completed this long after the
# watcher saw it leave: WireGuard has given up on it, the tunnel is dead.
DEAD_AFTER = REKEY_ATTEMPT_TIME + REKEY_TIMEOUT + 2 * IDLE_POLL

# Starting a handshake: WireGuard starts one only when it has a packet to send,
# and while blocked nothing is sent into the tunnel. Turning a peer's
# persistent keepalive on makes both the kernel and wireguard-go send one
# keepalive at once, which starts a handshake when there is no session; the
# peer's own value (0) is put back right after. Runtime state only.
KICK_KEEPALIVE = 25
# WireGuard retries a started handshake on its own for REKEY_ATTEMPT_TIME.
KICK_AGAIN_AFTER = REKEY_ATTEMPT_TIME
# A start that sent nothing (wireguard-go sees its link come up a moment after
# the watcher does, and sends nothing while down) is tried again this soon.
KICK_RETRY = 0.1
# Blocked with nothing started (no peer, interface down): WireGuard announces
# no configuration change, so look this often for a peer to appear.
WAITING_POLL = 0.2
# Blocked this long in the same situation: say what the user can do about it.
HINT_AFTER = 15.0


class Situation(StrEnum):
    """What `status` and the journal say besides the state."""

    ACTIVE = "tunnel active"
    IDLE = "tunnel idle"
    PENDING = "handshake pending"
    NO_INTERFACE = "no interface"
    INTERFACE_DOWN = "interface down"
    NO_PEER = "no peer"
    NOT_CONFIGURED = "peer endpoint not configured"
    UNANSWERED = "handshake unanswered"
    AFTER_LOCK = "waiting for a handshake newer than the lock"
    UNREADABLE = "tunnel unreadable"
    CONNECTED = "connected"
    NOT_CONNECTED = "not connected"
    FOLLOWING = "following requests"


def openvpn_verdict(
    config: Config, event: StateEvent | None, *, seen_at: float, not_before: float, problem: str | None
) -> Verdict:
    """RELAXED iff OpenVPN's last state is CONNECTED to a configured endpoint,
    reported after `not_before`."""
    waiting = Situation.NOT_CONNECTED
    if problem is not None:
        return Verdict(State.BLOCKED, problem, situation=waiting)
    if event is None:
        return Verdict(State.BLOCKED, "waiting for OpenVPN's state", situation=waiting)
    if event.name != openvpn.CONNECTED:
        return Verdict(State.BLOCKED, f"OpenVPN is {event.name}", situation=waiting)
    if event.remote not in {(e.address, e.port) for e in config.endpoints}:
        reason = f"OpenVPN is connected to {format_endpoint(event.remote)}, not an endpoint"
        return Verdict(State.BLOCKED, reason, situation=Situation.NOT_CONFIGURED)
    if seen_at <= not_before:
        return Verdict(State.BLOCKED, "OpenVPN's CONNECTED predates the last lock or resume", situation=waiting)
    # Idle or busy alike: OpenVPN's own ping / ping-restart decides when the
    # tunnel is dead, and says so by leaving CONNECTED.
    return Verdict(
        State.RELAXED, f"OpenVPN CONNECTED to {format_endpoint(event.remote)}", situation=Situation.CONNECTED
    )


class Tunnel(ABC):
    """What the watcher asks of every tunnel kind alike. The defaults are a
    tunnel's with nothing to read and no handshake packet to hear."""

    # True where an outside `earlyfw relax` / `earlyfw lock` is the decision
    # (manual, OpenVPN hook scripts); False where the watcher decides and an
    # outside relax is refused unless the proof holds.
    follows_requests: bool
    # True where a handshake packet is news (WireGuard): the watcher then has
    # the kernel wake it on one (ruleset.wake_script) and sets `woken` once it does.
    wakes_on_handshakes = False

    def __init__(self, config: Config) -> None:
        # Replaced on a reload; what the tunnel has observed stays.
        self.config = config
        self.woken = False
        # The current advice for the user, None when there is none; the
        # watcher decides when to repeat it.
        self.hint: str | None = None
        # One-line notes for the journal since the watcher last took them.
        self.notes: list[str] = []
        # The UDP port only the tunnel's own socket holds (WireGuard's listen
        # port) as of the last evaluate(); None where not known.
        self.listen_port: int | None = None

    def fileno(self) -> int | None:
        return None

    def on_readable(self) -> None:
        """The file descriptor fileno() gave has something to read."""

    def wake(self) -> None:
        """A handshake packet arrived."""

    @abstractmethod
    def request(self, state: State) -> None:
        """An outside `earlyfw relax` or `earlyfw lock`."""

    # The wall clock is read after the tunnel is observed: a first read can
    # take seconds (a library import under a slow CPU), and a handshake
    # recorded meanwhile must not look as if it came from the future.
    @abstractmethod
    def evaluate(self, not_before: float) -> Verdict: ...

    def close(self) -> None:
        """Let go of what the tunnel holds open."""


@dataclass
class _Track:
    """What the watcher remembers of one peer between looks."""

    handshake: float | None
    tx: int
    # Wall-clock time the watcher first saw the peer send with no valid
    # session (a handshake initiation went out): the dead clock runs from it.
    needs_since: float | None = None
    # Monotonic time the watcher last started a handshake with this peer, and
    # the peer's tx then: unchanged since, nothing went out.
    kicked_at: float | None = None
    kicked_tx: int = 0
    # Wall-clock time this peer was first seen waiting for a handshake.
    waiting_since: float | None = None


def _stamp(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))


class WireGuardTunnel(Tunnel):
    follows_requests = False
    # Once handshake packets wake the watcher (`woken`), a blocked tunnel is
    # polled fast only right after one.
    wakes_on_handshakes = True

    def __init__(
        self, config: Config, source: PeerSource, sys_class_net: Path = SYS_CLASS_NET, *, clock: Clock | None = None
    ) -> None:
        super().__init__(config)
        self.source = source
        self.sys_class_net = sys_class_net
        self.clock = clock or Clock()
        self._burst_until = 0.0
        self._tracks: dict[str, _Track] = {}
        # (ifindex, up) at the last look: a new index is a new interface.
        self._link: tuple[int, bool] | None = None
        # True while the last verdict relaxed: only then does "idle, not dead" apply.
        self._live = False
        self._situation: tuple[str, float] | None = None

    def wake(self) -> None:
        self._burst_until = self.clock.monotonic() + WAKE_BURST

    def request(self, state: State) -> None:
        if state is State.BLOCKED:
            self._live = False

    def evaluate(self, not_before: float) -> Verdict:
        self.listen_port = None
        try:
            peers = self.source.peers()
            self.listen_port = self.source.listen_port
        except InterfaceGone as e:
            self._forget()
            verdict = Verdict(State.BLOCKED, str(e), situation=Situation.NO_INTERFACE)
            return self._blocked(verdict, self.clock.wall())
        except SourceError as e:
            self._live = False
            reason = f"cannot read {self.config.interface}'s peers: {e}"
            return self._blocked(Verdict(State.BLOCKED, reason, situation=Situation.UNREADABLE), self.clock.wall())
        at = self.clock.wall()
        replaced = self._observe_link()
        self._observe(peers, at)
        proof = wireguard_verdict(self.config, peers, now=at, not_before=not_before)
        if proof.state is State.RELAXED:
            self._live = True
            self._situation = None
            self.hint = None
            if self._in_session(peers, at, not_before):
                return Verdict(State.RELAXED, proof.reason, min(IDLE_POLL, proof.recheck), Situation.ACTIVE)
            # A reject_after_seconds above WireGuard's session: proof enough
            # to relax, but the session is over; the liveness rules apply.
        dead = f"interface {self.config.interface} was replaced" if replaced else None
        if self._live and not replaced:
            idle, dead = self._liveness(peers, at, not_before)
            if idle is not None:
                return idle
        self._live = False
        return self._waiting(peers, at, not_before, proof, dead)

    def _in_session(self, peers: tuple[Peer, ...], at: float, not_before: float) -> bool:
        allowed = udp_endpoints(self.config)
        return any(
            p.endpoint in allowed
            and p.last_handshake is not None
            and not_before < p.last_handshake
            and at - p.last_handshake < REJECT_AFTER_TIME
            for p in peers
        )

    # --- relaxed: idle is not dead ------------------------------------------------------

    def _liveness(self, peers: tuple[Peer, ...], at: float, not_before: float) -> tuple[Verdict | None, str]:
        """A relaxed tunnel with no fresh handshake stays relaxed while one of
        its peers is idle (nothing sent since its session ended) or waiting
        for a handshake WireGuard has not given up on yet."""
        allowed = udp_endpoints(self.config)
        dead = f"no peer of {self.config.interface} at a configured endpoint is left"
        best: Verdict | None = None
        for peer in peers:
            if peer.last_handshake is None or peer.last_handshake <= not_before:
                continue
            if peer.endpoint not in allowed:
                dead = f"{peer.describe()} is not a configured endpoint"
                continue
            track = self._tracks[peer.public_key]
            shook = f"last handshake at {_stamp(peer.last_handshake)}"
            if track.needs_since is None:
                reason = (
                    f"{peer.describe()}: nothing sent since its session ended ({shook}); "
                    "the next packet starts a handshake"
                )
                return Verdict(State.RELAXED, reason, IDLE_POLL, Situation.IDLE), ""
            deadline = track.needs_since + DEAD_AFTER
            if at < deadline:
                reason = (
                    f"{peer.describe()}: traffic since {_stamp(track.needs_since)} waits for a handshake "
                    f"({shook}); locking at {_stamp(deadline)} if none completes"
                )
                best = best or Verdict(State.RELAXED, reason, min(IDLE_POLL, deadline - at), Situation.PENDING)
            else:
                dead = (
                    f"{peer.describe()}: traffic sent at {_stamp(track.needs_since)} and no handshake completed "
                    f"within {DEAD_AFTER}s ({shook}): the tunnel is dead"
                )
        return best, dead

    # --- blocked: make WireGuard try, and say why it is still blocked -------------------------

    def _waiting(
        self, peers: tuple[Peer, ...], at: float, not_before: float, proof: Verdict, dead: str | None
    ) -> Verdict:
        allowed = udp_endpoints(self.config)
        ours = [p for p in peers if p.endpoint in allowed]
        up = self._link is None or self._link[1]
        reason = proof.reason if dead is None else f"{dead}; {proof.reason}"
        if not peers:
            verdict = Verdict(State.BLOCKED, f"{self.config.interface} has no peer", WAITING_POLL, Situation.NO_PEER)
            return self._blocked(verdict, at, dead)
        if not ours:
            verdict = Verdict(State.BLOCKED, reason, WAITING_POLL, Situation.NOT_CONFIGURED)
            return self._blocked(verdict, at, dead)
        if not up:
            verdict = Verdict(
                State.BLOCKED, f"interface {self.config.interface} is down", WAITING_POLL, Situation.INTERFACE_DOWN
            )
            return self._blocked(verdict, at, dead)
        started: list[str] = []
        for peer in ours:
            track = self._tracks[peer.public_key]
            if track.waiting_since is None:
                track.waiting_since = at
            if peer.keepalive == 0 and self._kick(peer, track):
                started.append(peer.describe())
        since = min(self._tracks[p.public_key].waiting_since or at for p in ours)
        newest = max((p.last_handshake or 0.0 for p in ours), default=0.0)
        if 0 < newest <= not_before and at - newest < REJECT_AFTER_TIME:
            # Its session is still valid, so WireGuard makes no new handshake
            # until it renews it, REKEY_AFTER_TIME to REJECT_AFTER_TIME after the last.
            situation = Situation.AFTER_LOCK
            reason = (
                f"{reason}; its session from {_stamp(newest)} is still valid, renewed by "
                f"{_stamp(newest + REJECT_AFTER_TIME)} at the latest"
            )
        else:
            situation = Situation.UNANSWERED
            how = "initiated" if not started else "initiated by earlyfw"
            reason = f"{reason}; handshake {how} and unanswered since {_stamp(since)}"
        waiting = not self.woken or self.clock.monotonic() < self._burst_until
        recheck = self.source.fast_poll if waiting else IDLE_POLL
        if any(self._unconfirmed(p) for p in ours):
            recheck = min(recheck, KICK_RETRY)
        return self._blocked(Verdict(State.BLOCKED, reason, recheck, situation), at, dead)

    def _unconfirmed(self, peer: Peer) -> bool:
        """Started, and nothing seen going out since."""
        track = self._tracks[peer.public_key]
        return track.kicked_at is not None and peer.tx <= track.kicked_tx

    def _kick(self, peer: Peer, track: _Track) -> bool:
        mono = self.clock.monotonic()
        if track.kicked_at is not None:
            wait = KICK_AGAIN_AFTER if peer.tx > track.kicked_tx else KICK_RETRY
            if mono - track.kicked_at < wait:
                return False
        track.kicked_at, track.kicked_tx = mono, peer.tx
        try:
            self.source.set_keepalive(peer.public_key, KICK_KEEPALIVE)
        except EarlyfwError as e:
            self.notes.append(f"could not start a handshake with {peer.describe()}: {e}")
            return False
        finally:
            # Whatever happened, the peer's own value goes back.
            try:
                self.source.set_keepalive(peer.public_key, peer.keepalive)
            except EarlyfwError as e:
                own = peer.keepalive
                self.notes.append(f"could not restore {peer.describe()}'s persistent keepalive of {own}: {e}")
        return True

    def _blocked(self, verdict: Verdict, at: float, dead: str | None = None) -> Verdict:
        if dead is not None and dead not in verdict.reason:
            verdict = Verdict(verdict.state, f"{dead}; {verdict.reason}", verdict.recheck, verdict.situation)
        if self._situation is None or self._situation[0] != verdict.situation:
            self._situation = (verdict.situation, at)
        self.hint = self._hint(verdict.situation) if at - self._situation[1] >= HINT_AFTER else None
        return verdict

    def _hint(self, situation: str) -> str | None:
        name = self.config.interface
        where = self.config.source or "earlyfw.toml"
        match situation:
            case Situation.NO_INTERFACE:
                return f"{name} does not exist: bring the tunnel up (wg-quick up {name}, or its network manager)"
            case Situation.INTERFACE_DOWN:
                return f"{name} is down: no handshake can start until it is up (ip link set {name} up)"
            case Situation.NO_PEER:
                return f"{name} has no peer: nothing to shake hands with; configure the server as its peer"
            case Situation.NOT_CONFIGURED:
                return (
                    f"no peer of {name} is at an [[endpoint]] of {where}: earlyfw relaxes only for the "
                    "endpoints it lets through; list the server's address and port there"
                )
            case Situation.UNANSWERED:
                return (
                    f"the server has not answered {name}'s handshake: check that it is up, that it has "
                    "this machine's public key, and that its endpoint is right"
                )
        return None

    # --- observations ------------------------------------------------------------------------

    def _forget(self) -> None:
        self._live = False
        self._tracks.clear()
        self._link = None

    def _observe_link(self) -> bool:
        """Read the interface's index and up flag; True if it was replaced."""
        base = self.sys_class_net / self.config.interface
        try:
            index = int((base / "ifindex").read_text())
            up = bool(int((base / "flags").read_text(), 16) & IFF_UP)
        except (OSError, ValueError):
            return False
        link, self._link = self._link, (index, up)
        if link is not None and link[0] != index:
            self._tracks.clear()
            return True
        if link is not None and link[1] != up:
            for track in self._tracks.values():
                track.kicked_at = None  # down and up again: start anew
        return False

    def _observe(self, peers: tuple[Peer, ...], at: float) -> None:
        tracks: dict[str, _Track] = {}
        for peer in peers:
            track = self._tracks.get(peer.public_key)
            if track is None or track.handshake != peer.last_handshake or peer.tx < track.tx:
                # New, newly shaken hands, or removed and added again.
                track = _Track(peer.last_handshake, peer.tx)
            elif peer.tx > track.tx:
                expired = peer.last_handshake is None or at - peer.last_handshake >= REJECT_AFTER_TIME
                if expired and track.needs_since is None:
                    track.needs_since = at
                track.tx = peer.tx
            tracks[peer.public_key] = track
        self._tracks = tracks

    def close(self) -> None:
        self.source.close()


class OpenVPNTunnel(Tunnel):
    """With a management socket, OpenVPN's state decides. Without one, the
    --up/--down hook earlyfw installs runs `earlyfw relax` / `earlyfw lock`,
    and the watcher follows those, locking on its own if the interface goes."""

    def __init__(self, config: Config, sys_class_net: Path = SYS_CLASS_NET, *, clock: Clock | None = None) -> None:
        super().__init__(config)
        self.sys_class_net = sys_class_net
        self.clock = clock or Clock()
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
            self.seen_at = self.clock.wall() if event.live else float(event.timestamp)
        if self.management.sock is None:
            self.last = None
            self._retry_at = self.clock.monotonic() + IDLE_POLL

    def request(self, state: State) -> None:
        self.requested = state

    def evaluate(self, not_before: float) -> Verdict:
        if not (self.sys_class_net / self.config.interface).exists():
            self.requested = State.BLOCKED
            reason = f"interface {self.config.interface} does not exist"
            return Verdict(State.BLOCKED, reason, situation=Situation.NO_INTERFACE)
        if self.management is None:
            return Verdict(self.requested, "as the OpenVPN hook asked", situation=Situation.FOLLOWING)
        if self.management.sock is None and self.clock.monotonic() >= self._retry_at and not self.management.connect():
            self.last = None
        return openvpn_verdict(
            self.config, self.last, seen_at=self.seen_at, not_before=not_before, problem=self.management.problem
        )

    def close(self) -> None:
        if self.management is not None:
            self.management.close()


class ManualTunnel(Tunnel):
    follows_requests = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.requested = State.BLOCKED

    def request(self, state: State) -> None:
        self.requested = state

    def evaluate(self, not_before: float) -> Verdict:
        return Verdict(
            self.requested, "as `earlyfw relax` / `earlyfw lock` asked", recheck=60.0, situation=Situation.FOLLOWING
        )


def make_tunnel(config: Config, runner: Runner, clock: Clock, source: SourceKind = SourceKind.AUTO) -> Tunnel:
    match config.tunnel_kind:
        case TunnelKind.WIREGUARD:
            return WireGuardTunnel(config, make_source(source, config.interface, runner), clock=clock)
        case TunnelKind.OPENVPN:
            return OpenVPNTunnel(config, clock=clock)
        case TunnelKind.MANUAL:
            return ManualTunnel(config)
