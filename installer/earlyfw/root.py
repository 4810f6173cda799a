"""Every file earlyfw writes goes through a Root, so `--root IMAGE_DIR` and `/`
are the same code path: paths are system paths ("/etc/earlyfw/...") resolved
under the root, writes are atomic (`.new` + fsync + rename) with exact owner and
mode, and a manifest records what was written so uninstall removes exactly that
and puts back anything it replaced."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from earlyfw.errors import EarlyfwError

MANIFEST = "/var/lib/earlyfw/manifest.json"
BACKUP_DIR = "/var/lib/earlyfw/backup"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Root:
    path: Path = Path("/")

    @property
    def is_host(self) -> bool:
        # resolve() both: on Windows "/" is the current drive's root, "C:\\".
        return self.path.resolve() == Path("/").resolve()

    def __truediv__(self, system_path: str) -> Path:
        return self.resolve(system_path)

    def resolve(self, system_path: str) -> Path:
        pure = PurePosixPath(system_path)
        if not pure.is_absolute() or ".." in pure.parts:
            raise ValueError(f"not an absolute system path: {system_path!r}")
        return self.path / pure.relative_to("/")

    def exists(self, system_path: str) -> bool:
        return os.path.lexists(self.resolve(system_path))

    def read_bytes(self, system_path: str) -> bytes:
        return self.resolve(system_path).read_bytes()

    def makedirs(self, system_dir: str, created: list[str] | None = None) -> None:
        """Create a system directory and its parents (0755, root-owned),
        recording in `created` each one that did not exist before."""
        missing: list[PurePosixPath] = []
        pure = PurePosixPath(system_dir)
        while not os.path.lexists(self.resolve(str(pure))):
            missing.append(pure)
            pure = pure.parent
        for directory in reversed(missing):
            target = self.resolve(str(directory))
            target.mkdir(mode=0o755)
            os.chmod(target, 0o755)
            if created is not None:
                created.append(str(directory))

    def write(self, system_path: str, data: bytes, *, mode: int, uid: int = 0, gid: int = 0) -> None:
        """Atomically replace `system_path`: a reader sees the old or the new
        content, never a torn file, even across a crash."""
        target = self.resolve(system_path)
        tmp = target.with_name(target.name + ".new")
        # Windows has no O_NOFOLLOW, and needs O_BINARY to keep the bytes as given.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(tmp, flags, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if hasattr(os, "fchown"):  # POSIX owners and modes; Windows uses ACLs
                    os.fchown(f.fileno(), uid, gid)
                    os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        _fsync_dir(target.parent)

    def symlink(self, system_path: str, link_target: str) -> None:
        target = self.resolve(system_path)
        tmp = target.with_name(target.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(link_target)
        os.replace(tmp, target)
        _fsync_dir(target.parent)

    def remove(self, system_path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.resolve(system_path).unlink()

    def rmdir_if_empty(self, system_dir: str) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.resolve(system_dir).rmdir()


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # a directory cannot be opened, nor needs syncing, there
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Entry:
    """One path earlyfw wrote: a file (sha256 of its content) or a symlink."""

    path: str
    sha256: str | None = None
    link: str | None = None
    mode: int = 0o644
    # Where the file earlyfw replaced was saved, if there was one.
    backup: str | None = None


@dataclass
class Manifest:
    entries: dict[str, Entry] = field(default_factory=dict)
    # Directories install created, deepest last; uninstall removes them if empty.
    directories: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, root: Root) -> Manifest:
        try:
            raw = json.loads(root.read_bytes(MANIFEST))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as e:
            raise EarlyfwError(
                f"{root / MANIFEST}: unreadable manifest: {e}",
                hint="restore it from a backup, or remove earlyfw's files by hand (see README, Uninstall)",
            ) from None
        return cls(
            entries={e["path"]: Entry(**e) for e in raw.get("entries", [])},
            directories=list(raw.get("directories", [])),
            targets=list(raw.get("targets", [])),
        )

    def save_to(self, txn: Transaction) -> None:
        txn.write(MANIFEST, self.dump(), mode=0o600)

    def dump(self) -> bytes:
        data = {
            "entries": [asdict(e) for e in sorted(self.entries.values(), key=lambda e: e.path)],
            "directories": self.directories,
            "targets": self.targets,
        }
        return (json.dumps(data, indent=2) + "\n").encode()

    def owns(self, root: Root, system_path: str) -> bool:
        """True if `system_path` is still exactly what earlyfw wrote there."""
        entry = self.entries.get(system_path)
        if entry is None:
            return False
        target = root / system_path
        if entry.link is not None:
            return target.is_symlink() and os.readlink(target) == entry.link
        try:
            return not target.is_symlink() and sha256(target.read_bytes()) == entry.sha256
        except FileNotFoundError:
            return False


def describe_mode(path: Path) -> str:
    st = path.lstat()
    return f"{stat.filemode(st.st_mode)} {st.st_uid}:{st.st_gid}"


class Transaction:
    """Groups writes and removals under a Root so that a failure part-way
    restores every touched path exactly (content, mode, owner) as it was."""

    UNDO_SUFFIX = ".earlyfw-undo"

    def __init__(self, root: Root) -> None:
        self.root = root
        self._undo: list[tuple[str, Path | None]] = []
        self._touched: set[str] = set()
        # Directories this transaction created, parents first.
        self.created_directories: list[str] = []

    def _save(self, system_path: str) -> None:
        if system_path in self._touched:
            return
        self._touched.add(system_path)
        target = self.root / system_path
        if not os.path.lexists(target):
            self._undo.append((system_path, None))
            return
        saved = target.with_name(target.name + self.UNDO_SUFFIX)
        if target.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                saved.unlink()
            saved.symlink_to(os.readlink(target))
        else:
            shutil.copy2(target, saved, follow_symlinks=False)
            if hasattr(os, "chown"):  # not on Windows
                st = target.lstat()
                os.chown(saved, st.st_uid, st.st_gid)
        self._undo.append((system_path, saved))

    def write(self, system_path: str, data: bytes, *, mode: int, uid: int = 0, gid: int = 0) -> None:
        self._save(system_path)
        self.root.write(system_path, data, mode=mode, uid=uid, gid=gid)

    def symlink(self, system_path: str, link_target: str) -> None:
        self._save(system_path)
        self.root.symlink(system_path, link_target)

    def remove(self, system_path: str) -> None:
        self._save(system_path)
        self.root.remove(system_path)

    def commit(self) -> None:
        for _, saved in self._undo:
            if saved is not None:
                saved.unlink()
        self._undo.clear()

    def rollback(self) -> None:
        for system_path, saved in reversed(self._undo):
            if saved is None:
                self.root.remove(system_path)
            else:
                os.replace(saved, self.root / system_path)
        self._undo.clear()
        for directory in reversed(self.created_directories):
            self.root.rmdir_if_empty(directory)
        self.created_directories.clear()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.rollback()
