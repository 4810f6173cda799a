"""Captive-portal windows (issue 13, part 1) with real packets: `earlyfw
portal` in a client namespace under the blocked state, a login page
(an HTTP server) and the network's resolver (dnsmasq) in the world.

Each probe round resolves the portal's name (getent: glibc, through
/etc/resolv.conf) and fetches the page by address (bash's /dev/tcp), and
prints the two outcomes with the wall-clock time. The window's command is one
probe, run as the sudo user (nobody); a second probe, started at the same
moment as the same user outside the window's cgroup, with the same
resolv.conf (a mount namespace of its own), is the neighbour that must stay
refused. The control: with no ruleset that neighbour resolves and fetches.

`earlyfw portal` runs under nsenter, not `ip netns exec`: the latter mounts a
sysfs of the namespace's own over /sys, which hides the cgroup tree that nft
reads cgroup paths from; a real system has no such mount.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from earlyfw.linux import portal, window
from tests import netns
from tests.conftest import require
from tests.watch_lab import PYTHON_MODULE, RESTRICTED, Watcher, live_state

pytestmark = pytest.mark.netns

PORTAL = ipaddress.IPv4Address("203.0.113.80")  # the hotel's login page
RESOLVER = ipaddress.IPv4Address("203.0.113.53")  # the resolver its DHCP hands out
NAME = "login.hotel.example"
PAGE = "earlyfw-portal-page"
NOBODY = "65534"
# A short window for the tests: --minutes takes fractions (0.1 = 6 s, the least).
MINUTES = 0.15
SECONDS = portal.seconds_of(MINUTES)
# Rounds after the window's end that must all fail, and the slack allowed
# for the kernel's timeout against the test's clock.
AFTER_ROUNDS = 3
SLACK = 1.5
# How long a window test probes: the window, and time after it for the rounds.
PROBING = SECONDS + 2 * SLACK + 5

PROBE = r"""
name=$1 address=$2 until=$3 page=$4
while [ "$(date +%s)" -lt "$until" ]; do
	if getent hosts "$name" >/dev/null 2>&1; then dns=ok; else dns=fail; fi
	if timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/80" && printf "GET / HTTP/1.0\r\n\r\n" >&3 && grep -q "$2" <&3' \
		_ "$address" "$page" 2>/dev/null; then http=ok; else http=fail; fi
	echo "$(date +%s.%N) dns=$dns http=$http"
	sleep 0.3
done
"""


@dataclass(frozen=True)
class Round:
    at: float
    dns: bool
    http: bool

    @property
    def any(self) -> bool:
        return self.dns or self.http


def rounds(path: Path) -> list[Round]:
    found = []
    for line in path.read_text(errors="replace").splitlines():
        match = re.fullmatch(r"(\d+\.\d+) dns=(ok|fail) http=(ok|fail)", line.strip())
        if match:
            found.append(Round(float(match[1]), match[2] == "ok", match[3] == "ok"))
    return found


@dataclass
class PortalLab:
    lab: netns.Lab
    pair: netns.ClientWorld
    tmp: Path
    config: Path

    @property
    def client(self) -> netns.Namespace:
        return self.pair.client

    def earlyfw(self, *args: str) -> list[str]:
        return ["nsenter", f"--net={self.client.path}", *PYTHON_MODULE, "--config", str(self.config), *args]

    def probe_argv(self, seconds: float) -> list[str]:
        """Probe rounds for `seconds` from now."""
        return ["bash", "-c", PROBE, "probe", NAME, str(PORTAL), str(int(time.time() + seconds) + 1), PAGE]

    def start_portal(
        self, seconds: float, tag: str, minutes: float = MINUTES
    ) -> tuple[subprocess.Popen[bytes], Path, Path]:
        """`sudo earlyfw portal` as nobody would run it; its command's output
        and its own (the journal lines) in two files."""
        out, err = self.tmp / f"{tag}.out", self.tmp / f"{tag}.err"
        argv = self.earlyfw(
            "portal", "--minutes", str(MINUTES), "--dns", str(RESOLVER), "--", *self.probe_argv(seconds)
        )
        env = {**os.environ, "SUDO_UID": NOBODY, "SUDO_GID": NOBODY, "SUDO_USER": "nobody"}
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
        self.lab.callback(netns.stop, process)
        return process, out, err

    def start_neighbour(self, seconds: float, tag: str) -> tuple[subprocess.Popen[bytes], Path]:
        """The same probe as nobody outside any window, with the same
        resolv.conf (a mount namespace of its own), so only the cgroup differs."""
        resolv = self.tmp / "resolv.conf"
        resolv.write_text(portal.resolv_conf([RESOLVER]))
        out = self.tmp / f"{tag}.out"
        shell = 'mount --bind "$0" "$(realpath /etc/resolv.conf)" && exec "$@"'
        drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        argv = ["nsenter", f"--net={self.client.path}", "unshare", "--mount", "--propagation", "slave"]
        argv += ["sh", "-c", shell, str(resolv), *drop, *self.probe_argv(seconds)]
        with out.open("wb") as stdout:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT)
        self.lab.callback(netns.stop, process)
        return process, out

    def status(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.client.exec_result([*PYTHON_MODULE, "--config", str(self.config), "status", *args])

    def apply(self, state: str) -> None:
        # ip netns exec: its own sysfs shows the namespace's interfaces ([egress]).
        self.client.exec([*PYTHON_MODULE, "-q", "--config", str(self.config), state])


def config_text(kind: str = "wireguard", interface: str = "wg0", egress: str | None = None) -> str:
    return (
        f'[tunnel]\nkind = "{kind}"\ninterface = "{interface}"\n'
        f'[[endpoint]]\naddress = "{netns.WORLD_V4}"\nport = 51820\n'
        "[portal]\nallow = true\n" + (f'[egress]\ninterfaces = ["{egress}"]\n' if egress else "")
    )


@pytest.fixture
def portal_lab(tmp_path: Path) -> Iterator[PortalLab]:
    require("dnsmasq", "getent", "nsenter", "setpriv", "unshare")
    with netns.Lab() as lab:
        pair = netns.client_world(lab, [PORTAL, RESOLVER], tag="ep")
        (tmp_path / "www").mkdir()
        (tmp_path / "www" / "index.html").write_text(PAGE + "\n")
        lab.spawn(
            pair.world,
            [sys.executable, "-m", "http.server", "--bind", str(PORTAL), "--directory", str(tmp_path / "www"), "80"],
            log=tmp_path / "http.log",
        )
        netns.resolver(lab, pair.world, [str(RESOLVER)], [f"--address=/{NAME}/{PORTAL}"], tmp_path)
        netns.wait_until(lambda: f"{PORTAL}:80 " in pair.world.exec(["ss", "-Hltn"]), 5, "the portal's web server")
        config = tmp_path / "earlyfw.toml"
        config.write_text(config_text())
        yield PortalLab(lab, pair, tmp_path, config)


def opened_at(err: Path) -> float:
    netns.wait_until(lambda: "portal: opened" in err.read_text(errors="replace"), 15, "the window to open")
    return time.time()


def check_window(window: Sequence[Round], neighbour: Sequence[Round], opened: float) -> None:
    """The window's command got the page by name within the window, the
    neighbour never got anything, and after the window nothing got through."""
    end = opened + SECONDS
    inside = [r for r in window if r.at < end - SLACK]
    assert any(r.dns and r.http for r in inside), f"the window's command never reached the portal: {window}"
    assert not any(r.any for r in neighbour), f"the neighbour outside the window got through: {neighbour}"
    after = [r for r in window if r.at > end + SLACK]
    assert len(after) >= AFTER_ROUNDS, f"too few rounds after the window's end to show it closed: {window}"
    assert not any(r.any for r in after), f"the window's command still got through after its end: {after}"


# --- the window, straight into earlyfw's table (no watcher) ---------------------------------


@pytest.mark.parametrize("egress", [False, True], ids=["inet", "egress"])
def test_the_window_lets_only_its_command_out_until_it_times_out(portal_lab: PortalLab, egress: bool) -> None:
    """With [egress] interfaces the raw-egress chain must pass the window's
    packets too (it holds the ports and resolvers while the window lasts)."""
    lab = portal_lab
    if egress:
        lab.config.write_text(config_text(egress=lab.pair.client_if))
    # Control: with no ruleset the neighbour's probe resolves and fetches.
    control, control_out = lab.start_neighbour(1, "control")
    control.wait(15)
    found = rounds(control_out)
    assert found and all(r.dns and r.http for r in found), control_out.read_text()

    lab.apply("lock")
    assert live_state(lab.client) == "blocked"
    tables = lab.client.exec(["nft", "list", "tables"])
    assert ("table netdev earlyfw_egress" in tables) is egress
    process, out, err = lab.start_portal(PROBING, "window")
    neighbour, beside = lab.start_neighbour(PROBING, "neighbour")
    opened = opened_at(err)
    # An open window is not an altered table; status shows it, as the kernel
    # holds it (both forms at once: the window is short). Under `ip netns
    # exec` nft cannot see the cgroup tree (see above) and lists the cgroup's id.
    with concurrent.futures.ThreadPoolExecutor() as pool:
        status, as_json = pool.map(lambda args: lab.status(*args), [(), ("--json",)])
    assert status.returncode == 0 and "state: blocked (intact)" in status.stdout, status.stdout + status.stderr
    cgroup = rf"(\S*{window.PARENT}/w[0-9a-f]+|[0-9]+)"
    assert re.search(rf"portal window: open for {cgroup}, closes at ", status.stdout), status.stdout
    shown = json.loads(as_json.stdout)["portal"]
    assert re.fullmatch(cgroup, shown["cgroup"]) and shown["seconds"] == SECONDS, shown
    assert 0 < shown["remaining_seconds"] <= SECONDS
    assert abs(shown["closes_at"] - (opened + SECONDS)) < 2 * SLACK, (shown, opened)
    assert process.wait(PROBING + 30) == 0, err.read_text()
    assert neighbour.wait(30) == 0
    check_window(rounds(out), rounds(beside), opened)

    journal = err.read_text()
    assert re.search(rf"portal: opened for .* as uid {NOBODY}: cgroup \S*{window.PARENT}/w[0-9a-f]+", journal)
    assert f"portal: closed (timed out after {SECONDS} s)" in journal, journal
    assert live_state(lab.client) == "blocked"
    listing = lab.client.exec(["nft", "list", "set", "inet", "earlyfw", "portal_web"])
    assert not window.open_in(listing), listing
    status = lab.status()
    assert status.returncode == 0 and "state: blocked (intact)" in status.stdout, status.stdout + status.stderr
    assert "portal window: none open" in status.stdout, status.stdout
    assert json.loads(lab.status("--json").stdout)["portal"] is None


def test_kill_9_of_earlyfw_still_closes_the_window_on_time(portal_lab: PortalLab) -> None:
    """The window is kernel state: with earlyfw portal killed outright its
    command runs on, and is refused once the element's timeout passes."""
    lab = portal_lab
    lab.apply("lock")
    process, out, err = lab.start_portal(PROBING, "killed")
    opened = opened_at(err)
    netns.wait_until(lambda: bool(rounds(out)), 10, "the window's first round")
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    killed = time.time()
    assert killed < opened + SECONDS - SLACK, "the kill came too late to show anything"
    time.sleep(max(0.0, opened + PROBING + 3 - time.time()))  # the orphaned command's rounds
    window = rounds(out)
    assert any(r.dns and r.http for r in window if r.at < opened + SECONDS - SLACK), window
    assert any(r.at > killed and r.http for r in window), "nothing got through between the kill and the timeout"
    check_window(window, [], opened)
    assert "closed" not in err.read_text(), "a killed earlyfw portal said the window closed"


# --- through the watcher: the guard too, and the window's other ways out ----------------------


class NsenterWatcher(Watcher):
    """`earlyfw watch`, restricted as its unit runs it, under nsenter (see the module's docstring)."""

    def __post_init__(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["nsenter", f"--net={self.ns.path}", *RESTRICTED, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )


def start_watcher(lab: PortalLab) -> Watcher:
    lab.config.write_text(config_text("manual", "efpt0"))
    watcher = NsenterWatcher(lab.client, (*PYTHON_MODULE, "--config", str(lab.config), "watch"), lab.tmp / "watch.log")
    lab.lab.callback(watcher.stop)
    lab.lab.callback(lambda: Path("/run/earlyfw/watch-efpt0.json").unlink(missing_ok=True))
    watcher.wait_for(r"^blocked: watcher started \(manual on efpt0, guarded\)")
    return watcher


def test_through_the_watcher_a_relax_closes_the_window(portal_lab: PortalLab) -> None:
    """With the watcher running the window goes into its guard table too
    (or nothing would pass); the first relax replaces both tables and
    closes it, long before its timeout, which the watcher's journal says."""
    lab = portal_lab
    watcher = start_watcher(lab)
    process, out, err = lab.start_portal(90, "relax", minutes=1)
    opened = opened_at(err)
    watcher.wait_for(r"^portal: opened for pid \d+: cgroup ")
    guard = lab.client.exec(["nft", "list", "set", "inet", "earlyfw_guard", "portal_web"])
    assert window.open_in(guard), guard
    netns.wait_until(lambda: any(r.dns and r.http for r in rounds(out)), 10, "the portal page through the window")
    # Another process's change to earlyfw's table makes the watcher compare it
    # with its guard: the window, in both, is no alteration.
    lab.client.nft(
        "add element inet earlyfw dns_ports { udp . 5353 }\ndelete element inet earlyfw dns_ports { udp . 5353 }\n"
    )
    time.sleep(1)
    assert "repaired" not in watcher.log, watcher.log
    assert window.open_in(lab.client.exec(["nft", "list", "set", "inet", "earlyfw", "portal_web"]))

    lab.apply("relax")
    relaxed = time.time()
    watcher.wait_for(r"^portal: closed \(the ruleset was replaced, now relaxed\)")
    netns.wait_until(lambda: "portal: closed (the ruleset was replaced" in err.read_text(), 5, "earlyfw portal's line")
    assert time.time() < opened + 60, "closed by the timeout, not by the relax"
    assert live_state(lab.client) == "relaxed"
    netns.wait_until(lambda: len([r for r in rounds(out) if r.at > relaxed + SLACK]) >= AFTER_ROUNDS, 30, "rounds")
    after = [r for r in rounds(out) if r.at > relaxed + SLACK]
    assert not any(r.any for r in after), f"relaxed, the command still got out beside the tunnel: {after}"
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 128 + signal.SIGTERM


def test_through_the_watcher_the_command_exiting_closes_it(portal_lab: PortalLab) -> None:
    lab = portal_lab
    watcher = start_watcher(lab)
    process, out, err = lab.start_portal(4, "exits")
    assert process.wait(30) == 0, err.read_text()
    assert any(r.dns and r.http for r in rounds(out)), out.read_text()
    watcher.wait_for(r"^portal: closed \(its command exited\)")
    for table in ("earlyfw", "earlyfw_guard"):
        listing = lab.client.exec(["nft", "list", "set", "inet", table, "portal_web"])
        assert not window.open_in(listing), listing
    # What it ran in is gone with it.
    cgroup = re.search(rf"cgroup (\S*{window.PARENT}/w[0-9a-f]+)", err.read_text())
    assert cgroup is not None, err.read_text()
    assert not (portal.SYSFS_CGROUP / cgroup[1]).exists()
