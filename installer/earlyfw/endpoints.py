"""`earlyfw endpoints refresh`: re-resolve the hostnames endpoints were pinned
from (`host = "..."` in the config) and swap the pins.

A host whose lookup fails, or that answers with an address no endpoint may
have, keeps its old pins: a resolver outage or a poisoned answer never empties
the allow list under a running tunnel. And a pin the tunnel is using right now
(a live connection-tracking flow to it) stays even when DNS no longer lists it,
so a rotation never cuts the running tunnel; a later refresh drops it once the
client has moved on.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Set
from pathlib import Path

from earlyfw.config import Config, Endpoint, IPAddress, Protocol, endpoint_dict, unusable_endpoint
from earlyfw.errors import EarlyfwError
from earlyfw.importers import Resolve

Log = Callable[[str], None]


Key = tuple[IPAddress, int, Protocol]


def refreshed(config: Config, lookup: Resolve, log: Log, in_use: Set[Key] = frozenset()) -> Config:
    """`config` with each hostname's endpoints replaced by its current
    addresses, where its first endpoint was; every other endpoint unchanged,
    and every old pin in `in_use` kept."""
    answers = {host: _lookup(host, lookup, log) for host in dict.fromkeys(e.host for e in config.endpoints if e.host)}
    pins: dict[object, Endpoint] = {}
    done: set[tuple[str, int, str]] = set()
    for endpoint in config.endpoints:
        fresh = answers.get(endpoint.host) if endpoint.host else None
        if endpoint.host is None or fresh is None:
            pins.setdefault(endpoint.key, endpoint)
            continue
        group = (endpoint.host, endpoint.port, str(endpoint.protocol))
        if group not in done:
            done.add(group)
            for address in fresh:
                pin = Endpoint(address, endpoint.port, endpoint.protocol, endpoint.host)
                pins.setdefault(pin.key, pin)
        if endpoint.key in in_use and endpoint.address not in fresh:
            log(f"kept {endpoint} ({endpoint.host}): no longer in DNS, but the tunnel is using it")
            pins.setdefault(endpoint.key, endpoint)
    new = Config.from_dict({**config.to_dict(), "endpoint": [endpoint_dict(e) for e in pins.values()]})
    old_keys, new_keys = {e.key for e in config.endpoints}, {e.key for e in new.endpoints}
    for e in new.endpoints:
        if e.key not in old_keys:
            log(f"added {e} ({e.host})")
    for e in config.endpoints:
        if e.key not in new_keys:
            log(f"removed {e} ({e.host})")
    return new


def _lookup(host: str, lookup: Resolve, log: Log) -> list[IPAddress] | None:
    try:
        addresses = list(lookup(host, None))
    except EarlyfwError as e:
        log(f"kept the pins of {host}: {e}")
        return None
    if not addresses:
        log(f"kept the pins of {host}: it has no A or AAAA record")
        return None
    for address in addresses:
        why = unusable_endpoint(address)
        if why:
            log(f"kept the pins of {host}: it resolved to {address}, {why}")
            return None
    return addresses


_FLOW = re.compile(r"^ipv[46]\s+\d+\s+(?P<proto>udp|tcp)\s+\d+\s+\d+\s.*?\bdst=(?P<dst>\S+)\s.*?\bdport=(?P<dport>\d+)")


def tunnel_flows(config: Config, log: Log, table: Path = Path("/proc/net/nf_conntrack")) -> set[Key]:
    """The pinned endpoints with a live flow in this network namespace's
    connection tracking (the relaxed ruleset tracks every flow): the ones the
    tunnel is using now."""
    try:
        text = table.read_text()
    except OSError as e:
        log(f"cannot tell which endpoint the tunnel uses ({table}: {e.strerror}); removing what DNS dropped")
        return set()
    pinned = {e.key for e in config.endpoints}
    found: set[Key] = set()
    for line in text.splitlines():
        match = _FLOW.match(line)
        if match:
            key = (ipaddress.ip_address(match["dst"]), int(match["dport"]), Protocol(match["proto"]))
            if key in pinned:
                found.add(key)
    return found
