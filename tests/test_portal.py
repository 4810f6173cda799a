"""Captive-portal windows (issue 13, part 1), the parts without a kernel:
which resolvers count as the network's, where the cgroup tree must be, what
a window request may hold, the nft it becomes, and the watcher's bookkeeping.
The real packets are in tests/test_portal_netns.py."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from earlyfw import policy
from earlyfw.config import Config, Endpoint, TunnelKind
from earlyfw.errors import ConfigError, EarlyfwError
from earlyfw.linux import portal, window
from earlyfw.policy import State

CGROUP = "unified/earlyfw-portal/w0123456789ab"


def config(*, dns: tuple[str, ...] = (), allow: bool = True) -> Config:
    return Config(
        tunnel_kind=TunnelKind.WIREGUARD,
        interface="wg0",
        endpoints=(Endpoint(ipaddress.ip_address("198.51.100.7"), 51820),),
        dns_servers=tuple(ipaddress.ip_address(a) for a in dns),
        portal_allow=allow,
    )


# --- the network's resolvers -----------------------------------------------------------------


def test_nameservers_as_glibc_reads_them() -> None:
    text = "# comment\nsearch hotel.example\nnameserver 192.0.2.53\nnameserver fe80::1%wlan0\n  nameserver bogus\n"
    text += "nameserver 0.0.0.0\nnameserver ff02::1\nnameserver 2001:db8::53\noptions edns0\n"
    assert portal.nameservers(text) == [ipaddress.ip_address("192.0.2.53"), ipaddress.ip_address("2001:db8::53")]


def test_the_first_source_with_a_network_resolver_wins(tmp_path: Path) -> None:
    """resolved's stub (loopback) and the VPN's own resolver are not the
    network's: the next source is asked."""
    stub, manager, etc = tmp_path / "resolved", tmp_path / "nm", tmp_path / "etc"
    stub.write_text("nameserver 127.0.0.53\n")
    manager.write_text("nameserver 10.64.0.1\nnameserver 192.0.2.53\nnameserver 192.0.2.53\n")
    etc.write_text("nameserver 198.51.100.53\n")
    found = portal.network_resolvers(config(dns=("10.64.0.1",)), (tmp_path / "missing", stub, manager, etc))
    assert found == (ipaddress.ip_address("192.0.2.53"),)


def test_no_network_resolver_is_one_error_naming_the_way_out(tmp_path: Path) -> None:
    only = tmp_path / "resolv.conf"
    only.write_text("nameserver 127.0.0.53\n")
    with pytest.raises(EarlyfwError, match="cannot tell which resolvers") as error:
        portal.network_resolvers(config(), (only,))
    assert error.value.hint is not None and "--dns" in error.value.hint


@pytest.mark.parametrize(("value", "message"), [("127.0.0.53", "loopback"), ("resolver.example", "hostname")])
def test_given_resolvers_are_checked(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        portal.given_resolvers([value])


# --- the cgroup tree -------------------------------------------------------------------------

UNIFIED = "30 24 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
HYBRID = "35 25 0:30 / /sys/fs/cgroup/unified rw shared:9 - cgroup2 cgroup2 rw\n"


@pytest.mark.parametrize(("mountinfo", "mount"), [(UNIFIED, "/sys/fs/cgroup"), (HYBRID, "/sys/fs/cgroup/unified")])
def test_the_cgroup2_tree_is_found(mountinfo: str, mount: str) -> None:
    other = "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
    assert portal.cgroup2_mount(other + mountinfo) == Path(mount)


@pytest.mark.parametrize(
    ("mountinfo", "message"),
    [
        (UNIFIED.replace(" / /sys", " /user.slice /sys"), "cgroup namespace"),
        (UNIFIED.replace("/sys/fs/cgroup", "/mnt/cg"), "nft reads cgroups under"),
        ("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n", "no cgroup v2 tree"),
    ],
)
def test_an_unusable_cgroup_tree_is_refused(mountinfo: str, message: str) -> None:
    with pytest.raises(EarlyfwError, match=message):
        portal.cgroup2_mount(mountinfo)


# --- a window: what it may hold and the nft it becomes -------------------------------------


def a_window(**change: Any) -> window.Window:
    fields: dict[str, Any] = {
        "cgroup": CGROUP,
        "seconds": 300,
        "resolvers": (ipaddress.ip_address("192.0.2.53"), ipaddress.ip_address("2001:db8::53")),
    }
    return window.Window(**{**fields, **change})


@given(st.text(max_size=80))
def test_only_a_portal_cgroup_path_is_ever_a_window(path: str) -> None:
    """Whatever string a request carries, it reaches nft only if it is the
    mount, the parent and a window name: no quote, no space, no `..`."""
    try:
        made = a_window(cgroup=path)
    except ConfigError:
        return
    assert made.cgroup == path and window.PARENT in path
    assert not set(path) & set("\"'; {}\n\\ ") and ".." not in path


@pytest.mark.parametrize("seconds", [0, policy.PORTAL_MIN_SECONDS - 1, int(policy.PORTAL_MAX_MINUTES * 60) + 1])
def test_a_window_length_out_of_range_is_refused(seconds: int) -> None:
    with pytest.raises(ConfigError, match="outside"):
        a_window(seconds=seconds)


@pytest.mark.parametrize(
    "data",
    [
        None,
        {"cgroup": CGROUP, "seconds": 300},
        {"cgroup": CGROUP, "seconds": True, "resolvers": []},
        {"cgroup": CGROUP, "seconds": 300, "resolvers": "192.0.2.53"},
        {"cgroup": CGROUP, "seconds": 300, "resolvers": ["192.0.2.0/24"]},
        {"cgroup": CGROUP, "seconds": 300, "resolvers": [], "extra": 1},
    ],
)
def test_a_request_is_checked_field_by_field(data: object) -> None:
    with pytest.raises(ConfigError):
        window.Window.from_json(data)


def test_a_window_round_trips_and_becomes_one_transaction() -> None:
    made = a_window(seconds=90)
    assert window.Window.from_json(json.loads(json.dumps(made.to_json()))) == made
    script = made.open_script([("inet", "earlyfw"), ("inet", "earlyfw_guard"), ("netdev", "earlyfw_egress")])
    assert script == (
        f'add element inet earlyfw portal_web {{ "{CGROUP}" timeout 90s }}\n'
        f'add element inet earlyfw portal_dns_v4 {{ "{CGROUP}" . 192.0.2.53 timeout 90s }}\n'
        f'add element inet earlyfw portal_dns_v6 {{ "{CGROUP}" . 2001:db8::53 timeout 90s }}\n'
        f'add element inet earlyfw_guard portal_web {{ "{CGROUP}" timeout 90s }}\n'
        f'add element inet earlyfw_guard portal_dns_v4 {{ "{CGROUP}" . 192.0.2.53 timeout 90s }}\n'
        f'add element inet earlyfw_guard portal_dns_v6 {{ "{CGROUP}" . 2001:db8::53 timeout 90s }}\n'
        "add element netdev earlyfw_egress portal_web { 80 timeout 90s, 443 timeout 90s }\n"
        "add element netdev earlyfw_egress portal_dns_v4 { 192.0.2.53 timeout 90s }\n"
        "add element netdev earlyfw_egress portal_dns_v6 { 2001:db8::53 timeout 90s }\n"
    )
    assert window.close_script([("inet", "earlyfw")]) == (
        "flush set inet earlyfw portal_web\n"
        "flush set inet earlyfw portal_dns_v4\n"
        "flush set inet earlyfw portal_dns_v6\n"
    )


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("allow", [True, False])
def test_window_sets_exist_only_while_blocked_with_portal_allowed(state: State, allow: bool) -> None:
    cfg = config(allow=allow)
    script = policy.render(cfg, state)
    expected = allow and state is State.BLOCKED
    assert ("set portal_web {" in script) is expected
    assert ("socket cgroupv2 level 2 @portal_web tcp dport { 80, 443 } accept" in script) is expected


LISTING = f"""table inet earlyfw {{
\tset portal_web {{
\t\ttype cgroupsv2
\t\tflags timeout
\t\telements = {{ "{CGROUP}" timeout 5m expires 4m59s }}
\t}}
\tset endpoints_v4 {{
\t\ttype ipv4_addr . inet_proto . inet_service
\t\telements = {{ 198.51.100.7 . udp . 51820 }}
\t}}
}}"""


def test_window_elements_are_not_part_of_the_state() -> None:
    bare = window.without_windows(LISTING)
    assert bare is not None and CGROUP not in bare and "198.51.100.7 . udp . 51820" in bare
    assert window.open_in(LISTING) and window.open_in(LISTING, CGROUP)
    assert not window.open_in(LISTING, "unified/earlyfw-portal/wffffffffffff") and not window.open_in(bare)


# --- the watcher's side -------------------------------------------------------------------------


class FakeRuleset:
    def __init__(self) -> None:
        self.changes = 0
        self.scripts: list[str] = []

    def portal_tables(self) -> list[tuple[str, str]]:
        return [("inet", "earlyfw"), ("inet", "earlyfw_guard")]

    def run_portal(self, script: str) -> None:
        self.scripts.append(script)


def ask(directory: Path, request: dict[str, Any], mode: int = 0o600) -> None:
    path = directory / "portal-wg0.json"
    path.write_text(json.dumps(request))
    path.chmod(mode)


@pytest.fixture
def watcher_side(tmp_path: Path) -> tuple[window.WatcherPortal, FakeRuleset, list[str]]:
    if os.geteuid() != 0:
        pytest.fail("the request must be a root-owned file: run as root, as CI does", pytrace=False)
    lines: list[str] = []
    return window.WatcherPortal("wg0", tmp_path, lines.append), FakeRuleset(), lines


def test_the_watcher_opens_one_window_and_says_when_it_closes(
    tmp_path: Path, watcher_side: tuple[window.WatcherPortal, FakeRuleset, list[str]]
) -> None:
    side, rules, lines = watcher_side
    ask(tmp_path, {"action": "open", "id": "a", "pid": 7, "window": a_window(seconds=60).to_json()})
    side.handle(rules, State.BLOCKED, config(), wall=1000.0, now=10.0)
    assert side.answer == {"id": "a", "ok": True, "error": None, "at": 1000.0}
    assert rules.scripts and "earlyfw_guard portal_web" in rules.scripts[0]
    assert side.due() == 70.0 and side.published()["open"]["until"] == 1060.0
    assert not (tmp_path / "portal-wg0.json").exists(), "a request is read once"

    ask(tmp_path, {"action": "open", "id": "b", "window": a_window(cgroup="earlyfw-portal/w000000000000").to_json()})
    side.handle(rules, State.BLOCKED, config(), wall=1001.0, now=11.0)
    assert side.answer is not None and not side.answer["ok"] and "open already" in side.answer["error"]

    assert not side.tick(rules, State.BLOCKED, 69.0)
    assert side.tick(rules, State.BLOCKED, 70.0)
    assert lines[-1] == f"portal: closed (timed out after 60 s): {CGROUP}"
    assert side.published()["open"] is None


def test_any_change_of_the_ruleset_closes_the_window(
    tmp_path: Path, watcher_side: tuple[window.WatcherPortal, FakeRuleset, list[str]]
) -> None:
    side, rules, lines = watcher_side
    ask(tmp_path, {"action": "open", "id": "a", "window": a_window().to_json()})
    side.handle(rules, State.BLOCKED, config(), wall=0.0, now=0.0)
    rules.changes += 1  # a relax, a lock, a repair, a reload
    assert side.tick(rules, State.RELAXED, 1.0)
    assert lines[-1] == f"portal: closed (the ruleset was replaced, now relaxed): {CGROUP}"


def test_the_command_exiting_closes_it_through_the_watcher(
    tmp_path: Path, watcher_side: tuple[window.WatcherPortal, FakeRuleset, list[str]]
) -> None:
    side, rules, lines = watcher_side
    ask(tmp_path, {"action": "open", "id": "a", "window": a_window().to_json()})
    side.handle(rules, State.BLOCKED, config(), wall=0.0, now=0.0)
    ask(tmp_path, {"action": "close", "id": "b", "cgroup": CGROUP, "why": "exited"})
    side.handle(rules, State.BLOCKED, config(), wall=1.0, now=1.0)
    assert rules.scripts[-1].startswith("flush set inet earlyfw portal_web\n")
    assert lines[-1] == f"portal: closed (its command exited): {CGROUP}" and side.opened is None


@pytest.mark.parametrize(
    ("state", "allow", "mode", "message"),
    [
        (State.RELAXED, True, 0o600, "only while blocked"),
        (State.BLOCKED, False, 0o600, r"\[portal\] allow"),
        (State.BLOCKED, True, 0o666, "only root can write"),
    ],
)
def test_the_watcher_refuses_what_it_must(  # noqa: PLR0917  (parametrized)
    tmp_path: Path,
    watcher_side: tuple[window.WatcherPortal, FakeRuleset, list[str]],
    state: State,
    allow: bool,
    mode: int,
    message: str,
) -> None:
    side, rules, lines = watcher_side
    ask(tmp_path, {"action": "open", "id": "a", "window": a_window().to_json()}, mode)
    side.handle(rules, state, config(allow=allow), wall=0.0, now=0.0)
    assert side.answer is not None and not side.answer["ok"]
    assert rules.scripts == [] and side.opened is None
    assert lines[-1].startswith("portal: refused: ")
    assert re.search(message, side.answer["error"])


# --- who the command runs as ------------------------------------------------------------------


def test_the_command_runs_as_the_sudo_user() -> None:
    invoker = portal.Invoker.from_environment({"SUDO_UID": "65534", "SUDO_GID": "65534", "HOME": "/root"})
    assert (invoker.uid, invoker.gid) == (65534, 65534)
    assert invoker.env["HOME"] != "/root" and invoker.env["USER"] == "nobody"
    assert portal.Invoker.from_environment({}).uid == 0
    with pytest.raises(EarlyfwError, match="not numbers"):
        portal.Invoker.from_environment({"SUDO_UID": "0; rm", "SUDO_GID": "0"})


def test_status_reads_the_window_from_a_plain_listing() -> None:
    """What `earlyfw status` shows of a window comes from the kernel's listing
    (its expiry), so it holds also after a kill -9 of earlyfw portal."""
    listing = (
        "table inet earlyfw {\n\tset portal_web {\n\t\ttype cgroupsv2\n\t\tflags timeout\n"
        '\t\telements = { "earlyfw-portal/w0123456789ab" timeout 5m expires 4m1s500ms }\n\t}\n}\n'
    )
    assert window.listed_window(listing, now=1000.0) == {
        "cgroup": "earlyfw-portal/w0123456789ab",
        "seconds": 300,
        "remaining_seconds": 241.5,
        "closes_at": 1241.5,
    }
    empty = "table inet earlyfw {\n\tset portal_web {\n\t\ttype cgroupsv2\n\t\tflags timeout\n\t}\n}\n"
    assert window.listed_window(empty, now=1000.0) is None
    assert window.duration("1h2m3s4ms") == 3723.004
    with pytest.raises(ValueError, match="not an nft duration"):
        window.duration("5 minutes")
