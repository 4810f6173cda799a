"""The live-kernel commands (apply, relax, lock, status, verify, render) run for
real inside a throwaway network namespace."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parent.parent / "payload" / "examples" / "earlyfw.toml"

pytestmark = pytest.mark.netns


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"efw-cli-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run_in(netns: str, *argv: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], input=input, capture_output=True, text=True, check=False
    )


def earlyfw(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_in(netns, sys.executable, "-m", "earlyfw", "--config", str(EXAMPLE), *args)


def status(netns: str) -> tuple[int, dict[str, object]]:
    result = earlyfw(netns, "status", "--json")
    return result.returncode, json.loads(result.stdout)


def test_render_output_loads_with_nft_in_a_fresh_netns(netns: str) -> None:
    rendered = earlyfw(netns, "render")
    assert rendered.returncode == 0, rendered.stderr
    loaded = run_in(netns, "nft", "-f", "-", input=rendered.stdout)
    assert loaded.returncode == 0, loaded.stderr
    assert "table inet earlyfw" in run_in(netns, "nft", "list", "tables").stdout


def test_status_before_apply_reports_absent_and_fails(netns: str) -> None:
    code, report = status(netns)
    assert code == 3
    assert report["present"] is False
    assert "nothing is blocked" in str(report["warnings"])


def test_apply_relax_lock_and_status(netns: str) -> None:
    assert earlyfw(netns, "apply", "--state", "blocked").returncode == 0
    code, report = status(netns)
    assert (code, report["state"], report["intact"]) == (0, "blocked", True)
    assert report["endpoints"] == ["198.51.100.7:51820/udp", "[2001:db8::7]:51820/udp"]

    relaxed = earlyfw(netns, "relax")
    assert relaxed.returncode == 0, relaxed.stderr
    assert "+ nft -f -" in relaxed.stderr, "every command earlyfw runs is echoed"
    assert status(netns)[1]["state"] == "relaxed"

    assert earlyfw(netns, "lock").returncode == 0
    assert status(netns)[1]["state"] == "blocked"


def test_apply_twice_gives_the_same_ruleset(netns: str) -> None:
    earlyfw(netns, "apply", "--state", "blocked")
    first = run_in(netns, "nft", "-s", "list", "ruleset").stdout
    earlyfw(netns, "apply", "--state", "blocked")
    assert run_in(netns, "nft", "-s", "list", "ruleset").stdout == first


def test_counters_survive_a_state_change(netns: str) -> None:
    for argv in (
        "ip link add v0 type veth peer name v1",
        "ip addr add 192.0.2.1/24 dev v0",
        "ip link set v0 up",
        "ip link set v1 up",
    ):
        assert run_in(netns, *argv.split()).returncode == 0, argv
    earlyfw(netns, "apply", "--state", "blocked")
    send = (
        "import socket\n"
        "for _ in range(3):\n"
        "    try: socket.socket(2, 2).sendto(b'x', ('192.0.2.77', 9))\n"
        "    except OSError: pass"
    )
    assert run_in(netns, sys.executable, "-c", send).returncode == 0
    counters = status(netns)[1]["counters"]
    assert isinstance(counters, dict)
    assert counters["refused_out"]["packets"] == 3
    earlyfw(netns, "relax")
    after = status(netns)[1]["counters"]
    assert isinstance(after, dict)
    assert after["refused_out"]["packets"] == 3


def test_altered_table_is_reported(netns: str) -> None:
    earlyfw(netns, "apply", "--state", "blocked")
    handle = next(
        line.split("# handle ")[1]
        for line in run_in(netns, "nft", "-a", "list", "chain", "inet", "earlyfw", "output").stdout.splitlines()
        if "refused_out" in line and "# handle" in line
    )
    assert run_in(netns, "nft", "delete", "rule", "inet", "earlyfw", "output", "handle", handle).returncode == 0
    code, report = status(netns)
    assert code == 3
    assert (report["present"], report["intact"], report["state"]) == (True, False, None)
    human = earlyfw(netns, "status")
    assert "ALTERED" in human.stdout


def test_other_tables_are_left_alone_and_reported(netns: str) -> None:
    run_in(netns, "nft", "add", "table", "inet", "other")
    run_in(netns, "nft", "add", "chain", "inet", "other", "c", "{ type filter hook output priority 0; }")
    earlyfw(netns, "apply", "--state", "blocked")
    earlyfw(netns, "apply", "--state", "relaxed")
    assert "chain c" in run_in(netns, "nft", "list", "table", "inet", "other").stdout
    assert status(netns)[1]["other_tables"] == ["inet other"]


def test_verify_checks_every_state_with_nft(netns: str) -> None:
    result = earlyfw(netns, "verify")
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("ruleset")] == [
        "ruleset blocked: nft ok",
        "ruleset relaxed: nft ok",
        "ruleset initramfs: nft ok",
    ]


# --- the netdev egress table (raw sockets) ------------------------------------

# Words nft's grammar reserves, all valid Linux interface names: unquoted in a
# `devices = { … }` list each is a syntax error (or worse, a different token).
NFT_KEYWORDS = (
    "accept", "drop", "reject", "ip", "ip6", "inet", "ether", "vlan", "arp", "meta", "counter", "table",
    "chain", "set", "map", "devices", "egress", "ingress", "policy", "priority", "type", "hook", "filter",
    "netdev", "tcp", "udp", "limit", "log", "comment", "flags", "size", "elements", "continue", "return",
    "jump", "goto", "ct", "th", "to", "dev", "0", "1x", "a.b", "x-y",
)  # fmt: skip


def with_egress(netns: str, tmp_path: Path, *interfaces: str) -> Path:
    """The example config plus [egress] interfaces, each a veth that exists in `netns`."""
    for i, name in enumerate(interfaces):
        assert (
            run_in(netns, "ip", "link", "add", "name", name, "type", "veth", "peer", "name", f"peer{i}").returncode == 0
        )
        assert run_in(netns, "ip", "link", "set", "dev", name, "up").returncode == 0
    path = tmp_path / "earlyfw.toml"
    path.write_text(EXAMPLE.read_text() + f"\n[egress]\ninterfaces = {json.dumps(list(interfaces))}\n")
    return path


def earlyfw_with(netns: str, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_in(netns, sys.executable, "-m", "earlyfw", "--config", str(config), *args)


def status_with(netns: str, config: Path) -> tuple[int, dict[str, object]]:
    result = earlyfw_with(netns, config, "status", "--json")
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.mark.parametrize(
    "damage",
    [
        "delete table netdev earlyfw_egress",
        "flush table netdev earlyfw_egress",
        "flush chain netdev earlyfw_egress egress",
        "delete chain netdev earlyfw_egress egress",
        "flush set netdev earlyfw_egress endpoints_v4",
        "delete counter netdev earlyfw_egress refused_raw",
    ],
)
def test_status_fails_when_the_egress_table_is_damaged(netns: str, tmp_path: Path, damage: str) -> None:
    config = with_egress(netns, tmp_path, "eth0")
    assert earlyfw_with(netns, config, "apply", "--state", "blocked").returncode == 0
    code, report = status_with(netns, config)
    assert (code, report["state"], report["intact"]) == (0, "blocked", True)
    # The counter can only go once no rule names it.
    if "counter" in damage:
        assert run_in(netns, "nft", "flush", "chain", "netdev", "earlyfw_egress", "egress").returncode == 0
    result = run_in(netns, "nft", *damage.split())
    assert result.returncode == 0, result.stderr
    code, report = status_with(netns, config)
    assert (code, report["intact"], report["state"]) == (3, False, None), report
    assert earlyfw_with(netns, config, "status").returncode == 3
    # `earlyfw lock` repairs it.
    assert earlyfw_with(netns, config, "lock").returncode == 0
    code, report = status_with(netns, config)
    assert (code, report["egress_devices"]) == (0, ["eth0"])


def test_status_reports_a_missing_egress_table_by_name(netns: str, tmp_path: Path) -> None:
    config = with_egress(netns, tmp_path, "eth0")
    earlyfw_with(netns, config, "apply", "--state", "relaxed")
    run_in(netns, "nft", "delete", "table", "netdev", "earlyfw_egress")
    human = earlyfw_with(netns, config, "status")
    assert human.returncode == 3
    assert "earlyfw_egress is missing: raw-socket egress on eth0 is not filtered" in human.stdout


def test_egress_interfaces_named_like_nft_keywords(netns: str, tmp_path: Path) -> None:
    """Every command works when the [egress] interfaces are called `accept`,
    `ip`, `vlan`… : the names are quoted wherever they reach nft."""
    config = with_egress(netns, tmp_path, *NFT_KEYWORDS)
    for args in (("apply", "--state", "blocked"), ("relax",), ("lock",)):
        result = earlyfw_with(netns, config, *args)
        assert result.returncode == 0, f"{args}: {result.stderr}"
        code, report = status_with(netns, config)
        assert (code, report["intact"]) == (0, True), report
        assert sorted(map(str, report["egress_devices"])) == sorted(NFT_KEYWORDS)  # type: ignore[call-overload]
    chain = run_in(netns, "nft", "list", "chain", "netdev", "earlyfw_egress", "egress").stdout
    assert all(name in chain for name in NFT_KEYWORDS)
    verified = earlyfw_with(netns, config, "verify")
    assert verified.returncode == 0, verified.stderr


def test_egress_counters_are_shown_and_survive_a_state_change(netns: str, tmp_path: Path) -> None:
    config = with_egress(netns, tmp_path, "eth0")
    earlyfw_with(netns, config, "apply", "--state", "blocked")
    send = (
        "import socket\n"
        "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
        "s.bind(('eth0', 0))\n"
        "for _ in range(4):\n"
        "    try: s.send(b'\\xff' * 6 + b'\\x02' * 6 + b'\\x08\\x00' + b'\\x45' + b'\\0' * 40)\n"
        "    except OSError: pass\n"
    )
    assert run_in(netns, sys.executable, "-c", send).returncode == 0
    counters = status_with(netns, config)[1]["counters"]
    assert isinstance(counters, dict)
    assert counters["refused_raw"]["packets"] == 4
    earlyfw_with(netns, config, "relax")
    after = status_with(netns, config)[1]["counters"]
    assert isinstance(after, dict)
    assert after["refused_raw"]["packets"] == 4
