"""earlyfw's own commands and plain nft while `earlyfw watch` runs with
[egress] interfaces: its owned guard tables (inet and netdev) and wake table
are loaded, real WireGuard (wireguard-go) in a throwaway namespace pair.

nft 1.0.6 (Debian 12) prints an owned table's flags in JSON from freed memory
and, with several owned tables loaded, aborts (`corrupted double-linked
list`): `earlyfw status` and uninstall's table deletion used `nft -j list
tables` and died with it. They now read the plain listing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import netns
from tests.conftest import require
from tests.watch_lab import (
    PROBE_PORT,
    PYTHON_MODULE,
    TOOLS,
    config_for,
    send_udp,
    start_watcher,
    wg_pair,
    write_config,
)

pytestmark = pytest.mark.netns


@pytest.fixture
def lab() -> Iterator[netns.Lab]:
    require(*TOOLS)
    with netns.Lab() as lab:
        yield lab


def earlyfw(ns: netns.Namespace, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return ns.exec_result([*PYTHON_MODULE, "--config", str(config), *args])


def nft_version() -> str:
    return subprocess.run(["nft", "--version"], capture_output=True, text=True, check=True).stdout


def test_status_table_deletion_and_listings_while_the_watcher_guards_egress(lab: netns.Lab, tmp_path: Path) -> None:
    pair = wg_pair(lab, accept=False)  # no handshake: the watcher holds blocked
    client, client_if = pair.client, pair.topology.client_if
    config = dataclasses.replace(config_for(pair.client_wg.name), egress_interfaces=(client_if,))
    path = write_config(tmp_path, config)
    watcher = start_watcher(lab, client, PYTHON_MODULE, path, log_dir=tmp_path)
    tables = client.exec(["nft", "list", "tables"])
    for table in ("inet earlyfw_guard", "netdev earlyfw_egress_guard", "netdev earlyfw_egress", "inet earlyfw_wake"):
        assert f"table {table}\n" in tables, tables

    # Control: this nft does mangle JSON listings of owned tables, so the
    # commands below would meet the bug if they still asked for one.
    if "v1.0.6 " in nft_version():
        control = client.exec_result(["nft", "-j", "list", "tables"])
        assert control.returncode != 0 or '"flags": "owner"' not in control.stdout, control.stdout

    # Refusals while the guard is loaded: inet (a UDP probe) and raw (AF_PACKET).
    send_udp(client, netns.WORLD_V4, PROBE_PORT, b"probe", count=5)
    with client.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
        raw.bind((client_if, 0))
        for _ in range(3):
            with contextlib.suppress(OSError):  # the egress drop surfaces as ENOBUFS
                raw.send(b"\xff" * 6 + client.mac(client_if) + b"\x08\x00" + b"\x45" + b"\0" * 40)

    result = earlyfw(client, path, "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["state"], report["intact"], report["guarded"]) == ("blocked", True, True)
    assert report["egress_devices"] == [client_if]
    assert report["counters"]["refused_out"]["packets"] == 5, "the guard's refusals count too"
    assert report["counters"]["refused_raw"]["packets"] == 3
    human = earlyfw(client, path, "status")
    assert human.returncode == 0, human.stderr
    assert "guard: earlyfw watch" in human.stdout

    for argv in (["nft", "list", "ruleset"], ["nft", "-s", "list", "ruleset"], ["nft", "list", "tables"]):
        listed = client.exec_result(argv)
        assert listed.returncode == 0, f"{argv}: {listed.stderr}"

    # What uninstall runs to remove earlyfw's tables; the watcher puts them back.
    mark = len(watcher.lines())
    code = "from earlyfw import run\nfrom earlyfw.linux import nft\nnft.delete_tables(run.Runner())"
    deleted = client.exec_result([*PYTHON_MODULE[:1], "-c", code])
    assert deleted.returncode == 0, deleted.stderr
    assert "+ nft -f -" in deleted.stderr, deleted.stderr
    watcher.wait_for(r"^repaired: table inet earlyfw was removed", 5, after=mark)
    netns.wait_until(lambda: earlyfw(client, path, "status").returncode == 0, 10, "status intact after the repair")
    after = json.loads(earlyfw(client, path, "status", "--json").stdout)
    assert after["counters"]["refused_out"]["packets"] >= 5, "totals survive the repair"


def refused_out(ns: netns.Namespace, config: Path) -> int:
    result = earlyfw(ns, config, "status", "--json")
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)["counters"]["refused_out"]["packets"])


def test_refusals_are_counted_once_across_the_watchers_changes(lab: netns.Lab, tmp_path: Path) -> None:
    """While the watcher runs, its guard refuses as much as earlyfw's table;
    status adds the two, and a relax neither loses nor doubles a count."""
    pair = wg_pair(lab, accept=False)
    path = write_config(tmp_path, config_for(pair.client_wg.name))
    watcher = start_watcher(lab, pair.client, PYTHON_MODULE, path, log_dir=tmp_path)
    send_udp(pair.client, netns.WORLD_V4, PROBE_PORT, b"probe", count=5)
    assert refused_out(pair.client, path) == 5
    pair.accept_client()
    pair.rehandshake()
    watcher.wait_for(r"^relaxed: ")
    assert refused_out(pair.client, path) == 5
    send_udp(pair.client, netns.WORLD_V4, PROBE_PORT, b"probe", count=2)  # outside the tunnel: still refused
    assert refused_out(pair.client, path) == 7
