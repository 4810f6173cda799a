"""earlyfw-pf, the script launchd runs on the Mac, run here against stubs.

pfctl, launchctl and wg do not exist on Linux, so stub commands on PATH stand
in for them: each records its arguments, and the pfctl stub keeps a small model
of pf's state (enabled, enable references, the main ruleset, each anchor's
rules) with the behaviour the script relies on: a failed load changes nothing
(pf loads in one transaction), `-d` drops every reference, releasing the last
reference disables pf. Whether the machine is blocked is then decided by
evaluating the model's rules with tests/pf_evaluator.py.

The script runs under dash and under bash --posix (macOS's /bin/sh is bash 3.2
in POSIX mode), from a directory with a space in its name, like
"/Library/Application Support".

What only a Mac can confirm, and how: after `sudo earlyfw install`,
`sudo launchctl print system/org.earlyfw.pf` shows the job running;
`sudo pfctl -s References` lists its token; `sudo pfctl -a com.apple/000.earlyfw
-sr` lists the rules; `sudo pfctl -d`, then within two seconds `sudo pfctl -s
info` says Enabled again and /var/log/earlyfw.log says why. After a reboot, the
log's first line is the boot-time load.
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from earlyfw import config
from earlyfw.macos import pf
from earlyfw.macos import target as macos
from earlyfw.macos.pf import Action, Direction
from earlyfw.policy import State
from earlyfw.system import System
from tests.pf_evaluator import Packet, evaluate
from tests.recording_runner import RecordingRunner
from tests.systems import force
from tests.test_macos_pf import EXAMPLE_CONFIG, LAN_TCP_CONFIG, ip

APPLE_MAIN = 'scrub-anchor "com.apple/*" all fragment reassemble\nanchor "com.apple/*" all\n'
NOW = 1_700_000_000
PEER_KEY = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="

# The stubs are POSIX sh: they run dozens of times per test, so they must start
# fast. Each records its argv (fields separated by \037) in $STUB/calls; the
# pfctl stub keeps pf's state as files in $STUB/pf.
STUB_PFCTL = r"""#!/bin/sh
D=__STUB_DIR__
P="$D/pf"
{ printf 'pfctl'; printf '\037%s' "$@"; printf '\n'; } >>"$D/calls"
# Real pfctl says this on every call on a Mac; the script must cope.
printf 'No ALTQ support in kernel\nALTQ related functions disabled\n' >&2
if [ -s "$D/fail" ] && printf '%s\n' "$*" | grep -E -q -f "$D/fail"; then
	echo "pfctl: stub failure for '$*'" >&2
	exit 1
fi
a= f= F= s= X= E= d= i=
while [ $# -gt 0 ]; do
	case $1 in
	-a) a=$2; shift 2 ;;
	-i) i=$2; shift 2 ;;
	-f) f=$2; shift 2 ;;
	-F) F=$2; shift 2 ;;
	-s) s=$2; shift 2 ;;
	-X) X=$2; shift 2 ;;
	-o) shift 2 ;;
	-E) E=1; shift ;;
	-d) d=1; shift ;;
	-R) shift ;;
	*) echo "pfctl stub: unexpected argument $1" >&2; exit 99 ;;
	esac
done
if [ -n "$a" ]; then
	target="$P/anchors/$(printf '%s' "$a" | tr / %)"
else
	target="$P/main"
fi
rules() {
	sed 's/#.*//; s/^[[:space:]]*//; s/[[:space:]]*$//' "$1" | grep -v -e '^$' -e '^table'
}
if [ -n "$f" ]; then
	if [ "$f" = - ]; then
		cat >"$D/last_stdin"
		cp "$D/last_stdin" "$target"
	else
		cat "$f" >"$target.new" || exit 1
		mv "$target.new" "$target"
	fi
elif [ -n "$F" ]; then
	case $F in rules | all) : >"$target" ;; esac
	case $F in states | all)
		if [ -n "$i" ]; then
			echo "$i" >>"$P/interface_flushes"
		else
			echo $(($(cat "$P/state_flushes") + 1)) >"$P/state_flushes"
		fi
		;;
	esac
elif [ "$s" = rules ]; then
	if [ ! -e "$target" ]; then
		echo "pfctl: DIOCGETRULES: Invalid argument" >&2
		exit 1
	fi
	rules "$target" || :
elif [ "$s" = info ]; then
	if [ "$(cat "$P/enabled")" = 1 ]; then
		echo "Status: Enabled for 0 days 00:00:05           Debug: Urgent"
	else
		echo "Status: Disabled for 0 days 00:00:05          Debug: Urgent"
	fi
elif [ "$s" = References ]; then
	echo "TOKENS:"
	echo "PID      Process Name                TOKEN                     TIMESTAMP"
	while read -r token; do
		printf '412      pfctl                       %-25s 0 days 00:00:03\n' "$token"
	done <"$P/tokens"
elif [ -n "$E" ]; then
	token=$(cat "$P/next_token")
	echo $((token + 7919)) >"$P/next_token"
	echo "$token" >>"$P/tokens"
	echo 1 >"$P/enabled"
	printf 'pf enabled\nToken : %s\n' "$token" >&2
elif [ -n "$X" ]; then
	if ! grep -q -x -e "$X" "$P/tokens"; then
		echo "pfctl: pf: token invalid" >&2
		exit 1
	fi
	grep -v -x -e "$X" "$P/tokens" >"$P/tokens.new"
	mv "$P/tokens.new" "$P/tokens"
	if [ ! -s "$P/tokens" ]; then
		echo 0 >"$P/enabled"
		echo "pf disabled" >&2
	fi
elif [ -n "$d" ]; then
	echo 0 >"$P/enabled"
	: >"$P/tokens"
	echo "pf disabled" >&2
else
	echo "pfctl stub: nothing to do" >&2
	exit 99
fi
"""

STUB_LAUNCHCTL = r"""#!/bin/sh
D=__STUB_DIR__
{ printf 'launchctl'; printf '\037%s' "$@"; printf '\n'; } >>"$D/calls"
"""

STUB_WG = r"""#!/bin/sh
D=__STUB_DIR__
{ printf 'wg'; printf '\037%s' "$@"; printf '\n'; } >>"$D/calls"
if [ "$*" != "show __IFACE__ dump" ]; then
	echo "wg stub: unexpected $*" >&2
	exit 99
fi
if [ ! -e "$D/wg.dump" ]; then
	echo "Unable to access interface: No such device" >&2
	exit 1
fi
cat "$D/wg.dump"
"""

# A `wg` a user could plant in a directory on the daemon's PATH: it must never run.
STUB_TROJAN = r"""#!/bin/sh
D=__STUB_DIR__
{ printf 'trojan'; printf '\037%s' "$@"; printf '\n'; } >>"$D/calls"
exit 1
"""

STUB_DATE = r"""#!/bin/sh
D=__STUB_DIR__
if [ "$*" = "+%s" ]; then
	cat "$D/now"
else
	echo 2024-05-01T12:00:00+0000
fi
"""

SHELLS = {"dash": ["dash"], "bash-posix": ["bash", "--posix"]}


def require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing: apt-get install {package} (CI installs it)", pytrace=False)
    return path


@dataclass
class Mac:
    """A stand-in Mac: the rendered files in a layout under tmp, stub tools on
    PATH, and the pf model the stubs share."""

    root: Path
    layout: macos.Layout
    shell: list[str]
    cfg: config.Config

    @property
    def stub_dir(self) -> Path:
        return self.root / "stub"

    def model(self) -> dict[str, Any]:
        """pf's state as the pfctl stub keeps it."""
        pf_dir = self.stub_dir / "pf"
        return {
            "enabled": (pf_dir / "enabled").read_text().strip() == "1",
            "tokens": [int(t) for t in (pf_dir / "tokens").read_text().split()],
            "next_token": int((pf_dir / "next_token").read_text()),
            "state_flushes": int((pf_dir / "state_flushes").read_text()),
            "main": (pf_dir / "main").read_text(),
            "anchors": {p.name.replace("%", "/"): p.read_text() for p in (pf_dir / "anchors").iterdir()},
        }

    def set_model(self, **changes: Any) -> None:
        data = (self.model() if (self.stub_dir / "pf" / "enabled").exists() else {}) | changes
        pf_dir = self.stub_dir / "pf"
        (pf_dir / "anchors").mkdir(parents=True, exist_ok=True)
        (pf_dir / "enabled").write_text("1\n" if data["enabled"] else "0\n")
        (pf_dir / "tokens").write_text("".join(f"{t}\n" for t in data["tokens"]))
        (pf_dir / "next_token").write_text(f"{data['next_token']}\n")
        (pf_dir / "state_flushes").write_text(f"{data['state_flushes']}\n")
        (pf_dir / "main").write_text(data["main"])
        for name, text in data["anchors"].items():
            (pf_dir / "anchors" / name.replace("/", "%")).write_text(text)

    def interface_flushes(self) -> list[str]:
        path = self.stub_dir / "pf" / "interface_flushes"
        return path.read_text().split() if path.exists() else []

    def calls(self) -> list[list[str]]:
        path = self.stub_dir / "calls"
        return [line.split("\x1f") for line in path.read_text().splitlines()] if path.exists() else []

    def hook_stdin(self) -> str:
        """What the script piped into `pfctl -R -f -` last."""
        return (self.stub_dir / "last_stdin").read_text()

    def forget_calls(self) -> None:
        (self.stub_dir / "calls").unlink(missing_ok=True)

    def pfctl_calls(self) -> list[list[str]]:
        return [c for c in self.calls() if c[0] == "pfctl"]

    def changes(self) -> list[list[str]]:
        """pfctl calls that change pf (not the -s queries)."""
        return [c for c in self.pfctl_calls() if "-s" not in c]

    def fail(self, *patterns: str) -> None:
        (self.stub_dir / "fail").write_text("\n".join(patterns) + "\n")

    def handshake(self, *peers: tuple[str, int]) -> None:
        """`wg show utunN dump`: the interface line, then one line per peer."""
        lines = ["cHJpdmF0ZWtleXByaXZhdGVrZXlwcml2YXRla2V5cHI=\tcHVibGlj\t51820\toff"]
        lines += [f"{PEER_KEY}\t(none)\t{endpoint}\t0.0.0.0/0,::/0\t{when}\t1024\t2048\t25" for endpoint, when in peers]
        (self.stub_dir / "wg.dump").write_text("\n".join(lines) + "\n")

    def no_wireguard(self) -> None:
        (self.stub_dir / "wg.dump").unlink(missing_ok=True)

    def pfctl(self, *args: str) -> None:
        """Another tool running pfctl behind earlyfw's back."""
        subprocess.run([str(self.stub_dir / "bin" / "pfctl"), *args], check=True, capture_output=True)

    def run(self, command: str, *, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
        env = {"PATH": f"{self.stub_dir / 'bin'}:/usr/bin:/bin", "LC_ALL": "C"}
        result = subprocess.run(
            [*self.shell, self.layout.script, command], check=False, env=env, capture_output=True, text=True, timeout=60
        )
        if expect is not None:
            assert result.returncode == expect, f"exit {result.returncode}\n{result.stderr}"
        return result

    # --- Reading the model -----------------------------------------------------

    def verdict(self, packet: Packet) -> str:
        """What pf would do with `packet`: 'open' (pf disabled), 'pass', or
        'block', evaluating the main ruleset and every anchor it calls, as pf
        does: scrub first, then the first quick match in call order."""
        model = self.model()
        if not model["enabled"]:
            return "open"
        anchors = {name: pf.parse(text) for name, text in model["anchors"].items()}
        rule = evaluate(pf.parse(model["main"]), packet, anchors)
        return "pass" if rule is None or rule.action is Action.PASS else "block"

    def relaxed(self) -> bool:
        return bool(self.model()["anchors"].get(macos.TUNNEL_ANCHOR, "").strip())

    def token(self) -> str:
        return Path(self.layout.token_file).read_text().strip()


def leak() -> Packet:
    return Packet(Direction.OUT, "en0", ip("192.0.2.2"), ip("203.0.113.5"), "tcp", 50000, 443)


def through_tunnel(interface: str = "utun9") -> Packet:
    return Packet(Direction.OUT, interface, ip("10.64.0.2"), ip("203.0.113.5"), "tcp", 50000, 443)


def to_endpoint() -> Packet:
    """The tunnel's own packet: wireguard-go runs as root (the endpoint pass is `user root`)."""
    return Packet(Direction.OUT, "en0", ip("192.0.2.2"), ip("198.51.100.7"), "udp", 50000, 51820, uid=0)


def make_mac(tmp_path: Path, shell: list[str], cfg: config.Config = EXAMPLE_CONFIG) -> Mac:
    root = tmp_path / "mac"
    layout = macos.Layout(
        support_dir=f"{root}/Library/Application Support/earlyfw",
        run_dir=f"{root}/var/run/earlyfw",
        log_path=f"{root}/var/log/earlyfw.log",
    )
    rendered = macos.render(cfg, layout)
    support = Path(layout.support_dir)
    support.mkdir(parents=True)
    (support / "earlyfw.pf").write_text(rendered.rules)
    (support / "tunnel.pf").write_text(rendered.tunnel)
    (support / "emergency.pf").write_text(rendered.emergency)
    Path(layout.script).write_text(rendered.script)
    Path(layout.script).chmod(0o755)
    mac = Mac(root, layout, shell, cfg)
    bin_dir = mac.stub_dir / "bin"
    bin_dir.mkdir(parents=True)
    stubs = {"pfctl": STUB_PFCTL, "launchctl": STUB_LAUNCHCTL, "wg": STUB_TROJAN, "date": STUB_DATE}
    for name, source in stubs.items():
        text = source.replace("__STUB_DIR__", shlex.quote(str(mac.stub_dir))).replace("__IFACE__", cfg.interface)
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # The real `wg` stand-in where install copies wireguard-tools' binary.
    wg = STUB_WG.replace("__STUB_DIR__", shlex.quote(str(mac.stub_dir))).replace("__IFACE__", cfg.interface)
    installed_wg = Path(layout.support_dir, "wg")  # layout.wg, spelt out so old code can be tested too
    installed_wg.write_text(wg)
    installed_wg.chmod(0o755)
    (mac.stub_dir / "now").write_text(f"{NOW}\n")
    mac.set_model(
        enabled=False,
        tokens=[],
        next_token=9223371762477022712,
        main=APPLE_MAIN,
        anchors={},
        state_flushes=0,
    )
    return mac


@pytest.fixture(params=list(SHELLS))
def shell(request: pytest.FixtureRequest) -> list[str]:
    argv = SHELLS[request.param]
    require(argv[0], argv[0])
    return argv


@pytest.fixture
def mac(tmp_path: Path, shell: list[str]) -> Iterator[Mac]:
    yield make_mac(tmp_path, shell)


@pytest.fixture
def booted(mac: Mac) -> Mac:
    """A Mac whose launchd job has made its first pass."""
    mac.run("start")
    mac.forget_calls()
    return mac


# --- Static checks --------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [EXAMPLE_CONFIG, LAN_TCP_CONFIG], ids=["example", "lan-tcp"])
def test_script_passes_sh_n_and_shellcheck(tmp_path: Path, cfg: config.Config) -> None:
    shellcheck = require("shellcheck", "shellcheck")
    script = tmp_path / "earlyfw-pf"
    script.write_text(macos.render(cfg).script)
    for argv in (["dash", "-n"], ["bash", "--posix", "-n"]):
        subprocess.run([*argv, str(script)], check=True)
    result = subprocess.run(
        [shellcheck, "--shell=sh", "--severity=style", str(script)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_shellcheck_catches_an_unquoted_path(tmp_path: Path) -> None:
    """Control: shellcheck does flag the quoting mistake a space in
    "Application Support" would punish."""
    shellcheck = require("shellcheck", "shellcheck")
    script = tmp_path / "earlyfw-pf"
    text = macos.render(EXAMPLE_CONFIG).script
    broken = text.replace('-f "$RULES"', "-f $RULES")
    assert broken != text
    script.write_text(broken)
    result = subprocess.run([shellcheck, "--shell=sh", str(script)], check=False, capture_output=True, text=True)
    assert result.returncode != 0 and "SC2086" in result.stdout


def test_usage(mac: Mac) -> None:
    result = mac.run("bogus", expect=64)
    assert "usage:" in result.stderr


# --- Boot ---------------------------------------------------------------------------------


def test_start_loads_the_anchor_before_enabling_pf(mac: Mac) -> None:
    assert mac.verdict(leak()) == "open"  # control: a Mac before earlyfw
    mac.run("start")
    changes = mac.changes()
    load = ["pfctl", "-o", "none", "-a", macos.ANCHOR, "-f", mac.layout.rules]
    assert changes[0] == load
    assert changes.index(["pfctl", "-E"]) > changes.index(load)
    assert changes[-1] == ["pfctl", "-F", "states"]
    assert not [c for c in changes if "-R" in c], "Apple's pf.conf already calls com.apple/*"
    model = mac.model()
    assert model["enabled"] and model["tokens"] == [int(mac.token())]
    assert mac.verdict(leak()) == "block"
    assert mac.verdict(through_tunnel()) == "block"
    assert mac.verdict(to_endpoint()) == "pass"


def test_start_calls_the_anchor_itself_when_pf_conf_does_not(mac: Mac) -> None:
    custom = "scrub in all\npass out quick inet proto tcp from any to any port 443 no state\n"
    mac.set_model(main=custom)
    mac.run("start")
    hook = ["pfctl", "-o", "none", "-R", "-f", "-"]
    assert hook in mac.changes()
    main = mac.model()["main"].splitlines()
    # The call is the first filter rule: the custom quick pass after it no longer decides first.
    assert main == [
        "scrub in all",
        f'scrub-anchor "{macos.ANCHOR}" all',
        f'anchor "{macos.ANCHOR}" all',
        custom.splitlines()[1],
    ]
    assert mac.verdict(leak()) == "block"


def test_a_reinstall_reloads_the_rules_even_when_intact(booted: Mac) -> None:
    booted.run("start")
    assert ["pfctl", "-o", "none", "-a", macos.ANCHOR, "-f", booted.layout.rules] in booted.changes()
    # Already enabled with a live reference: no second one.
    assert ["pfctl", "-E"] not in booted.changes()


# --- Watchdog -------------------------------------------------------------------------------


def test_check_changes_nothing_when_all_is_in_place(booted: Mac) -> None:
    booted.run("check")
    assert booted.changes() == []
    assert booted.calls(), "control: check did query pf"


def test_check_reenables_pf_after_pfctl_d(booted: Mac) -> None:
    old = booted.token()
    booted.pfctl("-d")
    assert booted.verdict(leak()) == "open"
    booted.forget_calls()
    result = booted.run("check")
    assert booted.verdict(leak()) == "block"
    assert booted.token() != old and booted.model()["tokens"] == [int(booted.token())]
    assert ["pfctl", "-E"] in booted.changes()
    assert "pf enabled, reference" in result.stderr


def test_check_takes_a_new_reference_before_releasing_the_old(booted: Mac) -> None:
    """Someone else's `pfctl -X` of our token disabled pf; the old token, if
    still known, is released only after the new one is held."""
    other = booted.model()["next_token"]
    booted.pfctl("-E")  # another tool's reference
    booted.set_model(tokens=[other])  # ...and ours lost
    booted.forget_calls()
    booted.run("check")
    changes = booted.changes()
    assert changes[0] == ["pfctl", "-E"]
    assert changes[1][:2] == ["pfctl", "-X"]
    assert len(booted.model()["tokens"]) == 2


def test_check_reloads_a_flushed_anchor(booted: Mac) -> None:
    booted.pfctl("-a", macos.ANCHOR, "-F", "rules")
    assert booted.verdict(leak()) == "pass"  # control: the anchor is what blocks
    flushes = booted.model()["state_flushes"]
    booted.run("check")
    assert booted.verdict(leak()) == "block"
    assert booted.model()["state_flushes"] == flushes + 1


def test_check_puts_the_call_back_when_pf_conf_is_replaced(booted: Mac) -> None:
    booted.set_model(main="pass out quick all no state\n")  # a pf.conf without com.apple/*
    assert booted.verdict(leak()) == "pass"
    booted.run("check")
    assert booted.verdict(leak()) == "block"
    assert booted.model()["main"].splitlines()[:2] == [
        f'scrub-anchor "{macos.ANCHOR}" all',
        f'anchor "{macos.ANCHOR}" all',
    ]


# --- Following the WireGuard handshake ------------------------------------------------------

HANDSHAKES = [
    # (peers as (endpoint, handshake time), seconds of the last lock, relaxed?)
    ([("198.51.100.7:51820", NOW - 10)], None, True),
    ([("[2001:db8::7]:51820", NOW - 10)], None, True),
    ([("198.51.100.7:51820", NOW - 179)], None, True),
    ([("198.51.100.7:51820", NOW - 180)], None, False),
    ([("198.51.100.7:51820", NOW + 1)], None, True),
    ([("198.51.100.7:51820", NOW + 2)], None, False),
    ([("198.51.100.7:51820", 0)], None, False),
    ([("203.0.113.99:51820", NOW - 10)], None, False),
    ([("198.51.100.7:51821", NOW - 10)], None, False),
    ([("(none)", NOW - 10)], None, False),
    ([("203.0.113.99:51820", NOW - 10), ("198.51.100.7:51820", NOW - 5)], None, True),
    ([("198.51.100.7:51820", NOW - 10)], NOW - 5, False),
    ([("198.51.100.7:51820", NOW - 10)], NOW - 20, True),
    ([], None, False),
]


@pytest.mark.parametrize(("peers", "locked_at", "relaxed"), HANDSHAKES)
def test_handshake_decides_relax(
    tmp_path: Path, peers: list[tuple[str, int]], locked_at: int | None, relaxed: bool
) -> None:
    mac = make_mac(tmp_path, SHELLS["dash"])
    mac.run("start")
    if locked_at is not None:
        Path(mac.layout.locked_at_file).write_text(f"{locked_at}\n")
    mac.handshake(*peers)
    mac.run("check")
    assert mac.relaxed() is relaxed
    assert mac.verdict(through_tunnel()) == ("pass" if relaxed else "block")
    assert mac.verdict(through_tunnel("utun3")) == "block"
    assert mac.verdict(leak()) == "block"


def test_relax_then_lock_as_the_handshake_ages(booted: Mac) -> None:
    booted.handshake(("198.51.100.7:51820", NOW - 10))
    flushes = booted.model()["state_flushes"]
    booted.run("check")
    tunnel_load = ["pfctl", "-o", "none", "-a", macos.TUNNEL_ANCHOR, "-f", booted.layout.tunnel_rules]
    assert tunnel_load in booted.changes()
    assert booted.model()["state_flushes"] == flushes, "a relax only opens more"
    assert booted.verdict(through_tunnel()) == "pass"
    booted.forget_calls()
    booted.run("check")
    assert booted.changes() == [], "relaxed and fresh: nothing to do"
    (booted.stub_dir / "now").write_text(f"{NOW + 200}\n")
    booted.run("check")
    assert ["pfctl", "-a", macos.TUNNEL_ANCHOR, "-F", "rules"] in booted.changes()
    assert booted.interface_flushes() == ["utun9"] and booted.model()["state_flushes"] == flushes
    assert booted.verdict(through_tunnel()) == "block"
    assert Path(booted.layout.locked_at_file).read_text().strip() == str(NOW + 200)


def test_wg_unavailable_locks(booted: Mac) -> None:
    booted.handshake(("198.51.100.7:51820", NOW - 10))
    booted.run("check")
    assert booted.relaxed()
    booted.no_wireguard()
    booted.run("check")
    assert not booted.relaxed()


def test_openvpn_is_relaxed_by_its_hooks_not_by_wg(tmp_path: Path) -> None:
    mac = make_mac(tmp_path, SHELLS["dash"], LAN_TCP_CONFIG)
    mac.run("start")
    mac.run("check")
    assert not [c for c in mac.calls() if c[0] == "wg"]
    mac.run("relax")
    assert mac.relaxed()
    mac.run("check")
    assert mac.relaxed(), "the watchdog leaves an OpenVPN tunnel to its up/down hooks"
    mac.run("lock")
    assert not mac.relaxed()


# --- relax / lock, and the Python side that runs them -----------------------------------------


def test_relax_and_lock_calls(booted: Mac) -> None:
    """A relax only opens more: no state to flush. A lock flushes the
    tunnel's states only, not every flow on the machine."""
    booted.run("relax")
    assert booted.changes() == [
        ["pfctl", "-o", "none", "-a", macos.TUNNEL_ANCHOR, "-f", booted.layout.tunnel_rules],
    ]
    booted.forget_calls()
    booted.run("lock")
    assert booted.changes() == [
        ["pfctl", "-a", macos.TUNNEL_ANCHOR, "-F", "rules"],
        ["pfctl", "-i", "utun9", "-F", "states"],
    ]
    assert Path(booted.layout.locked_at_file).read_text().strip() == str(NOW)


def test_python_put_state_runs_the_installed_script(booted: Mac, monkeypatch: pytest.MonkeyPatch) -> None:
    force(monkeypatch, System.MACOS)
    runner = RecordingRunner()
    macos.put_state(runner, EXAMPLE_CONFIG, State.RELAXED, booted.layout)
    macos.put_state(runner, EXAMPLE_CONFIG, State.BLOCKED, booted.layout)
    assert runner.argvs() == [
        ("/bin/sh", booted.layout.script, "relax"),
        ("/bin/sh", booted.layout.script, "lock"),
    ]


# --- A failing pfctl leaves the machine blocked ---------------------------------------------


def test_rules_that_fail_to_load_give_way_to_block_all(mac: Mac) -> None:
    mac.fail(r"-f .*/earlyfw\.pf$")
    mac.run("start", expect=1)
    assert mac.model()["anchors"][macos.ANCHOR] == Path(mac.layout.emergency_rules).read_text()
    assert mac.model()["enabled"]
    assert mac.verdict(leak()) == "block"
    assert mac.verdict(to_endpoint()) == "block"
    loopback = Packet(Direction.OUT, "lo0", ip("127.0.0.1"), ip("127.0.0.1"), "tcp", 50000, 8080)
    assert mac.verdict(loopback) == "pass"
    # The next pass retries the real rules.
    (mac.stub_dir / "fail").unlink()
    mac.run("check")
    assert mac.verdict(to_endpoint()) == "pass"


def test_when_no_load_succeeds_the_previous_rules_stay(booted: Mac) -> None:
    booted.fail(r" -f ")
    booted.run("start", expect=1)
    assert booted.verdict(leak()) == "block"
    assert booted.verdict(to_endpoint()) == "pass"
    for call in booted.changes():
        assert "-d" not in call and "-X" not in call
        assert call[-2:] != ["-F", "rules"] or macos.TUNNEL_ANCHOR in call


def test_a_failing_relax_keeps_the_tunnel_blocked(booted: Mac) -> None:
    booted.fail(r"-a \S+/tunnel -f ")
    booted.handshake(("198.51.100.7:51820", NOW - 10))
    result = booted.run("check", expect=1)
    assert "stays blocked" in result.stderr
    assert booted.verdict(through_tunnel()) == "block"
    (booted.stub_dir / "fail").unlink()
    booted.run("check")
    assert booted.verdict(through_tunnel()) == "pass"  # control: the same probe once relax works


def test_a_failing_lock_blocks_everything_instead(booted: Mac) -> None:
    booted.run("relax")
    booted.fail(r"/tunnel -F rules")
    booted.run("lock", expect=1)
    assert booted.relaxed(), "the sub-anchor could not be flushed..."
    assert booted.verdict(through_tunnel()) == "block", "...but nothing calls it any more"
    assert booted.verdict(leak()) == "block"


def test_a_failing_pfctl_e_is_reported_and_never_disables(mac: Mac) -> None:
    mac.fail(r"^-E$")
    result = mac.run("start", expect=1)
    assert "pfctl -E failed" in result.stderr
    assert mac.model()["anchors"][macos.ANCHOR].strip()
    assert not [c for c in mac.changes() if "-d" in c or "-X" in c]


def test_a_failing_hook_never_empties_the_main_ruleset(mac: Mac) -> None:
    custom = "pass out quick on en0 inet proto udp from any to any port 123 no state\n"
    mac.set_model(main=custom)
    mac.fail(r"^-o none -R -f -$")
    mac.run("start", expect=1)
    assert mac.model()["main"] == custom
    mac.fail(r"^-s rules$")  # the main ruleset cannot even be read
    mac.run("check", expect=1)
    assert mac.model()["main"] == custom


def test_the_hook_keeps_scrub_rules_first(booted: Mac) -> None:
    main = 'scrub-anchor "x/*" all fragment reassemble\nanchor "x/*" all\n'
    booted.set_model(main=main)
    booted.run("check")
    assert ["pfctl", "-o", "none", "-R", "-f", "-"] in booted.changes()
    assert booted.hook_stdin().splitlines() == [
        'scrub-anchor "x/*" all fragment reassemble',
        f'scrub-anchor "{macos.ANCHOR}" all',
        f'anchor "{macos.ANCHOR}" all',
        'anchor "x/*" all',
    ]


# --- Issue 15: what a review found ------------------------------------------------------------


def test_the_job_never_runs_a_wg_found_on_path(booted: Mac) -> None:
    """Item 3: a `wg` planted in a user-writable directory on PATH (here the
    stubs' bin, first on PATH) never runs; the root-owned copy does."""
    booted.handshake(("198.51.100.7:51820", NOW - 10))
    booted.run("check")
    assert booted.relaxed(), "control: the handshake is seen through the installed copy"
    assert not [c for c in booted.calls() if c[0] == "trojan"]
    assert [c for c in booted.calls() if c[0] == "wg"] == [["wg", "show", "utun9", "dump"]]


BYPASSES = {
    # Only a scrub-anchor line mentions com.apple/*: the filter call is gone.
    "scrub-anchor only": 'scrub-anchor "com.apple/*" all fragment reassemble\n',
    # A quick pass ahead of the call decides before earlyfw's anchor.
    "quick pass first": (
        'scrub-anchor "com.apple/*" all fragment reassemble\npass out quick all no state\nanchor "com.apple/*" all\n'
    ),
    "earlyfw's own call, not first": f'pass out quick all no state\nanchor "{macos.ANCHOR}" all\n',
}


@pytest.mark.parametrize("main", BYPASSES.values(), ids=BYPASSES.keys())
def test_the_anchor_call_must_be_the_first_filter_rule(booted: Mac, main: str) -> None:
    """Item 4: a substring match for `anchor "com.apple/*"` was fooled."""
    booted.set_model(main=main)
    assert booted.verdict(leak()) == "pass"  # control: this main ruleset is open
    booted.run("check")
    assert booted.verdict(leak()) == "block"
    assert booted.verdict(to_endpoint()) == "pass"
    booted.forget_calls()
    booted.run("check")
    assert booted.changes() == [], "repaired once, then left alone"


def fragment_from_endpoint() -> Packet:
    return Packet(Direction.IN, "en0", ip("198.51.100.7"), ip("192.0.2.2"), "udp", 51820, 50000, fragment=True)


@pytest.mark.parametrize("main", [APPLE_MAIN, "pass out quick inet proto udp from any to any port 123 no state\n"])
def test_fragments_from_the_endpoint_are_reassembled_and_pass(booted: Mac, main: str) -> None:
    """Item 10: pf cannot see the ports of a fragment it has not reassembled;
    through Apple's scrub-anchor com.apple/* or earlyfw's own scrub-anchor."""
    booted.set_model(main=main)
    booted.run("check")
    assert booted.verdict(fragment_from_endpoint()) == "pass"
    leak_fragment = Packet(Direction.IN, "en0", ip("203.0.113.5"), ip("192.0.2.2"), "udp", 443, 50000, fragment=True)
    assert booted.verdict(leak_fragment) == "block"
    # Control: the same anchor without its scrub rule drops the fragment.
    anchors = {name: pf.parse(text) for name, text in booted.model()["anchors"].items()}
    anchors[macos.ANCHOR] = dataclasses.replace(anchors[macos.ANCHOR], scrubs=())
    rule = evaluate(pf.parse(booted.model()["main"]), fragment_from_endpoint(), anchors)
    assert rule is not None and rule.action is Action.BLOCK


STUB_SLEEP = r"""#!/bin/sh
# Virtual time: each sleep advances a clock (ms) instead of waiting. At
# $D/event_at another tool runs `pfctl -d`; once pf is enabled again the
# window is recorded and the watch loop (our parent) is stopped.
D=__STUB_DIR__
ms=$(awk -v s="$1" 'BEGIN { printf "%d", s * 1000 }')
before=$(cat "$D/vclock")
now=$((before + ms))
echo "$now" >"$D/vclock"
event=$(cat "$D/event_at")
if [ ! -e "$D/event_done" ] && [ "$now" -ge "$event" ]; then
	"$D/bin/pfctl" -d 2>/dev/null
	echo "$event" >"$D/event_done"
elif [ -e "$D/event_done" ] && [ "$(cat "$D/pf/enabled")" = 1 ]; then
	echo $((before - $(cat "$D/event_done"))) >"$D/window"
	kill "$PPID"
fi
[ "$now" -lt 60000 ] || kill "$PPID"
"""


def test_pf_disabled_behind_the_watchdog_is_back_within_a_quarter_second(mac: Mac) -> None:
    """Item 11, measured in virtual time: `pfctl -d` lands right after a
    full pass (the worst moment); the window is how long pf stays open until
    the loop's next action has enabled it again."""
    sleep = mac.stub_dir / "bin" / "sleep"
    sleep.write_text(STUB_SLEEP.replace("__STUB_DIR__", shlex.quote(str(mac.stub_dir))))
    sleep.chmod(0o755)
    (mac.stub_dir / "vclock").write_text("0\n")
    (mac.stub_dir / "event_at").write_text("1\n")  # during the first sleep after the boot pass
    mac.run("watch", expect=None)
    window = int((mac.stub_dir / "window").read_text())
    print(f"pf open for {window} ms of virtual time after pfctl -d")
    assert mac.model()["enabled"]
    assert window <= 250, f"pf stayed open for {window} ms"  # macos.FAST_INTERVAL


def test_a_stale_lock_is_taken_over_and_a_held_one_waited_for(booted: Mac) -> None:
    """relax, lock, the watchdog and the OpenVPN hooks run one at a time."""
    lock_dir = Path(booted.layout.run_dir, "lock")  # layout.lock_dir
    lock_dir.mkdir()
    (lock_dir / "pid").write_text("999999\n")  # a holder that died
    booted.run("relax")
    assert booted.relaxed() and not lock_dir.exists()
    holder = subprocess.Popen(["sleep", "30"])
    try:
        lock_dir.mkdir()
        (lock_dir / "pid").write_text(f"{holder.pid}\n")
        env = {"PATH": f"{booted.stub_dir / 'bin'}:/usr/bin:/bin", "LC_ALL": "C"}
        waiting = subprocess.Popen([*booted.shell, booted.layout.script, "lock"], env=env)
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=0.5)
        assert booted.relaxed(), "the lock waits for the holder"
        shutil.rmtree(lock_dir)
        assert waiting.wait(timeout=10) == 0
        assert not booted.relaxed()
    finally:
        holder.kill()
        holder.wait()
