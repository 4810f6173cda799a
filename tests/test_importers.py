"""`earlyfw import`: the config comes from the VPN client's own file."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earlyfw import cli, config, importers
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
        # Regressions (issue 10): only ASCII digits are numbers.
        ("wg", "[Peer]\nEndpoint = 198.51.100.7:\u00b2\n", ["port", "\u00b2"]),
        ("wg", "[Peer]\nEndpoint = 198.51.100.7:\u0661\u0662\n", ["port", "\u0661\u0662"]),
        ("openvpn", "remote 198.51.100.7 \u0661\u0662\n", ["port", "\u0661\u0662"]),
        ("openvpn", "port \u00b9\u00b9\u00b9\u00b9\nremote 198.51.100.7\n", ["port", "\u00b9"]),
        ("openvpn", "remote 198.51.100.7 " + "9" * 5000 + "\n", ["port", "99999"]),
        # Addresses that can never carry the tunnel.
        ("wg", "[Peer]\nEndpoint = [::ffff:198.51.100.7]:51820\n", ["::ffff:198.51.100.7", "IPv4-mapped"]),
        ("openvpn", "remote 127.0.0.1 1194\n", ["127.0.0.1", "loopback"]),
        ("openvpn", "remote 255.255.255.255 1194\n", ["255.255.255.255", "broadcast"]),
        ("openvpn", "remote 224.0.0.251 1194\n", ["224.0.0.251", "multicast"]),
        ("wg", "[Peer]\nEndpoint = [::]:51820\n", ["'::'"]),
        # OpenVPN's own rules for what it would refuse.
        ("openvpn", "remote 198.51.100.7\n<tls-crypt-v2>\nremote 6.6.6.6 53\n", ["<tls-crypt-v2>", "never closed"]),
        ("openvpn", "<connection>\nproto udp\n</connection>\n", ["<connection>", "remote"]),
        ("openvpn", "remote 2001:db8::7 1194 udp4\n", ["2001:db8::7", "IPv4", "udp4"]),
        ("openvpn", "remote vpn.example.net 1194\n", ["vpn.example.net", "hostname", "--resolve"]),
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


def test_ipv4_mapped_endpoint_is_refused_not_written(tmp_path: Path) -> None:
    """Regression: `import wg` wrote ::ffff:198.51.100.7, which no packet on
    the wire ever matches (the kernel sends IPv4 to it)."""
    source = write(tmp_path, "wg0.conf", "[Peer]\nEndpoint = [::ffff:198.51.100.7]:51820\n")
    out = tmp_path / "earlyfw.toml"
    result = earlyfw("--config", str(out), "import", "wg", str(source))
    assert result.returncode == 2, result.stderr
    assert "::ffff:198.51.100.7" in result.stderr.splitlines()[0]
    assert not out.exists()


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    for name, text, reader in (("wg0.conf", WG, importers.from_wireguard), ("c.ovpn", OVPN, importers.from_openvpn)):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        plain = write(tmp_path, "plain-" + name, text)
        assert reader(path).endpoints == reader(plain).endpoints


def test_proto_inside_a_connection_applies_to_that_connection_only(tmp_path: Path) -> None:
    text = """\
proto udp
port 1194
remote 198.51.100.7
<connection>
remote 198.51.100.8 443
proto tcp-client
</connection>
<connection>
remote 198.51.100.9
</connection>
remote 198.51.100.10
"""
    imported = importers.from_openvpn(write(tmp_path, "c.ovpn", text))
    assert [str(e) for e in imported.endpoints] == [
        "198.51.100.7:1194/udp",
        "198.51.100.8:443/tcp",
        "198.51.100.9:1194/udp",
        "198.51.100.10:1194/udp",
    ]


def test_a_connection_block_starts_from_the_options_where_it_opens(tmp_path: Path) -> None:
    """As OpenVPN copies them: options after the block do not reach into it,
    while a top-level remote takes the file's final options."""
    text = "remote 198.51.100.7\n<connection>\nremote 198.51.100.8\n</connection>\nproto tcp\nport 443\n"
    imported = importers.from_openvpn(write(tmp_path, "c.ovpn", text))
    assert [str(e) for e in imported.endpoints] == ["198.51.100.7:443/tcp", "198.51.100.8:1194/udp"]


def test_remote_inside_any_inline_block_is_content(tmp_path: Path) -> None:
    """Regression: a crafted file added 6.6.6.6:53/udp from inside <tls-crypt-v2>."""
    text = """\
remote 198.51.100.7 1194
<tls-crypt-v2>
remote 6.6.6.6 53
</tls-crypt-v2>
<extra-certs>
remote 6.6.6.7 53
</extra-certs>
  <x509_v3>
remote 6.6.6.8 53
  </x509_v3>
<connection>
remote 198.51.100.8 1195
<ca>
remote 6.6.6.9 53
</ca>
</connection>
"""
    imported = importers.from_openvpn(write(tmp_path, "c.ovpn", text))
    assert [str(e) for e in imported.endpoints] == ["198.51.100.7:1194/udp", "198.51.100.8:1195/udp"]


# --- properties: any bad value is one line, exit 2, nothing written --------------

inline_tags = st.one_of(
    st.sampled_from(["ca", "cert", "key", "tls-auth", "tls-crypt", "tls-crypt-v2", "extra-certs", "pkcs12", "secret"]),
    st.from_regex(r"[a-z][a-z0-9_-]{0,15}", fullmatch=True).filter(lambda t: t != "connection"),
)
good_address = st.sampled_from(["198.51.100.7", "203.0.113.9", "2001:db8::7"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(inline_tags, st.ip_addresses().map(str), st.integers(1, 65535)), min_size=1, max_size=4))
def test_no_inline_block_ever_adds_an_endpoint(blocks: list[tuple[str, str, int]]) -> None:
    body = "remote 198.51.100.7 1194\n" + "".join(
        f"<{tag}>\nremote {address} {port}\nproto tcp\nport 9\n</{tag}>\n" for tag, address, port in blocks
    )
    with tempfile.TemporaryDirectory() as tmp:
        imported = importers.from_openvpn(write(Path(tmp), "c.ovpn", body))
    assert [str(e) for e in imported.endpoints] == ["198.51.100.7:1194/udp"]


# Values a hostile or broken file may put where a number or an address goes.
bad_numbers = st.one_of(
    st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=6).filter(
        lambda t: not (t.isascii() and t.isdigit() and 1 <= int(t) <= 65535)
    ),
    st.integers(min_value=65536, max_value=10**30).map(str),
    st.sampled_from(["0", "-1", "+80", "0x50", "1e3", "80.0", "\u0668\u0660", "\uff18\uff10"]),
)
bad_addresses = st.one_of(
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.ip_addresses(network="127.0.0.0/8").map(str),
    st.ip_addresses(network="224.0.0.0/4").map(str),
    st.ip_addresses(network="ff00::/8").map(str),
    st.sampled_from(["::", "::1", "0.0.0.0", "255.255.255.255", "198.51.100.0/24", "1.2.3", "fe80::1%eth0"]),  # noqa: S104
)


def import_in_process(*args: str) -> tuple[int, str]:
    """`earlyfw ARGS` in this process (hypothesis runs hundreds), exit status and stderr."""
    err = io.StringIO()
    with (
        mock.patch.object(sys, "argv", ["earlyfw", *args]),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
        pytest.raises(SystemExit) as exited,
    ):
        cli.main()
    return int(exited.value.code or 0), err.getvalue()


def wg_with(endpoint: str) -> tuple[str, str]:
    return "wg0.conf", f"[Interface]\nAddress = 10.0.0.2/32\n[Peer]\nEndpoint = {endpoint}\n"


def ovpn_with(line: str) -> tuple[str, str]:
    return "c.ovpn", f"client\ndev tun\n{line}\n"


bad_files = st.one_of(
    bad_numbers.map(lambda n: ("wg", *wg_with(f"198.51.100.7:{n}"))),
    bad_addresses.map(lambda a: ("wg", *wg_with(f"[{a}]:51820" if ":" in a else f"{a}:51820"))),
    bad_numbers.map(lambda n: ("openvpn", *ovpn_with(f"remote 198.51.100.7 {n}"))),
    bad_numbers.map(lambda n: ("openvpn", *ovpn_with(f"port {n}\nremote 198.51.100.7"))),
    bad_numbers.map(lambda n: ("openvpn", *ovpn_with(f"<connection>\nremote 198.51.100.7\nport {n}\n</connection>"))),
    bad_addresses.map(lambda a: ("openvpn", *ovpn_with(f"remote {a} 1194"))),
    bad_addresses.map(lambda a: ("openvpn", *ovpn_with(f"<connection>\nremote {a}\n</connection>"))),
)


@settings(max_examples=300, deadline=None)
@given(bad_files, st.booleans())
def test_any_bad_value_is_one_line_exit_2_nothing_written(case: tuple[str, str, str], bom: bool) -> None:
    kind, name, text = case
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / name
        source.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
        out, client = Path(tmp) / "out" / "earlyfw.toml", Path(tmp) / "client.conf"
        status, stderr = import_in_process(
            "--config", str(out), "import", kind, str(source), "--client-out", str(client)
        )
        assert status == 2, stderr
        lines = stderr.splitlines()
        assert lines[0].startswith("earlyfw: error: ") and "Traceback" not in stderr
        assert all(line.startswith("earlyfw: hint: ") for line in lines[1:])
        assert sorted(p.name for p in Path(tmp).iterdir()) == [name]
