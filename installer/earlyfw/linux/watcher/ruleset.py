"""State changes as single transactions, and the guard tables.

A `flush ruleset` (firewalld's reload, an iptables-nft restore, a careless
admin) removes table inet earlyfw, and for the milliseconds until the watcher
puts it back nothing would be filtered. So alongside the table the boot path
loads, the watcher keeps a copy of the same ruleset, `inet earlyfw_guard`
(and `netdev earlyfw_egress_guard`), created with the `owner` flag: the kernel
ties an owned table to the watcher's netlink socket, skips it on `flush
ruleset` and refuses every other process that tries to change or delete it.
A packet must be accepted by every base chain on its hook, so while the guard
holds the watcher's state, nothing the state does not allow gets out even with
earlyfw's table gone. When the watcher exits the kernel drops the guard and the
unowned table, which the watcher keeps equal to it, stays.

Every state change is one batch holding both tables: atomic, one generation.
Kernels before 5.12 have no owner flag; there the watcher runs unguarded and
relies on its repair speed alone (and says so once).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from earlyfw import policy, templates
from earlyfw.config import Config, Transport
from earlyfw.errors import CommandError
from earlyfw.linux import nft
from earlyfw.linux.nft import GUARD, WAKE_TABLE
from earlyfw.linux.watcher.libnft import Libnftables
from earlyfw.policy import EGRESS_TABLE, TABLE, State, claimed_state

# (family, table the boot path loads, the watcher's owned copy of it)
PAIRS = (("inet", TABLE, GUARD.inet), ("netdev", EGRESS_TABLE, GUARD.netdev))
WATCHED_TABLES = frozenset({TABLE, EGRESS_TABLE})

_HEADER = re.compile(r"^table (\w+) \S+ \{.*$")

# Which counters each family's table declares.
_COUNTER_NAMES = {"inet": frozenset(policy.INET_COUNTERS), "netdev": frozenset(policy.EGRESS_COUNTERS)}


WAKE_TEMPLATE = "payload/nftables/earlyfw-watch.nft.j2"
# Every template the watcher renders: the frozen build ships them compiled
# (installer/earlyfw.spec), for its first render at boot.
WATCHER_TEMPLATES = (policy.TEMPLATE, policy.TABLES_TEMPLATE, WAKE_TEMPLATE)
# At most this many wake-ups a second from handshake packets, spoofed or not.
WAKE_RATE = 20
# What the wake table needs beyond the blocked ruleset's modules: `limit`, and
# `log group` to NFLOG. earlyfw-watch.service loads them before the watcher
# starts (linux/watcher_unit.py).
WAKE_MODULES = ("nft_limit", "nft_log", "nfnetlink_log")


def wake_script(config: Config, group: int) -> str:
    """The owned table that logs WireGuard handshake packets from the
    endpoints to NFLOG `group`, for the watcher to wake on."""

    def elements(version: int) -> list[str]:
        return [f"{e.address} . {e.port}" for e in config.endpoints_of(version) if e.protocol is Transport.UDP]

    return templates.render(
        WAKE_TEMPLATE,
        table=WAKE_TABLE,
        endpoints_v4=elements(4),
        endpoints_v6=elements(6),
        group=group,
        rate=WAKE_RATE,
    )


def normalise(listing: str | None, name: str) -> str | None:
    """A listing with the table's name, owner flag and the `# progname` note
    nft adds to owned tables taken out, so a guard compares equal to its table."""
    if listing is None:
        return None
    lines = [line for line in listing.splitlines() if line.strip() and line.strip() != "flags owner"]
    if lines:
        lines[0] = _HEADER.sub(lambda m: f"table {m[1]} {name} {{", lines[0])
    return "\n".join(lines)


@dataclass(frozen=True)
class Finding:
    """What inspecting the live tables found: nothing wrong (both None), a
    problem to repair, or a valid different state someone else put in place."""

    problem: str | None = None
    claimed: State | None = None


class LiveRuleset:
    """The watcher's hold on earlyfw's live tables and their guards: puts a
    state in place, repairs it, and tells whether it is still intact."""

    def __init__(
        self,
        config: Config,
        nft_ctx: Libnftables,
        *,
        guard: bool = True,
        devices: Callable[[], list[str]] | None = None,
        sys_class_net: Path = Path("/sys/class/net"),
        tunnel_port: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.config = config
        self.nft = nft_ctx
        self.guarded = guard
        self.notes: list[str] = []
        # Read at each change: a reload may bring other [egress] interfaces.
        self._devices = devices or (lambda: nft.present_devices(self.config.egress_interfaces, sys_class_net))
        # Read at each change: the tunnel's listen port, which the relaxed
        # endpoint hole spares; a repair keeps the one the guards hold.
        self._tunnel_port = tunnel_port
        self.rendered_port: int | None = None
        # Without a guard, the reference for "intact" is what the watcher itself
        # listed right after its last change.
        self._reference: dict[str, str | None] = {}
        # The counter values the main tables got at the last change.
        self._carried: dict[str, tuple[int, int]] = {}
        # Changes put in place so far, and whether the last one loaded the
        # egress table: a portal window (earlyfw.linux.window) lives between two.
        self.changes = 0
        self._egress_loaded = False

    def put(self, state: State, *, repair: bool = False, wake_group: int | None = None) -> None:
        """Replace earlyfw's tables (and the guards) with `state`, atomically,
        carrying the refuse counters over. The guards are the same tables
        rendered under their own names, owned, their counters at zero: a
        refusal is counted by whichever table refuses it, the main tables carry
        the totals over each change, and `earlyfw status` adds the two. A
        repair leaves the guards alone: no other process can have changed them,
        so they still hold `state`, and the batch is half the size.
        `wake_group`: the wake table is replaced in the same batch (a reload:
        its endpoints changed too)."""
        counters = self._counters(with_guard=self.guarded and not repair)
        devices = self._devices()
        port = self.rendered_port if repair else self._tunnel_port()

        def script(guard: policy.Tables | None = None) -> str:
            return policy.render(
                self.config, state, counters=counters, egress_devices=devices, guard=guard, tunnel_port=port
            )

        if self.guarded and not repair:
            wake = wake_script(self.config, wake_group) if wake_group is not None else ""
            try:
                self.nft.run(script(GUARD) + wake)
            except CommandError as e:
                if "Operation not supported" not in str(e):
                    raise
                self.nft.run(script())  # raises if the guard was not the problem
                self.guarded = False
                self.notes.append(
                    "this kernel has no owned nftables tables (needs Linux 5.12): running without the "
                    "guard table, so a `flush ruleset` leaves nothing filtered until the repair"
                )
        else:
            self.nft.run(script())
            if not self.guarded:
                self._reference = {name: self.nft.list_table(family, name) for family, name, _ in PAIRS}
        self._carried = counters
        self.rendered_port = port
        self.changes += 1
        if not repair:
            self._egress_loaded = bool(devices)

    def portal_tables(self) -> list[tuple[str, str]]:
        """The tables holding portal window sets: earlyfw's, and their guards."""
        found = []
        for family, main, guard in PAIRS:
            if family == "inet" or self._egress_loaded:
                found += [(family, main), *([(family, guard)] if self.guarded else [])]
        return found

    def run_portal(self, script: str) -> None:
        """A portal window's elements in or out, in one transaction."""
        self.nft.run(script)
        if not self.guarded:
            self._reference = {name: self.nft.list_table(family, name) for family, name, _ in PAIRS}

    def load_wake(self, group: int) -> bool:
        """Load the wake table; False where the kernel cannot own tables
        (it would not survive a flush) or has no NFLOG."""
        if not self.guarded:
            return False
        try:
            self.nft.run(wake_script(self.config, group))
        except CommandError as e:
            self.notes.append(f"no handshake wake-ups ({e}): polling instead")
            return False
        return True

    def inspect(self, state: State) -> Finding:
        """Compare the live tables with what the watcher last put in place."""
        main = self.nft.list_table("inet", TABLE)
        if main is None:
            return Finding(problem=f"table inet {TABLE} was removed")
        claimed = claimed_state(main)
        if claimed in (State.BLOCKED, State.RELAXED) and claimed is not state:
            return Finding(claimed=claimed)
        for family, name, guard in PAIRS:
            live = main if name == TABLE else self.nft.list_table(family, name)
            if normalise(live, name) != normalise(self._expected(family, name, guard), name):
                what = "removed" if live is None else "altered"
                return Finding(problem=f"table {family} {name} was {what}")
        return Finding()

    def _expected(self, family: str, name: str, guard: str) -> str | None:
        if self.guarded:
            return self.nft.list_table(family, guard)
        return self._reference.get(name)

    def _counters(self, *, with_guard: bool) -> dict[str, tuple[int, int]]:
        """What the main tables' counters must hold after a change: their own
        counts (or, for a table someone removed, what it held at the last
        change), plus, when the guards are replaced too and so restart at
        zero, the guards' counts."""
        listed = self.nft.counters()
        found: dict[str, tuple[int, int]] = {}
        for family, name, _ in PAIRS:
            own = listed.get((family, name))
            if not own:
                own = {k: v for k, v in self._carried.items() if k in _COUNTER_NAMES[family]}
            found.update(own)
        if not with_guard:
            return found
        return nft.add_counters(found, *(listed.get((family, guard), {}) for family, _, guard in PAIRS))
