"""The kill-switch policy: one nft script per state, rendered from the config."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from enum import StrEnum

from earlyfw import templates
from earlyfw.config import Config

TABLE = "earlyfw"
EGRESS_TABLE = "earlyfw_egress"
TEMPLATE = "payload/nftables/earlyfw.nft.j2"

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

# The comment each rendered table carries, naming its state.
_CLAIM = re.compile(r'^\s*comment "earlyfw state=(\w+)"$', re.M)


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
) -> str:
    """The nft script that atomically puts `state` in place.

    `counters` carries the refuse counters over a state change; `egress_devices`
    are the physical interfaces, present right now, whose raw egress is filtered.
    """
    devices = sorted(set(egress_devices))
    unknown = set(devices) - set(config.egress_interfaces)
    if unknown:
        raise ValueError(f"egress devices not in the config: {sorted(unknown)}")
    return templates.render(
        TEMPLATE,
        config=config,
        state=state,
        portal_level=PORTAL_LEVEL,
        portal_ports=PORTAL_PORTS,
        counters={name: (counters or {}).get(name, (0, 0)) for name in COUNTERS},
        egress_devices=devices,
        lan_v4=LAN_V4,
        lan_v6=LAN_V6,
    )
