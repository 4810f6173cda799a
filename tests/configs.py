"""The example config the unit tests share, as TOML: a tunnel on wg0 with one
IPv4 and one IPv6 endpoint and a resolver inside the tunnel."""

from __future__ import annotations


def example_toml(kind: str = "wireguard", *, extra: str = "") -> str:
    """The example with a tunnel of `kind`, and `extra` TOML after it."""
    return f"""\
[tunnel]
kind = "{kind}"
interface = "wg0"
[[endpoint]]
address = "198.51.100.7"
port = 51820
[[endpoint]]
address = "2001:db8::7"
port = 51820
[dns]
servers = ["10.64.0.1"]
{extra}"""


# What the boot targets are tested with: the example, and a host only the
# initramfs may reach (an NFS root).
CONFIG_TEXT = example_toml(extra='[[initramfs.allow]]\naddress = "192.0.2.10"\nport = 2049\nprotocol = "tcp"\n')
