"""`earlyfw windows …`, and the WFP side of `earlyfw relax` / `earlyfw lock`.

Registered on the main command group by earlyfw.cli; kept apart so the Linux
commands stay free of Windows branches. Only `show` works off Windows.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Protocol

import click

from earlyfw import config as configuration
from earlyfw.errors import EarlyfwError
from earlyfw.policy import State
from earlyfw.run import Runner
from earlyfw.windows import backend, engine, rules, watcher

ON_WINDOWS = sys.platform == "win32"


class CliContext(Protocol):
    """What earlyfw.cli.Context carries (not imported: it imports us)."""

    config_path: Path | None
    runner: Runner


def default_config() -> Path:
    if ON_WINDOWS:
        return Path(os.environ.get("PROGRAMDATA", r"C:\ProgramData")) / "earlyfw" / "earlyfw.toml"
    return configuration.DEFAULT_CONFIG_PATH


def config_path(obj: CliContext) -> Path:
    return obj.config_path or default_config()


def load_config(obj: CliContext) -> configuration.Config:
    return configuration.load(config_path(obj))


def put_state(obj: CliContext, state: State) -> None:
    """`earlyfw relax` / `earlyfw lock` on Windows. A lock is recorded, so the
    watcher keeps it until the tunnel proves itself again (a handshake after
    it, or the OpenVPN adapter going down and up); a relax by hand clears it."""
    config = load_config(obj)
    wfp = backend.load()
    record = watcher.lock_record(config_path(obj))
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


def _describe(f: rules.Filter) -> str:
    def value(v: rules.Value) -> str:
        return v.alias if isinstance(v, rules.Interface) else str(v)

    conditions = " ".join(f"{c.field}={value(c.value)}" for c in f.conditions)
    return f"{f.lifetime:<10} {f.layer:<24} w{int(f.weight):<3}{f.action:<7}{f.role:<36} {conditions}".rstrip()


@click.group()
def windows() -> None:
    """The Windows Filtering Platform side of earlyfw (Windows; `show` works anywhere)."""


@windows.command()
@click.option("--json", "as_json", is_flag=True, help="The JSON the windows target writes.")
@click.pass_obj
def show(obj: CliContext, as_json: bool) -> None:
    """Print the WFP filters the config makes (changes nothing)."""
    config = load_config(obj)
    if as_json:
        click.echo(json.dumps(rules.describe(config), indent=2))
        return
    click.echo("blocked state (earlyfw install):")
    for f in rules.install_set(config):
        click.echo("  " + _describe(f))
    click.echo(f"relaxed adds (earlyfw relax; LUID of {config.windows_adapter}):")
    for f in rules.relax_set(config, rules.Interface(config.windows_adapter, 0)):
        click.echo("  " + _describe(f))


@windows.command()
@click.pass_obj
def apply(obj: CliContext) -> None:
    """Put the blocked state into BFE now (what install does), in one transaction."""
    ids = engine.install(backend.load(), load_config(obj))
    click.echo(f"earlyfw: blocked ({len(ids)} filters)")


@windows.command()
@click.pass_obj
def relax(obj: CliContext) -> None:
    """Permit traffic through the tunnel adapter."""
    put_state(obj, State.RELAXED)
    click.echo("earlyfw: relaxed")


@windows.command()
@click.pass_obj
def lock(obj: CliContext) -> None:
    """Remove the tunnel permit: blocked again."""
    put_state(obj, State.BLOCKED)
    click.echo("earlyfw: blocked")


@windows.command()
@click.pass_obj
def status(obj: CliContext) -> None:
    """Show which earlyfw filters BFE has; exit 3 if the block is missing."""
    wfp = backend.load()
    found = engine.installed(wfp)
    keys = {f.key for f in found}
    config = load_config(obj)
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
    if missing or (boot_missing and boot_missing != boot):
        if missing:
            click.echo(f"warning: {len(missing)} persistent filters missing or changed: run `earlyfw windows apply`")
        sys.exit(3)


@windows.command()
def purge() -> None:
    """Break-glass: remove every earlyfw WFP object (needs no config)."""
    engine.uninstall(backend.load())
    click.echo("earlyfw: every WFP filter, the sublayer and the provider removed")


@windows.command("watch")
@click.option("--interval", type=click.FloatRange(0.5, 3600), default=watcher.POLL_SECONDS, show_default=True)
@click.option("--once", is_flag=True, help="Decide and apply once, then exit.")
@click.pass_obj
def watch_command(obj: CliContext, interval: float, once: bool) -> None:
    """Relax while the tunnel is live, lock when it is not (the scheduled task runs this)."""
    path = config_path(obj)
    config = configuration.load(path)
    obj.runner.verbose = False  # it polls every few seconds; it logs what it changes
    log = watcher.Log(path.parent / watcher.LOG_NAME)
    daemon = watcher.Watcher(config, obj.runner, backend.load(), lock_path=watcher.lock_record(path), log=log)
    daemon.run(interval=interval, iterations=1 if once else None)
