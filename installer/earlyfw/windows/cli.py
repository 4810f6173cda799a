"""`earlyfw windows …`: the WFP filters shown, put, read and purged by hand.

Registered on the main command group by earlyfw.cli; kept apart so the Linux
commands stay free of Windows branches (`earlyfw relax|lock|status` reach the
same code through earlyfw.windows.platform). Only `show` works off Windows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Protocol

import click

from earlyfw import config as configuration
from earlyfw.policy import State
from earlyfw.root import Root
from earlyfw.run import Runner
from earlyfw.system import System
from earlyfw.windows import backend, engine, platform, rules, watcher


class CliContext(Protocol):
    """What earlyfw.cli.Context carries (not imported: it imports us)."""

    config_path: Path | None
    runner: Runner


def config_path(obj: CliContext) -> Path:
    return obj.config_path or System.current().default_config()


def load_config(obj: CliContext) -> configuration.Config:
    return configuration.load(config_path(obj))


def put_state(obj: CliContext, state: State) -> None:
    platform.put_state(obj.runner, load_config(obj), state, root=Root(), config_path=config_path(obj))


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
        click.echo("  " + platform.describe(f))
    click.echo(f"relaxed adds (earlyfw relax; LUID of {config.windows_adapter}):")
    for f in rules.relax_set(config, rules.Interface(config.windows_adapter, 0)):
        click.echo("  " + platform.describe(f))


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
    code = platform.status(obj.runner, load_config(obj), as_json=False, textfile=None)
    if code:
        sys.exit(code)


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
