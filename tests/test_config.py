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
