"""The windows target and `earlyfw windows …`, on Linux.

Files are written for real under a temporary --root; the WFP side runs against
the recording BFE model and commands (schtasks, icacls) against the
RecordingRunner, since neither exists here. On Windows, check the task with
`schtasks /Query /TN earlyfw-watch /V /FO LIST` and the filters with
`netsh wfp show boottimepolicy` and `netsh wfp show filters`.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import click.testing
import pytest

from earlyfw import cli
from earlyfw import config as configuration
from earlyfw import install as installer
from earlyfw.errors import CommandError, EarlyfwError
from earlyfw.root import Root, Transaction
from earlyfw.run import RecordingRunner, Result
from earlyfw.targets import System, windows
from earlyfw.targets.windows import Windows
from earlyfw.wfp import backend, rules
from earlyfw.wfp import cli as windows_cli
from earlyfw.wfp.recording import RecordingBfe, Store

EXAMPLE = Path(__file__).parent.parent / "payload" / "examples" / "earlyfw.toml"
TASK_NS = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
LUID = 0x0035_0000_0007_0000


def config(kind: str = "wireguard") -> configuration.Config:
    text = EXAMPLE.read_text().replace('kind = "wireguard"', f'kind = "{kind}"')
    return configuration.parse(text)


class HostRoot(Root):
    """A temporary directory that claims to be the live host."""

    @property
    def is_host(self) -> bool:
        return True


def test_not_detected_and_not_selected_on_linux(tmp_path: Path) -> None:
    assert not Windows.detect(Root(tmp_path))
    assert Windows not in installer.select(Root(tmp_path))
    assert Windows in installer.select(Root(tmp_path), ["windows"])


def test_install_into_a_root_writes_the_windows_files(tmp_path: Path) -> None:
    runner = RecordingRunner()
    cfg = config()
    report = installer.install(cfg, Root(tmp_path), runner, ["windows"])
    assert runner.calls == []  # an image: nothing runs
    written = set(report.written)
    assert {windows.CONFIG_PATH, windows.FILTERS_PATH, windows.TASK_PATH, windows.BREAKGLASS_PATH} <= written
    data = tmp_path / "ProgramData" / "earlyfw"
    toml = (data / "earlyfw.toml").read_bytes()
    assert b"\r\n" in toml and configuration.parse(toml.decode()) == cfg
    assert json.loads((data / "wfp-filters.json").read_bytes()) == rules.describe(cfg)
    assert any("earlyfw.exe install" in note for note in report.image_notes)

    raw = (data / "earlyfw-watch.xml").read_bytes()
    assert raw.startswith(b"\xff\xfe")  # UTF-16 LE with its BOM, as Task Scheduler exports
    task = ET.fromstring(raw.decode("utf-16").split("?>", 1)[1])  # noqa: S314 - earlyfw's own output
    assert task.find("t:Triggers/t:BootTrigger/t:Enabled", TASK_NS) is not None
    assert task.findtext("t:Principals/t:Principal/t:UserId", namespaces=TASK_NS) == "S-1-5-18"
    assert task.findtext("t:Actions/t:Exec/t:Command", namespaces=TASK_NS) == r"%ProgramFiles%\earlyfw\earlyfw.exe"
    assert task.findtext("t:Actions/t:Exec/t:Arguments", namespaces=TASK_NS) == "windows watch"
    assert task.findtext("t:Settings/t:ExecutionTimeLimit", namespaces=TASK_NS) == "PT0S"

    script = (data / "earlyfw-breakglass.ps1").read_text()
    blocking = [f for f in rules.install_set(cfg) if f.action is rules.Action.BLOCK]
    assert blocking and all(str(f.key) in script for f in blocking)
    permits = [f for f in rules.install_set(cfg) if f.action is rules.Action.PERMIT]
    assert not any(str(f.key) in script for f in permits)

    installer.uninstall(Root(tmp_path), runner)
    assert not data.exists()


def test_manual_tunnels_get_no_watcher_task(tmp_path: Path) -> None:
    report = installer.install(config("manual"), Root(tmp_path), RecordingRunner(), ["windows"])
    assert windows.TASK_PATH not in report.written


def test_refused_on_a_live_linux_host_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(EarlyfwError, match="this is not Windows") as error:
        installer.install(config(), HostRoot(tmp_path), RecordingRunner(), ["windows"])
    assert error.value.hint is not None and "--root" in error.value.hint
    assert list(tmp_path.iterdir()) == []


def responder(failing: Sequence[str] = ()) -> RecordingRunner:
    def respond(argv: Sequence[str], _input: str | None) -> Result:
        if any(word in argv for word in failing):
            return Result(1, "", "ERROR: The system cannot find the file specified.\n")
        return Result(0, "SUCCESS\n", "")

    return RecordingRunner(respond=respond)


def host_target(tmp_path: Path, runner: RecordingRunner, bfe: RecordingBfe) -> Windows:
    target = Windows(HostRoot(tmp_path), runner)
    target.load_backend = lambda: bfe
    return target


def test_after_install_puts_the_block_in_bfe_then_starts_the_watcher(tmp_path: Path) -> None:
    runner, bfe = responder(), RecordingBfe()
    cfg = config()
    host_target(tmp_path, runner, bfe).after_install(cfg)
    assert {f.key for f in bfe.filters()} == {f.key for f in rules.install_set(cfg)}
    task = str(HostRoot(tmp_path) / windows.TASK_PATH)
    assert runner.argvs() == [
        ("schtasks", "/End", "/TN", "earlyfw-watch"),
        ("schtasks", "/Create", "/TN", "earlyfw-watch", "/XML", task, "/F"),
        ("schtasks", "/Run", "/TN", "earlyfw-watch"),
    ]


def test_a_failing_task_leaves_the_host_blocked_and_uninstall_still_works(tmp_path: Path) -> None:
    runner, bfe = responder(failing=["/Create", "/Delete", "/End"]), RecordingBfe()
    target = host_target(tmp_path, runner, bfe)
    with pytest.raises(CommandError):
        target.after_install(config())
    assert bfe.filters(), "the block went in first and stays"
    target.after_uninstall()  # the task never existed: tolerated
    assert bfe.store == Store()
    assert ("schtasks", "/Delete", "/TN", "earlyfw-watch", "/F") in runner.argvs()


def test_apply_on_a_windows_host_needs_the_exe_and_locks_down_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(windows, "on_windows", lambda: True)
    runner = responder()
    with pytest.raises(EarlyfwError, match=r"earlyfw\.exe is missing"):
        installer.install(config(), HostRoot(tmp_path), runner, ["windows"])
    assert not (tmp_path / "ProgramData").exists()
    exe = HostRoot(tmp_path) / windows.EXE_PATH
    exe.parent.mkdir(parents=True)
    exe.write_bytes(b"MZ")
    target = Windows(HostRoot(tmp_path), runner)
    plan = target.plan(config())
    with Transaction(target.root) as txn:
        target.apply(plan, txn)
    directory = str(HostRoot(tmp_path) / windows.DATA_DIR)
    assert runner.argvs()[0][:3] == ("icacls", directory, "/setowner")
    assert runner.argvs()[1][:3] == ("icacls", directory, "/inheritance:r")
    assert "*S-1-5-32-545:(OI)(CI)RX" in runner.argvs()[1]
    assert (tmp_path / "ProgramData" / "earlyfw" / "wfp-filters.json").exists()


# -- the command line ----------------------------------------------------------


def invoke(*args: str) -> click.testing.Result:
    return click.testing.CliRunner().invoke(cli.cli, list(args), catch_exceptions=True)


def test_windows_show_prints_the_filter_set_anywhere() -> None:
    result = invoke("--config", str(EXAMPLE), "windows", "show", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == rules.describe(config())
    table = invoke("--config", str(EXAMPLE), "windows", "show")
    assert "persistent ALE_AUTH_CONNECT_V4" in table.output and "endpoint 198.51.100.7:51820/udp" in table.output


def test_windows_commands_refuse_off_windows() -> None:
    result = invoke("--config", str(EXAMPLE), "windows", "relax")
    assert isinstance(result.exception, EarlyfwError)
    assert "only on Windows" in str(result.exception)


def test_relax_and_lock_dispatch_to_wfp_on_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    bfe = RecordingBfe(aliases={"wg0": LUID})
    monkeypatch.setattr(windows_cli, "ON_WINDOWS", True)
    monkeypatch.setattr(backend, "load", lambda: bfe)
    assert invoke("--config", str(EXAMPLE), "windows", "apply").exit_code == 0
    blocked = bfe.filters()
    result = invoke("-q", "--config", str(EXAMPLE), "relax")
    assert result.exit_code == 0, result.output
    assert "earlyfw: relaxed" in result.output
    assert len(bfe.filters()) == len(blocked) + len(rules.relax_set(config(), rules.Interface("wg0", LUID)))
    assert invoke("-q", "--config", str(EXAMPLE), "lock").exit_code == 0
    assert bfe.filters() == blocked
    status = invoke("--config", str(EXAMPLE), "windows", "status")
    assert status.exit_code == 0 and "state: blocked" in status.output
    assert invoke("windows", "purge").exit_code == 0
    assert bfe.store == Store()
    status = invoke("--config", str(EXAMPLE), "windows", "status")
    assert status.exit_code == 3 and "missing" in status.output
    bfe.aliases.clear()
    invoke("--config", str(EXAMPLE), "windows", "apply")
    missing = invoke("--config", str(EXAMPLE), "relax")
    assert isinstance(missing.exception, EarlyfwError) and "no network adapter named 'wg0'" in str(missing.exception)


def test_on_a_live_windows_host_only_windows_targets_are_chosen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    chosen = installer.select(HostRoot(tmp_path))
    assert Windows in chosen
    assert all(cls.system is System.WINDOWS for cls in chosen), chosen
    # An image directory is not the host: there the named Linux targets stay.
    assert {cls.name for cls in installer.select(Root(tmp_path), ["windows"])} == {"core", "windows"}
