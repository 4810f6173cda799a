"""The pure parts of earlyfw.linux.nft: splitting a ruleset into batches for a user
namespace, cutting a ruleset listing into tables, counters, normalising; and the
facts the rendered rules take from earlyfw.policy alone."""

from __future__ import annotations

import ipaddress
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earlyfw import policy
from earlyfw.config import Config, Endpoint, Transport, TunnelKind
from earlyfw.linux import nft
from earlyfw.macos import target as macos
from earlyfw.policy import State
from earlyfw.windows import rules as wfp


def config(v4: int, v6: int, egress: bool) -> Config:
    endpoints = [Endpoint(ipaddress.ip_address("198.18.0.1") + i, 51820, Transport.UDP) for i in range(v4)]
    endpoints += [Endpoint(ipaddress.ip_address("2001:db8::1") + i, 443, Transport.TCP) for i in range(v6)]
    return Config(
        tunnel_kind=TunnelKind.WIREGUARD,
        interface="wg0",
        endpoints=tuple(endpoints),
        dns_servers=(ipaddress.ip_address("10.64.0.1"),),
        egress_interfaces=("eth0",) if egress else (),
    )


@settings(max_examples=60, deadline=None)
@given(
    v4=st.integers(0, 40),
    v6=st.integers(0, 40),
    limit=st.integers(1, 9),
    state=st.sampled_from(list(State)),
    egress=st.booleans(),
)
def test_split_elements_moves_every_element_into_small_batches(
    v4: int, v6: int, limit: int, state: State, egress: bool
) -> None:
    if v4 + v6 == 0:
        v4 = 1
    script = policy.render(config(v4, v6, egress), state, egress_devices=["eth0"] if egress else [])
    head, *rest = nft.split_elements(script, limit)
    assert "elements = {\n" not in head
    # The head is the script minus exactly the element lines and their braces.
    element_lines = [line.strip() for line in re.findall(r"elements = \{\n(.*?)\n\t\t\}", script, re.S)]
    expected = sorted(e.strip() for block in element_lines for e in block.splitlines())
    moved = []
    for batch in rest:
        lines = [line.strip() for line in batch.splitlines() if line.startswith("\t")]
        assert 0 < len(lines) <= limit
        assert all(re.fullmatch(r"add element (inet earlyfw|netdev earlyfw_egress) \w+ \{", line) for line in
                   batch.splitlines() if not line.startswith("\t") and line != "}")  # fmt: skip
        moved += lines
    assert sorted(moved) == expected


def test_split_tables_and_counters() -> None:
    listing = "table inet a {\n\tchain c {\n\t}\n}\ntable netdev earlyfw_egress {\n\tcounter x {\n\t}\n}\n"
    tables = nft.split_tables(listing)
    assert list(tables) == [("inet", "a"), ("netdev", "earlyfw_egress")]
    assert tables[("inet", "a")] == "table inet a {\n\tchain c {\n\t}\n}\n"
    counters = json.dumps(
        {
            "nftables": [
                {"metainfo": {}},
                {"counter": {"family": "inet", "table": "earlyfw", "name": "refused_out", "packets": 3, "bytes": 9}},
                {"counter": {"family": "inet", "table": "earlyfw_guard", "name": "refused_out", "packets": 2,
                             "bytes": 4}},
            ]
        }
    )  # fmt: skip
    parsed = nft.parse_counters(counters)
    assert parsed == {("inet", "earlyfw"): {"refused_out": (3, 9)}, ("inet", "earlyfw_guard"): {"refused_out": (2, 4)}}
    assert nft.add_counters(*parsed.values()) == {"refused_out": (5, 13)}


def test_normalise_sorts_and_deduplicates_elements() -> None:
    one = "set s {\n\t\telements = { b . udp . 1,\n\t\t\t     a . udp . 2,\n\t\t\t     b . udp . 1 }\n\t}\n"
    other = "set s {\n\t\telements = { a . udp . 2, b . udp . 1 }\n\t}\n"
    assert nft.normalise(one) == nft.normalise(other)
    assert nft.normalise(one) != nft.normalise(other.replace("a . udp", "c . udp"))


def test_the_tables_take_their_names_from_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy, "MAIN", policy.Tables("other", "other_egress"))
    script = policy.render(config(1, 1, True), State.RELAXED, egress_devices=["eth0"], guard=nft.GUARD)
    tables = re.findall(r"^(?:delete )?table (\w+ \w+)", script, re.M)
    assert tables == [*["inet other"] * 3, *["netdev other_egress"] * 3, *["inet earlyfw_guard"] * 3,
                      *["netdev earlyfw_egress_guard"] * 3]  # fmt: skip


def test_every_platform_takes_the_dns_ports_from_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy, "DNS_PORTS", (53, 853, 5353))
    mac = Config(
        tunnel_kind=TunnelKind.WIREGUARD,
        interface="utun3",
        endpoints=(Endpoint(ipaddress.IPv4Address("198.51.100.7"), 51820),),
        dns_servers=(ipaddress.IPv4Address("10.64.0.1"),),
    )
    assert "elements = { udp . 53, tcp . 53, udp . 853, tcp . 853, udp . 5353, tcp . 5353 }" in policy.render(
        mac, State.RELAXED
    )
    rendered = macos.render(mac)
    assert "port 5353\n" in rendered.rules and "port 5353\n" in rendered.tunnel
    ports = {
        condition.value
        for f in (*wfp.persistent_set(mac), *wfp.relax_set(mac, wfp.Interface("utun3", 1)))
        for condition in f.conditions
        if condition.field is wfp.Field.REMOTE_PORT
    }
    assert {53, 853, 5353} <= ports
