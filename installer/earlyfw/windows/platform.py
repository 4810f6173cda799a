"""Windows's side of the platform seam (earlyfw.system): WFP filters in the
Base Filtering Engine (BFE), through fwpuclnt.dll (see earlyfw.windows)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import click

from earlyfw.config import Config
from earlyfw.errors import EarlyfwError
from earlyfw.policy import State
from earlyfw.root import Root
from earlyfw.run import Runner
from earlyfw.windows import backend, engine, rules, watcher


def require_admin(action: str) -> None:
    # earlyfw.exe asks for elevation when started (its manifest), and BFE
    # refuses a non-administrator's every change with its own one-line error.
    return


def describe(f: rules.Filter) -> str:
    """One filter as one line: lifetime, layer, weight, action, role, conditions."""

    def value(v: rules.Value) -> str:
        return v.alias if isinstance(v, rules.Interface) else str(v)

    conditions = " ".join(f"{c.field}={value(c.value)}" for c in f.conditions)
    return f"{f.lifetime:<10} {f.layer:<24} w{int(f.weight):<3}{f.action:<7}{f.role:<36} {conditions}".rstrip()


def _filters(config: Config, state: State) -> tuple[rules.Filter, ...]:
    """The filters in place in `state`; the tunnel's LUID is looked up at each
    relax, 0 stands for it here."""
    if state is State.BLOCKED:
        return rules.install_set(config)
    if state is State.RELAXED:
        return rules.install_set(config) + rules.relax_set(config, rules.Interface(config.windows_adapter, 0))
    raise EarlyfwError(f"the {state} state exists only on Linux")


def render(config: Config, state: State) -> str:
    return "".join(describe(f) + "\n" for f in _filters(config, state))


def put_state(runner: Runner, config: Config, state: State, *, root: Root, config_path: Path) -> None:
    """`earlyfw relax` / `earlyfw lock` on Windows. A lock is recorded beside
    the config, so the watcher keeps it until the tunnel proves itself again (a
    handshake after it, or the OpenVPN adapter going down and up); a relax by
    hand clears it."""
    wfp = backend.load()
    record = watcher.lock_record(config_path)
    if state is State.RELAXED:
        luid = engine.tunnel_luid(wfp, config.windows_adapter)
        if luid is None:
            raise EarlyfwError(
                f"no network adapter named {config.windows_adapter!r}: nothing to relax onto",
                hint="start the tunnel first; [tunnel] interface must be the adapter's name (Get-NetAdapter)",
            )
        engine.relax(wfp, config, rules.Interface(config.windows_adapter, luid))
        record.unlink(missing_ok=True)
    elif state is State.BLOCKED:
        # Recorded first: the watcher must not relax again between the two.
        record.write_text(f"{time.time():.3f}\n")
        engine.lock(wfp)
    else:
        raise EarlyfwError(f"the {state} state exists only on Linux")


def status(runner: Runner, config: Config, *, as_json: bool, textfile: Path | None) -> int:
    """Which earlyfw filters BFE has; 3 if the block is missing."""
    if as_json or textfile is not None:
        raise EarlyfwError(
            "status --json and --prometheus exist only on Linux so far; on Windows status prints text",
            hint="`earlyfw status` without them",
        )
    wfp = backend.load()
    found = engine.installed(wfp)
    keys = {f.key for f in found}
    wanted = {f.key for f in rules.install_set(config) if f.lifetime is rules.Lifetime.PERSISTENT}
    boot = {f.key for f in rules.boottime_set()}
    relaxed = bool(keys & rules.relax_keys())
    for lifetime in rules.Lifetime:
        click.echo(f"{lifetime}: {sum(1 for f in found if f.lifetime is lifetime)} filters")
    click.echo(f"state: {'relaxed' if relaxed else 'blocked'}")
    for key, name, weight in engine.rival_sublayers(wfp):
        click.echo(
            f"warning: sublayer {name!r} ({key}) also has weight {weight:#x}: "
            "a hard permit there is not overridden by earlyfw's blocks"
        )
    missing = wanted - keys
    boot_missing = boot - keys
    if boot_missing == boot:
        # BFE lists boot-time filters only on the boot they were added.
        click.echo(
            "boot-time filters: not listed by BFE (normal after a reboot); "
            "`netsh wfp show boottimepolicy` shows what tcpip.sys enforces"
        )
    elif boot_missing:
        click.echo(f"warning: {len(boot_missing)} boot-time filters missing: run `earlyfw windows apply`")
    if missing:
        click.echo(f"warning: {len(missing)} persistent filters missing or changed: run `earlyfw windows apply`")
    return 3 if missing or (boot_missing and boot_missing != boot) else 0


def verify(runner: Runner, config: Config) -> Iterator[str]:
    """Only a running Windows has BFE: each state's filters are built and
    encoded as the WFP structures BFE would be handed."""
    for state in (State.BLOCKED, State.RELAXED):
        filters = _filters(config, state)
        engine.encode(filters)
        yield f"filters {state}: {len(filters)} WFP filters encode"


def live_state(runner: Runner) -> State | None:
    try:
        found = {f.key for f in engine.installed(backend.load())}
    except EarlyfwError:
        return None
    if not found:
        return None
    return State.RELAXED if found & rules.relax_keys() else State.BLOCKED


def watch(runner: Runner, config: Config, source: str) -> int:
    raise EarlyfwError(
        "`earlyfw watch` is the Linux watcher; on Windows the watcher is `earlyfw windows watch`",
        hint="the scheduled task `earlyfw install` registers runs it at boot",
    )


def portal(runner: Runner, config: Config, command: tuple[str, ...], minutes: float, dns: tuple[str, ...]) -> int:
    raise EarlyfwError(
        "`earlyfw portal` exists only on Linux: WFP has no cgroups to scope a window to one program",
        hint="log in to the portal with earlyfw uninstalled, or from another device",
    )


def refresh_endpoints(runner: Runner, config_path: Path) -> None:
    raise EarlyfwError(
        "`earlyfw endpoints refresh` swaps pins in nftables sets; Windows has none",
        hint="run `earlyfw import --resolve` again and then `earlyfw install`",
    )


def remove_leftovers(runner: Runner) -> list[str]:
    # Filters left without a manifest are taken out by `earlyfw windows purge`.
    return []
