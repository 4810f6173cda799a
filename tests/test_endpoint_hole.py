"""The endpoint hole is for the tunnel only (issue 13, part 4): the config's
[tunnel] mark, and where the owner rule sits in every rendered chain. The real
packets are in tests/test_endpoint_hole_netns.py."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earlyfw import config, importers, policy
from earlyfw.config import Config, Endpoint, Transport, TunnelKind
from earlyfw.errors import ConfigError
from earlyfw.policy import State


def data(**tunnel: Any) -> dict[str, Any]:
    return {
        "tunnel": {"kind": "openvpn", "interface": "tun0", **tunnel},
        "endpoint": [{"address": "198.51.100.7", "port": 1194}],
    }


@pytest.mark.parametrize(("value", "expected"), [(1, 1), (17734, 17734), (0xFFFFFFFF, 0xFFFFFFFF)])
def test_mark_is_read_and_round_trips(value: int, expected: int) -> None:
    parsed = Config.from_dict(data(mark=value))
    assert parsed.tunnel_mark == expected
    assert config.parse(parsed.to_toml()) == parsed


def test_mark_in_hex_as_toml_writes_it() -> None:
    text = '[tunnel]\nmark = 0xca6c\n[[endpoint]]\naddress = "198.51.100.7"\nport = 1\n'
    assert config.parse(text).tunnel_mark == 51820


@pytest.mark.parametrize("value", [0, -1, 0x100000000, True, "51820", 1.5])
def test_a_bad_mark_is_one_line_naming_it(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^tunnel\.mark: ") as error:
        Config.from_dict(data(mark=value))
    assert "\n" not in str(error.value)


def test_no_mark_by_default() -> None:
    assert Config.from_dict(data()).tunnel_mark is None
    assert "mark" not in Config.from_dict(data()).to_dict()["tunnel"]


# --- the rendered rules ---------------------------------------------------------------

CHAIN = re.compile(r"chain (output|egress) \{(.*?)\n\t\}", re.S)


def endpoints(v4: int, v6: int) -> tuple[Endpoint, ...]:
    found = [Endpoint(ipaddress.ip_address("198.51.100.1") + i, 51820) for i in range(v4)]
    found += [Endpoint(ipaddress.ip_address("2001:db8::1") + i, 443, Transport.TCP) for i in range(v6)]
    return tuple(found)


@settings(max_examples=80, deadline=None)
@given(
    v4=st.integers(0, 3),
    v6=st.integers(0, 3),
    mark=st.none() | st.integers(1, 0xFFFFFFFF),
    state=st.sampled_from(list(State)),
    egress=st.booleans(),
    kind=st.sampled_from(list(TunnelKind)),
    port=st.none() | st.integers(1, 65535),
)
def test_every_endpoint_accept_comes_after_its_owner_refusal(
    *, v4: int, v6: int, mark: int | None, state: State, egress: bool, kind: TunnelKind, port: int | None
) -> None:
    """In the inet output chain and the netdev egress chain the first rule
    naming an endpoint set refuses other owners (the mark the one exception
    when configured) before the accept: always while blocked and in the
    initramfs; relaxed, the inet chain spares established flows (a kernel
    tunnel's packets carry the socket of the packet inside) and the egress
    chain, without conntrack, refuses none; relaxed, the inet chain spares
    the tunnel's listen port as UDP source too, when known. Blocked and in
    the initramfs the port changes nothing."""
    cfg = Config(
        tunnel_kind=kind,
        interface="wg0",
        endpoints=endpoints(max(v4, 1 if not v6 else 0), v6),
        egress_interfaces=("eth0",) if egress else (),
        tunnel_mark=mark,
    )
    script = policy.render(cfg, state, egress_devices=cfg.egress_interfaces, tunnel_port=port)
    if not state.allows_tunnel:
        assert script == policy.render(cfg, state, egress_devices=cfg.egress_interfaces)
    chains = CHAIN.findall(script)
    assert {name for name, _ in chains} == ({"output", "egress"} if egress else {"output"})
    owner = "meta skuid != 0" + (f" meta mark != {mark:#010x}" if mark is not None else "")
    for name, body in chains:
        for family in (4, 6):
            lines = [line.strip() for line in body.splitlines() if f"@endpoints_v{family} " in line]
            *refusals, accept = lines
            assert accept.endswith(f"@endpoints_v{family} accept")
            if name == "egress" and state.allows_tunnel:
                assert refusals == []
                continue
            assert len(refusals) == 1, (name, lines)
            flows = "ct state != established " if state.allows_tunnel else ""
            if state.allows_tunnel and port is not None:
                flows += f"meta l4proto . th sport != {{ udp . {port} }} "
            assert f"th dport @endpoints_v{family} {flows}{owner} " in refusals[0]
            assert refusals[0].endswith("drop") or "reject" in refusals[0]
            assert "refused_endpoint" in refusals[0] or "refused_raw" in refusals[0] or state.core_only


# --- import: the client's own mark ---------------------------------------------------


@pytest.mark.parametrize(
    ("line", "mark"), [("FwMark = 0xca6c", 51820), ("FwMark = 51820", 51820), ("FwMark = off", None)]
)
def test_wireguard_fwmark_is_imported(tmp_path: Path, line: str, mark: int | None) -> None:
    conf = tmp_path / "wg0.conf"
    conf.write_text(f"[Interface]\nPrivateKey = x\n{line}\n[Peer]\nEndpoint = 198.51.100.7:51820\n")
    assert importers.from_wireguard(conf).tunnel_mark == mark


@pytest.mark.parametrize(
    ("interface", "allowed", "mark"),
    [
        ("", "0.0.0.0/0, ::/0", 51820),  # wg-quick's full tunnel: fwmark 51820 at run time
        ("Table = auto\n", "::/0", 51820),
        ("Table = off\n", "0.0.0.0/0", None),  # no routes, no fwmark
        ("Table = 1234\n", "0.0.0.0/0", None),  # routes in that table, no fwmark
        ("", "0.0.0.0/1, 128.0.0.0/1", None),  # split default: plain routes
        ("FwMark = 0x1234\n", "0.0.0.0/0", 0x1234),  # the file's own wins
    ],
)
def test_wg_quicks_full_tunnel_fwmark_is_imported(
    tmp_path: Path, interface: str, allowed: str, mark: int | None
) -> None:
    conf = tmp_path / "wg0.conf"
    conf.write_text(
        f"[Interface]\nPrivateKey = x\n{interface}[Peer]\nAllowedIPs = {allowed}\nEndpoint = 198.51.100.7:51820\n"
    )
    imported = importers.read_wireguard(conf)
    assert imported.mark == mark
    assert any("wg show wg0 fwmark" in w for w in imported.warnings) == (
        mark == 51820 and not interface.startswith("FwMark")
    )


def test_a_bad_fwmark_names_its_line(tmp_path: Path) -> None:
    conf = tmp_path / "wg0.conf"
    conf.write_text("[Interface]\nFwMark = 0x1ffffffff\n[Peer]\nEndpoint = 198.51.100.7:51820\n")
    with pytest.raises(ConfigError, match=r"wg0\.conf:2: FwMark '0x1ffffffff'"):
        importers.from_wireguard(conf)


@pytest.mark.parametrize(("extra", "mark", "warned"), [("", None, False), ("user nobody\n", None, True),
                                                        ("user nobody\nmark 17734\n", 17734, False)])  # fmt: skip
def test_openvpn_mark_is_imported_and_user_without_it_is_warned(
    tmp_path: Path, extra: str, mark: int | None, warned: bool
) -> None:
    """`user` without `mark`: OpenVPN's restarts send from that user's socket,
    which the endpoint hole refuses (measured in test_endpoint_hole_netns)."""
    conf = tmp_path / "client.ovpn"
    conf.write_text("remote 198.51.100.7 1194\n" + extra)
    imported = importers.read_openvpn(conf)
    assert importers.build(imported).tunnel_mark == mark
    assert bool(imported.warnings) == warned
    assert all("mark" in w and "user nobody" in w for w in imported.warnings)


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_a_tunnel_port_out_of_range_is_refused(port: int) -> None:
    cfg = Config(tunnel_kind=TunnelKind.WIREGUARD, interface="wg0", endpoints=endpoints(1, 0))
    with pytest.raises(ValueError, match=f"tunnel port {port} is not a port"):
        policy.render(cfg, State.RELAXED, tunnel_port=port)
