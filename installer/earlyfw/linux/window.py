"""A captive-portal window as ruleset state, and the watcher's side of it.

A window (`earlyfw portal`, earlyfw.linux.portal) is set elements keyed by
one command's cgroup, added with a kernel timeout to earlyfw's table and,
while `earlyfw watch` runs, to its guard table, which only the watcher may
change: so the watcher takes the requests (SIGUSR1, and a root-owned file
beside its verdict). Every state change replaces the sets empty, which
closes the window; the watcher says in the journal when and why it closed.
Kept apart from the command, which needs much more, so the watcher loads
only this.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from earlyfw.config import Config, IPAddress, parse_address
from earlyfw.errors import ConfigError, EarlyfwError
from earlyfw.policy import PORTAL_MAX_MINUTES, PORTAL_MIN_SECONDS, PORTAL_PORTS, State

# The cgroup v2 directory holding the windows, at the root of the tree:
# a window's cgroup is PARENT/wHEX, level PORTAL_LEVEL.
PARENT = "earlyfw-portal"
# What an nft cgroup path may be: the cgroup tree's mount relative to
# /sys/fs/cgroup (where nft reads cgroup paths), the parent, the window.
# Nothing else is ever put into nft or accepted from a request.
_CGROUP = re.compile(rf"(?:[a-z0-9_-]{{1,32}}/)?{PARENT}/w[0-9a-f]{{12}}")
SETS = ("portal_web", "portal_dns_v4", "portal_dns_v6")
REQUEST_NAME = "portal-{interface}.json"
# Why `earlyfw portal` closes its window (a request's "why").
CLOSE_WHY = {"exited": "its command exited", "stopped": "earlyfw portal was stopped"}

Log = Callable[[str], None]


# --- the window as ruleset state -------------------------------------------------------


@dataclass(frozen=True)
class Window:
    cgroup: str  # as nft reads it: relative to /sys/fs/cgroup
    seconds: int
    resolvers: tuple[IPAddress, ...]

    def __post_init__(self) -> None:
        if not _CGROUP.fullmatch(self.cgroup):
            raise ConfigError(f"portal: {self.cgroup!r} is not an earlyfw portal cgroup")
        if not PORTAL_MIN_SECONDS <= self.seconds <= PORTAL_MAX_MINUTES * 60:
            raise ConfigError(
                f"portal: {self.seconds} s is outside {PORTAL_MIN_SECONDS}-{int(PORTAL_MAX_MINUTES * 60)} s"
            )

    def describe(self) -> str:
        resolvers = ", ".join(map(str, self.resolvers)) or "none"
        return f"cgroup {self.cgroup}, {self.seconds} s, web ports {'/'.join(map(str, PORTAL_PORTS))}, DNS {resolvers}"

    def to_json(self) -> dict[str, Any]:
        return {"cgroup": self.cgroup, "seconds": self.seconds, "resolvers": [str(a) for a in self.resolvers]}

    @classmethod
    def from_json(cls, data: object) -> Window:
        """A window read from a file: every field checked as the config is."""
        if not isinstance(data, dict) or set(data) != {"cgroup", "seconds", "resolvers"}:
            raise ConfigError("portal: a window needs exactly cgroup, seconds and resolvers")
        cgroup, seconds, resolvers = data["cgroup"], data["seconds"], data["resolvers"]
        if not isinstance(cgroup, str) or isinstance(seconds, bool) or not isinstance(seconds, int):
            raise ConfigError("portal: cgroup must be a string and seconds an integer")
        if not isinstance(resolvers, list):
            raise ConfigError("portal: resolvers must be a list")
        return cls(cgroup, seconds, tuple(parse_address(f"portal.resolvers[{i}]", a) for i, a in enumerate(resolvers)))

    def open_script(self, tables: Iterable[tuple[str, str]]) -> str:
        """The elements that are the window, in every table given (inet:
        keyed by the cgroup; netdev egress: the ports and resolvers), each with
        the window's kernel timeout. One transaction."""
        timeout = f"timeout {self.seconds}s"
        lines = []
        for family, table in tables:
            where = f"{family} {table}"
            if family == "inet":
                lines.append(f'add element {where} portal_web {{ "{self.cgroup}" {timeout} }}')
                for version in (4, 6):
                    items = [f'"{self.cgroup}" . {a} {timeout}' for a in self.resolvers if a.version == version]
                    if items:
                        lines.append(f"add element {where} portal_dns_v{version} {{ {', '.join(items)} }}")
            else:
                ports = ", ".join(f"{port} {timeout}" for port in PORTAL_PORTS)
                lines.append(f"add element {where} portal_web {{ {ports} }}")
                for version in (4, 6):
                    items = [f"{a} {timeout}" for a in self.resolvers if a.version == version]
                    if items:
                        lines.append(f"add element {where} portal_dns_v{version} {{ {', '.join(items)} }}")
        return "".join(line + "\n" for line in lines)


def close_script(tables: Iterable[tuple[str, str]]) -> str:
    """Empty every window set: one window at a time, so this closes it."""
    return "".join(f"flush set {family} {table} {name}\n" for family, table in tables for name in SETS)


_PORTAL_ELEMENTS = re.compile(r"(\n\tset portal_\w+ \{[^}]*?)\n\t\telements = \{[^}]*\}")


def without_windows(listing: str | None) -> str | None:
    """A table listing with the window sets' elements taken out: they come
    and go with windows and are not part of the state the table claims."""
    return None if listing is None else _PORTAL_ELEMENTS.sub(r"\1", listing)


def open_in(listing: str, cgroup: str | None = None) -> bool:
    """Whether a listing of earlyfw's inet table holds a window (`cgroup`'s)."""
    for match in re.finditer(r"set portal_web \{[^}]*?elements = \{([^}]*)\}", listing):
        if cgroup is None or f'"{cgroup}"' in match[1]:
            return True
    return False


# An element of portal_web as a plain listing shows it: the kernel's own account
# of the window (`-s` listings leave out the expiry).
_LISTED_ELEMENT = re.compile(r'("[^"]*"|\S+) timeout (\w+) expires (\w+)')
_DURATION_PART = re.compile(r"(\d+)(ms|d|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """An nft time (`4m59s988ms`) in seconds."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not an nft duration: {text!r}")
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)


def listed_window(listing: str, *, now: float) -> dict[str, Any] | None:
    """The open window in a plain listing of the portal_web set (inet: keyed
    by cgroup): its cgroup, length, seconds left and when it closes (wall
    clock); None when none is open. What `earlyfw status` shows, read from
    the kernel, so it holds also when no earlyfw process knows of the window."""
    sets = re.finditer(r"elements = \{([^}]*)\}", listing)
    elements = [e for s in sets for e in _LISTED_ELEMENT.finditer(s[1])]
    if not elements:
        return None
    cgroup, timeout, expires = max(elements, key=lambda e: duration(e[3])).groups()
    remaining = duration(expires)
    return {
        "cgroup": cgroup.strip('"'),
        "seconds": round(duration(timeout)),
        "remaining_seconds": round(remaining, 1),
        "closes_at": round(now + remaining, 1),
    }


# --- the watcher's side -----------------------------------------------------------------------


@dataclass(frozen=True)
class Opened:
    window: Window
    until: float  # monotonic
    until_wall: float
    changes: int  # the ruleset's change count when it opened: any later change closed it


class WatcherPortal:
    """Takes `earlyfw portal`'s requests in the watcher, holds what it opened
    and says in the journal when the window closed, however it closed."""

    def __init__(self, interface: str, directory: Path | None, log: Log) -> None:
        self.path = None if directory is None else directory / REQUEST_NAME.format(interface=interface)
        self.log = log
        self.opened: Opened | None = None
        self.answer: dict[str, Any] | None = None

    def published(self) -> dict[str, Any]:
        opened = self.opened
        return {
            "answer": self.answer,
            "open": None if opened is None else {**opened.window.to_json(), "until": opened.until_wall},
        }

    def due(self) -> float | None:
        return None if self.opened is None else self.opened.until

    def handle(self, ruleset: PortalRuleset, state: State, config: Config, *, wall: float, now: float) -> None:
        token: object = None
        try:
            request = self._read()
            token = request.get("id")
            action = request.get("action")
            if action == "open":
                self._open(request, ruleset, state, config, wall=wall, now=now)
            elif action == "close":
                self._close(request, ruleset)
            else:
                raise ConfigError(f"portal: unknown action {action!r}")
        except EarlyfwError as e:
            self.answer = {"id": token, "ok": False, "error": str(e), "at": wall}
            self.log(f"portal: refused: {e}")
            return
        self.answer = {"id": token, "ok": True, "error": None, "at": wall}

    def _read(self) -> dict[str, Any]:
        """The request, from a root-owned regular file only writable by root."""
        if self.path is None:
            raise EarlyfwError("portal: this watcher takes no requests")
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise EarlyfwError(f"portal: no request to read ({e.strerror})") from None
        with os.fdopen(fd) as f:
            st = os.fstat(f.fileno())
            if st.st_uid != 0 or st.st_mode & 0o022 or not os.path.isfile(self.path):
                raise EarlyfwError(f"portal: {self.path} is not a root-owned file only root can write")
            text = f.read(65536)
        with contextlib.suppress(OSError):
            self.path.unlink()
        try:
            request = json.loads(text)
        except ValueError:
            raise EarlyfwError("portal: the request is not JSON") from None
        if not isinstance(request, dict):
            raise EarlyfwError("portal: the request is not a JSON object")
        return request

    def _open(
        self, request: dict[str, Any], ruleset: PortalRuleset, state: State, config: Config, *, wall: float, now: float
    ) -> None:
        window = Window.from_json(request.get("window"))
        if not config.portal_allow:
            raise EarlyfwError("[portal] allow is not set in the config this watcher enforces")
        if not state.holds_portal:
            raise EarlyfwError(f"earlyfw is {state}: a window opens only while blocked")
        if self.opened is not None:
            raise EarlyfwError(f"a window is open already ({self.opened.window.cgroup})")
        ruleset.run_portal(window.open_script(ruleset.portal_tables()))
        self.opened = Opened(window, now + window.seconds, wall + window.seconds, ruleset.changes)
        self.log(f"portal: opened for pid {request.get('pid')}: {window.describe()}")

    def _close(self, request: dict[str, Any], ruleset: PortalRuleset) -> None:
        why = CLOSE_WHY.get(str(request.get("why", "exited")), CLOSE_WHY["exited"])
        if self.opened is None or self.opened.window.cgroup != request.get("cgroup"):
            return  # closed already: timed out, or the ruleset changed
        ruleset.run_portal(close_script(ruleset.portal_tables()))
        self.log(f"portal: closed ({why}): {self.opened.window.cgroup}")
        self.opened = None

    def tick(self, ruleset: PortalRuleset, state: State, now: float) -> bool:
        """Say so when the window closed by itself; True if it did."""
        opened = self.opened
        if opened is None:
            return False
        if ruleset.changes != opened.changes:
            self.log(f"portal: closed (the ruleset was replaced, now {state}): {opened.window.cgroup}")
        elif now >= opened.until:
            self.log(f"portal: closed (timed out after {opened.window.seconds} s): {opened.window.cgroup}")
        else:
            return False
        self.opened = None
        return True


class PortalRuleset(Protocol):
    """What the watcher's Ruleset offers WatcherPortal (earlyfw.linux.watcher.ruleset)."""

    @property
    def changes(self) -> int:
        """How many times it has put a state in place: each change empties the window sets."""

    def portal_tables(self) -> list[tuple[str, str]]:
        """The loaded tables that hold window sets (the guards too)."""

    def run_portal(self, script: str) -> None:
        """Run a window's elements script against them."""
