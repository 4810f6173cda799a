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
- SIGHUP reloads the config (`earlyfw endpoints refresh` sends it): a valid
  one replaces both tables, the guard and the wake table in one batch, in the
  state the tunnel's verdict under the new config gives (a relaxed tunnel whose
  peer is still configured stays relaxed, and no packet sees a moment without
  the endpoints both configs allow); an invalid one changes nothing and is
  said in one line.
- SIGUSR1 takes a captive-portal request from `earlyfw portal` (a root-owned
  file beside the verdict): the window's elements go into the tables and the
  guards in one batch, with a kernel timeout; any later change closes it.
- What it decided, and why, is published in /run/earlyfw/watch-IF.json for
  `earlyfw status`, and said in the journal whenever the state or the
  situation within it changes; advice repeats when a situation recurs, at
  most once per HINT_INTERVAL.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from earlyfw import config as configuration
from earlyfw.config import Config
from earlyfw.errors import EarlyfwError
from earlyfw.handshake import Verdict
from earlyfw.linux import nft
from earlyfw.linux.watcher.events import Generation, HandshakeLog, LinkEvents, NftablesEvents
from earlyfw.linux.watcher.libnft import Libnftables
from earlyfw.linux.watcher.ruleset import WATCHED_TABLES, LiveRuleset
from earlyfw.linux.watcher.sources import SourceKind
from earlyfw.linux.watcher.tunnels import Clock, Tunnel, make_tunnel
from earlyfw.linux.window import WatcherPortal
from earlyfw.policy import State
from earlyfw.root import Root
from earlyfw.run import Runner

# CLOCK_BOOTTIME runs through suspend and CLOCK_MONOTONIC does not: when the
# gap between them grows by more than this, the machine slept.
SUSPEND_GAP = 0.5
# The same advice again, when its situation recurs, at most this often.
HINT_INTERVAL = 300.0
# What the tunnel reader and the sockets were set up from: a change needs a restart.
FIXED_ON_START = ("tunnel_kind", "interface", "openvpn_management")
# Where the watcher publishes its verdict (its unit's RuntimeDirectory).
VERDICT_DIR = Path("/run/earlyfw")


def verdict_path(interface: str, directory: Path = VERDICT_DIR) -> Path:
    return directory / f"watch-{interface}.json"


def read_verdict(interface: str, directory: Path = VERDICT_DIR) -> dict[str, Any] | None:
    """The watcher's last published verdict, with "running" telling whether
    the process that wrote it is still there; None if there is none."""
    try:
        data = json.loads(verdict_path(interface, directory).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
        return None
    try:
        os.kill(data["pid"], 0)
        data["running"] = True
    except ProcessLookupError:
        data["running"] = False
    except PermissionError:
        data["running"] = True
    return data


def spared_port(verdict: dict[str, Any] | None) -> int | None:
    """The listen port a running watcher's relaxed tables spare (published
    as "tunnel_port"), for `earlyfw status` to render the same tables."""
    if verdict is None or not verdict.get("running") or verdict.get("stopped"):
        return None
    port = verdict.get("tunnel_port")
    return port if type(port) is int and 0 < port < 1 << 16 else None


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


class Watcher:
    def __init__(
        self,
        config: Config,
        ruleset: LiveRuleset,
        tunnel: Tunnel,
        tables: NftablesEvents | None,
        links: LinkEvents | None,
        *,
        log: Log = log_to_stderr,
        clock: Clock | None = None,
        fallback_lock: Callable[[], None] | None = None,
        wake: HandshakeLog | None = None,
        verdict_dir: Path | None = None,
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
        # Each hint's last showing (monotonic), and the one showing now.
        self.hinted: dict[str, float] = {}
        self.hint: str | None = None
        self.situation = str(State.BLOCKED)
        self.situation_since = self.clock.wall()
        self.reason = "watcher started"
        # Why the last outside lock happened ("sleep", "a lock"), until a relax.
        self.locked_by: str | None = None
        self.verdict_dir = verdict_dir
        self._publish_failed = False
        self.selector = selectors.DefaultSelector()
        for source in (tables, links):
            if source is not None:
                self.selector.register(source.fileno(), selectors.EVENT_READ, source)
        self._tunnel_fd: int | None = None
        # SIGHUP's handler writes here, so a reload wakes the loop at once
        # (a signal alone would not: select() resumes after the handler).
        self._reload_r, self._reload_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._reload_r, selectors.EVENT_READ, self.request_reload)
        # The last reload's outcome, for `earlyfw endpoints refresh` to wait on.
        self.reloaded: dict[str, Any] | None = None
        # Captive-portal windows: requests are read beside the verdict.
        self.portal = WatcherPortal(config.interface, verdict_dir, log)

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
        self.publish()

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
        self.reason, self.situation = why, "stopped"
        self.log(f"blocked: {why}")
        self.portal.tick(self.ruleset, self.state, self.clock.monotonic())
        self.publish(stopped=True)

    def _start_wake(self) -> None:
        if self.wake is None or not self.tunnel.wakes_on_handshakes:
            return
        if self.ruleset.load_wake(self.wake.group):
            self.tunnel.woken = True
            self.selector.register(self.wake.fileno(), selectors.EVENT_READ, self.wake)
        else:
            self.wake.close()
            self.wake = None

    def close(self) -> None:
        self.selector.close()
        os.close(self._reload_r)
        os.close(self._reload_w)
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
        window_due = self.portal.due()
        if window_due is not None:
            timeout = max(0.0, min(timeout, window_due - self.clock.monotonic()))
        outside: list[Generation] = []
        reload = portal = False
        for key, _ in self.selector.select(timeout):
            source = key.data
            if source == self.request_reload:
                while True:
                    try:
                        asked = os.read(self._reload_r, 64)
                    except BlockingIOError:
                        break
                    if not asked:
                        break
                    reload = reload or b"r" in asked
                    portal = portal or b"p" in asked
            elif source is self.tables and self.tables is not None:
                outside += [g for g in self.tables.read() if g.pid != self.pid and g.touches(WATCHED_TABLES)]
            elif source is self.links and self.links is not None:
                if self.links.read():
                    self.due = 0.0
            elif source is self.wake and self.wake is not None:
                if self.wake.read():
                    self.tunnel.wake()
                    self.due = 0.0
            else:
                self.tunnel.on_readable()
                self.due = 0.0
        self._check_suspend()
        if reload:
            self.reload()
        if outside:
            self.check_tables(outside)
        if self.clock.monotonic() >= self.due:
            self.evaluate()
        if portal:
            self._portal_closed()
            self.portal.handle(
                self.ruleset, self.state, self.config, wall=self.clock.wall(), now=self.clock.monotonic()
            )
            self.publish()
        self._portal_closed()

    def _portal_closed(self) -> None:
        if self.portal.tick(self.ruleset, self.state, self.clock.monotonic()):
            self.publish()

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
        verdict = self.tunnel.evaluate(self.not_before)
        self.due = self.clock.monotonic() + verdict.recheck
        for note in self.tunnel.notes:
            self.log(f"warning: {note}")
        self.tunnel.notes.clear()
        situation = self._situation(verdict)
        if verdict.state is not self.state:
            self.change(verdict.state, verdict.reason, situation)
        elif self.state is State.RELAXED and self.tunnel.listen_port != self.ruleset.rendered_port:
            # The listen port moved (`wg set … listen-port`, a new socket):
            # the hole must spare the new one, and no longer the old one.
            was = self.ruleset.rendered_port
            self.ruleset.put(State.RELAXED)
            self.log(f"relaxed, the tunnel's listen port now {self.tunnel.listen_port} (was {was})")
            self.publish()
        if situation != self.situation:
            # The same state for a different reason: the journal says so.
            self.situation, self.situation_since, self.reason = situation, self.clock.wall(), verdict.reason
            self.log(f"{self.state}, {situation}: {verdict.reason}")
            self.publish()
        self._show_hint(self.tunnel.hint)
        return verdict

    def _situation(self, verdict: Verdict) -> str:
        if verdict.state is State.BLOCKED and self.locked_by is not None:
            return ", ".join(filter(None, (f"after {self.locked_by}", verdict.situation)))
        return verdict.situation or str(verdict.state)

    def _show_hint(self, current: str | None) -> None:
        """A hint when its situation starts, again when it recurs, never
        more often than HINT_INTERVAL."""
        if current == self.hint:
            return
        self.hint = current
        if current is None:
            return
        now = self.clock.monotonic()
        last = self.hinted.get(current)
        if last is None or now - last >= HINT_INTERVAL:
            self.hinted[current] = now
            self.log(f"hint: {current}")

    def change(self, state: State, reason: str, situation: str | None = None) -> None:
        self.ruleset.put(state)
        self._changed(state, reason, situation)

    def _changed(self, state: State, reason: str, situation: str | None) -> None:
        self.state = state
        if state is State.RELAXED:
            self.locked_by = None
        self.situation, self.situation_since, self.reason = situation or str(state), self.clock.wall(), reason
        self.log(f"{state}: {reason}")
        self.publish()

    def publish(self, *, stopped: bool = False) -> None:
        """The verdict for `earlyfw status`, atomically (a reader never sees
        half a file). Failing to publish is said once and changes nothing else."""
        if self.verdict_dir is None:
            return
        data = {
            "pid": self.pid,
            "interface": self.config.interface,
            "tunnel": str(self.config.tunnel_kind),
            "state": str(self.state),
            "situation": self.situation,
            "reason": self.reason,
            "since": self.situation_since,
            "stopped": stopped,
            # What it enforces now, and how the last reload went.
            "endpoints": [str(e) for e in self.config.endpoints],
            "reloaded": self.reloaded,
            # The listen port the relaxed tables spare: `earlyfw status` renders them with it.
            "tunnel_port": self.ruleset.rendered_port if self.state is State.RELAXED else None,
            # The captive-portal window, and its last answer to `earlyfw portal`.
            "portal": self.portal.published(),
        }
        try:
            self.verdict_dir.mkdir(mode=0o755, exist_ok=True)
            Root().write(
                str(verdict_path(self.config.interface, self.verdict_dir)),
                (json.dumps(data) + "\n").encode(),
                mode=0o644,
                uid=os.geteuid(),
                gid=os.getegid(),
            )
        except OSError as e:
            if not self._publish_failed:
                self._publish_failed = True
                self.log(f"warning: cannot publish the verdict for `earlyfw status`: {e}")

    # --- reload -----------------------------------------------------------------

    def request_reload(self, what: bytes = b"r") -> None:
        """Safe from a signal handler: only wakes the loop. `what`: b"r" to
        reload, b"p" to read a portal request."""
        with contextlib.suppress(BlockingIOError):  # one is pending already
            os.write(self._reload_w, what)

    def reload(self) -> None:
        """Read the config again. Valid: the new endpoints take effect in
        the tables, the guards and the wake table in one batch, in the state
        the new config's verdict gives. Invalid: nothing changes."""
        path = self.config.source
        try:
            if path is None:
                raise EarlyfwError("the watcher was not started from a config file")
            new = configuration.load(path)
            fixed = [name for name in FIXED_ON_START if getattr(new, name) != getattr(self.config, name)]
            if fixed:
                raise EarlyfwError(f"{', '.join(fixed)} changed, which needs `systemctl restart earlyfw-watch`")
        except EarlyfwError as e:
            self.log(f"reload refused, still enforcing the config it had: {e}")
            self.reloaded = {"ok": False, "at": self.clock.wall(), "error": str(e)}
            self.publish()
            return
        old = self.config
        self._use(new)
        verdict = self.tunnel.evaluate(self.not_before)
        try:
            self.ruleset.put(verdict.state, wake_group=self.wake.group if self.wake is not None else None)
        except EarlyfwError as e:
            # The batch is atomic: the kernel still holds the old config's tables.
            self._use(old)
            self.log(f"reload failed, still enforcing the config it had: {e}")
            self.reloaded = {"ok": False, "at": self.clock.wall(), "error": str(e)}
            self.publish()
            return
        self.due = self.clock.monotonic() + verdict.recheck
        before, after = {str(e) for e in old.endpoints}, {str(e) for e in new.endpoints}
        change = f"+{len(after - before)} -{len(before - after)} endpoint(s)"
        self.reloaded = {"ok": True, "at": self.clock.wall(), "error": None}
        if verdict.state is not self.state:
            # Already in place by the batch above: only recorded and said.
            self._changed(
                verdict.state, f"{verdict.reason} (after reloading {path}: {change})", self._situation(verdict)
            )
        else:
            self.log(f"reloaded {path}: {change}; still {self.state}")
            self.publish()

    def _use(self, config: Config) -> None:
        self.config = self.ruleset.config = config
        self.tunnel.config = config

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

    def lock_request(self, why: str, *, by: str = "a lock") -> None:
        """A lock from outside: obeyed, and only proof newer than it relaxes again."""
        self.locked_by = by
        self.not_before = self.clock.wall()
        self.tunnel.request(State.BLOCKED)
        self.ruleset.put(State.BLOCKED)  # the guard follows the table
        self.state = State.BLOCKED
        self.due = 0.0
        proof = "" if self.tunnel.follows_requests else "; relaxing again needs a newer handshake"
        self.situation, self.situation_since, self.reason = f"after {self.locked_by}", self.clock.wall(), why
        self.log(f"blocked: {why}{proof}")
        self.publish()

    def relax_request(self, who: str) -> None:
        self.tunnel.request(State.RELAXED)
        verdict = self.tunnel.evaluate(self.not_before)
        self.due = self.clock.monotonic() + verdict.recheck
        self.ruleset.put(verdict.state)
        self.state = verdict.state
        self.situation, self.situation_since, self.reason = self._situation(verdict), self.clock.wall(), verdict.reason
        if verdict.state is State.RELAXED:
            self.locked_by = None
            self.situation = self._situation(verdict)
            self.log(f"relaxed: asked by {who}; {verdict.reason}")
        else:
            self.log(f"blocked: refused the relax by {who}: {verdict.reason}")
        self.publish()

    def _gap(self) -> float:
        return self.clock.boottime() - self.clock.monotonic()

    def _check_suspend(self) -> None:
        gap = self._gap()
        slept, self.gap = gap - self.gap, gap
        if slept > SUSPEND_GAP:
            self.lock_request(f"resumed after {slept:.0f}s of suspend", by="sleep")


def main(config: Config, runner: Runner, source: SourceKind = SourceKind.AUTO, *, log: Log = log_to_stderr) -> int:
    nft.require_root_for("watch")
    clock = Clock()
    tunnel = make_tunnel(config, runner, clock, source)
    # Subscribe before the first change, so nothing can slip in between.
    tables, links = NftablesEvents(), LinkEvents()
    wake = None
    if tunnel.wakes_on_handshakes:
        try:
            wake = HandshakeLog()
        except OSError as e:
            log(f"warning: no handshake wake-ups (NFLOG: {e}); polling instead")
    context = Libnftables()
    ruleset = LiveRuleset(config, context, tunnel_port=lambda: tunnel.listen_port)
    watcher = Watcher(
        config,
        ruleset,
        tunnel,
        tables,
        links,
        log=log,
        clock=clock,
        fallback_lock=lambda: nft.put_state(runner, watcher.config, State.BLOCKED),
        wake=wake,
        verdict_dir=VERDICT_DIR,
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        if not watcher.stopping:
            raise Stopped(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    signal.signal(signal.SIGHUP, lambda signum, frame: watcher.request_reload())
    signal.signal(signal.SIGUSR1, lambda signum, frame: watcher.request_reload(b"p"))
    try:
        return watcher.run()
    finally:
        context.close()
