"""The one typed configuration model, validated once at the edge.

Nothing reaches a template, a shell script or an nft ruleset that did not pass
through `Config.from_dict`: every field here is already a strict type (an
ipaddress object, an int in range, an enum member, an interface name matching a
conservative pattern), so the templates can interpolate without escaping.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from earlyfw.errors import ConfigError

E = TypeVar("E", bound=StrEnum)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Linux allows almost any byte in an interface name; earlyfw accepts the subset
# that is safe unquoted in nft, shell, systemd and pf, and refuses the rest.
_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
IFNAMSIZ = 16  # including the trailing NUL, so 15 usable bytes
# A Windows adapter's name (Get-NetAdapter: "OpenVPN TAP-Windows6", long
# WireGuard tunnel names): up to 256 characters, spaces allowed. Only the
# windows target reads it, and only as data (ctypes, argv), never in a shell.
_ADAPTER = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9 _.,()#+=-]{0,254}[A-Za-z0-9_.)=+-])?")

# How old a handshake may be and still relax a blocked tunnel. At least
# WireGuard's REJECT_AFTER_TIME: a session younger than that is never renewed
# on demand, so a stricter limit would keep a live tunnel blocked until it is.
# A relaxed tunnel is not locked for its handshake's age: only when it is dead
# (see earlyfw.linux.watcher.tunnels).
DEFAULT_REJECT_AFTER_SECONDS = 180  # WireGuard's REJECT_AFTER_TIME
# The tunnel client's executable on Windows, whose sockets alone may reach the
# endpoints (WFP matches the app ID of the process that opened the socket): a
# drive-letter path to an .exe, no UNC or \\?\ prefix, nothing Windows forbids
# or strips from a name (a trailing dot or space, so no '.' or '..' either),
# under MAX_PATH. Only the windows target reads it, as data (a ctypes wide string).
_PROGRAM_PART = r'[^\\/:*?"<>|\x00-\x1f\x7f]*[^\\/:*?"<>|\x00-\x1f\x7f. ]'
_PROGRAM = re.compile(rf"[A-Za-z]:(?:\\{_PROGRAM_PART})+\.[eE][xX][eE]")
PROGRAM_MAX = 259  # MAX_PATH without its NUL
# Where the OpenVPN installer (and so OpenVPN GUI's interactive service) puts it.
DEFAULT_OPENVPN_PROGRAM = r"C:\Program Files\OpenVPN\bin\openvpn.exe"
# A fwmark is a 32-bit value; 0 means "no mark", so it cannot name the tunnel's packets.
MARK_MAX = 0xFFFFFFFF


class TunnelKind(StrEnum):
    WIREGUARD = "wireguard"
    OPENVPN = "openvpn"
    MANUAL = "manual"

    @property
    def default_interface(self) -> str:
        return {"wireguard": "wg0", "openvpn": "tun0", "manual": "tun0"}[self.value]


class Transport(StrEnum):
    """What an endpoint is reached over; the config spells the key `protocol`."""

    UDP = "udp"
    TCP = "tcp"


@dataclass(frozen=True, order=True)
class Endpoint:
    address: IPAddress
    port: int
    protocol: Transport = Transport.UDP
    # The hostname this address was resolved from (`import --resolve`), kept so
    # the config stays readable and `earlyfw endpoints refresh` can re-resolve.
    host: str | None = None

    @property
    def family(self) -> int:
        return self.address.version

    @property
    def key(self) -> tuple[IPAddress, int, Transport]:
        """What the firewall matches on: one set element."""
        return (self.address, self.port, self.protocol)

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}/{self.protocol}"


@dataclass(frozen=True)
class Allow:
    """An [[allow]] entry: another interface (a side VPN such as tailscale0)
    whose traffic passes in every state, only to and from `networks` when
    they are given. DNS through it is refused unless `dns` is true."""

    interface: str
    networks: tuple[IPNetwork, ...] = ()
    dns: bool = False

    def networks_of(self, version: int) -> tuple[IPNetwork, ...]:
        return tuple(n for n in self.networks if n.version == version)


@dataclass(frozen=True)
class Config:
    tunnel_kind: TunnelKind
    interface: str
    endpoints: tuple[Endpoint, ...]
    dns_servers: tuple[IPAddress, ...] = ()
    lan_allow: bool = False
    # Physical interfaces whose raw-socket (AF_PACKET) egress is filtered too.
    egress_interfaces: tuple[str, ...] = ()
    # Hosts reachable from inside the initramfs only (NFS root, Tang, dropbear).
    initramfs_allow: tuple[Endpoint, ...] = ()
    reject_after_seconds: int = DEFAULT_REJECT_AFTER_SECONDS
    # OpenVPN's management socket (`management PATH unix`); without it the
    # watcher follows the --up/--down hook instead.
    openvpn_management: Path | None = None
    # Windows only: the tunnel adapter's name where it is not a valid Linux
    # interface name; `interface` otherwise.
    adapter: str | None = None
    # [lan] allow = ["192.168.1.0/24", ...]: exactly these networks instead of
    # the built-in LAN ranges; lan_allow is then true.
    lan_networks: tuple[IPNetwork, ...] = ()
    # [[allow]]: other interfaces whose traffic passes in every state.
    allow: tuple[Allow, ...] = ()
    # [forward] via_tunnel: bridges (docker0, virbr0, br-*) whose forwarded
    # traffic leaves only through the tunnel, their DNS sent to [dns] servers.
    forward_via_tunnel: tuple[str, ...] = ()
    # The fwmark the tunnel's own packets carry (WireGuard's FwMark, OpenVPN's
    # `mark`): besides root's and kernel sockets, the one thing that may send
    # to the endpoints (an OpenVPN that dropped to `user` re-opens its socket
    # as that user on a restart, keeping the mark).
    tunnel_mark: int | None = None
    # Windows only: [tunnel] program, the tunnel client's executable (see
    # windows_program).
    program: str | None = None
    # Whether `earlyfw portal` may open captive-portal windows: the blocked
    # state then holds the (empty) window sets and rules, which need Linux 5.13.
    portal_allow: bool = False
    source: Path | None = field(default=None, compare=False)

    @property
    def windows_adapter(self) -> str:
        return self.adapter or self.interface

    @property
    def windows_program(self) -> str | None:
        """The executable whose sockets alone may reach the endpoints on
        Windows: OpenVPN's by default, a manual tunnel's only when named
        (WireGuard's are SYSTEM's, matched by owner instead)."""
        if self.tunnel_kind is TunnelKind.OPENVPN:
            return self.program or DEFAULT_OPENVPN_PROGRAM
        return self.program

    def endpoints_of(self, version: int) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.endpoints if e.family == version)

    def dns_of(self, version: int) -> tuple[IPAddress, ...]:
        return tuple(a for a in self.dns_servers if a.version == version)

    def initramfs_allow_of(self, version: int) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.initramfs_allow if e.family == version)

    def lan_networks_of(self, version: int) -> tuple[IPNetwork, ...]:
        return tuple(n for n in self.lan_networks if n.version == version)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: Path | None = None) -> Config:
        doc = _Doc(data, "")
        doc.only({"tunnel", "endpoint", "dns", "lan", "egress", "initramfs", "watch", "allow", "forward", "portal"})

        tunnel = doc.table("tunnel", required=True)
        tunnel.only({"kind", "interface", "adapter", "mark", "program"})
        kind = tunnel.enum("kind", TunnelKind, default=TunnelKind.WIREGUARD)
        interface = tunnel.interface("interface", default=kind.default_interface)
        adapter = tunnel.get("adapter")
        if adapter is not None and not (isinstance(adapter, str) and _ADAPTER.fullmatch(adapter)):
            raise ConfigError(
                f"tunnel.adapter: {_show(adapter)} is not a Windows adapter name earlyfw accepts",
                hint="up to 256 letters, digits, spaces and _ . , ( ) # + = -, as Get-NetAdapter shows it",
            )

        program = _program(tunnel.get("program"), kind)

        endpoints = tuple(_endpoint(e) for e in doc.array_of_tables("endpoint", required=True))
        if not endpoints:
            raise ConfigError("endpoint: at least one [[endpoint]] is required", hint=_ENDPOINT_HINT)
        _no_duplicates("endpoint", endpoints)

        dns = doc.table("dns")
        dns.only({"servers"})
        servers = tuple(parse_address(f"dns.servers[{i}]", value) for i, value in enumerate(dns.items("servers")))

        lan = doc.table("lan")
        lan.only({"allow"})
        lan_allow, lan_networks = _lan_allow(lan)

        egress = doc.table("egress")
        egress.only({"interfaces"})
        egress_interfaces = tuple(
            _interface_name(f"egress.interfaces[{i}]", value) for i, value in enumerate(egress.items("interfaces"))
        )
        if interface in egress_interfaces:
            raise ConfigError(
                f"egress.interfaces: {interface!r} is the tunnel interface",
                hint="list the physical interfaces (e.g. eth0, wlan0), never the tunnel",
            )

        allow = _allow_entries(doc, interface, egress_interfaces)
        via_tunnel = _via_tunnel(doc, interface, allow, servers)

        initramfs = doc.table("initramfs")
        initramfs.only({"allow"})
        initramfs_allow = tuple(_endpoint(e) for e in initramfs.array_of_tables("allow"))

        mark = tunnel.get("mark")
        if mark is not None:
            mark = tunnel.integer("mark", low=1, high=MARK_MAX)

        portal = doc.table("portal")
        portal.only({"allow"})

        watch = doc.table("watch")
        watch.only({"reject_after_seconds", "openvpn_management"})
        reject_after = watch.integer("reject_after_seconds", default=DEFAULT_REJECT_AFTER_SECONDS, low=1, high=86400)
        if reject_after < DEFAULT_REJECT_AFTER_SECONDS:
            raise ConfigError(
                f"watch.reject_after_seconds: {reject_after} is below WireGuard's {DEFAULT_REJECT_AFTER_SECONDS} s "
                "session lifetime: a live tunnel makes a new handshake only when its session nears that age, "
                "so a blocked one could not prove itself meanwhile",
                hint=f"leave it out (default {DEFAULT_REJECT_AFTER_SECONDS}) or give "
                f"{DEFAULT_REJECT_AFTER_SECONDS}-86400; an idle relaxed tunnel is never locked for its age",
            )
        management = watch.get("openvpn_management")
        if management is not None and kind is not TunnelKind.OPENVPN:
            raise ConfigError(
                f'watch.openvpn_management: only for [tunnel] kind = "openvpn", not {kind.value!r}',
            )

        return cls(
            tunnel_kind=kind,
            interface=interface,
            endpoints=endpoints,
            dns_servers=servers,
            lan_allow=lan_allow,
            egress_interfaces=egress_interfaces,
            initramfs_allow=initramfs_allow,
            reject_after_seconds=reject_after,
            openvpn_management=None if management is None else _socket_path("watch.openvpn_management", management),
            adapter=adapter,
            lan_networks=lan_networks,
            allow=allow,
            forward_via_tunnel=via_tunnel,
            tunnel_mark=mark,
            program=program,
            portal_allow=portal.boolean("allow", default=False),
            source=source,
        )

    def to_dict(self) -> dict[str, Any]:
        """The TOML document that `from_dict` reads back to an equal Config."""
        data: dict[str, Any] = {
            "tunnel": {"kind": str(self.tunnel_kind), "interface": self.interface},
            "endpoint": [endpoint_dict(e) for e in self.endpoints],
            "dns": {"servers": [str(a) for a in self.dns_servers]},
            "lan": {"allow": [str(n) for n in self.lan_networks] if self.lan_networks else self.lan_allow},
        }
        if self.adapter is not None:
            data["tunnel"]["adapter"] = self.adapter
        if self.tunnel_mark is not None:
            data["tunnel"]["mark"] = self.tunnel_mark
        if self.program is not None:
            data["tunnel"]["program"] = self.program
        if self.portal_allow:
            data["portal"] = {"allow": True}
        if self.egress_interfaces:
            data["egress"] = {"interfaces": list(self.egress_interfaces)}
        if self.initramfs_allow:
            data["initramfs"] = {"allow": [endpoint_dict(e) for e in self.initramfs_allow]}
        if self.reject_after_seconds != DEFAULT_REJECT_AFTER_SECONDS:
            data.setdefault("watch", {})["reject_after_seconds"] = self.reject_after_seconds
        if self.openvpn_management is not None:
            data.setdefault("watch", {})["openvpn_management"] = str(self.openvpn_management)
        if self.allow:
            data["allow"] = [allow_dict(a) for a in self.allow]
        if self.forward_via_tunnel:
            data["forward"] = {"via_tunnel": list(self.forward_via_tunnel)}
        return data

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


MISSING_HINT = "create one (see payload/examples/earlyfw.toml) or `earlyfw import wg /etc/wireguard/wg0.conf`"


def load(path: Path, read: Callable[[], bytes] | None = None, *, missing: str = "", hint: str = MISSING_HINT) -> Config:
    """The config at `path`, read by `read` (an image's Root reads inside the
    image) or from the file system; any failure is one ConfigError line."""
    try:
        text = (read or path.read_bytes)().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file{missing}", hint=hint) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    return parse(text, source=path)


def parse(text: str, *, source: Path | None = None) -> Config:
    where = f"{source}: " if source else ""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}not valid TOML: {e}") from None
    try:
        return Config.from_dict(data, source=source)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}", hint=e.hint) from None


_ENDPOINT_HINT = 'add e.g. [[endpoint]] address = "198.51.100.7" port = 51820 protocol = "udp"'


def _endpoint(doc: _Doc) -> Endpoint:
    doc.only({"address", "port", "protocol", "host"})
    host = doc.get("host")
    return Endpoint(
        address=endpoint_address(doc.key("address"), doc.get("address", required=True)),
        port=doc.integer("port", required=True, low=1, high=65535),
        protocol=doc.enum("protocol", Transport, default=Transport.UDP),
        host=None if host is None else hostname(doc.key("host"), host),
    )


def endpoint_dict(e: Endpoint) -> dict[str, Any]:
    data: dict[str, Any] = {"address": str(e.address), "port": e.port, "protocol": str(e.protocol)}
    if e.host is not None:
        data["host"] = e.host
    return data


def _no_duplicates(key: str, items: Iterable[Endpoint]) -> None:
    seen: set[object] = set()
    for item in items:
        if item.key in seen:
            raise ConfigError(f"{key}: {item} is listed twice")
        seen.add(item.key)


def unusable_endpoint(address: IPAddress) -> str | None:
    """Why a packet to `address` can never leave this host towards a VPN
    server, or None. An IPv4-mapped IPv6 address never goes on the wire as
    IPv6 (the kernel sends IPv4 to it, which the ip6 set never matches)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"an IPv4-mapped IPv6 address (write {address.ipv4_mapped} instead)"
    if address.is_unspecified or address in _THIS_NETWORK:
        return 'unspecified ("this host"), not a destination'
    if address.is_loopback:
        return "a loopback address, which never leaves this host"
    if address.is_multicast:
        return "a multicast address"
    if address == _BROADCAST:
        return "the broadcast address"
    return None


_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def endpoint_address(key: str, value: object) -> IPAddress:
    """A VPN server's address: a host address the tunnel can be carried to."""
    address = parse_address(key, value)
    why = unusable_endpoint(address)
    if why:
        raise ConfigError(f"{key}: {value!r} is {why}; it can never carry the tunnel")
    return address


# RFC 1123 labels: letters, digits, inner hyphens; at most 63 bytes each, 253 in all.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def is_hostname(value: str) -> bool:
    """A DNS name (not an address in disguise: the last label is not all digits)."""
    return (
        len(value) <= 253
        and _HOSTNAME.fullmatch(value) is not None
        and not value.rstrip(".").rsplit(".", 1)[-1].isdigit()
    )


def hostname(key: str, value: object) -> str:
    if not isinstance(value, str) or not is_hostname(value):
        raise ConfigError(
            f"{key}: {_show(value) if not isinstance(value, str) else repr(value)} is not a DNS hostname",
            hint="letters, digits, '-' and '.', as in vpn.example.net",
        )
    return value.rstrip(".").lower()


def parse_address(key: str, value: object) -> IPAddress:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected an IP address string, got {_show(value)}")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise ConfigError(f"{key}: {value!r} carries a zone index", hint="give the address without %zone")
        if address.is_unspecified or address.is_multicast:
            raise ConfigError(f"{key}: {value!r} is {unusable_endpoint(address)}, not a host address")
        return address
    if "/" in value:
        raise ConfigError(
            f"{key}: {value!r} is a network (CIDR), not an address",
            hint="give a single host address without /prefix",
        )
    if is_hostname(value):
        raise ConfigError(
            f"{key}: {value!r} is a hostname; earlyfw needs an IP address",
            hint="import the VPN client's file with `earlyfw import --resolve`, which pins every address, "
            f"or resolve it yourself (getent ahosts {value}) and list each address: "
            "the firewall must not depend on DNS, which it blocks",
        )
    raise ConfigError(f"{key}: {value!r} is not an IPv4 or IPv6 address")


def _interface_name(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected an interface name string, got {_show(value)}")
    if len(value.encode()) >= IFNAMSIZ:
        raise ConfigError(f"{key}: {value!r} is {len(value.encode())} bytes; Linux interface names are at most 15")
    if value in {".", ".."} or not _IFNAME.fullmatch(value):
        raise ConfigError(
            f"{key}: {value!r} is not an interface name earlyfw accepts",
            hint="use letters, digits, '_', '.' and '-', starting with a letter, digit or '_'",
        )
    return value


# sun_path holds 108 bytes including the NUL.
_SOCKET_PATH = re.compile(r"/[A-Za-z0-9_.@+/-]+")
SUN_PATH_MAX = 107


def _socket_path(key: str, value: object) -> Path:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a socket path string, got {_show(value)}")
    if not _SOCKET_PATH.fullmatch(value) or ".." in value.split("/") or len(value.encode()) > SUN_PATH_MAX:
        raise ConfigError(
            f"{key}: {value!r} is not a unix socket path earlyfw accepts",
            hint="an absolute path of letters, digits and _ . @ + - / (at most 107 bytes), "
            'e.g. "/run/openvpn/client.sock"',
        )
    return Path(value)


# --- Precise exceptions: [lan] allow = [networks], [[allow]], [forward] ------

_PREFIX_LENGTH = re.compile(r"0|[1-9][0-9]{0,2}")
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_network(key: str, value: object) -> IPNetwork:
    """A network in CIDR notation, host bits clear: what an nft interval set,
    a pf table and a WFP address condition all hold alike."""
    if not isinstance(value, str):
        raise ConfigError(f'{key}: expected a network string such as "192.168.1.0/24", got {_show(value)}')
    address, slash, length = value.partition("/")
    if not slash:
        host = " for that one host" if _is_address(address) else ""
        bits = "128" if ":" in address else "32"
        raise ConfigError(
            f"{key}: {value!r} has no /prefix length",
            hint=f"a network in CIDR notation, e.g. {value}/{bits}{host}",
        )
    if "%" in address:
        raise ConfigError(f"{key}: {value!r} carries a zone index", hint="give the network without %zone")
    if not _PREFIX_LENGTH.fullmatch(length):  # ipaddress also takes netmasks and leading zeros
        raise ConfigError(f"{key}: {value!r} is not an IPv4 or IPv6 network in CIDR notation")
    try:
        network = ipaddress.ip_network(value)
    except ValueError:
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ConfigError(f"{key}: {value!r} is not an IPv4 or IPv6 network in CIDR notation") from None
        raise ConfigError(f"{key}: {value!r} has host bits set", hint=f"the network is {loose}") from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_IPV4_MAPPED):
        # Such packets go on the wire as IPv4: the ip6 rule would never match.
        raise ConfigError(f"{key}: {value!r} is IPv4-mapped IPv6", hint="write the IPv4 network instead")
    return network


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _networks(key: str, values: list[object], *, everything: bool) -> tuple[IPNetwork, ...]:
    """Networks that neither repeat nor overlap: each address is covered by one
    element only, so every set loads without merging and reads as written."""
    networks: list[IPNetwork] = []
    for i, value in enumerate(values):
        network = parse_network(f"{key}[{i}]", value)
        if network.prefixlen == 0 and not everything:
            raise ConfigError(
                f"{key}[{i}]: {value!r} is every IPv{network.version} address, which leaves nothing blocked",
                hint="list the networks you mean, e.g. 192.168.1.0/24",
            )
        for j, earlier in enumerate(networks):
            if network.version == earlier.version and network.overlaps(earlier):
                what = "repeats" if network == earlier else "overlaps"
                raise ConfigError(f"{key}[{i}]: {value!r} {what} {key}[{j}] {str(earlier)!r}")
        networks.append(network)
    return tuple(networks)


def _lan_allow(lan: _Doc) -> tuple[bool, tuple[IPNetwork, ...]]:
    """[lan] allow: true (the built-in LAN ranges), false, or exactly these networks."""
    value = lan.get("allow", default=False)
    if isinstance(value, bool):
        return value, ()
    if not isinstance(value, list):
        raise ConfigError(
            f"{lan.key('allow')}: expected true or false, or a list of networks, got {_show(value)}",
            hint='true: the private and link-local ranges; or exactly yours: ["192.168.1.0/24", "fd00:1::/64"]',
        )
    networks = _networks(lan.key("allow"), value, everything=False)
    return bool(networks), networks


def _allow_entries(doc: _Doc, tunnel: str, egress: tuple[str, ...]) -> tuple[Allow, ...]:
    entries: list[Allow] = []
    for entry in doc.array_of_tables("allow"):
        entry.only({"interface", "networks", "dns"})
        key = entry.key("interface")
        name = _interface_name(key, entry.get("interface", required=True))
        if name == tunnel:
            raise ConfigError(f"{key}: {name!r} is the tunnel interface", hint="[[allow]] names other interfaces")
        if name == "lo":
            raise ConfigError(f"{key}: 'lo' is always allowed")
        if name in egress:
            raise ConfigError(
                f"{key}: {name!r} is in egress.interfaces, a physical link: allowing it whole bypasses the kill switch",
                hint="for hosts on that link use [lan] allow = [networks]",
            )
        if any(e.interface == name for e in entries):
            raise ConfigError(f"{key}: {name!r} is listed twice", hint="one [[allow]] per interface")
        networks: tuple[IPNetwork, ...] = ()
        if "networks" in entry.data:
            networks = _networks(entry.key("networks"), entry.items("networks"), everything=True)
            if not networks:
                raise ConfigError(
                    f"{entry.key('networks')}: an empty list allows nothing",
                    hint=f"leave networks out to allow every address through {name}",
                )
        entries.append(Allow(name, networks, entry.boolean("dns", default=False)))
    return tuple(entries)


def _interface_pattern(key: str, value: object) -> str:
    """An interface name, or a prefix ending in `*` (br-*: Docker names each
    network's bridge br-<id>). Only nft reads these, always quoted."""
    if not (isinstance(value, str) and value.endswith("*")):
        return _interface_name(key, value)
    prefix = value[:-1]
    if prefix in {"", ".", ".."} or not _IFNAME.fullmatch(prefix) or len(value.encode()) >= IFNAMSIZ:
        raise ConfigError(
            f"{key}: {value!r} is not an interface name or name prefix earlyfw accepts",
            hint="a name (docker0) or a prefix and * (br-*), at most 15 bytes of letters, digits, '_', '.' and '-'",
        )
    return value


def _covers(pattern: str, name: str) -> bool:
    return name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern


def _via_tunnel(doc: _Doc, tunnel: str, allow: tuple[Allow, ...], servers: tuple[IPAddress, ...]) -> tuple[str, ...]:
    forward = doc.table("forward")
    forward.only({"via_tunnel"})
    names: list[str] = []
    for i, value in enumerate(forward.items("via_tunnel")):
        key = f"{forward.key('via_tunnel')}[{i}]"
        name = _interface_pattern(key, value)
        for other in (tunnel, "lo"):
            if _covers(name, other):
                raise ConfigError(f"{key}: {name!r} matches {other!r}", hint="list the bridges: docker0, virbr0, br-*")
        for entry in allow:
            if _covers(name, entry.interface):
                raise ConfigError(
                    f"{key}: {name!r} matches the [[allow]] interface {entry.interface!r}, "
                    "whose traffic passes outside the tunnel"
                )
        for j, earlier in enumerate(names):
            if _covers(earlier, name.rstrip("*")) or _covers(name, earlier.rstrip("*")):
                what = "repeats" if name == earlier else "overlaps"
                raise ConfigError(f"{key}: {name!r} {what} {forward.key('via_tunnel')}[{j}] {earlier!r}")
        names.append(name)
    if names and not servers:
        raise ConfigError(
            f"{forward.key('via_tunnel')}: needs [dns] servers",
            hint="the bridges' DNS is sent to the VPN's resolvers: list them in [dns] servers",
        )
    return tuple(names)


def allow_dict(a: Allow) -> dict[str, Any]:
    data: dict[str, Any] = {"interface": a.interface}
    if a.networks:
        data["networks"] = [str(n) for n in a.networks]
    if a.dns:
        data["dns"] = True
    return data


def _program(value: object, kind: TunnelKind) -> str | None:
    if value is None:
        return None
    if kind is TunnelKind.WIREGUARD:
        raise ConfigError(
            f"tunnel.program: {_show(value)} is not for WireGuard: its endpoints are for SYSTEM's sockets "
            "(the tunnel service, WireGuardNT)",
            hint='leave it out, or set [tunnel] kind = "openvpn" or "manual"',
        )
    if not (isinstance(value, str) and len(value) <= PROGRAM_MAX and _PROGRAM.fullmatch(value)):
        raise ConfigError(
            f"tunnel.program: {_show(value)} is not an absolute Windows path to an .exe",
            hint=f"e.g. {DEFAULT_OPENVPN_PROGRAM!r} (a drive letter, backslashes, no '..', at most "
            f"{PROGRAM_MAX} characters)",
        )
    return value


def _show(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


class _Doc:
    """A view of one TOML table that knows its dotted key for error messages."""

    def __init__(self, data: object, prefix: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{prefix.rstrip('.')}: expected a table, got {_show(data)}")
        self.data: Mapping[str, Any] = data
        self.prefix = prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def only(self, allowed: set[str]) -> None:
        for name in self.data:
            if name not in allowed:
                raise ConfigError(
                    f"{self.key(name)}: unknown key",
                    hint=f"known keys here: {', '.join(sorted(allowed))}",
                )

    def get(self, name: str, *, required: bool = False, default: object = None) -> object:
        if name in self.data:
            return self.data[name]
        if required:
            raise ConfigError(f"{self.key(name)}: missing")
        return default

    def table(self, name: str, *, required: bool = False) -> _Doc:
        return _Doc(self.get(name, required=required, default={}), f"{self.key(name)}.")

    def array_of_tables(self, name: str, *, required: bool = False) -> list[_Doc]:
        value = self.get(name, required=required, default=[])
        if not isinstance(value, list):
            raise ConfigError(f"{self.key(name)}: expected an array of tables ([[{name}]]), got {_show(value)}")
        return [_Doc(item, f"{self.key(name)}[{i}].") for i, item in enumerate(value)]

    def items(self, name: str) -> list[object]:
        value = self.get(name, default=[])
        if not isinstance(value, list):
            raise ConfigError(f"{self.key(name)}: expected a list, got {_show(value)}")
        return value

    def integer(self, name: str, *, low: int, high: int, required: bool = False, default: int | None = None) -> int:
        value = self.get(name, required=required, default=default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.key(name)}: expected an integer {low}-{high}, got {_show(value)}")
        if not low <= value <= high:
            raise ConfigError(f"{self.key(name)}: {value} is out of range {low}-{high}")
        return value

    def boolean(self, name: str, *, default: bool) -> bool:
        value = self.get(name, default=default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)}: expected true or false, got {_show(value)}")
        return value

    def interface(self, name: str, *, default: str) -> str:
        return _interface_name(self.key(name), self.get(name, default=default))

    def enum(self, name: str, enum: type[E], *, default: E) -> E:
        value = self.get(name, default=default)
        try:
            return enum(value) if isinstance(value, str) else enum[""]
        except (ValueError, KeyError):
            choices = " | ".join(m.value for m in enum)
            raise ConfigError(f"{self.key(name)}: {value!r} is not one of {choices}") from None
