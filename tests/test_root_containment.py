"""`--root` is a root, like chroot: over a battery of generated images (symlinks
at every level of the paths earlyfw writes: to directories and files, dangling,
loops, absolute and relative, climbing above the root) install, uninstall and
re-install change nothing outside the root; a hostile manifest is refused with
nothing touched. A sentinel tree beside the root is hashed before and after;
every symlink target that would escape points into it, never at the machine's
own directories (the old code followed them)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from earlyfw import config, install
from earlyfw.errors import EarlyfwError
from earlyfw.manifest import ManifestError
from earlyfw.root import BACKUP_DIR, MANIFEST, Root
from tests.recording_runner import RecordingRunner
from tests.test_install import EXAMPLE, snapshot

CFG = config.load(EXAMPLE)
# A tmpfs when there is one: each install fsyncs every file and directory it writes.
FAST_TMP = "/dev/shm" if os.path.isdir("/dev/shm") else None
TARGETS = ["core", "systemd", "dracut"]
# Where an image can hold a symlink on the way to what earlyfw writes.
LOCATIONS = (
    "/etc",
    "/etc/earlyfw",
    "/etc/earlyfw/blocked.nft",
    "/etc/earlyfw/earlyfw.toml",
    "/etc/earlyfw/blocked.nft.earlyfw-new",
    "/etc/earlyfw/relaxed.nft.earlyfw-undo",
    "/etc/systemd",
    "/etc/systemd/system",
    "/etc/systemd/system/earlyfw-block.service",
    "/etc/systemd/system/sysinit.target.wants",
    "/etc/systemd/system/NetworkManager.service.d",
    "/etc/systemd/system/NetworkManager.service.d/earlyfw.conf",
    "/etc/nftables.conf",
    "/var",
    "/var/lib",
    "/var/lib/earlyfw",
    "/var/lib/earlyfw/manifest.json",
    "/var/lib/earlyfw/backup",
    "/var/lib/earlyfw/backup/etc",
    "/usr",
    "/usr/lib",
    "/usr/lib/dracut",
    "/usr/lib/dracut/modules.d",
    "/var.earlyfw-new",
    "/var/lib.earlyfw-new",
)
# How a link's target is made, from the link's location and the sentinel.
KINDS = (
    "absolute",
    "absolute-dir",
    "absolute-file",
    "absolute-dangling",
    "relative",
    "climb",
    "loop",
    "dangling",
    "dot",
)


def link_target(kind: str, location: str, host_link: Path, sentinel: Path) -> str:
    if kind == "absolute":
        return str(sentinel)
    if kind == "absolute-dir":
        return str(sentinel / "dir")
    if kind == "absolute-file":
        return str(sentinel / "file")
    if kind == "absolute-dangling":
        return str(sentinel / "missing" / "deeper")
    if kind == "relative":  # what a lexical join makes of it: exactly the sentinel
        return os.path.relpath(sentinel / "dir", host_link.parent)
    if kind == "climb":  # above the root, then down into the sentinel from the top
        return "../" * (location.count("/") + 12) + str(sentinel / "dir").lstrip("/")
    if kind == "loop":
        return os.path.basename(location)
    if kind == "dangling":
        return "nowhere/at/all"
    return "."


def make_sentinel(sentinel: Path) -> None:
    (sentinel / "dir" / "sub").mkdir(parents=True)
    (sentinel / "dir" / "sub" / "keep").write_text("keep\n")
    (sentinel / "file").write_text("sentinel file\n")
    os.chmod(sentinel / "file", 0o600)


def outside(top: Path) -> dict[str, Any]:
    return {k: v for k, v in snapshot(top).items() if not (k == "root" or k.startswith("root/"))}


def plant(root: Path, location: str, target: str) -> None:
    """A symlink at `location` in the image, made without following any."""
    current = root
    parts = location.strip("/").split("/")
    for name in parts[:-1]:
        current = current / name
        if os.path.islink(current) or (os.path.lexists(current) and not current.is_dir()):
            return  # a link above it already decides where it goes
        if not os.path.lexists(current):
            current.mkdir()
    link = current / parts[-1]
    if not os.path.lexists(link):
        link.symlink_to(target)


@contextmanager
def image(links: list[tuple[str, str]]) -> Iterator[tuple[Path, Path, dict[str, Any]]]:
    with tempfile.TemporaryDirectory(prefix="earlyfw-contain-", dir=FAST_TMP) as t:
        top = Path(t)
        root, sentinel = top / "root", top / "sentinel"
        root.mkdir()
        make_sentinel(sentinel)
        for location, kind in links:
            host_link = root / location.lstrip("/")
            plant(root, location, link_target(kind, location, host_link, sentinel))
        yield top, root, outside(top)


def attempt(action: Any) -> None:
    with contextlib.suppress(EarlyfwError, OSError):  # refusing is fine; writing outside the root is not
        action()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(LOCATIONS), st.sampled_from(KINDS)), min_size=1, max_size=4))
def test_install_uninstall_reinstall_change_nothing_outside_the_root(links: list[tuple[str, str]]) -> None:
    with image(links) as (top, root, before):
        steps = {
            "install": lambda: install.install(CFG, Root(root), RecordingRunner(), TARGETS),
            "uninstall": lambda: install.uninstall(Root(root), RecordingRunner()),
            "re-install": lambda: install.install(CFG, Root(root), RecordingRunner(), TARGETS),
            "uninstall again": lambda: install.uninstall(Root(root), RecordingRunner()),
        }
        for name, step in steps.items():
            attempt(step)
            assert outside(top) == before, f"{name} changed something outside the root"


def test_absolute_symlinks_are_the_images_own_paths(tmp_path: Path) -> None:
    """Debian's /lib -> usr/lib and an absolute /etc link resolve inside the root."""
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "real-etc").mkdir()
    (root / "etc").symlink_to("/real-etc")
    install.install(CFG, Root(root), RecordingRunner(), ["core"])
    assert (root / "real-etc/earlyfw/blocked.nft").is_file()
    assert Root(root).resolve("/lib/x") == root / "usr/lib/x"
    assert Root(root).resolve("/etc/earlyfw/blocked.nft") == root / "real-etc/earlyfw/blocked.nft"
    install.uninstall(Root(root), RecordingRunner())
    assert sorted(p.name for p in (root / "real-etc").iterdir()) == []


def test_a_symlink_swapped_in_mid_install_cannot_redirect_a_write(tmp_path: Path) -> None:
    """Time of check, time of use: /etc/earlyfw becomes a link to the sentinel
    between two writes; later writes go through the directory already open or
    resolve the new link inside the root."""
    top = tmp_path
    root, sentinel = top / "root", top / "sentinel"
    root.mkdir()
    make_sentinel(sentinel)
    before = outside(top)
    swapped = False

    def swap(operation: str, path: str) -> None:
        nonlocal swapped
        if not swapped and path.startswith("/etc/earlyfw/") and operation == "rename":
            swapped = True
            real = root / "etc/earlyfw"
            real.rename(root / "etc/earlyfw-moved")
            real.symlink_to(sentinel / "dir")

    attempt(lambda: install.install(CFG, Root(root, fault=swap), RecordingRunner(), ["core"]))
    assert swapped
    assert outside(top) == before


# -- hostile manifests -----------------------------------------------------


def _entries(m: dict[str, Any]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = m["entries"]
    return entries


MUTATIONS: dict[str, Any] = {
    "path climbs": lambda m, s: _entries(m)[0].update(path="/etc/../../x"),
    "path relative": lambda m, s: _entries(m)[0].update(path="etc/earlyfw/blocked.nft"),
    "path outside": lambda m, s: _entries(m)[0].update(path=str(s / "file")),
    "path not earlyfw's": lambda m, s: _entries(m)[0].update(path="/etc/passwd"),
    "path not normalised": lambda m, s: _entries(m)[0].update(path="/etc//earlyfw/./blocked.nft"),
    "path twice": lambda m, s: _entries(m).append(dict(_entries(m)[0])),
    "setuid mode": lambda m, s: _entries(m)[0].update(mode=0o4755),
    "setgid mode": lambda m, s: _entries(m)[0].update(mode=0o2755),
    "mode a string": lambda m, s: _entries(m)[0].update(mode="644"),
    "mode huge": lambda m, s: _entries(m)[0].update(mode=2**40),
    "bad fingerprint": lambda m, s: _entries(m)[0].update(fingerprint="md5:x"),
    "backup elsewhere": lambda m, s: _entries(m)[0].update(
        backup={"path": "/etc/shadow", "fingerprint": "sha256:" + "0" * 64, "mode": 0o644, "uid": 0, "gid": 0}
    ),
    "backup outside": lambda m, s: _entries(m)[0].update(
        backup={"path": str(s / "file"), "fingerprint": "sha256:" + "0" * 64, "mode": 0o644, "uid": 0, "gid": 0}
    ),
    "backup climbs": lambda m, s: _entries(m)[0].update(
        backup={
            "path": BACKUP_DIR + "/../../../etc/x",
            "fingerprint": "sha256:" + "0" * 64,
            "mode": 0o644,
            "uid": 0,
            "gid": 0,
        }
    ),
    "backup setuid": lambda m, s: _entries(m)[0].update(
        backup={
            "path": BACKUP_DIR + _entries(m)[0]["path"],
            "fingerprint": "sha256:" + "0" * 64,
            "mode": 0o6755,
            "uid": 0,
            "gid": 0,
        }
    ),
    "directory outside": lambda m, s: m["directories"].append(str(s / "dir")),
    "directory climbs": lambda m, s: m["directories"].append("/etc/earlyfw/../../.."),
    "directory not earlyfw's": lambda m, s: m["directories"].append("/usr/bin"),
    "directory of the host": lambda m, s: m["directories"].append("/tmp"),
    "unknown target": lambda m, s: m["targets"].append("nosuch"),
    "unknown key": lambda m, s: m.update(run="rm -rf /"),
    "entries not a list": lambda m, s: m.update(entries={"a": 1}),
    "entry not an object": lambda m, s: m["entries"].append("x"),
    "not an object": None,  # the whole manifest a list
    "wrong version": lambda m, s: m.update(version=1),
}


def planted_backup(root: Path, mode: int, content: bytes) -> dict[str, Any]:
    """A backup file the image planted, recorded (or not) in the manifest."""
    path = BACKUP_DIR + "/etc/earlyfw/blocked.nft"
    host = root / path.lstrip("/")
    host.parent.mkdir(parents=True, exist_ok=True)
    host.write_bytes(content)
    os.chmod(host, mode)
    digest = hashlib.sha256(b"recorded").hexdigest()
    return {"path": path, "fingerprint": f"sha256:{digest}", "mode": 0o644, "uid": 0, "gid": 0}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=3, unique=True))
def test_a_hostile_manifest_is_refused_with_nothing_touched(mutations: list[str]) -> None:
    with image([]) as (top, root, before_outside):
        install.install(CFG, Root(root), RecordingRunner(), TARGETS)
        manifest_file = root / MANIFEST.lstrip("/")
        m = json.loads(manifest_file.read_text())
        for name in mutations:
            if MUTATIONS[name] is not None:
                with contextlib.suppress(LookupError, TypeError, AttributeError):  # an earlier one reshaped it
                    MUTATIONS[name](m, top / "sentinel")
        manifest_file.write_text(json.dumps([m] if "not an object" in mutations else m))
        before = snapshot(root)
        with pytest.raises(ManifestError):
            install.uninstall(Root(root), RecordingRunner())
        assert snapshot(root) == before
        with pytest.raises(ManifestError):
            install.install(CFG, Root(root), RecordingRunner(), TARGETS)
        assert snapshot(root) == before
        assert outside(top) == before_outside


@pytest.mark.parametrize(
    ("mode", "content"), [(0o4755, b"#!/bin/sh\nid\n"), (0o644, b"not what was saved\n"), (0o2755, b"recorded")]
)
def test_a_planted_backup_is_refused(tmp_path: Path, mode: int, content: bytes) -> None:
    """A backup that is not what install saved (setuid, other content) is never restored."""
    root = tmp_path / "root"
    (root / "etc/earlyfw").mkdir(parents=True)
    (root / "etc/earlyfw/blocked.nft").write_text("# mine\n")
    install.install(CFG, Root(root), RecordingRunner(), ["core"])
    manifest_file = root / MANIFEST.lstrip("/")
    m = json.loads(manifest_file.read_text())
    entry = next(e for e in m["entries"] if e["path"] == "/etc/earlyfw/blocked.nft")
    entry["backup"] = planted_backup(root, mode, content)
    manifest_file.write_text(json.dumps(m))
    before = snapshot(root)
    with pytest.raises(ManifestError, match="is not the file earlyfw saved"):
        install.uninstall(Root(root), RecordingRunner())
    assert snapshot(root) == before
    assert not any(v[0] & (stat.S_ISUID | stat.S_ISGID) for k, v in snapshot(root).items() if "backup" not in k)


def test_cli_hostile_manifest_is_one_line_exit_2(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    install.install(CFG, Root(root), RecordingRunner(), ["core"])
    manifest_file = root / MANIFEST.lstrip("/")
    m = json.loads(manifest_file.read_text())
    m["entries"][0]["path"] = "/etc/../../x"
    manifest_file.write_text(json.dumps(m))
    before = snapshot(root)
    result = subprocess.run(
        [sys.executable, "-m", "earlyfw", "uninstall", "--root", str(root)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert (
        lines[0]
        == f"earlyfw: error: {manifest_file}: entries[0].path: '/etc/../../x' is not a normalised absolute path"
    )
    assert all(line.startswith("earlyfw: ") for line in lines) and "Traceback" not in result.stderr
    assert snapshot(root) == before


def test_the_images_config_is_read_inside_the_image(tmp_path: Path) -> None:
    """An image whose earlyfw.toml links to an absolute path gets the image's
    file at that path, never the host's (which would be copied into the image)."""
    root = tmp_path / "root"
    (root / "etc/earlyfw").mkdir(parents=True)
    host_config = tmp_path / "host.toml"
    host_config.write_text(EXAMPLE.read_text().replace("198.51.100.7", "203.0.113.66"))
    (root / "etc/earlyfw/earlyfw.toml").symlink_to(host_config)  # absolute: inside the image it is missing

    def install() -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "earlyfw", "install", "--root", str(root), "--target", "core"]
        return subprocess.run(argv, capture_output=True, text=True, check=False)

    result = install()
    assert result.returncode == 2, result.stdout
    assert "no such config file in the image" in result.stderr
    assert not (root / "var").exists()
    in_image = root / str(host_config).lstrip("/")
    in_image.parent.mkdir(parents=True)
    in_image.write_text(EXAMPLE.read_text())
    result = install()
    assert result.returncode == 0, result.stderr
    assert "203.0.113.66" not in (root / "etc/earlyfw/blocked.nft").read_text()


def test_a_root_given_through_a_symlink_is_followed(tmp_path: Path) -> None:
    """`--root` is the caller's own choice: a symlink to the image is fine."""
    (tmp_path / "image").mkdir()
    (tmp_path / "link").symlink_to("image")
    install.install(CFG, Root(tmp_path / "link"), RecordingRunner(), ["core"])
    assert (tmp_path / "image/etc/earlyfw/blocked.nft").is_file()
    install.uninstall(Root(tmp_path / "link"), RecordingRunner())
    assert list((tmp_path / "image").iterdir()) == []
