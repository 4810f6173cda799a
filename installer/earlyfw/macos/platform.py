"""macOS's side of the platform seam (earlyfw.system): pf, always through the
installed earlyfw-pf (the launchd job's script), so the CLI and the job share
one implementation; nft is never called here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import click

from earlyfw.config import Config
from earlyfw.errors import EarlyfwError
from earlyfw.macos import target
from earlyfw.policy import State
from earlyfw.root import Root
from earlyfw.run import Runner

PF_FILES = ("earlyfw.pf", "tunnel.pf", "emergency.pf")


def require_admin(action: str) -> None:
    if os.geteuid() != 0:
        raise EarlyfwError(f"{action} needs root (pf is root's)", hint=f"sudo earlyfw {action}")


def render(config: Config, state: State) -> str:
    target.require_pf_state(state)
    rendered = target.render(config)
    if state is State.BLOCKED:
        return rendered.rules
    return f"{rendered.rules}\n# anchor {target.TUNNEL_ANCHOR}, loaded to relax:\n{rendered.tunnel}"


def put_state(runner: Runner, config: Config, state: State, *, root: Root, config_path: Path) -> None:
    target.put_state(runner, config, state, root=root)


def status(runner: Runner, config: Config, *, as_json: bool, textfile: Path | None) -> int:
    if as_json or textfile is not None:
        raise EarlyfwError(
            "status --json and --prometheus exist only on Linux so far; on macOS status prints text",
            hint="`earlyfw status` without them",
        )
    result = target.status(runner)
    click.echo(result.stdout, nl=False)
    if result.returncode not in (0, 3):  # the script itself failed, not a finding
        raise EarlyfwError(f"earlyfw-pf status failed with status {result.returncode}: {result.stderr.strip()}")
    return result.returncode


def verify(runner: Runner, config: Config) -> Iterator[str]:
    """pf cannot load rules into a private copy of itself: each file is checked
    against earlyfw's pf subset and the anchor's required shape (what install
    refuses to write otherwise); `sudo pfctl -vnf FILE` asks pf on the Mac."""
    target.render(config)
    for name in PF_FILES:
        yield f"pf rules {name}: earlyfw's pf subset ok"


def live_state(runner: Runner) -> State | None:
    try:
        lines = target.status(runner).stdout.splitlines()
    except EarlyfwError:
        return None  # not installed, or not root
    states = {f"state: {s}": s for s in (State.BLOCKED, State.RELAXED)}
    return next((states[line] for line in lines if line in states), None)


def watch(runner: Runner, config: Config, source: str) -> int:
    raise EarlyfwError(
        "`earlyfw watch` is the Linux watcher; on macOS the launchd job's `earlyfw-pf watch` relaxes and locks",
        hint="`sudo launchctl print system/org.earlyfw.pf` shows it",
    )


def portal(runner: Runner, config: Config, command: tuple[str, ...], minutes: float, dns: tuple[str, ...]) -> int:
    raise EarlyfwError(
        "`earlyfw portal` exists only on Linux: pf has no cgroups to scope a window to one program",
        hint="log in to the portal with earlyfw uninstalled, or from another device",
    )


def refresh_endpoints(runner: Runner, config_path: Path) -> None:
    raise EarlyfwError(
        "`earlyfw endpoints refresh` swaps pins in nftables sets; macOS has none",
        hint="run `earlyfw import --resolve` again and then `earlyfw install`",
    )


def remove_leftovers(runner: Runner) -> list[str]:
    # Without the manifest there is no record of a token or a hook to take out;
    # `sudo pfctl -a com.apple/000.earlyfw -F all` is the README's break glass.
    return []
