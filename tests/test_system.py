"""The platform seam (earlyfw.system): one place asks which system this is, and
every command goes through the system's room or refuses in one line.

Each system is forced through System.current() (tests/systems.py), commands
run against the RecordingRunner, WFP against the recording BFE model, and the
macOS script against the stand-in Mac of test_macos_script (stub pfctl under
dash): the firewalls of the other systems cannot exist here.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import click.testing
import pytest

from earlyfw import cli, install
from earlyfw import config as configuration
from earlyfw.errors import EarlyfwError
from earlyfw.macos import target as macos
from earlyfw.macos.target import status as script_status
from earlyfw.policy import State
from earlyfw.root import MANIFEST, STATE_DIR, Root
from earlyfw.run import Result
from earlyfw.system import System
from earlyfw.windows import backend, engine, rules
from earlyfw.windows import target as windows
from tests.recording_runner import RecordingRunner
from tests.systems import force
from tests.test_macos_pf import EXAMPLE_CONFIG
from tests.test_macos_script import SHELLS, Mac, make_mac
from tests.wfp_model import RecordingBfe

INSTALLER = Path(__file__).parent.parent / "installer"
SEAM = INSTALLER / "earlyfw" / "system.py"
LUID = 0x0035_0000_0007_0000  # a wintun adapter's: IF_TYPE_PROP_VIRTUAL in the LUID


# --- One place asks which system this is ---------------------------------------------

# (module, attribute) that tell the system apart; the stdlib module `platform` is all such.
PROBES = {
    ("sys", "platform"),
    ("sys", "getwindowsversion"),
    ("os", "name"),
    ("os", "uname"),
    ("sysconfig", "get_platform"),
}
PROBED = {module for module, _ in PROBES} | {"platform"}


def platform_checks(source: str) -> list[str]:
    """Every place `source` asks the system directly, by line."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}  # local name -> the stdlib module it is
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in PROBED:
                    bound[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in PROBED:
            for alias in node.names:
                if node.module == "platform" or (node.module, alias.name) in PROBES:
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            module = bound[node.value.id]
            if module == "platform" or (module, node.attr) in PROBES:
                found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ('import sys\nif sys.platform == "win32": pass\n', ["line 2: sys.platform"]),
        ('import platform\nplatform.system() == "Darwin"\n', ["line 2: platform.system"]),
        ("import platform as p\np.mac_ver()\n", ["line 2: p.mac_ver"]),
        ("from sys import platform\n", ["line 1: from sys import platform"]),
        ('import os\nos.name == "nt"\n', ["line 2: os.name"]),
        # Not a probe: earlyfw's own room modules are called platform too.
        ("from earlyfw.linux import platform\nplatform.render(c, s)\n", []),
        ("import os\nos.environ.get('PROGRAMDATA')\n", []),
    ],
)
def test_the_scanner_finds_platform_checks(source: str, found: list[str]) -> None:
    assert platform_checks(source) == found


def test_no_platform_check_outside_the_seam() -> None:
    """cli, install, the targets and every room ask System; only system.py asks
    Python (the PyInstaller spec asks the staged package's System too)."""
    sources = [*sorted(INSTALLER.rglob("*.py")), *sorted(INSTALLER.glob("*.spec"))]
    assert SEAM in sources and len(sources) > 40
    assert platform_checks(SEAM.read_text()), "control: the seam itself reads sys.platform"
    checks = {
        str(path.relative_to(INSTALLER)): found
        for path in sources
        if path != SEAM and (found := platform_checks(path.read_text()))
    }
    assert checks == {}


def test_the_seam_imports_no_room_until_asked() -> None:
    """`earlyfw watch` and --help pass through the seam: it must load no
    room's firewall code, and asking one room loads no other."""
    script = (
        "import sys; from earlyfw.system import System; "
        "print(sorted(m for m in sys.modules if m.startswith('earlyfw')))"
        "; System.LINUX.platform; "
        "print(sorted(m for m in sys.modules if m.startswith(('earlyfw.windows', 'earlyfw.macos', 'earlyfw.targets'))))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["['earlyfw', 'earlyfw.system']", "[]"]


def test_current_reads_sys_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, system in [("win32", System.WINDOWS), ("darwin", System.MACOS), ("linux", System.LINUX)]:
        monkeypatch.setattr(sys, "platform", value)
        assert System.current() is system
        assert system.is_current
        assert [s for s in System if s.is_current] == [system]


# --- One default config per system ---------------------------------------------------------


def test_each_system_has_one_default_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROGRAMDATA", str(tmp_path / "Data"))
    assert System.LINUX.default_config() == System.MACOS.default_config() == Path("/etc/earlyfw/earlyfw.toml")
    assert System.WINDOWS.default_config() == tmp_path / "Data" / "earlyfw" / "earlyfw.toml"
    # The files install writes there are the ones read by default.
    assert windows.CONFIG_PATH == System.WINDOWS.config_path == "/ProgramData/earlyfw/earlyfw.toml"


def test_every_command_on_windows_reads_programdata_without_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The README had Windows users pass --config to every command while the
    image note said plain `earlyfw.exe install`: only `earlyfw windows …` read
    %ProgramData%, the rest read /etc/earlyfw/earlyfw.toml."""
    force(monkeypatch, System.WINDOWS)
    monkeypatch.setenv("PROGRAMDATA", str(tmp_path))
    (tmp_path / "earlyfw").mkdir()
    (tmp_path / "earlyfw" / "earlyfw.toml").write_text(EXAMPLE_CONFIG.to_toml())
    for args in (["render"], ["verify"], ["windows", "show"]):
        result = click.testing.CliRunner().invoke(cli.cli, args)
        assert result.exit_code == 0, (args, result.output, result.exception)
    assert (
        f"config {tmp_path / 'earlyfw' / 'earlyfw.toml'}: ok"
        in click.testing.CliRunner().invoke(cli.cli, ["verify"]).output
    )


# --- Every command on every system -----------------------------------------------------------


def one_line(error: BaseException | None) -> EarlyfwError:
    """The error as `earlyfw: error: …` prints it: one line, and at most one line of hint."""
    assert isinstance(error, EarlyfwError), repr(error)
    assert "\n" not in str(error) and str(error), str(error)
    assert error.hint is None or "\n" not in error.hint
    return error


# What each command gives on each system: output it must hold and its exit
# status, or the one-line error it must refuse with.
COMMANDS = {
    "render": ["render", "--state", "relaxed"],
    "render initramfs": ["render", "--state", "initramfs"],
    "apply": ["apply", "--state", "blocked"],
    "relax": ["relax"],
    "lock": ["lock"],
    "status": ["status"],
    "status --json": ["status", "--json"],
    "verify": ["verify"],
}
NOT_INSTALLED = "earlyfw-pf: missing; earlyfw is not installed"
EXPECTED: dict[System, dict[str, tuple[int, str]]] = {
    System.LINUX: {
        "render": (0, "table inet earlyfw"),
        "render initramfs": (0, "table inet earlyfw"),
        "apply": (0, "earlyfw: blocked"),
        "relax": (0, "earlyfw: relaxed"),
        "lock": (0, "earlyfw: blocked"),
        "status": (3, "table inet earlyfw: ABSENT"),  # nothing loaded (the recorded nft lists nothing)
        "status --json": (3, '"schema": 1'),
        "verify": (0, "ruleset initramfs: nft ok"),
    },
    System.MACOS: {
        "render": (0, 'anchor "tunnel" all'),
        "render initramfs": (1, "exists only in a Linux initramfs"),
        # The stand-in Mac's script is under tmp, not /Library: the installed
        # script is asked for, and found missing (test_install_now_… runs it).
        "apply": (1, NOT_INSTALLED),
        "relax": (1, NOT_INSTALLED),
        "lock": (1, NOT_INSTALLED),
        "status": (1, NOT_INSTALLED),
        "status --json": (1, "exist only on Linux so far"),
        "verify": (0, "pf rules tunnel.pf: earlyfw's pf subset ok"),
    },
    System.WINDOWS: {
        "render": (0, "ALE_AUTH_CONNECT_V4"),
        "render initramfs": (1, "exists only on Linux"),
        "apply": (0, "earlyfw: blocked"),
        "relax": (0, "earlyfw: relaxed"),
        "lock": (0, "earlyfw: blocked"),
        "status": (0, "state: blocked"),
        "status --json": (1, "exist only on Linux so far"),
        "verify": (0, "filters relaxed:"),
    },
}


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> RecordingRunner:
    runner = RecordingRunner()
    monkeypatch.setattr(cli, "Runner", lambda verbose: runner)
    return runner


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("system", list(System))
def test_each_command_goes_through_its_systems_room(
    system: System, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded: RecordingRunner
) -> None:
    assert os.geteuid() == 0, "Linux and macOS check for root first"
    force(monkeypatch, system)
    bfe = RecordingBfe(aliases={"utun9": LUID})
    engine.install(bfe, EXAMPLE_CONFIG)  # as `earlyfw install` left it
    monkeypatch.setattr(backend, "load", lambda: bfe)
    path = tmp_path / "earlyfw.toml"
    path.write_text(EXAMPLE_CONFIG.to_toml())
    result = click.testing.CliRunner().invoke(cli.cli, ["-q", "--config", str(path), *COMMANDS[command]])
    status, says = EXPECTED[system][command]
    if status == 1:
        assert says in str(one_line(result.exception))
    else:
        assert result.exit_code == status, (result.output, result.exception)
        assert says in result.output
    programs = {argv[0] for argv in recorded.argvs()}
    if system is not System.LINUX:
        assert programs == set(), "neither nft nor anything else: pf through its script, WFP through BFE"
    if system is System.WINDOWS and command == "relax":
        assert {f.key for f in bfe.filters()} & rules.relax_keys(), "the tunnel permits are in BFE"


@pytest.mark.parametrize(
    ("system", "command", "says"),
    [
        (System.WINDOWS, ["watch"], "earlyfw windows watch"),
        (System.MACOS, ["watch"], "earlyfw-pf watch"),
        (System.WINDOWS, ["endpoints", "refresh"], "Windows has none"),
        (System.MACOS, ["endpoints", "refresh"], "macOS has none"),
        (System.WINDOWS, ["portal", "--", "true"], "exists only on Linux"),
        (System.MACOS, ["portal", "--", "true"], "exists only on Linux"),
    ],
)
def test_linux_only_commands_say_why_elsewhere(
    system: System,
    command: list[str],
    says: str,
    *,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    recorded: RecordingRunner,
) -> None:
    """The Linux watcher and the nft pin swap are never started on another
    system: one line names what that system does instead."""
    force(monkeypatch, system)
    path = tmp_path / "earlyfw.toml"
    path.write_text(EXAMPLE_CONFIG.to_toml())
    result = click.testing.CliRunner().invoke(cli.cli, ["-q", "--config", str(path), *command])
    assert says in str(one_line(result.exception))
    assert recorded.argvs() == []


# --- install --now and uninstall on every system, on a live host under tmp -------------------------------------


class HostRoot(Root):
    """A temporary directory that claims to be the live host."""

    @property
    def is_host(self) -> bool:
        return True


def linux_host(root: HostRoot, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return ["core"]


def mac_host(root: HostRoot, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    wg = root / "/opt/homebrew/bin/wg"
    wg.parent.mkdir(parents=True)
    wg.write_bytes(b"wg")
    return ["macos"]


def windows_host(root: HostRoot, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    bfe = RecordingBfe(aliases={"utun9": LUID})
    monkeypatch.setattr(backend, "load", lambda: bfe)
    exe = root / windows.EXE_PATH
    exe.parent.mkdir(parents=True)
    exe.write_bytes(b"MZ")
    return ["windows"]


HOSTS: dict[System, Callable[[HostRoot, pytest.MonkeyPatch], list[str]]] = {
    System.LINUX: linux_host,
    System.MACOS: mac_host,
    System.WINDOWS: windows_host,
}
# What `--now` runs after the install's own steps: the blocked state, through the room.
NOW: dict[System, Callable[[Root], Sequence[tuple[str, ...]]]] = {
    System.LINUX: lambda root: [("nft", "-j", "list", "counters"), ("nft", "-f", "-")],
    System.MACOS: lambda root: [("/bin/sh", str(root / macos.LAYOUT.script), "lock")],
    System.WINDOWS: lambda root: [],  # BFE's calls, not commands: the lock is recorded beside the config
}


@pytest.mark.parametrize("system", list(System))
def test_install_now_and_uninstall_through_the_hosts_room(
    system: System, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On macOS `install --now` ran nft (not found: a failed install's last
    step); it runs the installed script's lock, as `earlyfw lock` does."""
    force(monkeypatch, system)
    root = HostRoot(tmp_path)
    names = HOSTS[system](root, monkeypatch)
    without, runner = RecordingRunner(), RecordingRunner()
    install.install(EXAMPLE_CONFIG, root, without, names)
    install.install(EXAMPLE_CONFIG, root, runner, names, now=True)
    assert runner.argvs()[: len(without.calls)] == without.argvs()
    assert runner.argvs()[len(without.calls) :] == list(NOW[system](root))
    if system is System.WINDOWS:
        assert (root / "/ProgramData/earlyfw/locked-at").is_file()
    assert configuration.load(root / system.config_path) == EXAMPLE_CONFIG, "each system's config, where it reads it"
    assert bool(list(tmp_path.rglob("*.nft"))) is (system is System.LINUX), "the .nft rulesets are Linux's alone"
    runner.calls.clear()
    install.uninstall(root, runner)
    programs = {argv[0] for argv in runner.argvs()}
    assert ("nft" in programs) is (system is System.LINUX), programs
    assert not (root / STATE_DIR).exists()


def test_a_macs_older_manifest_naming_core_uninstalls_without_nft(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Installs made before the macos target wrote its own config list the core
    target too: its step (deleting nft tables) is not run on a Mac."""
    root = HostRoot(tmp_path)
    mac_host(root, monkeypatch)
    install.install(EXAMPLE_CONFIG, Root(tmp_path), RecordingRunner(), ["macos"])
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["targets"] == ["macos"]
    (root / MANIFEST).write_text(json.dumps({**manifest, "targets": ["core", "macos"]}))
    force(monkeypatch, System.MACOS)
    runner = RecordingRunner()
    assert install.uninstall(root, runner).failures == []
    programs = [argv[0] for argv in runner.argvs()]
    assert "nft" not in programs and "launchctl" in programs
    assert not (root / MANIFEST).exists()


# --- An install is for one system ------------------------------------------------------------------------


def test_a_target_of_another_system_is_refused_on_a_live_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a Mac, `install --target dracut` wrote Linux boot hooks and the .nft
    files into the Mac's / (only the windows and macos targets refused)."""
    force(monkeypatch, System.MACOS)
    with pytest.raises(EarlyfwError, match="that target installs on Linux, and this is not Linux") as error:
        install.install(EXAMPLE_CONFIG, HostRoot(tmp_path), RecordingRunner(), ["dracut"])
    one_line(error.value)
    assert error.value.hint and "--root DIR" in error.value.hint
    assert list(tmp_path.iterdir()) == []


def test_an_image_is_of_one_system(tmp_path: Path) -> None:
    with pytest.raises(EarlyfwError, match="Linux and Windows at once") as error:
        install.select(Root(tmp_path), ["windows", "dracut"])
    one_line(error.value)
    assert {c.name for c in install.select(Root(tmp_path), ["macos"])} == {"macos"}
    assert {c.name for c in install.select(Root(tmp_path), ["dracut"])} == {"core", "dracut"}
    assert install.system_of(Root(tmp_path)) is System.LINUX  # nothing detected: a Linux core install


# --- macOS status, read by the installed script -----------------------------------------------------


@pytest.fixture(params=list(SHELLS))
def mac(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mac]:
    yield make_mac(tmp_path, SHELLS[request.param])


def script_runner(mac: Mac) -> RecordingRunner:
    """Runs each command for real with the stand-in Mac's stub tools first on PATH."""

    def run(argv: Sequence[str], stdin: str | None) -> Result:
        env = {"PATH": f"{mac.stub_dir / 'bin'}:/usr/bin:/bin", "LC_ALL": "C"}
        done = subprocess.run(
            [*mac.shell, *argv[1:]], input=stdin, env=env, capture_output=True, text=True, check=False
        )
        return Result(done.returncode, done.stdout, done.stderr)

    return RecordingRunner(respond=run)


def mac_status(mac: Mac) -> tuple[int, list[str]]:
    result = script_status(script_runner(mac), mac.layout)
    return result.returncode, result.stdout.splitlines()


def test_macos_status_reads_pf_through_the_script(mac: Mac, monkeypatch: pytest.MonkeyPatch) -> None:
    from earlyfw.macos import platform as mac_platform  # noqa: PLC0415

    force(monkeypatch, System.MACOS)
    code, lines = mac_status(mac)
    assert code == 3 and "pf: DISABLED" in lines and "state: none (earlyfw's block is not in force)" in lines
    mac.run("start")
    code, lines = mac_status(mac)
    assert code == 0, lines
    assert lines[:4] == [
        "pf: enabled",
        f"anchor {macos.ANCHOR}: intact",
        "anchor call: the first filter rule",
        "state: blocked",
    ]
    assert lines[-1].startswith("watchdog: NOT RUNNING")  # the stub launchctl prints no job
    mac.run("relax")
    assert "state: relaxed" in mac_status(mac)[1]
    # live_state reads the same lines, of the script at its real place (here the stand-in's).
    monkeypatch.setattr(macos, "status", lambda runner: script_status(script_runner(mac), mac.layout))
    assert mac_platform.live_state(RecordingRunner()) is State.RELAXED
    mac.pfctl("-d")  # another tool turns pf off: not in force until the watchdog's next pass
    code, lines = mac_status(mac)
    assert code == 3 and "pf: DISABLED" in lines
    assert mac_platform.live_state(RecordingRunner()) is None
    (mac.stub_dir / "bin" / "launchctl").write_text("#!/bin/sh\necho '\tstate = running'\n")
    assert mac_status(mac)[1][-1] == "watchdog: running"
