"""A model of how pf evaluates the subset earlyfw writes, over the rulesets
earlyfw.macos.pf parses, so the tests can ask on Linux what a Mac would do
with a packet.

It follows pf for this subset: scrub rules run first (a fragment is
reassembled only where a scrub rule applies to it), anchors are called by
path (`com.apple/*` runs every anchor under com.apple in name order), `user`
is matched against the socket's owner, and a fragment pf has not reassembled
has no ports to match. Every rule in the subset is quick, so the first match
decides. A test double: the product only parses and checks its anchors, so
this ships in neither the wheel nor the binary.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, replace

from earlyfw.macos.pf import Address, AnchorCall, Direction, Family, PfRuleset, Rule, Table

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Packet:
    direction: Direction
    interface: str
    src: IPAddress
    dst: IPAddress
    proto: str
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    uid: int | None = None  # the local socket's owner; None: no local socket
    fragment: bool = False  # a fragment pf has not reassembled

    @property
    def family(self) -> Family:
        return Family.INET if self.src.version == 4 else Family.INET6


def evaluate(
    ruleset: PfRuleset, packet: Packet, anchors: Mapping[str, PfRuleset] | None = None, *, path: str = ""
) -> Rule | None:
    """The rule that decides `packet`, or None when no rule matches (pf then
    passes it: its default rule is pass). `anchors` holds every loaded anchor
    by its path; `path` is the ruleset's own (empty for the main ruleset).
    Scrub rules run first: a fragment is reassembled if one applies. Every
    rule in the subset is quick, so the first match decides, inside a called
    anchor as much as outside it."""
    anchors = anchors or {}
    if packet.fragment and _reassembles(ruleset, packet, anchors, path):
        packet = replace(packet, fragment=False)
    return _evaluate(ruleset, packet, anchors, path)


def _called(name: str, path: str, anchors: Mapping[str, PfRuleset]) -> list[str]:
    """The anchors a call reaches: relative to the caller's path; `x/*` is
    every anchor directly under x, in name order, as pf runs them."""
    full = f"{path}/{name}" if path else name
    if full.endswith("/*"):
        parent = full[:-2]
        return sorted(k for k in anchors if k.rpartition("/")[0] == parent)
    return [full] if full in anchors else []


def _reassembles(ruleset: PfRuleset, packet: Packet, anchors: Mapping[str, PfRuleset], path: str) -> bool:
    for scrub in ruleset.scrubs:
        if scrub.direction not in (None, packet.direction):
            continue
        if scrub.anchor is None:
            if scrub.reassemble:
                return True
        elif any(_reassembles(anchors[a], packet, anchors, a) for a in _called(scrub.anchor, path, anchors)):
            return True
    return False


def _evaluate(ruleset: PfRuleset, packet: Packet, anchors: Mapping[str, PfRuleset], path: str) -> Rule | None:
    for statement in ruleset.rules:
        if isinstance(statement, AnchorCall):
            for name in _called(statement.name, path, anchors):
                decided = _evaluate(anchors[name], packet, anchors, name)
                if decided is not None:
                    return decided
        elif _matches(statement, ruleset.tables, packet):
            return statement
    return None


def _families(rule: Rule) -> tuple[Family, ...]:
    return (rule.family,) if rule.family else (Family.INET, Family.INET6)


def _needs_transport_header(rule: Rule) -> bool:
    """What pf cannot match on a fragment it has not reassembled."""
    return any(v is not None for v in (rule.src_port, rule.dst_port, rule.icmp_type, rule.user))


def _matches(rule: Rule, tables: Mapping[str, Table], p: Packet) -> bool:
    if rule.direction is not None and rule.direction is not p.direction:
        return False
    if p.fragment and _needs_transport_header(rule):
        return False
    if rule.user is not None and rule.user != p.uid:
        return False
    if rule.interface is not None and (rule.interface == p.interface) == rule.interface_negated:
        return False
    if p.family not in _families(rule):
        return False
    if rule.proto is not None and rule.proto != p.proto:
        return False
    if not (_address_matches(rule.src, tables, p.src) and _address_matches(rule.dst, tables, p.dst)):
        return False
    if rule.src_port is not None and rule.src_port != p.sport:
        return False
    if rule.dst_port is not None and rule.dst_port != p.dport:
        return False
    if rule.icmp_type is not None and rule.icmp_type != p.icmp_type:
        return False
    return rule.icmp_code is None or rule.icmp_code == p.icmp_code


def _address_matches(address: Address, tables: Mapping[str, Table], ip: IPAddress) -> bool:
    if address.table is not None:
        return any(ip in network for network in tables[address.table].entries) != address.negated
    if address.network is not None:
        return ip in address.network
    return True
