"""The Windows handshake watcher's parsing and decisions, on Linux.

wg.exe answers through the RecordingRunner; the adapters (GetIfEntry2) and the
WFP changes are the recording BFE model's. On Windows the same loop runs from the
earlyfw-watch task: `Get-ScheduledTask earlyfw-watch` shows it Running, and
`netsh wfp show filters` lists the "earlyfw: permit tunnel" filters exactly
while `wg.exe show TUNNEL` reports a recent handshake.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from earlyfw import config as configuration
from earlyfw import handshake
from earlyfw.errors import EarlyfwError
from earlyfw.policy import State
from earlyfw.run import Result
from earlyfw.windows import engine, rules, watcher
from tests.configs import example_toml
from tests.recording_runner import RecordingRunner
from tests.wfp_model import Adapter, RecordingBfe

NOW = 1_760_000_000
LUID = 0x0035_0000_0009_0000
KEY = "hIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="


def config(kind: str = "wireguard", reject_after: int = 180) -> configuration.Config:
    return configuration.parse(example_toml(kind, extra=f"[watch]\nreject_after_seconds = {reject_after}\n"))


def dump(*peers: tuple[str, int]) -> str:
    lines = ["cGrivateKeyBase64=\tcHVibGljS2V5QmFzZTY0=\t51820\toff"]
    lines += [f"{KEY}\t(none)\t{endpoint}\t0.0.0.0/0,::/0\t{latest}\t1480\t1540\t25" for endpoint, latest in peers]
    return "\n".join(lines) + "\n"


def test_parse_dump() -> None:
    """wg.exe prints the same dump as Linux's wg: the Linux parser reads it."""
    peers = handshake.parse_wg_dump(dump(("198.51.100.7:51820", NOW - 5), ("[2001:db8::7]:51820", 0), ("(none)", 0)))
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
        watcher.wireguard_live(config(), text, NOW)


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
    assert watcher.wireguard_live(config(), dump((endpoint, latest)), NOW) is live


class World:
    """What wg.exe says, changeable between steps (the adapter's state is the
    BFE model's GetIfEntry2)."""

    def __init__(self) -> None:
        self.wg = Result(0, dump(("198.51.100.7:51820", 0)), "")

    def respond(self, argv: Sequence[str], _input: str | None) -> Result:
        assert argv[0] == watcher.wg_exe(), argv
        return self.wg


class Logged(watcher.Watcher):
    runner: RecordingRunner
    logs: list[str]


def make_watcher(
    cfg: configuration.Config, world: World, bfe: RecordingBfe, lock_path: Path | None = None
) -> tuple[Logged, list[str]]:
    logs: list[str] = []
    runner = RecordingRunner(respond=world.respond)
    extra = {"lock_path": lock_path} if lock_path else {}
    return Logged(cfg, runner, bfe, clock=lambda: NOW, log=logs.append, **extra), logs


def relaxed(bfe: RecordingBfe) -> bool:
    return bool({f.key for f in bfe.filters()} & rules.relax_keys())


def fresh(world: World, when: int = NOW - 3) -> None:
    world.wg = Result(0, dump(("198.51.100.7:51820", when)), "")


def test_the_watcher_relaxes_on_a_fresh_handshake_and_locks_when_it_goes_stale() -> None:
    cfg, world, bfe = config(), World(), RecordingBfe(aliases={"wg0": LUID})
    engine.install(bfe, cfg)
    w, logs = make_watcher(cfg, world, bfe)
    assert w.step() is State.BLOCKED and not relaxed(bfe)
    fresh(world)
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
    fresh(world, NOW - 400)
    assert w.step() is State.BLOCKED and not relaxed(bfe)
    assert logs == [f"relaxed (tunnel LUID {LUID:#x})", f"relaxed (tunnel LUID {LUID + 1:#x})", "blocked"]
    w.close()


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
    w, _logs = make_watcher(cfg, world, bfe)
    fresh(world)
    bfe.aliases["wg0"] = LUID
    assert w.step() is State.RELAXED
    world.wg = wg
    if not alias:
        bfe.aliases.clear()
    assert w.step() is State.BLOCKED and not relaxed(bfe)


def test_a_failed_relax_stays_blocked_and_is_retried() -> None:
    cfg, world, bfe = config(), World(), RecordingBfe(aliases={"wg0": LUID})
    w, logs = make_watcher(cfg, world, bfe)  # earlyfw's policy not installed: relax must fail
    fresh(world)
    assert w.step() is State.BLOCKED
    assert w.applied is None and "FWP_E_SUBLAYER_NOT_FOUND" in logs[-1]
    engine.install(bfe, cfg)
    assert w.step() is State.RELAXED and relaxed(bfe)


def test_openvpn_waits_for_the_adapter_to_be_up() -> None:
    cfg, world = config("openvpn"), World()
    bfe = RecordingBfe(aliases={"wg0": LUID}, adapters={LUID: Adapter(up=False)})
    engine.install(bfe, cfg)
    w, _logs = make_watcher(cfg, world, bfe)
    assert w.step() is State.BLOCKED
    bfe.adapters[LUID] = Adapter(up=True)
    assert w.step() is State.RELAXED and relaxed(bfe)
    assert w.runner.argvs() == [], "GetIfEntry2, not PowerShell"
    bfe.aliases.clear()
    assert w.step() is State.BLOCKED


def test_manual_tunnels_are_never_relaxed_by_the_watcher() -> None:
    cfg, world, bfe = config("manual"), World(), RecordingBfe(aliases={"wg0": LUID})
    engine.install(bfe, cfg)
    w, _logs = make_watcher(cfg, world, bfe)
    fresh(world)
    assert w.step() is State.BLOCKED
    assert w.runner.argvs() == []


def test_run_polls_at_the_interval_and_ends_its_session() -> None:
    cfg, world, bfe = config(), World(), RecordingBfe(aliases={"wg0": LUID})
    engine.install(bfe, cfg)
    w, _logs = make_watcher(cfg, world, bfe)
    fresh(world)
    sleeps: list[float] = []
    w.run(interval=2.5, iterations=3, sleep=sleeps.append)
    assert sleeps == [2.5, 2.5]
    assert [argv[1:] for argv in w.runner.argvs()] == [("show", "wg0", "dump")] * 3
    assert not relaxed(bfe) and bfe.handles == set(), "a watcher that stops leaves no permit behind"


# -- issue 15, item 6: the watcher trusts BFE, not its cache -----------------------------------


def test_a_killed_watcher_leaves_the_machine_blocked() -> None:
    """The permits live in the watcher's dynamic session: BFE deletes them
    when its process dies (kill, crash), as any error means blocked."""
    cfg, world, bfe = config(), World(), RecordingBfe(aliases={"wg0": LUID})
    engine.install(bfe, cfg)
    w, _logs = make_watcher(cfg, world, bfe)
    fresh(world)
    assert w.step() is State.RELAXED and relaxed(bfe)
    bfe.process_exit()
    assert not relaxed(bfe)
    assert {f.key for f in bfe.filters()} == {f.key for f in rules.install_set(cfg)}


@pytest.mark.parametrize("event", ["bfe restart", "windows apply", "lock from another session"])
def test_the_watcher_puts_the_relax_back_when_bfe_lost_it(event: str) -> None:
    """A lockout otherwise: the cache said relaxed while BFE held no permit."""
    cfg, world, bfe = config(), World(), RecordingBfe(aliases={"wg0": LUID})
    engine.install(bfe, cfg)
    w, logs = make_watcher(cfg, world, bfe)
    fresh(world)
    assert w.step() is State.RELAXED
    if event == "bfe restart":
        bfe.restart()
    elif event == "windows apply":
        engine.install(bfe, cfg)
    else:
        engine.lock(bfe)  # not recorded as an explicit lock: e.g. a script calling the API
    assert not relaxed(bfe)  # control: the event did remove the permits
    w.step()
    assert relaxed(bfe), logs
    w.close()


def test_an_explicit_lock_holds_until_a_fresh_handshake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, world, bfe = config(), World(), RecordingBfe(aliases={"wg0": LUID})
    record = watcher.lock_record(tmp_path / "earlyfw.toml")
    engine.install(bfe, cfg)
    w, _logs = make_watcher(cfg, world, bfe, lock_path=record)
    fresh(world, NOW - 3)
    assert w.step() is State.RELAXED
    record.write_text(f"{NOW - 1}\n")  # `earlyfw lock`, as the CLI records it
    engine.lock(bfe)
    for _ in range(3):
        assert w.step() is State.BLOCKED and not relaxed(bfe)
    fresh(world, NOW)  # the tunnel proves itself again
    assert w.step() is State.RELAXED
    w.close()


def test_an_explicit_lock_holds_openvpn_until_the_adapter_went_down(tmp_path: Path) -> None:
    cfg, world = config("openvpn"), World()
    bfe = RecordingBfe(aliases={"wg0": LUID})
    record = watcher.lock_record(tmp_path / "earlyfw.toml")
    engine.install(bfe, cfg)
    w, _logs = make_watcher(cfg, world, bfe, lock_path=record)
    assert w.step() is State.RELAXED
    record.write_text(f"{NOW}\n")
    engine.lock(bfe)
    assert w.step() is State.BLOCKED and w.step() is State.BLOCKED
    bfe.adapters[LUID] = Adapter(up=False)
    assert w.step() is State.BLOCKED
    bfe.adapters[LUID] = Adapter(up=True)
    assert w.step() is State.RELAXED
    w.close()


def test_the_watcher_refuses_to_relax_onto_a_nic() -> None:
    cfg, world = config(), World()
    nic = 0x0006_0000_0001_0000
    bfe = RecordingBfe(aliases={"wg0": nic}, adapters={nic: Adapter("Realtek PCIe GbE", hardware=True)})
    engine.install(bfe, cfg)
    w, logs = make_watcher(cfg, world, bfe)
    fresh(world)
    assert w.step() is State.BLOCKED and not relaxed(bfe)
    assert "is not a tunnel adapter" in logs[-1]


def test_the_log_file_is_bounded(tmp_path: Path) -> None:
    log = watcher.Log(tmp_path / "watcher.log", clock=lambda: NOW)
    log("relaxed")
    assert (tmp_path / "watcher.log").read_text().endswith(" relaxed\n")
    (tmp_path / "watcher.log").write_bytes(b"x" * (watcher.LOG_LIMIT + 1))
    log("blocked")
    assert (tmp_path / "watcher.log.1").stat().st_size == watcher.LOG_LIMIT + 1
    assert (tmp_path / "watcher.log").read_text().endswith(" blocked\n")


def test_a_lock_that_lands_between_decision_and_relax_wins(tmp_path: Path) -> None:
    """`earlyfw lock` between the watcher's decision and its relax: the lock
    record is re-read once the relax transaction holds BFE (transactions run
    one at a time), so the lock is not undone, not even until the next poll."""
    cfg, world, bfe = config(), World(), RecordingBfe(aliases={"wg0": LUID})
    record = watcher.lock_record(tmp_path / "earlyfw.toml")
    engine.install(bfe, cfg)
    w, logs = make_watcher(cfg, world, bfe, lock_path=record)
    fresh(world, NOW - 3)
    decide = w.wanted

    def racing() -> tuple[State, int | None]:
        wanted = decide()
        record.write_text(f"{NOW - 1}\n")  # what `earlyfw lock` does first...
        engine.lock(bfe)  # ...then its transaction
        return wanted

    w.wanted = racing  # type: ignore[method-assign]
    assert w.step() is State.BLOCKED and not relaxed(bfe)
    assert "an explicit lock came in meanwhile" in logs[-2]
    w.wanted = decide  # type: ignore[method-assign]
    assert w.step() is State.BLOCKED and not relaxed(bfe), "and it holds"
    w.close()
