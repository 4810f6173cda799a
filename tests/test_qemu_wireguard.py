"""The WireGuard boot proof (qemu/wireguard.py, qemu/handshake.py): a real
Debian 12 guest under QEMU TCG brings up wg0 (kernel WireGuard, from
wg-quick@wg0 once the network is online) to a wireguard-go peer running in
QEMU's own private network namespace, and earlyfw-watch.service, hardened as
shipped and running the frozen one-directory earlyfw under the guest's real
systemd, relaxes the boot block on the handshake. wg0 has no keepalive: the
watcher starts that handshake itself, and leaves the peer as configured.

The control is the same guest without the watcher: with wg0 up, nothing starts
a handshake (the block keeps the probes out of wg0); once its report starts one
as the watcher would, the tunnel completes the same handshake, yet no probe
ever gets through it. So the watcher's kick starts the tunnel, and its relax,
and nothing else, opens it.

The first tests are fast checks of the parsers and of the namespace guard
with a peer; the boots are marked qemu.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from qemu import REPO, handshake, isolated, pcap, wireguard
from qemu.guest import VARIANTS, Change

from tests.test_qemu_boot import boot_variant, qemu_tools  # noqa: F401 - qemu_tools is a fixture

PEER_TOOLS = {"wireguard-go": "wireguard-go", "wg": "wireguard-tools"}

JOURNAL = """\
-- Boot 0123 --
[    9.100000] earlyfw-guest systemd[1]: Started earlyfw-watch.service - earlyfw: relax the VPN kill switch.
[   11.250000] earlyfw-guest earlyfw[301]: blocked: watcher started (wireguard on wg0, guarded); relaxing only on proof
[   13.950000] earlyfw-guest earlyfw[301]: blocked, interface down: interface wg0 is down
[   14.100000] earlyfw-guest earlyfw[301]: blocked, handshake unanswered: no peer of wg0 has completed a handshake; \
handshake initiated by earlyfw and unanswered since 00:00:14
[   14.600000] earlyfw-guest earlyfw[301]: relaxed: peer 90+ZCyi4… at 10.0.2.2:51820: handshake 0.012s ago
"""
WG_SHOW = """\
interface: wg0
  public key: FHcrfqPxhV7j5NoPK002lJpzY+Q5YKzXhhJhQuZUlVs=

peer: 90+ZCyi4ocT8+BLnus5W4gzLQnjT5Z/DfA0ziAaua2E=
  endpoint: 10.0.2.2:51820
  allowed ips: 10.99.0.1/32
"""


# -- the parsers ----------------------------------------------------------------


def test_parse_journal_finds_blocked_then_relaxed() -> None:
    lines = handshake.parse_journal(JOURNAL)
    assert [(line.who, line.uptime) for line in lines] == [
        ("systemd", 9.1),
        ("earlyfw", 11.25),
        ("earlyfw", 13.95),
        ("earlyfw", 14.1),
        ("earlyfw", 14.6),
    ]
    tunnel = handshake.Tunnel(
        attempts=handshake.parse_attempts("13.00 13.02 fail\n14.61 14.70 ok\nnonsense\n"),
        journal=lines,
        unit=handshake.parse_unit("ActiveState=active\nNRestarts=0\n"),
        latest_handshake=handshake.parse_handshake("FHcrfqPx=\t1748736014\n"),
        security=handshake.parse_security("→ Overall exposure level for earlyfw-watch.service: 1.4 OK :-)\n"),
        initiations=(14.2,),
        responses=(14.5, 20.3),
        tunnelled=(14.65,),
        events=handshake.parse_events("up 13.9\nlock 17.0\nlocked 17.1\nrehandshake 20.0\n"),
        keepalive=handshake.parse_keepalive(WG_SHOW),
    )
    assert tunnel.started_blocked == 11.25
    assert tunnel.kicked is not None and tunnel.kicked.uptime == 14.1
    assert tunnel.down_before_relax is not None and tunnel.down_before_relax.uptime == 13.95
    assert tunnel.keepalive is None
    assert handshake.parse_keepalive(WG_SHOW + "  persistent keepalive: every 25 seconds\n") == "every 25 seconds"
    assert tunnel.relaxed is not None and tunnel.relaxed.uptime == 14.6
    assert tunnel.watcher_delay(tunnel.relaxed) == 0.012
    assert tunnel.delay(tunnel.relaxed) == 0.1
    assert tunnel.second_response == 20.3
    assert tunnel.lock is None and tunnel.relaxed_again is None
    assert [a.start for a in tunnel.between(13.5, 20.0)] == [14.61]
    assert [a.ok for a in tunnel.attempts] == [False, True]
    assert tunnel.unit == {"ActiveState": "active", "NRestarts": "0"}
    assert tunnel.latest_handshake == 1748736014.0
    assert tunnel.security == (1.4, "OK")


def test_a_handshake_the_peer_began_after_the_lock_counts_as_the_fresh_one() -> None:
    """wireguard-go may begin a handshake itself once the guest's traffic
    stops at the outside lock; the guest's response completes it, and the
    watcher's relax after it is the relax on a newer handshake, not a failure."""
    journal = handshake.parse_journal(
        JOURNAL
        + "[   17.652138] earlyfw-guest earlyfw[301]: blocked: locked by pid 576 (nft); relaxing again needs a newer"
        " handshake\n"
        + "[   18.091891] earlyfw-guest earlyfw[301]: relaxed: peer 90+ZCyi4… at 10.0.2.2:51820: handshake 0.02s ago\n"
    )
    common = {
        "attempts": handshake.parse_attempts("17.70 17.72 fail\n18.50 18.52 ok\n19.60 19.62 ok\n"),
        "journal": journal,
        "unit": {},
        "latest_handshake": None,
        "security": None,
        "initiations": (14.2,),
        "responses": (14.5,),
        "events": handshake.parse_events("lock 17.61\nlocked 17.67\nrehandshake 19.71\n"),
    }
    peer_began = handshake.Tunnel(**common, tunnelled=(14.65, 18.116), answered=(18.073,))  # type: ignore[arg-type]
    assert peer_began.second_response == 18.073
    assert peer_began.completed == (14.5, 18.073)
    assert handshake._second_round(peer_began) == []
    # Without that handshake the same relax came too early, and the packet after it leaked through the lock.
    too_early = handshake.Tunnel(**common, tunnelled=(14.65, 18.116))  # type: ignore[arg-type]
    problems = handshake._second_round(too_early)
    assert any("did not relax again" in p or "before the fresh handshake" in p for p in problems), problems


HOLE_SECTION = """\
nobody refused
tunnelled 3
table inet efwprobe {
\tchain output {
\t\ttype filter hook output priority filter - 5; policy accept;
\t\tip daddr 10.0.2.2 udp dport 51820 meta skuid 0 counter packets 120 bytes 18372 comment "root"
\t\tip daddr 10.0.2.2 udp dport 51820 meta skuid != 0 counter packets 3 bytes 51 comment "other-owner"
\t\tip daddr 10.0.2.2 udp dport 51820 meta mark != 0x00000000 counter packets 0 bytes 0 comment "marked"
\t\tip daddr 10.0.2.2 udp dport 51820 counter packets 127 bytes 18719 comment "all"
\t}
}
table inet earlyfw {
\tcounter refused_endpoint {
\t\tpackets 1 bytes 51
\t}
}
"""


def test_endpoint_hole_section_parses_and_judges() -> None:
    """What the guest measured: kernel WireGuard's own packets have no owner,
    the ones carrying a user's packets that user's socket (root's pinger,
    nobody's datagrams); only nobody's own datagram is refused. The same
    section with it sent, or with the tunnel's packets refused, is a problem."""
    hole = handshake.parse_endpoint_hole(HOLE_SECTION)
    assert hole is not None
    assert hole.counted == {"root": 120, "other-owner": 3, "marked": 0, "all": 127}
    assert (hole.nobody, hole.tunnelled, hole.refused) == ("refused", 3, 1)
    assert hole.problems() == []
    sent = handshake.parse_endpoint_hole(HOLE_SECTION.replace("nobody refused", "nobody sent"))
    assert sent is not None and any("not refused" in p for p in sent.problems())
    refused = handshake.parse_endpoint_hole(HOLE_SECTION.replace("packets 1 bytes 51", "packets 3 bytes 153"))
    assert refused is not None and any("never the tunnel's packets" in p for p in refused.problems())
    assert handshake.parse_endpoint_hole("") is None


def test_no_handshake_and_no_score_parse_as_none() -> None:
    assert handshake.parse_handshake("FHcrfqPx=\t0\n") is None
    assert handshake.parse_security("Unit earlyfw-watch.service not found.\n") is None


def test_the_peer_matches_the_guest() -> None:
    """The keys are a pair each way, and the guest dials the configured endpoint."""
    for private, public in (
        (wireguard.GUEST_PRIVATE, wireguard.GUEST_PUBLIC),
        (wireguard.PEER_PRIVATE, wireguard.PEER_PUBLIC),
    ):
        derived = subprocess.run(["wg", "pubkey"], input=private + "\n", capture_output=True, text=True, check=True)
        assert derived.stdout.strip() == public
    conf = wireguard.wg_quick_conf().decode()
    assert "keepalive" not in conf.lower(), "the proof's tunnel must need the watcher to start its handshake"
    assert f"PublicKey = {wireguard.PEER_PUBLIC}" in conf
    assert f"Endpoint = {wireguard.ENDPOINT}" in conf
    assert f"AllowedIPs = {wireguard.PEER_TUNNEL}/32" in conf
    assert f"PrivateKey = {wireguard.GUEST_PRIVATE}" in conf
    assert f"PublicKey = {wireguard.GUEST_PUBLIC}" in wireguard.peer_config()


def test_isolated_parses_peer_options() -> None:
    assert isolated.parse(["--", "true"]) == (None, ["true"])
    options = ["--wireguard-peer", "p.conf", "--wireguard-address", "10.99.0.1/24"]
    assert isolated.parse([*options, "--", "x"]) == (isolated.Peer(Path("p.conf"), "10.99.0.1/24"), ["x"])
    assert isolated.parse([*options[:2], "--", "x"]) is None  # an address is needed too
    assert isolated.parse(["--bogus", "1", "--", "x"]) is None
    assert isolated.parse(options) is None  # no command


# -- the peer beside QEMU ---------------------------------------------------------


def isolated_with_peer(tmp_path: Path, *prefix: str, command: str) -> subprocess.CompletedProcess[str]:
    argv = [*prefix, sys.executable, "-m", "qemu.isolated", *wireguard.peer_args(tmp_path), "--", "sh", "-c", command]
    return subprocess.run(argv, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                          capture_output=True, text=True, check=False, timeout=60)  # fmt: skip


@pytest.fixture
def peer_tools() -> None:
    missing = [package for tool, package in PEER_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the WireGuard boot needs: apt-get install {' '.join(missing)}", pytrace=False)


@pytest.mark.usefixtures("peer_tools")
def test_no_peer_starts_outside_a_private_namespace(tmp_path: Path) -> None:
    """The loopback-only check runs before the peer: in the host's namespace
    nothing starts, so no wireguard-go socket appears."""
    assert socket.if_nameindex() != [(1, "lo")], "this test needs a host namespace with a real interface"
    before = set(isolated.UAPI_DIR.glob("efwpeer*.sock")) if isolated.UAPI_DIR.exists() else set()
    done = isolated_with_peer(tmp_path, command="touch started")
    assert done.returncode == 99, done.stderr
    assert not (REPO / "started").exists()
    after = set(isolated.UAPI_DIR.glob("efwpeer*.sock")) if isolated.UAPI_DIR.exists() else set()
    assert after == before


@pytest.mark.netns
@pytest.mark.usefixtures("peer_tools")
def test_peer_comes_up_in_the_namespace_and_goes_away(tmp_path: Path) -> None:
    """In the private namespace: the peer's interface holds the tunnel address
    with the guest as its one peer; when the command ends, its socket is gone.
    (Peers of other runs going on meanwhile share the socket directory: only
    the sockets that were not there before are this run's.)"""
    before = {str(p) for p in isolated.UAPI_DIR.glob("efwpeer*.sock")} if isolated.UAPI_DIR.exists() else set()
    done = isolated_with_peer(
        tmp_path,
        "unshare", "--map-root-user", "--net", "--",
        command="ip -brief address; wg show all peers; for s in /var/run/wireguard/efwpeer*.sock; do echo s=$s; done",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"{wireguard.PEER_TUNNEL}/{wireguard.TUNNEL_PREFIX}" in done.stdout
    assert wireguard.GUEST_PUBLIC in done.stdout
    sockets = [line.split("=", 1)[1] for line in done.stdout.splitlines() if line.startswith("s=")]
    ours = [s for s in sockets if s not in before]
    assert ours and all(not Path(s).exists() for s in ours), done.stdout


# -- the boots ------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.usefixtures("qemu_tools", "peer_tools")
def test_watcher_relaxes_only_after_the_handshake() -> None:
    """Power-on to the end: only DHCP, ARP, IPv6 link plumbing and UDP to the
    endpoint (handshakes, keepalives and the tunnelled probe among them). wg0
    has no keepalive: the watcher's journal says blocked, then that it started
    the handshake, then relaxed after the handshake response reached the
    guest, and wg0's peer ends with no keepalive; no probe got through before
    the relax and every probe a second after it did; the hardened unit is
    active, never restarted, and the table ends relaxed. While locked, a
    datagram nobody sends to the endpoint is refused and never leaves, while
    kernel WireGuard's own packets (no owner) still get out and the fresh
    handshake, again the watcher's kick, relaxes again; relaxed, the tunnel's
    packets carrying nobody's datagrams are not refused (handshake.EndpointHole)."""
    variant = VARIANTS["wireguard"]
    assert variant.change is Change.WIREGUARD and variant.watch and "watch" in variant.targets
    verdict = boot_variant(variant.name)
    assert verdict.passed, verdict.explain()
    t = handshake.observe(verdict.outcome)
    assert verdict.outcome.capture.count(pcap.Kind.ENDPOINT) > 0
    assert t.initiations and t.tunnelled, "no handshake or no tunnelled traffic in the capture"
    assert t.relaxed is not None and t.successes
    assert t.kicked is not None and t.kicked.uptime <= t.relaxed.uptime, t.watcher_lines
    assert t.started_blocked is not None and t.started_blocked <= t.initiations[0]
    assert t.keepalive is None
    assert t.successes[0].end >= t.relaxed.uptime - handshake.RELAX_SLACK
    assert verdict.outcome.report.earlyfw_state == "relaxed"


@pytest.mark.qemu
@pytest.mark.usefixtures("qemu_tools", "peer_tools")
def test_without_the_watcher_the_tunnel_stays_blocked() -> None:
    """The control: the same guest, no watcher. With wg0 up and its probes
    refused, nothing starts a handshake; once the report starts one as the
    watcher would, the same handshake completes, yet nothing relaxes, and the
    probe that gets through in the watcher's boot never does."""
    variant = VARIANTS["wireguard-no-watch"]
    assert variant.change is Change.WIREGUARD and not variant.watch
    verdict = boot_variant(variant.name)
    assert verdict.passed, verdict.explain()
    t = handshake.observe(verdict.outcome)
    up, kick = t.events.get("up"), t.events.get("kick")
    assert up is not None and kick is not None, t.events
    assert len(t.between(up, kick)) >= handshake.MIN_ATTEMPTS_AFTER_HANDSHAKE
    assert t.initiations and min(t.initiations) >= kick, "a handshake began in the control before the kick"
    assert t.responses, "the control's tunnel never completed a handshake, so it shows nothing"
    assert t.attempts and not t.successes
    assert not t.tunnelled, "a packet went through the tunnel in the control"
    assert verdict.outcome.report.earlyfw_state == "blocked"
