"""The earlyfw command line. Errors are one line (and a hint), never a traceback."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from earlyfw import __version__, importers, metrics, nft, policy
from earlyfw import config as configuration
from earlyfw import install as installer
from earlyfw.errors import EarlyfwError
from earlyfw.policy import State
from earlyfw.root import Root, describe_mode
from earlyfw.run import Runner
from earlyfw.targets import macos
from earlyfw.watch import daemon, sources
from earlyfw.wfp import cli as windows_cli


@dataclass
class Context:
    config_path: Path | None
    runner: Runner

    def config(self, root: Root | None = None) -> configuration.Config:
        path = self.config_path or (root or Root()) / str(configuration.DEFAULT_CONFIG_PATH)
        return configuration.load(path)


pass_context = click.make_pass_decorator(Context)

STATE = click.Choice([s.value for s in State])
REBUILD_HELP = "With --root: also rebuild the image's initramfs inside it (chroot); on / it always is."


TRIGGER_HELP = "On /: activate the initramfs generator's dpkg trigger instead of rebuilding now (maintainer scripts)."


def _check_rebuild(root: Root, rebuild_initramfs: bool, initramfs_trigger: bool = False) -> None:
    if rebuild_initramfs and root.is_host:
        raise click.UsageError("--rebuild-initramfs goes with --root; on / the initramfs is always rebuilt")
    if initramfs_trigger and not root.is_host:
        raise click.UsageError("--initramfs-trigger goes with /, under dpkg; for --root use --rebuild-initramfs")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="earlyfw")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Config file [default: /etc/earlyfw/earlyfw.toml, inside --root when given].",
)
@click.option("-q", "--quiet", is_flag=True, help="Do not echo the commands earlyfw runs.")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, quiet: bool) -> None:
    """Boot-time VPN kill switch: block everything but the tunnel, from the initramfs on."""
    ctx.obj = Context(config_path, Runner(verbose=not quiet))


@cli.command()
@click.option("--state", type=STATE, default=State.BLOCKED.value, show_default=True)
@pass_context
def render(ctx: Context, state: str) -> None:
    """Print the nft script for a state (loads nothing)."""
    click.echo(policy.render(ctx.config(), State(state)), nl=False)


@cli.command()
@click.option("--state", type=STATE, required=True)
@pass_context
def apply(ctx: Context, state: str) -> None:
    """Load a state into the running kernel, atomically."""
    _put(ctx, State(state))


@cli.command()
@pass_context
def relax(ctx: Context) -> None:
    """Allow traffic through the tunnel interface (everything else stays blocked)."""
    _put(ctx, State.RELAXED)


@cli.command()
@pass_context
def lock(ctx: Context) -> None:
    """Block everything but the endpoints, DHCP and neighbour discovery."""
    _put(ctx, State.BLOCKED)


def _put(ctx: Context, state: State) -> None:
    if windows_cli.ON_WINDOWS:  # WFP filters in BFE, not nft (see earlyfw.wfp)
        windows_cli.put_state(ctx, state)
        click.echo(f"earlyfw: {state}")
        return
    nft.require_root_for(f"apply --state {state}")
    config = ctx.config()
    if macos.is_darwin():  # pf through the installed launchd job's script, not nft
        macos.put_state(ctx.runner, config, state)
    else:
        nft.put_state(ctx.runner, config, state)
    click.echo(f"earlyfw: {state}")


@cli.command()
@click.option(
    "--source",
    type=click.Choice(["auto", "uapi", "netlink", "wg"]),
    default="auto",
    show_default=True,
    help="Where WireGuard peers are read: userspace UAPI socket, kernel netlink, or `wg show`.",
)
@pass_context
def watch(ctx: Context, source: str) -> None:
    """Relax the block only once the tunnel's handshake completes; lock it again
    when the tunnel stops being live; repair earlyfw's table if it is removed."""
    ctx.runner.verbose = False
    sys.exit(daemon.main(ctx.config(), ctx.runner, sources.SourceKind(source)))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (schema: README, Fleets).")
@click.option(
    "--prometheus",
    "textfile",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the metrics for node_exporter's textfile collector to this file (atomically).",
)
@pass_context
def status(ctx: Context, as_json: bool, textfile: Path | None) -> None:
    """Show the live state, whether the table is intact, and what was refused."""
    nft.require_root_for("status")
    config = ctx.config()
    ctx.runner.verbose = False
    result = nft.status(ctx.runner, config)
    document = metrics.status_document(result.to_json(), last_handshake=metrics.last_handshake(config, ctx.runner))
    if textfile is not None:
        metrics.write_textfile(textfile, metrics.prometheus(document, now=metrics.now()))
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(f"table inet earlyfw: {'present' if result.present else 'ABSENT'}")
        if result.present:
            click.echo(f"state: {result.state or 'unknown'} ({'intact' if result.intact else 'ALTERED'})")
        click.echo(f"tunnel: {config.tunnel_kind} on {config.interface}")
        click.echo("endpoints: " + ", ".join(result.endpoints))
        for name, (packets, size) in sorted(result.counters.items()):
            click.echo(f"  {name:16} {packets:>10} packets {size:>12} bytes  {policy.COUNTERS.get(name, '')}")
        for warning in result.warnings:
            click.echo(f"warning: {warning}")
    if not result.intact:
        sys.exit(3)


@cli.command()
@pass_context
def verify(ctx: Context) -> None:
    """Check the config, and every rendered state with `nft -c`."""
    config = ctx.config()
    click.echo(f"config {config.source}: ok")
    for state in State:
        nft.check(ctx.runner, policy.render(config, state))
        click.echo(f"ruleset {state}: nft -c ok")


@cli.command()
@click.option(
    "--root",
    "root_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Install into an OS image directory; never touches the running system.",
)
@click.option("--target", "targets", multiple=True, help="Install these targets, not the detected ones.")
@click.option("--now", is_flag=True, help="Also load the blocked state right away (host only).")
@click.option("--rebuild-initramfs", is_flag=True, help=REBUILD_HELP)
@click.option("--initramfs-trigger", is_flag=True, help=TRIGGER_HELP)
@pass_context
def install(  # noqa: PLR0917  (click: one parameter per option)
    ctx: Context,
    root_dir: Path | None,
    targets: tuple[str, ...],
    now: bool,
    rebuild_initramfs: bool,
    initramfs_trigger: bool,
) -> None:
    """Write earlyfw's files (config, rulesets, boot hooks) into / or --root."""
    root = Root(root_dir or Path("/"))
    if now and not root.is_host:
        raise click.UsageError("--now loads the ruleset into the running kernel; it cannot go with --root")
    _check_rebuild(root, rebuild_initramfs, initramfs_trigger)
    if root.is_host and not windows_cli.ON_WINDOWS:  # there: BFE refuses a non-admin
        nft.require_root_for("install")
    report = installer.install(
        ctx.config(root),
        root,
        ctx.runner,
        targets,
        now=now,
        rebuild_initramfs=rebuild_initramfs,
        initramfs_trigger=initramfs_trigger,
    )
    for path in report.written:
        click.echo(f"wrote {root / path}  {describe_mode(root / path)}")
    for path in report.removed:
        click.echo(f"removed {root / path}")
    for note in report.image_notes if not root.is_host else ():
        click.echo(f"next: {note}")


@cli.command()
@click.option("--root", "root_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--rebuild-initramfs", is_flag=True, help=REBUILD_HELP)
@click.option("--initramfs-trigger", is_flag=True, help=TRIGGER_HELP)
@pass_context
def uninstall(ctx: Context, root_dir: Path | None, rebuild_initramfs: bool, initramfs_trigger: bool) -> None:
    """Remove exactly what install wrote, and restore what it replaced."""
    root = Root(root_dir or Path("/"))
    _check_rebuild(root, rebuild_initramfs, initramfs_trigger)
    if root.is_host and not windows_cli.ON_WINDOWS:
        nft.require_root_for("uninstall")
    report = installer.uninstall(
        root, ctx.runner, rebuild_initramfs=rebuild_initramfs, initramfs_trigger=initramfs_trigger
    )
    for path in report.removed:
        click.echo(f"removed {root / path}")
    for path in report.restored:
        click.echo(f"restored {root / path}")
    for note in report.image_notes:
        click.echo(f"next: {note}")


@cli.command("import")
@click.argument("kind", type=click.Choice(sorted(importers.IMPORTERS)))
@click.argument("source", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("-o", "--output", help="Where to write the config ('-' for stdout) [default: --config].")
@click.option("--force", is_flag=True, help="Overwrite an existing config.")
@pass_context
def import_(ctx: Context, kind: str, source: Path, output: str | None, force: bool) -> None:
    """Write an earlyfw config from a WireGuard or OpenVPN client file."""
    config = importers.IMPORTERS[kind](source)
    text = config.to_toml()
    if output == "-":
        click.echo(text, nl=False)
        return
    target = Path(output) if output else (ctx.config_path or configuration.DEFAULT_CONFIG_PATH)
    if target.exists() and not force:
        raise EarlyfwError(f"{target}: already exists", hint="pass --force to overwrite, or -o another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    Root().write(str(target.resolve()), text.encode(), mode=0o644, uid=os.geteuid(), gid=os.getegid())
    click.echo(f"wrote {target}: {len(config.endpoints)} endpoint(s), interface {config.interface}")


cli.add_command(windows_cli.windows)


def main() -> None:
    try:
        status = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except EarlyfwError as e:
        click.echo(f"earlyfw: error: {e}", err=True)
        if e.hint:
            click.echo(f"earlyfw: hint: {e.hint}", err=True)
        sys.exit(e.exit_status)
    sys.exit(status if isinstance(status, int) else 0)
