"""Every file earlyfw writes goes through a Root, so `--root IMAGE_DIR` and `/`
are the same code path. A Root is a root the way chroot makes one: a system
path ("/etc/earlyfw/...") is resolved component by component inside it, an
absolute symlink in the image means the image's own path, and `..` never climbs
above it (what openat2's RESOLVE_IN_ROOT does, here in a walk of directory
descriptors opened with O_NOFOLLOW). Every change (create, rename, unlink,
mkdir, chown) is made relative to the descriptor of its parent directory, so a
symlink swapped into the image while earlyfw runs cannot redirect it. Writes are
atomic (temporary file, fsync, rename) with exact owner and mode.

Windows has no dir_fd: there the same walk runs on path strings, contained but
not proof against a symlink swapped in concurrently (Windows images are written
from Linux, where the descriptor walk applies).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from earlyfw.errors import EarlyfwError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

STATE_DIR = "/var/lib/earlyfw"
MANIFEST = f"{STATE_DIR}/manifest.json"
BACKUP_DIR = f"{STATE_DIR}/backup"
# Siblings earlyfw creates next to a path while changing it; recovery after a
# kill removes them (see earlyfw.install).
NEW_SUFFIX = ".earlyfw-new"
UNDO_SUFFIX = ".earlyfw-undo"
# As many symlinks as Linux follows in one lookup.
MAX_SYMLINKS = 40

_USE_FD = os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY")
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO planted in an image never blocks an open
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: keep the bytes as given
_O_DIR = getattr(os, "O_DIRECTORY", 0) | os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK
# The root itself is the user's choice (`--root /mnt/image`, perhaps a symlink): followed.
_O_ROOT = _O_DIR & ~_O_NOFOLLOW
SPECIAL_MODE_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX

# A hook called before every change a Root makes, with the operation and the
# system path: tests make it raise to stop an install at any step.
Fault = Callable[[str, str], None]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def system_path(value: str) -> PurePosixPath:
    """`value` as a normalised absolute system path, or ValueError."""
    pure = PurePosixPath(value)
    if not value.startswith("/") or value.startswith("//") or str(pure) != value or ".." in pure.parts or "\0" in value:
        raise ValueError(f"not an absolute system path: {value!r}")
    return pure


class _Dir:
    """An open directory inside a root: a descriptor (POSIX) or a path
    (Windows), and its canonical system path."""

    def __init__(self, fd: int | None, host: str, parts: tuple[str, ...]) -> None:
        self.fd = fd
        self.host = host
        self.parts = parts

    @property
    def system(self) -> str:
        return "/" + "/".join(self.parts)

    def p(self, name: str) -> str:
        return name if self.fd is not None else os.path.join(self.host, name)

    def kw(self) -> dict[str, int]:
        return {"dir_fd": self.fd} if self.fd is not None else {}

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def lstat(self, name: str) -> os.stat_result:
        return os.stat(self.p(name), follow_symlinks=False, **self.kw())

    def lexists(self, name: str) -> bool:
        try:
            self.lstat(name)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def readlink(self, name: str) -> str:
        return os.readlink(self.p(name), **self.kw())

    def child(self, name: str) -> _Dir | str:
        """The subdirectory `name`, or the target of the symlink `name`."""
        if self.fd is not None:
            try:
                fd = os.open(name, _O_DIR, dir_fd=self.fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise
                if stat.S_ISLNK(self.lstat(name).st_mode):
                    return self.readlink(name)
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", self.host + "/" + name) from None
            return _Dir(fd, os.path.join(self.host, name), (*self.parts, name))
        st = self.lstat(name)
        if stat.S_ISLNK(st.st_mode):
            return self.readlink(name)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", self.p(name))
        return _Dir(None, self.p(name), (*self.parts, name))

    def fsync(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)


@dataclass(frozen=True)
class Root:
    path: Path = Path("/")
    fault: Fault | None = field(default=None, compare=False, repr=False)

    @property
    def is_host(self) -> bool:
        # resolve() both: on Windows "/" is the current drive's root, "C:\\".
        return self.path.resolve() == Path("/").resolve()

    def __truediv__(self, system_path: str) -> Path:
        return self.resolve(system_path)

    # -- resolution ---------------------------------------------------------

    def _open_root(self) -> _Dir:
        host = os.path.abspath(self.path)
        if _USE_FD:
            return _Dir(os.open(host, _O_ROOT), host, ())
        return _Dir(None, host, ())

    def _walk(self, parts: tuple[str, ...], *, follow_last: bool, lenient: bool = False) -> tuple[_Dir, str, list[str]]:
        """Resolve `parts` inside the root: the open directory holding the
        last component, that component's name, and (lenient) the components
        left over below the first missing directory."""
        stack = [self._open_root()]
        pending = deque(parts)
        links = 0
        try:
            while True:
                if not pending:
                    return stack.pop(), ".", []
                name = pending.popleft()
                if name in ("", "."):
                    continue
                if name == "..":  # never above the root
                    if len(stack) > 1:
                        stack.pop().close()
                    continue
                current = stack[-1]
                if not pending and not (follow_last and _is_link(current, name)):
                    return stack.pop(), name, []
                try:
                    found = current.child(name)
                except (FileNotFoundError, NotADirectoryError):
                    if not lenient:
                        raise
                    return stack.pop(), name, list(pending)
                if isinstance(found, _Dir):
                    stack.append(found)
                    continue
                links += 1
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, "Too many levels of symbolic links", self._host(parts))
                if found.startswith("/"):  # absolute: from the root, not the host's /
                    while len(stack) > 1:
                        stack.pop().close()
                pending.extendleft(reversed(found.split("/")))
        finally:
            for d in stack:
                d.close()

    @contextlib.contextmanager
    def _at(self, path: str, *, follow_last: bool = False) -> Iterator[tuple[_Dir, str]]:
        """The directory holding `path` (resolved inside the root) and the
        last component's name, not followed unless asked."""
        pure = system_path(path)
        if pure == PurePosixPath("/"):
            raise ValueError("the root itself is not a file")
        directory, name, _ = self._walk(pure.parts[1:], follow_last=follow_last)
        try:
            yield directory, name
        finally:
            directory.close()

    def _host(self, parts: tuple[str, ...]) -> str:
        return os.path.join(os.path.abspath(self.path), *parts)

    def resolve(self, path: str) -> Path:
        """Where `path` is on this machine, resolved inside the root (for
        messages and for tools run on it); missing components are kept as given."""
        pure = system_path(path)
        if pure == PurePosixPath("/"):
            return Path(os.path.abspath(self.path))
        try:
            directory, name, rest = self._walk(pure.parts[1:], follow_last=False, lenient=True)
        except OSError:
            return Path(self._host(pure.parts[1:]))
        try:
            return Path(self._host((*directory.parts, name, *rest)))
        finally:
            directory.close()

    def _step(self, operation: str, path: str) -> None:
        if self.fault is not None:
            self.fault(operation, path)

    # -- reading ------------------------------------------------------------

    def lstat(self, path: str) -> os.stat_result | None:
        """The path's own status (a symlink is not followed), or None."""
        try:
            with self._at(path) as (d, name):
                return d.lstat(name)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def exists(self, path: str) -> bool:
        return self.lstat(path) is not None

    def readlink(self, path: str) -> str:
        with self._at(path) as (d, name):
            return d.readlink(name)

    def read_bytes(self, path: str, *, follow: bool = True) -> bytes:
        """A regular file's content; symlinks are followed inside the root
        unless `follow` is False."""
        with self._at(path, follow_last=follow) as (d, name):
            fd = os.open(d.p(name), os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK | _O_BINARY, **d.kw())
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise IsADirectoryError(errno.EISDIR, "not a regular file", str(self.resolve(path)))
                return f.read()

    def listdir(self, path: str) -> list[str]:
        """The names in a directory (resolved inside the root)."""
        d, name, _ = self._walk(system_path(path).parts[1:], follow_last=True)
        try:
            found = d.child(name) if name != "." else d
            if not isinstance(found, _Dir):
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(self.resolve(path)))
            try:
                return os.listdir(found.fd if found.fd is not None else found.host)
            finally:
                if found is not d:
                    found.close()
        finally:
            d.close()

    def _is_dir_at(self, path: str) -> bool:
        try:
            with self._at(path, follow_last=True) as (d, name):
                return stat.S_ISDIR(d.lstat(name).st_mode)
        except OSError:
            return False

    # -- changing -----------------------------------------------------------

    def makedirs(self, system_dir: str, created: list[str] | None = None) -> None:
        """Create a system directory and its parents (0755, root-owned),
        recording in `created` each one that did not exist before."""
        for directory in self.missing_directories(system_dir):
            self.mkdir(directory)
            if created is not None:
                created.append(directory)

    def missing_directories(self, system_dir: str) -> list[str]:
        """The directories makedirs(system_dir) would create, parents first."""
        pure = system_path(system_dir)
        missing: list[str] = []
        while pure != PurePosixPath("/") and not self._is_dir_at(str(pure)):
            missing.append(str(pure))
            pure = pure.parent
        return list(reversed(missing))

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        with self._at(path) as (d, name):
            self._step("mkdir", path)
            os.mkdir(d.p(name), mode, **d.kw())
            if d.fd is not None:
                fd = os.open(name, _O_DIR, dir_fd=d.fd)
                try:
                    os.fchown(fd, 0, 0)
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
            d.fsync()

    def write(self, path: str, data: bytes, *, mode: int, uid: int = 0, gid: int = 0) -> None:
        """Atomically replace `path`: a reader sees the old or the new
        content, never a torn file, even across a crash."""
        with self._at(path) as (d, name):
            tmp = name + NEW_SUFFIX
            self._step("create", path + NEW_SUFFIX)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d.p(tmp), **d.kw())
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY
            fd = os.open(d.p(tmp), flags, 0o600, **d.kw())
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    if hasattr(os, "fchown"):  # POSIX owners and modes; Windows uses ACLs
                        # Only when it differs: a sandboxed caller (earlyfw-watch.service's
                        # SystemCallFilter) may not chown, not even to itself.
                        st = os.fstat(f.fileno())
                        if (st.st_uid, st.st_gid) != (uid, gid):
                            os.fchown(f.fileno(), uid, gid)
                        os.fchmod(f.fileno(), mode)
                    os.fsync(f.fileno())
                self._step("rename", path)
                _replace(d, tmp, d, name)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(d.p(tmp), **d.kw())
                raise
            d.fsync()

    def symlink(self, path: str, link_target: str, *, uid: int = 0, gid: int = 0) -> None:
        with self._at(path) as (d, name):
            tmp = name + NEW_SUFFIX
            self._step("create", path + NEW_SUFFIX)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d.p(tmp), **d.kw())
            os.symlink(link_target, d.p(tmp), dir_fd=d.fd)
            try:
                if hasattr(os, "fchown"):
                    os.chown(d.p(tmp), uid, gid, follow_symlinks=False, **d.kw())
                self._step("rename", path)
                _replace(d, tmp, d, name)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(d.p(tmp), **d.kw())
                raise
            d.fsync()

    def rename(self, source: str, destination: str) -> None:
        """Move `source` onto `destination` in one step (same filesystem)."""
        with self._at(source) as (sd, sname), self._at(destination) as (dd, dname):
            self._step("rename", destination)
            _replace(sd, sname, dd, dname)
            dd.fsync()
            sd.fsync()

    def remove(self, path: str) -> None:
        """Unlink a file or symlink (never a directory); gone already is fine."""
        try:
            with self._at(path) as (d, name):
                if not d.lexists(name):
                    return
                self._step("unlink", path)
                os.unlink(d.p(name), **d.kw())
                d.fsync()
        except (FileNotFoundError, NotADirectoryError):
            return

    def rmdir_if_empty(self, system_dir: str) -> None:
        try:
            with self._at(system_dir) as (d, name):
                st = d.lexists(name) and d.lstat(name)
                if not st or not stat.S_ISDIR(st.st_mode):
                    return
                self._step("rmdir", system_dir)
                os.rmdir(d.p(name), **d.kw())
                d.fsync()
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.ENOTDIR):
                raise

    def rmtree(self, path: str) -> None:
        """Remove a directory tree earlyfw staged, never following a symlink."""
        with self._at(path) as (d, name):
            st = d.lexists(name) and d.lstat(name)
            if not st:
                return
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(self.resolve(path)))
            self._step("rmtree", path)
            if d.fd is not None:
                shutil.rmtree(name, dir_fd=d.fd)
            else:
                shutil.rmtree(d.p(name))
            d.fsync()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the root's install lock (an flock on its directory, so no
        file is left behind): a second install or uninstall waits for it."""
        if fcntl is None:  # Windows: one elevated installer at a time, by hand
            yield
            return
        fd = os.open(os.path.abspath(self.path), _O_ROOT)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"earlyfw: waiting for another earlyfw install or uninstall in {self.path}", file=sys.stderr)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


def _is_link(d: _Dir, name: str) -> bool:
    try:
        return stat.S_ISLNK(d.lstat(name).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def _replace(sd: _Dir, sname: str, dd: _Dir, dname: str) -> None:
    if sd.fd is not None and dd.fd is not None:
        os.replace(sname, dname, src_dir_fd=sd.fd, dst_dir_fd=dd.fd)
    else:
        os.replace(sd.p(sname), dd.p(dname))


def fingerprint(root: Root, path: str) -> str | None:
    """What is at `path`, as a manifest records it: "sha256:<hex>" for a
    regular file, "link:<target>" for a symlink, None for nothing (or anything else)."""
    st = root.lstat(path)
    if st is None:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "link:" + root.readlink(path)
    if stat.S_ISREG(st.st_mode):
        return "sha256:" + sha256(root.read_bytes(path, follow=False))
    return None


def describe_mode(st: os.stat_result) -> str:
    return f"{stat.filemode(st.st_mode)} {st.st_uid}:{st.st_gid}"


class Transaction:
    """Groups writes and removals under a Root so that a failure part-way
    (an exception) restores every touched path exactly (content, mode, owner)
    as it was. The copies it keeps (`path` + UNDO_SUFFIX) are siblings of
    paths in earlyfw's journal, so recovery after a kill removes them."""

    UNDO_SUFFIX = UNDO_SUFFIX

    def __init__(self, root: Root) -> None:
        self.root = root
        self._undo: list[tuple[str, str | None]] = []
        self._touched: set[str] = set()
        # Directories this transaction created, parents first.
        self.created_directories: list[str] = []
        # True once a rollback has undone every change (not when it failed part-way).
        self.rolled_back = False

    def _save(self, path: str) -> None:
        if path in self._touched:
            return
        self._touched.add(path)
        st = self.root.lstat(path)
        if st is None:
            self._undo.append((path, None))
            return
        saved = path + UNDO_SUFFIX
        copy(self.root, path, saved, st)
        self._undo.append((path, saved))

    def write(self, path: str, data: bytes, *, mode: int, uid: int = 0, gid: int = 0) -> None:
        self._save(path)
        self.root.write(path, data, mode=mode, uid=uid, gid=gid)

    def symlink(self, path: str, link_target: str) -> None:
        self._save(path)
        self.root.symlink(path, link_target)

    def remove(self, path: str) -> None:
        self._save(path)
        self.root.remove(path)

    def copy(self, source: str, destination: str) -> None:
        self._save(destination)
        copy(self.root, source, destination)

    def commit(self) -> None:
        for _, saved in self._undo:
            if saved is not None:
                self.root.remove(saved)
        self._undo.clear()

    def rollback(self) -> None:
        for path, saved in reversed(self._undo):
            if saved is None:
                self.root.remove(path)
            else:
                self.root.rename(saved, path)
        self._undo.clear()
        for directory in reversed(self.created_directories):
            self.root.rmdir_if_empty(directory)
        self.created_directories.clear()
        self.rolled_back = True

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.rollback()


def copy(root: Root, source: str, destination: str, st: os.stat_result | None = None) -> None:
    """Copy a file or symlink inside the root with its exact mode and owner."""
    st = st or root.lstat(source)
    if st is None:
        raise FileNotFoundError(errno.ENOENT, "No such file", str(root.resolve(source)))
    if stat.S_ISLNK(st.st_mode):
        root.symlink(destination, root.readlink(source), uid=st.st_uid, gid=st.st_gid)
    elif stat.S_ISREG(st.st_mode):
        data = root.read_bytes(source, follow=False)
        root.write(destination, data, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
    else:
        raise EarlyfwError(f"{root.resolve(source)}: neither a file nor a symlink; earlyfw will not replace it")
