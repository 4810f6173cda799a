"""Targets: one per system earlyfw installs into (the core files, dracut,
initramfs-tools, mkinitcpio, systemd, Windows, macOS), each in its system's room.

Each target has a pure `plan` that renders everything it would write, from the
config alone, and an `apply` that writes the plan through a Transaction and, on
a live host only, runs its commands through the Runner. Subclasses register
themselves by name when their module (TARGET_MODULES) is imported.
"""

from __future__ import annotations

import functools
import importlib
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import ClassVar

from earlyfw.config import Config, TunnelKind
from earlyfw.root import Root, Transaction
from earlyfw.run import Runner
from earlyfw.system import System


@dataclass(frozen=True)
class File:
    path: str
    content: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str


Artifact = File | Symlink


@dataclass(frozen=True)
class Plan:
    target: str
    artifacts: tuple[Artifact, ...] = ()
    # For image builds (--root): what the pipeline still has to run itself.
    image_notes: tuple[str, ...] = field(default=())

    def paths(self) -> list[str]:
        return [a.path for a in self.artifacts]


class Target(ABC):
    name: ClassVar[str]
    # The system this target installs for: on a live host only the host's
    # system's targets are chosen (earlyfw.install.select).
    system: ClassVar[System]
    # Lower runs first; the core files come before anything that reads them.
    order: ClassVar[int] = 50
    registry: ClassVar[dict[str, type[Target]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            Target.registry[cls.name] = cls

    def __init__(self, root: Root, runner: Runner) -> None:
        self.root = root
        self.runner = runner

    @classmethod
    @abstractmethod
    def detect(cls, root: Root) -> bool:
        """True if this target belongs on the system under `root`."""

    @abstractmethod
    def plan(self, config: Config) -> Plan:
        """Everything this target would write. Pure: reads nothing but config."""

    def apply(self, plan: Plan, txn: Transaction) -> None:
        """Write the plan. Subclasses that act on a live host (reload a daemon,
        rebuild an initramfs) extend this and check `self.root.is_host`."""
        write_artifacts(plan.artifacts, txn)

    def after_install(self, config: Config) -> None:
        """Runs once every target's files are in place (host installs only)."""

    # Targets whose files this one's need (chosen with it, also under --target).
    requires: ClassVar[tuple[str, ...]] = ()
    # Files of the image that `plan` copies (macOS: wg). To list every path a
    # plan can write, installable_paths plans against empty stand-ins for them.
    reads: ClassVar[tuple[str, ...]] = ()

    def before_uninstall(self) -> None:
        """Runs before any file is removed (host installs only): what undoes
        kernel state goes here, so a failure leaves the files (manifest,
        break-glass script) for a second uninstall."""

    def after_uninstall(self) -> None:
        """Runs once every target's files are gone (host installs only)."""

    def uninstall_steps(self) -> list[tuple[str, Callable[[], object]]]:
        """The after-uninstall steps, each run even if one before it failed."""
        return [(f"{self.name}: after uninstall", self.after_uninstall)]

    def in_root_commands(self) -> tuple[tuple[str, ...], ...]:
        """What an image pipeline must run inside the root (chroot) after this
        target's files were written or removed there, such as an initramfs
        rebuild; `--rebuild-initramfs` runs them."""
        return ()

    def in_root_inputs(self, plan: Plan) -> tuple[str, ...]:
        """The files what in_root_commands builds carries (an initramfs's
        contents): only a change to one of them needs it run again."""
        return tuple(plan.paths()) if self.in_root_commands() else ()


def write_artifacts(artifacts: Iterable[Artifact], txn: Transaction) -> None:
    created: list[str] = []
    for artifact in artifacts:
        parent = artifact.path.rsplit("/", 1)[0] or "/"
        txn.root.makedirs(parent, created)
        if isinstance(artifact, File):
            txn.write(artifact.path, artifact.content, mode=artifact.mode)
        else:
            txn.symlink(artifact.path, artifact.target)
    txn.created_directories.extend(created)


# The modules that define targets, one room per system beside the shared core.
TARGET_MODULES = (
    "earlyfw.linux.core",
    "earlyfw.linux.dracut",
    "earlyfw.linux.initramfs_tools",
    "earlyfw.linux.mkinitcpio",
    "earlyfw.linux.systemd",
    "earlyfw.linux.watcher_unit",
    "earlyfw.linux.refresh_timer",
    "earlyfw.windows.target",
    "earlyfw.macos.target",
)


def load_all() -> dict[str, type[Target]]:
    """Import every target module so each target registers itself."""
    for module in TARGET_MODULES:
        importlib.import_module(module)
    return dict(sorted(Target.registry.items(), key=lambda kv: (kv[1].order, kv[0])))


def sample_configs() -> list[Config]:
    """One config per tunnel kind (utun0: a name every system accepts): between
    them they take every branch a
    plan has, so their plans name every path earlyfw can install."""
    return [
        Config.from_dict(
            {
                "tunnel": {"kind": kind.value, "interface": "utun0"},
                "endpoint": [{"address": "192.0.2.1", "port": 1194, "protocol": "udp"}],
                # Optional files are written only when their section is set.
                "egress": {"interfaces": ["eth0"]},
            }
        )
        for kind in TunnelKind
    ]


@functools.cache
def installable_paths() -> frozenset[str]:
    """Every path any target's plan can write: what a manifest read back from
    an image may name (one source, the plans themselves, not a second list)."""
    paths: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="earlyfw-plans-") as empty:
        root = Root(Path(empty))
        for cls in load_all().values():
            for source in cls.reads[:1]:
                root.makedirs(str(PurePosixPath(source).parent))
                root.write(source, b"", mode=0o755)
            target = cls(root, Runner(verbose=False))
            for config in sample_configs():
                paths.update(target.plan(config).paths())
    return frozenset(paths)
