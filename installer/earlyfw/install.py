"""install / uninstall: every target's plan written under one lock, with a
manifest written *before* anything changes, so that a kill at any point can be
finished by running `install` again or undone by `uninstall`.

Install: render every plan; take the root's lock; read the manifest (the
journal of the last run, finished or not) and clear what a killed run left
(temporary and undo siblings, a half-built state directory); write the new
journal (old and new entries, the backups about to be taken, the directories
about to be created); then make the changes in a Transaction (an exception
rolls them back and restores the old journal); then write the final manifest.
Uninstall: remove or put back each entry (each step is idempotent), keep the
manifest until every after-step (table deletion, watcher stop, initramfs
rebuild) has run, and report every one that failed: running it again finishes
what is left.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shlex
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from earlyfw.config import Config
from earlyfw.errors import EarlyfwError
from earlyfw.linux import boot
from earlyfw.manifest import Entry, Manifest, Saved, backup_path, check_backups
from earlyfw.policy import State
from earlyfw.root import MANIFEST, NEW_SUFFIX, STATE_DIR, UNDO_SUFFIX, Root, Transaction, copy, fingerprint, sha256
from earlyfw.run import Runner
from earlyfw.system import System
from earlyfw.targets import Artifact, File, Plan, Target, load_all

# Where uninstall leaves the file earlyfw replaced when the user changed
# earlyfw's version of it: beside their version, which it keeps.
KEPT_SUFFIX = ".pre-earlyfw"
LEFTOVER_SUFFIXES = (NEW_SUFFIX, UNDO_SUFFIX, UNDO_SUFFIX + NEW_SUFFIX)
STATE_CHAIN = [str(p) for p in reversed(PurePosixPath(STATE_DIR).parents) if str(p) != "/"] + [STATE_DIR]
AGAIN_HINT = "fix the cause and run `earlyfw uninstall` again: it finishes what is left"


@dataclass
class Report:
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    kept_modified: list[str] = field(default_factory=list)
    # (path kept, where the file earlyfw had replaced now is)
    kept_backups: list[tuple[str, str]] = field(default_factory=list)
    image_notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    # Of `written`, those whose content (or kind) is not what was there before.
    changed: list[str] = field(default_factory=list)


def _registry(names: Sequence[str]) -> dict[str, type[Target]]:
    registry = load_all()
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise EarlyfwError(f"--target {unknown[0]!r}: unknown target", hint=f"known targets: {', '.join(registry)}")
    return registry


def system_of(root: Root, names: Sequence[str] = ()) -> System:
    """The system an install is for: the live host's; for an image, the one its
    named targets are for, or the one its detected targets are (the core
    target, always there, says nothing), Linux when none is."""
    if root.is_host:
        return System.current()
    registry = _registry(names)
    if names:
        systems = {registry[n].system for n in names}
        what = f"--target {', '.join(names)}: targets of"
    else:
        systems = {cls.system for name, cls in registry.items() if name != "core" and cls.detect(root)}
        what = f"{root.path}: detected targets of"
    if len(systems) > 1:
        raise EarlyfwError(
            f"{what} {' and '.join(sorted(s.label for s in systems))} at once; an image is of one system",
            hint="name the image's own targets with --target",
        )
    return systems.pop() if systems else System.LINUX


def select(root: Root, names: Sequence[str] = ()) -> list[type[Target]]:
    """The named targets, or every one detected, with the ones they require,
    of the install's system only; the core target with every Linux install."""
    registry = _registry(names)
    system = system_of(root, names)
    foreign = [registry[n] for n in names if registry[n].system is not system]
    if foreign:  # only on a live host: an image takes its system from the names
        other = foreign[0].system
        raise EarlyfwError(
            f"--target {foreign[0].name}: that target installs on {other.label}, and this is not {other.label}",
            hint=f"to prepare a {other.label} image's files from here: "
            f"earlyfw install --target {foreign[0].name} --root DIR",
        )
    chosen = [cls for name, cls in registry.items() if name == "core" or name in names]
    if not names:
        chosen = [cls for cls in registry.values() if cls.detect(root)]
    needed = {r for cls in chosen for r in cls.requires}
    return [cls for cls in registry.values() if (cls in chosen or cls.name in needed) and cls.system is system]


def plan(config: Config, targets: Sequence[Target]) -> list[Plan]:
    plans = [t.plan(config) for t in targets]
    owners: dict[str, str] = {}
    for p in plans:
        for path in p.paths():
            if path in owners:
                raise EarlyfwError(f"{path}: planned by both {owners[path]} and {p.target}")
            owners[path] = p.target
    return plans


def _differs(root: Root, artifact: Artifact) -> bool:
    """Whether writing `artifact` changes what is at its path (content, kind or mode)."""
    if fingerprint(root, artifact.path) != _fingerprint_of(artifact):
        return True
    st = root.lstat(artifact.path)
    return isinstance(artifact, File) and st is not None and stat.S_IMODE(st.st_mode) != artifact.mode


def _fingerprint_of(artifact: Artifact) -> str:
    if isinstance(artifact, File):
        return "sha256:" + sha256(artifact.content)
    return "link:" + artifact.target


def install(
    config: Config,
    root: Root,
    runner: Runner,
    target_names: Sequence[str] = (),
    *,
    now: bool = False,
    rebuild_initramfs: bool = False,
    initramfs_trigger: bool = False,
) -> Report:
    targets = [cls(root, runner) for cls in select(root, target_names)]
    plans = plan(config, targets)  # everything renders before anything is written
    with root.locked():
        report = _install_files(root, targets, plans)
        if root.is_host:
            _finish_host(
                root,
                runner,
                targets,
                plans,
                report,
                finish=lambda t: t.after_install(config),
                trigger=initramfs_trigger,
            )
            if now:
                system = System.current()
                system.platform.put_state(
                    runner, config, State.BLOCKED, root=root, config_path=root / system.config_path
                )
        else:
            _finish_image(root, runner, targets, report, run=rebuild_initramfs)
    return report


def _install_files(root: Root, targets: Sequence[Target], plans: Sequence[Plan]) -> Report:
    old = Manifest.load(root)
    if old is not None:
        check_backups(root, old)
    _recover(root, old)
    previous = old or Manifest()
    entries: dict[str, Entry] = {}
    for p in plans:
        for artifact in p.artifacts:
            entries[artifact.path] = _entry_for(root, previous.entries.get(artifact.path), artifact)
    state_missing = root.missing_directories(STATE_DIR)
    wanted: list[str] = list(state_missing)
    parents = {str(PurePosixPath(path).parent) for e in entries.values() for path in (e.path, *_backup(e))}
    for parent in sorted(parents):
        if parent not in wanted:
            wanted += [d for d in root.missing_directories(parent) if d not in wanted]
    directories = sorted(set(previous.directories) | set(wanted))  # parents before their children
    names = [t.name for t in targets]
    journal = Manifest(
        # Stale entries stay until they are gone: a kill before that leaves them known.
        entries={**previous.entries, **entries},
        directories=directories,
        targets=previous.targets + [n for n in names if n not in previous.targets],
    )
    _write_journal(root, journal, state_missing)
    report = Report()
    report.changed = [a.path for p in plans for a in p.artifacts if _differs(root, a)]
    txn = Transaction(root)
    try:
        with txn:
            for directory in wanted:  # parents first
                if root.lstat(directory) is None:
                    root.mkdir(directory)
                    txn.created_directories.append(directory)
            for entry in entries.values():
                if entry.backup is not None and root.lstat(entry.backup.path) is None:
                    txn.copy(entry.path, entry.backup.path)
            for target, p in zip(targets, plans, strict=True):
                target.apply(p, txn)
                report.written += p.paths()
                report.image_notes += p.image_notes
            for stale in sorted(set(previous.entries) - set(entries)):
                _unwind(root, previous.entries[stale], report, txn)
    except BaseException:
        # Only once every file is as it was may the journal be too; otherwise
        # (a failure while committing or rolling back) it must keep naming them all.
        if txn.rolled_back:
            if old is not None:
                root.write(MANIFEST, old.dump(), mode=0o600)
            else:
                _remove_state(root, directories)
        raise
    # Directories only what is gone needed (a target or file dropped) go too.
    needed = {str(p) for e in entries.values() for path in (e.path, *_backup(e)) for p in PurePosixPath(path).parents}
    needed.update(STATE_CHAIN)
    for directory in sorted(set(directories) - needed, key=len, reverse=True):
        root.rmdir_if_empty(directory)
    final = Manifest(
        entries={path: dataclasses.replace(e, also=()) for path, e in entries.items()},
        directories=[d for d in directories if d in needed or root.exists(d)],
        targets=names,
    )
    root.write(MANIFEST, final.dump(), mode=0o600)
    return report


def _backup(entry: Entry) -> tuple[str, ...]:
    return (entry.backup.path,) if entry.backup is not None else ()


def _entry_for(root: Root, previous: Entry | None, artifact: Artifact) -> Entry:
    """The manifest entry for an artifact about to be written, with the backup
    of whatever of someone else's it replaces."""
    new = _fingerprint_of(artifact)
    mode = artifact.mode if isinstance(artifact, File) else 0o777
    also = tuple(f for f in previous.fingerprints if f != new) if previous else ()
    return Entry(artifact.path, new, mode, _backup_for(root, artifact.path, previous), also)


def _backup_for(root: Root, path: str, previous: Entry | None) -> Saved | None:
    if previous is not None and previous.backup is not None and root.lstat(previous.backup.path) is not None:
        return previous.backup  # taken by an earlier install: the file from before earlyfw
    st = root.lstat(path)
    if st is None:
        return None
    current = fingerprint(root, path)
    if current is None:
        raise EarlyfwError(f"{root.resolve(path)}: neither a file nor a symlink; earlyfw will not replace it")
    if previous is not None and current in previous.fingerprints:
        return None  # earlyfw's own, from an earlier (perhaps killed) install
    if st.st_mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISLNK(st.st_mode):
        raise EarlyfwError(f"{root.resolve(path)}: setuid/setgid file; earlyfw will not replace it")
    mode = stat.S_IMODE(st.st_mode) & ~stat.S_ISVTX if not stat.S_ISLNK(st.st_mode) else 0o777
    return Saved(backup_path(path), current, mode, st.st_uid, st.st_gid)


def _write_journal(root: Root, journal: Manifest, state_missing: Sequence[str]) -> None:
    """Write the journal; when earlyfw's state directory does not exist yet,
    build it aside (`/var.earlyfw-new/...`) and rename it into place, so the
    directories appear only together with the manifest that records them."""
    if not state_missing:
        root.write(MANIFEST, journal.dump(), mode=0o600)
        return
    top = state_missing[0]
    stage = top + NEW_SUFFIX
    root.rmtree(stage)
    root.mkdir(stage)
    for directory in state_missing[1:]:
        root.mkdir(stage + directory[len(top) :])
    root.write(stage + MANIFEST[len(top) :], journal.dump(), mode=0o600)
    root.rename(stage, top)


def _recover(root: Root, manifest: Manifest | None) -> bool:
    """Clear what a killed run left: a state directory built aside, and the
    temporary and undo siblings of every path the journal names. True if a
    staged state directory was found."""
    found = False
    for directory in STATE_CHAIN:
        if root.lstat(directory + NEW_SUFFIX) is not None:
            root.rmtree(directory + NEW_SUFFIX)
            found = True
    for path in sorted(manifest.paths()) if manifest else ():
        for suffix in LEFTOVER_SUFFIXES:
            root.remove(path + suffix)
    return found


def _remove_state(root: Root, directories: Sequence[str]) -> None:
    """Remove the manifest last, with the directories earlyfw created for it:
    the deepest of them that holds nothing else is renamed aside in one step
    and then deleted, so no kill leaves them without the manifest."""
    top, below = None, PurePosixPath(MANIFEST).name
    for directory in reversed(STATE_CHAIN):
        if directory not in directories or set(root.listdir(directory)) != {below}:
            break
        top, below = directory, PurePosixPath(directory).name
    if top is None:
        root.remove(MANIFEST)
        return
    root.rename(top, top + NEW_SUFFIX)
    root.rmtree(top + NEW_SUFFIX)


def _finish_host(
    root: Root,
    runner: Runner,
    targets: Sequence[Target],
    plans: Sequence[Plan],
    report: Report,
    *,
    finish: Callable[[Target], None],
    trigger: bool,
) -> None:
    """Each target's step on the live system once the files are in. The
    initramfs is rebuilt only if a file it carries changed (an upgrade or a
    config change that renders the same hook and ruleset costs no rebuild),
    or a rebuild begun before never finished (INITRAMFS_PENDING). With
    `trigger` (a Debian package's maintainer script) no generator runs here:
    its dpkg trigger is activated and dpkg rebuilds the initramfs once, at the
    end of the run, as Debian's policy for initramfs hooks has it (and runs it
    again if it fails)."""
    changed = set(report.changed)
    # A file dropped from the plan (stale) may have been one the initramfs carried.
    pending = bool(report.removed) or root.exists(boot.INITRAMFS_PENDING)
    deferred = False
    for target, p in zip(targets, plans, strict=True):
        if not target.in_root_commands():
            finish(target)
        elif not (pending or changed.intersection(target.in_root_inputs(p))):
            print(f"earlyfw: {target.name}: the initramfs already carries this hook and ruleset", file=sys.stderr)
        elif trigger:
            deferred = True
        else:
            root.write(boot.INITRAMFS_PENDING, b"", mode=0o600)
            finish(target)
    if deferred:
        runner.run(["dpkg-trigger", "--no-await", boot.INITRAMFS_TRIGGER])
    if root.exists(boot.INITRAMFS_PENDING):  # rebuilt, or dpkg's to do now
        root.remove(boot.INITRAMFS_PENDING)


def _finish_image(root: Root, runner: Runner, targets: Sequence[Target], report: Report, *, run: bool) -> None:
    """What must run inside an image once earlyfw's files are in or out of it
    (an initramfs rebuild): run it there with chroot, or tell the pipeline."""
    for command in _image_commands(root, targets):
        if run:
            runner.run(command, stream=True)
        else:
            report.image_notes.append(shlex.join(command))


def _image_commands(root: Root, targets: Sequence[Target]) -> list[list[str]]:
    return [["chroot", os.path.abspath(root.path), *c] for t in targets for c in t.in_root_commands()]


def _unwind(root: Root, entry: Entry, report: Report, txn: Transaction | None = None) -> None:
    """Take one entry out: remove earlyfw's file and put back the one it
    replaced; keep a file the user changed (and put the replaced one beside
    it). Safe to repeat: a kill part-way is finished by running it again."""
    present = root.lstat(entry.path) is not None
    current = fingerprint(root, entry.path) if present else None
    saved = entry.backup if entry.backup is not None and root.lstat(entry.backup.path) is not None else None
    if present and current in entry.fingerprints:
        if saved is not None:
            _move(root, saved.path, entry.path, txn)
            report.restored.append(entry.path)
        else:
            (txn or root).remove(entry.path)
            report.removed.append(entry.path)
    elif not present:
        if saved is not None:  # the user removed earlyfw's file: theirs comes back
            _move(root, saved.path, entry.path, txn)
            report.restored.append(entry.path)
    elif saved is not None and _is_saved(root, entry.path, saved):
        (txn or root).remove(saved.path)  # never replaced (a kill came first): the original is in place
    else:
        report.kept_modified.append(entry.path)
        where = root.resolve(entry.path)
        if saved is None:
            print(f"earlyfw: warning: {where} was changed since install; left in place", file=sys.stderr)
            return
        beside = _free_name(root, entry.path + KEPT_SUFFIX)
        _move(root, saved.path, beside, txn)
        report.kept_backups.append((entry.path, beside))
        print(
            f"earlyfw: warning: {where} was changed since install; kept your version, "
            f"and the file earlyfw had replaced is beside it: {root.resolve(beside)}",
            file=sys.stderr,
        )


def _is_saved(root: Root, path: str, saved: Saved) -> bool:
    st = root.lstat(path)
    if st is None or fingerprint(root, path) != saved.fingerprint or (st.st_uid, st.st_gid) != (saved.uid, saved.gid):
        return False
    return stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) == saved.mode


def _free_name(root: Root, path: str) -> str:
    candidate, n = path, 0
    while root.lstat(candidate) is not None:
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def _move(root: Root, source: str, destination: str, txn: Transaction | None) -> None:
    if txn is not None:  # an install: undoable copy and removal
        txn.copy(source, destination)
        txn.remove(source)
        return
    try:
        root.rename(source, destination)  # one step: the file is in one place or the other
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        copy(root, source, destination)
        root.remove(source)


def uninstall(
    root: Root, runner: Runner, *, rebuild_initramfs: bool = False, initramfs_trigger: bool = False
) -> Report:
    report = Report()
    with root.locked():
        manifest = Manifest.load(root)
        if manifest is not None:
            check_backups(root, manifest)  # all of it is checked before anything is touched
        if _recover(root, manifest) and manifest is None:
            report.removed.append(STATE_DIR + NEW_SUFFIX)
            return report
        if manifest is None:
            if root.is_host:  # with nothing recorded, "not installed" only once nothing is loaded either
                report.removed = System.current().platform.remove_leftovers(runner)
                if report.removed:
                    return report
            raise EarlyfwError(f"earlyfw is not installed under {root.path} (no {MANIFEST})")
        if root.is_host:
            # Kernel state that needs the files to be undone (Windows: WFP objects, whose break-glass
            # script is one of them) goes first; a failure here leaves every file for a second run.
            for target in _recorded(root, runner, manifest.targets):
                target.before_uninstall()
        for entry in sorted(manifest.entries.values(), key=lambda e: e.path):
            _unwind(root, entry, report)
        # The files are done; what is left is recorded until it is done too.
        remaining = Manifest(directories=manifest.directories, targets=manifest.targets)
        root.write(MANIFEST, remaining.dump(), mode=0o600)
        report.failures = _after_uninstall(
            root, runner, manifest.targets, report, run=rebuild_initramfs, trigger=initramfs_trigger
        )
        if report.failures:
            return report
        if root.exists(boot.INITRAMFS_PENDING):  # the rebuild above did what it waited for
            root.remove(boot.INITRAMFS_PENDING)
        chain = set(STATE_CHAIN)
        for directory in sorted(manifest.directories, key=len, reverse=True):
            if directory not in chain:
                root.rmdir_if_empty(directory)
        _remove_state(root, manifest.directories)
    return report


def _recorded(root: Root, runner: Runner, names: Sequence[str]) -> list[Target]:
    """The manifest's targets whose steps run here: on a live host only the
    host's system's (a Mac's manifest from before the core target was Linux's
    alone lists it, and it has nothing there to undo)."""
    registry = load_all()
    return [
        cls(root, runner)
        for name, cls in registry.items()
        if name in names and (not root.is_host or cls.system.is_current)
    ]


def _after_uninstall(
    root: Root, runner: Runner, names: Sequence[str], report: Report, *, run: bool, trigger: bool
) -> list[str]:
    """Run every after-step, whatever fails before it; say which failed. With
    `trigger` the initramfs is rebuilt by dpkg's trigger (see _finish_host). A
    rebuild left pending by an install is done by this one."""
    targets = _recorded(root, runner, names)
    steps: list[tuple[str, Callable[[], object]]] = []
    if root.is_host:
        rebuilt_by_dpkg = [t for t in targets if trigger and t.in_root_commands()]
        steps = [step for t in targets if t not in rebuilt_by_dpkg for step in t.uninstall_steps()]
        if rebuilt_by_dpkg:
            trigger_argv = ["dpkg-trigger", "--no-await", boot.INITRAMFS_TRIGGER]
            steps.append((shlex.join(trigger_argv), lambda: runner.run(trigger_argv)))
    else:
        for command in _image_commands(root, targets):
            if run:
                steps.append((shlex.join(command), lambda c=command: runner.run(c, stream=True)))  # type: ignore[misc]
            else:
                report.image_notes.append(shlex.join(command))
    failures = []
    for label, step in steps:
        try:
            step()
        except Exception as e:  # every step runs; each failure is reported
            failures.append(f"{label}: {e}")
    return failures
