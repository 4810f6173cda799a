"""earlyfw.windows.engine against the recording BFE model (tests/wfp_model.py).

The engine's calls cross a real ctypes foreign call into a Python model of BFE
that decodes every structure back from the pointers it receives, with the same
prototypes as fwpuclnt.dll (checked against the SDK headers in
test_windows_layout.py). What is compared here is what BFE would be handed:
every layer, flag, weight, condition and GUID, the boot-time and persistent
sets, and, through a small WFP classifier run on the decoded filters, that
nothing is permitted that the policy does not permit.

What cannot be checked off Windows is enforcement itself. On a Windows host,
after `earlyfw.exe install`:
  netsh wfp show boottimepolicy   lists the 10 boot-time filters (block all at
                                  the four ALE and two IPFORWARD layers,
                                  loopback at the ALE ones)
  netsh wfp show filters          writes filters.xml with the persistent ones,
                                  provider d4e61f5f-1d35-4e05-acc2-7616d5802bf3
and `Test-NetConnection 203.0.113.1 -Port 443` fails while the tunnel is down,
also right after a reboot before anyone logs on; as a standard user the
WireGuard endpoint is unreachable while the tunnel still connects. The README's
Windows section lists every check.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import functools
import ipaddress
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earlyfw import config as configuration
from earlyfw import policy
from earlyfw.config import Config, IPAddress
from earlyfw.errors import ConfigError, EarlyfwError
from earlyfw.windows import engine, rules, security
from earlyfw.windows import structs as s
from earlyfw.windows.rules import Action, Interface, Layer
from tests import wfp_model
from tests.configs import example_toml
from tests.wfp_model import DecodedFilter, RecordingBfe, Store

TUNNEL_LUID = 0x0035_0000_0012_0000  # IF_TYPE_PROP_VIRTUAL, as wintun adapters have
OTHER_LUID = 0x0006_0000_0001_0000  # an Ethernet adapter

EXAMPLE = example_toml()
# OpenVPN over TCP port 53: an endpoint on the DNS port must still work.
OPENVPN_LAN = """
[tunnel]
kind = "openvpn"
interface = "tun0"
[[endpoint]]
address = "203.0.113.53"
port = 53
protocol = "tcp"
[[endpoint]]
address = "2001:db8::53"
port = 1194
[dns]
servers = ["10.8.0.1", "fd00::53"]
[lan]
allow = true
"""
# More filters at one layer than one FwpmFilterEnum0 batch returns.
MANY = "[tunnel]\nkind = 'manual'\ninterface = 'vpn'\n" + "".join(
    f"[[endpoint]]\naddress = '198.51.100.{i}'\nport = {40000 + i}\n" for i in range(1, 71)
)
# [lan] allow as a list, IPv6 only: the IPv4 LAN stays blocked, and no LAN
# permit without an address condition (which would permit every address).
LAN_LIST = EXAMPLE + '[lan]\nallow = ["fd00::/64", "2001:db8:99::/64"]\n'
CONFIGS = {"example": EXAMPLE, "openvpn-lan": OPENVPN_LAN, "many": MANY, "lan-list": LAN_LIST}


def load(name: str) -> Config:
    return configuration.parse(CONFIGS[name])


@pytest.fixture
def bfe() -> RecordingBfe:
    return RecordingBfe(aliases={"wg0": TUNNEL_LUID, "tun0": TUNNEL_LUID, "vpn": TUNNEL_LUID})


def clean(bfe: RecordingBfe) -> None:
    """Nothing half-done: no model errors, no open transaction, session,
    enumeration or unreleased memory."""
    assert bfe.errors == []
    assert bfe.txn is None
    assert bfe.handles == set()
    assert bfe.enums == {}
    assert bfe.allocations == {}


# -- what BFE is handed -----------------------------------------------------


def expected_value(condition: rules.Condition) -> object:
    value = condition.value
    if isinstance(value, Interface):
        return value.luid
    if isinstance(value, rules.Owners):
        return security.Descriptor.from_bytes(value.descriptor)
    if isinstance(value, rules.Program):
        return wfp_model.app_id(value.path)  # what BFE derived from the path
    if isinstance(value, ipaddress.IPv4Address):
        return int(value)  # FWP_UINT32, host order
    return value


def assert_sent(decoded: DecodedFilter, spec: rules.Filter) -> None:
    assert decoded.key == spec.key
    assert decoded.name == spec.name
    assert decoded.layer == spec.layer.key
    assert decoded.sublayer == s.SUBLAYER_KEY
    assert decoded.provider == s.PROVIDER_KEY
    assert decoded.flags == spec.flags
    assert (decoded.weight_type, decoded.weight) == (s.FWP_UINT8, int(spec.weight))
    assert decoded.action == spec.action.code
    assert [(c.field, c.match, c.value) for c in decoded.conditions] == [
        (c.field.key, c.field.match, expected_value(c)) for c in spec.conditions
    ]


@pytest.mark.parametrize("name", CONFIGS)
def test_install_hands_bfe_exactly_the_policy(bfe: RecordingBfe, name: str) -> None:
    config = load(name)
    engine.install(bfe, config)
    clean(bfe)
    specs = {f.key: f for f in rules.install_set(config)}
    listed = {f.key: f for f in bfe.filters()}
    assert listed.keys() == specs.keys()
    for key, spec in specs.items():
        assert_sent(listed[key], spec)
    assert [(p.key, p.flags) for p in bfe.store.providers.values()] == [(s.PROVIDER_KEY, 1)]
    assert [(sl.key, sl.flags, sl.provider, sl.weight) for sl in bfe.store.sublayers.values()] == [
        (s.SUBLAYER_KEY, 1, s.PROVIDER_KEY, 0xFFFF)
    ]
    # Both sets: boot-time (flag 0x2, never with 0x1) and persistent (0x1).
    boot = [f for f in listed.values() if f.flags & s.FWPM_FILTER_FLAG_BOOTTIME]
    persistent = [f for f in listed.values() if f.flags & s.FWPM_FILTER_FLAG_PERSISTENT]
    assert not [f for f in boot if f.flags & s.FWPM_FILTER_FLAG_PERSISTENT]
    assert len(boot) + len(persistent) == len(listed)
    for found in (boot, persistent):
        blocks = {f.layer for f in found if f.action == s.FWP_ACTION_BLOCK and not f.conditions}
        assert blocks == set(wfp_model.LAYERS), "a block-all at every ALE and IPFORWARD layer"
    assert {f.key for f in boot} == {f.key for f in rules.boottime_set()}


def test_the_example_filters_literally(bfe: RecordingBfe) -> None:
    """Pinned by hand from the SDK's values, not from earlyfw's constants."""
    engine.install(bfe, load("example"))
    by_name = {(f.name, str(f.layer)): f for f in bfe.filters()}
    connect_v4 = "c38d57d1-05a7-4c33-904f-7fbceee60e82"
    recv_v6 = "a3b42c97-9f04-4672-b87e-cee9c483257f"
    endpoint = by_name[("earlyfw: permit endpoint 198.51.100.7:51820/udp", connect_v4)]
    assert (endpoint.flags, endpoint.weight, endpoint.action) == (0x1, 8, 0x1002)
    assert [(str(c.field), c.match, c.type, c.value) for c in endpoint.conditions] == [
        ("b235ae9a-1d64-49b8-a44c-5ff3d9095045", 0, 3, 0xC6336407),  # IP_REMOTE_ADDRESS, UINT32
        ("c35a604d-d22b-4e1a-91b4-68f674ee674b", 0, 2, 51820),  # IP_REMOTE_PORT, UINT16
        ("3971ef2b-623e-4f9a-8cb1-6e79b806b9a7", 0, 1, 17),  # IP_PROTOCOL, UINT8
        # ALE_USER_ID, FWP_SECURITY_DESCRIPTOR_TYPE: O:SYD:(A;;0x1;;;SY), FWP_ACTRL_MATCH_FILTER for SYSTEM
        (
            "af043a0a-b34d-4f86-979c-c90371af6e66",
            0,
            14,
            security.Descriptor("S-1-5-18", (security.Ace("S-1-5-18", 1),)),
        ),
    ]
    boot_block = [f for f in bfe.boot_policy() if str(f.layer) == recv_v6 and f.action == 0x1001]
    assert [(f.flags, f.weight, f.conditions) for f in boot_block] == [
        (0x2 | 0x8, 0, ())
    ]  # BOOTTIME|CLEAR_ACTION_RIGHT
    loopback = by_name[("earlyfw: permit loopback", recv_v6)]
    assert [(str(c.field), c.match, c.type, c.value) for c in loopback.conditions] == [
        ("632ce23b-5167-435c-86d7-e903684aa80c", 6, 3, 1)  # FLAGS, ALL_SET, UINT32, IS_LOOPBACK
    ]
    nd = by_name[("earlyfw: permit neighbour-discovery", recv_v6)]
    assert [(c.type, c.value) for c in nd.conditions if c.type == 0x101] == [
        (0x101, ipaddress.IPv6Network("::/128")),
        (0x101, ipaddress.IPv6Network("fe80::/10")),
    ]


def test_relax_and_lock(bfe: RecordingBfe) -> None:
    config = load("openvpn-lan")
    engine.install(bfe, config)
    blocked = bfe.filters()
    engine.relax(bfe, config, Interface("tun0", TUNNEL_LUID))
    clean(bfe)
    added = {f.key: f for f in bfe.filters()}.items() - {f.key: f for f in blocked}.items()
    specs = {f.key: f for f in rules.relax_set(config, Interface("tun0", TUNNEL_LUID))}
    assert {key for key, _ in added} == specs.keys()
    for key, decoded in added:
        assert_sent(decoded, specs[key])
        assert decoded.flags & (s.FWPM_FILTER_FLAG_PERSISTENT | s.FWPM_FILTER_FLAG_BOOTTIME) == 0
    # A new adapter instance (new LUID) replaces the permits, not adds to them.
    engine.relax(bfe, config, Interface("tun0", OTHER_LUID))
    assert len(bfe.filters()) == len(blocked) + len(specs)
    luids = {c.value for f in bfe.filters() for c in f.conditions if c.field == s.FWPM_CONDITION_IP_LOCAL_INTERFACE}
    assert luids == {OTHER_LUID}
    engine.lock(bfe)
    assert bfe.filters() == blocked
    engine.lock(bfe)  # idempotent
    assert bfe.filters() == blocked
    clean(bfe)


def test_relax_is_gone_after_a_reboot(bfe: RecordingBfe) -> None:
    """Runtime permits: a crash or reboot comes back blocked."""
    config = load("example")
    engine.install(bfe, config)
    engine.relax(bfe, config, Interface("wg0", TUNNEL_LUID))
    bfe.reboot(hide_boottime=False)
    assert {f.key for f in bfe.filters()} == {f.key for f in rules.install_set(config)}


def test_everything_happens_inside_one_transaction(bfe: RecordingBfe) -> None:
    engine.install(bfe, load("example"))
    names = bfe.names()
    assert names[:2] == ["FwpmEngineOpen0", "FwpmTransactionBegin0"]
    assert names[-2:] == ["FwpmTransactionCommit0", "FwpmEngineClose0"]
    assert names.count("FwpmTransactionBegin0") == names.count("FwpmTransactionCommit0") == 1


# -- what the decoded filters let through ------------------------------------


SYSTEM = security.SYSTEM
USER = wfp_model.USER_SID  # a standard user's program
DHCP = security.service_sid("Dhcp")  # NT SERVICE\Dhcp
OPENVPN = configuration.DEFAULT_OPENVPN_PROGRAM
CURL = r"C:\Windows\System32\curl.exe"  # any other program
ALE = [layer for layer in Layer if "ALE" in layer.value]


@dataclass(frozen=True)
class Packet:
    layer: Layer
    remote: IPAddress
    protocol: int
    local_port: int  # the ICMP type for ICMP
    remote_port: int
    interface: int
    loopback: bool = False
    user: str = USER  # the socket owner (a token's user or service SID)
    app: str = CURL  # the image of the process that opened the socket


def _matches(condition: wfp_model.Condition, p: Packet) -> bool:
    field, value = condition.field, condition.value
    if field == s.FWPM_CONDITION_FLAGS:
        flags = s.FWP_CONDITION_FLAG_IS_LOOPBACK if p.loopback else 0
        return isinstance(value, int) and flags & value == value
    if field == s.FWPM_CONDITION_IP_REMOTE_ADDRESS:
        if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
            return p.remote in value
        return (int(p.remote) if condition.type == s.FWP_UINT32 else p.remote) == value
    if field == s.FWPM_CONDITION_ALE_USER_ID:
        assert isinstance(value, security.Descriptor)
        granted = [a for a in value.aces if a.allow and a.mask & s.FWP_ACTRL_MATCH_FILTER]
        return any(a.sid == p.user for a in granted)
    if field == s.FWPM_CONDITION_ALE_APP_ID:
        assert isinstance(value, bytes)
        return wfp_model.app_id_matches(value, p.app)
    actual = {
        s.FWPM_CONDITION_IP_PROTOCOL: p.protocol,
        s.FWPM_CONDITION_IP_LOCAL_PORT: p.local_port,
        s.FWPM_CONDITION_IP_REMOTE_PORT: p.remote_port,
        s.FWPM_CONDITION_IP_LOCAL_INTERFACE: p.interface,
    }[field]
    return actual == value


@functools.cache
def _by_field(f: DecodedFilter) -> tuple[tuple[wfp_model.Condition, ...], ...]:
    ordered = sorted(f.conditions, key=lambda c: str(c.field))
    return tuple(tuple(group) for _, group in itertools.groupby(ordered, key=lambda c: c.field))


def classify(filters: list[DecodedFilter], p: Packet) -> int | None:
    """earlyfw's sublayer as WFP evaluates it: conditions on one field ORed,
    across fields ANDed; the highest-weighted match decides."""
    hits = [
        f
        for f in filters
        if f.layer == p.layer.key
        and f.sublayer == s.SUBLAYER_KEY
        and all(any(_matches(c, p) for c in group) for group in _by_field(f))
    ]
    if not hits:
        return None
    top = max(f.weight or 0 for f in hits)
    actions = {f.action for f in hits if f.weight == top}
    assert len(actions) == 1, f"the verdict for {p} would depend on BFE's tie-breaking"
    return actions.pop()


def permitted_by_filters(filters: list[DecodedFilter], p: Packet) -> bool:
    return classify(filters, p) != s.FWP_ACTION_BLOCK


@functools.cache
def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def _in(address: IPAddress, *networks: str) -> bool:
    return any(address in _network(n) for n in networks)


def permitted_by_policy(config: Config, state: str, p: Packet) -> bool:
    """The policy, written down independently of earlyfw.windows.rules."""
    if p.loopback:
        return True
    if state == "boot":
        return False
    out = p.layer.outbound
    dns = p.protocol in (6, 17) and p.remote_port in (53, 853)
    if state == "relaxed" and p.interface == TUNNEL_LUID:
        if out and dns and config.dns_servers:
            return p.remote in config.dns_servers
        return True
    proto = {"udp": 17, "tcp": 6}
    endpoint = any(
        (e.address, e.port, proto[e.protocol]) == (p.remote, p.remote_port, p.protocol) for e in config.endpoints
    )
    # Outbound only: WireGuard's only from SYSTEM (the service, the driver),
    # OpenVPN's only from openvpn.exe, whoever runs it.
    sender = {
        "wireguard": p.user == SYSTEM,
        "openvpn": p.app.lower() == (config.program or OPENVPN).lower(),
        "manual": config.program is None or p.app.lower() == config.program.lower(),
    }[config.tunnel_kind]
    if endpoint and out and sender:
        return True
    if out and dns:
        return False
    dhcp4 = p.protocol == 17 and p.layer.version == 4 and (p.local_port, p.remote_port) == (68, 67)
    if dhcp4 and (p.user == DHCP or (out and str(p.remote) == "255.255.255.255")):
        return True
    dhcp6_peers = ["fe80::/10", *(["ff02::1:2/128"] if out else [])]
    dhcp6 = p.protocol == 17 and p.layer.version == 6 and (p.local_port, p.remote_port) == (546, 547)
    if dhcp6 and _in(p.remote, *dhcp6_peers):
        return True
    if p.protocol == 58:
        if out and p.local_port in (133, 135, 136) and _in(p.remote, "fe80::/10", "ff02::/16"):
            return True
        if out and p.local_port in (131, 143) and _in(p.remote, "ff02::/16"):
            return True
        if not out and p.local_port in (134, 135, 136) and _in(p.remote, "::/128", "fe80::/10"):
            return True
        if not out and p.local_port == 130 and _in(p.remote, "fe80::/10"):
            return True
    return any(p.remote in n for n in policy.lan_networks(config, p.layer.version))


INTERESTING_V4 = ["10.1.2.3", "192.168.1.1", "169.254.3.4", "172.16.5.4", "255.255.255.255", "224.0.0.251"]
INTERESTING_V4 += ["8.8.8.8", "203.0.113.9", "198.51.100.8", "10.64.0.1", "10.8.0.1"]
INTERESTING_V6 = ["fe80::1", "ff02::1:2", "ff02::1", "ff02::2", "::", "fd00::53", "fd00::1", "2001:db8::99"]
INTERESTING_V6 += ["2001:db8:99::5", "fd00:1::1"]
PORTS = [53, 853, 67, 68, 546, 547, 443, 80, 1194, 51820, *range(129, 144)]


def packets(config: Config) -> st.SearchStrategy[Packet]:
    def for_layer(layer: Layer) -> st.SearchStrategy[Packet]:
        interesting = INTERESTING_V4 if layer.version == 4 else INTERESTING_V6
        known = [ipaddress.ip_address(a) for a in interesting] + [
            a for a in (*(e.address for e in config.endpoints), *config.dns_servers) if a.version == layer.version
        ]
        ports = PORTS + [e.port for e in config.endpoints]
        return st.builds(
            Packet,
            st.just(layer),
            st.sampled_from(known) | st.ip_addresses(v=4 if layer.version == 4 else 6),
            st.sampled_from([6, 17, 58, 1]),
            st.sampled_from(ports) | st.integers(0, 65535),
            st.sampled_from(ports) | st.integers(0, 65535),
            st.sampled_from([TUNNEL_LUID, OTHER_LUID]),
            st.booleans(),
            st.sampled_from([USER, SYSTEM, DHCP]),
            st.sampled_from([CURL, OPENVPN, OPENVPN.upper()]),
        )

    return st.sampled_from(ALE).flatmap(for_layer)


def grid(config: Config) -> list[Packet]:
    """Every interesting combination, exhaustively: the random packets above
    rarely hit, say, one ICMPv6 type to one link-local address."""
    pairs = [(68, 67), (546, 547), (50000, 53), (50000, 853), (53, 50000), (50000, 443), (50000, 1194)]
    pairs += [(50000, e.port) for e in config.endpoints]
    combos = [(58, icmp, 0) for icmp in range(128, 144)] + [(1, 8, 0)]
    combos += [(proto, lp, rp) for proto in (6, 17) for lp, rp in pairs]
    packets = []
    for layer in ALE:
        known = INTERESTING_V4 if layer.version == 4 else INTERESTING_V6
        addresses = {ipaddress.ip_address(a) for a in known} | {
            a for a in (*(e.address for e in config.endpoints), *config.dns_servers) if a.version == layer.version
        }
        senders = ((USER, CURL), (SYSTEM, CURL), (DHCP, CURL), (USER, OPENVPN))
        for address, (proto, lp, rp), interface, (user, app) in itertools.product(
            sorted(addresses), combos, (TUNNEL_LUID, OTHER_LUID), senders
        ):
            packets.append(Packet(layer, address, proto, lp, rp, interface, user=user, app=app))
        packets.append(Packet(layer, min(addresses), 6, 50000, 443, OTHER_LUID, loopback=True))
    return packets


def enforced(name: str, state: str) -> tuple[Config, list[DecodedFilter]]:
    config = load(name)
    bfe = RecordingBfe()
    engine.install(bfe, config)
    if state == "relaxed":
        engine.relax(bfe, config, Interface(config.interface, TUNNEL_LUID))
    if state == "boot":
        bfe.reboot()
        return config, bfe.boot_policy()
    return config, bfe.filters()


@pytest.mark.parametrize("state", ["boot", "blocked", "relaxed"])
@pytest.mark.parametrize("name", ["example", "openvpn-lan", "lan-list"])
def test_nothing_is_permitted_that_the_policy_does_not_permit(name: str, state: str) -> None:
    config, filters = enforced(name, state)

    wrong = [p for p in grid(config) if permitted_by_filters(filters, p) != permitted_by_policy(config, state, p)]
    assert wrong == []

    @settings(max_examples=200, derandomize=True, deadline=None, database=None)
    @given(packets(config))
    def check(p: Packet) -> None:
        assert permitted_by_filters(filters, p) == permitted_by_policy(config, state, p), p

    check()


LEAKS = [
    # (what, packet): each is blocked with earlyfw in place.
    ("HTTPS to the internet", Packet(Layer.CONNECT_V4, ipaddress.ip_address("203.0.113.9"), 6, 50000, 443, OTHER_LUID)),
    ("DNS to a public resolver", Packet(Layer.CONNECT_V4, ipaddress.ip_address("8.8.8.8"), 17, 50001, 53, OTHER_LUID)),
    ("DNS to the LAN router", Packet(Layer.CONNECT_V4, ipaddress.ip_address("192.168.1.1"), 17, 50002, 53, OTHER_LUID)),
    ("IPv6 to the internet", Packet(Layer.CONNECT_V6, ipaddress.ip_address("2001:db8::99"), 6, 50003, 443, OTHER_LUID)),
    (
        "the endpoint on another port",
        Packet(Layer.CONNECT_V4, ipaddress.ip_address("198.51.100.7"), 17, 5, 51821, OTHER_LUID),
    ),
    (
        "an inbound connection",
        Packet(Layer.RECV_ACCEPT_V4, ipaddress.ip_address("203.0.113.9"), 6, 22, 40000, OTHER_LUID),
    ),
]


@pytest.mark.parametrize(("what", "packet"), LEAKS, ids=[w for w, _ in LEAKS])
@pytest.mark.parametrize("state", ["boot", "blocked", "relaxed"])
def test_leaks_are_blocked_and_pass_without_earlyfw(what: str, packet: Packet, state: str) -> None:
    _config, filters = enforced("example", state)
    assert not permitted_by_filters(filters, packet), what
    # Control: the same packet with nothing installed, and after uninstall.
    bfe = RecordingBfe()
    assert permitted_by_filters(bfe.filters(), packet)
    engine.install(bfe, load("example"))
    engine.uninstall(bfe)
    assert permitted_by_filters(bfe.filters(), packet)
    assert permitted_by_filters(bfe.boot_policy(), packet)


def test_the_tunnel_and_the_endpoint_get_through() -> None:
    _config, blocked = enforced("example", "blocked")
    _config, relaxed = enforced("example", "relaxed")
    handshake = Packet(
        Layer.CONNECT_V4, ipaddress.ip_address("198.51.100.7"), 17, 50000, 51820, OTHER_LUID, user=SYSTEM
    )
    through = Packet(Layer.CONNECT_V4, ipaddress.ip_address("203.0.113.9"), 6, 50000, 443, TUNNEL_LUID)
    resolver = Packet(Layer.CONNECT_V4, ipaddress.ip_address("10.64.0.1"), 17, 50000, 53, TUNNEL_LUID)
    other_dns = Packet(Layer.CONNECT_V4, ipaddress.ip_address("8.8.8.8"), 17, 50000, 53, TUNNEL_LUID)
    assert permitted_by_filters(blocked, handshake) and permitted_by_filters(relaxed, handshake)
    assert not permitted_by_filters(blocked, through) and permitted_by_filters(relaxed, through)
    assert not permitted_by_filters(blocked, resolver) and permitted_by_filters(relaxed, resolver)
    assert not permitted_by_filters(relaxed, other_dns)


# -- issue 15: the holes a review found ------------------------------------------

V4 = ipaddress.ip_address


def test_the_endpoint_hole_is_only_for_the_tunnel_and_only_outbound() -> None:
    """A standard user's program may not reach the WireGuard endpoint (it
    could tunnel data out through it), and a packet claiming to come from
    endpoint:port cannot open an inbound flow to a local listener."""
    _config, blocked = enforced("example", "blocked")
    service = Packet(Layer.CONNECT_V4, V4("198.51.100.7"), 17, 50000, 51820, OTHER_LUID, user=SYSTEM)
    program = Packet(Layer.CONNECT_V4, V4("198.51.100.7"), 17, 50000, 51820, OTHER_LUID, user=USER)
    spoofed = Packet(Layer.RECV_ACCEPT_V4, V4("198.51.100.7"), 17, 22, 51820, OTHER_LUID, user=SYSTEM)
    v6 = Packet(Layer.CONNECT_V6, ipaddress.ip_address("2001:db8::7"), 17, 50000, 51820, OTHER_LUID, user=USER)
    assert permitted_by_filters(blocked, service)  # control: the tunnel still comes up
    assert not permitted_by_filters(blocked, program)
    assert not permitted_by_filters(blocked, v6)
    assert not permitted_by_filters(blocked, spoofed)
    # OpenVPN runs as whoever started it: named by its executable, connect layer only.
    _config, openvpn = enforced("openvpn-lan", "blocked")
    tcp = Packet(Layer.CONNECT_V4, V4("203.0.113.53"), 6, 50000, 53, OTHER_LUID, user=USER, app=OPENVPN)
    assert permitted_by_filters(openvpn, tcp)
    inbound = Packet(Layer.RECV_ACCEPT_V4, V4("203.0.113.53"), 6, 22, 53, OTHER_LUID, app=OPENVPN)
    assert not permitted_by_filters(openvpn, inbound)


def _without_app_ids(filters: list[DecodedFilter]) -> list[DecodedFilter]:
    """The filters as they were before the endpoint permits named openvpn.exe."""
    return [
        dataclasses.replace(f, conditions=tuple(c for c in f.conditions if c.field != s.FWPM_CONDITION_ALE_APP_ID))
        for f in filters
    ]


@pytest.mark.parametrize("state", ["blocked", "relaxed"])
def test_the_openvpn_endpoint_is_only_for_openvpn_exe(state: str) -> None:
    """Another program, under any account, cannot reach the OpenVPN server
    through the endpoint permit (it could carry data out there); openvpn.exe
    can, whoever runs it and however its path is spelled in case."""
    _config, filters = enforced("openvpn-lan", state)
    to_endpoint = functools.partial(Packet, Layer.CONNECT_V4, V4("203.0.113.53"), 6, 50000, 53, OTHER_LUID)
    to_endpoint6 = functools.partial(
        Packet, Layer.CONNECT_V6, ipaddress.ip_address("2001:db8::53"), 17, 50000, 1194, OTHER_LUID
    )
    for endpoint in (to_endpoint, to_endpoint6):
        assert permitted_by_filters(filters, endpoint(user=USER, app=OPENVPN))
        assert permitted_by_filters(filters, endpoint(user=SYSTEM, app=OPENVPN.upper()))
        others = [endpoint(user=USER, app=CURL), endpoint(user=SYSTEM, app=CURL)]
        # A copy of openvpn.exe elsewhere is another program.
        others.append(endpoint(user=USER, app=r"C:\Users\Public\openvpn.exe"))
        assert [p for p in others if permitted_by_filters(filters, p)] == []
        # Control: without the app-ID condition every one of them gets out.
        assert all(permitted_by_filters(_without_app_ids(filters), p) for p in others)


def test_the_wireguard_endpoint_is_still_only_for_system() -> None:
    """The app ID is OpenVPN's: WireGuard's permit keeps its owner condition
    alone (the driver's sockets have no process image to name)."""
    _config, filters = enforced("example", "blocked")
    endpoints = [f for f in filters if f.name.startswith("earlyfw: permit endpoint")]
    assert endpoints and all([c.field for c in f.conditions][-1] == s.FWPM_CONDITION_ALE_USER_ID for f in endpoints)
    assert not any(c.field == s.FWPM_CONDITION_ALE_APP_ID for f in filters for c in f.conditions)
    handshake = functools.partial(Packet, Layer.CONNECT_V4, V4("198.51.100.7"), 17, 50000, 51820, OTHER_LUID)
    assert permitted_by_filters(filters, handshake(user=SYSTEM, app=CURL))
    assert not permitted_by_filters(filters, handshake(user=USER, app=OPENVPN))


def test_a_named_program_takes_the_place_of_openvpn_exe() -> None:
    """[tunnel] program names the client elsewhere; a manual tunnel's
    endpoints are closed to other programs only when it names one."""
    program = r"D:\VPN\client.exe"
    to_endpoint = functools.partial(Packet, Layer.CONNECT_V4, V4("203.0.113.53"), 6, 50000, 53, OTHER_LUID)
    for kind in ("openvpn", "manual"):
        config = configuration.parse(
            OPENVPN_LAN.replace('kind = "openvpn"', f"kind = \"{kind}\"\nprogram = '{program}'")
        )
        bfe = RecordingBfe(files=(program,))
        engine.install(bfe, config)
        assert permitted_by_filters(bfe.filters(), to_endpoint(app=program))
        assert not permitted_by_filters(bfe.filters(), to_endpoint(app=OPENVPN))
        clean(bfe)
    manual = configuration.parse(OPENVPN_LAN.replace('kind = "openvpn"', 'kind = "manual"'))
    bfe = RecordingBfe(files=())
    engine.install(bfe, manual)
    assert permitted_by_filters(bfe.filters(), to_endpoint(app=CURL))


def test_a_missing_openvpn_exe_fails_the_install_and_changes_nothing() -> None:
    """No app ID, no install: the endpoints are never opened to every program
    instead, and the block that was there stays as it was."""
    bfe = RecordingBfe(aliases={"tun0": TUNNEL_LUID}, files=())
    engine.install(bfe, load("example"))
    before = copy.deepcopy(bfe.store)
    with pytest.raises(EarlyfwError) as caught:
        engine.install(bfe, load("openvpn-lan"))
    message = str(caught.value)
    assert message.startswith(f"tunnel.program: {OPENVPN!r}: no such file") and "\n" not in message
    assert caught.value.hint is not None and "[tunnel] program" in caught.value.hint
    assert bfe.store == before
    assert "FwpmTransactionBegin0" not in bfe.names()[bfe.names().index("FwpmGetAppIdFromFileName0") :]
    clean(bfe)


def test_dhcp_is_broadcast_or_the_dhcp_client_service() -> None:
    """Any program could otherwise talk to any host over UDP 68->67."""
    assert DHCP == "S-1-5-80-2940520708-3855866260-481812779-327648279-1710889582"  # `sc showsid dhcp`
    for state in ("blocked", "relaxed"):
        _config, filters = enforced("example", state)
        exfiltrate = Packet(Layer.CONNECT_V4, V4("203.0.113.9"), 17, 68, 67, OTHER_LUID, user=USER)
        reply_in = Packet(Layer.RECV_ACCEPT_V4, V4("203.0.113.9"), 17, 68, 67, OTHER_LUID, user=USER)
        assert not permitted_by_filters(filters, exfiltrate)
        assert not permitted_by_filters(filters, reply_in)
        # What DHCP itself needs: discover/request by broadcast, renewal by
        # unicast to the server, and the server's offers and acks.
        discover = Packet(Layer.CONNECT_V4, V4("255.255.255.255"), 17, 68, 67, OTHER_LUID, user=DHCP)
        renew = Packet(Layer.CONNECT_V4, V4("192.168.1.1"), 17, 68, 67, OTHER_LUID, user=DHCP)
        offer = Packet(Layer.RECV_ACCEPT_V4, V4("192.168.1.1"), 17, 68, 67, OTHER_LUID, user=DHCP)
        assert all(permitted_by_filters(filters, p) for p in (discover, renew, offer))


def test_forwarded_traffic_is_blocked_until_relaxed_and_then_only_via_the_tunnel(bfe: RecordingBfe) -> None:
    """ICS, Mobile Hotspot and NATed VMs are routed, never seen by ALE."""
    config = load("example")
    engine.install(bfe, config)
    for layer in (Layer.FORWARD_V4, Layer.FORWARD_V6):
        blocks = [f for f in bfe.filters() if f.layer == layer.key and f.action == s.FWP_ACTION_BLOCK]
        assert sorted((f.flags & 0x3, f.conditions) for f in blocks) == [
            (s.FWPM_FILTER_FLAG_PERSISTENT, ()),
            (s.FWPM_FILTER_FLAG_BOOTTIME, ()),
        ]
    engine.relax(bfe, config, Interface("wg0", TUNNEL_LUID))
    permits = {
        (f.layer, c.field, c.value)
        for f in bfe.filters()
        if f.action == s.FWP_ACTION_PERMIT and f.layer in (Layer.FORWARD_V4.key, Layer.FORWARD_V6.key)
        for c in f.conditions
    }
    assert permits == {
        (layer.key, field, TUNNEL_LUID)
        for layer in (Layer.FORWARD_V4, Layer.FORWARD_V6)
        for field in (s.FWPM_CONDITION_IP_FORWARD_INTERFACE, s.FWPM_CONDITION_IP_ARRIVAL_INTERFACE)
    }


def test_the_model_knows_which_fields_each_layer_has(bfe: RecordingBfe) -> None:
    """Control for the layer model: an ALE field at IPFORWARD, or a
    forwarding field at ALE, is refused as BFE refuses it."""
    engine.install(bfe, load("example"))
    wrong = [
        (Layer.FORWARD_V4, rules.Condition(rules.Field.USER, rules.SYSTEM_ONLY)),
        (Layer.FORWARD_V4, rules.Condition(rules.Field.APP, rules.Program(OPENVPN))),
        (Layer.FORWARD_V4, rules.Condition(rules.Field.LOCAL_INTERFACE, Interface("wg0", TUNNEL_LUID))),
        (Layer.CONNECT_V4, rules.Condition(rules.Field.FORWARD_INTERFACE, Interface("wg0", TUNNEL_LUID))),
    ]
    for layer, condition in wrong:
        spec = rules.Filter("x", layer, rules.Lifetime.RUNTIME, Action.PERMIT, rules.Weight.LAN, (condition,))
        with engine.session(bfe) as session, pytest.raises(engine.WfpError, match="FWP_E_CONDITION_NOT_FOUND"):
            session.resolve(rules.programs([spec]))
            session.add_filter(spec)
    clean(bfe)


ETHERNET_LUID = 0x0006_0000_0003_0000
WIFI_LUID = 0x0047_0000_0004_0000
TAP_LUID = 0x0006_0000_0009_0000


@pytest.mark.parametrize(
    ("alias", "luid", "adapter"),
    [
        ("Ethernet", ETHERNET_LUID, wfp_model.Adapter("Intel(R) Ethernet Connection I219-V", hardware=True)),
        ("Wi-Fi", WIFI_LUID, wfp_model.Adapter("Intel(R) Wi-Fi 6 AX201 160MHz", hardware=True)),
        # Virtual but not a tunnel: a Hyper-V switch port bridges onto the NIC.
        ("vEthernet (External)", ETHERNET_LUID + 1, wfp_model.Adapter("Hyper-V Virtual Ethernet Adapter")),
    ],
)
def test_relax_refuses_an_adapter_that_is_not_a_tunnel(alias: str, luid: int, adapter: wfp_model.Adapter) -> None:
    """Permitting a NIC would be no kill switch at all."""
    bfe = RecordingBfe(aliases={alias: luid}, adapters={luid: adapter})
    with pytest.raises(EarlyfwError, match="is not a tunnel adapter"):
        engine.tunnel_luid(bfe, alias)
    ok = RecordingBfe(
        aliases={"wg0": TUNNEL_LUID, "OpenVPN TAP-Windows6": TAP_LUID},
        adapters={TAP_LUID: wfp_model.Adapter("TAP-Windows Adapter V9 #2")},
    )
    assert engine.tunnel_luid(ok, "wg0") == TUNNEL_LUID  # control: wintun
    assert engine.tunnel_luid(ok, "OpenVPN TAP-Windows6") == TAP_LUID  # TAP-Windows6: Ethernet, not hardware
    assert engine.tunnel_luid(ok, "absent") is None


# -- failure paths -----------------------------------------------------------

INSTALL_FAILURES = [
    ("FwpmEngineOpen0", 1),
    ("FwpmTransactionBegin0", 1),
    ("FwpmFilterCreateEnumHandle0", 2),
    ("FwpmFilterEnum0", 3),
    ("FwpmProviderAdd0", 1),
    ("FwpmSubLayerAdd0", 1),
    ("FwpmFilterAdd0", 1),
    ("FwpmFilterAdd0", 9),
    ("FwpmFilterAdd0", 30),  # the last of the example's 30
    ("FwpmTransactionCommit0", 1),
]


def snapshot(bfe: RecordingBfe) -> Store:
    return copy.deepcopy(bfe.store)


@pytest.mark.parametrize(("call", "nth"), INSTALL_FAILURES)
@pytest.mark.parametrize("before", ["nothing", "installed", "relaxed"])
def test_an_error_mid_install_changes_nothing(bfe: RecordingBfe, call: str, nth: int, before: str) -> None:
    old = load("openvpn-lan")
    if before != "nothing":
        engine.install(bfe, old)
    if before == "relaxed":
        engine.relax(bfe, old, Interface("tun0", TUNNEL_LUID))
    saved = snapshot(bfe)
    calls = len(bfe.calls)
    bfe.fail(call, s.FWP_E_IN_USE, nth=nth)
    with pytest.raises(EarlyfwError, match=call):
        engine.install(bfe, load("example"))
    clean(bfe)
    assert bfe.store == saved  # the old policy, or nothing, exactly
    if "FwpmTransactionBegin0" in bfe.names()[calls:] and call != "FwpmTransactionBegin0":
        assert "FwpmTransactionAbort0" in bfe.names()[calls:]
    if before == "nothing":
        assert bfe.store == Store()


def test_an_error_mid_relax_stays_blocked(bfe: RecordingBfe) -> None:
    config = load("example")
    engine.install(bfe, config)
    saved = snapshot(bfe)
    bfe.fail("FwpmFilterAdd0", s.FWP_E_INVALID_PARAMETER, nth=3)
    with pytest.raises(EarlyfwError):
        engine.relax(bfe, config, Interface("wg0", TUNNEL_LUID))
    assert bfe.store == saved
    clean(bfe)


def test_relax_without_install_fails_and_says_why(bfe: RecordingBfe) -> None:
    with pytest.raises(EarlyfwError) as error:
        engine.relax(bfe, load("example"), Interface("wg0", TUNNEL_LUID))
    assert "FWP_E_SUBLAYER_NOT_FOUND" in str(error.value)
    assert error.value.hint is not None and "earlyfw install" in error.value.hint
    assert bfe.store == Store()
    clean(bfe)


def _partial(steps: Callable[[engine.Session], None]) -> Callable[[RecordingBfe], None]:
    def make(bfe: RecordingBfe) -> None:
        with engine.session(bfe) as session, session.transaction():
            steps(session)

    return make


def _provider_only(session: engine.Session) -> None:
    session.add_provider()


def _no_filters(session: engine.Session) -> None:
    session.add_provider()
    session.add_sublayer()


def _boottime_only(session: engine.Session) -> None:
    _no_filters(session)
    for f in rules.boottime_set():
        session.add_filter(f)


def _installed_rebooted(bfe: RecordingBfe) -> None:
    engine.install(bfe, load("example"))
    bfe.reboot(hide_boottime=True)


def _installed_relaxed_other_config(bfe: RecordingBfe) -> None:
    config = load("many")
    engine.install(bfe, config)
    engine.relax(bfe, config, Interface("vpn", TUNNEL_LUID))


PARTIAL = {
    "nothing": lambda bfe: None,
    "provider only": _partial(_provider_only),
    "provider and sublayer": _partial(_no_filters),
    "boot-time filters only": _partial(_boottime_only),
    "installed, rebooted, boot-time records unlisted": _installed_rebooted,
    "installed and relaxed, 70 endpoints": _installed_relaxed_other_config,
}


@pytest.mark.parametrize("state", PARTIAL)
def test_uninstall_after_a_partial_install(bfe: RecordingBfe, state: str) -> None:
    PARTIAL[state](bfe)
    engine.uninstall(bfe)
    clean(bfe)
    assert bfe.store == Store()  # providers, sublayers, filters, boot-time records
    assert bfe.boot_policy() == []
    engine.uninstall(bfe)  # and again: idempotent
    assert bfe.store == Store()


def test_an_error_mid_uninstall_keeps_the_block(bfe: RecordingBfe) -> None:
    engine.install(bfe, load("example"))
    saved = snapshot(bfe)
    bfe.fail("FwpmFilterDeleteByKey0", s.FWP_E_IN_USE, nth=5)
    with pytest.raises(EarlyfwError):
        engine.uninstall(bfe)
    assert bfe.store == saved
    clean(bfe)


def test_the_model_rejects_what_bfe_rejects(bfe: RecordingBfe) -> None:
    """Control for the model itself: a filter BFE would refuse fails here."""
    engine.install(bfe, load("example"))
    both = rules.Filter("bad", Layer.CONNECT_V4, rules.Lifetime.PERSISTENT, rules.Action.BLOCK, rules.Weight.LAN)
    with engine.session(bfe) as session:
        keep = engine._Keep()
        structure = engine.marshal_filter(both, keep, {})
        structure.flags = s.FWPM_FILTER_FLAG_BOOTTIME | s.FWPM_FILTER_FLAG_PERSISTENT
        assert session.call("FwpmFilterAdd0", session.handle, ctypes.byref(structure), None, None, ok=[0x8032001E])
        v6_address_on_v4 = rules.Filter(
            "v6 on v4",
            Layer.CONNECT_V4,
            rules.Lifetime.RUNTIME,
            rules.Action.PERMIT,
            rules.Weight.LAN,
            (rules.Condition(rules.Field.REMOTE_ADDRESS, ipaddress.ip_address("2001:db8::1")),),
        )
        with pytest.raises(ValueError, match="cannot encode"):
            session.add_filter(v6_address_on_v4)
        structure = engine.marshal_filter(both, keep, {})
        structure.weight.uint8 = 16
        assert session.call("FwpmFilterAdd0", session.handle, ctypes.byref(structure), None, None, ok=[0x80320025])
    clean(bfe)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('[[allow]]\ninterface = "tailscale0"\n', "allow"),
        ('[forward]\nvia_tunnel = ["docker0"]\n', "forward.via_tunnel"),
    ],
)
def test_linux_only_keys_are_refused_not_ignored(bfe: RecordingBfe, extra: str, key: str) -> None:
    """[[allow]] and [forward] via_tunnel have no WFP equivalent earlyfw writes:
    install and relax refuse them in one line, and BFE is left untouched."""
    config = configuration.parse(EXAMPLE + extra)
    with pytest.raises(ConfigError) as caught:
        engine.install(bfe, config)
    assert str(caught.value).startswith(key) and "windows target" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert bfe.filters() == []
    with pytest.raises(ConfigError):
        rules.relax_set(config, Interface("wg0", TUNNEL_LUID))
