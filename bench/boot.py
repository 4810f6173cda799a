"""Boot figures for earlyfw's Linux boot protection, from real QEMU TCG boots.

For each initramfs generator, boots three guests alternately, several times
each, and prints medians:

- none: the guest with no kill switch;
- anchor: the anchor's approach (Mullvad's early-boot unit): a oneshot systemd
  unit loading the same blocked ruleset (earlyfw's blocked.nft) before
  network-pre.target, nothing in the initramfs;
- earlyfw: the initramfs hook, earlyfw-block.service and the rest.

Figures: boot to login (guest uptime); block live (earlyfw: its initramfs
hook's kernel log line; the anchor: systemd's "Finished" for its unit) against
the moment virtio_net registered the NIC; initramfs growth; the first packet
the guest sent. Goals: earlyfw's boot to login at most the anchor's + 1 %,
its block live before the NIC on every boot, initramfs growth under 2 MB.

`--wireguard` boots the WireGuard guest with earlyfw (watcher included) and
the same guest without earlyfw, alternately, and reports how fast the
watcher is ready after its unit starts, the first handshake to the relax,
and earlyfw's delay to the first packet through the tunnel; wg0 has no
keepalive, so also how soon after wg0 came up the watcher's kick relaxed it.
Goals: 1 s, 100 ms, 100 ms, 1 s. Then where the time went: the boot's milestones on the way to
the tunnel (kernel and systemd logs, the capture), both guests side by side.

By default the guests run with QEMU's instruction counter as their clock
(-icount shift=0: one instruction is one nanosecond, a 1-GIPS CPU; one vCPU):
a boot's length is then mostly the guest's own work, nearly the same on an
idle laptop and on a CI runner shared with other jobs (boots repeat within
1%). `--clock host` boots exactly as the proof does (two vCPUs,
multi-threaded TCG, host time), where a busy host moves boot times by 10-20%.

    python3 bench/boot.py                 # 5 boots of each of the 6 guests
    python3 bench/boot.py --boots 3 --generator initramfs-tools
    python3 bench/boot.py --wireguard --boots 3
    python3 bench/boot.py --clock host

Results also go to bench/out/boot-CLOCK.json (boot-wireguard-CLOCK.json);
the exit status is 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemu import boot, guest, handshake, proof
from qemu.base import GuestGenerator
from qemu.guest import Change

OUT = Path(__file__).resolve().parent / "out"
MAX_OVER_ANCHOR = 0.01
MAX_GROWTH = 2 * 1000 * 1000
UNITS = ("earlyfw-initrd.service", "earlyfw-block.service")
WATCH_UNIT = "earlyfw-watch.service"
MAX_WATCHER_READY = 1.0
MAX_RELAX = 0.1
MAX_TUNNEL_DELAY = 0.1
MAX_UP_TO_RELAXED = 1.0
# The WireGuard boot's way to its first packet through the tunnel: (label,
# unit and "start"/"end" from systemd's lines, or a figure of handshake.figures).
KERNEL_MILESTONES = (
    ("initramfs runs /init", re.compile(r"Run /init as init process")),
    ("earlyfw's block live (initramfs hook)", boot.BLOCK_LIVE),
    ("virtio_net registered the NIC", boot.NIC_REGISTERED),
    ("systemd starts in the real root", re.compile(r"systemd\[1\]: systemd \S+ running in system mode")),
)
UNIT_MILESTONES = (
    ("earlyfw-block.service starting", "earlyfw-block.service", "start"),
    ("earlyfw-block.service finished", "earlyfw-block.service", "end"),
    ("earlyfw-watch.service starting", WATCH_UNIT, "start"),
    ("earlyfw-watch.service ready", WATCH_UNIT, "end"),
    ("systemd-udevd.service started", "systemd-udevd.service", "end"),
    ("systemd-networkd.service starting", "systemd-networkd.service", "start"),
    ("systemd-networkd.service started", "systemd-networkd.service", "end"),
    ("network-online.target", "network-online.target", "end"),
    ("wg-quick@wg0.service starting", "wg-quick@wg0.service", "start"),
    ("wg-quick@wg0.service finished", "wg-quick@wg0.service", "end"),
)
CAPTURE_MILESTONES = (
    ("first handshake initiation", "first_initiation_uptime_s"),
    ("first handshake response", "first_response_uptime_s"),
    ("watcher relaxed", "relaxed_uptime_s"),
    ("first packet through the tunnel", "first_tunnelled_uptime_s"),
)


@dataclass
class Series:
    """Every boot of one guest."""

    variant: guest.Variant
    login: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    block_live: list[float] = field(default_factory=list)
    nic: list[float] = field(default_factory=list)
    first_packet: list[float] = field(default_factory=list)
    leaks: list[int] = field(default_factory=list)
    block_first: list[bool] = field(default_factory=list)
    # How long systemd took to start each earlyfw unit (the boot's direct cost).
    units: dict[str, list[float]] = field(default_factory=dict)
    initrd_bytes: int = 0

    @property
    def blocks(self) -> bool:
        return self.variant.earlyfw or self.variant.change is Change.ANCHOR

    def add(self, verdict: proof.Verdict) -> None:
        o = verdict.outcome
        r, c = o.report, o.capture
        if r.login_uptime is None or o.wall_to_login is None:
            raise SystemExit(f"{self.variant.name}: the guest never reached login; see {o.run_dir}")
        self.login.append(r.login_uptime)
        self.wall.append(o.wall_to_login)
        self.leaks.append(len(c.leaks))
        self.initrd_bytes = o.image.initrd_bytes
        if c.first_packet is not None:
            self.first_packet.append(c.first_packet)
        if r.nic_registered is not None:
            self.nic.append(r.nic_registered)
        if not self.blocks:
            return
        if self.variant.change is Change.ANCHOR:
            live = r.unit_times(proof.ANCHOR_UNIT).get("end")
        else:
            live = r.block_live
            for unit in UNITS:
                seconds = r.unit_seconds(unit)
                if seconds is not None:
                    self.units.setdefault(unit, []).append(seconds)
        if live is not None:
            self.block_live.append(live)
        self.block_first.append(live is not None and r.nic_registered is not None and live < r.nic_registered)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def show(value: float | None, unit: str = "s") -> str:
    return "-" if value is None else f"{value:.2f} {unit}"


def boot_alternately(series: Sequence[Series | TunnelSeries], boots: int, icount: int | None) -> None:
    for i in range(boots):
        # Alternate, so a busy spell on the machine hits every guest alike.
        for one in series:
            verdict = proof.run(one.variant, runs=proof.RUNS / "bench", tag=f"-{i}", icount=icount)
            one.add(verdict)
            o = verdict.outcome
            login = "-" if o.report.login_uptime is None else f"{o.report.login_uptime:.2f}"
            wall = "-" if o.wall_to_login is None else f"{o.wall_to_login:.2f}"
            failed = "" if verdict.passed else f" (FAILED: {'; '.join(verdict.problems)})"
            print(
                f"  {one.variant.name:24} boot {i + 1}/{boots}: login {login} s uptime, {wall} s wall, "
                f"{len(o.capture.leaks)} leaked{failed}",
                flush=True,
            )


def compare(generator: GuestGenerator, boots: int, icount: int | None) -> dict[str, object]:
    none = Series(guest.VARIANTS[f"control-{generator}"])
    anchor = Series(guest.VARIANTS[f"anchor-{generator}"])
    earlyfw = Series(guest.VARIANTS[str(generator)])
    boot_alternately([none, anchor, earlyfw], boots, icount)
    login = {name: median(s.login) for name, s in (("none", none), ("anchor", anchor), ("earlyfw", earlyfw))}
    assert all(v is not None for v in login.values())
    l_none, l_anchor, l_earlyfw = (login[k] or 0.0 for k in ("none", "anchor", "earlyfw"))
    over_anchor = (l_earlyfw - l_anchor) / l_anchor
    growth = earlyfw.initrd_bytes - none.initrd_bytes
    first = {name: sum(s.block_first) for name, s in (("anchor", anchor), ("earlyfw", earlyfw))}
    result: dict[str, object] = {
        "generator": str(generator),
        "boots": boots,
        "login_uptime_median_s": login,
        "wall_to_login_median_s": {
            "none": median(none.wall),
            "anchor": median(anchor.wall),
            "earlyfw": median(earlyfw.wall),
        },
        "earlyfw_over_anchor": round(over_anchor, 4),
        "earlyfw_over_none": round((l_earlyfw - l_none) / l_none, 4),
        "anchor_over_none": round((l_anchor - l_none) / l_none, 4),
        "block_live_median_s": {"anchor": median(anchor.block_live), "earlyfw": median(earlyfw.block_live)},
        "nic_registered_median_s": {
            "none": median(none.nic),
            "anchor": median(anchor.nic),
            "earlyfw": median(earlyfw.nic),
        },
        "block_before_nic_boots": {k: f"{v}/{boots}" for k, v in first.items()},
        "first_packet_median_s": {
            "none": median(none.first_packet),
            "anchor": median(anchor.first_packet),
            "earlyfw": median(earlyfw.first_packet),
        },
        "leaked_packets_per_boot": {"none": none.leaks, "anchor": anchor.leaks, "earlyfw": earlyfw.leaks},
        "initrd_bytes": {"none": none.initrd_bytes, "earlyfw": earlyfw.initrd_bytes, "growth": growth},
        "targets_met": {
            "block_before_nic_every_boot": first["earlyfw"] == len(earlyfw.block_first) == boots,
            "at_most_anchor_plus_1_percent": over_anchor <= MAX_OVER_ANCHOR,
            "initrd_growth_under_2_MB": growth < MAX_GROWTH,
        },
        "unit_seconds_median": {unit: median(times) for unit, times in earlyfw.units.items()},
        "all_login_uptimes_s": {"none": none.login, "anchor": anchor.login, "earlyfw": earlyfw.login},
    }
    print(f"\n{generator}: medians over {boots} boots of each guest")
    for name, s in (("none", none), ("anchor", anchor), ("earlyfw", earlyfw)):
        live = (
            f", block live {show(median(s.block_live))}, before the NIC {sum(s.block_first)}/{boots}"
            if s.blocks
            else ""
        )
        print(
            f"  {name:8} login {show(median(s.login))} ({', '.join(f'{x:.2f}' for x in s.login)}), "
            f"NIC {show(median(s.nic))}{live}, leaked {s.leaks}"
        )
    print(f"  earlyfw against the anchor        {over_anchor * 100:+.2f}% (goal <= +{MAX_OVER_ANCHOR * 100:.0f}%)")
    print(
        f"  earlyfw / anchor against none    {(l_earlyfw - l_none) / l_none * 100:+.2f}% / "
        f"{(l_anchor - l_none) / l_none * 100:+.2f}%"
    )
    print(
        f"  initramfs                        {none.initrd_bytes / 1e6:.2f} MB -> "
        f"{earlyfw.initrd_bytes / 1e6:.2f} MB (+{growth / 1e6:.2f} MB, goal < {MAX_GROWTH / 1e6:.0f} MB)"
    )
    for unit, times in sorted(earlyfw.units.items()):
        print(f"  {unit + ' took':32} {show(median(times))} (start to finish, as systemd logged it)")
    return result


@dataclass
class TunnelSeries:
    """Every boot of one WireGuard guest: the figures handshake.figures reads."""

    variant: guest.Variant
    login: list[float] = field(default_factory=list)
    figures: list[dict[str, Any]] = field(default_factory=list)
    watcher_ready: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    # Each boot's milestones (label: guest uptime).
    milestones: list[dict[str, float]] = field(default_factory=list)

    def add(self, verdict: proof.Verdict) -> None:
        o = verdict.outcome
        if o.report.login_uptime is not None:
            self.login.append(o.report.login_uptime)
        if not verdict.passed:
            self.failed.append("; ".join(verdict.problems))
        self.figures.append(handshake.figures(self.variant.watch, o))
        ready = o.report.unit_seconds(WATCH_UNIT)
        if ready is not None:
            self.watcher_ready.append(ready)
        self.milestones.append(milestones(o.report, self.figures[-1]))

    def milestone(self, label: str) -> float | None:
        return median([m[label] for m in self.milestones if label in m])

    def values(self, name: str) -> list[float]:
        return [f[name] for f in self.figures if f.get(name) is not None]


def milestones(report: boot.GuestReport, figures: dict[str, Any]) -> dict[str, float]:
    found: dict[str, float] = {}
    for label, pattern in KERNEL_MILESTONES:
        line = report.first(pattern)
        if line is not None:
            found[label] = line.uptime
    for label, unit, which in UNIT_MILESTONES:
        when = report.unit_times(unit).get(which)
        if when is not None:
            found[label] = when
    for label, name in CAPTURE_MILESTONES:
        if figures.get(name) is not None:
            found[label] = figures[name]
    return found


def tunnel(boots: int, icount: int | None) -> dict[str, object]:
    earlyfw = TunnelSeries(guest.VARIANTS["wireguard"])
    none = TunnelSeries(guest.VARIANTS["wireguard-no-earlyfw"])
    boot_alternately([none, earlyfw], boots, icount)
    # The first packet through the tunnel, boot by boot: earlyfw's boot against the same round's boot without.
    delays = [
        round(e["first_tunnelled_uptime_s"] - n["first_tunnelled_uptime_s"], 3)
        for e, n in zip(earlyfw.figures, none.figures, strict=True)
        if e.get("first_tunnelled_uptime_s") is not None and n.get("first_tunnelled_uptime_s") is not None
    ]
    ready, relax, delay = median(earlyfw.watcher_ready), median(earlyfw.values("response_to_relaxed_s")), median(delays)

    def m(series: TunnelSeries, name: str) -> float | None:
        return median(series.values(name))

    names = (
        "first_response_uptime_s",
        "first_tunnelled_uptime_s",
        "response_to_first_tunnelled_s",
        "watcher_blocked_uptime_s",
        "relaxed_uptime_s",
        "handshake_age_at_relax_s",
        "response_to_relaxed_s",
        "response_to_relaxed_again_s",
        "up_to_relaxed_at_most_s",
    )
    result: dict[str, object] = {
        "boots": boots,
        "watcher_ready_s": earlyfw.watcher_ready,
        "first_tunnelled_delay_s": delays,
        "medians": {name: {"none": m(none, name), "earlyfw": m(earlyfw, name)} for name in names},
        "login_uptime_median_s": {"none": median(none.login), "earlyfw": median(earlyfw.login)},
        "failed_boots": {"none": none.failed, "earlyfw": earlyfw.failed},
        "targets_met": {
            "watcher_ready_within_1_s": ready is not None and ready <= MAX_WATCHER_READY,
            "handshake_to_relaxed_within_100_ms": relax is not None and relax <= MAX_RELAX,
            "up_to_relaxed_within_1_s": (up := median(earlyfw.values("up_to_relaxed_at_most_s"))) is not None
            and up <= MAX_UP_TO_RELAXED,
            "first_tunnelled_delay_within_100_ms": delay is not None and delay <= MAX_TUNNEL_DELAY,
            "every_boot_passed": not earlyfw.failed and not none.failed,
        },
        "figures": {"none": none.figures, "earlyfw": earlyfw.figures},
        "milestones": {"none": none.milestones, "earlyfw": earlyfw.milestones},
    }
    print(f"\nWireGuard guest: medians over {boots} boots of each guest (guest uptime)")
    print(f"  watcher ready after its unit starts    {show(ready)} ({earlyfw.watcher_ready}; goal <= 1 s)")
    print(
        f"  handshake response -> relaxed          {show(relax)} "
        f"({earlyfw.values('response_to_relaxed_s')}; goal <= 0.1 s)"
    )
    print(
        f"  wg0 up -> relaxed, at most             {show(m(earlyfw, 'up_to_relaxed_at_most_s'))} "
        f"({earlyfw.values('up_to_relaxed_at_most_s')}; goal <= 1 s; no keepalive: the watcher's kick)"
    )
    print(f"  handshake age the watcher saw          {show(m(earlyfw, 'handshake_age_at_relax_s'))}")
    for label, name in (
        ("first handshake response", "first_response_uptime_s"),
        ("first packet through the tunnel", "first_tunnelled_uptime_s"),
    ):
        print(f"  {label:38} {show(m(none, name))} without earlyfw, {show(m(earlyfw, name))} with")
    print(f"  earlyfw's delay to the first packet     {show(delay)} ({delays}; goal <= 0.1 s)")
    print(
        f"  boot to login                          {show(median(none.login))} without, "
        f"{show(median(earlyfw.login))} with"
    )
    print("\n  where the time went (guest uptime, medians)  without   with earlyfw   difference")
    labels = [label for label, _ in KERNEL_MILESTONES]
    labels += [label for label, _, _ in UNIT_MILESTONES] + [label for label, _ in CAPTURE_MILESTONES]
    for label in sorted(labels, key=lambda label: earlyfw.milestone(label) or none.milestone(label) or 0.0):
        n, e = none.milestone(label), earlyfw.milestone(label)
        difference = f"{e - n:+.2f} s" if n is not None and e is not None else ""
        print(f"  {label:42} {show(n):>9} {show(e):>12}   {difference}")
    for name, s in (("none", none), ("earlyfw", earlyfw)):
        for failure in s.failed:
            print(f"  {name} boot FAILED: {failure}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--boots", type=int, default=5, help="boots of each guest (default 5)")
    parser.add_argument("--generator", choices=[*GuestGenerator, "all"], default="all")
    parser.add_argument("--wireguard", action="store_true", help="the WireGuard guest with and without earlyfw instead")
    parser.add_argument(
        "--clock",
        choices=["icount", "host"],
        default="icount",
        help="icount (default): guest time counts instructions (1 ns each), so the figures do not depend on how "
        "busy the host is; host: the proof's own multi-threaded TCG, whose times follow the host's load",
    )
    args = parser.parse_args()
    started = time.monotonic()
    icount = 0 if args.clock == "icount" else None
    OUT.mkdir(exist_ok=True)
    if args.wireguard:
        results = [tunnel(args.boots, icount)]
        out = OUT / f"boot-wireguard-{args.clock}.json"
        count = 2 * args.boots
    else:
        generators = list(GuestGenerator) if args.generator == "all" else [GuestGenerator(args.generator)]
        results = [compare(g, args.boots, icount) for g in generators]
        out = OUT / f"boot-{args.clock}.json"
        count = 3 * len(generators) * args.boots
    elapsed = time.monotonic() - started
    document = {"elapsed_s": round(elapsed), "clock": args.clock, "cmdline": boot.CMDLINE, "results": results}
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\n{count} boots in {elapsed:.0f} s; figures in {out}")
    met = all(all(r["targets_met"].values()) for r in results)  # type: ignore[attr-defined]
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
