"""What each boot must show, and the per-boot report.

A variant with earlyfw passes when nothing but DHCP, ARP (and IPv6's link-local
equivalents) and packets to the configured endpoint left the guest from
power-on to login. A control or the mutant passes only when it DOES leak: if
it does not, the leak sources or the capture are broken, and then no "no leak"
result above means anything.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from earlyfw.policy import EGRESS_TABLE
from qemu import CACHE, boot, guest, handshake, package, pcap, upgrade, wireguard
from qemu.guest import Change, Variant

ANCHOR_UNIT = guest.ANCHOR_UNIT.source

RUNS = CACHE / "runs"


@dataclass(frozen=True)
class Verdict:
    variant: Variant
    outcome: boot.Outcome
    problems: tuple[str, ...]
    # The package guest's next boot, after its phases removed earlyfw.
    after: boot.Outcome | None = None

    @property
    def boot_outcome(self) -> boot.Outcome:
        """The boot proof's share of the run: the package guest's phases come after it."""
        return upgrade.boot_part(self.outcome) if self.variant.package else self.outcome

    @property
    def passed(self) -> bool:
        return not self.problems

    def explain(self) -> str:
        lines = [f"{self.variant.name}: " + ("PASS" if self.passed else "FAIL")]
        lines += [f"  - {p}" for p in self.problems]
        if not self.passed:
            leaks = self.boot_outcome.capture.leaks
            lines += [f"  leaked: {p.time:8.3f}s {p.kind:9} {p.summary}" for p in leaks[:15]]
            lines += [f"  run directory: {self.outcome.run_dir}", "  console (last lines):"]
            lines += ["    " + line for line in self.outcome.console_tail.splitlines()]
        return "\n".join(lines)


def check(variant: Variant, outcome: boot.Outcome, after: boot.Outcome | None = None) -> tuple[str, ...]:
    if variant.package:
        # The boot proof up to the phases (the control among them leaks on
        # purpose), then the phases and the next boot.
        return _check_boot(variant, upgrade.boot_part(outcome)) + upgrade.check(outcome, after)
    return _check_boot(variant, outcome)


def _check_boot(variant: Variant, outcome: boot.Outcome) -> tuple[str, ...]:
    problems: list[str] = []
    report, capture = outcome.report, outcome.capture
    if outcome.timed_out or report.login_uptime is None:
        # Fail closed must never mean locked out: every variant reaches login.
        problems.append("the guest never reached login" + (" (timed out)" if outcome.timed_out else ""))
        return tuple(problems)
    if not report.complete:
        problems.append("the guest's login report was cut short")
    if variant.break_glass:
        problems += _check_break_glass(variant, outcome)
    if variant.change is Change.ANCHOR:
        # A comparison for the boot benchmark, not a proof: it must boot and
        # hold its block at login; what got out before the block is a figure.
        if report.earlyfw_state != "blocked":
            problems.append(f"the anchor's blocked ruleset is not in place at login (state {report.earlyfw_state})")
        return tuple(problems)
    if variant.expect_leaks:
        if not capture.leaks:
            problems.append(
                "expected leaks but the capture shows none: the leak sources or the capture are broken, "
                "so the no-leak results prove nothing"
            )
        if variant.change is Change.IP_ONLY and not any(p.version == 6 for p in capture.leaks):
            problems.append("the ip-only mutant should leak over IPv6, and nothing IPv6 leaked")
        if variant.change is Change.RAW_EGRESS and not raw_leaks(outcome):
            problems.append("the raw-socket leak source never got a frame out: it proves nothing")
        return tuple(problems)
    if capture.leaks:
        kinds = sorted({p.kind.value for p in capture.leaks})
        problems.append(f"{len(capture.leaks)} packet(s) leaked before login: {', '.join(kinds)}")
    if "table inet earlyfw" not in report.nft_tables:
        problems.append(f"table inet earlyfw is not loaded at login (tables: {list(report.nft_tables)})")
    if variant.change is Change.BROKEN_RULESET:
        # The loaders' drop-everything table, held through to login.
        if report.earlyfw_state != "fallback":
            problems.append(f"expected earlyfw's fallback table at login, found state {report.earlyfw_state}")
        return tuple(problems)
    # The watcher relaxes once the tunnel's handshake is done; without it the block holds.
    expected = "relaxed" if variant.watch else "blocked"
    if report.earlyfw_state != expected:
        problems.append(f"table inet earlyfw is in state {report.earlyfw_state} at login, not {expected}")
    # The positive control inside the earlyfw guest: the network did come up,
    # and what the policy allows did get out.
    if capture.count(pcap.Kind.DHCP) == 0:
        problems.append("no DHCP left the guest: the network never came up, so the absence of leaks proves little")
    if capture.count(pcap.Kind.ENDPOINT) == 0:
        problems.append("nothing reached the configured endpoint: the allowed path is broken")
    if variant.change is Change.NFTABLES_SERVICE and "table inet filter" not in report.nft_tables:
        problems.append("nftables.service did not load /etc/nftables.conf (no table inet filter at login)")
    live, nic = report.block_live, report.nic_registered
    if live is None:
        problems.append("the kernel log has no line from earlyfw saying the block went live")
    if nic is None:
        problems.append("the kernel log has no virtio_net registration line")
    if live is not None and nic is not None and live >= nic:
        problems.append(f"the block went live at {live:.3f}s, after the NIC registered at {nic:.3f}s")
    if variant.change is Change.WIREGUARD:
        problems += handshake.check(variant.watch, outcome)
    if variant.change is Change.RAW_EGRESS:
        if f"table netdev {EGRESS_TABLE}" not in report.nft_tables:
            problems.append(f"table netdev {EGRESS_TABLE} is not loaded at login")
        if not any(EGRESS_ATTACHED in line.text for line in report.kernel_log):
            problems.append(f"the kernel log has no {EGRESS_ATTACHED!r} line")
    return tuple(problems)


# What the raw-socket leak source (guest/raw-leak.c) sends, and what
# earlyfw-egress logs once it attached the egress chain.
RAW_PAYLOAD = b"earlyfw-qemu raw leak"
EGRESS_ATTACHED = "earlyfw: raw-socket egress filtered on"


def raw_leaks(outcome: boot.Outcome) -> int:
    """Frames from the raw-socket leak source in the capture."""
    return sum(RAW_PAYLOAD in frame.data for frame in pcap.read(outcome.run_dir / "capture.pcap"))


# What the initramfs loader and earlyfw-off.service print on the console.
BREAK_GLASS_WARNING = "earlyfw: WARNING: earlyfw=off is on the kernel command line"


def _check_break_glass(variant: Variant, outcome: boot.Outcome) -> list[str]:
    """Booted with earlyfw=off: nothing of earlyfw is loaded, the admin's own
    firewall is, and the console says so."""
    problems = []
    tables = outcome.report.nft_tables
    if any("earlyfw" in t for t in tables):
        problems.append(f"booted with earlyfw=off, yet earlyfw's tables are loaded at login: {list(tables)}")
    if variant.change is Change.NFTABLES_SERVICE and "table inet filter" not in tables:
        problems.append("booted with earlyfw=off, nftables.service did not load the admin's /etc/nftables.conf")
    console = outcome.run_dir / "console.log"
    text = console.read_text(errors="replace") if console.exists() else ""
    if BREAK_GLASS_WARNING not in text:
        problems.append(f"booted with earlyfw=off, the console never said {BREAK_GLASS_WARNING!r}")
    return problems


def run(
    variant: Variant,
    *,
    runs: Path = RUNS,
    timeout: float = boot.DEFAULT_TIMEOUT,
    tag: str = "",
    icount: int | None = None,
    debs: package.Debs | None = None,
) -> Verdict:
    """Build (or take from the cache) and boot `variant`; a package variant
    needs `debs` (qemu.package.build_both), and its run has two boots."""
    image = guest.build(variant, debs=debs)
    run_dir = runs / f"{variant.name}{tag}"
    run_dir.mkdir(parents=True, exist_ok=True)
    # The WireGuard boot's peer runs beside QEMU, in its namespace.
    peer = wireguard.peer_args(run_dir) if variant.change is Change.WIREGUARD else ()
    endpoints = guest.guest_config(variant).endpoints
    after = None
    if variant.package:
        outcome, after = upgrade.run(image, run_dir, endpoints, peer, timeout)
    else:
        outcome = boot.boot(image, run_dir, endpoints, timeout=timeout, icount=icount, isolated=peer)
    verdict = Verdict(variant, outcome, check(variant, outcome, after), after)
    (run_dir / "result.json").write_text(json.dumps(summary(verdict), indent=2) + "\n")
    return verdict


def summary(verdict: Verdict) -> dict[str, Any]:
    o = verdict.boot_outcome
    r, c = o.report, o.capture
    extra = {}
    if verdict.variant.change is Change.WIREGUARD:
        extra["wireguard"] = handshake.figures(verdict.variant.watch, o)
    if verdict.variant.package:
        extra["upgrade"] = upgrade.figures(verdict.outcome, verdict.after)
    return {
        "variant": verdict.variant.name,
        "summary": verdict.variant.summary,
        "passed": verdict.passed,
        "problems": list(verdict.problems),
        "packets_by_class": c.counts,
        "leaks": len(c.leaks),
        "inbound_frames": c.inbound,
        "first_packet_s": c.first_packet,
        "first_leak_s": c.first_leak,
        # Seconds from power-on to the kernel's uptime zero (firmware, loading
        # and decompressing the kernel), from the endpoint probes.
        "kernel_start_s": c.uptime_offset,
        "first_packet_uptime_s": c.as_uptime(c.first_packet),
        "block_live_uptime_s": r.block_live,
        "nic_registered_uptime_s": r.nic_registered,
        "login_uptime_s": r.login_uptime,
        "wall_to_login_s": None if o.wall_to_login is None else round(o.wall_to_login, 3),
        "initrd_bytes": o.image.initrd_bytes,
        "nft_tables_at_login": list(r.nft_tables),
        "earlyfw_state_at_login": r.earlyfw_state,
        "unit_seconds": {
            u: r.unit_seconds(u) for u in ("earlyfw-initrd.service", "earlyfw-block.service", ANCHOR_UNIT)
        },
        "failed_units": list(r.failed_units),
        "run_dir": str(o.run_dir),
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def table(verdicts: list[Verdict]) -> str:
    """The per-boot report, one line per boot."""

    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    columns = ("login", "block", "nic", "1st pkt", "(uptime)")
    header = f"{'variant':24} {'result':6} " + " ".join(f"{c:>7}" for c in columns) + f" {'leaks':>5}  packets by class"
    lines = [header, "-" * len(header)]
    for v in verdicts:
        r, c = v.boot_outcome.report, v.boot_outcome.capture
        classes = " ".join(f"{k}={n}" for k, n in c.counts.items()) or "(none)"
        lines.append(
            f"{v.variant.name:24} {'PASS' if v.passed else 'FAIL':6} {s(r.login_uptime):>7} {s(r.block_live):>7} "
            f"{s(r.nic_registered):>7} {s(c.first_packet):>7} {s(c.as_uptime(c.first_packet)):>8} "
            f"{len(c.leaks):>5}  {classes}"
        )
    lines.append(
        "login/block/nic: guest uptime (s) at login, when earlyfw's block went live, when virtio_net registered; "
        "1st pkt: first packet the guest sent, seconds from power-on (and as guest uptime)"
    )
    return "\n".join(lines)
