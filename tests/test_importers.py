"""`earlyfw import`: the config comes from the VPN client's own file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from earlyfw import config, importers
from earlyfw.errors import ConfigError

WG = """\
[Interface]
PrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=
Address = 10.64.0.2/32, fd00::2/128
DNS = 10.64.0.1, fd00::1, corp.example  # a search domain is not a resolver

[Peer]
PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
AllowedIPs = 0.0.0.0/0, ::/0
Endpoint = 198.51.100.7:51820

[Peer]
PublicKey = TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=
AllowedIPs = 0.0.0.0/0
Endpoint = [2001:db8::7]:443
"""

OVPN = """\
client
dev tun
proto udp
port 1194
remote 198.51.100.7
remote 198.51.100.8 443 tcp-client
<connection>
remote 203.0.113.9 1195 udp
</connection>
dhcp-option DNS 10.8.0.1
<ca>
-----BEGIN CERTIFICATE-----
remote 192.0.2.66 9999
-----END CERTIFICATE-----
</ca>
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_wireguard_every_peer_and_resolver(tmp_path: Path) -> None:
    imported = importers.from_wireguard(write(tmp_path, "wg7.conf", WG))
    assert imported.interface == "wg7"
    assert imported.tunnel_kind == config.TunnelKind.WIREGUARD
    assert [str(e) for e in imported.endpoints] == ["198.51.100.7:51820/udp", "[2001:db8::7]:443/udp"]
    assert [str(a) for a in imported.dns_servers] == ["10.64.0.1", "fd00::1"]


def test_openvpn_remotes_connection_blocks_and_defaults(tmp_path: Path) -> None:
    imported = importers.from_openvpn(write(tmp_path, "client.ovpn", OVPN))
    assert imported.interface == "tun0"
    assert [str(e) for e in imported.endpoints] == [
        "198.51.100.7:1194/udp",
        "198.51.100.8:443/tcp",
        "203.0.113.9:1195/udp",
    ]  # and not the `remote` line inside the inline certificate
    assert [str(a) for a in imported.dns_servers] == ["10.8.0.1"]


@pytest.mark.parametrize(
    ("kind", "text", "words"),
    [
        ("wg", "[Peer]\nEndpoint = vpn.example.net:51820\n", ["Endpoint", "vpn.example.net", "hostname"]),
        ("wg", "[Peer]\nEndpoint = 198.51.100.7:0\n", ["port", "0"]),
        ("wg", "[Peer]\nEndpoint = 198.51.100.7\n", ["Endpoint", "198.51.100.7", "HOST:PORT"]),
        ("wg", "[Interface]\nAddress = 10.0.0.2/32\n", ["no endpoint"]),
        ("openvpn", "remote 198.51.100.7 1194 sctp\n", ["proto", "sctp"]),
        ("openvpn", "remote 198.51.100.7 http\n", ["port", "http"]),
        ("openvpn", "dev tun\n", ["no endpoint"]),
    ],
)
def test_bad_client_files_name_the_value(kind: str, text: str, words: list[str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        importers.IMPORTERS[kind](write(tmp_path, "wg0.conf" if kind == "wg" else "c.ovpn", text))
    for word in words:
        assert word in str(caught.value)


def earlyfw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "earlyfw", *args], capture_output=True, text=True, check=False)


def test_cli_import_writes_a_loadable_config_and_refuses_to_overwrite(tmp_path: Path) -> None:
    source = write(tmp_path, "wg0.conf", WG)
    out = tmp_path / "etc" / "earlyfw.toml"
    first = earlyfw("--config", str(out), "import", "wg", str(source))
    assert first.returncode == 0, first.stderr
    assert config.load(out) == importers.from_wireguard(source)
    assert out.stat().st_mode & 0o777 == 0o644
    again = earlyfw("--config", str(out), "import", "wg", str(source))
    assert again.returncode == 1
    assert "already exists" in again.stderr


def test_cli_import_bad_file_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    source = write(tmp_path, "wg0.conf", "[Peer]\nEndpoint = vpn.example.net:51820\n")
    out = tmp_path / "earlyfw.toml"
    result = earlyfw("--config", str(out), "import", "wg", str(source))
    assert result.returncode == 2
    assert result.stderr.splitlines()[0].startswith("earlyfw: error: ")
    assert "vpn.example.net" in result.stderr.splitlines()[0]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [source]
