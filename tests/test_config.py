"""The config contract: every bad value is one clear error naming key and value;
every accepted value renders a ruleset the real `nft -c` accepts."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from earlyfw import config, policy
from earlyfw.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent / "payload" / "examples" / "earlyfw.toml"


def base() -> dict[str, Any]:
    return {
        "tunnel": {"kind": "wireguard", "interface": "wg0"},
        "endpoint": [{"address": "198.51.100.7", "port": 51820, "protocol": "udp"}],
        "dns": {"servers": ["10.64.0.1"]},
        "lan": {"allow": False},
    }


def nft_check(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["unshare", "--map-root-user", "--net", "nft", "-c", "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
        check=False,
    )


def test_example_config_round_trips() -> None:
    loaded = config.load(EXAMPLE)
    assert loaded.interface == "wg0"
    assert [str(e) for e in loaded.endpoints] == ["198.51.100.7:51820/udp", "[2001:db8::7]:51820/udp"]
    assert config.parse(loaded.to_toml()) == loaded


def test_defaults_follow_the_tunnel_kind() -> None:
    data = base()
    data["tunnel"] = {"kind": "openvpn"}
    parsed = config.Config.from_dict(data)
    assert parsed.interface == "tun0"
    assert parsed.lan_allow is False
    assert parsed.reject_after_seconds == 180


def with_value(path: str, value: object) -> dict[str, Any]:
    """base() with the dotted `path` (list indexes as numbers) set to value."""
    data = base()
    node: Any = data
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


BAD = [
    # (dotted path, value, words the message must contain)
    ("tunnel.interface", "a-very-long-ifname0", ["tunnel.interface", "a-very-long-ifname0", "15"]),
    ("tunnel.interface", "wg0; flush ruleset", ["tunnel.interface", "wg0; flush ruleset"]),
    ("tunnel.interface", 'wg"0', ["tunnel.interface", 'wg"0']),
    ("tunnel.interface", "..", ["tunnel.interface", "'..'"]),
    ("tunnel.interface", 7, ["tunnel.interface", "7"]),
    ("tunnel.kind", "ipsec", ["tunnel.kind", "ipsec", "wireguard | openvpn | manual"]),
    ("tunnel.mtu", 1420, ["tunnel.mtu", "unknown key"]),
    ("endpoint.0.port", 0, ["endpoint[0].port", "0", "1-65535"]),
    ("endpoint.0.port", 70000, ["endpoint[0].port", "70000"]),
    ("endpoint.0.port", "51820", ["endpoint[0].port", "'51820'"]),
    ("endpoint.0.port", True, ["endpoint[0].port", "True"]),
    ("endpoint.0.address", "198.51.100.0/24", ["endpoint[0].address", "198.51.100.0/24", "CIDR"]),
    ("endpoint.0.address", "vpn.example.net", ["endpoint[0].address", "vpn.example.net", "hostname"]),
    ("endpoint.0.address", "fe80::1%eth0", ["endpoint[0].address", "fe80::1%eth0", "zone"]),
    ("endpoint.0.address", "0.0.0.0", ["endpoint[0].address", "0.0.0.0"]),  # noqa: S104
    ("endpoint.0.address", "999.1.1.1", ["endpoint[0].address", "999.1.1.1"]),
    ("endpoint.0.address", "::ffff:198.51.100.7", ["endpoint[0].address", "::ffff:198.51.100.7", "IPv4-mapped"]),
    ("endpoint.0.address", "127.0.0.1", ["endpoint[0].address", "127.0.0.1", "loopback"]),
    ("endpoint.0.address", "::1", ["endpoint[0].address", "::1", "loopback"]),
    ("endpoint.0.address", "255.255.255.255", ["endpoint[0].address", "255.255.255.255", "broadcast"]),
    ("endpoint.0.address", "239.1.2.3", ["endpoint[0].address", "239.1.2.3", "multicast"]),
    ("endpoint.0.address", "::", ["endpoint[0].address", "'::'"]),
    ("endpoint.0.host", "bad_host!", ["endpoint[0].host", "bad_host!", "hostname"]),
    ("endpoint.0.host", 7, ["endpoint[0].host", "7"]),
    ("endpoint.0.protocol", "icmp", ["endpoint[0].protocol", "icmp", "udp | tcp"]),
    ("endpoint.0.weight", 1, ["endpoint[0].weight", "unknown key"]),
    ("dns.servers", ["10.64.0.0/10"], ["dns.servers[0]", "10.64.0.0/10"]),
    ("dns.servers", "10.64.0.1", ["dns.servers", "expected a list"]),
    ("lan.allow", "yes", ["lan.allow", "'yes'", "true or false"]),
    ("egress.interfaces", ["wg0"], ["egress.interfaces", "wg0", "tunnel"]),
    ("watch.reject_after_seconds", 0, ["watch.reject_after_seconds", "0"]),
    ("firewall", {}, ["firewall", "unknown key"]),
]


@pytest.mark.parametrize(("path", "value", "words"), BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_bad_values_name_key_and_value(path: str, value: object, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        config.Config.from_dict(with_value(path, value))
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"


def test_missing_and_empty_endpoints_are_refused() -> None:
    data = base()
    del data["endpoint"]
    with pytest.raises(ConfigError, match=r"^endpoint: missing$"):
        config.Config.from_dict(data)
    data["endpoint"] = []
    with pytest.raises(ConfigError, match="at least one"):
        config.Config.from_dict(data)


def test_duplicate_endpoint_is_refused() -> None:
    data = base()
    data["endpoint"] = data["endpoint"] * 2
    with pytest.raises(ConfigError, match=r"198\.51\.100\.7:51820/udp is listed twice"):
        config.Config.from_dict(data)


def test_hostname_error_hints_how_to_resolve() -> None:
    with pytest.raises(ConfigError) as caught:
        config.Config.from_dict(with_value("endpoint.0.address", "vpn.example.net"))
    assert caught.value.hint is not None and "getent ahosts vpn.example.net" in caught.value.hint
    assert "--resolve" in caught.value.hint


# Every address that can never carry the tunnel, in every spelling: mapped
# forms of any IPv4 address (the ip6 set never sees them on the wire),
# loopback, multicast, unspecified and "this network", broadcast.
unusable = st.one_of(
    st.ip_addresses(v=4).map(lambda a: ipaddress.IPv6Address(f"::ffff:{a}")),
    st.ip_addresses(network="127.0.0.0/8"),
    st.just(ipaddress.IPv6Address("::1")),
    st.ip_addresses(network="224.0.0.0/4"),
    st.ip_addresses(network="ff00::/8"),
    st.ip_addresses(network="0.0.0.0/8"),
    st.sampled_from([ipaddress.IPv6Address("::"), ipaddress.IPv4Address("255.255.255.255")]),
)


def spellings(address: config.IPAddress) -> st.SearchStrategy[str]:
    forms = [str(address), address.exploded]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        forms += [f"::ffff:{address.ipv4_mapped}", f"0:0:0:0:0:FFFF:{address.ipv4_mapped}"]
    return st.sampled_from(forms)


@settings(max_examples=300, deadline=None)
@given(unusable.flatmap(spellings), st.sampled_from(["endpoint.0.address", "initramfs.allow"]))
def test_addresses_that_cannot_carry_the_tunnel_are_refused(spelled: str, where: str) -> None:
    if where == "initramfs.allow":
        data = with_value(where, [{"address": spelled, "port": 2049, "protocol": "tcp"}])
        key = "initramfs.allow[0].address"
    else:
        data, key = with_value(where, spelled), "endpoint[0].address"
    with pytest.raises(ConfigError) as caught:
        config.Config.from_dict(data)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{key}: {spelled!r} is ")


def test_invalid_toml_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[tunnel\nkind = 'x'\n")
    with pytest.raises(ConfigError) as caught:
        config.load(bad)
    assert str(caught.value).startswith(f"{bad}: not valid TOML")
    assert "\n" not in str(caught.value)


# Hypothesis, two ways: documents built from valid values must render rulesets
# the real `nft -c` accepts in every state; the same documents with one field
# replaced by an arbitrary value must give a one-line ConfigError or, if the
# value happens to be valid, again a ruleset nft accepts. Never anything else.

host_addresses = st.ip_addresses().filter(lambda a: not (a.is_unspecified or a.is_multicast)).map(str)
endpoint_addresses = st.ip_addresses().filter(lambda a: config.unusable_endpoint(a) is None).map(str)
valid_ifnames = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}", fullmatch=True).filter(
    lambda n: n not in {".", ".."}
)
valid_endpoint = st.fixed_dictionaries(
    {
        "address": endpoint_addresses,
        "port": st.integers(min_value=1, max_value=65535),
        "protocol": st.sampled_from(["udp", "tcp"]),
    }
)
unique_endpoints = st.lists(
    valid_endpoint, min_size=1, max_size=5, unique_by=lambda e: (e["address"], e["port"], e["protocol"])
)
valid_documents = st.fixed_dictionaries(
    {
        "tunnel": st.fixed_dictionaries(
            {"kind": st.sampled_from(["wireguard", "openvpn", "manual"]), "interface": valid_ifnames}
        ),
        "endpoint": unique_endpoints,
        "dns": st.fixed_dictionaries({"servers": st.lists(host_addresses, max_size=3)}),
        "lan": st.fixed_dictionaries({"allow": st.booleans()}),
    },
    optional={
        "initramfs": st.fixed_dictionaries({"allow": st.lists(valid_endpoint, max_size=2)}),
        "watch": st.fixed_dictionaries({"reject_after_seconds": st.integers(min_value=180, max_value=86400)}),
    },
)
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.text(max_size=40),
    st.lists(st.text(max_size=20), max_size=3),
    st.ip_addresses().map(str),
    st.ip_addresses().map(lambda a: f"{a}/{a.max_prefixlen}"),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
FIELDS = [
    "tunnel.kind",
    "tunnel.interface",
    "tunnel.unknown",
    "endpoint.0.address",
    "endpoint.0.port",
    "endpoint.0.protocol",
    "dns.servers",
    "lan.allow",
    "egress.interfaces",
    "initramfs.allow",
    "watch.reject_after_seconds",
    "allow",
    "forward.via_tunnel",
]


def assert_renders_for_nft(parsed: config.Config) -> None:
    for state in policy.State:
        script = policy.render(parsed, state)
        result = nft_check(script)
        assert result.returncode == 0, f"nft -c refused a validated config ({state}): {result.stderr}\n{script}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_documents)
def test_valid_documents_render_rulesets_nft_accepts(data: dict[str, Any]) -> None:
    assert_renders_for_nft(config.Config.from_dict(data))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_documents, st.sampled_from(FIELDS), anything)
def test_one_bad_field_is_an_error_or_a_ruleset_nft_accepts(data: dict[str, Any], path: str, value: object) -> None:
    node: Any = data
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[last] = value
    try:
        parsed = config.Config.from_dict(data)
    except ConfigError as e:
        assert "\n" not in str(e)
        assert path.split(".", maxsplit=1)[0] in str(e)
        return
    assert_renders_for_nft(parsed)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=20))
def test_only_safe_interface_names_reach_the_template(name: str) -> None:
    try:
        parsed = config.Config.from_dict(with_value("tunnel.interface", name))
    except ConfigError:
        return
    assert len(name.encode()) <= 15
    assert all(c.isascii() and (c.isalnum() or c in "_.-") for c in name)
    assert f'oifname "{parsed.interface}" accept' in policy.render(parsed, policy.State.RELAXED)


def test_every_address_form_in_the_rules_is_the_normalised_one() -> None:
    data = base()
    data["endpoint"] = [{"address": "2001:DB8:0:0::7", "port": 51820}]
    parsed = config.Config.from_dict(data)
    assert parsed.endpoints[0].address == ipaddress.IPv6Address("2001:db8::7")
    assert "2001:db8::7 . udp . 51820" in policy.render(parsed, policy.State.BLOCKED)


# --- Precise exceptions: [lan] allow = [networks], [[allow]], [forward] via_tunnel ---

EXCEPTIONS_BAD = [
    ("lan.allow", ["192.168.1.1/24"], ["lan.allow[0]", "192.168.1.1/24", "host bits"]),
    ("lan.allow", ["192.168.1.1"], ["lan.allow[0]", "192.168.1.1", "prefix"]),
    ("lan.allow", ["10.0.0.0/08"], ["lan.allow[0]", "10.0.0.0/08", "CIDR"]),
    ("lan.allow", ["10.0.0.0/255.0.0.0"], ["lan.allow[0]", "10.0.0.0/255.0.0.0", "CIDR"]),
    ("lan.allow", ["fe80::%eth0/64"], ["lan.allow[0]", "fe80::%eth0/64", "zone"]),
    ("lan.allow", ["::ffff:0:0/96"], ["lan.allow[0]", "::ffff:0:0/96", "IPv4-mapped"]),
    ("lan.allow", ["0.0.0.0/0"], ["lan.allow[0]", "0.0.0.0/0", "every IPv4 address"]),
    ("lan.allow", ["::/0"], ["lan.allow[0]", "::/0", "every IPv6 address"]),
    ("lan.allow", ["10.0.0.0/8", "10.1.0.0/16"], ["lan.allow[1]", "10.1.0.0/16", "overlaps lan.allow[0]"]),
    ("lan.allow", ["fd00::/8", "FD00::/8"], ["lan.allow[1]", "FD00::/8", "repeats lan.allow[0]"]),
    ("lan.allow", [24], ["lan.allow[0]", "24"]),
    ("lan.allow", "192.168.1.0/24", ["lan.allow", "192.168.1.0/24", "list of networks"]),
    ("allow", [{}], ["allow[0].interface", "missing"]),
    ("allow", [{"interface": "tailscale0", "cidrs": []}], ["allow[0].cidrs", "unknown key"]),
    ("allow", [{"interface": "wg0"}], ["allow[0].interface", "wg0", "tunnel"]),
    ("allow", [{"interface": "lo"}], ["allow[0].interface", "lo"]),
    ("allow", [{"interface": "tail scale"}], ["allow[0].interface", "tail scale"]),
    ("allow", [{"interface": "ts0"}, {"interface": "ts0"}], ["allow[1].interface", "ts0", "twice"]),
    ("allow", [{"interface": "ts0", "networks": []}], ["allow[0].networks", "empty"]),
    ("allow", [{"interface": "ts0", "networks": ["100.64.0.1/10"]}], ["allow[0].networks[0]", "100.64.0.1/10"]),
    ("allow", [{"interface": "ts0", "dns": "yes"}], ["allow[0].dns", "yes"]),
    ("allow", {"interface": "ts0"}, ["allow", "array of tables"]),
    ("forward.via_tunnel", ["docker0", "docker0"], ["forward.via_tunnel[1]", "docker0", "repeats"]),
    ("forward.via_tunnel", ["br-*", "br-1234"], ["forward.via_tunnel[1]", "br-1234", "overlaps"]),
    ("forward.via_tunnel", ["w*"], ["forward.via_tunnel[0]", "w*", "wg0"]),
    ("forward.via_tunnel", ["*"], ["forward.via_tunnel[0]", "'*'"]),
    ("forward.via_tunnel", ["br-*x"], ["forward.via_tunnel[0]", "br-*x"]),
    ("forward.via_tunnel", ["a-very-long-bridge*"], ["forward.via_tunnel[0]", "a-very-long-bridge*"]),
    ("forward.via_tunnel", "docker0", ["forward.via_tunnel", "expected a list"]),
    ("forward.bridges", ["docker0"], ["forward.bridges", "unknown key"]),
]


@pytest.mark.parametrize(("path", "value", "words"), EXCEPTIONS_BAD, ids=[f"{p}={v!r}" for p, v, _ in EXCEPTIONS_BAD])
def test_bad_exceptions_name_key_and_value(path: str, value: object, words: list[str]) -> None:
    test_bad_values_name_key_and_value(path, value, words)


def test_cross_key_conflicts_are_refused() -> None:
    data = base()
    data["egress"] = {"interfaces": ["eth0"]}
    data["allow"] = [{"interface": "eth0"}]
    with pytest.raises(ConfigError, match=r"^allow\[0\]\.interface: 'eth0' is in egress\.interfaces"):
        config.Config.from_dict(data)
    data = base()
    data["allow"] = [{"interface": "virbr0"}]
    data["forward"] = {"via_tunnel": ["virbr*"]}
    with pytest.raises(ConfigError, match=r"^forward\.via_tunnel\[0\]: 'virbr\*' matches the \[\[allow\]\] interface"):
        config.Config.from_dict(data)
    data = base()
    data["dns"] = {"servers": []}
    data["forward"] = {"via_tunnel": ["docker0"]}
    with pytest.raises(ConfigError, match=r"^forward\.via_tunnel: needs \[dns\] servers$"):
        config.Config.from_dict(data)


def test_lan_allow_keeps_its_boolean_form() -> None:
    for value in (True, False):
        parsed = config.Config.from_dict(with_value("lan.allow", value))
        assert parsed.lan_allow is value and parsed.lan_networks == ()
        assert policy.lan_networks(parsed, 4) == (policy.LAN_V4 if value else ())
    empty = config.Config.from_dict(with_value("lan.allow", []))
    assert empty.lan_allow is False and empty == config.Config.from_dict(base())


IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def covers(pattern: str, name: str) -> bool:
    """Whether the [forward] via_tunnel entry `pattern` (name or prefix*) matches interface `name`."""
    return name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern


def network_text(draw: st.DrawFn, version: int, *, whole: bool) -> str:
    bits = 32 if version == 4 else 128
    prefix = draw(st.integers(min_value=0 if whole else 1, max_value=bits))
    address = draw(st.ip_addresses(v=4) if version == 4 else st.ip_addresses(v=6))
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(IPV4_MAPPED):
        network = ipaddress.IPv6Network("2001:db8::/32")
    return str(network)


@st.composite
def network_lists(draw: st.DrawFn, *, whole: bool) -> list[str]:
    """Networks of both families, none overlapping another."""
    picked: list[config.IPNetwork] = []
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        candidate = ipaddress.ip_network(network_text(draw, draw(st.sampled_from([4, 6])), whole=whole))
        if not any(candidate.version == p.version and candidate.overlaps(p) for p in picked):
            picked.append(candidate)
    return [str(n) for n in picked]


bridge_names = st.one_of(valid_ifnames, valid_ifnames.filter(lambda n: len(n) <= 14).map(lambda n: n + "*"))


@st.composite
def documents_with_exceptions(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = draw(valid_documents)
    tunnel = data["tunnel"]["interface"]
    if draw(st.booleans()):
        data["lan"] = {"allow": draw(network_lists(whole=False))}
    names = draw(st.lists(valid_ifnames.filter(lambda n: n not in {tunnel, "lo"}), max_size=3, unique=True))
    data["allow"] = []
    for name in names:
        entry: dict[str, Any] = {"interface": name}
        if draw(st.booleans()):
            entry["networks"] = draw(network_lists(whole=True))
        if draw(st.booleans()):
            entry["dns"] = draw(st.booleans())
        data["allow"].append(entry)
    bridges: list[str] = []
    for pattern in draw(st.lists(bridge_names, max_size=3)):
        stem = pattern.rstrip("*")
        if any(covers(pattern, name) for name in (tunnel, "lo", *names)):
            continue
        if any(covers(b, stem) or covers(pattern, b.rstrip("*")) for b in bridges):
            continue
        bridges.append(pattern)
    if bridges:
        data["forward"] = {"via_tunnel": bridges}
        data["dns"]["servers"] = data["dns"]["servers"] or ["10.64.0.1"]
    return data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents_with_exceptions())
def test_exceptions_render_rulesets_nft_accepts_and_round_trip(data: dict[str, Any]) -> None:
    parsed = config.Config.from_dict(data)
    assert len(parsed.forward_via_tunnel) == len(data.get("forward", {}).get("via_tunnel", []))
    assert config.parse(parsed.to_toml()) == parsed
    assert_renders_for_nft(parsed)


@settings(max_examples=300, deadline=None)
@given(st.tuples(st.ip_addresses(v=4), st.integers(0, 32)) | st.tuples(st.ip_addresses(v=6), st.integers(0, 128)))
def test_host_bits_are_refused_with_the_network_named(spec: tuple[config.IPAddress, int]) -> None:
    address, prefix = spec
    text = f"{address}/{prefix}"
    network = ipaddress.ip_network(text, strict=False)
    try:
        parsed = config.Config.from_dict(with_value("lan.allow", [text]))
    except ConfigError as e:
        message = str(e)
        assert "\n" not in message and message.startswith(f"lan.allow[0]: {text!r} ")
        if network.network_address != address:
            assert "host bits" in message and e.hint == f"the network is {network}"
        elif prefix == 0:
            assert "every" in message
        else:
            assert isinstance(network, ipaddress.IPv6Network) and network.subnet_of(IPV4_MAPPED), message
        return
    assert network.network_address == address and parsed.lan_networks == (network,)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=24), anything))
def test_anything_as_a_network_is_a_network_or_one_line(value: object) -> None:
    for path, key in (("lan.allow", "lan.allow[0]"), ("allow", "allow[0].networks[0]")):
        listed = [value]
        data = with_value(path, listed if path == "lan.allow" else [{"interface": "ts0", "networks": listed}])
        try:
            parsed = config.Config.from_dict(data)
        except ConfigError as e:
            assert "\n" not in str(e) and str(e).startswith(key)
            continue
        network = (parsed.lan_networks or parsed.allow[0].networks)[0]
        assert isinstance(value, str) and ipaddress.ip_network(value) == network


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=20))
def test_only_safe_names_reach_the_exception_rules(name: str) -> None:
    for data in (with_value("allow", [{"interface": name}]), with_value("forward.via_tunnel", [name])):
        try:
            parsed = config.Config.from_dict(data)
        except ConfigError as e:
            assert "\n" not in str(e)
            continue
        assert len(name.encode()) <= 15
        assert all(c.isascii() and (c.isalnum() or c in "_.-") for c in name.removesuffix("*"))
        assert f'"{name}"' in policy.render(parsed, policy.State.RELAXED)


def _with_program(value: object, kind: str = "openvpn") -> dict[str, Any]:
    data = base()
    data["tunnel"] = {"kind": kind, "program": value}
    return data


BAD_PROGRAMS = [
    "openvpn.exe",  # relative
    r"\\server\share\openvpn.exe",  # UNC
    r"\\?\C:\OpenVPN\openvpn.exe",  # device prefix
    "C:/OpenVPN/openvpn.exe",  # forward slashes
    r"C:\OpenVPN\..\openvpn.exe",
    r"C:\OpenVPN\.\openvpn.exe",
    r"C:\OpenVPN\openvpn.exe ",  # Windows strips a trailing space
    r"C:\OpenVPN\openvpn.bat",
    "C:\\Open\nVPN\\openvpn.exe",
    "C:\\Open\x1bVPN\\openvpn.exe",
    r"C:\Open|VPN\openvpn.exe",
    "C:\\" + "a" * 260 + ".exe",
    7,
]


@pytest.mark.parametrize("value", BAD_PROGRAMS, ids=range(len(BAD_PROGRAMS)))
def test_bad_programs_name_the_value(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        config.Config.from_dict(_with_program(value))
    message = str(caught.value)
    assert message.startswith(f"tunnel.program: {value!r}") and "\n" not in message


def test_program_defaults_to_openvpn_exe_and_is_not_for_wireguard() -> None:
    assert config.Config.from_dict(_with_program(None)).windows_program == config.DEFAULT_OPENVPN_PROGRAM
    manual = config.Config.from_dict(_with_program(None, "manual"))
    assert manual.windows_program is None
    named = config.Config.from_dict(_with_program(r"D:\VPN Client\bin\client.EXE", "manual"))
    assert named.windows_program == r"D:\VPN Client\bin\client.EXE"
    assert config.parse(named.to_toml()) == named
    with pytest.raises(ConfigError, match=r"^tunnel.program: .* is not for WireGuard"):
        config.Config.from_dict(_with_program(config.DEFAULT_OPENVPN_PROGRAM, "wireguard"))


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(max_size=40).map(lambda rest: "C:\\" + rest + ".exe") | st.text(max_size=40))
def test_any_program_is_a_plain_windows_path_or_one_line(value: str) -> None:
    try:
        parsed = config.Config.from_dict(_with_program(value)).windows_program
    except ConfigError as e:
        assert str(e).startswith(f"tunnel.program: {value!r}") and "\n" not in str(e)
        return
    assert parsed == value and value[1:3] == ":\\" and value.lower().endswith(".exe")
    assert not any(ord(c) < 32 or c in '/:*?"<>|' for c in value[2:])
    assert all(part not in (".", "..") and part == part.rstrip(". ") for part in value[3:].split("\\"))
