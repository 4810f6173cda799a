"""install / uninstall into an image root: exact files, modes, idempotence,
exact removal, restoring what was replaced, and nothing half-written on error."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from earlyfw import config, install, policy
from earlyfw.errors import EarlyfwError
from earlyfw.root import MANIFEST, Root
from earlyfw.run import RecordingRunner

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
