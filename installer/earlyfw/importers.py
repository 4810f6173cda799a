"""Build an earlyfw Config from a VPN client's own configuration file, so the
endpoints and resolvers come from one source of truth.

Each reader turns a file into `Remote`s (the host as written, port, protocol,
and where in the file it came from), read the way the client itself reads the
file. `build` turns those into a Config: literal addresses as they are, and
hostnames only when a resolver is given (`import --resolve`), each resolved
address then held to the same rules as a typed one. `client_file` writes the
companion client file whose remotes are the pinned addresses, so the client
never needs DNS while earlyfw blocks it.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from earlyfw.config import MARK_MAX, Config, IPAddress, endpoint_address, is_hostname, parse_address
from earlyfw.errors import ConfigError

# host -> its addresses, A records first; `family` (4, 6 or None) narrows the query.
Resolve = Callable[[str, "int | None"], Sequence[IPAddress]]


@dataclass(frozen=True)
class Remote:
    host: str  # an address, or a hostname as written
    port: int
    protocol: str  # "udp" | "tcp"
    family: int | None  # OpenVPN's udp4/tcp6...: only this address family
    where: str  # "file:line", for error messages
    line: int  # 0-based index of its line in the file
    block: tuple[int, int] | None = None  # OpenVPN <connection> block: first and last line


@dataclass
class Imported:
    kind: str
    interface: str
    remotes: list[Remote]
    dns: list[str]
    path: Path
    lines: list[str]
    # Filled by `build`: the addresses each remote's host was pinned to.
    pinned: dict[Remote, list[IPAddress]] = field(default_factory=dict)
    # The fwmark the client puts on its packets (FwMark, `mark`): [tunnel] mark.
    mark: int | None = None
    # What the user should know about the file earlyfw cannot fix itself.
    warnings: list[str] = field(default_factory=list)


def _number(value: str, what: str, where: str, high: int = 65535) -> int:
    # Only ASCII digits: str.isdigit() accepts '²' and Arabic-Indic digits,
    # which int() then rejects or reads as a different port.
    if not re.fullmatch(r"[0-9]{1,5}", value) or not 1 <= int(value) <= high:
        raise ConfigError(f"{where}: {what} {value!r} is not a number 1-{high}")
    return int(value)


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _check_host(value: str, where: str) -> None:
    """An address, or a hostname (resolved later, only with --resolve)."""
    if not is_hostname(value):
        parse_address(where, value)


def _read(path: Path) -> list[str]:
    try:
        # utf-8-sig: editors on Windows save with a byte order mark.
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None


# --- WireGuard ---------------------------------------------------------------

# wg-quick's first routing table for a full tunnel, which it also sets as the
# interface's fwmark (Table = auto, an AllowedIPs of /0, no FwMark).
WG_QUICK_FWMARK = 51820


def read_wireguard(path: Path) -> Imported:
    """wg-quick's INI dialect: one [Interface], any number of [Peer] sections
    (configparser refuses the repeated section names, hence this small reader)."""
    section = ""
    remotes: list[Remote] = []
    dns: list[str] = []
    mark = None
    table = "auto"
    full_tunnel = False
    lines = _read(path)
    for index, raw in enumerate(lines):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{index + 1}"
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        if not sep:
            raise ConfigError(f"{where}: {line!r} is not KEY = VALUE")
        key = key.lower()
        if section == "peer" and key == "endpoint":
            match = re.fullmatch(r"\[(?P<h6>[^\]]+)\]:(?P<p6>\S+)|(?P<h>[^:\s]+):(?P<p>\S+)", value)
            if not match:
                raise ConfigError(f"{where}: Endpoint {value!r} is not HOST:PORT or [IPv6]:PORT")
            host = match["h6"] or match["h"]
            _check_host(host, f"{where}: Endpoint")
            port = _number(match["p6"] or match["p"], "Endpoint port", where)
            remotes.append(Remote(host, port, "udp", None, where, index))
        elif section == "interface" and key == "dns":
            # DNS = may mix resolver addresses with search domains.
            dns += [v.strip() for v in value.split(",") if _is_address(v.strip())]
        elif section == "interface" and key == "fwmark":
            mark = _wireguard_mark(value, where)
        elif section == "interface" and key == "table":
            table = value.lower()
        elif section == "peer" and key == "allowedips":
            full_tunnel |= any(v.strip().endswith("/0") for v in value.split(","))
    imported = Imported("wireguard", path.stem, remotes, dns, path, lines, mark=mark)
    if mark is None and full_tunnel and table == "auto":
        # wg-quick routes a full tunnel by fwmark: it sets the first free table
        # number from 51820 as the interface's FwMark at run time. Naming it
        # lets a kernel tunnel's packets reach the endpoints whoever's socket
        # they carry (see the README's endpoint hole).
        imported.mark = WG_QUICK_FWMARK
        imported.warnings.append(
            f"{path}: wg-quick marks this full tunnel's packets with fwmark {WG_QUICK_FWMARK} (the first free "
            f"routing table from {WG_QUICK_FWMARK}): [tunnel] mark = {WG_QUICK_FWMARK}; check it with "
            f"`wg show {path.stem} fwmark` once the tunnel is up"
        )
    return imported


def _wireguard_mark(value: str, where: str) -> int | None:
    """FwMark as wg(8) reads it: off, 0 (no mark), decimal or 0x hex."""
    if value.lower() == "off":
        return None
    if not re.fullmatch(r"0[xX][0-9a-fA-F]{1,8}|[0-9]{1,10}", value) or int(value, 0) > MARK_MAX:
        raise ConfigError(f"{where}: FwMark {value!r} is not off or a 32-bit number")
    return int(value, 0) or None


# --- OpenVPN -----------------------------------------------------------------

_OPENVPN_PROTO: dict[str, tuple[str, int | None]] = {
    "udp": ("udp", None), "udp4": ("udp", 4), "udp6": ("udp", 6),
    "tcp": ("tcp", None), "tcp4": ("tcp", 4), "tcp6": ("tcp", 6),
    "tcp-client": ("tcp", None), "tcp4-client": ("tcp", 4), "tcp6-client": ("tcp", 6),
}  # fmt: skip


@dataclass
class _Defaults:
    port: str = "1194"
    proto: str = "udp"
    where: str = ""  # where proto was set, for its error


def _words(line: str, where: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = "#;"
    try:
        return list(lexer)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _inline_tag(words: list[str]) -> str | None:
    """OpenVPN's inline file: a line that is one `<name>` word."""
    if len(words) == 1 and len(words[0]) > 2 and words[0][0] == "<" and words[0][-1] == ">":
        return words[0][1:-1]
    return None


def _inline_end(lines: list[str], start: int, tag: str, path: Path) -> int:
    """The index of the line closing the inline block opened at `start`; like
    OpenVPN, the first line that starts (after spaces) with `</tag>`."""
    close = f"</{tag}>"
    for index in range(start + 1, len(lines)):
        if lines[index].lstrip().startswith(close):
            return index
    raise ConfigError(f"{path}:{start + 1}: inline block <{tag}> is never closed ({close} missing)")


def _remote(
    path: Path, index: int, host: str, *, port: str, proto: str, proto_where: str, block: tuple[int, int] | None
) -> Remote:
    where = f"{path}:{index + 1}"
    _check_host(host, f"{where}: remote")
    if proto not in _OPENVPN_PROTO:
        raise ConfigError(f"{proto_where or where}: proto {proto!r} is not a client udp or tcp protocol")
    protocol, family = _OPENVPN_PROTO[proto]
    if family is not None and _is_address(host) and ipaddress.ip_address(host).version != family:
        raise ConfigError(f"{where}: remote {host} is not an IPv{family} address, which proto {proto} requires")
    return Remote(host, _number(port, "port", where), protocol, family, where, index, block)


def read_openvpn(path: Path) -> Imported:
    """Every `remote`, read as OpenVPN reads them: a top-level remote takes
    the file's final `port`/`rport` and `proto` unless its line names them; a
    `<connection>` block starts from the options as they stand where it opens
    and its own `remote`, `port`, `proto` apply to it alone. Inline files
    (`<ca>`, `<tls-crypt-v2>`, any `<tag>`) are content, never options."""
    lines = _read(path)
    defaults = _Defaults()
    top: list[tuple[int, str, str | None, str | None]] = []  # line, host, port, proto
    remotes: list[Remote] = []
    dns: list[str] = []
    dev = "tun0"
    mark: int | None = None
    user: str | None = None
    index = 0
    while index < len(lines):
        where = f"{path}:{index + 1}"
        words = _words(lines[index], where)
        tag = _inline_tag(words)
        if tag is not None:
            end = _inline_end(lines, index, tag, path)
            if tag == "connection":
                remotes.append(_connection(path, lines, index, end, defaults))
            index = end + 1
            continue
        match words:
            case ["remote", host, *rest]:
                _check_host(host, f"{where}: remote")
                top.append((index, host, rest[0] if rest else None, rest[1] if len(rest) > 1 else None))
            case ["port" | "rport", port]:
                defaults.port = port
            case ["proto", proto]:
                defaults.proto, defaults.where = proto, where
            case ["dev", name]:
                # `dev tun` lets the kernel pick tunN; tun0 is what it picks first.
                dev = f"{name}0" if name in {"tun", "tap"} else name
            case ["dhcp-option", "DNS" | "DNS6", server]:
                dns.append(server)
            case ["mark", value]:
                # OpenVPN reads it with atoi: decimal only.
                if not re.fullmatch(r"[0-9]{1,10}", value) or int(value) > MARK_MAX:
                    raise ConfigError(f"{where}: mark {value!r} is not a 32-bit decimal number")
                mark = int(value) or None
            case ["user", name]:
                user = name
        index += 1
    for line, host, own_port, own_proto in top:
        proto_where = "" if own_proto else defaults.where
        remotes.append(
            _remote(
                path,
                line,
                host,
                port=own_port or defaults.port,
                proto=own_proto or defaults.proto,
                proto_where=proto_where,
                block=None,
            )
        )
    remotes.sort(key=lambda r: r.line)
    imported = Imported("openvpn", dev, remotes, dns, path, lines, mark=mark)
    if user is not None and mark is None:
        imported.warnings.append(
            f"{path}: `user {user}`: after a restart OpenVPN sends from a socket {user} opened, and earlyfw "
            "lets only root's sockets (or marked packets) reach the endpoints; add `mark 51820` to the file "
            "and `mark = 51820` under [tunnel] (any number, the same in both)"
        )
    return imported


def _connection(path: Path, lines: list[str], start: int, end: int, defaults: _Defaults) -> Remote:
    local = _Defaults(defaults.port, defaults.proto, defaults.where)
    found: tuple[int, str] | None = None
    index = start + 1
    while index < end:
        where = f"{path}:{index + 1}"
        words = _words(lines[index], where)
        tag = _inline_tag(words)
        if tag is not None:
            index = _inline_end(lines, index, tag, path) + 1
            if index > end:
                raise ConfigError(f"{where}: inline block <{tag}> runs past </connection>")
            continue
        match words:
            case ["remote", host, *rest]:
                found = (index, host)
                if rest:
                    local.port = rest[0]
                if len(rest) > 1:
                    local.proto, local.where = rest[1], where
            case ["port" | "rport", port]:
                local.port = port
            case ["proto", proto]:
                local.proto, local.where = proto, where
        index += 1
    if found is None:
        raise ConfigError(f"{path}:{start + 1}: a <connection> block needs a remote line")
    line, host = found
    return _remote(path, line, host, port=local.port, proto=local.proto, proto_where=local.where, block=(start, end))


# --- to a Config ---------------------------------------------------------------


def build(imported: Imported, resolve: Resolve | None = None) -> Config:
    """The Config: each remote's address, or with `resolve` every address its
    hostname has, `host` kept beside each. Fills `imported.pinned`."""
    path = imported.path
    if not imported.remotes:
        raise ConfigError(f"{path}: no endpoint found (no Endpoint = / remote line)")
    endpoints: dict[tuple[str, int, str], dict[str, Any]] = {}
    cache: dict[tuple[str, int | None], list[IPAddress]] = {}
    for remote in imported.remotes:
        label = "Endpoint" if imported.kind == "wireguard" else "remote"
        if not is_hostname(remote.host):
            address = endpoint_address(f"{remote.where}: {label}", remote.host)
            host = None
            addresses = [address]
        elif resolve is None:
            raise ConfigError(
                f"{remote.where}: {label} {remote.host!r} is a hostname; earlyfw needs IP addresses (--resolve)",
                hint="`earlyfw import --resolve` pins every address it has (and --client-out FILE writes a client "
                "file that uses them): the firewall must not depend on DNS, which it blocks",
            )
        else:
            host = remote.host.rstrip(".").lower()
            key = (host, remote.family)
            if key not in cache:
                cache[key] = [
                    endpoint_address(f"{remote.where}: {label} {host} resolved to", str(a))
                    for a in resolve(host, remote.family)
                ]
                if not cache[key]:
                    raise ConfigError(f"{remote.where}: {label} {host} has no address")
            addresses = cache[key]
        imported.pinned[remote] = addresses
        for address in addresses:
            entry: dict[str, Any] = {"address": str(address), "port": remote.port, "protocol": remote.protocol}
            if host is not None:
                entry["host"] = host
            endpoints.setdefault((str(address), remote.port, remote.protocol), entry)
    data: dict[str, Any] = {
        "tunnel": {"kind": imported.kind, "interface": imported.interface},
        "endpoint": list(endpoints.values()),
        "dns": {"servers": list(dict.fromkeys(imported.dns))},
    }
    if imported.mark is not None:
        data["tunnel"]["mark"] = imported.mark
    try:
        return Config.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}", hint=e.hint) from None


def hostnames(imported: Imported) -> list[str]:
    return list(dict.fromkeys(r.host for r in imported.remotes if is_hostname(r.host)))


# --- the companion client file -------------------------------------------------------


def client_file(imported: Imported) -> str:
    """The client's file with every hostname replaced by its pinned addresses,
    everything else byte for byte. OpenVPN: one `remote IP ...` line per
    address where the hostname's line was (order, port and protocol words
    kept); a <connection> block holds exactly one remote, so the block is
    repeated once per address. WireGuard: a peer has one endpoint, so it gets
    the first address (every one of them is allowed by the firewall)."""
    by_line = {r.line: r for r in imported.remotes if is_hostname(r.host)}
    blocks = {r.block[0]: r for r in by_line.values() if r.block is not None}
    out: list[str] = []
    index = 0
    lines = imported.lines
    while index < len(lines):
        if index in blocks:
            remote = blocks[index]
            assert remote.block is not None
            start, end = remote.block
            for address in imported.pinned[remote]:
                for i in range(start, end + 1):
                    out.append(_pin(imported, lines[i], address) if i == remote.line else lines[i])
            index = end + 1
            continue
        remote_here = by_line.get(index)
        if remote_here is None:
            out.append(lines[index])
        elif imported.kind == "wireguard":
            out.append(_pin(imported, lines[index], imported.pinned[remote_here][0]))
        else:
            out.extend(_pin(imported, lines[index], a) for a in imported.pinned[remote_here])
        index += 1
    header = (
        "# Written by `earlyfw import --client-out` from "
        f"{imported.path.name}: hostnames replaced by the addresses earlyfw pins,\n"
        "# so this client never needs DNS while the kill switch blocks it.\n"
    )
    return header + "\n".join(out) + "\n"


def _pin(imported: Imported, line: str, address: IPAddress) -> str:
    if imported.kind == "wireguard":
        host = f"[{address}]" if address.version == 6 else str(address)
        return re.sub(r"(=\s*)\S+?(:[0-9]+)", lambda m: f"{m[1]}{host}{m[2]}", line, count=1)
    # `remote HOST rest`: only the host word changes.
    return re.sub(r"^(\s*remote\s+)\S+", lambda m: f"{m[1]}{address}", line, count=1)


def from_wireguard(path: Path, resolve: Resolve | None = None) -> Config:
    return build(read_wireguard(path), resolve)


def from_openvpn(path: Path, resolve: Resolve | None = None) -> Config:
    return build(read_openvpn(path), resolve)


READERS: dict[str, Callable[[Path], Imported]] = {"wg": read_wireguard, "openvpn": read_openvpn}
IMPORTERS: dict[str, Callable[..., Config]] = {"wg": from_wireguard, "openvpn": from_openvpn}
