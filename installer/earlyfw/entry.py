"""The `earlyfw` executable's entry point (the console script and the frozen
build's __main__ alike).

`earlyfw watch` starts at boot before any tunnel, and every instruction before
its READY=1 is boot time spent blocked. So a plain watch command line, one
click would take exactly as it is, runs from here without click and without
the modules earlyfw.cli imports for the other commands (about a fifth of the
frozen watcher's start, bench/watch_start.py --instructions). Anything else,
--help and every mistake included, goes to earlyfw.cli, which parses and
reports as it always has; so do the watcher's own errors, once it has them.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

WATCH = "watch"
# Where `earlyfw watch --source` reads WireGuard peers from; the first is the default.
WATCH_SOURCES = ("auto", "uapi", "netlink", "wg")
QUIET = ("-q", "--quiet")
CONFIG = "--config"
SOURCE = "--source"
# click's shell completion is asked for through this variable: its parser's business.
COMPLETION = "_EARLYFW_COMPLETE"


def watch_command(args: list[str]) -> tuple[Path | None, str] | None:
    """The config path and source of a plain `earlyfw [-q|--quiet] [--config
    PATH] watch [--source S]` (each option at most once, `--opt=value` too),
    with values click accepts as they are; None for any other command line."""
    if WATCH not in args:
        return None
    split = args.index(WATCH)
    group = _options(args[:split], {CONFIG}, QUIET)
    command = _options(args[split + 1 :], {SOURCE}, ())
    if group is None or command is None:
        return None
    config, source = group.get(CONFIG), command.get(SOURCE, WATCH_SOURCES[0])
    if source not in WATCH_SOURCES or (config is not None and _is_directory(config)):
        return None
    return (Path(config) if config is not None else None, source)


def _options(args: list[str], valued: set[str], flags: tuple[str, ...]) -> dict[str, str] | None:
    found: dict[str, str] = {}
    rest = iter(args)
    for arg in rest:
        name, equals, value = arg.partition("=")
        if name in valued and name not in found:
            given = value if equals else next(rest, None)
            if given is None:
                return None
            found[name] = given
        elif arg in flags and not found.keys() & set(flags):
            found[arg] = ""
        else:
            return None
    return found


def _is_directory(path: str) -> bool:
    """What click.Path(dir_okay=False) refuses: a path it can stat as a directory."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def watch(config_path: Path | None, source: str) -> int:
    """Run this system's watcher (`earlyfw watch`) on the config at
    `config_path`, or this system's own; its exit status."""
    from earlyfw import config as configuration  # noqa: PLC0415 - --help and the other commands need none of it
    from earlyfw.run import Runner  # noqa: PLC0415
    from earlyfw.system import System  # noqa: PLC0415

    system = System.current()
    # Quiet, whatever -q says: the watcher logs its own lines, not the commands it runs.
    return system.platform.watch(
        Runner(verbose=False), configuration.load(config_path or system.default_config()), source
    )


def main() -> None:
    command = None if COMPLETION in os.environ else watch_command(sys.argv[1:])
    if command is None:
        from earlyfw import cli  # noqa: PLC0415

        cli.main()
        return
    try:
        status = watch(*command)
    except (KeyboardInterrupt, EOFError) as e:
        from earlyfw import cli  # noqa: PLC0415 - errors end as every command's do

        cli.interrupted(e)
    except Exception as e:
        from earlyfw import cli  # noqa: PLC0415

        cli.fail(e)
    sys.exit(status)
