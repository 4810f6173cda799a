"""Every command at 100,000 endpoints, the size the README promises, in a
throwaway namespace; and the private loads (`verify`, `status`) inside an
unprivileged user namespace, where nft cannot raise its netlink send buffer
and a 10,000-endpoint ruleset in one batch fails with `Message too long`."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from earlyfw import config as configuration
from earlyfw import policy
from earlyfw.errors import CommandError
from earlyfw.linux import nft
from earlyfw.policy import State
from earlyfw.run import Runner

pytestmark = pytest.mark.netns

N = 100_000
FIRST_V4 = ipaddress.IPv4Address("198.18.0.1")  # RFC 2544 benchmarking range
FIRST_V6 = ipaddress.IPv6Address("2001:db8:100::1")


def config_text(n: int, *, egress: str | None = "eth0") -> str:
    """`n` endpoints, three quarters IPv4 and a quarter IPv6, UDP and TCP."""
    lines = ['[tunnel]\nkind = "wireguard"\ninterface = "wg0"\n[dns]\nservers = ["10.64.0.1", "fd00::53"]\n']
    if egress:
        lines.append(f'[egress]\ninterfaces = ["{egress}"]\n')
    for i in range(n):
        address = FIRST_V4 + i if i % 4 else FIRST_V6 + i
        protocol = "tcp" if i % 5 == 0 else "udp"
        lines.append(f'[[endpoint]]\naddress = "{address}"\nport = {51820 + i % 7}\nprotocol = "{protocol}"\n')
    return "".join(lines)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"efw-scale-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def earlyfw(netns: str, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "earlyfw", "-q", "--config", str(config), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_every_command_at_100000_endpoints(netns: str, tmp_path: Path) -> None:
    path = tmp_path / "earlyfw.toml"
    path.write_text(config_text(N))
    subprocess.run(["ip", "-n", netns, "link", "add", "name", "eth0", "type", "veth", "peer", "name", "p0"], check=True)
    took: dict[str, float] = {}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        begin = time.monotonic()
        result = earlyfw(netns, path, *args)
        took[" ".join(args)] = time.monotonic() - begin
        assert result.returncode == 0, f"{args}: {result.stderr.strip()[-500:]}"
        return result

    rendered = run("render").stdout
    assert rendered.count(" . udp . ") + rendered.count(" . tcp . ") == N
    run("apply", "--state", "blocked")
    run("relax")
    report = json.loads(run("status", "--json").stdout)
    assert (report["state"], report["intact"], report["egress_devices"]) == ("relaxed", True, ["eth0"])
    assert len(report["endpoints"]) == N
    run("lock")
    listed = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-s", "list", "set", "inet", "earlyfw", "endpoints_v4"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert listed.count(" . udp . ") + listed.count(" . tcp . ") == N * 3 // 4
    run("verify")
    print({k: round(v, 1) for k, v in took.items()})


def test_private_load_in_a_user_namespace_at_100000_endpoints() -> None:
    """What `verify` does without root: split into batches that fit the
    default send buffer, and the kernel ends up with the same tables as the
    single batch root loads. The control: one batch fails there."""
    config = configuration.parse(config_text(N, egress="eth0"))
    script = policy.render(config, State.RELAXED, egress_devices=["eth0"])
    runner = Runner(verbose=False)
    with pytest.raises(CommandError, match="Message too long"):
        runner.run(["unshare", "--map-root-user", "--net", "nft", "-c", "-f", "-"], input=script)
    split = nft.private_load(runner, script, ["eth0"], list_tables=nft.MAIN_TABLES, user_namespace=True)
    whole = nft.private_load(runner, script, ["eth0"], list_tables=nft.MAIN_TABLES, user_namespace=False)
    assert set(split) == set(whole) == set(nft.MAIN_TABLES)
    assert split == whole
    assert (split[("inet", "earlyfw")] or "").count(" . udp . ") > N // 2
