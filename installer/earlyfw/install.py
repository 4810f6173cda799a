"""install / uninstall: every target's plan written in one Transaction, with a
manifest so uninstall removes exactly what install wrote."""

from __future__ import annotations

import os
import shlex
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from earlyfw import nft
from earlyfw.config import Config
from earlyfw.errors import EarlyfwError
from earlyfw.policy import State
from earlyfw.root import BACKUP_DIR, MANIFEST, Entry, Manifest, Root, Transaction, sha256
from earlyfw.run import Runner
from earlyfw.targets import Artifact, File, Plan, System, Target, linux, load_all


@dataclass
class Report:
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    kept_modified: list[str] = field(default_factory=list)
    image_notes: list[str] = field(default_factory=list)


def select(root: Root, names: Sequence[str] = ()) -> list[type[Target]]:
    """The core target plus the named ones, or plus every one detected."""
    registry = load_all()
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise EarlyfwError(f"--target {unknown[0]!r}: unknown target", hint=f"known targets: {', '.join(registry)}")
    chosen = [cls for name, cls in registry.items() if name == "core" or name in names]
    if not names:
        chosen = [cls for cls in registry.values() if cls.detect(root)]
    if root.is_host and sys.platform == "win32":  # Linux's files mean nothing to a live Windows
        chosen = [cls for cls in chosen if cls.system is System.WINDOWS]
    return chosen


def plan(config: Config, targets: Sequence[Target]) -> list[Plan]:
    plans = [t.plan(config) for t in targets]
    owners: dict[str, str] = {}
    for p in plans:
        for path in p.paths():
            if path in owners:
                raise EarlyfwError(f"{path}: planned by both {owners[path]} and {p.target}")
            owners[path] = p.target
    return plans


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
    old = Manifest.load(root)
    new = Manifest(directories=list(old.directories), targets=[t.name for t in targets])
    report = Report()
    with Transaction(root) as txn:
        for target, p in zip(targets, plans, strict=True):
            for artifact in p.artifacts:
                new.entries[artifact.path] = _entry_for(root, old, artifact, txn)
            target.apply(p, txn)
            report.written += p.paths()
            report.image_notes += p.image_notes
        for stale in sorted(set(old.entries) - set(new.entries)):
            _remove_entry(root, old, old.entries[stale], txn, report)
        root.makedirs(os.path.dirname(MANIFEST), txn.created_directories)
        new.directories += [d for d in txn.created_directories if d not in new.directories]
        new.save_to(txn)
    if root.is_host:
        _finish_host(runner, targets, lambda t: t.after_install(config), trigger=initramfs_trigger)
        if now:
            nft.put_state(runner, config, State.BLOCKED)
    else:
        _finish_image(root, runner, targets, report, run=rebuild_initramfs)
    return report


def _finish_host(runner: Runner, targets: Sequence[Target], finish: Callable[[Target], None], *, trigger: bool) -> None:
    """Each target's step on the live system once the files are in or out. With
    `trigger` (a Debian package's maintainer script) no generator runs here:
    its dpkg trigger is activated and dpkg rebuilds the initramfs once, at the
    end of the run, as Debian's policy for initramfs hooks has it."""
    deferred = False
    for target in targets:
        if trigger and target.in_root_commands():
            deferred = True
        else:
            finish(target)
    if deferred:
        runner.run(["dpkg-trigger", "--no-await", linux.INITRAMFS_TRIGGER])


def _finish_image(root: Root, runner: Runner, targets: Sequence[Target], report: Report, *, run: bool) -> None:
    """What must run inside an image once earlyfw's files are in or out of it
    (an initramfs rebuild): run it there with chroot, or tell the pipeline."""
    for target in targets:
        for command in target.in_root_commands():
            argv = ["chroot", os.path.abspath(root.path), *command]
            if run:
                runner.run(argv, stream=True)
            else:
                report.image_notes.append(shlex.join(argv))


def _entry_for(root: Root, old: Manifest, artifact: Artifact, txn: Transaction) -> Entry:
    """The manifest entry for an artifact about to be written, backing up any
    file of someone else's that it replaces."""
    previous = old.entries.get(artifact.path)
    backup = previous.backup if previous else None
    target = root / artifact.path
    if backup is None and os.path.lexists(target) and not old.owns(root, artifact.path):
        backup = BACKUP_DIR + artifact.path
        root.makedirs(os.path.dirname(backup), txn.created_directories)
        if target.is_symlink():
            txn.symlink(backup, os.readlink(target))
        else:
            st = target.lstat()
            txn.write(backup, target.read_bytes(), mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
    if isinstance(artifact, File):
        return Entry(artifact.path, sha256=sha256(artifact.content), mode=artifact.mode, backup=backup)
    return Entry(artifact.path, link=artifact.target, backup=backup)


def _remove_entry(root: Root, manifest: Manifest, entry: Entry, txn: Transaction, report: Report) -> None:
    if manifest.owns(root, entry.path):
        txn.remove(entry.path)
        report.removed.append(entry.path)
    elif os.path.lexists(root / entry.path):
        report.kept_modified.append(entry.path)
        print(f"earlyfw: warning: {root / entry.path} was changed since install; left in place", file=sys.stderr)
    if entry.backup is not None and os.path.lexists(root / entry.backup):
        saved = root / entry.backup
        if saved.is_symlink():
            txn.symlink(entry.path, os.readlink(saved))
        else:
            st = saved.lstat()
            txn.write(entry.path, saved.read_bytes(), mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
        txn.remove(entry.backup)
        report.restored.append(entry.path)


def uninstall(
    root: Root, runner: Runner, *, rebuild_initramfs: bool = False, initramfs_trigger: bool = False
) -> Report:
    manifest = Manifest.load(root)
    report = Report()
    if not manifest.entries and not root.exists(MANIFEST):
        raise EarlyfwError(f"earlyfw is not installed under {root.path} (no {MANIFEST})")
    registry = load_all()
    with Transaction(root) as txn:
        for entry in sorted(manifest.entries.values(), key=lambda e: e.path):
            _remove_entry(root, manifest, entry, txn, report)
        txn.remove(MANIFEST)
    for directory in sorted(manifest.directories, key=len, reverse=True):
        root.rmdir_if_empty(directory)
    targets = [registry[name](root, runner) for name in manifest.targets if name in registry]
    if root.is_host:
        _finish_host(runner, targets, lambda t: t.after_uninstall(), trigger=initramfs_trigger)
    else:
        _finish_image(root, runner, targets, report, run=rebuild_initramfs)
    return report
