"""Talking to the running kernel's nftables through the `nft` binary, via the
Runner seam. Every change is one `nft -f` transaction.

Tables are read from nft's plain listings, never from a JSON one that prints
table objects (`nft -j list tables`, `nft -j list ruleset`): nft 1.0.6
(Debian 12) prints an owned table's flags in JSON from freed memory, and with
several owned tables loaded (earlyfw watch's guard and wake tables) it aborts
with `corrupted double-linked list`. A JSON counter listing prints no table
object and is safe.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from earlyfw import policy
from earlyfw.config import Config
from earlyfw.errors import CommandError, EarlyfwError
from earlyfw.linux import firewalls, window
from earlyfw.policy import EGRESS_TABLE, TABLE, Counters, State
from earlyfw.run import Runner

NFT = "nft"
# earlyfw watch's owned copies of the two tables (see earlyfw.linux.watcher.ruleset).
GUARD_TABLE = "earlyfw_guard"
GUARD_EGRESS_TABLE = "earlyfw_egress_guard"
GUARD = policy.Tables(GUARD_TABLE, GUARD_EGRESS_TABLE, owned=True)
WAKE_TABLE = "earlyfw_wake"
# (family, table) of the tables the boot path and `earlyfw apply` load.
MAIN_TABLES = (("inet", TABLE), ("netdev", EGRESS_TABLE))
# Every table earlyfw or its watcher creates; a refusal is counted in exactly
# one of them (the first base chain that refuses a packet ends its path).
COUNTING_TABLES = (*MAIN_TABLES, ("inet", GUARD_TABLE), ("netdev", GUARD_EGRESS_TABLE))
OWN_TABLE_NAMES = frozenset({TABLE, EGRESS_TABLE, GUARD_TABLE, GUARD_EGRESS_TABLE, WAKE_TABLE})

_TABLE_LINE = re.compile(r"^table (\S+) (\S+)$")
# A netlink batch must fit the socket's send buffer. Root raises it
# (SO_SNDBUFFORCE); inside an unprivileged user namespace nft cannot, and the
# default (net.core.wmem_default, 208 KiB) holds about 7,000 endpoints. Above
# that a private load is split into batches of this many set elements.
UNPRIVILEGED_ELEMENTS = 2500


def load(runner: Runner, script: str) -> None:
    runner.run([NFT, "-f", "-"], input=script)


def tables(runner: Runner) -> set[tuple[str, str]]:
    """The loaded tables as (family, name), from the plain listing."""
    listing = runner.run([NFT, "list", "tables"]).stdout
    return {(m[1], m[2]) for m in map(_TABLE_LINE.match, listing.splitlines()) if m}


def split_tables(listing: str) -> dict[tuple[str, str], str]:
    """A ruleset listing cut into its tables, each as `nft list table` prints it."""
    found: dict[tuple[str, str], str] = {}
    current: list[str] = []
    for line in listing.splitlines(keepends=True):
        if line.startswith("table "):
            current = [line]
        elif current:
            current.append(line)
        if line.rstrip("\n") == "}" and current:
            match = re.match(r"table (\S+) (\S+) \{", current[0])
            if match:
                found[(match[1], match[2])] = "".join(current)
            current = []
    return found


TableCounters = dict[tuple[str, str], dict[str, tuple[int, int]]]


def parse_counters(listing: str) -> TableCounters:
    """`nft -j list counters` output as {(family, table): {name: (packets,
    bytes)}}: the one parser for the CLI (through `nft`) and the watcher
    (libnftables). One listing for all tables, because nft 1.0.6 fetches
    every set element for any listing but a set's: at 100,000 endpoints each
    listing costs seconds."""
    found: TableCounters = {}
    items: list[dict[str, Any]] = json.loads(listing or "{}").get("nftables", [])
    for item in items:
        counter = item.get("counter")
        if counter:
            table = found.setdefault((counter["family"], counter["table"]), {})
            table[counter["name"]] = (int(counter["packets"]), int(counter["bytes"]))
    return found


def add_counters(*parts: Counters) -> dict[str, tuple[int, int]]:
    total: dict[str, tuple[int, int]] = {}
    for part in parts:
        for name, (packets, size) in part.items():
            before = total.get(name, (0, 0))
            total[name] = (before[0] + packets, before[1] + size)
    return total


def counters(runner: Runner) -> TableCounters:
    return parse_counters(runner.run([NFT, "-j", "list", "counters"]).stdout)


def main_counters(runner: Runner) -> dict[str, tuple[int, int]]:
    """The counters of the tables `apply` replaces, to carry over a change."""
    found = counters(runner)
    return add_counters(*(found.get(key, {}) for key in MAIN_TABLES))


def present_devices(names: Iterable[str], sys_class_net: Path = Path("/sys/class/net")) -> list[str]:
    """Netdev egress chains must name devices that exist at load time."""
    return [n for n in names if (sys_class_net / n).exists()]


def split_elements(script: str, limit: int) -> list[str]:
    """`script` as batches that each carry at most `limit` set elements: the
    script without its multi-line `elements = {` blocks, then `add element`
    batches for what they held. Loaded one after the other they build the
    same tables; only for private loads, where atomicity is moot. Relies on
    policy.render's layout: `table F N {` and `set S {` open their blocks,
    and those element blocks hold one element per line."""
    head: list[str] = []
    elements: list[tuple[str, str]] = []  # ("family table set", element)
    table = name = ""
    inside = False
    for line in script.splitlines(keepends=True):
        text = line.strip()
        if inside:
            if text == "}":
                inside = False
            else:
                elements.append((f"{table} {name}", text))
            continue
        if match := re.fullmatch(r"table (\w+ \w+) \{", text):
            table = match[1]
        elif match := re.fullmatch(r"set (\w+) \{", text):
            name = match[1]
        elif text == "elements = {":
            inside = True
            continue
        head.append(line)
    batches = ["".join(head)]
    for i in range(0, len(elements), limit):
        chunk = elements[i : i + limit]
        sets = dict.fromkeys(where for where, _ in chunk)
        batches.append(
            "".join(
                f"add element {where} {{\n" + "".join(f"\t{e}\n" for w, e in chunk if w == where) + "}\n"
                for where in sets
            )
        )
    return batches


def private_load(
    runner: Runner,
    script: str,
    devices: Sequence[str] = (),
    *,
    list_tables: Sequence[tuple[str, str]] = (),
    user_namespace: bool | None = None,
) -> dict[tuple[str, str], str | None]:
    """Load `script` into a throwaway network namespace (with stand-in devices
    named `devices`, for netdev chains) and return how the kernel lists
    `list_tables` there, without counter values. This is `nft -c` and more:
    the kernel takes the whole ruleset for real, and touches nothing real.

    As root the namespace is a plain one and the script is one batch. Without
    root it is a user namespace, where nft cannot raise its socket's send
    buffer, so a large script is loaded in batches (split_elements).
    `user_namespace` forces the one or the other."""
    unprivileged = os.geteuid() != 0 if user_namespace is None else user_namespace
    batches = split_elements(script, UNPRIVILEGED_ELEMENTS) if unprivileged else [script]
    # Stand-in devices are veth pairs (no module beyond veth); the peers are
    # named "efw+N": '+' is valid in a Linux interface name but refused by the
    # config, so a peer never takes a configured name.
    # Arguments: the devices, "--", the batch files, "--", and "list" to list.
    shell = (
        'set -e; i=0; while [ "$1" != -- ]; do '
        'ip link add name "$1" type veth peer name "efw+$i"; i=$((i+1)); shift; done; '
        'shift; while [ "$1" != -- ]; do nft -f "$1"; shift; done; '
        'shift; if [ "$1" = list ]; then nft -s list ruleset; fi'
    )
    with tempfile.TemporaryDirectory(prefix="earlyfw-nft-") as directory:
        files = []
        for i, batch in enumerate(batches):
            path = Path(directory) / f"{i:06}.nft"
            path.write_text(batch)
            files.append(str(path))
        argv = [
            "unshare",
            *(["--map-root-user"] if unprivileged else []),
            "--net",
            "sh",
            "-c",
            shell,
            "sh",
            *devices,
            "--",
            *files,
            "--",
            *(["list"] if list_tables else []),
        ]
        listed = split_tables(runner.run(argv).stdout)
    return {key: listed.get(key) for key in list_tables}


def check(runner: Runner, config: Config, state: State) -> None:
    """Load `state`, with the egress table on every [egress] interface, where
    it can touch nothing real: `nft -c` itself needs privileges even to parse."""
    devices = config.egress_interfaces
    private_load(runner, policy.render(config, state, egress_devices=devices), devices)


def canonical(
    runner: Runner, config: Config, state: State, devices: Sequence[str], tunnel_port: int | None = None
) -> dict[tuple[str, str], str | None]:
    """How the kernel lists earlyfw's tables with `state` loaded and raw egress
    filtered on `devices` (and the watcher's `tunnel_port` spared), with no
    counter values: the form the live tables are compared against to tell
    whether they are intact."""
    script = policy.render(config, state, egress_devices=devices, tunnel_port=tunnel_port)
    listed = private_load(runner, script, devices, list_tables=MAIN_TABLES)
    return {key: normalise(listing) for key, listing in listed.items()}


def put_state(runner: Runner, config: Config, state: State) -> None:
    """Replace the live ruleset with `state` in one transaction, carrying the
    refuse counters over, and filtering raw egress on the devices present."""
    script = policy.render(
        config,
        state,
        counters=main_counters(runner),
        egress_devices=present_devices(config.egress_interfaces),
    )
    load(runner, script)


def delete_tables(runner: Runner) -> None:
    present = tables(runner)
    script = "".join(f"delete table {family} {name}\n" for family, name in MAIN_TABLES if (family, name) in present)
    if script:
        load(runner, script)


@dataclass(kw_only=True)
class Status:
    present: bool
    state: State | None
    intact: bool
    counters: dict[str, tuple[int, int]]
    endpoints: list[str]
    other_tables: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Where raw-socket egress is filtered (the netdev table's devices).
    egress_devices: list[str] = field(default_factory=list)
    # Whether earlyfw watch's owned guard table is loaded.
    guarded: bool = False
    # The open captive-portal window (window.listed_window), if any.
    portal: dict[str, Any] | None = None

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
            "egress_devices": self.egress_devices,
            "guarded": self.guarded,
            "portal": self.portal,
            "other_tables": self.other_tables,
            "warnings": self.warnings,
        }


def status(runner: Runner, config: Config, *, tunnel_port: int | None = None) -> Status:
    """`tunnel_port`: the listen port the running watcher's relaxed tables
    spare (daemon.spared_port)."""
    # Two listings of the live kernel in all (and one of a small set while a
    # portal window is open): each costs a full fetch of every set element in
    # nft 1.0.6 (seconds at 100,000 endpoints).
    listed = split_tables(runner.run([NFT, "-s", "list", "ruleset"]).stdout)
    found = counters(runner)
    endpoints = [str(e) for e in config.endpoints]
    others = sorted(f"{family} {name}" for family, name in listed if name not in OWN_TABLE_NAMES)
    devices = present_devices(config.egress_interfaces)
    guarded = ("inet", GUARD_TABLE) in listed
    # Every refusal is counted once, in whichever of earlyfw's tables refused it:
    # while the watcher runs that is often its guard.
    totals = add_counters(*(found.get(key, {}) for key in COUNTING_TABLES))
    # A portal window's elements come and go; the state is the rest.
    live = {key: normalise(window.without_windows(listed.get(key))) for key in MAIN_TABLES}
    main = live[("inet", TABLE)]
    if main is None:
        return Status(
            present=False,
            state=None,
            intact=False,
            counters=totals,
            endpoints=endpoints,
            other_tables=others,
            warnings=[f"table inet {TABLE} is not loaded: nothing is blocked", *firewalls.warnings(others)],
            egress_devices=devices,
            guarded=guarded,
        )
    # A table claims the state it was rendered for; an unaltered one matches
    # that state's canonical listing (one private load, however large).
    claimed = policy.claimed_state(main)
    state = None
    for candidate in [claimed] if claimed else list(State):
        if canonical(runner, config, candidate, devices, tunnel_port) == live:
            state = candidate
            break
    warnings = []
    if state is None:
        egress = live[("netdev", EGRESS_TABLE)]
        if devices and egress is None:
            warnings.append(
                f"table netdev {EGRESS_TABLE} is missing: raw-socket egress on {', '.join(devices)} is not filtered: "
                "run `earlyfw lock`"
            )
        else:
            warnings.append(
                "earlyfw's tables differ from every state the config renders "
                "(altered, or the config or the interfaces changed since they were loaded): run `earlyfw lock`"
            )
    if others:
        warnings.append(
            "other firewall tables are loaded ("
            + ", ".join(others)
            + "); they cannot open what earlyfw blocks, but a `flush ruleset` from their loader removes earlyfw"
        )
    warnings += firewalls.warnings(others)
    return Status(
        portal=_open_window(runner, listed.get(("inet", TABLE)) or ""),
        present=True,
        state=state,
        intact=state is not None,
        counters=totals,
        endpoints=endpoints,
        other_tables=others,
        warnings=warnings,
        egress_devices=devices,
        guarded=guarded,
    )


def _open_window(runner: Runner, listing: str) -> dict[str, Any] | None:
    """The window the table holds: only then a third listing, of that one
    set without -s, which leaves out the time an element has left."""
    if not window.open_in(listing):
        return None
    result = runner.run([NFT, "list", "set", "inet", TABLE, "portal_web"], check=False)
    return window.listed_window(result.stdout, now=time.time()) if result.returncode == 0 else None


def require_root_for(action: str) -> None:
    if os.geteuid() != 0:
        raise EarlyfwError(f"{action} needs root (CAP_NET_ADMIN)", hint=f"sudo earlyfw {action}")


def live_state(runner: Runner) -> State | None:
    """The state table inet earlyfw claims to be in (its comment), or None
    when it is not loaded or cannot be read (no nft, no privileges)."""
    try:
        # -t: without set contents, which can be 100,000 endpoints long.
        result = runner.run([NFT, "-t", "list", "table", "inet", TABLE], check=False)
    except CommandError:
        return None
    return policy.claimed_state(result.stdout) if result.returncode == 0 else None


def swap_endpoints(runner: Runner, old: Config, new: Config) -> None:
    """Change the live endpoint sets from `old`'s to `new`'s in one
    transaction, new elements added before the old ones go, so no packet ever
    sees a set without an address both configs allow. Touches table inet
    earlyfw and, when loaded, netdev earlyfw_egress; nothing else."""
    before, after = {e.key for e in old.endpoints}, {e.key for e in new.endpoints}
    added, removed = sorted(after - before), sorted(before - after)
    if not added and not removed:
        return
    tables = [("inet", TABLE)]
    if runner.run([NFT, "-t", "list", "table", "netdev", EGRESS_TABLE], check=False).returncode == 0:
        tables.append(("netdev", EGRESS_TABLE))
    script = ""
    for verb, keys in (("add", added), ("delete", removed)):
        for family, table in tables:
            for version in (4, 6):
                elements = [f"{a} . {p} . {port}" for a, port, p in keys if a.version == version]
                if elements:
                    endpoint_set = policy.ENDPOINT_SETS[version]
                    script += f"{verb} element {family} {table} {endpoint_set} {{ {', '.join(elements)} }}\n"
    load(runner, script)


_ELEMENTS = re.compile(r"elements = \{(.*?)\}", re.S)


def normalise(listing: str | None) -> str | None:
    """A table listing with each set's elements sorted and deduplicated: the
    kernel lists a hash set in its hash order, which differs from one load to
    the next, and a dump racing the set's growth right after a large load can
    list an element twice."""
    if listing is None:
        return None

    def elements(match: re.Match[str]) -> str:
        items = sorted({e.strip() for e in match[1].split(",") if e.strip()})
        return "elements = { " + ", ".join(items) + " }"

    return _ELEMENTS.sub(elements, listing)
