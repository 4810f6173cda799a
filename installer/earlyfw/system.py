"""The systems earlyfw runs on, each carrying what it does differently.

`System.current()` is the one place that asks which system this is. What
differs between them (where the config lives, how a state is put, shown and
checked, what is left to clean up) is asked of the system's room, the module
`earlyfw.<system>.platform`, through `System.platform`. A room is imported only
when asked: this module stays light, so `earlyfw watch` at boot and `--help`
load no room's firewall code.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    from earlyfw.config import Config
    from earlyfw.policy import State
    from earlyfw.root import Root
    from earlyfw.run import Runner


class Platform(Protocol):
    """What each room (`earlyfw.linux.platform`, `.windows.platform`,
    `.macos.platform`) implements. Anything a system cannot do is refused there
    with one line saying why."""

    def require_admin(self, action: str) -> None:
        """Refuse `action` unless this process may change the firewall."""

    def render(self, config: Config, state: State) -> str:
        """The rules of a state as this system loads them (loads nothing)."""

    def put_state(self, runner: Runner, config: Config, state: State, *, root: Root, config_path: Path) -> None:
        """Put the live firewall in `state`. `root` holds the installed files
        and `config_path` is the config they came from (Windows records a lock
        beside it)."""

    def status(self, runner: Runner, config: Config, *, as_json: bool, textfile: Path | None) -> int:
        """Print the live state; the exit status (3: earlyfw's block is not intact)."""

    def verify(self, runner: Runner, config: Config) -> Iterator[str]:
        """Check every state the config renders, as far as this machine can:
        one line per check passed; the first failure raises."""

    def live_state(self, runner: Runner) -> State | None:
        """The state earlyfw's firewall is in, or None when it is not loaded or
        cannot be read here (no privileges)."""

    def watch(self, runner: Runner, config: Config, source: str) -> int:
        """Run the handshake watcher in the foreground (`earlyfw watch`)."""

    def portal(
        self, runner: Runner, config: Config, command: tuple[str, ...], minutes: float, dns: tuple[str, ...]
    ) -> int:
        """Run `command` in a captive-portal window (`earlyfw portal`)."""

    def refresh_endpoints(self, runner: Runner, config_path: Path) -> None:
        """Re-pin the endpoints' hostnames through the tunnel (`earlyfw endpoints refresh`)."""

    def remove_leftovers(self, runner: Runner) -> list[str]:
        """With no manifest left: remove what earlyfw still has loaded, each
        described; empty when there is nothing (or nothing this system can find)."""


class System(StrEnum):
    LINUX = "linux"
    WINDOWS = "windows"
    MACOS = "macos"

    @classmethod
    def current(cls) -> System:
        """The system this process runs on. Every other Unix is taken for
        Linux, whose tools then say what is missing."""
        if sys.platform == "win32":
            return cls.WINDOWS
        if sys.platform == "darwin":
            return cls.MACOS
        return cls.LINUX

    @property
    def is_current(self) -> bool:
        return self is System.current()

    @property
    def label(self) -> str:
        """The system's name as its users write it, for messages."""
        return {System.LINUX: "Linux", System.WINDOWS: "Windows", System.MACOS: "macOS"}[self]

    @property
    def config_path(self) -> str:
        """Where earlyfw's config lives on this system, from its root: what
        `install` writes, and reads by default inside an image (--root)."""
        if self is System.WINDOWS:
            return "/ProgramData/earlyfw/earlyfw.toml"
        return "/etc/earlyfw/earlyfw.toml"

    def default_config(self) -> Path:
        """The config every command reads without --config, on a live host of this system."""
        if self is System.WINDOWS:
            # /ProgramData is wherever %ProgramData% says on this machine.
            data = os.environ.get("PROGRAMDATA", r"C:\ProgramData")
            return Path(data, *PurePosixPath(self.config_path).parts[2:])
        return Path(self.config_path)

    def file_owner(self) -> tuple[int, int]:
        """Who the files this process creates belong to, as Root.write takes it
        (Windows reports every owner as 0 and has no geteuid)."""
        if self is System.WINDOWS:
            return 0, 0
        return os.geteuid(), os.getegid()

    @property
    def platform(self) -> Platform:
        """This system's room, imported on first use."""
        return cast("Platform", importlib.import_module(f"earlyfw.{self.value}.platform"))


if TYPE_CHECKING:
    # Each room must implement the whole Protocol: mypy checks it here, at no
    # cost when running.
    from earlyfw.linux import platform as _linux
    from earlyfw.macos import platform as _macos
    from earlyfw.windows import platform as _windows

    _ROOMS: tuple[Platform, ...] = (_linux, _macos, _windows)
