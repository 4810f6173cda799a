"""The Windows handshake watcher: what `earlyfw windows watch` runs from the
scheduled task, as SYSTEM, from boot on.

It relaxes only on evidence that the tunnel is live, as the Linux watcher
does: for WireGuard a handshake younger than reject_after_seconds with a peer
at a configured endpoint (`wg.exe show TUNNEL dump`); for OpenVPN the tunnel
adapter being up, which the TAP, wintun and DCO drivers report only once the
connection is established (read from GetIfEntry2, not PowerShell). It locks
again as soon as that evidence is gone, on an explicit `earlyfw lock` until the
tunnel proves itself again, and on any error, so a failure leaves the machine
blocked.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from earlyfw.config import Config, TunnelKind
from earlyfw.errors import EarlyfwError
from earlyfw.handshake import parse_wg_dump, wireguard_verdict
from earlyfw.policy import State
from earlyfw.run import Runner
from earlyfw.windows import engine, rules
from earlyfw.windows.rules import Interface

POLL_SECONDS = 5.0


def wg_exe() -> str:
    """WireGuard for Windows installs wg.exe here (administrators only may
    write there); SYSTEM's PATH may lack it."""
    return os.path.join(os.environ.get("PROGRAMFILES", r"C:\Program Files"), "WireGuard", "wg.exe")


def wireguard_live(config: Config, dump: str, now: float, not_before: float = 0.0) -> bool:
    """Every watcher's WireGuard rule, on `wg.exe show TUNNEL dump`: a peer at a
    configured UDP endpoint shook hands within reject_after_seconds, and
    after the last explicit lock."""
    verdict = wireguard_verdict(config, parse_wg_dump(dump), now=now, not_before=not_before)
    return verdict.state is State.RELAXED


def lock_record(config_path: Path) -> Path:
    """Where `earlyfw lock` records when it locked: next to the config, in
    the directory only SYSTEM and Administrators may write."""
    return config_path.parent / "locked-at"


def read_lock(path: Path) -> float:
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return 0.0


def _log(message: str) -> None:
    print(f"earlyfw watch: {message}", file=sys.stderr, flush=True)


LOG_NAME = "watch.log"
LOG_LIMIT = 1 << 20  # bytes; one older generation is kept as watch.log.1


class Log:
    """The scheduled task has no console: what the watcher changes goes to
    stderr and, timestamped, to a bounded file beside the config."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock

    def __call__(self, message: str) -> None:
        _log(message)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.clock()))
        try:
            if self.path.exists() and self.path.stat().st_size > LOG_LIMIT:
                self.path.replace(self.path.with_name(self.path.name + ".1"))
            with self.path.open("a", encoding="utf-8") as f:
                f.write(f"{stamp} {message}\n")
        except OSError as e:
            _log(f"cannot write {self.path}: {e}")


class Watcher:
    """Holds the relax permits in a dynamic BFE session of its own: they
    exist only while this process does, so a killed or crashed watcher
    leaves the machine blocked, as any other error does. BFE is asked on
    every poll what it really holds: a BFE restart, `earlyfw windows apply`
    or another session's lock are noticed, never trusted away."""

    def __init__(
        self,
        config: Config,
        runner: Runner,
        backend: engine.Backend,
        *,
        clock: Callable[[], float] = time.time,
        log: Callable[[str], None] = _log,
        lock_path: Path | None = None,
    ) -> None:
        self.config = config
        self.runner = runner
        self.backend = backend
        self.clock = clock
        self.log = log
        self.lock_path = lock_path
        self.session: engine.Session | None = None
        # The LUID our permits name, None when we hold none.
        self.applied: int | None = None
        # OpenVPN has no handshake time: an explicit lock holds until the
        # adapter has been seen down (the connection restarted).
        self.lock_seen = 0.0
        self.hold = False
        # The lock record the last decision read: a relax goes in only if it
        # is unchanged once the relax transaction holds BFE.
        self.decided_on = 0.0

    def _bfe(self) -> engine.Session:
        if self.session is None:
            bfe = engine.Session(self.backend, dynamic=True)
            bfe.open()
            self.session = bfe
        return self.session

    def close(self) -> None:
        """End the session: BFE deletes the permits it holds."""
        if self.session is not None:
            self.session.close()
            self.session = None
        self.applied = None

    def _read_lock(self) -> float:
        return read_lock(self.lock_path) if self.lock_path else 0.0

    def wanted(self) -> tuple[State, int | None]:
        locked_at = self.decided_on = self._read_lock()
        try:
            if self.config.tunnel_kind is TunnelKind.MANUAL:
                return State.BLOCKED, None  # manual: `earlyfw relax` and `earlyfw lock` by hand
            luid = engine.tunnel_luid(self.backend, self.config.windows_adapter)
            if self.config.tunnel_kind is TunnelKind.WIREGUARD:
                result = self.runner.run([wg_exe(), "show", self.config.windows_adapter, "dump"], check=False)
                live = result.returncode == 0 and wireguard_live(self.config, result.stdout, self.clock(), locked_at)
            else:
                up = luid is not None and engine.adapter_up(self.backend, luid)
                if locked_at > self.lock_seen:
                    self.lock_seen, self.hold = locked_at, True
                if not up:
                    self.hold = False
                live = up and not self.hold
        except EarlyfwError as e:
            self.log(f"{e}; staying blocked")
            return State.BLOCKED, None
        if not live:
            return State.BLOCKED, None
        if luid is None:
            self.log(f"no adapter named {self.config.windows_adapter!r}; staying blocked")
            return State.BLOCKED, None
        return State.RELAXED, luid

    def step(self) -> State:
        state, luid = self.wanted()
        for attempt in (1, 2):
            try:
                put = self._put(state, luid)
                if put is None:
                    return state
                state, luid = put
                break
            except EarlyfwError as e:
                # BFE restarted (the handle is gone) or refused: end this
                # session, which drops whatever permits it held, and try
                # once more with a new one.
                self.close()
                if attempt == 2:
                    self.log(f"could not put {state} in place: {e}")
                    return State.BLOCKED
        self.applied = luid
        self.log(f"{state}" + (f" (tunnel LUID {luid:#x})" if luid is not None else ""))
        return state

    def _put(self, state: State, luid: int | None) -> tuple[State, int | None] | None:
        """Make BFE hold what `state` needs; what it then holds, or None if it
        already did."""
        bfe = self._bfe()
        present = engine.relax_keys_in(bfe)
        if state is State.RELAXED and luid is not None:
            tunnel = Interface(self.config.windows_adapter, luid)
            if present == {f.key for f in rules.relax_set(self.config, tunnel)} and self.applied == luid:
                return None
            # `earlyfw lock` records the lock before its own transaction, and
            # BFE runs one transaction at a time: a lock that landed after
            # this decision is seen here, or its transaction follows ours.
            if engine.relax_in(bfe, self.config, tunnel, unless=lambda: self._read_lock() != self.decided_on):
                return state, luid
            self.log("an explicit lock came in meanwhile; staying blocked")
            return State.BLOCKED, None
        if not present and self.applied is None:
            return None
        engine.lock_in(bfe)
        return State.BLOCKED, None

    def run(
        self,
        *,
        interval: float = POLL_SECONDS,
        iterations: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        count = 0
        try:
            while iterations is None or count < iterations:
                self.step()
                count += 1
                if iterations is None or count < iterations:
                    sleep(interval)
        finally:
            self.close()
