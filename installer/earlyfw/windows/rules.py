"""The kill switch as WFP filters: a pure function of the Config.

Everything lives in earlyfw's own sublayer (weight 0xFFFF, as Mullvad's and
wireguard-windows' are: BFE still evaluates every sublayer, so a hard permit
in another one is not overridden; `windows status` warns about those) at the
four ALE authorisation layers (outbound connect, inbound accept, IPv4 and
IPv6) and the two IPFORWARD layers, where traffic the host routes for others
(Internet Connection Sharing, Mobile Hotspot, NATed VMs) passes without ever
reaching ALE. Inside the sublayer the highest-weighted matching filter
decides, so the policy is a ladder of weights, read top down like the nft
output chain:

  15  loopback                          permit
  13  tunnel DNS to the VPN's resolvers  permit   } relaxed only, on the
  12  other DNS through the tunnel       block    } tunnel's LUID
  10  the tunnel                         permit   }
   8  endpoints (outbound connect only; WireGuard's only from SYSTEM, the
      tunnel service's and the driver's own sockets; OpenVPN's only from
      openvpn.exe, by app ID), DHCPv4 (broadcast;
      unicast and replies only for the DHCP client service), DHCPv6 and
      neighbour discovery, link-local   permit
   6  DNS anywhere else                  block
   4  the LAN ([lan] allow)              permit
   0  everything                         block

The block-all and loopback filters exist twice: as boot-time filters, which
tcpip.sys enforces from its start until BFE has initialised, and as persistent
ones, which BFE loads at every start (the two flags cannot be combined). Blocks
clear the action right, so no lower sublayer can turn them into a permit.
"""

from __future__ import annotations

import functools
import ipaddress
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

from earlyfw import policy
from earlyfw.config import Config, Endpoint, Transport, TunnelKind
from earlyfw.errors import ConfigError
from earlyfw.windows import security
from earlyfw.windows import structs as s

IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
PROTOCOLS = {Transport.TCP: IPPROTO_TCP, Transport.UDP: IPPROTO_UDP}
# NT SERVICE\Dhcp, the DHCP client service's SID: S-1-5-80-2940520708-...
DHCP_CLIENT = security.service_sid("Dhcp")


class Layer(StrEnum):
    CONNECT_V4 = "ALE_AUTH_CONNECT_V4"
    CONNECT_V6 = "ALE_AUTH_CONNECT_V6"
    RECV_ACCEPT_V4 = "ALE_AUTH_RECV_ACCEPT_V4"
    RECV_ACCEPT_V6 = "ALE_AUTH_RECV_ACCEPT_V6"
    FORWARD_V4 = "IPFORWARD_V4"
    FORWARD_V6 = "IPFORWARD_V6"

    @property
    def key(self) -> uuid.UUID:
        return {
            Layer.CONNECT_V4: s.FWPM_LAYER_ALE_AUTH_CONNECT_V4,
            Layer.CONNECT_V6: s.FWPM_LAYER_ALE_AUTH_CONNECT_V6,
            Layer.RECV_ACCEPT_V4: s.FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4,
            Layer.RECV_ACCEPT_V6: s.FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6,
            Layer.FORWARD_V4: s.FWPM_LAYER_IPFORWARD_V4,
            Layer.FORWARD_V6: s.FWPM_LAYER_IPFORWARD_V6,
        }[self]

    @property
    def ale(self) -> bool:
        return "ALE" in self.value

    @property
    def version(self) -> int:
        return 4 if self.value.endswith("V4") else 6

    @property
    def outbound(self) -> bool:
        return "CONNECT" in self.value

    @classmethod
    def by_key(cls, key: uuid.UUID) -> Layer:
        return next(layer for layer in cls if layer.key == key)


class Lifetime(StrEnum):
    BOOTTIME = "boottime"  # tcpip.sys start until BFE is up
    PERSISTENT = "persistent"  # loaded by BFE at every start
    # Until reboot or BFE restart: the relax permits, which name a tunnel LUID
    # that is only valid while that adapter exists. A crash or reboot comes
    # back blocked and the watcher relaxes again on a fresh handshake.
    RUNTIME = "runtime"

    @property
    def flags(self) -> int:
        return {
            Lifetime.BOOTTIME: s.FWPM_FILTER_FLAG_BOOTTIME,
            Lifetime.PERSISTENT: s.FWPM_FILTER_FLAG_PERSISTENT,
            Lifetime.RUNTIME: 0,
        }[self]


class Action(StrEnum):
    BLOCK = "block"
    PERMIT = "permit"

    @property
    def code(self) -> int:
        return s.FWP_ACTION_BLOCK if self is Action.BLOCK else s.FWP_ACTION_PERMIT

    @property
    def flags(self) -> int:
        # A hard block: lower sublayers cannot override it. Permits stay soft,
        # so Windows Firewall and others can still block what earlyfw allows.
        return s.FWPM_FILTER_FLAG_CLEAR_ACTION_RIGHT if self is Action.BLOCK else 0


class Weight(IntEnum):
    """FWP_UINT8 weights: BFE maps weight w into the w-th sixteenth of the
    64-bit weight range, so the ladder holds whatever else BFE adds."""

    BLOCK_ALL = 0
    LAN = 4
    DNS_BLOCK = 6
    BASELINE = 8
    TUNNEL = 10
    TUNNEL_DNS_BLOCK = 12
    TUNNEL_DNS_PERMIT = 13
    LOOPBACK = 15


class Field(StrEnum):
    REMOTE_ADDRESS = "remote_address"
    REMOTE_PORT = "remote_port"
    LOCAL_PORT = "local_port"  # the ICMP type for ICMP packets
    PROTOCOL = "protocol"
    LOCAL_INTERFACE = "local_interface"
    FLAGS = "flags"
    USER = "user"  # the socket owner's token against a security descriptor
    APP = "app"  # the executable that opened the socket, by its app ID
    FORWARD_INTERFACE = "forward_interface"  # IPFORWARD: where it leaves
    ARRIVAL_INTERFACE = "arrival_interface"  # IPFORWARD: where it came in

    @property
    def key(self) -> uuid.UUID:
        return {
            Field.REMOTE_ADDRESS: s.FWPM_CONDITION_IP_REMOTE_ADDRESS,
            Field.REMOTE_PORT: s.FWPM_CONDITION_IP_REMOTE_PORT,
            Field.LOCAL_PORT: s.FWPM_CONDITION_IP_LOCAL_PORT,
            Field.PROTOCOL: s.FWPM_CONDITION_IP_PROTOCOL,
            Field.LOCAL_INTERFACE: s.FWPM_CONDITION_IP_LOCAL_INTERFACE,
            Field.FLAGS: s.FWPM_CONDITION_FLAGS,
            Field.USER: s.FWPM_CONDITION_ALE_USER_ID,
            Field.APP: s.FWPM_CONDITION_ALE_APP_ID,
            Field.FORWARD_INTERFACE: s.FWPM_CONDITION_IP_FORWARD_INTERFACE,
            Field.ARRIVAL_INTERFACE: s.FWPM_CONDITION_IP_ARRIVAL_INTERFACE,
        }[self]

    @property
    def match(self) -> int:
        return s.FWP_MATCH_FLAGS_ALL_SET if self is Field.FLAGS else s.FWP_MATCH_EQUAL

    @classmethod
    def by_key(cls, key: uuid.UUID) -> Field:
        # ICMP_TYPE is LOCAL_PORT under another name: the first match wins.
        return next(f for f in cls if f.key == key)


@dataclass(frozen=True)
class Interface:
    """The tunnel adapter: its alias from the config, its LUID once known."""

    alias: str
    luid: int

    def __str__(self) -> str:
        return f"{self.alias} (LUID {self.luid:#x})"


@dataclass(frozen=True)
class Owners:
    """The accounts whose sockets a filter matches (ALE_USER_ID)."""

    sids: tuple[str, ...]

    def __str__(self) -> str:
        return ",".join(self.sids)

    @property
    def descriptor(self) -> bytes:
        return security.match_only(*self.sids)


@dataclass(frozen=True)
class Program:
    """An executable by its Win32 path (ALE_APP_ID). BFE matches the app ID
    FwpmGetAppIdFromFileName0 derives from it when the filter is added (the
    file's NT device path), so the file must exist then, and a copy of it
    elsewhere is another program."""

    path: str

    def __str__(self) -> str:
        return self.path


SYSTEM_ONLY = Owners((security.SYSTEM,))
DHCP_CLIENT_ONLY = Owners((DHCP_CLIENT,))

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Value = int | Address | Network | Interface | Owners | Program


@dataclass(frozen=True)
class Condition:
    """Conditions on the same field are ORed, different fields ANDed."""

    field: Field
    value: Value

    def to_json(self) -> dict[str, Any]:
        value: Any = self.value
        if isinstance(value, Interface):
            value = {"alias": value.alias, "luid": value.luid}
        elif isinstance(value, Owners):
            value = {"sids": list(value.sids)}
        elif isinstance(value, Program):
            value = {"path": value.path}
        elif not isinstance(value, int):
            value = str(value)
        return {
            "field": str(self.field),
            "match": "flags_all_set" if self.field is Field.FLAGS else "equal",
            "value": value,
        }


@dataclass(frozen=True)
class Filter:
    # What the filter is for; with the lifetime and layer it names the key, so
    # the same filter gets the same GUID on every install.
    role: str
    layer: Layer
    lifetime: Lifetime
    action: Action
    weight: Weight
    conditions: tuple[Condition, ...] = ()

    @property
    def key(self) -> uuid.UUID:
        return filter_key(self.lifetime, self.role, self.layer)

    @property
    def flags(self) -> int:
        return self.lifetime.flags | self.action.flags

    @property
    def name(self) -> str:
        return f"earlyfw: {self.action} {self.role}"

    @property
    def description(self) -> str:
        return f"earlyfw kill switch, {self.lifetime} filter at {self.layer}, weight {int(self.weight)}"

    def to_json(self) -> dict[str, Any]:
        return {
            "key": str(self.key),
            "name": self.name,
            "layer": str(self.layer),
            "lifetime": str(self.lifetime),
            "flags": self.flags,
            "action": str(self.action),
            "weight": int(self.weight),
            "conditions": [c.to_json() for c in self.conditions],
        }


def filter_key(lifetime: Lifetime, role: str, layer: Layer) -> uuid.UUID:
    return uuid.uuid5(s.FILTER_NAMESPACE, f"{lifetime}/{role}/{layer}")


def _conditions(field: Field, values: Iterable[Value]) -> tuple[Condition, ...]:
    return tuple(Condition(field, v) for v in values)


LOOPBACK = _conditions(Field.FLAGS, [s.FWP_CONDITION_FLAG_IS_LOOPBACK])


ALE = tuple(layer for layer in Layer if layer.ale)


def _always(layer: Layer, lifetime: Lifetime) -> Iterator[Filter]:
    """What both the boot-time and the persistent set hold."""
    yield Filter("all", layer, lifetime, Action.BLOCK, Weight.BLOCK_ALL)
    if not layer.ale:
        return  # forwarded traffic is never loopback
    # Windows' own boot-time policy lets loopback through too: blocking it
    # before BFE would only break local IPC, nothing leaves the host by it.
    yield Filter("loopback", layer, lifetime, Action.PERMIT, Weight.LOOPBACK, LOOPBACK)


def boottime_set() -> tuple[Filter, ...]:
    """Config-independent, so their keys are fixed: uninstall can scrub them
    even on a boot where BFE no longer lists them."""
    return tuple(f for layer in Layer for f in _always(layer, Lifetime.BOOTTIME))


def endpoint_sender(config: Config) -> Condition | None:
    """Whose sockets may reach the endpoints. WireGuard for Windows' tunnel
    service runs as LocalSystem, and WireGuardNT's sockets are the kernel's:
    both are SYSTEM, which no standard user's program is. OpenVPN runs as
    whoever started it (the GUI's interactive service starts it as the user),
    so it is named by its executable instead ([tunnel] program); a manual
    tunnel's only when the config names one."""
    if config.tunnel_kind is TunnelKind.WIREGUARD:
        return Condition(Field.USER, SYSTEM_ONLY)
    program = config.windows_program
    return None if program is None else Condition(Field.APP, Program(program))


def _endpoint(e: Endpoint, layer: Layer, sender: Condition | None) -> Filter:
    """Outbound connect only: the server's replies ride the flow the connect
    opened, and a permit at receive-accept would let a packet with a spoofed
    source endpoint:port open a new inbound flow to any listener."""
    conditions = [
        Condition(Field.REMOTE_ADDRESS, e.address),
        Condition(Field.REMOTE_PORT, e.port),
        Condition(Field.PROTOCOL, PROTOCOLS[e.protocol]),
    ]
    if sender is not None:
        conditions.append(sender)
    return Filter(f"endpoint {e}", layer, Lifetime.PERSISTENT, Action.PERMIT, Weight.BASELINE, tuple(conditions))


def _dhcp(layer: Layer) -> Iterator[Filter]:
    """DHCPv4 as wireguard-windows and Mullvad allow it, narrowed further:
    requests to the broadcast address from anyone (they never leave the
    link), while unicast requests (a lease renewal goes to the server that
    granted it) and the server's replies, which open an inbound flow, are
    for the DHCP client service only: no privileged ports on Windows, so
    any program could bind port 68. DHCPv6 stays link-local both ways."""
    client, server = (68, 67) if layer.version == 4 else (546, 547)
    udp = (Condition(Field.PROTOCOL, IPPROTO_UDP),)
    ports = (Condition(Field.LOCAL_PORT, client), Condition(Field.REMOTE_PORT, server))
    permit = functools.partial(
        Filter, layer=layer, lifetime=Lifetime.PERSISTENT, action=Action.PERMIT, weight=Weight.BASELINE
    )
    if layer.version == 4:
        if layer.outbound:
            broadcast = Condition(Field.REMOTE_ADDRESS, ipaddress.IPv4Address("255.255.255.255"))
            yield permit(role="dhcp broadcast", conditions=(*udp, broadcast, *ports))
        yield permit(role="dhcp client service", conditions=(*udp, *ports, Condition(Field.USER, DHCP_CLIENT_ONLY)))
        return
    peers: list[Value] = [ipaddress.IPv6Network("fe80::/10")]
    if layer.outbound:
        peers.append(ipaddress.IPv6Network("ff02::1:2/128"))  # All_DHCP_Relay_Agents_and_Servers
    yield permit(role="dhcp", conditions=(*udp, *_conditions(Field.REMOTE_ADDRESS, peers), *ports))


def _icmpv6(role: str, layer: Layer, types: Iterable[int], peers: Iterable[str]) -> Filter:
    return Filter(
        role,
        layer,
        Lifetime.PERSISTENT,
        Action.PERMIT,
        Weight.BASELINE,
        (
            Condition(Field.PROTOCOL, IPPROTO_ICMPV6),
            *_conditions(Field.REMOTE_ADDRESS, [ipaddress.IPv6Network(p) for p in peers]),
            *_conditions(Field.LOCAL_PORT, types),
        ),
    )


def _neighbour_discovery(layer: Layer) -> Iterator[Filter]:
    """What IPv6 needs to find routers and neighbours, as the nft policy has it."""
    if layer.outbound:
        yield _icmpv6("neighbour-discovery", layer, (133, 135, 136), ("fe80::/10", "ff02::/16"))
        yield _icmpv6("multicast-listener-report", layer, (131, 143), ("ff02::/16",))
    else:
        yield _icmpv6("neighbour-discovery", layer, (134, 135, 136), ("::/128", "fe80::/10"))
        yield _icmpv6("multicast-listener-query", layer, (130,), ("fe80::/10",))


def _dns(
    layer: Layer,
    role: str,
    lifetime: Lifetime,
    action: Action,
    weight: Weight,
    *,
    tunnel: tuple[Condition, ...] = (),
    resolvers: tuple[Condition, ...] = (),
) -> Filter:
    """DNS and DNS-over-TLS, on any interface or only on the tunnel, to any
    resolver or only to the given ones."""
    dns = (*_conditions(Field.PROTOCOL, (IPPROTO_TCP, IPPROTO_UDP)), *_conditions(Field.REMOTE_PORT, policy.DNS_PORTS))
    return Filter(role, layer, lifetime, action, weight, (*tunnel, *dns, *resolvers))


def _lan(config: Config, layer: Layer) -> Iterator[Filter]:
    networks: tuple[Network, ...] = policy.lan_networks(config, layer.version)
    if not networks:
        return  # a permit with no address condition would permit every address
    yield Filter(
        "lan",
        layer,
        Lifetime.PERSISTENT,
        Action.PERMIT,
        Weight.LAN,
        _conditions(Field.REMOTE_ADDRESS, networks),
    )


def refuse_unsupported(config: Config) -> None:
    """The Linux-only keys, refused rather than ignored: a config that asks
    for them must not install as if it had not."""
    if config.allow:
        raise ConfigError(
            f"allow: [[allow]] {config.allow[0].interface!r} is not supported by the windows target: "
            "WFP names an interface by its LUID, which exists only while the adapter does",
            hint="for addresses reached outside the tunnel use [lan] allow = [networks]",
        )
    if config.forward_via_tunnel:
        raise ConfigError(
            "forward.via_tunnel is not supported by the windows target: what Windows forwards (ICS, Hyper-V NAT) "
            "already leaves only through the tunnel, and WFP cannot redirect DNS without a callout driver",
            hint="remove [forward] from the config for Windows",
        )


def persistent_set(config: Config) -> tuple[Filter, ...]:
    refuse_unsupported(config)
    filters: list[Filter] = []
    for layer in Layer:
        filters += _always(layer, Lifetime.PERSISTENT)
        if not layer.ale:
            continue
        if layer.outbound:
            sender = endpoint_sender(config)
            filters += [_endpoint(e, layer, sender) for e in config.endpoints_of(layer.version)]
        filters += _dhcp(layer)
        if layer.version == 6:
            filters += _neighbour_discovery(layer)
        if layer.outbound:
            filters.append(_dns(layer, "dns", Lifetime.PERSISTENT, Action.BLOCK, Weight.DNS_BLOCK))
        filters += _lan(config, layer)
    return tuple(filters)


def install_set(config: Config) -> tuple[Filter, ...]:
    """Everything `earlyfw install` puts in place: the blocked state."""
    return boottime_set() + persistent_set(config)


RELAX_ROLES = (
    "tunnel",
    "tunnel dns",
    "tunnel dns to resolvers",
    "forwarded onto the tunnel",
    "forwarded from the tunnel",
)


def relax_set(config: Config, tunnel: Interface) -> tuple[Filter, ...]:
    """The permits `earlyfw relax` adds on top of the blocked state."""
    refuse_unsupported(config)
    on_tunnel = (Condition(Field.LOCAL_INTERFACE, tunnel),)
    filters: list[Filter] = []
    for layer in Layer:
        if not layer.ale:
            # What the host routes for others may use the tunnel, both ways.
            for role, field in ((RELAX_ROLES[3], Field.FORWARD_INTERFACE), (RELAX_ROLES[4], Field.ARRIVAL_INTERFACE)):
                condition = (Condition(field, tunnel),)
                filters.append(Filter(role, layer, Lifetime.RUNTIME, Action.PERMIT, Weight.TUNNEL, condition))
            continue
        filters.append(Filter(RELAX_ROLES[0], layer, Lifetime.RUNTIME, Action.PERMIT, Weight.TUNNEL, on_tunnel))
        if not (layer.outbound and config.dns_servers):
            continue
        # With resolvers configured, DNS through the tunnel goes to them only.
        block = _dns(layer, RELAX_ROLES[1], Lifetime.RUNTIME, Action.BLOCK, Weight.TUNNEL_DNS_BLOCK, tunnel=on_tunnel)
        filters.append(block)
        resolvers = _conditions(Field.REMOTE_ADDRESS, config.dns_of(layer.version))
        if resolvers:
            role = RELAX_ROLES[2]
            filters.append(
                _dns(
                    layer,
                    role,
                    Lifetime.RUNTIME,
                    Action.PERMIT,
                    Weight.TUNNEL_DNS_PERMIT,
                    tunnel=on_tunnel,
                    resolvers=resolvers,
                )
            )
    return tuple(filters)


def relax_keys() -> frozenset[uuid.UUID]:
    """Every key a relax can have added, whatever the config: what lock removes."""
    return frozenset(filter_key(Lifetime.RUNTIME, role, layer) for role in RELAX_ROLES for layer in Layer)


def fixed_keys() -> frozenset[uuid.UUID]:
    """The keys that do not depend on the config: the ones that block."""
    persistent = (f for layer in Layer for f in _always(layer, Lifetime.PERSISTENT))
    return frozenset(f.key for f in (*boottime_set(), *persistent)) | relax_keys()


def programs(filters: Iterable[Filter]) -> tuple[Program, ...]:
    """The executables the filters name: each needs its app ID from BFE."""
    return tuple(sorted({c.value for f in filters for c in f.conditions if isinstance(c.value, Program)}, key=str))


def describe(config: Config) -> dict[str, Any]:
    """The filter set as JSON: what the windows target writes next to the
    config, and what `earlyfw windows show` prints."""
    placeholder = Interface(config.windows_adapter, 0)
    return {
        "provider": {"key": str(s.PROVIDER_KEY), "flags": s.FWPM_PROVIDER_FLAG_PERSISTENT},
        "sublayer": {
            "key": str(s.SUBLAYER_KEY),
            "flags": s.FWPM_SUBLAYER_FLAG_PERSISTENT,
            "weight": s.SUBLAYER_WEIGHT,
        },
        "blocked": [f.to_json() for f in install_set(config)],
        # The LUID is looked up when the watcher relaxes; 0 stands for it here.
        "relaxed_adds": [f.to_json() for f in relax_set(config, placeholder)],
    }
