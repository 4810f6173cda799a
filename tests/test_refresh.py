"""`earlyfw endpoints refresh` and the companion client file, without a
network: a scripted lookup stands in for DNS (tests/test_hostnames_netns.py
runs the same code against real resolvers and a real tunnel)."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from earlyfw import config, importers, resolve
from earlyfw.config import Config, Endpoint, IPAddress, Transport
from earlyfw.errors import CommandError, ConfigError, EarlyfwError
from earlyfw.handshake import Verdict
from earlyfw.linux import boot
from earlyfw.linux.core import CONFIG_PATH, Core, ruleset_path
from earlyfw.linux.endpoints import apply, refreshed, running_watcher, tunnel_flows
from earlyfw.linux.refresh_timer import REFRESH_SERVICE, REFRESH_TIMER, Refresh
from earlyfw.linux.watcher.daemon import Watcher
from earlyfw.manifest import Entry, Manifest
from earlyfw.policy import State
from earlyfw.root import MANIFEST, Root, sha256
from earlyfw.run import Result
from earlyfw.targets import File, Symlink
from tests import netns
from tests.recording_runner import RecordingRunner
from tests.test_watch_units import FakeClock, RecordingRuleset, ScriptedTunnel

A = ipaddress.ip_address
H1, H2 = "a.example-vpn.net", "b.example-vpn.net"


def pinned(*items: tuple[str, int, str | None]) -> Config:
    return Config(
        tunnel_kind=config.TunnelKind.OPENVPN,
        interface="tun0",
        endpoints=tuple(Endpoint(A(a), p, Transport.UDP, h) for a, p, h in items),
        dns_servers=(A("10.8.0.1"),),
    )


def lookup(answers: dict[str, list[str] | Exception]) -> importers.Resolve:
    def resolve(host: str, family: int | None) -> Sequence[IPAddress]:
        answer = answers[host]
        if isinstance(answer, Exception):
            raise answer
        return [A(a) for a in answer]

    return resolve


def keys(c: Config) -> list[tuple[str, int, str | None]]:
    return [(str(e.address), e.port, e.host) for e in c.endpoints]


def test_refresh_replaces_each_hosts_pins_in_place_and_logs_the_changes() -> None:
    old = pinned(("198.51.100.1", 1194, H1), ("198.51.100.9", 443, None), ("198.51.100.2", 1194, H2))
    lines: list[str] = []
    new = refreshed(old, lookup({H1: ["198.51.100.1", "2001:db8::1"], H2: ["198.51.100.3"]}), lines.append)
    assert keys(new) == [
        ("198.51.100.1", 1194, H1),
        ("2001:db8::1", 1194, H1),
        ("198.51.100.9", 443, None),
        ("198.51.100.3", 1194, H2),
    ]
    assert lines == [
        f"added [2001:db8::1]:1194/udp ({H1})",
        f"added 198.51.100.3:1194/udp ({H2})",
        f"removed 198.51.100.2:1194/udp ({H2})",
    ]


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (EarlyfwError("cannot resolve: timed out"), "timed out"),
        (ConfigError("no such host (NXDOMAIN)"), "NXDOMAIN"),
        ([], "no A or AAAA record"),
        (["198.51.100.7", "127.0.0.1"], "loopback"),
        (["::ffff:198.51.100.7"], "IPv4-mapped"),
        (["0.0.0.0"], "unspecified"),  # noqa: S104
        (["224.0.0.1"], "multicast"),
        (["255.255.255.255"], "broadcast"),
    ],
)
def test_a_host_that_cannot_be_resolved_or_answers_badly_keeps_its_pins(answer: object, why: str) -> None:
    old = pinned(("198.51.100.1", 1194, H1), ("198.51.100.2", 1194, H2))
    lines: list[str] = []
    new = refreshed(old, lookup({H1: answer, H2: ["198.51.100.5"]}), lines.append)  # type: ignore[dict-item]
    assert keys(new) == [("198.51.100.1", 1194, H1), ("198.51.100.5", 1194, H2)]
    assert lines[0].startswith(f"kept the pins of {H1}: ") and why in lines[0]


def test_refresh_through_needs_the_vpns_resolvers() -> None:
    with pytest.raises(ConfigError, match=r"^dns\.servers: empty"):
        resolve.through((), "tun0")


def test_host_round_trips_and_is_validated() -> None:
    c = pinned(("198.51.100.1", 1194, H1))
    assert config.parse(c.to_toml()) == c
    assert f'host = "{H1}"' in c.to_toml()
    data = c.to_dict()
    data["endpoint"][0]["host"] = "Bad Host"
    with pytest.raises(ConfigError, match=r"endpoint\[0\]\.host: 'Bad Host' is not a DNS hostname"):
        Config.from_dict(data)


# --- the companion client file -------------------------------------------------------

OVPN = """\
dev tun
proto udp
remote a.example-vpn.net 1194
remote 198.51.100.9 443 tcp-client
<connection>
remote b.example-vpn.net 1195
proto tcp
</connection>
remote-random
<ca>
remote a.example-vpn.net 9999
</ca>
"""


def fake(host: str, family: int | None) -> list[IPAddress]:
    return {H1: [A("198.51.100.1"), A("2001:db8::1")], H2: [A("198.51.100.2"), A("198.51.100.3")]}[host]


def test_openvpn_companion_keeps_order_protocol_and_connection_blocks(tmp_path: Path) -> None:
    source = tmp_path / "c.ovpn"
    source.write_text(OVPN)
    imported = importers.read_openvpn(source)
    built = importers.build(imported, fake)
    assert [str(e) for e in built.endpoints] == [
        "198.51.100.1:1194/udp",
        "[2001:db8::1]:1194/udp",
        "198.51.100.9:443/tcp",
        "198.51.100.2:1195/tcp",
        "198.51.100.3:1195/tcp",
    ]
    body = importers.client_file(imported).split("\n", 2)[2]
    assert body == OVPN.replace(
        "remote a.example-vpn.net 1194\n", "remote 198.51.100.1 1194\nremote 2001:db8::1 1194\n"
    ).replace(
        "<connection>\nremote b.example-vpn.net 1195\nproto tcp\n</connection>\n",
        "<connection>\nremote 198.51.100.2 1195\nproto tcp\n</connection>\n"
        "<connection>\nremote 198.51.100.3 1195\nproto tcp\n</connection>\n",
    )
    # The companion reads back to the same endpoints, with no hostname left.
    again = tmp_path / "pinned.ovpn"
    again.write_text(importers.client_file(imported))
    assert [e.key for e in importers.from_openvpn(again).endpoints] == [e.key for e in built.endpoints]


def test_wireguard_companion_gets_the_first_address(tmp_path: Path) -> None:
    source = tmp_path / "wg0.conf"
    source.write_text(
        "[Interface]\nPrivateKey = x\n\n[Peer]\nEndpoint = a.example-vpn.net:51820\nAllowedIPs = 0.0.0.0/0\n"
    )
    imported = importers.read_wireguard(source)
    built = importers.build(imported, fake)
    assert [str(e) for e in built.endpoints] == ["198.51.100.1:51820/udp", "[2001:db8::1]:51820/udp"]
    text = importers.client_file(imported)
    assert "Endpoint = 198.51.100.1:51820\n" in text
    assert "example-vpn.net:" not in text


def earlyfw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "earlyfw", *args], capture_output=True, text=True, check=False)


def test_client_out_never_rewrites_the_source(tmp_path: Path) -> None:
    source = tmp_path / "c.ovpn"
    source.write_text("remote 198.51.100.7 1194\n")
    result = earlyfw(
        "--config", str(tmp_path / "e.toml"), "import", "openvpn", str(source), "--client-out", str(source)
    )
    assert result.returncode == 2
    assert "is the source file" in result.stderr.splitlines()[0]
    assert source.read_text() == "remote 198.51.100.7 1194\n"
    assert not (tmp_path / "e.toml").exists()


# --- the timer -------------------------------------------------------------------------


def test_refresh_units_are_installed_but_not_enabled(tmp_path: Path) -> None:
    plan = Refresh(Root(tmp_path), RecordingRunner()).plan(pinned(("198.51.100.1", 1194, H1)))
    assert {a.path for a in plan.artifacts if isinstance(a, File)} == {
        f"/etc/systemd/system/{REFRESH_SERVICE}",
        f"/etc/systemd/system/{REFRESH_TIMER}",
    }
    assert not [a for a in plan.artifacts if isinstance(a, Symlink)], "the timer must be off by default"
    assert f"systemctl enable --now {REFRESH_TIMER}" in plan.image_notes[0]
    assert Refresh(Root(tmp_path), RecordingRunner()).plan(pinned(("198.51.100.1", 1194, None))).image_notes == ()


@pytest.mark.parametrize("unit", [REFRESH_SERVICE, REFRESH_TIMER])
def test_refresh_units_verify_clean(tmp_path: Path, unit: str) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd", pytrace=False)
    directory = tmp_path / "etc/systemd/system"
    directory.mkdir(parents=True)
    for name in (REFRESH_SERVICE, REFRESH_TIMER):
        (directory / name).write_bytes(boot.render(f"units/{name}.j2"))
    # earlyfw is found on systemd's fixed search path (/usr/local/bin for pip,
    # /usr/bin for the package), which this test host need not have: verify
    # checks a copy whose command is /bin/true, everything else as installed.
    service = directory / REFRESH_SERVICE
    text = service.read_text()
    assert text.count("ExecStart=earlyfw endpoints refresh\n") == 1
    service.write_text(text.replace("ExecStart=earlyfw ", "ExecStart=/bin/true "))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(directory / unit)],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{directory}:"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    if unit == REFRESH_SERVICE:
        security = subprocess.run(
            ["systemd-analyze", "security", "--offline=true", f"--root={tmp_path}", "--threshold=30", unit],
            capture_output=True,
            text=True,
            check=False,
        )
        score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
        assert score is not None, security.stdout + security.stderr
        assert float(score[1]) <= 2.5, security.stdout


CONNTRACK = """\
ipv4     2 udp      17 170 src=192.0.2.2 dst=198.51.100.1 sport=41000 dport=1194 src=198.51.100.1 dst=192.0.2.2 \
sport=1194 dport=41000 [ASSURED] mark=0 zone=0 use=2
ipv6     10 udp      17 29 src=2001:0db8:0001:0000:0000:0000:0000:0002 dst=2001:0db8:0000:0000:0000:0000:0000:0001 \
sport=41001 dport=1194 [UNREPLIED] src=2001:0db8:0000:0000:0000:0000:0000:0001 \
dst=2001:0db8:0001:0000:0000:0000:0000:0002 sport=1194 dport=41001 mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=192.0.2.2 dst=198.51.100.2 sport=40000 dport=1194 src=198.51.100.2 \
dst=192.0.2.2 sport=1194 dport=40000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 20 src=192.0.2.2 dst=203.0.113.5 sport=41002 dport=53 [UNREPLIED] src=203.0.113.5 \
dst=192.0.2.2 sport=53 dport=41002 mark=0 zone=0 use=2
"""


def test_the_pin_the_tunnel_uses_stays_until_it_does_not(tmp_path: Path) -> None:
    table = tmp_path / "nf_conntrack"
    table.write_text(CONNTRACK)
    old = pinned(("198.51.100.1", 1194, H1), ("2001:db8::1", 1194, H1), ("198.51.100.2", 1194, H2))
    lines: list[str] = []
    flows = tunnel_flows(old, lines.append, table)
    # udp to .1 and to 2001:db8::1 are pinned flows; tcp to .2 is not (its pin is udp); DNS is not pinned.
    assert flows == {(A("198.51.100.1"), 1194, Transport.UDP), (A("2001:db8::1"), 1194, Transport.UDP)}
    new = refreshed(old, lookup({H1: ["198.51.100.7"], H2: ["198.51.100.8"]}), lines.append, flows)
    assert keys(new) == [
        ("198.51.100.7", 1194, H1),
        ("198.51.100.1", 1194, H1),
        ("2001:db8::1", 1194, H1),
        ("198.51.100.8", 1194, H2),
    ]
    assert f"kept 198.51.100.1:1194/udp ({H1}): no longer in DNS, but the tunnel is using it" in lines
    # The next refresh, once the client has moved on, drops it.
    assert keys(refreshed(new, lookup({H1: ["198.51.100.7"], H2: ["198.51.100.8"]}), lines.append)) == [
        ("198.51.100.7", 1194, H1),
        ("198.51.100.8", 1194, H2),
    ]
    missing = tunnel_flows(old, lines.append, tmp_path / "absent")
    assert missing == set()
    assert lines[-1].startswith("cannot tell which endpoint the tunnel uses")


# --- applying the pins: the watcher's reload, the boot rulesets ----------------------------


def _watcher(path: Path, state: State) -> tuple[Watcher, RecordingRuleset, ScriptedTunnel, list[str]]:
    loaded = config.load(path)
    rules = RecordingRuleset(loaded)
    tunnel = ScriptedTunnel(Verdict(state, "the tunnel is live" if state is State.RELAXED else "waiting"))
    lines: list[str] = []
    watcher = Watcher(loaded, rules, tunnel, None, None, log=lines.append, clock=FakeClock().clock())
    watcher.start()
    watcher.step(0)
    assert watcher.state is state
    return watcher, rules, tunnel, lines


def _sighup(watcher: Watcher) -> None:
    watcher.request_reload()  # what the SIGHUP handler does
    watcher.step(0)


@pytest.mark.parametrize(
    "bad",
    [
        'tunnel = "wireguard"\n',  # not a config at all
        pinned(("127.0.0.1", 1194, H1)).to_toml(),  # an endpoint no config may have
        dataclasses.replace(pinned(("198.51.100.2", 1194, H1)), interface="tun1").to_toml(),  # needs a restart
    ],
    ids=["unparsable", "loopback-endpoint", "interface-changed"],
)
def test_watcher_reload_of_a_bad_config_keeps_the_old_one_and_says_so_once(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "earlyfw.toml"
    path.write_text(pinned(("198.51.100.1", 1194, H1)).to_toml())
    watcher, rules, _, lines = _watcher(path, State.RELAXED)
    before, puts, logged = watcher.config, list(rules.puts), len(lines)
    path.write_text(bad)
    _sighup(watcher)
    assert watcher.config is before and rules.config is before
    assert rules.puts == puts, "a refused reload changes nothing in the kernel"
    assert watcher.state is State.RELAXED
    assert len(lines) == logged + 1
    assert lines[-1].startswith("reload refused, still enforcing the config it had: ")
    assert watcher.reloaded is not None and watcher.reloaded["ok"] is False
    watcher.close()


def test_watcher_reload_swaps_the_pins_in_one_batch_and_keeps_the_verdict(tmp_path: Path) -> None:
    path = tmp_path / "earlyfw.toml"
    path.write_text(pinned(("198.51.100.1", 1194, H1), ("198.51.100.2", 1194, H2)).to_toml())
    watcher, rules, tunnel, lines = _watcher(path, State.RELAXED)
    puts = len(rules.puts)
    new = pinned(("198.51.100.1", 1194, H1), ("198.51.100.3", 1194, H2))
    path.write_text(new.to_toml())
    _sighup(watcher)
    assert [str(e) for e in watcher.config.endpoints] == [str(e) for e in new.endpoints]
    assert rules.config is watcher.config
    assert rules.puts[puts:] == [State.RELAXED], "one batch, in the state the verdict keeps"
    assert lines[-1] == f"reloaded {path}: +1 -1 endpoint(s); still relaxed"
    # The verdict under the new config decides: the peer's endpoint gone locks.
    tunnel.verdict = Verdict(State.BLOCKED, "peer X is not a configured endpoint")
    path.write_text(pinned(("198.51.100.4", 1194, H1)).to_toml())
    puts = len(rules.puts)
    _sighup(watcher)
    assert rules.puts[puts:] == [State.BLOCKED] and watcher.state is State.BLOCKED, "still one batch"
    assert lines[-1].startswith("blocked: peer X is not a configured endpoint (after reloading")
    watcher.close()


def _installed(root: Root, old: Config) -> None:
    """What `earlyfw install` leaves of the core and the egress ruleset, with its manifest."""
    files = [*Core(root, RecordingRunner()).plan(old).artifacts, File(boot.EGRESS_RULESET, boot.egress_ruleset(old))]
    manifest = Manifest(targets=["core", "systemd"])
    for file in files:
        assert isinstance(file, File)
        root.makedirs(os.path.dirname(file.path))
        root.write(file.path, file.content, mode=file.mode, uid=os.geteuid(), gid=os.getegid())
        manifest.entries[file.path] = Entry(file.path, fingerprint="sha256:" + sha256(file.content), mode=file.mode)
    root.makedirs(os.path.dirname(MANIFEST))
    root.write(MANIFEST, manifest.dump(), mode=0o600, uid=os.geteuid(), gid=os.getegid())


def test_apply_rewrites_the_boot_rulesets_and_keeps_them_earlyfws(tmp_path: Path) -> None:
    root = Root(tmp_path)
    old = dataclasses.replace(
        pinned(("198.51.100.1", 1194, H1)), interface=f"eft{os.getpid()}", egress_interfaces=("eth0",)
    )
    new = dataclasses.replace(old, endpoints=(Endpoint(A("198.51.100.7"), 1194, Transport.UDP, H1),))
    _installed(root, old)
    runner, lines = RecordingRunner(), list[str]()
    apply(root, CONFIG_PATH, old, new, runner=runner, log=lines.append)
    blocked = root.read_bytes(ruleset_path(State.BLOCKED)).decode()
    assert "198.51.100.7" in blocked and "198.51.100.1" not in blocked
    for state in State:
        assert "198.51.100.1" not in root.read_bytes(ruleset_path(state)).decode(), state
    assert "198.51.100.1" not in root.read_bytes(boot.EGRESS_RULESET).decode()
    assert config.load(root / CONFIG_PATH).endpoints == new.endpoints
    manifest = Manifest.load(root)
    assert manifest is not None
    assert all(manifest.owns(root, p) for p in manifest.entries), "uninstall still knows them as earlyfw's"
    assert any("initramfs keeps its copy of the old pins until it is rebuilt" in line for line in lines)
    scripts = [i for argv, i in runner.calls if argv[:2] == ("nft", "-f")]
    assert len(scripts) == 1 and scripts[0] is not None
    assert scripts[0].index("add element") < scripts[0].index("delete element"), "new before old"


def test_apply_puts_every_file_back_when_the_kernel_refuses(tmp_path: Path) -> None:
    root = Root(tmp_path)
    old = dataclasses.replace(
        pinned(("198.51.100.1", 1194, H1)), interface=f"efu{os.getpid()}", egress_interfaces=("eth0",)
    )
    new = dataclasses.replace(old, endpoints=(Endpoint(A("198.51.100.7"), 1194, Transport.UDP, H1),))
    _installed(root, old)
    before = {p: (tmp_path / p.lstrip("/")).read_bytes() for p in (CONFIG_PATH, ruleset_path(State.BLOCKED), MANIFEST)}

    def refuse(argv: Sequence[str], input: str | None) -> Result:
        if list(argv[:2]) == ["nft", "-f"]:
            raise CommandError("nft: Operation not permitted")
        return Result(0, "", "")

    with pytest.raises(CommandError):
        apply(root, CONFIG_PATH, old, new, runner=RecordingRunner(respond=refuse), log=lambda _: None)
    assert {p: (tmp_path / p.lstrip("/")).read_bytes() for p in before} == before


def _execd(pid: int) -> bool:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:2] == [b"-c"]


def test_only_a_live_watcher_of_this_namespace_is_signalled(tmp_path: Path) -> None:
    """A verdict file left by a crashed watcher may name a reused pid: refresh
    must not SIGHUP (and so end) whatever process has it now."""

    def published(pid: int, **extra: object) -> None:
        (tmp_path / "watch-tun9.json").write_text(json.dumps({"pid": pid, "stopped": False, **extra}))

    code = "import time; time.sleep(30)"
    stranger = subprocess.Popen([sys.executable, "-c", code])
    watcher = subprocess.Popen([sys.executable, "-c", code, "earlyfw", "--quiet", "watch"])
    for child in (stranger, watcher):  # until each has exec'd (before, /proc shows pytest's command line)
        netns.wait_until(functools.partial(_execd, child.pid), 10, "exec")
    try:
        published(stranger.pid)
        assert running_watcher("tun9", tmp_path) is None
        published(watcher.pid)
        assert running_watcher("tun9", tmp_path) == watcher.pid
        published(watcher.pid, stopped=True)
        assert running_watcher("tun9", tmp_path) is None
        assert running_watcher("tun8", tmp_path) is None
    finally:
        for process in (stranger, watcher):
            process.kill()
            process.wait()
    published(watcher.pid)
    assert running_watcher("tun9", tmp_path) is None, "gone"
