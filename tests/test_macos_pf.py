"""The macOS pf anchor, checked on Linux.

pf cannot run here, so these tests parse the rendered rules with
earlyfw.macos.pf (a parser for exactly the subset earlyfw emits: rule order,
`quick`, address families, tables) and evaluate packets against them with the
same first-quick-match semantics pf applies (tests/pf_evaluator.py). What only a Mac can confirm, and
how:

- that pf accepts the files: `sudo pfctl -vnf "/Library/Application
  Support/earlyfw/earlyfw.pf"` (and tunnel.pf, emergency.pf) parses without
  loading;
- that pf holds what was loaded: `sudo pfctl -a com.apple/000.earlyfw -sr`
  lists the rules in this order (and `-a com.apple/000.earlyfw/tunnel -sr`
  the tunnel's, once relaxed); `sudo pfctl -a com.apple/000.earlyfw -sT`
  the tables;
- boot ordering: `sudo launchctl print system/org.earlyfw.pf` (state, last
  exit code) and the first lines of /var/log/earlyfw.log after a reboot.

Set EARLYFW_UPDATE_GOLDEN=1 to rewrite the golden files after an intended change.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from pathlib import Path

import pytest

from earlyfw import config, policy
from earlyfw.errors import ConfigError
from earlyfw.macos import pf
from earlyfw.macos import target as macos
from earlyfw.macos.pf import Action, Direction
from tests.pf_evaluator import Packet, evaluate

GOLDEN = Path(__file__).parent / "golden" / "macos"
EXAMPLE = Path(__file__).parents[1] / "payload" / "examples" / "earlyfw.toml"

# The example config, on the utun device wg-quick creates for `wg-quick up utun9`.
EXAMPLE_CONFIG = config.parse(EXAMPLE.read_text().replace('interface = "wg0"', 'interface = "utun9"'))

# OpenVPN over TCP and UDP, both families, LAN allowed, an IPv6-only resolver.
LAN_TCP_CONFIG = config.parse(
    """
[tunnel]
kind = "openvpn"
interface = "utun4"

[[endpoint]]
address = "203.0.113.10"
port = 443
protocol = "tcp"

[[endpoint]]
address = "203.0.113.11"
port = 443
protocol = "tcp"

[[endpoint]]
address = "2001:db8::10"
port = 1194
protocol = "udp"

[[endpoint]]
address = "203.0.113.12"
port = 1194
protocol = "udp"

[dns]
servers = ["2001:db8:53::1"]

[lan]
allow = true
"""
)

CONFIGS = {"example": EXAMPLE_CONFIG, "lan-tcp": LAN_TCP_CONFIG}


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def out(dst: str, dport: int, *, proto: str = "udp", on: str = "en0", uid: int | None = None) -> Packet:
    src = "192.0.2.2" if ip(dst).version == 4 else "2001:db8:1::2"
    return Packet(Direction.OUT, on, ip(src), ip(dst), proto, 50000, dport, uid=uid)


ROOT = 0  # the tunnel's sockets: wireguard-go under wg-quick, Tunnelblick's OpenVPN


def inbound(src: str, sport: int, *, dport: int = 50000, proto: str = "udp", on: str = "en0") -> Packet:
    dst = "192.0.2.2" if ip(src).version == 4 else "2001:db8:1::2"
    return Packet(Direction.IN, on, ip(src), ip(dst), proto, sport, dport)


class Anchor:
    """The rendered anchor and its tunnel sub-anchor, parsed, for one config."""

    def __init__(self, cfg: config.Config) -> None:
        rendered = macos.render(cfg)
        self.main = pf.parse(rendered.rules)
        self.tunnel = pf.parse(rendered.tunnel)

    def verdict(self, packet: Packet, *, relaxed: bool = False) -> str:
        """'pass', 'return' (refused), 'drop', or 'default' (no rule: pf passes)."""
        rule = evaluate(self.main, packet, {macos.TUNNEL: self.tunnel} if relaxed else {})
        if rule is None:
            return "default"
        return "pass" if rule.action is Action.PASS else str(rule.policy)

    def deciding(self, packet: Packet, *, relaxed: bool = False) -> pf.Rule:
        rule = evaluate(self.main, packet, {macos.TUNNEL: self.tunnel} if relaxed else {})
        assert rule is not None
        return rule


NO_EARLYFW = pf.PfRuleset(())


def without_earlyfw(packet: Packet) -> str:
    """The control: with no earlyfw anchor, pf's default rule passes everything."""
    return "default" if evaluate(NO_EARLYFW, packet) is None else "decided"


# --- Golden files ------------------------------------------------------------


def golden_files() -> list[tuple[str, str]]:
    cases = [("example", name) for name in ("earlyfw.pf", "tunnel.pf", "emergency.pf", "earlyfw-pf", "plist")]
    return [*cases, ("lan-tcp", "earlyfw.pf"), ("lan-tcp", "tunnel.pf"), ("lan-tcp", "earlyfw-pf")]


@pytest.mark.parametrize(("name", "file"), golden_files(), ids=str)
def test_rendered_files_match_golden(name: str, file: str) -> None:
    rendered = macos.render(CONFIGS[name])
    text = {
        "earlyfw.pf": rendered.rules,
        "tunnel.pf": rendered.tunnel,
        "emergency.pf": rendered.emergency,
        "earlyfw-pf": rendered.script,
        "plist": rendered.plist.decode(),
    }[file]
    path = GOLDEN / name / (f"{macos.LABEL}.plist" if file == "plist" else file)
    if os.environ.get("EARLYFW_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with EARLYFW_UPDATE_GOLDEN=1 once"
    assert text == path.read_text(), f"{path} differs; if intended, rerun with EARLYFW_UPDATE_GOLDEN=1"


def test_golden_files_parse() -> None:
    """The golden files themselves are inside the subset (a hand edit that
    broke one would otherwise be compared, not checked)."""
    for name, cfg in CONFIGS.items():
        main = pf.parse((GOLDEN / name / "earlyfw.pf").read_text())
        pf.check_main(main, cfg.interface, macos.TUNNEL)
        pf.check_tunnel(pf.parse((GOLDEN / name / "tunnel.pf").read_text()), cfg.interface)


# --- Structure -----------------------------------------------------------------


def test_one_table_per_protocol_and_port() -> None:
    main = Anchor(LAN_TCP_CONFIG).main
    tables = {name: sorted(map(str, t.entries)) for name, t in main.tables.items() if name != macos.LAN_TABLE}
    assert tables == {
        "earlyfw_tcp_443": ["203.0.113.10/32", "203.0.113.11/32"],
        "earlyfw_udp_1194": ["2001:db8::10/128", "203.0.113.12/32"],
    }
    for table in main.tables.values():
        assert table.flags == {"const", "persist"}


def test_rule_order_and_families() -> None:
    main = Anchor(LAN_TCP_CONFIG).main
    rules = main.rules
    first = rules[0]
    assert isinstance(first, pf.Rule) and first.interface == "lo0" and first.action is Action.PASS
    assert all(r.quick for r in main.filter_rules())
    kinds = []
    for r in rules:
        if isinstance(r, pf.AnchorCall):
            kinds.append("tunnel")
        elif r.dst.table and r.dst.table.startswith("earlyfw_") and r.dst.table != macos.LAN_TABLE:
            kinds.append("endpoint")
        elif r.dst_port in policy.DNS_PORTS and r.action is Action.BLOCK:
            kinds.append("dns")
        elif macos.LAN_TABLE in (r.src.table, r.dst.table):
            kinds.append("lan")
        elif r.action is Action.BLOCK:
            kinds.append("catch-all")
    order = [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
    assert order == ["endpoint", "dns", "lan", "tunnel", "catch-all"]
    catch_all = [(r.policy, r.direction, r.family) for r in main.filter_rules()[-4:]]
    assert catch_all == [
        ("return", Direction.OUT, pf.Family.INET),
        ("return", Direction.OUT, pf.Family.INET6),
        ("drop", None, pf.Family.INET),
        ("drop", None, pf.Family.INET6),
    ]
    # Every endpoint group gets a rule per family it holds, in and out.
    endpoint_rules = {
        (r.family, r.direction, r.dst.table or r.src.table)
        for r in main.filter_rules()
        if r.src_port in (443, 1194) or r.dst_port in (443, 1194)
    }
    assert endpoint_rules == {
        (pf.Family.INET, d, t) for d in Direction for t in ("earlyfw_tcp_443", "earlyfw_udp_1194")
    } | {(pf.Family.INET6, d, "earlyfw_udp_1194") for d in Direction}


def test_rule_count_in_script_matches_anchor() -> None:
    rendered = macos.render(EXAMPLE_CONFIG)
    count = len(pf.parse(rendered.rules))  # what `pfctl -s rules` lists: scrub and filter rules
    assert f"\nRULE_COUNT={count}\n" in rendered.script


# --- What the rules do (blocked state unless said otherwise) -------------------


def test_endpoints_pass_on_their_own_port_and_protocol_only() -> None:
    anchor = Anchor(EXAMPLE_CONFIG)
    assert anchor.verdict(out("198.51.100.7", 51820, uid=ROOT)) == "pass"
    assert anchor.verdict(out("2001:db8::7", 51820, uid=ROOT)) == "pass"
    assert anchor.verdict(inbound("198.51.100.7", 51820)) == "pass"
    assert anchor.verdict(out("198.51.100.7", 51821, uid=ROOT)) == "return"
    assert anchor.verdict(out("198.51.100.7", 51820, proto="tcp", uid=ROOT)) == "return"
    assert anchor.verdict(out("198.51.100.8", 51820, uid=ROOT)) == "return"
    assert anchor.verdict(inbound("198.51.100.8", 51820)) == "drop"
    # Control: the refused probes do get through when earlyfw is not loaded.
    assert without_earlyfw(out("198.51.100.7", 51821)) == "default"


def test_a_tcp_endpoint_is_not_reachable_over_udp() -> None:
    anchor = Anchor(LAN_TCP_CONFIG)
    assert anchor.verdict(out("203.0.113.10", 443, proto="tcp", uid=ROOT)) == "pass"
    assert anchor.verdict(out("203.0.113.10", 443, proto="udp", uid=ROOT)) == "return"
    assert anchor.verdict(out("203.0.113.12", 1194, uid=ROOT)) == "pass"
    assert anchor.verdict(out("203.0.113.12", 443, proto="tcp", uid=ROOT)) == "return"


@pytest.mark.parametrize("kind", ["wireguard", "openvpn", "manual"])
def test_only_root_sockets_reach_the_endpoints(kind: str) -> None:
    """Issue 13, part 4: any other program sending to endpoint:port is
    refused as it would be to any other host; root's sockets (the tunnel's)
    pass. pf has no marks and a manual tunnel's program is unknown, so a
    manual tunnel's endpoints stay open to every local program."""
    cfg = config.Config.from_dict(
        {"tunnel": {"kind": kind, "interface": "utun9"}, "endpoint": [{"address": "198.51.100.7", "port": 51820}]}
    )
    anchor = Anchor(cfg)
    user = 501
    assert anchor.verdict(out("198.51.100.7", 51820, uid=ROOT)) == "pass"
    assert anchor.verdict(out("198.51.100.7", 51820, uid=user)) == ("pass" if kind == "manual" else "return")
    # Control: without earlyfw the user's packet leaves.
    assert without_earlyfw(out("198.51.100.7", 51820, uid=user)) == "default"


@pytest.mark.parametrize("family", [4, 6])
def test_everything_else_is_refused_out_and_dropped_in(family: int) -> None:
    anchor = Anchor(EXAMPLE_CONFIG)
    host = "203.0.113.5" if family == 4 else "2001:db8:ffff::5"
    assert anchor.verdict(out(host, 443, proto="tcp")) == "return"
    assert anchor.verdict(inbound(host, 443, dport=22, proto="tcp")) == "drop"
    assert without_earlyfw(out(host, 443, proto="tcp")) == "default"


def test_dns_outside_the_tunnel_is_refused_even_with_lan_allowed() -> None:
    anchor = Anchor(LAN_TCP_CONFIG)
    for dst, port, proto in [("9.9.9.9", 53, "udp"), ("192.168.1.1", 53, "udp"), ("fd00::1", 853, "tcp")]:
        rule = anchor.deciding(out(dst, port, proto=proto))
        assert (rule.action, rule.policy, rule.dst_port) == (Action.BLOCK, "return", port)
        assert rule.interface == "utun4" and rule.interface_negated
    # Control: the same LAN host on another port is reachable (lan allow = true).
    assert anchor.verdict(out("192.168.1.1", 445, proto="tcp")) == "pass"


def test_a_vpn_server_on_port_53_still_connects() -> None:
    cfg = config.Config.from_dict(
        {"tunnel": {"kind": "wireguard", "interface": "utun9"}, "endpoint": [{"address": "198.51.100.53", "port": 53}]}
    )
    anchor = Anchor(cfg)
    assert anchor.verdict(out("198.51.100.53", 53, uid=ROOT)) == "pass"
    assert anchor.verdict(out("198.51.100.54", 53, uid=ROOT)) == "return"


def test_lan_only_when_allowed() -> None:
    probe = out("192.168.1.20", 445, proto="tcp")
    assert Anchor(EXAMPLE_CONFIG).verdict(probe) == "return"
    assert Anchor(LAN_TCP_CONFIG).verdict(probe) == "pass"
    assert Anchor(LAN_TCP_CONFIG).verdict(inbound("fe80::1", 5353)) == "pass"


def test_dhcp_and_neighbour_discovery_pass() -> None:
    anchor = Anchor(EXAMPLE_CONFIG)
    unspecified = ip("0.0.0.0")  # noqa: S104 - a DHCP DISCOVER's source address, not a bind
    dhcp = Packet(Direction.OUT, "en0", unspecified, ip("255.255.255.255"), "udp", 68, 67)
    assert anchor.verdict(dhcp) == "pass"
    offer = Packet(Direction.IN, "en0", ip("192.0.2.1"), ip("255.255.255.255"), "udp", 67, 68, uid=0)
    assert anchor.verdict(offer) == "pass"
    renew = Packet(Direction.OUT, "en0", ip("192.0.2.2"), ip("192.0.2.1"), "udp", 68, 67, uid=0)
    assert anchor.verdict(renew) == "pass"
    solicit = Packet(Direction.OUT, "en0", ip("fe80::2"), ip("ff02::1:2"), "udp", 546, 547)
    assert anchor.verdict(solicit) == "pass"
    ns = Packet(Direction.OUT, "en0", ip("fe80::2"), ip("ff02::1:ff00:1"), "ipv6-icmp", icmp_type=135)
    assert anchor.verdict(ns) == "pass"
    dad = Packet(Direction.IN, "en0", ip("::"), ip("ff02::1:ff00:2"), "ipv6-icmp", icmp_type=135)
    assert anchor.verdict(dad) == "pass"
    ra = Packet(Direction.IN, "en0", ip("fe80::1"), ip("ff02::1"), "ipv6-icmp", icmp_type=134)
    assert anchor.verdict(ra) == "pass"
    # Neighbour discovery is link-local only: the same message to a global address is refused.
    ns_global = Packet(Direction.OUT, "en0", ip("2001:db8:1::2"), ip("2001:db8:1::1"), "ipv6-icmp", icmp_type=135)
    assert anchor.verdict(ns_global) == "return"
    echo = Packet(Direction.OUT, "en0", ip("fe80::2"), ip("fe80::1"), "ipv6-icmp", icmp_type=128)
    assert anchor.verdict(echo) == "return"


def test_dhcp_unicast_and_replies_are_for_root_only() -> None:
    """Issue 15, item 5: macOS has no privileged ports, so any program could
    bind port 68 and talk to any host over UDP 68->67. Broadcast requests
    pass for anyone (they stay on the link); unicast and replies for root's
    sockets (configd) only."""
    anchor = Anchor(EXAMPLE_CONFIG)
    user = 501
    exfiltrate = Packet(Direction.OUT, "en0", ip("192.0.2.2"), ip("203.0.113.9"), "udp", 68, 67, uid=user)
    inbound = Packet(Direction.IN, "en0", ip("203.0.113.9"), ip("192.0.2.2"), "udp", 67, 68, uid=user)
    broadcast = Packet(Direction.OUT, "en0", ip("0.0.0.0"), ip("255.255.255.255"), "udp", 68, 67, uid=user)  # noqa: S104
    assert anchor.verdict(exfiltrate) == "return"
    assert anchor.verdict(inbound) == "drop"
    assert anchor.verdict(broadcast) == "pass"
    assert anchor.verdict(dataclasses.replace(exfiltrate, uid=0)) == "pass"  # control: configd renews


def test_loopback_passes() -> None:
    anchor = Anchor(EXAMPLE_CONFIG)
    packet = Packet(Direction.OUT, "lo0", ip("127.0.0.1"), ip("127.0.0.1"), "udp", 5000, 53)
    assert anchor.verdict(packet) == "pass"


def test_the_tunnel_passes_only_once_relaxed_and_only_its_own_device() -> None:
    anchor = Anchor(EXAMPLE_CONFIG)
    web = out("203.0.113.80", 443, proto="tcp", on="utun9")
    assert anchor.verdict(web) == "return"
    assert anchor.verdict(web, relaxed=True) == "pass"
    assert anchor.verdict(inbound("203.0.113.80", 443, proto="tcp", on="utun9"), relaxed=True) == "pass"
    # macOS's own utun devices stay blocked: the rules never name the `utun` group.
    other = out("203.0.113.80", 443, proto="tcp", on="utun3")
    assert anchor.verdict(other, relaxed=True) == "return"
    assert anchor.verdict(out("203.0.113.80", 443, proto="tcp"), relaxed=True) == "return"


def test_dns_through_the_tunnel_goes_to_the_vpn_resolvers_only() -> None:
    anchor = Anchor(EXAMPLE_CONFIG)
    assert anchor.verdict(out("10.64.0.1", 53, on="utun9"), relaxed=True) == "pass"
    assert anchor.verdict(out("9.9.9.9", 53, on="utun9"), relaxed=True) == "return"
    assert anchor.verdict(out("2001:db8::53", 53, on="utun9"), relaxed=True) == "return"
    # An IPv6-only resolver: IPv4 DNS through the tunnel is refused, even to a
    # private address while [lan] allow = true (the LAN rules stay off the tunnel).
    v6 = Anchor(LAN_TCP_CONFIG)
    assert v6.verdict(out("2001:db8:53::1", 53, on="utun4"), relaxed=True) == "pass"
    assert v6.verdict(out("10.64.0.1", 53, on="utun4"), relaxed=True) == "return"
    assert v6.verdict(out("10.64.0.1", 445, proto="tcp", on="utun4")) == "return"
    assert v6.verdict(out("10.64.0.1", 445, proto="tcp", on="utun4"), relaxed=True) == "pass"


def test_no_dns_servers_means_no_restriction_inside_the_tunnel() -> None:
    cfg = config.Config.from_dict(
        {"tunnel": {"interface": "utun9"}, "endpoint": [{"address": "198.51.100.7", "port": 51820}]}
    )
    anchor = Anchor(cfg)
    assert not anchor.tunnel.tables
    assert anchor.verdict(out("9.9.9.9", 53, on="utun9"), relaxed=True) == "pass"


def test_emergency_rules_block_everything_but_loopback() -> None:
    emergency = pf.parse(macos.render(EXAMPLE_CONFIG).emergency)
    assert evaluate(emergency, out("198.51.100.7", 51820)).action is Action.BLOCK  # type: ignore[union-attr]
    assert evaluate(emergency, out("203.0.113.5", 80, on="utun9")).action is Action.BLOCK  # type: ignore[union-attr]
    loop = Packet(Direction.OUT, "lo0", ip("::1"), ip("::1"), "tcp", 5000, 80)
    assert evaluate(emergency, loop).action is Action.PASS  # type: ignore[union-attr]


# --- The parser refuses what earlyfw does not emit ------------------------------

TABLE = "table <t> const persist { 198.51.100.7, 2001:db8::7 }\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pass out inet proto udp from any to any port 53 no state", "not `quick`"),
        ("pass out quick inet proto udp from any to 2001:db8::7 port 53 no state", "not an inet address"),
        ("pass quick on utun all no state", "interface group"),
        ("pass out quick inet proto udp from any to <missing> port 53 no state", "not defined"),
        ("pass out quick inet from any to any port 53 no state", "port needs proto"),
        ("pass out quick inet proto udp from any to any port 53", "without `no state`"),
        ("block out quick inet all", "block-policy"),
        ("block drop out quick inet all no state", "`no state` on a block"),
        ("pass out quick inet proto udp from any to ! 198.51.100.0/24 no state", "only a table can be negated"),
        ("pass out quick inet proto udp from any to 198.51.100.7 no state port 53", "unexpected 'port'"),
        ("pass out quick inet proto udp from any to any port 70000 no state", "1-65535"),
        ("pass out quick proto udp from any to 198.51.100.7 no state", "without inet or inet6"),
        ("pass out quick inet proto ipv6-icmp all no state", "needs inet6"),
        ("pass in quick inet6 proto udp all icmp6-type toobig no state", "needs proto ipv6-icmp"),
        ("rdr pass on en0 proto tcp to port 80 -> 127.0.0.1", "not a statement"),
        ('anchor "../main" all', "anchor name or path"),
        ("pass out quick inet proto udp from any to any port 67 user nobody no state", "not one earlyfw uses"),
        ("pass out quick inet all user root no state", "user needs proto"),
        ("pass quick inet all no state\nscrub in all fragment reassemble", "before the filter rules"),
        ("pass quick inet all no state\n" + TABLE, "before the rules"),
        (TABLE + TABLE, "defined twice"),
        ("table <t> persist { 198.51.100.0/16 }", "host bits"),
    ],
)
def test_parser_rejects(text: str, message: str) -> None:
    with pytest.raises(pf.PfError, match=message.replace("(", r"\(")):
        pf.parse(text)


def test_parser_rejects_a_broken_rule_in_the_rendered_anchor() -> None:
    """The real file, one rule broken: the parser names the line."""
    text = macos.render(EXAMPLE_CONFIG).rules
    broken = text.replace("block drop quick inet6 all", "block drop inet6 all")
    line = broken.splitlines().index("block drop inet6 all") + 1
    with pytest.raises(pf.PfError, match=f"line {line}: rule is not `quick`"):
        pf.parse(broken)
    pf.parse(text)  # control: unbroken, it parses


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("block drop quick inet6 all\n", ""), "must end with"),
        (lambda t: t.replace('anchor "tunnel" all\n', ""), "right before"),
        (lambda t: t.replace("pass quick on lo0 all no state\n", ""), "loopback"),
        (
            lambda t: t.replace("pass quick on lo0 all no state", "pass quick on utun9 all no state"),
            "tunnel sub-anchor",
        ),
        (
            lambda t: t.replace(
                "on ! utun9 inet proto udp from any to any port 53", "on en0 inet proto udp from any to any port 53"
            ),
            "unexpected interface",
        ),
    ],
)
def test_shape_check_rejects(edit: object, message: str) -> None:
    text = macos.render(EXAMPLE_CONFIG).rules
    assert callable(edit)
    changed = edit(text)
    assert changed != text
    with pytest.raises(pf.PfError, match=message):
        pf.check_main(pf.parse(changed), "utun9", macos.TUNNEL)


def test_tunnel_check_rejects_another_device() -> None:
    text = macos.render(EXAMPLE_CONFIG).tunnel
    with pytest.raises(pf.PfError, match="every tunnel rule"):
        pf.check_tunnel(pf.parse(text.replace("pass quick on utun9 inet6", "pass quick on utun3 inet6")), "utun9")


# --- The interface is a utun device ------------------------------------------------


@pytest.mark.parametrize("name", ["wg0", "utun", "utun9a", "tun0", "en0"])
def test_interface_must_be_a_utun_device(name: str) -> None:
    cfg = config.Config.from_dict(
        {"tunnel": {"interface": name}, "endpoint": [{"address": "198.51.100.7", "port": 51820}]}
    )
    with pytest.raises(ConfigError, match=f"'{name}' is not a macOS tunnel device") as e:
        macos.render(cfg)
    assert e.value.hint and "utun9" in e.value.hint


# --- Precise exceptions: [lan] allow = [networks], [[allow]] ------------------------

EXCEPTIONS_CONFIG = config.parse(
    EXAMPLE.read_text()
    .replace('interface = "wg0"', 'interface = "utun9"')
    .replace("[lan]\nallow = false", '[lan]\nallow = ["192.168.1.0/24"]')
    + '[[allow]]\ninterface = "utun5"\nnetworks = ["100.64.0.0/10", "fd7a:115c:a1e0::/48"]\n'
    + '[[allow]]\ninterface = "utun6"\ndns = true\n'
)


def test_lan_networks_are_exactly_the_listed_ones() -> None:
    anchor = Anchor(EXCEPTIONS_CONFIG)
    assert [str(n) for n in anchor.main.tables[macos.LAN_TABLE].entries] == ["192.168.1.0/24"]
    assert anchor.verdict(out("192.168.1.20", 445, proto="tcp")) == "pass"
    assert anchor.verdict(inbound("192.168.1.20", 445, proto="tcp")) == "pass"
    # Built-in LAN ranges that are not listed, and DNS to the listed LAN, stay refused.
    assert anchor.verdict(out("192.168.2.1", 445, proto="tcp")) == "return"
    assert anchor.verdict(out("10.0.0.1", 445, proto="tcp")) == "return"
    assert anchor.verdict(inbound("fe80::1", 5353)) == "drop"
    assert anchor.verdict(out("192.168.1.1", 53)) == "return"
    # Control: the same refused probe passes with [lan] allow = true.
    assert Anchor(LAN_TCP_CONFIG).verdict(out("10.0.0.1", 445, proto="tcp")) == "pass"


def test_an_allowed_interface_passes_its_networks_and_no_dns() -> None:
    anchor = Anchor(EXCEPTIONS_CONFIG)
    for relaxed in (False, True):
        assert anchor.verdict(out("100.101.5.5", 9999, on="utun5"), relaxed=relaxed) == "pass"
        assert anchor.verdict(out("fd7a:115c:a1e0::5", 443, proto="tcp", on="utun5"), relaxed=relaxed) == "pass"
        assert anchor.verdict(inbound("100.101.5.5", 9999, on="utun5"), relaxed=relaxed) == "pass"
        assert anchor.verdict(out("100.100.100.100", 53, on="utun5"), relaxed=relaxed) == "return"
        assert anchor.verdict(out("203.0.113.77", 443, proto="tcp", on="utun5"), relaxed=relaxed) == "return"
        # Bound to the device: the same address through another interface is refused.
        assert anchor.verdict(out("100.101.5.5", 9999, on="en0"), relaxed=relaxed) == "return"
        # dns = true and no networks: everything through utun6, its DNS too.
        assert anchor.verdict(out("100.100.100.100", 53, on="utun6"), relaxed=relaxed) == "pass"
        assert anchor.verdict(out("203.0.113.77", 443, proto="tcp", on="utun6"), relaxed=relaxed) == "pass"
    # Control: without the [[allow]] entries utun5 is as blocked as anything else.
    assert Anchor(EXAMPLE_CONFIG).verdict(out("100.101.5.5", 9999, on="utun5")) == "return"
    assert without_earlyfw(out("100.101.5.5", 9999, on="utun5")) == "default"


def test_what_pf_cannot_do_is_refused_in_one_line() -> None:
    text = EXAMPLE.read_text().replace('interface = "wg0"', 'interface = "utun9"')
    for extra, words in (
        ('[forward]\nvia_tunnel = ["bridge100"]\n', "forward.via_tunnel is not supported by the macos target"),
        ('[[allow]]\ninterface = "utun"\n', "allow[0].interface: 'utun' is not one macOS device"),
        ('[[allow]]\ninterface = "Tailscale0"\n', "allow[0].interface: 'Tailscale0' is not one macOS device"),
    ):
        with pytest.raises(ConfigError) as caught:
            macos.render(config.parse(text + extra))
        assert str(caught.value).startswith(words) and "\n" not in str(caught.value)
