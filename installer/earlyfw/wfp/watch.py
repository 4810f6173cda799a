"""The Windows handshake watcher: what `earlyfw windows watch` runs from the
scheduled task, as SYSTEM, from boot on.

It relaxes only on evidence that the tunnel is live, as the Linux watcher
does: for WireGuard a handshake younger than reject_after_seconds with a peer
at a configured endpoint (`wg.exe show TUNNEL dump`); for OpenVPN the tunnel
adapter being up, which the TAP, wintun and DCO drivers report only once the
connection is established. It locks again as soon as that evidence is gone, and
on any error, so a failure leaves the machine blocked.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from earlyfw.config import Config, TunnelKind
from earlyfw.errors import EarlyfwError
from earlyfw.policy import State
from earlyfw.run import Runner
from earlyfw.watch import sources, tunnels
from earlyfw.wfp import engine
from earlyfw.wfp.rules import Interface

POLL_SECONDS = 5.0


def wg_exe() -> str:
    """WireGuard for Windows installs wg.exe here; SYSTEM's PATH may lack it."""
    return os.path.join(os.environ.get("PROGRAMFILES", r"C:\Program Files"), "WireGuard", "wg.exe")


def wireguard_live(config: Config, dump: str, now: float) -> bool:
    """The Linux watcher's rule, on `wg.exe show TUNNEL dump`: a peer at a
    configured UDP endpoint shook hands within reject_after_seconds."""
    verdict = tunnels.wireguard_verdict(config, sources.parse_wg_dump(dump), now=now, not_before=0.0)
    return verdict.state is State.RELAXED


def adapter_up(runner: Runner, alias: str) -> bool:
    """The adapter's status, not localised (netsh's text is). `alias` passed
    the config's interface-name pattern, so it is safe inside quotes."""
    result = runner.run(
        [
            "powershell.exe",
            "-NoProfile",
            "-NonInteractive",
            "-Command",
            f"(Get-NetAdapter -Name '{alias}' -ErrorAction Stop).Status",
        ],
        check=False,
    )
    return result.returncode == 0 and result.stdout.strip() == "Up"


def tunnel_live(config: Config, runner: Runner, now: float) -> bool:
    if config.tunnel_kind is TunnelKind.WIREGUARD:
        result = runner.run([wg_exe(), "show", config.interface, "dump"], check=False)
        return result.returncode == 0 and wireguard_live(config, result.stdout, now)
    if config.tunnel_kind is TunnelKind.OPENVPN:
        return adapter_up(runner, config.interface)
    return False  # manual: `earlyfw relax` and `earlyfw lock` by hand


def _log(message: str) -> None:
    print(f"earlyfw watch: {message}", file=sys.stderr, flush=True)


class Watcher:
    def __init__(
        self,
        config: Config,
        runner: Runner,
        backend: engine.Backend,
        *,
        clock: Callable[[], float] = time.time,
        log: Callable[[str], None] = _log,
    ) -> None:
        self.config = config
        self.runner = runner
        self.backend = backend
        self.clock = clock
        self.log = log
        # What was last put in place; None: unknown, so the next step applies.
        self.applied: tuple[State, int | None] | None = None

    def wanted(self) -> tuple[State, int | None]:
        try:
            live = tunnel_live(self.config, self.runner, self.clock())
        except EarlyfwError as e:
            self.log(f"{e}; staying blocked")
            return State.BLOCKED, None
        if not live:
            return State.BLOCKED, None
        luid = engine.tunnel_luid(self.backend, self.config.interface)
        if luid is None:
            self.log(f"no adapter named {self.config.interface!r}; staying blocked")
            return State.BLOCKED, None
        return State.RELAXED, luid

    def step(self) -> State:
        want = self.wanted()
        if want == self.applied:
            return want[0]
        state, luid = want
        try:
            if state is State.RELAXED and luid is not None:
                engine.relax(self.backend, self.config, Interface(self.config.interface, luid))
            else:
                engine.lock(self.backend)
        except EarlyfwError as e:
            self.applied = None  # unknown: try again next time
            self.log(f"could not put {state} in place: {e}")
            return State.BLOCKED
        self.applied = want
        self.log(f"{state}" + (f" (tunnel LUID {luid:#x})" if luid is not None else ""))
        return state

    def run(
        self,
        *,
        interval: float = POLL_SECONDS,
        iterations: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        count = 0
        while iterations is None or count < iterations:
            self.step()
            count += 1
            if iterations is None or count < iterations:
                sleep(interval)
