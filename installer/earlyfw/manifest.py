"""The manifest: earlyfw's journal of what it wrote into a root, and what it
replaced. Install writes it *before* changing anything (every path it is about
to write, every directory it is about to create, every backup it is about to
take), so after a kill at any point both `install` and `uninstall` know all
that may be there. It is read back from the image, so it is untrusted: every
field is checked against a strict type before anything is touched.
"""

from __future__ import annotations

import functools
import json
import re
import stat
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from earlyfw.errors import ConfigError
from earlyfw.root import BACKUP_DIR, MANIFEST, SPECIAL_MODE_BITS, STATE_DIR, Root, fingerprint, system_path
from earlyfw.targets import installable_paths, load_all

VERSION = 2
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}|link:[^\0]{1,4096}")
_MAX_ID = 2**32 - 2


class ManifestError(ConfigError):
    """A manifest that is not one earlyfw wrote: exit 2, nothing touched."""


@dataclass(frozen=True)
class Saved:
    """The file earlyfw replaced, as it saved it under BACKUP_DIR."""

    path: str
    fingerprint: str
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True)
class Entry:
    """One path earlyfw writes: what it puts there, and what else of earlyfw's
    may be there while an install is unfinished (`also`)."""

    path: str
    fingerprint: str
    mode: int = 0o644
    backup: Saved | None = None
    also: tuple[str, ...] = ()

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return (self.fingerprint, *self.also)


def backup_path(path: str) -> str:
    return BACKUP_DIR + path


@dataclass
class Manifest:
    entries: dict[str, Entry] = field(default_factory=dict)
    # Directories earlyfw created (or is about to), parents first.
    directories: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, root: Root) -> Manifest | None:
        """The manifest under `root`, validated, or None if there is none."""
        where = root.resolve(MANIFEST)
        try:
            if root.lstat(MANIFEST) is None:
                return None
            raw = json.loads(root.read_bytes(MANIFEST, follow=False))
        except (OSError, ValueError) as e:
            raise ManifestError(f"{where}: unreadable manifest: {e}", hint=_HINT) from None
        try:
            return parse(_from_version_1(root, raw))
        except (OSError, ValueError) as e:
            raise ManifestError(f"{where}: {e}", hint=_HINT) from None

    def dump(self) -> bytes:
        data = {
            "version": VERSION,
            "entries": [_dump_entry(e) for e in sorted(self.entries.values(), key=lambda e: e.path)],
            "directories": self.directories,
            "targets": self.targets,
        }
        return (json.dumps(data, indent=2) + "\n").encode()

    def owns(self, root: Root, path: str) -> bool:
        """`path` holds what earlyfw last wrote there (not an admin's edit)."""
        entry = self.entries.get(path)
        return entry is not None and fingerprint(root, path) == entry.fingerprint

    def paths(self) -> set[str]:
        """Every path this manifest may have left something at."""
        found = {MANIFEST}
        for entry in self.entries.values():
            found.add(entry.path)
            if entry.backup is not None:
                found.add(entry.backup.path)
        return found


_HINT = (
    "it is not one earlyfw wrote; nothing was changed. Inspect it, or remove earlyfw's files by hand (README, Recovery)"
)


def _dump_entry(entry: Entry) -> dict[str, Any]:
    data: dict[str, Any] = {"path": entry.path, "fingerprint": entry.fingerprint, "mode": entry.mode}
    if entry.backup is not None:
        b = entry.backup
        data["backup"] = {"path": b.path, "fingerprint": b.fingerprint, "mode": b.mode, "uid": b.uid, "gid": b.gid}
    if entry.also:
        data["also"] = list(entry.also)
    return data


# -- strict parsing --------------------------------------------------------


def _object(value: object, where: str, required: set[str], optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object, got {type(value).__name__}")
    keys = set(value)
    if missing := required - keys:
        raise ValueError(f"{where}: missing {sorted(missing)[0]!r}")
    if unknown := keys - required - optional:
        raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    return value


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _int(value: object, where: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{where}: {value!r} is not an integer in {low}-{high}")
    return value


def _path(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a path, got {type(value).__name__}")
    try:
        system_path(value)
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not a normalised absolute path") from None
    return value


def _fingerprint(value: object, where: str) -> str:
    if not isinstance(value, str) or not _FINGERPRINT.fullmatch(value):
        raise ValueError(f"{where}: {value!r} is not a sha256:<hex> or link:<target> fingerprint")
    return value


def _mode(value: object, where: str) -> int:
    mode = _int(value, where, 0, 0o7777)
    if mode & SPECIAL_MODE_BITS:
        raise ValueError(f"{where}: mode {mode:o} has setuid, setgid or sticky bits; earlyfw never writes those")
    return mode


@functools.cache
def allowed_directories() -> frozenset[str]:
    """Every directory earlyfw may create: the parents of what it installs
    (and of the backups of those), and its state directory's."""
    found: set[str] = set()
    for path in (*installable_paths(), *(backup_path(p) for p in installable_paths()), MANIFEST):
        found.update(str(p) for p in PurePosixPath(path).parents if str(p) != "/")
    return frozenset(found)


_VERSION_1_KEYS = {"path", "sha256", "link", "mode", "backup"}


def _from_version_1(root: Root, raw: object) -> object:
    """A manifest of earlyfw before version 2 (no journal, backups as bare
    paths), in version 2's form, so an upgraded earlyfw still uninstalls. It
    recorded nothing about its backups: they are taken as found, and parse
    and check_backups still refuse any that is not a plain file or symlink
    or is setuid/setgid."""
    if not isinstance(raw, dict) or "version" in raw or not isinstance(raw.get("entries"), list):
        return raw
    entries = []
    for item in raw["entries"]:
        if not isinstance(item, dict) or not {"path", "mode"} <= set(item) <= {
            "path",
            "sha256",
            "link",
            "mode",
            "backup",
        }:
            return raw  # parse names what is wrong with it
        link, digest = item.get("link"), item.get("sha256")
        entry = {
            "path": item["path"],
            "mode": item["mode"],
            "fingerprint": f"link:{link}" if link else f"sha256:{digest}",
        }
        backup = item.get("backup")
        if isinstance(backup, str) and backup == backup_path(str(item["path"])):
            st = root.lstat(backup)
            found = fingerprint(root, backup) if st is not None else None
            if st is not None and found is not None:
                mode = 0o777 if stat.S_ISLNK(st.st_mode) else stat.S_IMODE(st.st_mode)
                entry["backup"] = {
                    "path": backup,
                    "fingerprint": found,
                    "mode": mode,
                    "uid": st.st_uid,
                    "gid": st.st_gid,
                }
        elif backup is not None:
            entry["backup"] = backup  # parse refuses it
        entries.append(entry)
    return {**raw, "version": VERSION, "entries": entries}


def parse(raw: object) -> Manifest:
    top = _object(raw, "manifest", {"version", "entries", "directories", "targets"})
    if top["version"] != VERSION:
        raise ValueError(f"version: {top['version']!r} is not {VERSION}")
    allowed = installable_paths()
    manifest = Manifest()
    for i, item in enumerate(_list(top["entries"], "entries")):
        where = f"entries[{i}]"
        e = _object(item, where, {"path", "fingerprint", "mode"}, frozenset({"backup", "also"}))
        path = _path(e["path"], f"{where}.path")
        if path not in allowed:
            raise ValueError(f"{where}.path: {path!r} is not a path earlyfw installs")
        if path in manifest.entries:
            raise ValueError(f"{where}.path: {path!r} is listed twice")
        backup = None
        if e.get("backup") is not None:
            b = _object(e["backup"], f"{where}.backup", {"path", "fingerprint", "mode", "uid", "gid"})
            if b["path"] != backup_path(path):
                raise ValueError(f"{where}.backup.path: {b['path']!r} is not {backup_path(path)!r}")
            backup = Saved(
                b["path"],
                _fingerprint(b["fingerprint"], f"{where}.backup.fingerprint"),
                _mode(b["mode"], f"{where}.backup.mode"),
                _int(b["uid"], f"{where}.backup.uid", 0, _MAX_ID),
                _int(b["gid"], f"{where}.backup.gid", 0, _MAX_ID),
            )
        also = tuple(_fingerprint(f, f"{where}.also[{j}]") for j, f in enumerate(_list(e.get("also", []), "also")))
        manifest.entries[path] = Entry(
            path,
            _fingerprint(e["fingerprint"], f"{where}.fingerprint"),
            _mode(e["mode"], f"{where}.mode"),
            backup,
            also,
        )
    directories = allowed_directories()
    for i, item in enumerate(_list(top["directories"], "directories")):
        path = _path(item, f"directories[{i}]")
        if path not in directories:
            raise ValueError(f"directories[{i}]: {path!r} is not a directory earlyfw creates")
        if path not in manifest.directories:
            manifest.directories.append(path)
    registry = load_all()
    for i, name in enumerate(_list(top["targets"], "targets")):
        if not isinstance(name, str) or name not in registry:
            raise ValueError(f"targets[{i}]: {name!r} is not an earlyfw target")
        if name not in manifest.targets:
            manifest.targets.append(name)
    return manifest


def check_backups(root: Root, manifest: Manifest) -> None:
    """Every backup present is exactly what install saved (content, mode,
    owner), before uninstall puts any of them back: exit 2 otherwise."""
    for entry in manifest.entries.values():
        saved = entry.backup
        if saved is None:
            continue
        st = root.lstat(saved.path)
        if st is None:
            continue
        kind_ok = stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)
        mode = stat.S_IMODE(st.st_mode)
        if (
            not kind_ok
            or (stat.S_ISREG(st.st_mode) and mode != saved.mode)
            or (st.st_uid, st.st_gid) != (saved.uid, saved.gid)
            or fingerprint(root, saved.path) != saved.fingerprint
        ):
            raise ManifestError(
                f"{root.resolve(saved.path)}: backup of {entry.path} is not the file earlyfw saved "
                f"(recorded {saved.mode:o} {saved.uid}:{saved.gid} {saved.fingerprint[:15]}…)",
                hint=_HINT,
            )


__all__ = ["STATE_DIR", "Entry", "Manifest", "ManifestError", "Saved", "check_backups", "parse"]
