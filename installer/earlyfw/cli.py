"""The earlyfw command line. Errors are one line (and a hint), never a traceback."""

from __future__ import annotations

import contextlib
import errno
import importlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NoReturn, TextIO, cast

import click

# Only what every command needs is imported here; each command imports its own
# modules (plumbum, jinja2, dnspython, the targets, WFP...) when it runs, so
# `earlyfw watch`, started at boot before any tunnel, loads only the watcher's.
# tests/test_cli_imports.py holds the watcher's path to that.
from earlyfw import __version__, entry, importers, policy
from earlyfw import config as configuration
from earlyfw.errors import ConfigError, EarlyfwError
from earlyfw.policy import State
from earlyfw.root import Root
from earlyfw.run import Runner
from earlyfw.system import System


@dataclass
class Context:
    config_path: Path | None
    runner: Runner

    @property
    def path(self) -> Path:
        """The config file: --config, or this system's own."""
        return self.config_path or System.current().default_config()

    def config(self, root: Root | None = None, system: System | None = None) -> configuration.Config:
        """The config; for an image (`root` not the host) without --config,
        the one in the image where `system` keeps it."""
        if self.config_path is not None or root is None or root.is_host or system is None:
            return configuration.load(self.path)
        # The image's own config, read inside the image: a symlink there is the image's path, never the host's.
        where = system.config_path
        return configuration.load(
            root / where,
            lambda: root.read_bytes(where),
            missing=" in the image",
            hint="put the image's config there, or pass --config",
        )


pass_context = click.make_pass_decorator(Context)

STATE = click.Choice([s.value for s in State])
REBUILD_HELP = "With --root: also rebuild the image's initramfs inside it (chroot); on / it always is."


TRIGGER_HELP = (
    "On /: activate the initramfs generator's dpkg trigger instead of rebuilding now, and only if a file"
    " the initramfs carries changed (maintainer scripts)."
)


def _check_rebuild(root: Root, rebuild_initramfs: bool, initramfs_trigger: bool = False) -> None:
    if rebuild_initramfs and root.is_host:
        raise click.UsageError("--rebuild-initramfs goes with --root; on / the initramfs is always rebuilt")
    if initramfs_trigger and not root.is_host:
        raise click.UsageError("--initramfs-trigger goes with /, under dpkg; for --root use --rebuild-initramfs")


class _Group(click.Group):
    """The top-level group: its platform-specific subgroups are imported only
    when named (or listed by --help)."""

    LAZY: ClassVar[dict[str, tuple[str, str]]] = {"windows": ("earlyfw.windows.cli", "windows")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.LAZY:
            module, name = self.LAZY[cmd_name]
            command = getattr(importlib.import_module(module), name)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="earlyfw")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Config file [default: {System.current().default_config()}; with --root, the image's own].",
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
    """Print the rules of a state as this system loads them: the nft script on
    Linux, pf rules on macOS, WFP filters on Windows (loads nothing)."""
    click.echo(System.current().platform.render(ctx.config(), State(state)), nl=False)


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
    platform = System.current().platform
    platform.require_admin(f"apply --state {state}")
    platform.put_state(ctx.runner, ctx.config(), state, root=Root(), config_path=ctx.path)
    click.echo(f"earlyfw: {state}")


@cli.command(name=entry.WATCH)
@click.option(
    "--source",
    type=click.Choice(list(entry.WATCH_SOURCES)),
    default=entry.WATCH_SOURCES[0],
    show_default=True,
    help="Where WireGuard peers are read: userspace UAPI socket, kernel netlink, or `wg show`.",
)
@pass_context
def watch(ctx: Context, source: str) -> None:
    """Relax the block only once the tunnel's handshake completes; lock it again
    when the tunnel stops being live; repair earlyfw's table if it is removed."""
    sys.exit(entry.watch(ctx.config_path, source))


@cli.command()
@click.option(
    "--minutes",
    type=click.FloatRange(policy.PORTAL_MIN_SECONDS / 60, policy.PORTAL_MAX_MINUTES),
    default=policy.PORTAL_DEFAULT_MINUTES,
    show_default=True,
    help=f"How long the window stays open at most (fractions allowed, at least {policy.PORTAL_MIN_SECONDS} s).",
)
@click.option(
    "--dns",
    "dns",
    multiple=True,
    metavar="ADDRESS",
    help="The network's resolver for the window (repeatable) [default: read from systemd-resolved, "
    "NetworkManager or /etc/resolv.conf].",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_context
def portal(ctx: Context, minutes: float, dns: tuple[str, ...], command: tuple[str, ...]) -> None:
    """Open a captive-portal window: run COMMAND (a browser; as the sudo
    user) in a cgroup of its own that may use DNS and HTTP/HTTPS while
    everything else stays blocked, until it exits, the window times out or
    earlyfw relaxes. Needs [portal] allow = true. Give the command after --."""
    ctx.runner.verbose = False
    sys.exit(System.current().platform.portal(ctx.runner, ctx.config(), command, minutes, dns))


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
    """Show the live state, whether earlyfw's block is intact, and (Linux) what was refused."""
    platform = System.current().platform
    platform.require_admin("status")
    config = ctx.config()
    ctx.runner.verbose = False
    code = platform.status(ctx.runner, config, as_json=as_json, textfile=textfile)
    if code:
        sys.exit(code)


@cli.command()
@pass_context
def verify(ctx: Context) -> None:
    """Check the config and every state it renders, as far as this system can
    without touching the live firewall (Linux: loaded into a private namespace)."""
    config = ctx.config()
    click.echo(f"config {config.source}: ok")
    for line in System.current().platform.verify(ctx.runner, config):
        click.echo(line)


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
    from earlyfw import install as installer  # noqa: PLC0415
    from earlyfw.root import describe_mode  # noqa: PLC0415

    root = Root(root_dir or Path("/"))
    if now and not root.is_host:
        raise click.UsageError("--now loads the ruleset into the running kernel; it cannot go with --root")
    _check_rebuild(root, rebuild_initramfs, initramfs_trigger)
    system = installer.system_of(root, targets)
    if root.is_host:
        system.platform.require_admin("install")
    config = ctx.config(root, system)
    with _os_errors():
        report = installer.install(
            config,
            root,
            ctx.runner,
            targets,
            now=now,
            rebuild_initramfs=rebuild_initramfs,
            initramfs_trigger=initramfs_trigger,
        )
    for path in report.written:
        st = root.lstat(path)
        click.echo(f"wrote {root / path}  {describe_mode(st) if st else '(gone)'}")
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
    from earlyfw import install as installer  # noqa: PLC0415

    root = Root(root_dir or Path("/"))
    _check_rebuild(root, rebuild_initramfs, initramfs_trigger)
    if root.is_host:
        System.current().platform.require_admin("uninstall")
    with _os_errors():
        report = installer.uninstall(
            root, ctx.runner, rebuild_initramfs=rebuild_initramfs, initramfs_trigger=initramfs_trigger
        )
    for path in report.removed:
        click.echo(f"removed {root / path}")
    for path in report.restored:
        click.echo(f"restored {root / path}")
    for path, beside in report.kept_backups:
        click.echo(f"kept {root / path} (changed since install); the file it had replaced: {root / beside}")
    for note in report.image_notes:
        click.echo(f"next: {note}")
    for failure in report.failures:
        click.echo(f"earlyfw: failed: {failure}", err=True)
    if report.failures:
        raise EarlyfwError(
            f"uninstall: {len(report.failures)} step(s) failed (listed above)", hint=installer.AGAIN_HINT
        )


@contextlib.contextmanager
def _os_errors() -> Iterator[None]:
    """A file earlyfw cannot read or write in the root is one line, not a traceback."""
    try:
        yield
    except OSError as e:
        raise EarlyfwError(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")) from None


@cli.command("import")
@click.argument("kind", type=click.Choice(sorted(importers.READERS)))
@click.argument("source", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("-o", "--output", help="Where to write the config ('-' for stdout) [default: --config].")
@click.option("--force", is_flag=True, help="Overwrite an existing config (and --client-out file).")
@click.option(
    "--resolve",
    is_flag=True,
    help="Resolve hostnames (every A and AAAA address) and pin them; refused while earlyfw blocks.",
)
@click.option(
    "--client-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a copy of SOURCE with hostnames replaced by the pinned addresses, for the VPN client.",
)
@pass_context
def import_(
    ctx: Context, kind: str, source: Path, *, output: str | None, force: bool, resolve: bool, client_out: Path | None
) -> None:
    """Write an earlyfw config from a WireGuard or OpenVPN client file."""
    from earlyfw import resolve as resolver  # noqa: PLC0415

    imported = importers.READERS[kind](source)
    for warning in imported.warnings:
        click.echo(f"earlyfw: warning: {warning}", err=True)
    targets = [] if output == "-" else [Path(output) if output else ctx.path]
    if client_out is not None:
        if client_out.exists() and client_out.resolve() == source.resolve():
            raise ConfigError(f"--client-out {client_out}: is the source file; earlyfw never rewrites it")
        targets.append(client_out)
    for target in targets if not force else ():
        if target.exists():
            raise EarlyfwError(f"{target}: already exists", hint="pass --force to overwrite, or choose another path")
    lookup = None
    if resolve and importers.hostnames(imported):
        _refuse_dns_while_blocked(ctx.runner)
        lookup = resolver.system
    config = importers.build(imported, lookup)
    text = config.to_toml()
    if client_out is not None:
        # The client's file may hold its private key: owner-only.
        _write(client_out, importers.client_file(imported).encode(), 0o600)
        click.echo(
            f"wrote {client_out}: the client file with {len(imported.remotes)} remote(s) pinned", err=output == "-"
        )
    if output == "-":
        click.echo(text, nl=False)
        return
    _write(targets[0], text.encode(), 0o644)
    click.echo(f"wrote {targets[0]}: {len(config.endpoints)} endpoint(s), interface {config.interface}")


def _write(target: Path, data: bytes, mode: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    uid, gid = System.current().file_owner()
    Root().write(str(target.resolve()), data, mode=mode, uid=uid, gid=gid)


def _refuse_dns_while_blocked(runner: Runner) -> None:
    runner.verbose = False
    state = System.current().platform.live_state(runner)
    if state is not None and not state.allows_tunnel:
        raise EarlyfwError(
            f"earlyfw is {state}: DNS is blocked, so hostnames cannot be resolved now",
            hint="import with --resolve before `earlyfw install`, or while the tunnel is up (relaxed); "
            "or list the addresses yourself",
        )


@cli.group()
def endpoints() -> None:
    """Endpoints pinned from hostnames (`import --resolve`)."""


@endpoints.command()
@pass_context
def refresh(ctx: Context) -> None:
    """Re-resolve the endpoints' hostnames through the tunnel only (the VPN's
    resolvers, while relaxed) and swap the pins in the config, the installed
    boot rulesets and the live sets (through a running watcher, which reloads),
    new before old. A host that cannot be resolved keeps its pins."""
    System.current().platform.refresh_endpoints(ctx.runner, ctx.path)


def main() -> None:
    try:
        status = cli.main(standalone_mode=False)
    except Exception as e:
        fail(e)
    sys.exit(status if isinstance(status, int) else 0)


def fail(e: Exception) -> NoReturn:
    """End on `e` as every command does (`earlyfw watch` started by
    earlyfw.entry too): one line and a hint, never a traceback, for what
    earlyfw and click report; anything else is raised."""
    if isinstance(e, click.exceptions.Abort):
        click.echo("aborted", err=True)
        sys.exit(130)
    if isinstance(e, click.ClickException):
        e.show()
        sys.exit(e.exit_code)
    if isinstance(e, EarlyfwError):
        click.echo(f"earlyfw: error: {e}", err=True)
        if e.hint:
            click.echo(f"earlyfw: hint: {e.hint}", err=True)
        sys.exit(e.exit_status)
    if isinstance(e, OSError) and e.errno == errno.EPIPE:
        # What click's parser does when the reader of the output went away.
        sys.stdout = cast("TextIO", click.utils.PacifyFlushWrapper(sys.stdout))
        sys.stderr = cast("TextIO", click.utils.PacifyFlushWrapper(sys.stderr))
        sys.exit(1)
    raise e


def interrupted(e: KeyboardInterrupt | EOFError) -> NoReturn:
    """Ctrl-C (or the end of input) inside a command, as click's parser ends it."""
    click.echo(file=sys.stderr)
    fail(click.exceptions.Abort(str(e)))
