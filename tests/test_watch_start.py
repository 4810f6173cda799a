"""`earlyfw watch` starts at boot before any tunnel, and every module it loads
before READY=1 is boot time spent blocked: it loads only the watcher's
modules, not the other commands' (plumbum, dnspython, distro, the install
targets, WFP...). The frozen build ships the watcher's rulesets compiled ahead,
used only while they match their sources. bench/watch_start.py measures the
start; these hold the import set and the compiled templates."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click
import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from earlyfw import cli, entry, templates
from earlyfw.errors import EarlyfwError
from earlyfw.linux.watcher import ruleset
from tests import netns, ready
from tests.netns import Lab, Namespace

# Modules of other commands: none of them may load on the watcher's way to READY=1.
OTHER_COMMANDS = (
    "plumbum",  # the Runner's, needed only when a command runs (libnftables failed the watcher)
    "dns",  # import --resolve, endpoints refresh
    "distro",
    "earlyfw.resolve",
    "earlyfw.linux.endpoints",
    "earlyfw.install",
    "earlyfw.manifest",
    "earlyfw.metrics",
    "earlyfw.targets",
    "earlyfw.windows",
)


# The command line's parser and what earlyfw.cli imports for the other commands.
COMMAND_LINE = ("click", "earlyfw.cli", "earlyfw.importers")


def loaded(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)]


@pytest.fixture
def lab() -> Iterator[Lab]:
    netns.require_tools(["ip", "nft"])
    with Lab() as lab:
        yield lab


@pytest.fixture
def namespace(lab: Lab) -> Namespace:
    return lab.namespace("efwr")


@pytest.mark.netns
def test_the_watcher_reaches_ready_without_the_other_commands_modules(lab: Lab, namespace: Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="efw-start-") as directory:
        config = ready.watch_config(lab, Path(directory))
        argv = (sys.executable, "-X", "importtime", "-m", "earlyfw", "--quiet", "--config", str(config), "watch")
        start = ready.start_until_ready(namespace, argv)
    modules = ready.imported(start.stderr)
    # Control: the import list is read, and holds what the watcher does need.
    assert {"earlyfw.entry", "earlyfw.linux.watcher.daemon", "jinja2"} <= set(modules), start.stderr[-2000:]
    assert loaded(modules, OTHER_COMMANDS) == []
    # Nor the command line's parser: a plain watch command line never reaches earlyfw.cli (earlyfw.entry).
    assert loaded(modules, COMMAND_LINE) == []


# Option values and stray tokens of every kind a command line near `earlyfw
# watch` has: good and bad values, a directory, help, other commands.
CONFIGS = ("/nonexistent/earlyfw.toml", str(Path(__file__).parent), "", "-", "-q", "watch")
SOURCES = ("auto", "wg", "netlink", "WG", "bogus", "")
STRAYS = ("watch", "-q", "--quiet=1", "-qq", "--config", "--conf", "--", "--source", "--help", "-h", "--version")


def option(name: str, values: tuple[str, ...], flags: tuple[str, ...] = ()) -> st.SearchStrategy[list[str]]:
    """`--name value`, `--name=value`, a flag, or a stray token."""
    value = st.sampled_from(values)
    return st.one_of(
        value.map(lambda v: [name, v]),
        value.map(lambda v: [f"{name}={v}"]),
        *([st.sampled_from(flags).map(lambda f: [f])] if flags else []),
        st.sampled_from(STRAYS).map(lambda f: [f]),
    )


def joined(parts: list[list[str]]) -> list[str]:
    return [token for part in parts for token in part]


COMMAND_LINES = st.builds(
    lambda group, command, options: [*joined(group), command, *joined(options)],
    st.lists(option("--config", CONFIGS, ("-q", "--quiet")), max_size=3),
    st.sampled_from(("watch", "watch", "watch", "status", "--help")),
    st.lists(option("--source", SOURCES), max_size=2),
)


def click_reaches_watch(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[Path | None, str] | None:
    """What earlyfw.cli, parsing `argv`, runs the watcher with; None when it
    does not run it (help, a usage error, another command)."""
    reached: list[tuple[Path | None, str]] = []

    def watch(config_path: Path | None, source: str) -> int:
        reached.append((config_path, source))
        return 0

    monkeypatch.setattr(entry, "watch", watch)
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
        contextlib.suppress(click.ClickException, SystemExit, EarlyfwError),
    ):
        cli.cli.main(argv, prog_name="earlyfw", standalone_mode=False)
    return reached[0] if reached else None


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=COMMAND_LINES)
def test_the_watch_shortcut_runs_only_what_click_would(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """earlyfw.entry runs the watcher itself only for a command line click
    would run it for, with the same config path and source; everything else
    goes to click."""
    shortcut = entry.watch_command(argv)
    if shortcut is not None:
        assert click_reaches_watch(argv, monkeypatch) == shortcut


def test_the_units_watch_command_lines_take_the_shortcut(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control for the property above: the command lines the watcher
    really starts with (earlyfw-watch.service, the tests) are taken."""
    for argv in (["--quiet", "watch"], ["-q", "--config", "/etc/x.toml", "watch", "--source", "netlink"]):
        shortcut = entry.watch_command(argv)
        assert shortcut is not None and click_reaches_watch(argv, monkeypatch) == shortcut
    assert entry.watch_command(["--quiet", "watch", "--help"]) is None


def test_a_watch_error_reads_as_through_click() -> None:
    """The shortcut's errors end as click's path ends them: same lines, same status."""
    argv = ["--quiet", "--config", "/nonexistent/earlyfw.toml", "watch"]
    ways = ([sys.executable, "-m", "earlyfw"], [sys.executable, "-c", "from earlyfw import cli; cli.main()"])
    shortcut, through_click = (
        subprocess.run([*way, *argv], capture_output=True, text=True, check=False) for way in ways
    )
    assert "no such config file" in shortcut.stderr
    assert (shortcut.returncode, shortcut.stdout, shortcut.stderr) == (
        through_click.returncode,
        through_click.stdout,
        through_click.stderr,
    )


def test_help_loads_no_command_modules() -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "earlyfw", "--help"], capture_output=True, text=True, check=True
    )
    assert "watch" in result.stdout
    modules = ready.imported(result.stderr)
    assert "earlyfw.cli" in modules
    # The windows group is listed, so imported (with the tunnel readers it shares); nothing heavier.
    heavy = (*(p for p in OTHER_COMMANDS if p != "earlyfw.windows"), "jinja2")
    assert loaded(modules, heavy) == []


def compiled_matches(directory: Path, name: str, source: str) -> bool:
    """Whether jinja2 takes the compiled template in `directory` for `source`."""
    cache = jinja2.FileSystemBytecodeCache(str(directory), templates.COMPILED_NAME)
    return cache.get_bucket(templates.environment(), name, None, source).code is not None


def check_compiled(directory: Path) -> None:
    for name in ruleset.WATCHER_TEMPLATES:
        folder, _, rest = name.partition("/")
        source = templates.read(folder, rest)
        assert compiled_matches(directory, name, source), name
        # A changed template is compiled afresh, never rendered from stale bytecode.
        assert not compiled_matches(directory, name, source + "# changed\n"), name
    assert {p.stat().st_mode & 0o777 for p in directory.iterdir()} == {0o644}


def test_compiled_templates_are_taken_only_for_their_own_source(tmp_path: Path) -> None:
    templates.compile_into(tmp_path, list(ruleset.WATCHER_TEMPLATES))
    check_compiled(tmp_path / templates.COMPILED)


def test_the_frozen_build_ships_the_watchers_rulesets_compiled() -> None:
    from tests.test_frozen import frozen_binary  # noqa: PLC0415 - builds it once per session

    check_compiled(frozen_binary().parent / "_internal" / "earlyfw" / templates.COMPILED)


@pytest.mark.netns
def test_the_frozen_watcher_reaches_ready(lab: Lab, namespace: Namespace) -> None:
    from tests.test_frozen import frozen_binary  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="efw-start-") as directory:
        config = ready.watch_config(lab, Path(directory))
        start = ready.start_until_ready(namespace, (str(frozen_binary()), "--quiet", "--config", str(config), "watch"))
    assert "blocked: watcher started" in start.stderr
