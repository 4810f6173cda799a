"""Talking to the running kernel's nftables through the `nft` binary, via the
Runner seam. Every change is one `nft -f` transaction."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from earlyfw import firewalls, policy
from earlyfw.config import Config
from earlyfw.errors import CommandError, EarlyfwError
from earlyfw.policy import EGRESS_TABLE, TABLE, State
from earlyfw.run import Runner

NFT = "nft"
# earlyfw watch's owned copies of the two tables (see earlyfw/watch/ruleset.py).
GUARD_TABLE = "earlyfw_guard"
GUARD_EGRESS_TABLE = "earlyfw_egress_guard"
WAKE_TABLE = "earlyfw_wake"


def load(runner: Runner, script: str) -> None:
    runner.run([NFT, "-f", "-"], input=script)


def private_netns() -> list[str]:
    """A network namespace of its own, where nft can touch nothing real: root
    makes one directly, which also works inside a chroot (the kernel refuses a
    new user namespace to a chrooted process); anyone else through a user
    namespace that maps them to root."""
    return ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--map-root-user", "--net"]


def check(runner: Runner, script: str) -> None:
    """`nft -c` needs privileges even to parse, so check in a private network namespace."""
    runner.run([*private_netns(), NFT, "-c", "-f", "-"], input=script)


def canonical(runner: Runner, script: str) -> str:
    """How the kernel lists `script`'s table once loaded, with no counter values:
    the form a live table is compared against to tell whether it is intact."""
    result = runner.run(
        [*private_netns(), "sh", "-c", f'"$0" -f - && "$0" -s list table inet {TABLE}', NFT],
        input=script,
    )
    return result.stdout


def live_table(runner: Runner) -> str | None:
    result = runner.run([NFT, "-s", "list", "table", "inet", TABLE], check=False)
    if result.returncode != 0:
        if "No such file or directory" in result.stderr:
            return None
        raise CommandError(f"nft list table inet {TABLE} failed: {result.stderr.strip()}")
    return result.stdout


def counters(runner: Runner) -> dict[str, tuple[int, int]]:
    result = runner.run([NFT, "-j", "list", "counters", "table", "inet", TABLE], check=False)
    if result.returncode != 0:
        return {}
    found: dict[str, tuple[int, int]] = {}
    for item in json.loads(result.stdout).get("nftables", []):
        counter = item.get("counter")
        if counter and counter.get("table") == TABLE:
            found[counter["name"]] = (int(counter["packets"]), int(counter["bytes"]))
    return found


def present_devices(names: Iterable[str], sys_class_net: Path = Path("/sys/class/net")) -> list[str]:
    """Netdev egress chains must name devices that exist at load time."""
    return [n for n in names if (sys_class_net / n).exists()]


def put_state(runner: Runner, config: Config, state: State) -> None:
    """Replace the live ruleset with `state` in one transaction, carrying the
    refuse counters over, and filtering raw egress on the devices present."""
    script = policy.render(
        config,
        state,
        counters=counters(runner),
        egress_devices=present_devices(config.egress_interfaces),
    )
    load(runner, script)


def delete_tables(runner: Runner) -> None:
    present = runner.run([NFT, "-j", "list", "tables"]).stdout
    names = {
        (t["table"]["family"], t["table"]["name"]) for t in json.loads(present).get("nftables", []) if "table" in t
    }
    script = "".join(
        f"delete table {family} {name}\n"
        for family, name in (("inet", TABLE), ("netdev", EGRESS_TABLE))
        if (family, name) in names
    )
    if script:
        load(runner, script)


@dataclass
class Status:
    present: bool
    state: State | None
    intact: bool
    counters: dict[str, tuple[int, int]]
    endpoints: list[str]
    other_tables: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "present": self.present,
            "state": str(self.state) if self.state else None,
            "intact": self.intact,
            "counters": {
                name: {"packets": p, "bytes": b, "meaning": policy.COUNTERS.get(name, "")}
                for name, (p, b) in sorted(self.counters.items())
            },
            "endpoints": self.endpoints,
            "other_tables": self.other_tables,
            "warnings": self.warnings,
        }


def status(runner: Runner, config: Config) -> Status:
    live = live_table(runner)
    endpoints = [str(e) for e in config.endpoints]
    tables_json = runner.run([NFT, "-j", "list", "tables"]).stdout
    others = sorted(
        f"{t['table']['family']} {t['table']['name']}"
        for t in json.loads(tables_json).get("nftables", [])
        if "table" in t and t["table"]["name"] not in (TABLE, EGRESS_TABLE, GUARD_TABLE, GUARD_EGRESS_TABLE, WAKE_TABLE)
    )
    if live is None:
        return Status(
            False,
            None,
            False,
            {},
            endpoints,
            others,
            ["table inet earlyfw is not loaded: nothing is blocked", *firewalls.warnings(others)],
        )
    state = None
    for candidate in State:
        if canonical(runner, policy.render(config, candidate)) == live:
            state = candidate
            break
    warnings = []
    if state is None:
        warnings.append(
            "table inet earlyfw differs from every state the config renders "
            "(altered, or the config changed since it was loaded): run `earlyfw lock`"
        )
    if others:
        warnings.append(
            "other firewall tables are loaded ("
            + ", ".join(others)
            + "); they cannot open what earlyfw blocks, but a `flush ruleset` from their loader removes earlyfw"
        )
    warnings += firewalls.warnings(others)
    return Status(True, state, state is not None, counters(runner), endpoints, others, warnings)


def require_root_for(action: str) -> None:
    if os.geteuid() != 0:
        raise EarlyfwError(f"{action} needs root (CAP_NET_ADMIN)", hint=f"sudo earlyfw {action}")
