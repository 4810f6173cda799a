"""`earlyfw watch` starts at boot before any tunnel, and every module it loads
before READY=1 is boot time spent blocked: it loads only the watcher's
modules, not the other commands' (plumbum, dnspython, distro, the install
targets, WFP...). The frozen build ships the watcher's rulesets compiled ahead,
used only while they match their sources. bench/watch_start.py measures the
start; these hold the import set and the compiled templates."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jinja2
import pytest

from earlyfw import templates
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
    assert {"earlyfw.cli", "earlyfw.linux.watcher.daemon", "jinja2"} <= set(modules), start.stderr[-2000:]
    assert loaded(modules, OTHER_COMMANDS) == []


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
