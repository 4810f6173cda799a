"""The Windows handshake watcher's parsing and decisions, on Linux.

wg.exe and PowerShell answer through the RecordingRunner and the WFP changes
go to the recording BFE model. On Windows the same loop runs from the
earlyfw-watch task: `Get-ScheduledTask earlyfw-watch` shows it Running, and
`netsh wfp show filters` lists the "earlyfw: permit tunnel" filters exactly
while `wg.exe show TUNNEL` reports a recent handshake.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from earlyfw import config as configuration
from earlyfw.errors import EarlyfwError
from earlyfw.policy import State
from earlyfw.run import RecordingRunner, Result
from earlyfw.watch import sources
from earlyfw.wfp import engine, rules, watch
from earlyfw.wfp.recording import RecordingBfe

NOW = 1_760_000_000
LUID = 0x0035_0000_0009_0000
KEY = "hIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="


def config(kind: str = "wireguard", reject_after: int = 180) -> configuration.Config:
    return configuration.parse(
        f"""
[tunnel]
kind = "{kind}"
interface = "wg0"
[[endpoint]]
address = "198.51.100.7"
port = 51820
[[endpoint]]
address = "2001:db8::7"
port = 51820
[watch]
reject_after_seconds = {reject_after}
"""
    )


def dump(*peers: tuple[str, int]) -> str:
    lines = ["cGrivateKeyBase64=\tcHVibGljS2V5QmFzZTY0=\t51820\toff"]
    lines += [f"{KEY}\t(none)\t{endpoint}\t0.0.0.0/0,::/0\t{latest}\t1480\t1540\t25" for endpoint, latest in peers]
    return "\n".join(lines) + "\n"


def test_parse_dump() -> None:
    """wg.exe prints the same dump as Linux's wg: the Linux parser reads it."""
    peers = sources.parse_wg_dump(dump(("198.51.100.7:51820", NOW - 5), ("[2001:db8::7]:51820", 0), ("(none)", 0)))
    assert [(str(p.endpoint[0]) if p.endpoint else None, p.last_handshake) for p in peers] == [
        ("198.51.100.7", NOW - 5),
        ("2001:db8::7", None),
        (None, None),
    ]


@pytest.mark.parametrize(
    "text",
    ["", "garbage\n", dump().replace("\toff", ""), dump(("198.51.100.7:51820", 5)).replace("\t5\t", "\tsoon\t")],
)
def test_parse_dump_refuses_what_it_does_not_understand(text: str) -> None:
    with pytest.raises(EarlyfwError):
        watch.wireguard_live(config(), text, NOW)


@pytest.mark.parametrize(
    ("endpoint", "age", "live"),
    [
        ("198.51.100.7:51820", 5, True),
        ("[2001:db8::7]:51820", 179, True),
        ("198.51.100.7:51820", 180, False),  # reject_after_seconds reached
        ("198.51.100.7:51820", None, False),  # never
        ("198.51.100.8:51820", 5, False),  # not a configured endpoint
        ("198.51.100.7:51821", 5, False),
        ("198.51.100.7:51820", -30, False),  # from the future: a clock jump, not proof
    ],
)
def test_wireguard_liveness(endpoint: str, age: int | None, live: bool) -> None:
    latest = 0 if age is None else NOW - age
    assert watch.wireguard_live(config(), dump((endpoint, latest)), NOW) is live


class World:
    """What wg.exe and PowerShell say, changeable between steps."""

    def __init__(self) -> None:
        self.wg = Result(0, dump(("198.51.100.7:51820", 0)), "")
        self.adapter = Result(0, "Disconnected\r\n", "")

    def respond(self, argv: Sequence[str], _input: str | None) -> Result:
        return self.adapter if argv[0] == "powershell.exe" else self.wg


class Logged(watch.Watcher):
    runner: RecordingRunner
    logs: list[str]


def watcher(cfg: configuration.Config, world: World, bfe: RecordingBfe) -> tuple[Logged, list[str]]:
    logs: list[str] = []
    runner = RecordingRunner(respond=world.respond)
    return Logged(cfg, runner, bfe, clock=lambda: NOW, log=logs.append), logs


def relaxed(bfe: RecordingBfe) -> bool:
    return bool({f.key for f in bfe.filters()} & rules.relax_keys())


def test_the_watcher_relaxes_on_a_fresh_handshake_and_locks_when_it_goes_stale() -> None:
    cfg, world, bfe = config(), World(), RecordingBfe(aliases={"wg0": LUID})
    engine.install(bfe, cfg)
    w, logs = watcher(cfg, world, bfe)
    assert w.step() is State.BLOCKED and not relaxed(bfe)
    world.wg = Result(0, dump(("198.51.100.7:51820", NOW - 3)), "")
    assert w.step() is State.RELAXED and relaxed(bfe)
    luids = {c.value for f in bfe.filters() for c in f.conditions if c.field == rules.Field.LOCAL_INTERFACE.key}
    assert luids == {LUID}
    transactions = bfe.names().count("FwpmTransactionBegin0")
    assert w.step() is State.RELAXED
    assert bfe.names().count("FwpmTransactionBegin0") == transactions, "no change, no transaction"
    bfe.aliases["wg0"] = LUID + 1  # the tunnel restarted: a new adapter
    assert w.step() is State.RELAXED
    assert {c.value for f in bfe.filters() for c in f.conditions if c.field == rules.Field.LOCAL_INTERFACE.key} == {
        LUID + 1
    }
    world.wg = Result(0, dump(("198.51.100.7:51820", NOW - 400)), "")
    assert w.step() is State.BLOCKED and not relaxed(bfe)
    assert logs == ["blocked", f"relaxed (tunnel LUID {LUID:#x})", f"relaxed (tunnel LUID {LUID + 1:#x})", "blocked"]


@pytest.mark.parametrize(
    ("wg", "alias"),
    [
        (Result(1, "", "Unable to access interface: The system cannot find the file specified.\n"), True),
        (Result(0, "this is not a dump\n", ""), True),
        (Result(0, dump(("198.51.100.7:51820", NOW - 3)), ""), False),  # no adapter by that name
    ],
    ids=["wg-fails", "garbage", "no-adapter"],
)
def test_anything_odd_locks(wg: Result, alias: bool) -> None:
    cfg, world = config(), World()
    bfe = RecordingBfe(aliases={"wg0": LUID} if alias else {})
    engine.install(bfe, cfg)
    w, _logs = watcher(cfg, world, bfe)
    world.wg = Result(0, dump(("198.51.100.7:51820", NOW - 3)), "")
    bfe.aliases["wg0"] = LUID
    assert w.step() is State.RELAXED
    world.wg = wg
    if not alias:
        bfe.aliases.clear()
    assert w.step() is State.BLOCKED and not relaxed(bfe)


def test_a_failed_relax_stays_blocked_and_is_retried() -> None:
    cfg, world, bfe = config(), World(), RecordingBfe(aliases={"wg0": LUID})
    w, logs = watcher(cfg, world, bfe)  # earlyfw's policy not installed: relax must fail
    world.wg = Result(0, dump(("198.51.100.7:51820", NOW - 3)), "")
    assert w.step() is State.BLOCKED
    assert w.applied is None and "FWP_E_SUBLAYER_NOT_FOUND" in logs[-1]
    engine.install(bfe, cfg)
    assert w.step() is State.RELAXED and relaxed(bfe)


def test_openvpn_waits_for_the_adapter_to_be_up() -> None:
    cfg, world, bfe = config("openvpn"), World(), RecordingBfe(aliases={"wg0": LUID})
    engine.install(bfe, cfg)
    w, _logs = watcher(cfg, world, bfe)
    assert w.step() is State.BLOCKED
    world.adapter = Result(0, "Up\r\n", "")
    assert w.step() is State.RELAXED and relaxed(bfe)
    argv = w.runner.argvs()[-1]
    assert argv[:4] == ("powershell.exe", "-NoProfile", "-NonInteractive", "-Command")
    assert "Get-NetAdapter -Name 'wg0'" in argv[4]
    world.adapter = Result(1, "", "Get-NetAdapter : No MSFT_NetAdapter objects found\r\n")
    assert w.step() is State.BLOCKED


def test_manual_tunnels_are_never_relaxed_by_the_watcher() -> None:
    cfg, world, bfe = config("manual"), World(), RecordingBfe(aliases={"wg0": LUID})
    engine.install(bfe, cfg)
    w, _logs = watcher(cfg, world, bfe)
    world.wg = Result(0, dump(("198.51.100.7:51820", NOW - 3)), "")
    assert w.step() is State.BLOCKED
    assert w.runner.argvs() == []


def test_run_polls_at_the_interval() -> None:
    cfg, world, bfe = config(), World(), RecordingBfe(aliases={"wg0": LUID})
    engine.install(bfe, cfg)
    w, _logs = watcher(cfg, world, bfe)
    sleeps: list[float] = []
    w.run(interval=2.5, iterations=3, sleep=sleeps.append)
    assert sleeps == [2.5, 2.5]
    assert [argv[1:] for argv in w.runner.argvs()] == [("show", "wg0", "dump")] * 3
