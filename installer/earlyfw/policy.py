"""The kill-switch policy: one nft script per state, rendered from the config."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from earlyfw import templates
from earlyfw.config import Config, IPNetwork

TABLE = "earlyfw"
EGRESS_TABLE = "earlyfw_egress"
TEMPLATE = "payload/nftables/earlyfw.nft.j2"
# Where the tables themselves are written, as macros: TEMPLATE and the boot's
# raw-egress file (earlyfw.linux.boot) import them, with `context` below.
TABLES_TEMPLATE = "payload/nftables/tables.nft.j2"


@dataclass(frozen=True)
class Tables:
    """The names one copy of earlyfw's two tables goes by, and whether it is
    owned: nft's `owner` flag ties a table to the netlink socket that created
    it, so the kernel drops it with that socket and refuses every other process
    that tries to change it (the watcher's guard, earlyfw.linux.watcher.ruleset)."""

    inet: str
    netdev: str
    owned: bool = False


MAIN = Tables(TABLE, EGRESS_TABLE)

# The sets `earlyfw endpoints refresh` changes in place (earlyfw.linux.nft), by version.
ENDPOINT_SETS = {4: "endpoints_v4", 6: "endpoints_v6"}
# DNS and DNS-over-TLS: outside the tunnel refused everywhere, inside it allowed
# only to the VPN's resolvers when [dns] servers names them (nft, pf and WFP alike).
DNS_PORTS = (53, 853)

# Refuse rules carry named counters so `earlyfw status` can say what was stopped.
INET_COUNTERS = {
    "refused_out": "outbound traffic outside the tunnel (rejected)",
    "refused_dns": "DNS or DNS-over-TLS not through the tunnel to the VPN's resolvers",
    "refused_endpoint": "to a VPN endpoint from a program that is not the tunnel (not root's, no [tunnel] mark)",
    "dropped_in": "inbound traffic not belonging to an allowed flow",
    "dropped_forward": "forwarded traffic (containers, VMs) outside the tunnel",
}
# The netdev egress table's: what got past the inet hooks (raw packet sockets)
# and was stopped on the wire.
EGRESS_COUNTERS = {
    "refused_raw": "raw-socket (AF_PACKET) frames outside the policy on the [egress] interfaces",
    "refused_raw_dns": "raw-socket DNS or DNS-over-TLS on the [egress] interfaces",
}
COUNTERS = {**INET_COUNTERS, **EGRESS_COUNTERS}

# What "the LAN" is when [lan] allow = true: private, link-local and ULA ranges,
# plus the multicast groups LAN discovery (mDNS, LLMNR, SSDP, IGMP) uses.
LAN_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "224.0.0.0/24",
        "239.255.255.250/32",
        "255.255.255.255/32",
    )
)
LAN_V6 = tuple(ipaddress.IPv6Network(n) for n in ("fe80::/10", "fc00::/7", "ff02::/16"))


def lan_networks(config: Config, version: int) -> tuple[IPNetwork, ...]:
    """What the LAN exception covers, on every system: the ranges above for
    `[lan] allow = true`, exactly the listed networks for a list, else nothing."""
    if config.lan_networks:
        return config.lan_networks_of(version)
    if config.lan_allow:
        return LAN_V4 if version == 4 else LAN_V6
    return ()


class State(StrEnum):
    """The ruleset's states. Every one of them blocks all traffic outside the
    tunnel; they differ only in what else they let through."""

    BLOCKED = "blocked"
    RELAXED = "relaxed"
    # Blocked, plus the hosts [initramfs] allow names (NFS root, Tang, dropbear);
    # loaded only inside the initramfs and replaced by BLOCKED after switch_root.
    INITRAMFS = "initramfs"

    @property
    def allows_tunnel(self) -> bool:
        return self is State.RELAXED

    @property
    def allows_initramfs_hosts(self) -> bool:
        return self is State.INITRAMFS

    @property
    def holds_portal(self) -> bool:
        """Whether captive-portal windows ([portal] allow) can be opened: only
        while blocked after boot. A relax closes them (the tunnel is up), and
        the initramfs has no browser."""
        return self is State.BLOCKED

    @property
    def core_only(self) -> bool:
        """Whether the ruleset uses nothing but what nf_tables.ko has built in:
        no conntrack, drop instead of reject, plain counters. The initramfs
        loads its ruleset before udev, on the boot's critical path, where every
        extra module is a kernel module load (nft_ct pulls in nf_conntrack). It
        needs no state tracking either: what it lets in is exactly the replies
        from the endpoints, [initramfs] allow hosts and DHCP servers it lets
        out to, matched by their source address and port."""
        return self is State.INITRAMFS

    @property
    def ruleset_name(self) -> str:
        return f"{self.value}.nft"


Counters = Mapping[str, tuple[int, int]]

# A captive-portal window's cgroup is /earlyfw-portal/wNNN: level 2 of the
# cgroup v2 tree (earlyfw.linux.portal); a window allows HTTP and HTTPS.
PORTAL_LEVEL = 2
PORTAL_PORTS = (80, 443)
# How long a window may stay open (`earlyfw portal --minutes`); below the
# minimum it could close before a browser has even started.
PORTAL_DEFAULT_MINUTES = 5.0
PORTAL_MAX_MINUTES = 60.0
PORTAL_MIN_SECONDS = 6

# How the comment each rendered table carries, naming its state, begins.
CLAIM = "earlyfw state="
_CLAIM = re.compile(rf'^\s*comment "{CLAIM}(\w+)"$', re.M)


def claimed_state(listing: str) -> State | None:
    """The state a listed table says it holds (None: no or an unknown claim)."""
    match = _CLAIM.search(listing)
    if not match:
        return None
    try:
        return State(match[1])
    except ValueError:
        return None


def render(
    config: Config,
    state: State,
    *,
    counters: Counters | None = None,
    egress_devices: Iterable[str] = (),
    guard: Tables | None = None,
    tunnel_port: int | None = None,
) -> str:
    """The nft script that atomically puts `state` in place.

    `counters` carries the refuse counters over a state change; `egress_devices`
    are the physical interfaces, present right now, whose raw egress is filtered.
    `guard`: the same tables once more under its names, their counters at zero,
    in the same script (the watcher's owned copy). `tunnel_port`: the UDP
    port the tunnel's own socket holds (WireGuard's listen port), whose
    packets the relaxed endpoint hole lets out whoever's socket they carry.
    """
    devices = sorted(set(egress_devices))
    unknown = set(devices) - set(config.egress_interfaces)
    if unknown:
        raise ValueError(f"egress devices not in the config: {sorted(unknown)}")
    copies = [(MAIN, counter_values(counters))]
    if guard is not None:
        copies.append((guard, counter_values()))
    return templates.render(TEMPLATE, copies=copies, egress_devices=devices, **context(config, state, tunnel_port))


def counter_values(counters: Counters | None = None) -> dict[str, tuple[int, int]]:
    """Every refuse counter's (packets, bytes): from `counters`, else zero."""
    return {name: (counters or {}).get(name, (0, 0)) for name in COUNTERS}


def context(config: Config, state: State, tunnel_port: int | None = None) -> dict[str, object]:
    """What the tables (TABLES_TEMPLATE) read besides a copy's names and
    counters: the config, the state, the tunnel's listen port (None: not
    known) and the facts above, each written once."""
    if tunnel_port is not None and not 0 < tunnel_port < 1 << 16:
        raise ValueError(f"tunnel port {tunnel_port!r} is not a port")
    return {
        "config": config,
        "state": state,
        "main": MAIN,
        "claim": f"{CLAIM}{state}",
        "tunnel_port": tunnel_port,
        "inet_counters": list(INET_COUNTERS),
        "egress_counters": list(EGRESS_COUNTERS),
        "endpoint_sets": ENDPOINT_SETS,
        "dns_ports": DNS_PORTS,
        "portal_level": PORTAL_LEVEL,
        "portal_ports": PORTAL_PORTS,
        "lan_v4": lan_networks(config, 4),
        "lan_v6": lan_networks(config, 6),
    }
