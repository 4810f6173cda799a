"""`earlyfw watch` for OpenVPN: a real OpenVPN client and server (static-key
point-to-point over UDP, in two namespaces) driving the watcher through the
client's management socket; a fake management server for the sequences a
real server will not easily produce on demand (a CONNECTED to an address
that is not an endpoint); and the --up/--down hook.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from earlyfw import templates
from earlyfw.config import TunnelKind
from tests import netns
from tests.conftest import require
from tests.watch_lab import (
    PROBE_PORT,
    PYTHON_MODULE,
    TUNNEL_CLIENT,
    TUNNEL_SERVER,
    Watcher,
    config_for,
    live_state,
    received,
    send_udp,
    start_watcher,
    write_config,
)

pytestmark = pytest.mark.netns

OPENVPN_PORT = 1194
WORLD = netns.WORLD_V4


@pytest.fixture
def lab() -> Iterator[netns.Lab]:
    require("openvpn", "setpriv")
    with netns.Lab() as lab:
        yield lab


def openvpn(
    lab: netns.Lab, ns: netns.Namespace, key: Path, direction: str, *args: str, log: Path
) -> subprocess.Popen[bytes]:
    common = ["--dev-type", "tun", "--proto", "udp", "--secret", str(key), direction]
    common += ["--cipher", "AES-256-CBC", "--ping", "1", "--verb", "3"]
    with log.open("ab") as out:
        process = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, "openvpn", *common, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    lab.callback(_stop, process)
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@dataclass
class RealOpenVPN:
    """A static-key OpenVPN server in the world and `earlyfw watch` on the
    client, following the client's management socket."""

    topology: netns.ClientWorld
    watcher: Watcher
    server: subprocess.Popen[bytes]
    key: Path
    client_if: str
    management: Path

    def client(self, lab: netns.Lab, log: Path, *extra: str) -> subprocess.Popen[bytes]:
        return openvpn(
            lab,
            self.topology.client,
            self.key,
            "1",
            *("--dev", self.client_if, "--remote", str(WORLD), str(OPENVPN_PORT)),
            *("--ifconfig", str(TUNNEL_CLIENT), str(TUNNEL_SERVER)),
            *("--management", str(self.management), "unix", *extra),
            log=log,
        )


def real_openvpn(lab: netns.Lab, tmp_path: Path, tag: str) -> RealOpenVPN:
    topology = netns.client_world(lab, [], tag=tag)
    key = tmp_path / "static.key"
    subprocess.run(["openvpn", "--genkey", "secret", str(key)], check=True, capture_output=True)
    server_if, client_if = netns.unique("efvs"), netns.unique("efvc")
    management = tmp_path / "mgmt.sock"
    config = config_for(client_if, ((str(WORLD), OPENVPN_PORT),), kind=TunnelKind.OPENVPN, management=management)
    watcher = start_watcher(lab, topology.client, PYTHON_MODULE, write_config(tmp_path, config), log_dir=tmp_path)
    server = openvpn(
        lab,
        topology.world,
        key,
        "0",
        *("--dev", server_if, "--lport", str(OPENVPN_PORT)),
        *("--ifconfig", str(TUNNEL_SERVER), str(TUNNEL_CLIENT)),
        log=tmp_path / "server.log",
    )
    return RealOpenVPN(topology, watcher, server, key, client_if, management)


def test_real_openvpn_connected_relaxes_reconnecting_and_exiting_lock(lab: netns.Lab, tmp_path: Path) -> None:
    real = real_openvpn(lab, tmp_path, "eo")
    topology, watcher = real.topology, real.watcher
    # Keep the device across the soft restart below, so the lock comes
    # from OpenVPN's RECONNECTING and not from the device going away.
    client = real.client(lab, tmp_path / "client.log", "--persist-tun")
    # Blocked, OpenVPN's packets to the endpoint still get out: it connects.
    line = watcher.wait_for(r"^relaxed: OpenVPN CONNECTED to 192\.0\.2\.1:1194", 30)
    assert line
    assert live_state(topology.client) == "relaxed"
    tunnel = lab.own(topology.world.socket(socket.AF_INET, socket.SOCK_DGRAM))
    tunnel.bind((str(TUNNEL_SERVER), PROBE_PORT))
    tunnel.settimeout(0.05)
    send_udp(topology.client, TUNNEL_SERVER, PROBE_PORT, b"through")
    assert received(tunnel, 0.5) == [b"through"]

    before = len(watcher.lines())
    client.send_signal(signal.SIGUSR1)  # a soft restart: RECONNECTING, then CONNECTED again
    watcher.wait_for(r"^blocked: OpenVPN is RECONNECTING", 10, after=before)
    watcher.wait_for(r"^relaxed: OpenVPN CONNECTED", 30, after=before)

    before = len(watcher.lines())
    client.send_signal(signal.SIGTERM)
    watcher.wait_for(r"^blocked: (OpenVPN is EXITING|.*closed|interface \S+ does not exist)", 10, after=before)
    assert live_state(topology.client) == "blocked"


class FakeManagement:
    """Speaks OpenVPN's management protocol on a unix socket: the banner, the
    reply to `state on all` (history then END), then whatever lines the test
    pushes, in OpenVPN 2.6's exact format."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.conn: socket.socket | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        conn, _ = self.server.accept()
        conn.sendall(b">INFO:OpenVPN Management Interface Version 5 -- type 'help' for more info\r\n")
        request = b""
        while not request.endswith(b"\n"):
            request += conn.recv(100)
        assert request == b"state on all\n"
        conn.sendall(
            b"SUCCESS: real-time state notification set to ON\r\n"
            + f"{int(time.time()) - 5},CONNECTING,,,,,,\r\n".encode()
            + b"END\r\n"
        )
        self.conn = conn
        self.ready.set()

    def push(self, state: str, remote: str = "", port: str = "") -> None:
        assert self.ready.wait(10), "the watcher never connected"
        assert self.conn is not None
        line = f">STATE:{int(time.time())},{state},,{TUNNEL_CLIENT if remote else ''},{remote},{port},,\r\n"
        self.conn.sendall(line.encode())

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


def test_management_states_from_a_fake_server(lab: netns.Lab, tmp_path: Path) -> None:
    topology = netns.client_world(lab, [], tag="ef")
    topology.client.ip_batch(["tuntap add dev efvtun0 mode tun", "link set efvtun0 up"])
    fake = FakeManagement(tmp_path / "mgmt.sock")
    lab.callback(fake.close)
    config = config_for(
        "efvtun0", ((str(WORLD), OPENVPN_PORT),), kind=TunnelKind.OPENVPN, management=tmp_path / "mgmt.sock"
    )
    watcher = start_watcher(lab, topology.client, PYTHON_MODULE, write_config(tmp_path, config), log_dir=tmp_path)

    fake.push("CONNECTED", "203.0.113.66", "1194")
    time.sleep(0.5)
    assert live_state(topology.client) == "blocked", "CONNECTED, but not to an endpoint"
    fake.push("CONNECTED", str(WORLD), str(OPENVPN_PORT))
    watcher.wait_for(r"^relaxed: OpenVPN CONNECTED to 192\.0\.2\.1:1194")
    fake.push("RECONNECTING")
    watcher.wait_for(r"^blocked: OpenVPN is RECONNECTING")
    before = len(watcher.lines())
    fake.push("CONNECTED", str(WORLD), str(OPENVPN_PORT))
    watcher.wait_for(r"^relaxed: OpenVPN CONNECTED", after=before)
    fake.close()
    watcher.wait_for(r"^blocked: management interface .* closed \(OpenVPN stopped\)")
    assert live_state(topology.client) == "blocked"


def test_hook_script_runs_relax_on_up_and_lock_on_down(tmp_path: Path) -> None:
    """The hook shipped in payload/openvpn, with a stand-in `earlyfw` on PATH
    that records its arguments."""
    hook = tmp_path / "hook"
    hook.write_text(templates.read("payload", "openvpn/earlyfw-openvpn-hook"))
    hook.chmod(0o755)
    record = tmp_path / "calls"
    stub = tmp_path / "bin" / "earlyfw"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    stub.chmod(0o755)
    env = {"PATH": f"{stub.parent}:/usr/bin:/bin"}
    for script_type in ("up", "down"):
        assert subprocess.run([str(hook)], env={**env, "script_type": script_type}, check=False).returncode == 0
    bad = subprocess.run([str(hook)], env=env, capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert "up/down script" in bad.stderr
    assert record.read_text().splitlines() == ["--quiet relax", "--quiet lock"]


def test_hook_mode_follows_relax_and_lock_and_locks_when_the_tunnel_goes(lab: netns.Lab, tmp_path: Path) -> None:
    """Without a management socket the watcher follows what the hook runs
    (`earlyfw relax` / `earlyfw lock`), and locks by itself when the tunnel
    device disappears (OpenVPN's down script may run without root)."""
    topology = netns.client_world(lab, [], tag="eh")
    topology.client.ip_batch(["tuntap add dev efvtun1 mode tun", "link set efvtun1 up"])
    config_path = write_config(tmp_path, config_for("efvtun1", ((str(WORLD), OPENVPN_PORT),), kind=TunnelKind.OPENVPN))
    watcher = start_watcher(lab, topology.client, PYTHON_MODULE, config_path, log_dir=tmp_path)
    relax = topology.client.exec_result([*PYTHON_MODULE, "--config", str(config_path), "relax"])
    assert relax.returncode == 0, relax.stderr
    watcher.wait_for(r"^relaxed: asked by pid \d+ .*as the OpenVPN hook asked")
    topology.client.ip("tuntap", "del", "dev", "efvtun1", "mode", "tun")
    watcher.wait_for(r"^blocked: interface efvtun1 does not exist", 3)
    assert live_state(topology.client) == "blocked"
    assert os.path.exists(config_path)


def test_real_openvpn_idle_stays_relaxed_and_dead_locks(lab: netns.Lab, tmp_path: Path) -> None:
    """Issue 11's idle-is-not-dead, for OpenVPN: its control channel goes to
    the endpoint, which the block allows, and its own --ping/--ping-restart
    decide when the tunnel is dead. Idle past the ping-restart time with no
    traffic of the user's: still relaxed, and the next packet is answered.
    The server gone: OpenVPN's ping-restart gives up, RECONNECTING, locked."""
    real = real_openvpn(lab, tmp_path, "ei")
    topology, watcher, server = real.topology, real.watcher, real.server
    real.client(lab, tmp_path / "client.log", "--ping-restart", str(PING_RESTART), "--persist-tun")
    watcher.wait_for(r"^relaxed: OpenVPN CONNECTED to 192\.0\.2\.1:1194", 30)
    relaxed = len(watcher.lines())

    time.sleep(PING_RESTART + 2)  # idle: only OpenVPN's own pings cross
    assert not [line for line in watcher.lines()[relaxed:] if line.startswith("blocked")], watcher.log
    assert live_state(topology.client) == "relaxed"
    assert echo(topology, b"after idling") == b"after idling"

    server.kill()
    watcher.wait_for(r"^blocked: OpenVPN is RECONNECTING", PING_RESTART + 10, after=relaxed)
    assert live_state(topology.client) == "blocked"


PING_RESTART = 4


def echo(topology: netns.ClientWorld, payload: bytes, wait: float = 5.0) -> bytes:
    """A datagram from the client into the tunnel, answered through it."""
    with (
        topology.world.socket(socket.AF_INET, socket.SOCK_DGRAM) as server,
        topology.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        server.bind((str(TUNNEL_SERVER), PROBE_PORT))
        server.settimeout(wait)
        client.settimeout(wait)
        client.sendto(payload, (str(TUNNEL_SERVER), PROBE_PORT))
        data, source = server.recvfrom(2048)
        server.sendto(data, source)
        return client.recv(2048)
