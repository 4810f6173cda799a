"""install / uninstall into an image root: exact files, modes, idempotence,
exact removal, restoring what was replaced, and nothing half-written on error."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

import earlyfw.root
from earlyfw import config, install, policy
from earlyfw.errors import CommandError, EarlyfwError
from earlyfw.root import MANIFEST, Root
from earlyfw.run import Result
from tests.recording_runner import RecordingRunner

EXAMPLE = Path(__file__).parent.parent / "payload" / "examples" / "earlyfw.toml"
CORE_FILES = {
    "/etc/earlyfw/earlyfw.toml": 0o644,
    "/etc/earlyfw/blocked.nft": 0o644,
    "/etc/earlyfw/relaxed.nft": 0o644,
    "/etc/earlyfw/initramfs.nft": 0o644,
    MANIFEST: 0o600,
}


def snapshot(top: Path) -> dict[str, tuple[int, int, int, bytes | str]]:
    """Every path under `top` with mode, owner, group and content (or link)."""
    found: dict[str, tuple[int, int, int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                content: bytes | str = os.readlink(path)
            elif stat.S_ISDIR(st.st_mode):
                content = "<dir>"
            else:
                content = path.read_bytes()
            found[str(path.relative_to(top))] = (st.st_mode, st.st_uid, st.st_gid, content)
    return found


@pytest.fixture
def cfg() -> config.Config:
    return config.load(EXAMPLE)


def test_root_refuses_paths_that_escape(tmp_path: Path) -> None:
    root = Root(tmp_path)
    for bad in ("etc/x", "/etc/../../x", "/../x"):
        with pytest.raises(ValueError, match="not an absolute system path"):
            root.resolve(bad)


def test_core_install_writes_exact_files_and_modes(tmp_path: Path, cfg: config.Config) -> None:
    runner = RecordingRunner()
    install.install(cfg, Root(tmp_path), runner, ["core"])
    for path, mode in CORE_FILES.items():
        st = (tmp_path / path.lstrip("/")).lstat()
        assert stat.S_ISREG(st.st_mode), path
        assert stat.S_IMODE(st.st_mode) == mode, path
        assert (st.st_uid, st.st_gid) == (0, 0), path
    assert (tmp_path / "etc/earlyfw/blocked.nft").read_text() == policy.render(cfg, policy.State.BLOCKED)
    assert config.load(tmp_path / "etc/earlyfw/earlyfw.toml") == cfg
    assert runner.calls == [], "an install into --root must not run anything"
    leftovers = [p for p in snapshot(tmp_path) if p.endswith((".new", ".earlyfw-undo"))]
    assert leftovers == []


def test_install_is_idempotent(tmp_path: Path, cfg: config.Config) -> None:
    install.install(cfg, Root(tmp_path), RecordingRunner(), ["core"])
    first = snapshot(tmp_path)
    install.install(cfg, Root(tmp_path), RecordingRunner(), ["core"])
    assert snapshot(tmp_path) == first


def test_uninstall_removes_exactly_what_install_wrote(tmp_path: Path, cfg: config.Config) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/hostname").write_text("image\n")
    before = snapshot(tmp_path)
    install.install(cfg, Root(tmp_path), RecordingRunner(), ["core"])
    assert snapshot(tmp_path) != before
    install.uninstall(Root(tmp_path), RecordingRunner())
    assert snapshot(tmp_path) == before


def test_replaced_file_is_backed_up_and_restored(tmp_path: Path, cfg: config.Config) -> None:
    mine = tmp_path / "etc/earlyfw/blocked.nft"
    mine.parent.mkdir(parents=True)
    mine.write_text("# the admin's own file\n")
    os.chmod(mine, 0o640)
    os.chown(mine, 0, 4)
    before = snapshot(tmp_path)
    install.install(cfg, Root(tmp_path), RecordingRunner(), ["core"])
    assert mine.read_text() == policy.render(cfg, policy.State.BLOCKED)
    manifest = json.loads((tmp_path / MANIFEST.lstrip("/")).read_text())
    entry = next(e for e in manifest["entries"] if e["path"] == "/etc/earlyfw/blocked.nft")
    assert entry["backup"]["path"] == "/var/lib/earlyfw/backup/etc/earlyfw/blocked.nft"
    assert (entry["backup"]["mode"], entry["backup"]["uid"], entry["backup"]["gid"]) == (0o640, 0, 4)
    install.install(cfg, Root(tmp_path), RecordingRunner(), ["core"])  # a reinstall keeps the backup
    install.uninstall(Root(tmp_path), RecordingRunner())
    assert snapshot(tmp_path) == before


def test_a_file_changed_after_install_is_left_alone(tmp_path: Path, cfg: config.Config) -> None:
    install.install(cfg, Root(tmp_path), RecordingRunner(), ["core"])
    edited = tmp_path / "etc/earlyfw/earlyfw.toml"
    edited.write_text(edited.read_text() + "# my note\n")
    report = install.uninstall(Root(tmp_path), RecordingRunner())
    assert report.kept_modified == ["/etc/earlyfw/earlyfw.toml"]
    assert edited.exists()
    assert not (tmp_path / "etc/earlyfw/blocked.nft").exists()


def test_failure_mid_install_leaves_the_root_as_it_was(
    tmp_path: Path, cfg: config.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    install.install(cfg, Root(tmp_path), RecordingRunner(), ["core"])
    before = snapshot(tmp_path)
    changed = config.Config.from_dict({**cfg.to_dict(), "lan": {"allow": True}})
    real_write = Root.write
    writes = 0

    def failing_write(self: Root, system_path: str, data: bytes, **kw: int) -> None:
        nonlocal writes
        writes += 1
        if writes == 3:
            raise OSError(28, "No space left on device")
        real_write(self, system_path, data, **kw)

    monkeypatch.setattr(Root, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        install.install(changed, Root(tmp_path), RecordingRunner(), ["core"])
    assert writes > 3, "the journal is restored after the failure"
    assert snapshot(tmp_path) == before


def test_failure_at_the_last_step_is_finished_or_undone(tmp_path: Path, cfg: config.Config) -> None:
    renames = 0

    def explode(operation: str, path: str) -> None:
        nonlocal renames
        renames += operation == "rename" and path == MANIFEST
        if renames == 1:  # the final manifest (the journal was renamed into place with its directory)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        install.install(cfg, Root(tmp_path, fault=explode), RecordingRunner(), ["core"])
    # Every file is in place and the journal names them all: either way out works.
    install.install(cfg, Root(tmp_path), RecordingRunner(), ["core"])
    installed = snapshot(tmp_path)
    install.uninstall(Root(tmp_path), RecordingRunner())
    assert snapshot(tmp_path) == {}
    install.install(cfg, Root(tmp_path), RecordingRunner(), ["core"])
    assert snapshot(tmp_path) == installed


def test_unknown_target_is_refused_before_writing(tmp_path: Path, cfg: config.Config) -> None:
    with pytest.raises(EarlyfwError, match="'nosuch': unknown target"):
        install.install(cfg, Root(tmp_path), RecordingRunner(), ["nosuch"])
    assert snapshot(tmp_path) == {}


def test_uninstall_of_nothing_says_so(tmp_path: Path) -> None:
    with pytest.raises(EarlyfwError, match="not installed"):
        install.uninstall(Root(tmp_path), RecordingRunner())


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "earlyfw", *args], capture_output=True, text=True, check=False)


def test_cli_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace("port = 51820", "port = 70000", 1))
    image = tmp_path / "image"
    image.mkdir()
    result = cli("--config", str(bad), "install", "--root", str(image), "--target", "core")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"earlyfw: error: {bad}: endpoint[0].port: 70000 is out of range 1-65535"]
    assert list(image.iterdir()) == []


def test_cli_install_root_reads_the_config_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "etc/earlyfw").mkdir(parents=True)
    (tmp_path / "etc/earlyfw/earlyfw.toml").write_text(EXAMPLE.read_text())
    result = cli("install", "--root", str(tmp_path), "--target", "core")
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path}/etc/earlyfw/blocked.nft  -rw-r--r-- 0:0" in result.stdout


class HostLike(Root):
    """A tmp root that uninstall treats as the live system, so the after-steps
    run (through a RecordingRunner: nothing reaches the real kernel or systemd)."""

    @property
    def is_host(self) -> bool:
        return True


HOST_TARGETS = ["core", "systemd", "watch", "initramfs-tools"]
EARLYFW_TABLES = "table inet earlyfw\n"
# The after-steps of an uninstall, by the command each runs.
AFTER_STEPS = {
    "delete the tables": ("nft", "-f", "-"),
    "daemon-reload": ("systemctl", "daemon-reload"),
    "stop the watcher": ("systemctl", "stop", "earlyfw-watch.service"),
    "rebuild the initramfs": ("update-initramfs",),
}


def recording(failing: tuple[str, ...] | None) -> RecordingRunner:
    # A kernel of one table: loaded until a batch deletes it.
    loaded = {"tables": EARLYFW_TABLES}

    def respond(argv: Sequence[str], input: str | None) -> Result:
        args = tuple(argv)
        if failing is not None and args[: len(failing)] == failing:
            # As the Runner fails a command it cannot run at all, whatever `check`.
            raise CommandError(f"{' '.join(args)}: injected failure")
        if args[:3] == ("nft", "list", "tables"):
            return Result(0, loaded["tables"], "")
        if args[:2] == ("nft", "-f") and "delete table inet earlyfw" in (input or ""):
            loaded["tables"] = ""
        return Result(0, "", "")

    return RecordingRunner(respond=respond)


def ran(runner: RecordingRunner, prefix: tuple[str, ...]) -> bool:
    return any(argv[: len(prefix)] == prefix for argv in runner.argvs())


@pytest.mark.parametrize("failing", sorted(AFTER_STEPS))
def test_uninstall_runs_every_after_step_and_finishes_on_a_second_run(tmp_path: Path, failing: str) -> None:
    (tmp_path / "run/systemd/system").mkdir(parents=True)  # a running systemd: its steps apply
    before = snapshot(tmp_path)
    install.install(config.load(EXAMPLE), HostLike(tmp_path), recording(None), HOST_TARGETS)
    runner = recording(AFTER_STEPS[failing])
    report = install.uninstall(HostLike(tmp_path), runner)
    for step, prefix in AFTER_STEPS.items():
        assert ran(runner, prefix), f"{step} did not run after {failing} failed"
    assert report.failures and all("injected failure" in f for f in report.failures)
    assert any(" ".join(AFTER_STEPS[failing]) in f for f in report.failures), report.failures
    assert (tmp_path / MANIFEST.lstrip("/")).exists(), "what is left stays recorded"
    assert not (tmp_path / "etc/systemd/system/earlyfw-block.service").exists()
    # A second run does what is left, and only then is earlyfw gone.
    again = recording(None)
    assert install.uninstall(HostLike(tmp_path), again).failures == []
    assert ran(again, AFTER_STEPS["rebuild the initramfs"]) and ran(again, AFTER_STEPS["delete the tables"])
    assert snapshot(tmp_path) == before
    with pytest.raises(EarlyfwError, match="not installed"):
        install.uninstall(HostLike(tmp_path), again)  # the same kernel, its tables gone


def test_cli_uninstall_lists_failed_steps_exits_1_and_finishes_when_run_again(tmp_path: Path) -> None:
    """--rebuild-initramfs runs the generator in the image with chroot; this
    image has none, so that step fails, for real."""
    (tmp_path / "etc/earlyfw").mkdir(parents=True)
    (tmp_path / "etc/earlyfw/earlyfw.toml").write_text(EXAMPLE.read_text())
    before = snapshot(tmp_path)
    assert cli("install", "--root", str(tmp_path), "--target", "initramfs-tools").returncode == 0
    failed = cli("uninstall", "--root", str(tmp_path), "--rebuild-initramfs")
    assert failed.returncode == 1, failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("earlyfw: ")]
    assert errors == [
        f"earlyfw: failed: chroot {tmp_path} update-initramfs -u -k all: "
        f"chroot {tmp_path} update-initramfs -u -k all failed with status 127",
        "earlyfw: error: uninstall: 1 step(s) failed (listed above)",
        "earlyfw: hint: fix the cause and run `earlyfw uninstall` again: it finishes what is left",
    ]
    assert (tmp_path / MANIFEST.lstrip("/")).exists()
    done = cli("uninstall", "--root", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert snapshot(tmp_path) == before


def test_uninstall_keeps_an_edited_config_and_says_where_the_original_is(tmp_path: Path) -> None:
    """Item 10: the message and what happens agree. The image had its own
    config, install replaced it (normalised), the user then edited earlyfw's:
    uninstall keeps the edit and leaves the original beside it."""
    mine = tmp_path / "etc/earlyfw/earlyfw.toml"
    mine.parent.mkdir(parents=True)
    mine.write_text(EXAMPLE.read_text())
    os.chmod(mine, 0o640)
    original = snapshot(tmp_path)["etc/earlyfw/earlyfw.toml"]
    assert cli("install", "--root", str(tmp_path), "--target", "core").returncode == 0
    assert mine.read_text() != EXAMPLE.read_text(), "install wrote its own rendering"
    edited = mine.read_text() + "# my note\n"
    mine.write_text(edited)
    result = cli("uninstall", "--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert mine.read_text() == edited, "the user's edit is kept"
    beside = tmp_path / "etc/earlyfw/earlyfw.toml.pre-earlyfw"
    assert snapshot(tmp_path)["etc/earlyfw/earlyfw.toml.pre-earlyfw"] == original
    assert result.stderr.splitlines() == [
        f"earlyfw: warning: {mine} was changed since install; kept your version, "
        f"and the file earlyfw had replaced is beside it: {beside}"
    ]
    assert f"kept {mine} (changed since install); the file it had replaced: {beside}" in result.stdout
    assert not (tmp_path / "var").exists(), "nothing else of earlyfw's is left"


def test_the_path_walk_without_dir_fd_gives_the_same_trees(
    tmp_path: Path, cfg: config.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows has no dir_fd: the same walk on path strings (forced here on
    Linux) installs and uninstalls the same trees, and stays inside the root."""
    (tmp_path / "fd").mkdir()
    (tmp_path / "paths").mkdir()
    for top in (tmp_path / "fd", tmp_path / "paths"):
        (top / "usr/lib").mkdir(parents=True)
        (top / "etc").symlink_to("/usr/lib")  # absolute: the image's /usr/lib
    before = snapshot(tmp_path / "paths")
    install.install(cfg, Root(tmp_path / "fd"), RecordingRunner(), ["core", "systemd"])
    monkeypatch.setattr(earlyfw.root, "_USE_FD", False)
    install.install(cfg, Root(tmp_path / "paths"), RecordingRunner(), ["core", "systemd"])
    assert snapshot(tmp_path / "paths") == snapshot(tmp_path / "fd")
    assert (tmp_path / "paths/usr/lib/earlyfw/blocked.nft").is_file()
    install.uninstall(Root(tmp_path / "paths"), RecordingRunner())
    assert snapshot(tmp_path / "paths") == before


def test_a_manifest_of_the_previous_format_still_uninstalls(tmp_path: Path, cfg: config.Config) -> None:
    """Images installed by earlyfw before the journal (manifest without a
    version, backups as bare paths) are uninstalled exactly."""
    mine = tmp_path / "etc/earlyfw/blocked.nft"
    mine.parent.mkdir(parents=True)
    mine.write_text("# the admin's own\n")
    os.chmod(mine, 0o640)
    before = snapshot(tmp_path)
    install.install(cfg, Root(tmp_path), RecordingRunner(), ["core"])
    manifest_file = tmp_path / MANIFEST.lstrip("/")
    new = json.loads(manifest_file.read_text())
    old = {
        "entries": [
            {
                "path": e["path"],
                "sha256": e["fingerprint"].removeprefix("sha256:"),
                "link": None,
                "mode": e["mode"],
                "backup": e["backup"]["path"] if "backup" in e else None,
            }
            for e in new["entries"]
        ],
        "directories": new["directories"],
        "targets": new["targets"],
    }
    manifest_file.write_text(json.dumps(old))
    install.uninstall(Root(tmp_path), RecordingRunner())
    assert snapshot(tmp_path) == before


def test_uninstall_without_a_manifest_still_deletes_loaded_tables(tmp_path: Path) -> None:
    # "Not installed" only when nothing of earlyfw remains: tables loaded by
    # `earlyfw apply` alone, with no file installed, are still removed.
    runner = recording(None)
    report = install.uninstall(HostLike(tmp_path), runner)
    assert report.removed == ["table inet earlyfw"]
    assert ran(runner, ("nft", "-f", "-"))
    with pytest.raises(EarlyfwError, match="not installed"):
        install.uninstall(HostLike(tmp_path), runner)


TRIGGER = ("dpkg-trigger", "--no-await", "update-initramfs")


def test_package_install_fires_the_initramfs_trigger_only_when_the_initramfs_would_change(tmp_path: Path) -> None:
    """Under dpkg (`install --initramfs-trigger`, the postinst) the rebuild is
    asked for only when a file the initramfs carries changed: an upgrade that
    renders the same files, or a config change that leaves the initramfs
    ruleset as it was, costs no rebuild; one that changes it, or the hook
    losing its mode, does."""
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    hook = tmp_path / "etc/initramfs-tools/hooks/earlyfw"

    def install_under_dpkg(text: str) -> RecordingRunner:
        runner = recording(None)
        install.install(config.parse(text), HostLike(tmp_path), runner, HOST_TARGETS, initramfs_trigger=True)
        assert not ran(runner, ("update-initramfs",)), "the generator ran directly, not through its trigger"
        assert ran(runner, ("systemctl", "daemon-reload")), "the other targets' steps still run"
        return runner

    first = EXAMPLE.read_text()
    assert ran(install_under_dpkg(first), TRIGGER)
    assert not ran(install_under_dpkg(first), TRIGGER)
    dns = first.replace('servers = ["10.64.0.1"]', 'servers = ["10.64.0.1", "10.64.0.2"]')
    assert dns != first
    assert not ran(install_under_dpkg(dns), TRIGGER)
    endpoint = dns.replace("198.51.100.7", "198.51.100.8")
    assert endpoint != dns
    assert ran(install_under_dpkg(endpoint), TRIGGER)
    hook.chmod(0o644)
    assert ran(install_under_dpkg(endpoint), TRIGGER)
    assert stat.S_IMODE(hook.stat().st_mode) == 0o755


def test_host_install_rebuilds_the_initramfs_only_when_it_would_change_or_a_rebuild_failed(tmp_path: Path) -> None:
    """`earlyfw install` on a running system: a config change that leaves the
    initramfs's files as they were rebuilds nothing; one that changes them
    does; a rebuild that failed is done by the next install even though the
    files are the same by then; uninstall leaves no trace of the bookkeeping."""
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    before = snapshot(tmp_path)
    rebuild = ("update-initramfs",)

    def install_now(text: str, failing: tuple[str, ...] | None = None) -> RecordingRunner:
        runner = recording(failing)
        install.install(config.parse(text), HostLike(tmp_path), runner, HOST_TARGETS)
        return runner

    first = EXAMPLE.read_text()
    assert ran(install_now(first), rebuild)
    dns = first.replace('servers = ["10.64.0.1"]', 'servers = ["10.64.0.1", "10.64.0.2"]')
    runner = install_now(dns)
    assert not ran(runner, rebuild)
    assert ran(runner, ("systemctl", "daemon-reload"))
    endpoint = dns.replace("198.51.100.7", "198.51.100.8")
    with pytest.raises(CommandError, match="injected failure"):
        install_now(endpoint, failing=rebuild)
    assert ran(install_now(endpoint), rebuild), "the failed rebuild was not done again"
    assert not ran(install_now(endpoint), rebuild)
    with pytest.raises(CommandError, match="injected failure"):
        install_now(first, failing=rebuild)
    assert install.uninstall(HostLike(tmp_path), recording(None)).failures == []
    assert snapshot(tmp_path) == before
