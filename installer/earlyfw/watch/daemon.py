"""The watcher's loop: sleep on netlink and the tunnel, decide, change state.

Invariants:
- It starts by putting BLOCKED in place, and relaxes only on a verdict taken
  after that (a restarted watcher re-verifies; it trusts nothing left behind).
- Every state change is one transaction (see ruleset) and one log line naming
  the reason; every repair is one transaction and one log line naming who.
- Any way out, a signal or an unexpected error, puts BLOCKED in place first.
  Only a kill it cannot catch leaves the last state, and RELAXED only ever
  allows the tunnel interface besides what BLOCKED allows.
- An outside `earlyfw lock` (the sleep hook runs one) is obeyed at once and
  makes every handshake older than it worthless; an outside `earlyfw relax`
  decides only where the tunnel kind follows requests (manual, OpenVPN hooks).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from earlyfw import nft
from earlyfw.config import Config
from earlyfw.errors import EarlyfwError
from earlyfw.policy import State
from earlyfw.run import Runner
from earlyfw.watch.events import Generation, HandshakeLog, LinkEvents, NftablesEvents
from earlyfw.watch.libnft import Libnftables
from earlyfw.watch.ruleset import WATCHED_TABLES, Ruleset
from earlyfw.watch.sources import SourceKind
from earlyfw.watch.tunnels import Tunnel, Verdict, WireGuardTunnel, make_tunnel

# CLOCK_BOOTTIME runs through suspend and CLOCK_MONOTONIC does not: when the
# gap between them grows by more than this, the machine slept.
SUSPEND_GAP = 0.5

Log = Callable[[str], None]


def log_to_stderr(message: str) -> None:
    # One line each; journald adds the time and the unit.
    print(message, file=sys.stderr, flush=True)


def notify_ready() -> None:
    """sd_notify(3) READY=1 for Type=notify: the block is in place and the
    watcher listens, so systemd may start the network managers ordered after
    it. The protocol is one datagram; outside systemd there is no socket."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(b"READY=1", address)
    except OSError as e:
        # systemd then gives the start up after TimeoutStartSec: still blocked.
        raise EarlyfwError(f"could not tell systemd the watcher is ready ({path}): {e}") from None


class Stopped(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)


@dataclass
class Clock:
    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    boottime: Callable[[], float] = field(default=lambda: time.clock_gettime(time.CLOCK_BOOTTIME))


class Watcher:
    def __init__(
        self,
        config: Config,
        ruleset: Ruleset,
        tunnel: Tunnel,
        tables: NftablesEvents | None,
        links: LinkEvents | None,
        *,
        log: Log = log_to_stderr,
        clock: Clock | None = None,
        fallback_lock: Callable[[], None] | None = None,
        wake: HandshakeLog | None = None,
    ) -> None:
        self.config = config
        self.ruleset = ruleset
        self.tunnel = tunnel
        self.tables = tables
        self.links = links
        self.log = log
        self.clock = clock or Clock()
        self.fallback_lock = fallback_lock
        self.stopping = False
        self.wake = wake
        self.pid = os.getpid()
        self.state = State.BLOCKED
        # Wall-clock time before which no proof counts: the last lock request
        # or resume. Zero at start: a handshake within reject-after verifies.
        self.not_before = 0.0
        self.due = 0.0
        self.gap = self._gap()
        self.hinted: set[str] = set()
        self.selector = selectors.DefaultSelector()
        for source in (tables, links):
            if source is not None:
                self.selector.register(source.fileno(), selectors.EVENT_READ, source)
        self._tunnel_fd: int | None = None

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self.ruleset.put(State.BLOCKED)
        self.state = State.BLOCKED
        self._start_wake()
        for note in self.ruleset.notes:
            self.log(f"warning: {note}")
        how = "guarded" if self.ruleset.guarded else "unguarded"
        if self.wake is not None:
            how += ", woken by handshakes"
        self.log(
            f"blocked: watcher started ({self.config.tunnel_kind} on {self.config.interface}, {how}); "
            "relaxing only on proof the tunnel is live"
        )

    def run(self) -> int:
        """Until a signal (exit 0) or an error (exit 1); BLOCKED either way."""
        try:
            self.start()
            notify_ready()
            while True:
                self.step()
        except Stopped as e:
            self.shutdown(f"watcher stopped ({e})")
            return 0
        except BaseException as e:
            # A failure earlyfw names gets its one line; anything else its traceback.
            detail = f"{e} ({e.hint})" if isinstance(e, EarlyfwError) and e.hint else str(e)
            if not isinstance(e, EarlyfwError):
                self.log("".join(traceback.format_exception(e)).rstrip())
            self.shutdown(f"watcher failed: {detail}")
            return 1
        finally:
            self.close()

    def shutdown(self, why: str) -> None:
        """Lock on the way out: through the watcher's own context, else through
        `nft -f`; if even that fails, the table stays as it is."""
        self.stopping = True
        try:
            self.ruleset.put(State.BLOCKED)
        except EarlyfwError as e:
            self.log(f"error: could not lock through libnftables: {e}")
            try:
                if self.fallback_lock is None:
                    raise
                self.fallback_lock()
            except EarlyfwError as again:
                self.log(f"error: could not lock on the way out: {again}")
                return
        self.state = State.BLOCKED
        self.log(f"blocked: {why}")

    def _start_wake(self) -> None:
        if self.wake is None or not isinstance(self.tunnel, WireGuardTunnel):
            return
        if self.ruleset.load_wake(self.wake.group):
            self.tunnel.woken = True
            self.selector.register(self.wake.fileno(), selectors.EVENT_READ, self.wake)
        else:
            self.wake.close()
            self.wake = None

    def close(self) -> None:
        self.selector.close()
        self.tunnel.close()
        for source in (self.tables, self.links, self.wake):
            if source is not None:
                source.close()

    # --- one turn of the loop -------------------------------------------------

    def step(self, max_wait: float | None = None) -> None:
        self._sync_tunnel_fd()
        timeout = max(0.0, self.due - self.clock.monotonic())
        if max_wait is not None:
            timeout = min(timeout, max_wait)
        outside: list[Generation] = []
        for key, _ in self.selector.select(timeout):
            source = key.data
            if source is self.tables and self.tables is not None:
                outside += [g for g in self.tables.read() if g.pid != self.pid and g.touches(WATCHED_TABLES)]
            elif source is self.links and self.links is not None:
                if self.links.read():
                    self.due = 0.0
            elif source is self.wake and self.wake is not None:
                if self.wake.read() and isinstance(self.tunnel, WireGuardTunnel):
                    self.tunnel.wake()
                    self.due = 0.0
            else:
                self.tunnel.on_readable()
                self.due = 0.0
        self._check_suspend()
        if outside:
            self.check_tables(outside)
        if self.clock.monotonic() >= self.due:
            self.evaluate()

    def _sync_tunnel_fd(self) -> None:
        fd = self.tunnel.fileno()
        if fd == self._tunnel_fd:
            return
        if self._tunnel_fd is not None:
            self.selector.unregister(self._tunnel_fd)
        if fd is not None:
            self.selector.register(fd, selectors.EVENT_READ, self.tunnel)
        self._tunnel_fd = fd

    def evaluate(self) -> Verdict:
        verdict = self.tunnel.evaluate(self.clock.wall, self.not_before)
        self.due = self.clock.monotonic() + verdict.recheck
        if verdict.state is not self.state:
            self.change(verdict.state, verdict.reason)
        hint = getattr(self.tunnel, "hint", None)
        if isinstance(hint, str) and hint not in self.hinted:
            self.hinted.add(hint)
            self.log(f"hint: {hint}")
        return verdict

    def change(self, state: State, reason: str) -> None:
        self.ruleset.put(state)
        self.state = state
        self.log(f"{state}: {reason}")

    # --- outside changes --------------------------------------------------------

    def check_tables(self, generations: list[Generation]) -> None:
        who = ", ".join(sorted({g.who() for g in generations}))
        finding = self.ruleset.inspect(self.state)
        if finding.claimed is State.BLOCKED:
            self.lock_request(f"locked by {who}")
        elif finding.claimed is State.RELAXED:
            self.relax_request(who)
        elif finding.problem is not None:
            self.ruleset.put(self.state, repair=True)
            self.log(f"repaired: {finding.problem} by {who}; {self.state} restored")
        elif self.state is State.BLOCKED:
            # Someone put the blocked ruleset in place again (the sleep unit
            # does, whatever the state): a lock all the same.
            self.not_before = self.clock.wall()

    def lock_request(self, why: str) -> None:
        """A lock from outside: obeyed, and only proof newer than it relaxes again."""
        self.not_before = self.clock.wall()
        self.tunnel.request(State.BLOCKED)
        self.ruleset.put(State.BLOCKED)  # the guard follows the table
        self.state = State.BLOCKED
        self.due = 0.0
        proof = "" if self.tunnel.follows_requests else "; relaxing again needs a newer handshake"
        self.log(f"blocked: {why}{proof}")

    def relax_request(self, who: str) -> None:
        self.tunnel.request(State.RELAXED)
        verdict = self.tunnel.evaluate(self.clock.wall, self.not_before)
        self.due = self.clock.monotonic() + verdict.recheck
        self.ruleset.put(verdict.state)
        self.state = verdict.state
        if verdict.state is State.RELAXED:
            self.log(f"relaxed: asked by {who}; {verdict.reason}")
        else:
            self.log(f"blocked: refused the relax by {who}: {verdict.reason}")

    def _gap(self) -> float:
        return self.clock.boottime() - self.clock.monotonic()

    def _check_suspend(self) -> None:
        gap = self._gap()
        slept, self.gap = gap - self.gap, gap
        if slept > SUSPEND_GAP:
            self.lock_request(f"resumed after {slept:.0f}s of suspend")


def main(config: Config, runner: Runner, source: SourceKind = SourceKind.AUTO, *, log: Log = log_to_stderr) -> int:
    nft.require_root_for("watch")
    tunnel = make_tunnel(config, runner, source)
    # Subscribe before the first change, so nothing can slip in between.
    tables, links = NftablesEvents(), LinkEvents()
    wake = None
    if isinstance(tunnel, WireGuardTunnel):
        try:
            wake = HandshakeLog()
        except OSError as e:
            log(f"warning: no handshake wake-ups (NFLOG: {e}); polling instead")
    context = Libnftables()
    ruleset = Ruleset(config, context)
    watcher = Watcher(
        config,
        ruleset,
        tunnel,
        tables,
        links,
        log=log,
        fallback_lock=lambda: nft.put_state(runner, config, State.BLOCKED),
        wake=wake,
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        if not watcher.stopping:
            raise Stopped(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    try:
        return watcher.run()
    finally:
        context.close()
