"""The macos Target: what it writes (paths, modes, the launchd plist), when it
is selected, and what it runs on a live Mac.

launchd cannot run here. The plist is checked with plistlib for exactly the
keys and types launchd reads; on a Mac, `plutil -lint
/Library/LaunchDaemons/org.earlyfw.pf.plist` and `sudo launchctl print
system/org.earlyfw.pf` confirm launchd accepted it. The live-host commands
(`launchctl bootstrap`, `pfctl -X`, ...) are recorded by a RecordingRunner
with platform.system() reporting Darwin.
"""

from __future__ import annotations

import os
import platform
import plistlib
import stat
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from earlyfw import cli, config, install
from earlyfw.errors import ConfigError, EarlyfwError
from earlyfw.macos import target as macos
from earlyfw.policy import State
from earlyfw.root import Root, Transaction
from earlyfw.run import Result
from earlyfw.system import System
from earlyfw.targets import File
from tests.recording_runner import RecordingRunner
from tests.systems import force
from tests.test_macos_pf import EXAMPLE_CONFIG, LAN_TCP_CONFIG

SUPPORT = "/Library/Application Support/earlyfw"
FILES = {
    "/etc/earlyfw/earlyfw.toml": 0o644,  # the macos target's own: no core target, no unused .nft files
    "/Library/LaunchDaemons/org.earlyfw.pf.plist": 0o644,
    f"{SUPPORT}/earlyfw-pf": 0o755,
    f"{SUPPORT}/earlyfw.pf": 0o644,
    f"{SUPPORT}/tunnel.pf": 0o644,
    f"{SUPPORT}/emergency.pf": 0o644,
    f"{SUPPORT}/wg": 0o755,
}


class HostRoot(Root):
    """A root that claims to be the live host while living under tmp: if a
    refusal failed, the writes would land here, not in the real /Library."""

    @property
    def is_host(self) -> bool:
        return True


WG_BINARY = b"\xcf\xfa\xed\xfe wireguard-tools wg"


@pytest.fixture(autouse=True)
def homebrew_wg(tmp_path: Path) -> Path:
    """wireguard-tools as Homebrew installs it: a symlink into the Cellar,
    in a directory the user who installed Homebrew owns."""
    cellar = tmp_path / "opt/homebrew/Cellar/wireguard-tools/1.0.20210914/bin"
    cellar.mkdir(parents=True)
    (cellar / "wg").write_bytes(WG_BINARY)
    link = tmp_path / "opt/homebrew/bin/wg"
    link.parent.mkdir(parents=True)
    link.symlink_to("../Cellar/wireguard-tools/1.0.20210914/bin/wg")
    return link


@pytest.fixture
def darwin(monkeypatch: pytest.MonkeyPatch) -> None:
    force(monkeypatch, System.MACOS)


def target(root: Root, runner: RecordingRunner | None = None) -> macos.MacOS:
    return macos.MacOS(root, runner or RecordingRunner())


# --- The plan -------------------------------------------------------------------------


def test_plan_paths_and_modes(tmp_path: Path) -> None:
    plan = target(Root(tmp_path)).plan(EXAMPLE_CONFIG)
    assert {a.path: a.mode for a in plan.artifacts if isinstance(a, File)} == FILES
    assert plan.paths() == list(FILES)


def test_plist_has_exactly_the_keys_launchd_needs() -> None:
    job: dict[str, Any] = plistlib.loads(macos.launchd_plist())
    assert set(job) == {
        "Label",
        "ProgramArguments",
        "RunAtLoad",
        "KeepAlive",
        "EnvironmentVariables",
        "StandardOutPath",
        "StandardErrorPath",
    }
    assert job["Label"] == "org.earlyfw.pf" == macos.LABEL
    args = job["ProgramArguments"]
    assert isinstance(args, list) and all(isinstance(a, str) for a in args)
    assert args == ["/bin/sh", f"{SUPPORT}/earlyfw-pf", "watch"]
    assert all(a.startswith("/") for a in args[:2])
    assert job["RunAtLoad"] is True and job["KeepAlive"] is True
    assert job["StandardOutPath"] == job["StandardErrorPath"] == "/var/log/earlyfw.log"
    env = job["EnvironmentVariables"]
    assert isinstance(env, dict) and set(env) == {"PATH"} and isinstance(env["PATH"], str)
    assert env["PATH"].split(":")[:4] == ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]


def test_plist_is_xml_launchd_can_read() -> None:
    data = macos.launchd_plist()
    assert data.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE plist PUBLIC')
    assert plistlib.loads(data, fmt=plistlib.FMT_XML)


def test_layout_refuses_paths_unsafe_in_the_script() -> None:
    for bad in ('/tmp/a"b', "/tmp/$HOME", "/tmp/`x`", "relative/path", "/tmp/../etc"):
        with pytest.raises(ValueError, match="unsafe path"):
            macos.Layout(support_dir=bad)


def test_plan_refuses_a_linux_interface_name(tmp_path: Path) -> None:
    cfg = config.Config.from_dict(
        {"tunnel": {"interface": "wg0"}, "endpoint": [{"address": "198.51.100.7", "port": 51820}]}
    )
    with pytest.raises(ConfigError, match="'wg0' is not a macOS tunnel device"):
        target(Root(tmp_path)).plan(cfg)


# --- Selection ---------------------------------------------------------------------------


def test_never_detected_on_linux(tmp_path: Path) -> None:
    assert platform.system() == "Linux"
    assert macos.MacOS.system is System.MACOS
    assert not macos.MacOS.detect(Root())
    assert not macos.MacOS.detect(Root(tmp_path))
    assert macos.MacOS not in install.select(Root(tmp_path))
    assert macos.MacOS in install.select(Root(tmp_path), ["macos"])


def test_detected_on_darwin(tmp_path: Path, darwin: None) -> None:
    assert macos.MacOS.detect(Root())
    assert not macos.MacOS.detect(Root(tmp_path)), "an image dir that is not a macOS system"
    (tmp_path / "System/Library/CoreServices").mkdir(parents=True)
    (tmp_path / "System/Library/CoreServices/SystemVersion.plist").write_bytes(b"")
    assert macos.MacOS.detect(Root(tmp_path))


# --- Installing into an image root -----------------------------------------------------------


def test_root_install_writes_exact_files_and_runs_nothing(tmp_path: Path) -> None:
    (tmp_path / "etc/earlyfw").mkdir(parents=True)
    runner = RecordingRunner()
    report = install.install(EXAMPLE_CONFIG, Root(tmp_path), runner, ["macos"])
    assert runner.calls == []
    assert set(FILES) <= set(report.written)
    for path, mode in FILES.items():
        st = (tmp_path / path.lstrip("/")).lstat()
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == mode, path
        assert (st.st_uid, st.st_gid) == (0, 0), f"{path}: root:wheel (wheel is gid 0 on macOS)"
    assert (tmp_path / "Library/Application Support").is_dir()
    job = plistlib.loads((tmp_path / "Library/LaunchDaemons/org.earlyfw.pf.plist").read_bytes())
    assert Path(tmp_path, job["ProgramArguments"][1].lstrip("/")).is_file()
    assert any("root:wheel" in note for note in report.image_notes)


def test_root_uninstall_removes_every_file_and_created_directory(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    runner = RecordingRunner()
    install.install(EXAMPLE_CONFIG, Root(tmp_path), runner, ["macos"])
    assert (tmp_path / "Library").exists()  # control
    install.uninstall(Root(tmp_path), runner)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert runner.calls == []


def test_wg_is_copied_root_owned_and_never_searched_on_a_user_path(tmp_path: Path, homebrew_wg: Path) -> None:
    """Issue 15, item 3: the root job ran `wg` from /opt/homebrew/bin every two
    seconds, a directory the Homebrew user owns. Now install copies it into
    earlyfw's root-owned support directory and the job's PATH holds system
    directories only."""
    plan = target(Root(tmp_path)).plan(EXAMPLE_CONFIG)
    files = {f.path: f for f in plan.artifacts if isinstance(f, File)}
    assert files[macos.LAYOUT.wg].content == WG_BINARY and files[macos.LAYOUT.wg].mode == 0o755
    job = plistlib.loads(macos.launchd_plist())
    assert job["EnvironmentVariables"]["PATH"].split(":") == ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
    assert f'WG="{macos.LAYOUT.wg}"' in macos.render(EXAMPLE_CONFIG).script
    # OpenVPN needs no wg; WireGuard without wg is refused with a hint.
    assert macos.LAYOUT.wg not in {f.path for f in target(Root(tmp_path)).plan(LAN_TCP_CONFIG).artifacts}
    homebrew_wg.unlink()
    with pytest.raises(EarlyfwError, match="wg \\(wireguard-tools\\) not found") as e:
        target(Root(tmp_path)).plan(EXAMPLE_CONFIG)
    assert e.value.hint and "brew install wireguard-tools" in e.value.hint
    homebrew_wg.symlink_to("/usr/bin/env")  # out of the image: refused
    with pytest.raises(EarlyfwError, match="points outside"):
        target(Root(tmp_path)).plan(EXAMPLE_CONFIG)


# --- On a live host ----------------------------------------------------------------------------


def test_live_install_on_linux_is_refused_before_writing(tmp_path: Path) -> None:
    t = target(HostRoot(tmp_path))
    plan = t.plan(EXAMPLE_CONFIG)
    with Transaction(t.root) as txn, pytest.raises(EarlyfwError, match="exist only on macOS") as e:
        t.apply(plan, txn)
    assert e.value.hint and "--root" in e.value.hint
    assert [p.name for p in tmp_path.iterdir()] == ["opt"]
    with pytest.raises(EarlyfwError, match="exist only on macOS"):
        t.after_install(EXAMPLE_CONFIG)
    with pytest.raises(EarlyfwError, match="exist only on macOS"):
        t.after_uninstall()
    assert t.runner.calls == []  # type: ignore[attr-defined]


def test_live_install_on_darwin(tmp_path: Path, darwin: None) -> None:
    runner = RecordingRunner()
    t = target(HostRoot(tmp_path), runner)
    with Transaction(t.root) as txn:
        t.apply(t.plan(EXAMPLE_CONFIG), txn)
    assert (tmp_path / "Library/LaunchDaemons/org.earlyfw.pf.plist").is_file()
    t.after_install(EXAMPLE_CONFIG)
    assert runner.argvs() == [
        ("launchctl", "bootout", "system/org.earlyfw.pf"),
        ("launchctl", "enable", "system/org.earlyfw.pf"),
        ("launchctl", "bootstrap", "system", "/Library/LaunchDaemons/org.earlyfw.pf.plist"),
    ]


def test_bootstrap_is_retried_while_launchd_tears_the_old_job_down(darwin: None) -> None:
    answers = iter([Result(5, "", "Bootstrap failed: 5: Input/output error"), Result(0, "", "")])
    runner = RecordingRunner(respond=lambda argv, _: next(answers))
    macos.bootstrap(runner, delay=0)
    assert len(runner.calls) == 2
    failing = RecordingRunner(respond=lambda argv, _: Result(5, "", "Bootstrap failed: 5: Input/output error"))
    with pytest.raises(EarlyfwError, match="launchd did not load") as e:
        macos.bootstrap(failing, attempts=3, delay=0)
    assert len(failing.calls) == 3 and e.value.hint and "launchctl bootstrap" in e.value.hint


def test_live_uninstall_on_darwin(tmp_path: Path, darwin: None) -> None:
    for path, content in [("var/run/earlyfw/pf.token", "9223371762477022712\n"), ("var/log/earlyfw.log", "x\n")]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(content)
    (tmp_path / "var/run/earlyfw/locked-at").write_text("1700000000\n")
    runner = RecordingRunner()
    target(HostRoot(tmp_path), runner).after_uninstall()
    assert runner.argvs() == [
        ("launchctl", "bootout", "system/org.earlyfw.pf"),
        ("pfctl", "-X", "9223371762477022712"),
        ("pfctl", "-s", "rules"),
        ("pfctl", "-a", "com.apple/000.earlyfw/tunnel", "-F", "rules"),
        ("pfctl", "-a", "com.apple/000.earlyfw/tunnel", "-F", "Tables"),
        ("pfctl", "-a", "com.apple/000.earlyfw", "-F", "rules"),
        ("pfctl", "-a", "com.apple/000.earlyfw", "-F", "Tables"),
    ]
    assert not (tmp_path / "var/run/earlyfw").exists()
    assert not (tmp_path / "var/log/earlyfw.log").exists()


def test_live_uninstall_without_a_token_and_with_a_stuck_anchor(tmp_path: Path, darwin: None) -> None:
    def respond(argv: Any, _: Any) -> Result:
        return Result(1, "", "pfctl: DIOCBEGIN: Device busy") if argv[-2:] == ["-F", "rules"] else Result(0, "", "")

    runner = RecordingRunner(respond=respond)
    with pytest.raises(EarlyfwError, match="pf still holds") as e:
        target(HostRoot(tmp_path), runner).after_uninstall()
    assert e.value.hint == "sudo pfctl -a 'com.apple/000.earlyfw' -F all"
    assert not [a for a in runner.argvs() if "-X" in a]


def test_live_uninstall_removes_the_anchor_call_it_inserted(tmp_path: Path, darwin: None) -> None:
    """Where pf.conf did not call com.apple/*, earlyfw-pf called its anchor
    from the main ruleset; uninstall takes exactly those lines out again."""
    main = (
        "scrub in all\n"
        f'scrub-anchor "{macos.ANCHOR}" all\n'
        f'anchor "{macos.ANCHOR}" all\n'
        "pass out quick inet proto tcp from any to any port 443 no state\n"
    )

    def respond(argv: Any, _: Any) -> Result:
        return Result(0, main, "") if list(argv) == ["pfctl", "-s", "rules"] else Result(0, "", "")

    runner = RecordingRunner(respond=respond)
    target(HostRoot(tmp_path), runner).after_uninstall()
    loads = [stdin for argv, stdin in runner.calls if list(argv) == ["pfctl", "-o", "none", "-R", "-f", "-"]]
    assert loads == ["scrub in all\npass out quick inet proto tcp from any to any port 443 no state\n"]


# --- earlyfw relax / lock on a Mac --------------------------------------------------------------


def test_put_state_refuses_off_darwin_and_without_an_install(tmp_path: Path, darwin: None) -> None:
    layout = macos.Layout(support_dir=str(tmp_path / "Application Support"))
    with pytest.raises(EarlyfwError, match="not installed"):
        macos.put_state(RecordingRunner(), EXAMPLE_CONFIG, State.RELAXED, layout)
    with pytest.raises(EarlyfwError, match="Linux initramfs"):
        macos.put_state(RecordingRunner(), EXAMPLE_CONFIG, State.INITRAMFS, layout)


def test_put_state_on_linux_is_refused() -> None:
    with pytest.raises(EarlyfwError, match="exist only on macOS"):
        macos.put_state(RecordingRunner(), EXAMPLE_CONFIG, State.RELAXED)


def test_cli_relax_dispatches_to_pf_on_darwin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[State] = []
    force(monkeypatch, System.MACOS)
    monkeypatch.setattr(macos, "put_state", lambda runner, cfg, state, root: seen.append(state))
    path = tmp_path / "earlyfw.toml"
    path.write_text(EXAMPLE_CONFIG.to_toml())
    assert os.geteuid() == 0, "the CLI checks for root first"
    for command, state in [("relax", State.RELAXED), ("lock", State.BLOCKED)]:
        result = CliRunner().invoke(cli.cli, ["--config", str(path), command])
        assert result.exit_code == 0, result.output
        assert result.output == f"earlyfw: {state}\n"
    assert seen == [State.RELAXED, State.BLOCKED]


def test_whole_install_and_uninstall_on_a_mac(tmp_path: Path, darwin: None) -> None:
    """Through the orchestrator, as `sudo earlyfw install` / `uninstall` run on
    a Mac: launchd and pf are driven, nft never is."""
    (tmp_path / "etc").mkdir()
    runner = RecordingRunner()
    install.install(EXAMPLE_CONFIG, HostRoot(tmp_path), runner, ["macos"])
    assert ("launchctl", "bootstrap", "system", macos.PLIST) in runner.argvs()
    runner.calls.clear()
    install.uninstall(HostRoot(tmp_path), runner)
    programs = [argv[0] for argv in runner.argvs()]
    assert "nft" not in programs
    assert programs[0] == "launchctl" and programs.count("pfctl") == 5  # -s rules, then 4 flushes
    assert not (tmp_path / "Library/LaunchDaemons/org.earlyfw.pf.plist").exists()
