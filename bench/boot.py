"""Boot figures for earlyfw's Linux boot protection, from real QEMU TCG boots.

For each initramfs generator, boots the guest without earlyfw (the control)
and with it, alternately, several times, and prints medians:

- block live vs NIC registered: the guest uptime at which earlyfw's initramfs
  hook had its table loaded, and at which virtio_net registered the NIC (both
  from the kernel log); the block must come first on every boot;
- boot-to-login: guest uptime at login, with and without earlyfw; the cost
  must stay under 2% of the guest's boot time;
- initramfs growth: must stay under 2 MB;
- the first packet the guest sent, in seconds from power-on.

By default the guests run with QEMU's instruction counter as their clock
(-icount shift=0: one instruction is one nanosecond, a 1-GIPS CPU; one vCPU):
a boot's length is then mostly the guest's own work, nearly the same on an
idle laptop and on a CI runner shared with other jobs (boots repeat within
1%), so a 2% cost can be told from noise. `--clock host` boots exactly as the proof does (two vCPUs,
multi-threaded TCG, host time), where a busy host moves boot times by 10-20%.

    python3 bench/boot.py                 # 5 boots of each of the 4 guests
    python3 bench/boot.py --boots 3 --generator dracut
    python3 bench/boot.py --clock host

Results also go to bench/out/boot-CLOCK.json. Targets: block before NIC on every boot,
cost < 2%, growth < 2 MB; the exit status is 1 when one is missed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemu import boot, guest, proof
from qemu.base import Generator

OUT = Path(__file__).resolve().parent / "out"
MAX_COST = 0.02
MAX_GROWTH = 2 * 1000 * 1000
UNITS = ("earlyfw-initrd.service", "earlyfw-block.service")


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
        if self.variant.earlyfw:
            for unit in UNITS:
                seconds = r.unit_seconds(unit)
                if seconds is not None:
                    self.units.setdefault(unit, []).append(seconds)
            if r.block_live is not None:
                self.block_live.append(r.block_live)
            first = r.block_live is not None and r.nic_registered is not None and r.block_live < r.nic_registered
            self.block_first.append(first)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def show(value: float | None, unit: str = "s") -> str:
    return "-" if value is None else f"{value:.2f} {unit}"


def compare(generator: Generator, boots: int, icount: int | None) -> dict[str, object]:
    control = Series(guest.VARIANTS[f"control-{generator}"])
    earlyfw = Series(guest.VARIANTS[str(generator)])
    for i in range(boots):
        # Alternate, so a busy spell on the machine hits both guests alike.
        for series in (control, earlyfw):
            verdict = proof.run(series.variant, runs=proof.RUNS / "bench", tag=f"-{i}", icount=icount)
            series.add(verdict)
            print(
                f"  {series.variant.name:24} boot {i + 1}/{boots}: login {series.login[-1]:.2f} s uptime, "
                f"{series.wall[-1]:.2f} s wall, {series.leaks[-1]} leaked",
                flush=True,
            )
    login_control, login_earlyfw = median(control.login), median(earlyfw.login)
    assert login_control is not None and login_earlyfw is not None
    cost = (login_earlyfw - login_control) / login_control
    growth = earlyfw.initrd_bytes - control.initrd_bytes
    block_first = sum(earlyfw.block_first)
    result: dict[str, object] = {
        "generator": str(generator),
        "boots": boots,
        "login_uptime_median_s": {"control": login_control, "earlyfw": login_earlyfw},
        "wall_to_login_median_s": {"control": median(control.wall), "earlyfw": median(earlyfw.wall)},
        "boot_cost_ratio": round(cost, 4),
        "block_live_median_s": median(earlyfw.block_live),
        "nic_registered_median_s": {"control": median(control.nic), "earlyfw": median(earlyfw.nic)},
        "block_before_nic_boots": f"{block_first}/{len(earlyfw.block_first)}",
        "first_packet_median_s": {"control": median(control.first_packet), "earlyfw": median(earlyfw.first_packet)},
        "leaked_packets_per_boot": {"control": control.leaks, "earlyfw": earlyfw.leaks},
        "initrd_bytes": {"control": control.initrd_bytes, "earlyfw": earlyfw.initrd_bytes, "growth": growth},
        "targets_met": {
            "block_before_nic_every_boot": block_first == len(earlyfw.block_first) == boots,
            "cost_under_2_percent": cost < MAX_COST,
            "initrd_growth_under_2_MB": growth < MAX_GROWTH,
        },
        "unit_seconds_median": {unit: median(times) for unit, times in earlyfw.units.items()},
        "all_login_uptimes_s": {"control": control.login, "earlyfw": earlyfw.login},
    }
    print(f"\n{generator}: medians over {boots} boots of each guest")
    print(f"  block live (earlyfw hook)        {show(median(earlyfw.block_live))} uptime")
    print(f"  NIC registered (virtio_net)      {show(median(earlyfw.nic))} uptime with earlyfw")
    print(f"  block before NIC                 {block_first}/{boots} boots")
    print(f"  boot to login, without earlyfw   {show(login_control)} uptime, {show(median(control.wall))} wall")
    print(f"  boot to login, with earlyfw      {show(login_earlyfw)} uptime, {show(median(earlyfw.wall))} wall")
    print(f"  earlyfw's cost                   {cost * 100:+.2f}% of the boot (target < {MAX_COST * 100:.0f}%)")
    print(
        f"  initramfs                        {control.initrd_bytes / 1e6:.2f} MB -> "
        f"{earlyfw.initrd_bytes / 1e6:.2f} MB (+{growth / 1e6:.2f} MB, target < {MAX_GROWTH / 1e6:.0f} MB)"
    )
    for unit, times in sorted(earlyfw.units.items()):
        print(f"  {unit + ' took':32} {show(median(times))} (start to finish, as systemd logged it)")
    print(f"  first packet from power-on       {show(median(earlyfw.first_packet))} with earlyfw")
    print(f"  leaked packets per boot          control {control.leaks}, earlyfw {earlyfw.leaks}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--boots", type=int, default=5, help="boots of each guest (default 5)")
    parser.add_argument("--generator", choices=[*Generator, "all"], default="all")
    parser.add_argument(
        "--clock",
        choices=["icount", "host"],
        default="icount",
        help="icount (default): guest time counts instructions (1 ns each), so the figures do not depend on how "
        "busy the host is; host: the proof's own multi-threaded TCG, whose times follow the host's load",
    )
    args = parser.parse_args()
    generators = list(Generator) if args.generator == "all" else [Generator(args.generator)]
    started = time.monotonic()
    icount = 0 if args.clock == "icount" else None
    results = [compare(g, args.boots, icount) for g in generators]
    elapsed = time.monotonic() - started
    OUT.mkdir(exist_ok=True)
    document = {"elapsed_s": round(elapsed), "clock": args.clock, "cmdline": boot.CMDLINE, "results": results}
    out = OUT / f"boot-{args.clock}.json"
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\n{len(generators) * args.boots * 2} boots in {elapsed:.0f} s; figures in {out}")
    met = all(all(r["targets_met"].values()) for r in results)  # type: ignore[attr-defined]
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
