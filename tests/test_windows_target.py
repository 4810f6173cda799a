"""The windows target and `earlyfw windows …`, on Linux.

Files are written for real under a temporary --root; the WFP side runs against
the recording BFE model and commands (schtasks) against the
RecordingRunner, since neither exists here; the model also keeps the data
directory's security descriptors (SDDL in, SDDL out). On Windows, check the task with
`schtasks /Query /TN earlyfw-watch /V /FO LIST` and the filters with
`netsh wfp show boottimepolicy` and `netsh wfp show filters`.
"""

from __future__ import annotations

import ctypes
import json
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import click.testing
import pytest

from earlyfw import cli
from earlyfw import config as configuration
from earlyfw import install as installer
from earlyfw.errors import CommandError, ConfigError, EarlyfwError
from earlyfw.root import Root
from earlyfw.run import Result
from earlyfw.system import System
from earlyfw.windows import backend, engine, rules, security
from earlyfw.windows import structs as s
from earlyfw.windows import target as windows
from earlyfw.windows.target import Windows
from tests.recording_runner import RecordingRunner
from tests.systems import force
from tests.wfp_model import PROGRAMDATA_DEFAULT, USER_SID, Adapter, RecordingBfe, Store

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


@pytest.mark.parametrize(
    "extra",
    ['[[allow]]\ninterface = "tailscale0"\n', '[forward]\nvia_tunnel = ["docker0"]\n'],
    ids=["allow", "forward"],
)
def test_linux_only_keys_are_refused_before_anything_is_written(tmp_path: Path, extra: str) -> None:
    cfg = configuration.parse(EXAMPLE.read_text() + extra)
    with pytest.raises(ConfigError, match="not supported by the windows target"):
        installer.install(cfg, Root(tmp_path), RecordingRunner(), ["windows"])
    assert not (tmp_path / "ProgramData").exists()


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
        if argv[0] == "nft":  # the core target's uninstall asks (issue 14 gives it a platform seam)
            return Result(0, '{"nftables": []}', "")
        return Result(0, "SUCCESS\n", "")

    return RecordingRunner(respond=respond)


def host_target(tmp_path: Path, runner: RecordingRunner, bfe: RecordingBfe) -> Windows:
    (HostRoot(tmp_path) / windows.DATA_DIR).mkdir(parents=True, exist_ok=True)
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
        (windows.schtasks(), "/End", "/TN", "earlyfw-watch"),
        (windows.schtasks(), "/Create", "/TN", "earlyfw-watch", "/XML", task, "/F"),
        (windows.schtasks(), "/Run", "/TN", "earlyfw-watch"),
    ]


def test_a_failing_task_leaves_the_host_blocked_and_uninstall_still_works(tmp_path: Path) -> None:
    runner, bfe = responder(failing=["/Create", "/Delete", "/End"]), RecordingBfe()
    target = host_target(tmp_path, runner, bfe)
    with pytest.raises(CommandError):
        target.after_install(config())
    assert bfe.filters(), "the block went in first and stays"
    target.before_uninstall()  # the task never existed: tolerated
    assert bfe.store == Store()
    assert (windows.schtasks(), "/Delete", "/TN", "earlyfw-watch", "/F") in runner.argvs()


def windows_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bfe: RecordingBfe) -> HostRoot:
    """A live "Windows" host: the target's backend is the BFE model (which
    also keeps the files' security descriptors), earlyfw.exe in place."""
    force(monkeypatch, System.WINDOWS)
    monkeypatch.setattr(backend, "load", lambda: bfe)
    root = HostRoot(tmp_path)
    exe = root / windows.EXE_PATH
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_bytes(b"MZ")
    return root


def test_apply_on_a_windows_host_needs_the_exe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    force(monkeypatch, System.WINDOWS)
    monkeypatch.setattr(backend, "load", lambda: RecordingBfe(aliases={"wg0": LUID}))
    with pytest.raises(EarlyfwError, match=r"earlyfw\.exe is missing"):
        installer.install(config(), HostRoot(tmp_path), responder(), ["windows"])
    assert not (tmp_path / "ProgramData").exists()


def test_a_user_planted_directory_and_config_end_up_admin_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15, item 2. The README had users create the directory and the
    config before installing: the user owns them and may hold an explicit
    full-control entry. icacls /grant:r kept such entries; now each path gets
    exactly SYSTEM and Administrators (Users read), protected, owned by
    Administrators, and is read back to prove it."""
    bfe = RecordingBfe(aliases={"wg0": LUID})
    root = windows_host(tmp_path, monkeypatch, bfe)
    data = root / windows.DATA_DIR
    data.mkdir(parents=True)
    (data / "earlyfw.toml").write_text(EXAMPLE.read_text())
    (data / "notes").mkdir()
    (data / "notes" / "todo.txt").write_text("x")
    user = security.Ace(USER_SID, security.FILE_ALL_ACCESS, 0x3)  # (A;OICI;FA;;;user)
    planted = security.Descriptor(USER_SID, (*PROGRAMDATA_DEFAULT.aces, user))
    paths = [str(data), str(data / "earlyfw.toml"), str(data / "notes"), str(data / "notes" / "todo.txt")]
    for path in paths:
        bfe.security[path] = planted
    assert security.admin_only_problems(planted)  # control: the planted state is unsafe
    runner = responder()
    installer.install(config(), root, runner, ["windows"])
    for path in [*paths, str(data / "wfp-filters.json"), str(data / "earlyfw-watch.xml")]:
        assert security.admin_only_problems(bfe.descriptor(path)) == [], path
    assert bfe.descriptor(str(data)).to_sddl() == security.Descriptor.from_sddl(windows.DATA_DIR_SDDL).to_sddl()
    assert not [argv for argv in runner.argvs() if argv[0] == "icacls"]
    assert (windows.schtasks(), "/Run", "/TN", "earlyfw-watch") in runner.argvs()
    assert bfe.errors == [] and bfe.local == {}, "every LocalAlloc'd buffer freed"


def test_a_descriptor_that_cannot_be_set_stops_before_the_watcher_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bfe = RecordingBfe(aliases={"wg0": LUID})
    root = windows_host(tmp_path, monkeypatch, bfe)
    runner = responder()
    bfe.fail("SetFileSecurityW", 0, nth=2)  # the directory is set, the first file is not
    with pytest.raises(EarlyfwError, match="cannot restrict"):
        installer.install(config(), root, runner, ["windows"])
    assert not [argv for argv in runner.argvs() if "/Create" in argv]
    assert bfe.filters(), "blocked all the same"


def test_the_installer_refuses_a_nic_as_the_tunnel_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15, item 1: `[tunnel] interface = "Ethernet"` is no kill switch."""
    nic = 0x0006_0000_0001_0000
    bfe = RecordingBfe(aliases={"wg0": nic}, adapters={nic: Adapter("Intel(R) Ethernet I219-V", hardware=True)})
    root = windows_host(tmp_path, monkeypatch, bfe)
    with pytest.raises(EarlyfwError, match="not a tunnel adapter"):
        installer.install(config(), root, responder(), ["windows"])
    assert not (tmp_path / "ProgramData").exists() and bfe.store == Store()


def test_a_failing_wfp_uninstall_keeps_every_file_for_a_second_try(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15, item 7: the WFP objects go first, the files only after."""
    bfe = RecordingBfe(aliases={"wg0": LUID})
    root = windows_host(tmp_path, monkeypatch, bfe)
    installer.install(config(), root, responder(), ["windows"])
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    bfe.fail("FwpmFilterDeleteByKey0", s.FWP_E_IN_USE, nth=3)
    with pytest.raises(EarlyfwError, match="FwpmFilterDeleteByKey0"):
        installer.uninstall(root, responder())
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == files, "manifest and break-glass kept"
    assert (root / windows.BREAKGLASS_PATH).exists()
    assert bfe.filters(), "still blocked"
    installer.uninstall(root, responder())  # the second try finishes
    assert bfe.store == Store()
    assert not (root / windows.BREAKGLASS_PATH).exists()


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


def test_relax_and_lock_dispatch_to_wfp_on_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "earlyfw.toml"  # `lock` records its time beside the config
    conf.write_text(EXAMPLE.read_text())
    bfe = RecordingBfe(aliases={"wg0": LUID})
    force(monkeypatch, System.WINDOWS)
    monkeypatch.setattr(backend, "load", lambda: bfe)
    assert invoke("--config", str(conf), "windows", "apply").exit_code == 0
    blocked = bfe.filters()
    result = invoke("-q", "--config", str(conf), "relax")
    assert result.exit_code == 0, result.output
    assert "earlyfw: relaxed" in result.output
    assert len(bfe.filters()) == len(blocked) + len(rules.relax_set(config(), rules.Interface("wg0", LUID)))
    assert invoke("-q", "--config", str(conf), "lock").exit_code == 0
    assert (tmp_path / "locked-at").exists(), "the watcher honours it until a fresh handshake"
    assert bfe.filters() == blocked
    status = invoke("--config", str(conf), "windows", "status")
    assert status.exit_code == 0 and "state: blocked" in status.output
    assert invoke("windows", "purge").exit_code == 0
    assert bfe.store == Store()
    status = invoke("--config", str(conf), "windows", "status")
    assert status.exit_code == 3 and "missing" in status.output
    bfe.aliases.clear()
    invoke("--config", str(conf), "windows", "apply")
    missing = invoke("--config", str(conf), "relax")
    assert isinstance(missing.exception, EarlyfwError) and "no network adapter named 'wg0'" in str(missing.exception)


def test_status_warns_about_rival_sublayers_and_reports_boot_time_filters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "earlyfw.toml"
    conf.write_text(EXAMPLE.read_text())
    """Weight 0xFFFF is no precedence: another product's 0xFFFF sublayer can
    hold a hard permit that earlyfw's blocks do not override."""
    bfe = RecordingBfe(aliases={"wg0": LUID})
    force(monkeypatch, System.WINDOWS)
    monkeypatch.setattr(backend, "load", lambda: bfe)
    assert invoke("--config", str(conf), "windows", "apply").exit_code == 0
    quiet = invoke("--config", str(conf), "windows", "status")
    assert quiet.exit_code == 0 and "warning" not in quiet.output
    assert "boottime: 10 filters" in quiet.output
    other = s.FWPM_SUBLAYER0()
    other.subLayerKey = s.GUID.of(uuid.UUID("12345678-1234-5678-1234-567812345678"))
    other.displayData.name = "Other VPN"
    other.weight = 0xFFFF
    with engine.session(bfe) as bfe_session:
        bfe_session.call("FwpmSubLayerAdd0", bfe_session.handle, ctypes.byref(other), None)
    loud = invoke("--config", str(conf), "windows", "status")
    assert "warning: sublayer 'Other VPN' (12345678-1234-5678-1234-567812345678) also has weight 0xffff" in loud.output
    bfe.reboot(hide_boottime=True)  # BFE lists boot-time filters only on the boot they were added
    after = invoke("--config", str(conf), "windows", "status")
    assert "boot-time filters: not listed by BFE" in after.output and after.exit_code == 0


def test_on_a_live_windows_host_only_windows_targets_are_chosen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    force(monkeypatch, System.WINDOWS)
    chosen = installer.select(HostRoot(tmp_path))
    assert Windows in chosen
    assert all(cls.system is System.WINDOWS for cls in chosen), chosen
    # An image directory is not the host: its system is the named targets' (no core, that is Linux's).
    assert {cls.name for cls in installer.select(Root(tmp_path), ["windows"])} == {"windows"}


# -- Windows adapter names -------------------------------------------------------


@pytest.mark.parametrize("name", ["OpenVPN TAP-Windows6", "Local Area Connection (2)", "w" * 256, "wg_office+home=1"])
def test_real_windows_adapter_names_are_accepted(name: str) -> None:
    """`[tunnel] adapter`: Windows names go past Linux's 15-byte rule."""
    text = EXAMPLE.read_text().replace("[tunnel]\n", f'[tunnel]\nadapter = "{name}"\n', 1)
    cfg = configuration.parse(text)
    assert cfg.windows_adapter == name and cfg.interface == config().interface
    assert configuration.parse(cfg.to_toml()) == cfg
    bfe = RecordingBfe(aliases={name: LUID})
    engine.install(bfe, cfg)
    engine.relax(bfe, cfg, rules.Interface(cfg.windows_adapter, engine.tunnel_luid(bfe, name) or 0))
    assert ("ConvertInterfaceAliasToLuid", name) in bfe.calls
    xml = windows.task_xml(cfg)[2:].decode("utf-16-le")
    assert ET.fromstring(xml.split("?>", 1)[1]) is not None  # noqa: S314 - our own rendered XML


@pytest.mark.parametrize("name", ["w" * 257, "", " leading", "trailing ", 'quote"d', "a<b", "tab\there", "x&y", 7])
def test_adapter_names_that_could_break_out_are_refused(name: object) -> None:
    value = f'"{name}"' if isinstance(name, str) else str(name)
    text = EXAMPLE.read_text().replace("[tunnel]\n", f"[tunnel]\nadapter = {value}\n", 1)
    if '"' in str(name) and isinstance(name, str):
        text = EXAMPLE.read_text().replace("[tunnel]\n", f"[tunnel]\nadapter = '{name}'\n", 1)
    with pytest.raises(ConfigError, match=r"tunnel\.adapter"):
        configuration.parse(text)
