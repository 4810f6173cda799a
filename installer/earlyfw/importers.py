"""Build an earlyfw Config from a VPN client's own configuration file, so the
endpoints and resolvers come from one source of truth."""

from __future__ import annotations

import ipaddress
import re
import shlex
from pathlib import Path
from typing import Any

from earlyfw.config import Config, parse_address
from earlyfw.errors import ConfigError


def _split_host_port(value: str, where: str) -> tuple[str, str]:
    match = re.fullmatch(r"\[(?P<h6>[^\]]+)\]:(?P<p6>\S+)|(?P<h>[^:\s]+):(?P<p>\S+)", value)
    if not match:
        raise ConfigError(f"{where}: {value!r} is not HOST:PORT or [IPv6]:PORT")
    return (match["h6"] or match["h"]), (match["p6"] or match["p"])


def _port(value: str, where: str) -> int:
    if not value.isdigit():
        raise ConfigError(f"{where}: port {value!r} is not a number")
    return int(value)


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def from_wireguard(path: Path) -> Config:
    """wg-quick's INI dialect: one [Interface], any number of [Peer] sections
    (configparser refuses the repeated section names, hence this small reader)."""
    section = ""
    endpoints: list[dict[str, Any]] = []
    dns: list[str] = []
    for number, raw in enumerate(_read(path).splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{number}"
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        if not sep:
            raise ConfigError(f"{where}: {line!r} is not KEY = VALUE")
        key = key.lower()
        if section == "peer" and key == "endpoint":
            host, port = _split_host_port(value, f"{where}: Endpoint")
            parse_address(f"{where}: Endpoint", host)
            endpoints.append({"address": host, "port": _port(port, f"{where}: Endpoint"), "protocol": "udp"})
        elif section == "interface" and key == "dns":
            # DNS = may mix resolver addresses with search domains.
            dns += [v.strip() for v in value.split(",") if _is_address(v.strip())]
    return _build("wireguard", path.stem, endpoints, dns, path)


_OPENVPN_PROTO = {
    "udp": "udp", "udp4": "udp", "udp6": "udp",
    "tcp": "tcp", "tcp4": "tcp", "tcp6": "tcp",
    "tcp-client": "tcp", "tcp4-client": "tcp", "tcp6-client": "tcp",
}  # fmt: skip


def from_openvpn(path: Path) -> Config:
    """Every `remote` (inside <connection> blocks too), with the file's default
    `port`/`rport` and `proto`; `dev`; `dhcp-option DNS`."""
    default_port, default_proto, dev = "1194", "udp", "tun0"
    remotes: list[tuple[str, str | None, str | None, str]] = []
    dns: list[str] = []
    inline: str | None = None
    for number, raw in enumerate(_read(path).splitlines(), 1):
        line = raw.strip()
        where = f"{path}:{number}"
        if inline:  # skip <ca>...</ca> and friends
            if line == f"</{inline}>":
                inline = None
            continue
        tag = re.fullmatch(r"<([a-z-]+)>", line)
        if tag and tag[1] != "connection":
            inline = tag[1]
            continue
        if not line or line[0] in "#;" or line.startswith("<"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if not words:
            continue
        match words:
            case ["remote", host, *rest]:
                parse_address(f"{where}: remote", host)
                remotes.append((host, rest[0] if rest else None, rest[1] if len(rest) > 1 else None, where))
            case ["port" | "rport", port]:
                default_port = port
            case ["proto", proto]:
                default_proto = proto
            case ["dev", name]:
                # `dev tun` lets the kernel pick tunN; tun0 is what it picks first.
                dev = f"{name}0" if name in {"tun", "tap"} else name
            case ["dhcp-option", "DNS" | "DNS6", server]:
                dns.append(server)
    endpoints = []
    for host, remote_port, remote_proto, where in remotes:
        proto_name = _OPENVPN_PROTO.get(remote_proto or default_proto, "")
        if not proto_name:
            raise ConfigError(f"{where}: proto {remote_proto or default_proto!r} is not udp or tcp")
        port_number = _port(remote_port or default_port, f"{where}: remote")
        endpoints.append({"address": host, "port": port_number, "protocol": proto_name})
    return _build("openvpn", dev, endpoints, dns, path)


def _build(kind: str, interface: str, endpoints: list[dict[str, Any]], dns: list[str], path: Path) -> Config:
    if not endpoints:
        raise ConfigError(f"{path}: no endpoint found (no Endpoint = / remote line)")
    unique = list({(e["address"], e["port"], e["protocol"]): e for e in endpoints}.values())
    data = {
        "tunnel": {"kind": kind, "interface": interface},
        "endpoint": unique,
        "dns": {"servers": list(dict.fromkeys(dns))},
    }
    try:
        return Config.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}", hint=e.hint) from None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None


IMPORTERS = {"wg": from_wireguard, "openvpn": from_openvpn}
