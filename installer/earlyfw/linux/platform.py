"""Linux's side of the platform seam (earlyfw.system): nftables, through the
nft binary, and the watcher's published verdict."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

from earlyfw import config as configuration
from earlyfw import policy
from earlyfw.config import Config
from earlyfw.errors import EarlyfwError
from earlyfw.linux import nft
from earlyfw.policy import State
from earlyfw.root import Root
from earlyfw.run import Runner


def require_admin(action: str) -> None:
    nft.require_root_for(action)


def render(config: Config, state: State) -> str:
    return policy.render(config, state)


def put_state(runner: Runner, config: Config, state: State, *, root: Root, config_path: Path) -> None:
    nft.put_state(runner, config, state)


def status(runner: Runner, config: Config, *, as_json: bool, textfile: Path | None) -> int:
    """The tables, as loaded against as the config renders them, and the watcher's verdict."""
    import click  # noqa: PLC0415 - `earlyfw watch` imports this room before READY=1, and needs no click

    from earlyfw import metrics  # noqa: PLC0415 - only status reads handshakes and writes metrics
    from earlyfw.linux.watcher import daemon  # noqa: PLC0415

    verdict = daemon.read_verdict(config.interface)
    result = nft.status(runner, config, tunnel_port=daemon.spared_port(verdict))
    document = metrics.status_document(
        {**result.to_json(), "watcher": verdict}, last_handshake=metrics.last_handshake(config, runner)
    )
    if textfile is not None:
        metrics.write_textfile(textfile, metrics.prometheus(document, now=metrics.now()))
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(f"table inet earlyfw: {'present' if result.present else 'ABSENT'}")
        if result.present:
            click.echo(f"state: {result.state or 'unknown'} ({'intact' if result.intact else 'ALTERED'})")
        click.echo(f"tunnel: {config.tunnel_kind} on {config.interface}")
        click.echo(f"watcher: {describe_verdict(verdict)}")
        if config.egress_interfaces:
            click.echo("raw egress filtered on: " + (", ".join(result.egress_devices) or "none present"))
        if result.guarded:
            click.echo("guard: earlyfw watch holds its owned copy (counted below too)")
        if result.portal is not None:
            click.echo(f"portal window: {describe_window(result.portal)}")
        elif config.portal_allow and result.present:
            click.echo("portal window: none open")
        click.echo("endpoints: " + _summary(result.endpoints))
        for name, (packets, size) in sorted(result.counters.items()):
            click.echo(f"  {name:16} {packets:>10} packets {size:>12} bytes  {policy.COUNTERS.get(name, '')}")
        for warning in result.warnings:
            click.echo(f"warning: {warning}")
    return 0 if result.intact else 3


def describe_verdict(verdict: dict[str, object] | None) -> str:
    """The watcher's own account: state, situation since when, and why."""
    if verdict is None:
        return "no verdict published (not running, or not started since boot)"
    since = verdict.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    line = f"{verdict.get('state')}, {verdict.get('situation')} since {when}: {verdict.get('reason')}"
    return line if verdict.get("running") else f"NOT RUNNING; its last word: {line}"


def describe_window(portal: dict[str, object]) -> str:
    closes = portal.get("closes_at")
    when = time.strftime("%H:%M:%S", time.localtime(closes)) if isinstance(closes, (int, float)) else "?"
    return f"open for {portal.get('cgroup')}, closes at {when} (in {portal.get('remaining_seconds')} s)"


def _summary(items: list[str], shown: int = 10) -> str:
    """A long list cut for a terminal (--json has it whole)."""
    if len(items) <= shown:
        return ", ".join(items)
    return ", ".join(items[:shown]) + f", … ({len(items)} in all)"


def verify(runner: Runner, config: Config) -> Iterator[str]:
    for state in State:
        nft.check(runner, config, state)
        yield f"ruleset {state}: nft ok"


def live_state(runner: Runner) -> State | None:
    return nft.live_state(runner)


def watch(runner: Runner, config: Config, source: str) -> int:
    from earlyfw.linux.watcher import daemon, sources  # noqa: PLC0415 - the watcher's start path stays light

    return daemon.main(config, runner, sources.SourceKind(source))


def portal(runner: Runner, config: Config, command: tuple[str, ...], minutes: float, dns: tuple[str, ...]) -> int:
    from earlyfw.linux import portal as captive  # noqa: PLC0415

    return captive.main(config, runner, command, minutes, dns)


def refresh_endpoints(runner: Runner, config_path: Path) -> None:
    import click  # noqa: PLC0415 - see status

    # Imported here: dnspython is needed by this command alone.
    from earlyfw import resolve as resolver  # noqa: PLC0415
    from earlyfw.linux import endpoints as endpoints_refresh  # noqa: PLC0415

    require_admin("endpoints refresh")
    config = configuration.load(config_path)
    if not any(e.host for e in config.endpoints):
        click.echo("earlyfw: no endpoint has a host; nothing to refresh")
        return
    runner.verbose = False
    state = nft.live_state(runner)
    if state is not State.RELAXED:
        raise EarlyfwError(
            f"earlyfw is {state or 'not loaded'}: refresh resolves only through the tunnel, which is up only relaxed",
            hint="run it while the tunnel is up; the pins stay as they are",
        )

    def log(line: str) -> None:
        click.echo(f"earlyfw: {line}")

    lookup = resolver.through(config.dns_servers, config.interface)
    new = endpoints_refresh.refreshed(config, lookup, log, endpoints_refresh.tunnel_flows(config, log))
    if {e.key for e in new.endpoints} == {e.key for e in config.endpoints}:
        click.echo("earlyfw: endpoints unchanged")
        return
    runner.verbose = True
    endpoints_refresh.apply(Root(), str(config_path.resolve()), config, new, runner=runner, log=log)


def remove_leftovers(runner: Runner) -> list[str]:
    """earlyfw's tables may still be loaded with nothing recorded (an `earlyfw
    apply` without install, a run killed after its manifest was gone)."""
    try:
        present = nft.tables(runner) & set(nft.MAIN_TABLES)
    except (EarlyfwError, OSError):
        return []  # nft missing or unreadable: nothing of this kind to find
    if present:
        nft.delete_tables(runner)
    return [f"table {family} {name}" for family, name in sorted(present)]
