"""What the WireGuard boot must show, read from its report and its capture.

Every time here is the guest's uptime: the probe stamps its attempts from
/proc/uptime, the journal's monotonic clock is the same clock (a guest never
suspends), and capture times (seconds from power-on) become uptime through
the leak sources' endpoint probes (pcap.Capture.uptime_offset).

wg0 has no keepalive, so at boot only traffic into it (refused by the block)
or earlyfw's watcher can start its handshake (the peer cannot: it learns the
guest's address from that handshake).

With the watcher: the journal says blocked, then that it started the handshake
itself, then relaxed, and the relax comes after the handshake response reached
the guest; the peer's keepalive is back to none at the end; no probe was
answered through the tunnel before the relax, and probes are after it; then,
with the watcher running, an outside lock holds while the tunnel's session is
live, and only a fresh handshake relaxes again; meanwhile nobody's own
datagram to the endpoint is refused, never the tunnel's packets (EndpointHole).
The unit is active and never restarted. The control (the same guest without
the watcher) first shows that nothing else starts the handshake: wg0 up with
its peer for seconds, probes refused, not one initiation. Then the report
starts one as the watcher would, and still no probe and no packet goes
through its tunnel: the relax is what opens it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from qemu import boot, pcap

PEER_GATEWAY = ipaddress.IPv4Address("10.0.2.2")
WG_PORT = 51820
# WireGuard message types (the first byte of every datagram).
HANDSHAKE_INITIATION = 1
HANDSHAKE_RESPONSE = 2
TRANSPORT_DATA = 4
# A transport message carrying no packet: WireGuard's keepalive, which the
# module sends itself as UDP to the endpoint, never through wg0's filter.
KEEPALIVE_BYTES = 32
# journald stamps a line when it reads it, a moment after the watcher put the
# relaxed ruleset in place; a probe answered in that moment got through legitimately.
RELAX_SLACK = 0.5
# After this long past the relax every probe must get through.
SETTLED = 1.0
# Locked this long with the 20 ms pinger running and no packet in the tunnel
# shows the lock held, even where the probe's slower rounds fit fewer than two.
MIN_LOCKED_WINDOW = 0.2
# The control's probes after the handshake: enough to show the tunnel was up
# and the block held.
MIN_ATTEMPTS_AFTER_HANDSHAKE = 8

LINE = re.compile(r"^\[\s*(\d+\.\d+)\]\s?\S+\s+([^:\[]+)(?:\[\d+\])?:\s(.*)$")
RELAXED = re.compile(r"^relaxed: .*handshake (\d+\.\d+)s ago")
# The watcher's line when it starts a handshake itself (tunnels.WireGuardTunnel._waiting).
KICKED = re.compile(r"^blocked, .*handshake initiated by earlyfw")
INTERFACE_DOWN = re.compile(r"^blocked, interface down: ")
KEEPALIVE = re.compile(r"^\s*persistent keepalive: (.*)$", re.M)
SCORE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\S+)")


@dataclass(frozen=True)
class Attempt:
    start: float
    end: float
    ok: bool


@dataclass(frozen=True)
class JournalLine:
    uptime: float
    who: str  # syslog identifier: "earlyfw" or "systemd"
    text: str


# What the unprivileged sender in wireguard-report writes to the endpoint.
HOLE_PROBE = b"earlyfw-endpoint-probe"
HOLE_COUNTER = re.compile(r'counter packets (\d+) bytes \d+ comment "([\w-]+)"')
HOLE_REFUSED = re.compile(r"counter refused_endpoint \{\s*packets (\d+)")


@dataclass(frozen=True)
class EndpointHole:
    """The endpoint hole in the guest: what nobody's own send to the endpoint
    said, and what an accept-all table ahead of earlyfw counted of the packets
    to the endpoint from the lock on: by owner (root, another) and mark, and
    all, with `tunnelled` datagrams nobody sent through the relaxed tunnel."""

    nobody: str | None
    tunnelled: int
    counted: dict[str, int]
    refused: int | None

    def problems(self) -> list[str]:
        found = []
        if self.nobody != "refused":
            found.append(f"nobody's datagram to the endpoint was not refused ({self.nobody or 'never sent'})")
        counted = self.counted
        if set(counted) != {"root", "other-owner", "marked", "all"} or not self.tunnelled:
            return [*found, f"the endpoint counters or the tunnelled probe are missing: {self}"]
        # Kernel WireGuard's own packets (handshakes, keepalives) have no socket:
        # neither root's nor anyone's.
        if counted["all"] - counted["root"] - counted["other-owner"] < 1:
            found.append(f"no packet to the endpoint without an owner: kernel WireGuard's own were not seen {counted}")
        # Nobody's own datagram is counted with its owner before earlyfw refuses
        # it. Its tunnelled ones carry nobody's socket when sent at once, none
        # when kernel WireGuard queued them (measured 2 of 3 in one boot, 0 of 3
        # in another): either way refused_endpoint below must not count them.
        if counted["other-owner"] < 1:
            found.append(
                f"{counted['other-owner']} packets to the endpoint with a non-root owner: nobody's own was not seen"
            )
        if counted["marked"]:
            found.append(f"packets to the endpoint carried a mark, which this guest's wg0 has none of: {counted}")
        if self.refused != 1:
            found.append(
                f"earlyfw's refused_endpoint counted {self.refused}, not 1: only nobody's own datagram may be "
                "refused, never the tunnel's packets that carry nobody's"
            )
        return found


def parse_endpoint_hole(text: str) -> EndpointHole | None:
    if not text.strip():
        return None
    nobody = next((line.split()[1] for line in text.splitlines() if line.startswith("nobody ")), None)
    tunnelled = next((line.split()[1] for line in text.splitlines() if line.startswith("tunnelled ")), "0")
    refused = HOLE_REFUSED.search(text)
    return EndpointHole(
        nobody=nobody,
        tunnelled=int(tunnelled) if tunnelled.isdigit() else 0,
        counted={name: int(packets) for packets, name in HOLE_COUNTER.findall(text)},
        refused=int(refused[1]) if refused else None,
    )


@dataclass(frozen=True)
class Tunnel:
    """The WireGuard boot's observations, all in guest uptime seconds."""

    attempts: tuple[Attempt, ...]
    journal: tuple[JournalLine, ...]
    unit: dict[str, str]
    latest_handshake: float | None  # wall clock, as `wg show` has it
    security: tuple[float, str] | None
    # From the capture: handshakes the guest sent, responses it got, and
    # packets it sent through the tunnel (transport messages, not keepalives).
    initiations: tuple[float, ...]
    responses: tuple[float, ...]
    tunnelled: tuple[float, ...]
    # What the report did: wg0 up with its peer (up); with a watcher, the
    # second round (lock, locked, rehandshake); without, its own start of a
    # handshake (kick).
    events: dict[str, float] = field(default_factory=dict)
    # Responses the guest sent to handshakes the peer began itself: a
    # handshake completes that way too (wireguard-go may start one when the
    # guest's traffic stops, as at the outside lock).
    answered: tuple[float, ...] = ()
    # The endpoint hole's probe (report section endpoint-hole), and frames
    # carrying its datagram that left the guest anyway.
    hole: EndpointHole | None = None
    hole_leaked: tuple[float, ...] = ()
    # wg0's peer's persistent keepalive at the end (`wg show`), None for none.
    keepalive: str | None = None

    @property
    def completed(self) -> tuple[float, ...]:
        """Every handshake completion at the NIC, whoever began it."""
        return tuple(sorted((*self.responses, *self.answered)))

    @property
    def watcher_lines(self) -> tuple[JournalLine, ...]:
        return tuple(line for line in self.journal if line.who == "earlyfw")

    @property
    def started_blocked(self) -> float | None:
        return next((line.uptime for line in self.watcher_lines if line.text.startswith("blocked: ")), None)

    @property
    def kicked(self) -> JournalLine | None:
        """The watcher saying it started a handshake."""
        return next((line for line in self.watcher_lines if KICKED.match(line.text)), None)

    @property
    def down_before_relax(self) -> JournalLine | None:
        """The watcher's last look at wg0 still down before it relaxed: wg0
        came up after it, so from it to the relax bounds wg0 up -> relaxed."""
        relaxed = self.relaxed
        down = [
            line
            for line in self.watcher_lines
            if INTERFACE_DOWN.match(line.text) and relaxed is not None and line.uptime <= relaxed.uptime
        ]
        return down[-1] if down else None

    @property
    def relaxes(self) -> tuple[JournalLine, ...]:
        return tuple(line for line in self.watcher_lines if RELAXED.match(line.text))

    @property
    def relaxed(self) -> JournalLine | None:
        return self.relaxes[0] if self.relaxes else None

    @property
    def lock(self) -> JournalLine | None:
        """The watcher obeying the second round's outside lock."""
        return next((line for line in self.watcher_lines if line.text.startswith("blocked: locked by")), None)

    @property
    def relaxed_again(self) -> JournalLine | None:
        lock = self.lock
        return next((line for line in self.relaxes if lock and line.uptime > lock.uptime), None)

    @property
    def first_response(self) -> float | None:
        return self.responses[0] if self.responses else None

    @property
    def second_response(self) -> float | None:
        """The first handshake completed after the outside lock: the one the
        report forces by re-adding the peer, or one the peer began sooner."""
        since = self.events.get("locked")
        return next((r for r in self.completed if since is not None and r > since), None)

    @staticmethod
    def watcher_delay(line: JournalLine | None) -> float | None:
        """The watcher's own figure: how old the handshake was when it decided."""
        m = RELAXED.match(line.text) if line else None
        return float(m.group(1)) if m else None

    def first_through(self, since: float | None) -> float | None:
        """From a handshake response at the NIC to the first packet the
        guest sent through the tunnel after it: an upper bound, taken outside
        the guest, on how long the firewall kept the live tunnel shut."""
        after = [u for u in self.tunnelled if since is not None and u >= since]
        return round(after[0] - since, 3) if after and since is not None else None

    def delay(self, line: JournalLine | None) -> float | None:
        """From the latest handshake response at the guest's NIC (the
        capture) to a relaxed line (the journal)."""
        before = [r for r in self.completed if line is not None and r <= line.uptime]
        return round(line.uptime - before[-1], 3) if line is not None and before else None

    @property
    def successes(self) -> tuple[Attempt, ...]:
        return tuple(a for a in self.attempts if a.ok)

    def between(self, start: float, end: float = float("inf")) -> tuple[Attempt, ...]:
        return tuple(a for a in self.attempts if start <= a.start < end)


def parse_events(text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2:
            found.setdefault(fields[0], float(fields[1]))
    return found


def parse_attempts(text: str) -> tuple[Attempt, ...]:
    attempts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[2] in ("ok", "fail"):
            attempts.append(Attempt(float(fields[0]), float(fields[1]), fields[2] == "ok"))
    return tuple(attempts)


def parse_journal(text: str) -> tuple[JournalLine, ...]:
    return tuple(
        JournalLine(float(m.group(1)), m.group(2).strip(), m.group(3))
        for m in (LINE.match(line) for line in text.splitlines())
        if m
    )


def parse_unit(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def parse_handshake(text: str) -> float | None:
    times = [int(f[1]) for f in (line.split() for line in text.splitlines()) if len(f) == 2 and f[1].isdigit()]
    return float(max(times)) if times and max(times) > 0 else None


def parse_keepalive(text: str) -> str | None:
    m = KEEPALIVE.search(text)
    return m.group(1).strip() if m else None


def parse_security(text: str) -> tuple[float, str] | None:
    m = SCORE.search(text)
    return (float(m.group(1)), m.group(2)) if m else None


def _inbound_wireguard(frame: pcap.Frame) -> int | None:
    """The message type of a datagram from the peer (slirp's gateway:51820) to the guest."""
    if frame.source_mac == pcap.GUEST_MAC or len(frame.data) < 14:
        return None
    headers = pcap.dissect(frame.data)
    if headers.src != PEER_GATEWAY or headers.proto != pcap.IPPROTO_UDP or headers.sport != WG_PORT:
        return None
    return headers.payload[0] if headers.payload else None


def observe(outcome: boot.Outcome) -> Tunnel:
    report, capture = outcome.report, outcome.capture
    sections = report.sections

    def uptimes(times: list[float]) -> tuple[float, ...]:
        return tuple(u for u in (capture.as_uptime(t) for t in times) if u is not None)

    ours = [p for p in capture.packets if p.kind is pcap.Kind.ENDPOINT and pcap.probe_uptime(p) is None]
    initiations = [p.time for p in ours if p.payload[:1] == bytes([HANDSHAKE_INITIATION]) and len(p.payload) == 148]
    frames = pcap.read(outcome.run_dir / "capture.pcap")
    responses = [round(f.time - boot.RTC_EPOCH, 6) for f in frames if _inbound_wireguard(f) == HANDSHAKE_RESPONSE]
    answered = [p.time for p in ours if p.payload[:1] == bytes([HANDSHAKE_RESPONSE]) and len(p.payload) == 92]
    return Tunnel(
        attempts=parse_attempts(sections.get("probe", "")),
        journal=parse_journal(sections.get("watch-journal", "")),
        unit=parse_unit(sections.get("watch-unit", "")),
        latest_handshake=parse_handshake(sections.get("wg-handshakes", "")),
        security=parse_security(sections.get("security", "")),
        initiations=uptimes(initiations),
        responses=uptimes(responses),
        tunnelled=uptimes(
            [p.time for p in ours if p.payload[:1] == bytes([TRANSPORT_DATA]) and len(p.payload) > KEEPALIVE_BYTES]
        ),
        events=parse_events(sections.get("events", "")),
        answered=uptimes(answered),
        hole=parse_endpoint_hole(sections.get("endpoint-hole", "")),
        hole_leaked=uptimes([round(f.time - boot.RTC_EPOCH, 6) for f in frames if HOLE_PROBE in f.data]),
        keepalive=parse_keepalive(sections.get("wg-show", "")),
    )


def check(watch: bool, outcome: boot.Outcome) -> tuple[str, ...]:
    """Problems with a WireGuard boot; `watch`: the guest runs the watcher."""
    t = observe(outcome)
    problems: list[str] = []
    if len(t.attempts) < 10:
        problems.append(f"the tunnel probe logged {len(t.attempts)} attempts: it did not run")
    if not t.initiations:
        problems.append("no WireGuard handshake initiation left the guest for the endpoint")
    if not t.responses or t.latest_handshake is None:
        problems.append("the tunnel never completed a handshake (no response in the capture, or none in `wg show`)")
    problems += _check_watcher(t) if watch else _check_control(t)
    return tuple(problems)


def _check_watcher(t: Tunnel) -> list[str]:
    problems: list[str] = []
    relaxed, blocked = t.relaxed, t.started_blocked
    if blocked is None:
        problems.append("the watcher's journal has no line saying it started blocked")
    if relaxed is None:
        problems.append("the watcher never relaxed: " + "; ".join(line.text for line in t.watcher_lines[-5:]))
        return problems
    if blocked is not None and blocked > relaxed.uptime:
        problems.append(f"the watcher said relaxed at {relaxed.uptime:.3f}s before blocked at {blocked:.3f}s")
    if t.first_response is None or t.first_response > relaxed.uptime:
        problems.append(f"relaxed at {relaxed.uptime:.3f}s, before any handshake response reached the guest")
    # No keepalive: the first handshake is the watcher's doing, and leaves the peer as configured.
    kicked = t.kicked
    if kicked is None or kicked.uptime > relaxed.uptime:
        problems.append("the watcher's journal does not say it started the handshake before it relaxed")
    if blocked is not None and t.initiations and t.initiations[0] < blocked:
        problems.append(f"a handshake began at {t.initiations[0]:.3f}s, before the watcher held the block")
    if t.keepalive is not None:
        problems.append(f"wg0's peer ends with a persistent keepalive ({t.keepalive}); its config has none")
    # An answer is the strict test: the request went out before it, so after
    # the relax; the journal's stamp on the relaxed line may come a moment later.
    early = [a for a in t.successes if a.end < relaxed.uptime - RELAX_SLACK]
    if early:
        problems.append(f"a probe was answered through the tunnel at {early[0].end:.3f}s, before the relax")
    if not t.tunnelled:
        problems.append("the capture shows no packet sent through the tunnel after the relax")
    elif t.first_response is not None and t.tunnelled[0] < t.first_response:
        problems.append(f"a packet went through the tunnel at {t.tunnelled[0]:.3f}s, before the handshake")
    problems += _open(t.between(relaxed.uptime + SETTLED, t.events.get("lock", float("inf"))), "the relax")
    problems += _second_round(t)
    problems += t.hole.problems() if t.hole is not None else ["the report has no endpoint-hole section"]
    if t.hole_leaked:
        problems.append(f"nobody's datagram to the endpoint left the guest at {t.hole_leaked[0]:.3f}s")
    failures = [line.text for line in t.watcher_lines if line.text.startswith(("blocked: watcher failed", "error:"))]
    if failures:
        problems.append(f"the watcher failed: {failures[0]}")
    state = (t.unit.get("ActiveState"), t.unit.get("SubState"), t.unit.get("NRestarts"), t.unit.get("Result"))
    if state != ("active", "running", "0", "success"):
        problems.append(
            "earlyfw-watch.service is not active and running with no restarts: "
            + " ".join(f"{k}={v}" for k, v in t.unit.items())
        )
    if t.security is None:
        problems.append("no `systemd-analyze security` score in the report")
    return problems


def _open(attempts: tuple[Attempt, ...], after: str) -> list[str]:
    if not attempts:
        return [f"no probe attempt a second or more after {after}: the report moved on too soon"]
    failed = [f"{a.start:.2f}" for a in attempts if not a.ok]
    if failed:
        return [f"probes failed after {after} (at {', '.join(failed[:5])}s): the tunnel is not open"]
    return []


def _second_round(t: Tunnel) -> list[str]:
    """The watcher already running: an outside lock holds although the tunnel
    is live, and only the fresh handshake relaxes again."""
    lock, again, response = t.lock, t.relaxed_again, t.second_response
    locked = t.events.get("locked")
    if locked is None or "rehandshake" not in t.events:
        return ["the report's second round (lock, fresh handshake) did not run"]
    if lock is None:
        return ["the watcher never logged the outside lock"]
    if again is None:
        return ["the watcher did not relax again after the fresh handshake"]
    problems = []
    if response is None or response > again.uptime:
        problems.append(f"relaxed again at {again.uptime:.3f}s, before the fresh handshake's response")
    # From the lock until the report removed the peer (or a handshake
    # completed before that) the tunnel's session was live and only proof
    # older than the lock existed: only the firewall stood in the way.
    rehandshake = min(t.events["rehandshake"], response if response is not None else float("inf"))
    held = tuple(a for a in t.between(locked, rehandshake) if a.end <= rehandshake)
    # The probe's attempts, or else the 20 ms pinger, whose packets the
    # capture would show in the tunnel had the lock let one through.
    if len(held) < 2 and rehandshake - locked < MIN_LOCKED_WINDOW:
        problems.append(
            f"only {len(held)} probe attempts and {rehandshake - locked:.3f}s while locked: too little to show "
            "the lock held"
        )
    if any(a.ok for a in held):
        problems.append("a probe got through the tunnel while the watcher was locked")
    leaked = [u for u in t.tunnelled if locked <= u < rehandshake]
    if leaked:
        problems.append(f"the capture shows a packet sent through the tunnel at {leaked[0]:.3f}s, while locked")
    return problems + _open(t.between(again.uptime + SETTLED), "relaxing again")


def _check_control(t: Tunnel) -> list[str]:
    problems: list[str] = []
    if t.unit.get("LoadState") != "not-found":
        problems.append(f"the control has an earlyfw-watch.service ({t.unit.get('LoadState')})")
    # First without any kick: wg0 up with its peer, the probes refused before
    # they reach it, so nothing may start a handshake.
    up, kick = t.events.get("up"), t.events.get("kick")
    if up is None or kick is None:
        problems.append(
            "the control's report never started a handshake itself: wg0 never came up, or something got traffic "
            "into it through the block"
        )
    else:
        early = [i for i in t.initiations if i < kick]
        if early:
            problems.append(f"a handshake began at {early[0]:.3f}s in the control, before the report started one")
        waited = t.between(up, kick)
        if len(waited) < MIN_ATTEMPTS_AFTER_HANDSHAKE:
            problems.append(
                f"only {len(waited)} probe attempts with wg0 up before the kick: too few to show none starts one"
            )
    if t.successes:
        problems.append(f"a probe got through the tunnel at {t.successes[0].start:.3f}s with no watcher to relax")
    if t.tunnelled:
        problems.append(f"the capture shows a packet sent through the tunnel at {t.tunnelled[0]:.3f}s")
    if t.first_response is not None:
        after = [a for a in t.attempts if a.start > t.first_response]
        if len(after) < MIN_ATTEMPTS_AFTER_HANDSHAKE:
            problems.append(f"only {len(after)} probe attempts after the handshake: too few to show the block held")
    return problems


def figures(watch: bool, outcome: boot.Outcome) -> dict[str, Any]:
    t = observe(outcome)
    first_ok = t.successes[0].start if t.successes else None
    relaxed, again, lock = t.relaxed, t.relaxed_again, t.lock
    locked = t.events.get("locked")
    return {
        "watcher": watch,
        "probe_attempts": len(t.attempts),
        "probe_successes": len(t.successes),
        "first_probe_success_uptime_s": first_ok,
        "handshake_initiations": len(t.initiations),
        "handshake_responses": len(t.responses),
        "first_initiation_uptime_s": t.initiations[0] if t.initiations else None,
        "first_response_uptime_s": t.first_response,
        "tunnelled_packets": len(t.tunnelled),
        "endpoint_hole_counted": t.hole.counted if t.hole is not None else None,
        "first_tunnelled_uptime_s": t.tunnelled[0] if t.tunnelled else None,
        "watcher_blocked_uptime_s": t.started_blocked,
        "relaxed_uptime_s": relaxed.uptime if relaxed else None,
        "relaxed_line": relaxed.text if relaxed else None,
        # The watcher's own figure (the handshake's time from the kernel, to
        # the clock it read before asking) and the capture's (the response at
        # the NIC to the journal line): first with the watcher still starting,
        # then with it running.
        "handshake_age_at_relax_s": Tunnel.watcher_delay(relaxed),
        "response_to_relaxed_s": t.delay(relaxed),
        # wg0 up -> relaxed, at most (no keepalive: the watcher's kick in between).
        "up_to_relaxed_at_most_s": (
            round(relaxed.uptime - down.uptime, 3) if relaxed and (down := t.down_before_relax) else None
        ),
        "response_to_first_tunnelled_s": t.first_through(t.first_response),
        "lock_noticed_s": round(lock.uptime - locked, 3) if lock and locked is not None else None,
        "second_response_uptime_s": t.second_response,
        "relaxed_again_uptime_s": again.uptime if again else None,
        "handshake_age_at_relax_again_s": Tunnel.watcher_delay(again),
        "response_to_relaxed_again_s": t.delay(again),
        "response_to_first_tunnelled_again_s": t.first_through(t.second_response),
        "unit": t.unit,
        "security_exposure": t.security[0] if t.security else None,
        "security_rating": t.security[1] if t.security else None,
    }
