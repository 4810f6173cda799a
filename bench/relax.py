"""How fast `earlyfw watch` acts, in namespaces with real WireGuard (wireguard-go
both ends), and what it costs at rest.

  relax:  handshake completed -> relaxed ruleset live. The handshake time is
          WireGuard's own (UAPI last_handshake_time, ns precision); "live" is
          when the watcher's transaction reaches the nftables event group.
          Each round locks (as the sleep unit does, `nft -f` the blocked
          ruleset), then forces a fresh handshake by re-adding the peer.
  come up: a peer without PersistentKeepalive, configured while the interface
          is down, then `ip link set up` (wg-quick's order) -> relaxed live.
          WireGuard would never start this handshake by itself under the
          block; the watcher makes it (see earlyfw.linux.watcher.tunnels).
  repair: `nft delete table inet earlyfw` (or `flush ruleset`) committed ->
          the watcher's repair committed, both timed on the event group.
  events: the same removal seen on the raw netlink group (what the watcher
          reads) and as a line from `nft monitor` (the alternative).
  idle:   CPU and RSS of the watcher relaxed (1 Hz checks) and blocked
          waiting for a handshake (polls at 50 Hz), over --idle seconds.
  idle tunnel: a peer without PersistentKeepalive comes up under the
          watcher, then nothing at all goes through the tunnel for
          --idle-minutes (real time: WireGuard's session ends 180 s after the
          handshake and its keys are wiped at 540 s; its timers cannot be
          shortened without faking them). Proof of the silence: both ends'
          transfer counters and a capture on the link; proof the block held
          meanwhile: a datagram outside the tunnel once a minute, none
          arriving (the control, after the watcher stops and the ruleset is
          flushed, arrives). Then one datagram into the tunnel: answered or
          not, the application's errors, the time to the answer (WireGuard's
          new handshake included), and every state the watcher published.

  python3 bench/relax.py [--only timings|idle-tunnel] [--rounds 200] [--idle 20] [--idle-minutes 10]
                         [--executable /path/to/frozen/earlyfw]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import queue
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import netns
from tests.watch_lab import (
    PROBE_PORT,
    PYTHON_MODULE,
    WG_PORT,
    Watcher,
    WgPair,
    WireGuard,
    config_for,
    echo_through_tunnel,
    live_state,
    received,
    send_udp,
    start_watcher,
    wg_pair,
    write_config,
)

from earlyfw import policy
from earlyfw.linux.watcher import daemon, sources, tunnels
from earlyfw.linux.watcher.events import Generation, NftablesEvents
from earlyfw.linux.watcher_unit import WATCH_UNIT, render_unit
from earlyfw.policy import State

TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(name: str, values_ms: Sequence[float]) -> str:
    return (
        f"{name:28} n={len(values_ms):4}  p50 {statistics.median(values_ms):7.2f} ms  "
        f"p99 {percentile(values_ms, 0.99):7.2f} ms  max {max(values_ms):7.2f} ms"
    )


class EventClock:
    """Commit times of nftables transactions in the client namespace, stamped
    by a reader thread that sleeps on the event group (at real-time priority
    where allowed, so the figures measure the watcher, not this script)."""

    def __init__(self, ns: netns.Namespace) -> None:
        with ns.entered():
            self.events = NftablesEvents()
        self.queue: queue.Queue[tuple[float, Generation]] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        while True:
            ready, _, _ = select.select([self.events.sock], [], [], 0.5)
            if ready:
                now = time.time()
                for generation in self.events.read():
                    self.queue.put((now, generation))

    def wait(self, match: Callable[[Generation], bool], timeout: float = 5.0) -> float:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                when, generation = self.queue.get(timeout=left)
            except queue.Empty:
                break
            if match(generation):
                return when
        raise TimeoutError("no matching nftables transaction")

    def drain(self) -> None:
        time.sleep(0.05)
        while not self.queue.empty():
            self.queue.get_nowait()


def relax_rounds(pair: WgPair, pids: set[int], clock: EventClock, blocked_script: Path, rounds: int) -> list[float]:
    uapi = sources.UapiSource(pair.client_wg.name)
    latencies = []
    for _ in range(rounds):
        clock.drain()
        pair.client.exec(["nft", "-f", str(blocked_script)])
        clock.wait(lambda g: g.pid in pids)  # the watcher follows the lock
        pair.rehandshake()
        live = clock.wait(lambda g: g.pid in pids)
        handshake = max(p.last_handshake or 0.0 for p in uapi.peers())
        if live_state(pair.client) != "relaxed":
            raise RuntimeError("the watcher's transaction was not the relax")
        latencies.append((live - handshake) * 1000)
    return latencies


def come_up_rounds(pair: WgPair, pids: set[int], clock: EventClock, blocked_script: Path, rounds: int) -> list[float]:
    name = pair.client_wg.name
    pair.keepalive = None
    latencies = []
    for _ in range(rounds):
        pair.client.ip("link", "set", name, "down")
        clock.drain()
        pair.client.exec(["nft", "-f", str(blocked_script)])
        clock.wait(lambda g: g.pid in pids)  # the watcher follows the lock
        pair.client_wg.remove_peer(pair.server_wg.public)
        pair.connect_client()
        clock.drain()
        up = time.time()
        pair.client.ip("link", "set", name, "up")
        live = clock.wait(lambda g: g.pid in pids)
        if live_state(pair.client) != "relaxed":
            raise RuntimeError("the watcher's transaction was not the relax")
        latencies.append((live - up) * 1000)
    pair.keepalive = 1
    pair.connect_client()
    return latencies


def repair_rounds(pair: WgPair, pids: set[int], clock: EventClock, rounds: int, command: list[str]) -> list[float]:
    latencies = []
    for _ in range(rounds):
        clock.drain()
        pair.client.exec(command)
        removed = clock.wait(lambda g: g.pid not in pids and "earlyfw" in g.tables)
        repaired = clock.wait(lambda g: g.pid in pids)
        latencies.append((repaired - removed) * 1000)
    return latencies


def monitor_rounds(pair: WgPair, clock: EventClock, rounds: int) -> tuple[list[float], int]:
    """Raw netlink receipt vs `nft monitor` line, for the same removal of a
    scratch table."""
    monitor = subprocess.Popen(
        ["ip", "netns", "exec", pair.client.name, "stdbuf", "-oL", "nft", "monitor", "tables"],
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    delays = []
    try:
        time.sleep(0.3)
        rss = rss_kib(monitor.pid)
        for _ in range(rounds):
            pair.client.exec(["nft", "add", "table", "inet", "efw_probe"])
            assert monitor.stdout is not None
            monitor.stdout.readline()
            clock.drain()
            pair.client.exec(["nft", "delete", "table", "inet", "efw_probe"])
            raw = clock.wait(lambda g: "efw_probe" in g.tables)
            line = monitor.stdout.readline()
            text = time.time()
            assert "delete table inet efw_probe" in line, line
            delays.append((text - raw) * 1000)
    finally:
        monitor.terminate()
        monitor.wait()
    return delays, rss


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (the single-file binary runs as two processes)."""
    found = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return found
    for child in children:
        found += tree(int(child))
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def idle(pid: int, seconds: float) -> tuple[float, int]:
    pids = tree(pid)
    before, start = cpu_seconds(pids), time.monotonic()
    time.sleep(seconds)
    used = cpu_seconds(pids) - before
    return 100 * used / (time.monotonic() - start), sum(rss_kib(p) for p in pids)


def unit_nice() -> int:
    """The niceness earlyfw-watch.service gives the watcher."""
    unit = render_unit(WATCH_UNIT).decode()
    return next((int(line.split("=", 1)[1]) for line in unit.splitlines() if line.startswith("Nice=")), 0)


def timings(args: argparse.Namespace, executable: tuple[str, ...]) -> None:
    with netns.Lab() as lab, tempfile.TemporaryDirectory(prefix="efw-bench-") as tmp:
        directory = Path(tmp)
        pair = wg_pair(lab)
        config = config_for(pair.client_wg.name)
        blocked = directory / "blocked.nft"
        blocked.write_text(policy.render(config, State.BLOCKED))
        clock = EventClock(pair.client)
        watcher = start_watcher(
            lab,
            pair.client,
            executable,
            write_config(directory, config),
            log_dir=directory,
            prefix=("nice", "-n", str(args.nice)),
        )
        watcher.wait_for(r"^relaxed: ")
        pid = watcher.process.pid
        # The single-file binary runs as a bootloader and its child.
        pids = set(tree(pid))
        print(f"watcher: {' '.join(executable)} (pid {pid}, nice {args.nice}); {args.rounds} rounds each")
        print(f"load average before: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")

        relax = relax_rounds(pair, pids, clock, blocked, args.rounds)
        print(summary("handshake -> relaxed live", relax))
        come_up = come_up_rounds(pair, pids, clock, blocked, max(1, args.rounds // 4))
        print(summary("no keepalive: up -> relaxed", come_up))
        delete = repair_rounds(pair, pids, clock, args.rounds, ["nft", "delete", "table", "inet", "earlyfw"])
        print(summary("table deleted -> repaired", delete))
        flush = repair_rounds(pair, pids, clock, args.rounds, ["nft", "flush", "ruleset"])
        print(summary("flush ruleset -> repaired", flush))

        cpu, rss = idle(pid, args.idle)
        print(f"{'idle, relaxed':28} cpu {cpu:5.2f} % of one core   rss {rss / 1024:5.1f} MiB")
        pair.server_wg.remove_peer(pair.client_wg.public)
        pair.client.exec(["nft", "-f", str(blocked)])
        watcher.wait_for(r"^blocked: locked")
        cpu, rss = idle(pid, args.idle)
        print(f"{'idle, blocked (waiting)':28} cpu {cpu:5.2f} % of one core   rss {rss / 1024:5.1f} MiB")

        watcher.stop()
        delays, monitor_rss = monitor_rounds(pair, clock, min(args.rounds, 100))
        print(summary("nft monitor line after raw", delays) + f"   nft monitor rss {monitor_rss / 1024:.1f} MiB")


Counters = tuple[int, int, int, int]


def tunnel_counters(pair: WgPair) -> Counters:
    """Both ends' WireGuard byte counters (client rx, tx; server rx, tx):
    everything that went through the tunnel, handshakes and keepalives included."""
    return (*pair.client_wg.transfer(pair.server_wg.public), *pair.server_wg.transfer(pair.client_wg.public))


class Verdicts:
    """Every (state, situation) the watcher publishes, as seen by polling the
    file `earlyfw status` reads, with the wall time it was first seen."""

    def __init__(self, wg: WireGuard) -> None:
        self.interface = wg.name
        self.seen: list[tuple[float, str]] = []

    def poll(self) -> None:
        verdict = daemon.read_verdict(self.interface) or {}
        text = f"{verdict.get('state')}, {verdict.get('situation')}"
        if not self.seen or self.seen[-1][1] != text:
            since = verdict.get("since")
            self.seen.append((since if isinstance(since, float) else time.time(), text))

    def since(self, start: float) -> list[tuple[float, str]]:
        """The verdict in force at `start` and every change after it."""
        before = [v for v in self.seen if v[0] <= start][-1:]
        return before + [v for v in self.seen if v[0] > start]


def is_wireguard(frame: netns.Frame) -> bool:
    return frame.proto == 17 and WG_PORT in (frame.sport, frame.dport)


def is_probe(frame: netns.Frame) -> bool:
    return frame.proto == 17 and frame.dst == netns.WORLD_V4 and frame.dport == PROBE_PORT


def settle(pair: WgPair, verdicts: Verdicts, quiet: float = 15.0) -> tuple[Counters, float]:
    """Wait until nothing has gone through the tunnel for `quiet` seconds (the
    initiator's confirming keepalive leaves right after the handshake); the
    counters then, and when they last changed."""
    counters, changed = tunnel_counters(pair), time.time()
    while time.time() - changed < quiet:
        time.sleep(1)
        verdicts.poll()
        if (now := tunnel_counters(pair)) != counters:
            counters, changed = now, time.time()
    return counters, changed


@dataclass
class Silence:
    """What happened while the tunnel idled."""

    counters: Counters
    frames: list[netns.Frame]
    transactions: int
    states: set[str | None]
    probes: int
    probes_through: int
    log: list[str]


@dataclass
class IdleLab:
    pair: WgPair
    watcher: Watcher
    clock: EventClock
    verdicts: Verdicts
    # Where a datagram sent outside the tunnel would arrive.
    outside: socket.socket


def keep_silent(idle_lab: IdleLab, until: float) -> Silence:
    """Send nothing into the tunnel until `until`; once a minute, a datagram
    outside it, which the block must refuse."""
    pair, watcher, clock, verdicts, outside = (
        idle_lab.pair,
        idle_lab.watcher,
        idle_lab.clock,
        idle_lab.verdicts,
        idle_lab.outside,
    )
    capture = pair.lab.enter_context(pair.topology.capture())
    log_mark = len(watcher.lines())
    clock.drain()
    states: set[str | None] = set()
    probes = probes_through = 0
    next_probe = time.time()
    while (left := until - time.time()) > 0:
        verdicts.poll()
        if time.time() >= next_probe:
            probes += 1
            send_udp(pair.client, netns.WORLD_V4, PROBE_PORT, b"outside the tunnel")
            probes_through += len(received(outside, 0.2))
            states.add(live_state(pair.client))
            next_probe += 60
        time.sleep(min(1.0, left))
    verdicts.poll()
    states.add(live_state(pair.client))
    return Silence(
        tunnel_counters(pair),
        capture.since(0),
        clock.queue.qsize(),
        states,
        probes,
        probes_through,
        watcher.lines()[log_mark:],
    )


def next_datagram(pair: WgPair) -> tuple[bool, str, float]:
    """One datagram into the tunnel as an application sends it, echoed by the
    server: answered, the application's error if any, ms to the answer."""
    start = time.monotonic()
    try:
        echo_through_tunnel(pair, b"after the idle minutes")
    except (AssertionError, OSError) as e:
        return False, str(e), (time.monotonic() - start) * 1000
    return True, "", (time.monotonic() - start) * 1000


def control_leaks(pair: WgPair, outside: socket.socket) -> int:
    """The control for the refused probes: with the watcher stopped and the
    ruleset flushed, the same datagram arrives (1)."""
    pair.client.exec(["nft", "flush", "ruleset"])
    send_udp(pair.client, netns.WORLD_V4, PROBE_PORT, b"outside the tunnel")
    return len(received(outside, 0.5))


def idle_tunnel(args: argparse.Namespace, executable: tuple[str, ...]) -> None:
    with netns.Lab() as lab, tempfile.TemporaryDirectory(prefix="efw-bench-") as tmp:
        # No PersistentKeepalive from the start: the watcher makes WireGuard shake hands.
        pair = wg_pair(lab, keepalive=None)
        clock = EventClock(pair.client)
        watcher = start_watcher(
            lab,
            pair.client,
            executable,
            write_config(Path(tmp), config_for(pair.client_wg.name)),
            log_dir=Path(tmp),
            prefix=("nice", "-n", str(args.nice)),
        )
        verdicts = Verdicts(pair.client_wg)
        watcher.wait_for(r"^relaxed: ")
        verdicts.poll()
        print(f"idle tunnel: watcher {' '.join(executable)} (nice {args.nice}), no PersistentKeepalive")
        print(f"load average before: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
        if pair.client_keepalive() != "off":
            raise RuntimeError(f"the client's keepalive is {pair.client_keepalive()}, not off")
        handshake = pair.latest_handshake()
        counters, idle_start = settle(pair, verdicts)
        outside = pair.outside_listener()
        silence = keep_silent(IdleLab(pair, watcher, clock, verdicts, outside), idle_start + args.idle_minutes * 60)
        sent_at = time.time()
        log_mark = len(watcher.lines())
        answered, error, answer_ms = next_datagram(pair)
        new_handshake = pair.latest_handshake() > handshake
        time.sleep(2)
        verdicts.poll()
        after = (live_state(pair.client), watcher.lines()[log_mark:])
        watcher.stop()
        control = control_leaks(pair, outside)

    print(
        f"idle: {(sent_at - idle_start) / 60:.1f} min from the last byte through the tunnel to the next datagram "
        f"({sent_at - handshake:.0f} s after the handshake; WireGuard's session ends at "
        f"{tunnels.REJECT_AFTER_TIME} s, its keys are wiped at {3 * tunnels.REJECT_AFTER_TIME} s)"
    )
    print(f"  tunnel counters (client rx, tx; server rx, tx): {counters} -> {silence.counters}")
    kinds = collections.Counter(f.describe() for f in silence.frames)
    print(
        f"  link frames meanwhile: {len(silence.frames)} ({', '.join(f'{n} {k}' for k, n in kinds.items())}); "
        f"WireGuard {sum(map(is_wireguard, silence.frames))}, outside-the-tunnel datagrams "
        f"{sum(map(is_probe, silence.frames))}"
    )
    states = ", ".join(sorted(map(str, silence.states)))
    print(f"  nftables transactions meanwhile: {silence.transactions}; ruleset states seen: {states}")
    print(
        f"  outside-the-tunnel datagrams: {silence.probes} sent, {silence.probes_through} arrived "
        f"(control, watcher stopped and ruleset flushed: {control} of 1 arrived)"
    )
    print(f"  watcher log meanwhile ({len(silence.log)} lines):", *(f"    {line}" for line in silence.log), sep="\n")
    print("  watcher verdicts (s from idle start):")
    for when, text in verdicts.since(idle_start):
        print(f"    {when - idle_start:+8.1f} s  {text}")
    print(
        f"next datagram: {'answered' if answered else 'NOT answered'} in {answer_ms:.1f} ms; "
        f"application errors: {1 if error else 0}{f' ({error})' if error else ''}; "
        f"new handshake: {'yes' if new_handshake else 'no'}; ruleset after: {after[0]}"
    )
    print(f"  watcher log after it ({len(after[1])} lines):", *(f"    {line}" for line in after[1]), sep="\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("timings", "idle-tunnel"), help="run one scenario [default: both]")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--idle", type=float, default=20.0)
    parser.add_argument("--idle-minutes", type=float, default=10.0, help="the idle tunnel's silence [%(default)s]")
    parser.add_argument("--executable", help="a frozen earlyfw binary (default: python -m earlyfw)")
    parser.add_argument(
        "--nice", type=int, default=unit_nice(), help="the watcher's niceness [default: its unit's, %(default)s]"
    )
    args = parser.parse_args()
    executable: tuple[str, ...] = (args.executable,) if args.executable else PYTHON_MODULE
    netns.require_tools(["ip", "nft", "wireguard-go", "wg", "setpriv", "stdbuf"])
    if args.only in (None, "timings"):
        timings(args, executable)
    if args.only in (None, "idle-tunnel"):
        idle_tunnel(args, executable)


if __name__ == "__main__":
    main()
