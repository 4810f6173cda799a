"""What the package guest must show after its boot proof (guest/upgrade-phases),
read from its report, its capture and the next boot.

One power-on, several phases, each with the tunnel relaxed and the outside
probe sending a datagram every 5 ms to an address outside the tunnel:

- upgrade: `apt-get install ./earlyfw_<newer>_all.deb`; reconfigure: a
  changed config, then `earlyfw install`. Each lets nothing out, keeps table
  inet earlyfw loaded at every ruleset generation (nft's own monitor), restarts
  the watcher (stopped, then started guarded) and is relaxed again within
  RELAX_AFTER_START of the new watcher's start, with no new handshake. The
  upgrade rebuilds no initramfs (the newer version's hook and ruleset are the
  same files, so its postinst fires no trigger), nor does the config change
  (a DNS server is not in the initramfs ruleset).
- naive-reload: `nft delete table inet earlyfw; sleep 1; nft -f blocked.nft`
  with the watcher running: the table is gone for a moment, the guard holds,
  nothing gets out.
- naive-upgrade, the control: the same with the watcher stopped first, as a
  package that stops its daemon would: the table is gone for the second and
  the probe's datagrams are in the capture. If they are not, the probe or the
  capture is broken, and the phases above prove nothing.
- remove: `apt-get remove earlyfw`; after it the probe's datagrams get out and
  the tunnel answers (the network works), and no earlyfw table, unit, file or
  initramfs entry is left. The guest then powers off; its disk boots again
  with the initramfs the removal left (the next boot): login, no earlyfw in
  the initramfs, the kernel log or the tables, and the network works.

Times are guest uptime: the probe stamps its datagrams, the phases their
events, the monitor its lines and the journal its own; other captured
packets are placed by the endpoint probes (pcap.Capture.as_uptime).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from earlyfw.config import Endpoint
from qemu import boot, handshake, package, pcap, sh
from qemu.guest import Image

PHASES = ("upgrade", "reconfigure", "naive-reload", "naive-upgrade", "remove")
# The phases that must let nothing out; the control must.
NO_LEAK = ("baseline", "upgrade", "reconfigure", "naive-reload")
CONTROL = "naive-upgrade"
# The phases that restart the watcher: stopped, started, relaxed again.
RESTARTS = ("upgrade", "reconfigure", CONTROL)
# The phases after which the table must never have been missing.
TABLE_KEPT = ("upgrade", "reconfigure")
# From the restarted watcher's start to its relax. It needs no new handshake
# (the tunnel's last one is younger than reject-after), only its first look at
# the peers: `wg` run once, one batch, a few hundred ms under TCG. A wait for a
# handshake would be up to WireGuard's rekey away (two minutes).
RELAX_AFTER_START = 10.0
# The probe must have run in each window: at 5 ms a datagram, 2 s is 400.
MIN_ATTEMPTS = 100
# Packets a window's edge may hold back (the NIC's queue, the capture's clock).
EDGE = 0.1

OUTSIDE_PROBE = re.compile(rb"earlyfw-qemu outside probe seq=(\d+) uptime=(\d+\.\d+)")
# Where guest/outside-probe sends, as pcap summarises a datagram's destination.
OUTSIDE_TARGETS = ("192.0.2.77:9", "[2001:db8::77]:9")
MONITOR_TABLE = re.compile(r"^(add|delete) table inet earlyfw(?:$|\s)")
MONITOR_GENERATION = re.compile(r"^# new generation \d+ by process \d+ \((.*)\)")
DONE = "@@upgrade-done"
# dpkg's line when it runs initramfs-tools' trigger (a rebuild).
INITRAMFS_REBUILT = "Processing triggers for initramfs-tools"
# earlyfw's line when `earlyfw install` rebuilds it itself.
INITRAMFS_REBUILT_NOW = "earlyfw: rebuilding the initramfs"
# systemd stopping networkd, or networkd dropping its lease.
NETWORK_DOWN = re.compile(r"Stopping systemd-networkd|lease lost")
# The guest's name and the proof's own units, which say earlyfw too.
HARNESS = re.compile(r"earlyfw-(?:guest|qemu)\S*|earlyfw QEMU proof")
NEXT_BOOT = "next"


@dataclass(frozen=True)
class Absence:
    """table inet earlyfw missing from one ruleset generation to a later one."""

    start: float
    end: float | None  # None: still missing at the end of the record
    removed_by: str
    restored_by: str | None

    def length(self) -> float | None:
        return None if self.end is None else round(self.end - self.start, 3)


@dataclass(frozen=True)
class Restart:
    """The watcher stopped and started again within a phase."""

    stopped: float | None
    started: float | None
    relaxed: float | None
    guarded: bool
    # When the handshake the new watcher relaxed on completed (its own figure).
    handshake: float | None = None

    @property
    def unguarded(self) -> float | None:
        """From the old watcher's last line (its guard goes as it exits) to the
        new one's first (its guard came with its first batch): an upper bound
        on how long only the unowned table held the block."""
        return _span(self.stopped, self.started)

    @property
    def relax_after_start(self) -> float | None:
        return _span(self.started, self.relaxed)

    @property
    def tunnel_blocked(self) -> float | None:
        """From the old watcher's lock on its way out to the new one's relax."""
        return _span(self.stopped, self.relaxed)


def _span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 3)


@dataclass(frozen=True)
class Phases:
    events: dict[str, float]
    # (uptime, datagrams tried so far, of them refused by the kernel)
    counts: tuple[tuple[float, int, int], ...]
    absences: tuple[Absence, ...]
    journal: tuple[handshake.JournalLine, ...]
    tunnel: tuple[handshake.Attempt, ...]
    # The outside probe's datagrams in the capture, by the uptime they carry.
    outside: tuple[float, ...]
    # Every other leak in the capture, as uptime.
    other_leaks: tuple[tuple[float, str], ...]
    sections: dict[str, str]

    def window(self, name: str) -> tuple[float, float]:
        """A phase's window: from its start to the next one's; `baseline`
        before the first; `after-remove` from the removal's end to the probe's."""
        e = self.events
        if name == "baseline":
            return e.get("probe-start", 0.0), e.get("upgrade-start", 0.0)
        if name == "after-remove":
            return e.get("remove-end", 0.0), e.get("probe-stop", 0.0)
        i = PHASES.index(name)
        end = e.get(f"{PHASES[i + 1]}-start", 0.0) if i + 1 < len(PHASES) else e.get("remove-end", 0.0)
        return e.get(f"{name}-start", 0.0), end

    def leaks(self, name: str) -> tuple[int, int]:
        """(outside probe datagrams, other leaks) in a phase's window."""
        start, end = self.window(name)
        return (
            sum(start <= u < end for u in self.outside),
            sum(start <= u < end for u, _ in self.other_leaks),
        )

    def attempts(self, name: str) -> tuple[int, int]:
        """(datagrams the probe tried, of them refused) in a phase's window."""
        start, end = self.window(name)
        before = [c for c in self.counts if c[0] <= start]
        upto = [c for c in self.counts if c[0] <= end]
        if not upto:
            return 0, 0
        first = before[-1] if before else (start, 0, 0)
        return upto[-1][1] - first[1], upto[-1][2] - first[2]

    def absent(self, name: str) -> tuple[Absence, ...]:
        start, end = self.window(name)
        return tuple(a for a in self.absences if start <= a.start < end)

    def restart(self, name: str) -> Restart:
        start, end = self.window(name)
        lines = [line for line in self.journal if line.who == "earlyfw" and start <= line.uptime < end]
        stopped = next((line for line in lines if line.text.startswith("blocked: watcher stopped")), None)
        after = [line for line in lines if stopped is None or line.uptime >= stopped.uptime]
        started = next((line for line in after if line.text.startswith("blocked: watcher started")), None)
        later = [line for line in after if started is not None and line.uptime >= started.uptime]
        relaxed = next((line for line in later if line.text.startswith("relaxed: ")), None)
        age = handshake.Tunnel.watcher_delay(relaxed)
        return Restart(
            stopped.uptime if stopped else None,
            started.uptime if started else None,
            relaxed.uptime if relaxed else None,
            started is not None and "unguarded" not in started.text and "guarded" in started.text,
            None if relaxed is None or age is None else round(relaxed.uptime - age, 3),
        )

    def tunnel_failures(self, start: float, end: float) -> tuple[handshake.Attempt, ...]:
        return tuple(a for a in self.tunnel if start <= a.start < end and not a.ok)

    def log(self, name: str) -> str:
        return self.sections.get(f"upgrade-log-{name}", "")


def parse_events(text: str) -> dict[str, float]:
    return handshake.parse_events(text)


def parse_counts(text: str) -> tuple[tuple[float, int, int], ...]:
    counts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3 and all(f.replace(".", "", 1).isdigit() for f in fields):
            counts.append((float(fields[0]), int(fields[1]), int(fields[2])))
    return tuple(counts)


def parse_monitor(text: str) -> tuple[Absence, ...]:
    """When table inet earlyfw was missing, from `nft monitor` lines stamped
    with uptime: its presence is what each generation (one transaction) left."""
    present, pending = True, True
    absences: list[Absence] = []
    for line in text.splitlines():
        stamp, _, event = line.partition(" ")
        try:
            uptime = float(stamp)
        except ValueError:
            continue
        table = MONITOR_TABLE.match(event)
        if table:
            pending = table.group(1) == "add"
            continue
        generation = MONITOR_GENERATION.match(event)
        if not generation or pending == present:
            continue
        who = generation.group(1)
        if present:
            absences.append(Absence(uptime, None, who, None))
        elif absences:
            absences[-1] = replace(absences[-1], end=uptime, restored_by=who)
        present = pending
    return tuple(absences)


def outside_datagrams(capture_path: Path) -> tuple[float, ...]:
    """The uptimes the outside probe's datagrams in the capture carry."""
    found = []
    for frame in pcap.outbound(pcap.read(capture_path)):
        m = OUTSIDE_PROBE.search(frame.data)
        if m:
            found.append(float(m.group(2)))
    return tuple(found)


def observe(outcome: boot.Outcome) -> Phases:
    sections = outcome.report.sections
    capture = outcome.capture
    # The probe's own datagrams are counted by what they carry; the capture classes them as UDP leaks.
    other = tuple(
        (u, p.summary)
        for p in capture.leaks
        if (u := capture.as_uptime(p.time)) is not None and not p.summary.endswith(OUTSIDE_TARGETS)
    )
    return Phases(
        events=parse_events(sections.get("upgrade-events", "")),
        counts=parse_counts(sections.get("upgrade-counts", "")),
        absences=parse_monitor(sections.get("upgrade-monitor", "")),
        journal=handshake.parse_journal(sections.get("upgrade-journal", "")),
        tunnel=handshake.parse_attempts(sections.get("upgrade-tunnel-probe", "")),
        outside=outside_datagrams(outcome.run_dir / "capture.pcap"),
        other_leaks=other,
        sections=sections,
    )


def boot_part(outcome: boot.Outcome) -> boot.Outcome:
    """The boot proof's share of the run: what the guest sent until its phases began."""
    started = parse_events(outcome.report.sections.get("upgrade-events", "")).get("probe-start")
    offset = outcome.capture.uptime_offset
    if started is None or offset is None:
        return outcome
    return replace(outcome, capture=outcome.capture.until(started + offset))


# -- the checks -------------------------------------------------------------------


def check(outcome: boot.Outcome, after: boot.Outcome | None) -> tuple[str, ...]:
    report = outcome.report
    if DONE not in (outcome.run_dir / "report.log").read_text(errors="replace"):
        return ("the guest's phases never finished (no @@upgrade-done in its report)",)
    p = observe(outcome)
    problems: list[str] = []
    missing = [f"{n}-{edge}" for n in PHASES for edge in ("start", "end") if f"{n}-{edge}" not in p.events]
    if missing:
        return (f"the phases' record lacks {', '.join(missing)}",)
    for name in PHASES:
        status = re.findall(r"^status (\d+)$", p.log(name), re.M)
        if status != ["0"]:
            problems.append(f"phase {name} failed (status {status}): {p.log(name)[-800:]}")
    problems += _check_probe_ran(p)
    problems += _check_no_leaks(p)
    problems += _check_restarts(p)
    problems += _check_control(p)
    problems += _check_upgrade_and_config(p)
    problems += _check_removed(p, report.sections)
    problems += _check_network_manager(p)
    if after is None:
        problems.append("the next boot did not run")
    else:
        problems += check_next_boot(after)
    return tuple(problems)


def _check_probe_ran(p: Phases) -> list[str]:
    problems = []
    for name in (*NO_LEAK, CONTROL):
        tried, _ = p.attempts(name)
        if tried < MIN_ATTEMPTS:
            problems.append(f"the outside probe tried {tried} datagrams in phase {name}: it was not running")
    return problems


def _check_no_leaks(p: Phases) -> list[str]:
    problems = []
    for name in NO_LEAK:
        outside, other = p.leaks(name)
        if outside or other:
            problems.append(f"phase {name} leaked: {outside} outside-probe datagram(s), {other} other packet(s)")
    for name in TABLE_KEPT:
        for a in p.absent(name):
            problems.append(
                f"phase {name}: table inet earlyfw was missing from {a.start:.3f}s (removed by {a.removed_by})"
                + (f" for {a.length()}s" if a.end is not None else "")
            )
    return problems


def _check_restarts(p: Phases) -> list[str]:
    problems = []
    for name in RESTARTS:
        r = p.restart(name)
        if r.stopped is None or r.started is None:
            problems.append(f"phase {name}: the watcher was not stopped and started again ({r})")
            continue
        if not r.guarded:
            problems.append(f"phase {name}: the restarted watcher runs without its guard table")
        after = r.relax_after_start
        if after is None:
            problems.append(f"phase {name}: the restarted watcher never relaxed")
        elif after > RELAX_AFTER_START:
            problems.append(f"phase {name}: relaxed {after}s after the watcher started (at most {RELAX_AFTER_START})")
        if r.relaxed is not None:
            # The state as it was: once relaxed again, every tunnel probe gets through.
            settled = r.relaxed + handshake.SETTLED
            failed = p.tunnel_failures(settled, p.window(name)[1])
            if failed:
                problems.append(f"phase {name}: tunnel probes failed after the relax (at {failed[0].start:.2f}s)")
    return problems


def _check_control(p: Phases) -> list[str]:
    outside, _ = p.leaks(CONTROL)
    problems = []
    if outside == 0:
        problems.append(
            "the control (naive upgrade) let no outside-probe datagram out: the probe or the capture is broken, "
            "so the phases' no-leak results prove nothing"
        )
    if not p.absent(CONTROL):
        problems.append("the control never removed table inet earlyfw (nothing in nft's monitor)")
    return problems


def _check_upgrade_and_config(p: Phases) -> list[str]:
    problems = []
    versions = re.findall(r"^earlyfw\t(\S+)$", p.log("upgrade"), re.M)
    if len(versions) != 2 or not versions[1].endswith(package.UPGRADE_SUFFIX) or versions[0] == versions[1]:
        problems.append(f"the upgrade did not go from the tree's version to the newer one: {versions}")
    if INITRAMFS_REBUILT in p.log("upgrade"):
        problems.append("the upgrade rebuilt the initramfs, though the newer version's hook and ruleset are the same")
    if INITRAMFS_REBUILT_NOW in p.log("reconfigure"):
        problems.append("the DNS change rebuilt the initramfs, though the initramfs ruleset has no DNS server")
    live = p.log("reconfigure").partition("@live-dns")[2]
    if package.CHANGED_DNS not in live:
        problems.append(f"after the config change the live table lacks {package.CHANGED_DNS}: {live.strip()[:400]}")
    return problems


def _check_removed(p: Phases, sections: dict[str, str]) -> list[str]:
    problems = []
    outside, _ = p.leaks("after-remove")
    if outside == 0:
        problems.append("after the removal no outside-probe datagram got out: the network does not work")
    if sections.get("removed-tunnel", "").strip() != "ok":
        problems.append("after the removal the tunnel does not answer")
    status = sections.get("removed-package", "").strip()
    if not status.endswith("deinstall ok config-files"):
        problems.append(f"after apt-get remove the package is {status!r}, not removed with its config kept")
    tables = [t for t in sections.get("removed-tables", "").splitlines() if "earlyfw" in t]
    if tables:
        problems.append(f"earlyfw tables remain after the removal: {tables}")
    for what in ("units", "files"):
        left = [line for line in sections.get(f"removed-{what}", "").splitlines() if line.strip()]
        if left:
            problems.append(f"earlyfw {what} remain after the removal: {left[:10]}")
    problems += _check_initramfs(sections.get("removed-initramfs", ""), "the initramfs the removal left")
    return problems


def _check_network_manager(p: Phases) -> list[str]:
    """No phase, the removal included, may take the network manager down
    (a unit it Requires= stopped with it, say): the lease would go."""
    start = p.events.get("probe-start", 0.0)
    lines = handshake.parse_journal(p.sections.get("upgrade-networkd", ""))
    hits = [line for line in lines if line.uptime >= start and NETWORK_DOWN.search(line.text)]
    return [f"the network manager went down during the phases at {hits[0].uptime:.3f}s: {hits[0].text}"] if hits else []


def _check_initramfs(listing: str, what: str) -> list[str]:
    lines = listing.splitlines()
    entries = next((int(line.split()[1]) for line in lines if line.startswith("entries ")), 0)
    if entries == 0:
        return [f"{what}: no listing (lsinitramfs failed?)"]
    found = [line for line in lines if "earlyfw" in line and not line.startswith("entries ")]
    return [f"{what} still has earlyfw in it: {found[:5]}"] if found else []


def check_next_boot(after: boot.Outcome) -> list[str]:
    """The boot after the removal: it reaches login from the initramfs the
    removal left, nothing of earlyfw runs, and the network works."""
    report = after.report
    if after.timed_out or report.login_uptime is None:
        return ["the next boot never reached login"]
    problems = []
    tables = [t for t in report.nft_tables if "earlyfw" in t]
    if tables:
        problems.append(f"the next boot has earlyfw tables at login: {tables}")
    lines = [line.text for line in report.kernel_log if "earlyfw" in HARNESS.sub("", line.text)]
    if lines:
        problems.append(f"the next boot's kernel log mentions earlyfw: {lines[:3]}")
    if report.failed_units:
        problems.append(f"units failed in the next boot: {list(report.failed_units)}")
    problems += _check_initramfs(lsinitramfs(after.image.initrd), "the next boot's initramfs")
    if not after.capture.leaks:
        problems.append("the next boot let nothing out: with earlyfw removed its network does not work")
    if not handshake.observe(after).successes:
        problems.append("the next boot's tunnel never answered a probe")
    return problems


def lsinitramfs(initrd: Path) -> str:
    listing = sh.run(["lsinitramfs", str(initrd)])
    return f"entries {len(listing.splitlines())}\n{listing}"


# -- the run --------------------------------------------------------------------------


def writable_image(image: Image, run_dir: Path) -> Image:
    """The cached guest as a run of its own: the kernel and initramfs linked,
    the disk copied, so the guest's writes reach a next boot and not the cache."""
    directory = run_dir / "disk"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for f in (image.kernel, image.initrd):
        (directory / f.name).hardlink_to(f)
    sh.run(["cp", "--sparse=always", "--reflink=auto", str(image.disk), str(directory / image.disk.name)])
    return Image(image.variant, directory, image.kernel_version)


def next_image(first: Image, run_dir: Path) -> Image:
    """The disk the first boot powered off with, and the kernel and initramfs
    from its /boot: what the machine would boot next."""
    directory = run_dir / "next-disk"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    disk = directory / first.disk.name
    first.disk.rename(disk)
    image = Image(first.variant, directory, first.kernel_version)
    for inside, there in ((f"/boot/vmlinuz-{first.kernel_version}", image.kernel),
                          (f"/boot/initrd.img-{first.kernel_version}", image.initrd)):  # fmt: skip
        subprocess.run(["debugfs", "-R", f"dump -p {inside} {there}", str(disk)], capture_output=True, check=False)
        if not there.exists() or there.stat().st_size == 0:
            raise sh.HarnessError(f"could not read {inside} from {disk} with debugfs")
    return image


def run(
    image: Image, run_dir: Path, endpoints: tuple[Endpoint, ...], peer: tuple[str, ...], timeout: float
) -> tuple[boot.Outcome, boot.Outcome | None]:
    """The first boot with its phases, until the guest powers off; then the next boot."""
    first = writable_image(image, run_dir)
    # An initramfs rebuild under TCG (the removal's): more than the boot's allowance.
    outcome = boot.boot(first, run_dir, endpoints, timeout=3 * timeout, isolated=peer, until=None, writable=True)
    if outcome.timed_out or DONE not in (run_dir / "report.log").read_text(errors="replace"):
        return outcome, None
    after_dir = run_dir / NEXT_BOOT
    after = boot.boot(next_image(first, run_dir), after_dir, endpoints, isolated=peer)
    return outcome, after


def figures(outcome: boot.Outcome, after: boot.Outcome | None) -> dict[str, Any]:
    p = observe(outcome)
    phases: dict[str, Any] = {}
    for name in ("baseline", *PHASES, "after-remove"):
        start, end = p.window(name)
        outside, other = p.leaks(name)
        tried, refused = p.attempts(name)
        entry: dict[str, Any] = {
            "window_uptime_s": [start, end],
            "seconds": round(end - start, 3),
            "outside_probe_tried": tried,
            "outside_probe_refused_in_guest": refused,
            "outside_probe_leaked": outside,
            "other_leaks": other,
        }
        if name in PHASES:
            entry["command_s"] = _span(p.events.get(f"{name}-start"), p.events.get(f"{name}-end"))
            entry["table_missing_s"] = [a.length() for a in p.absent(name)]
        if name in RESTARTS:
            r = p.restart(name)
            entry |= {
                "watcher_unguarded_s": r.unguarded,
                "watcher_relax_after_start_s": r.relax_after_start,
                "handshake_age_at_relax_s": None
                if r.handshake is None or r.relaxed is None
                else round(r.relaxed - r.handshake, 3),
                "tunnel_blocked_s": r.tunnel_blocked,
                "tunnel_probe_failures": len(p.tunnel_failures(*p.window(name))),
            }
        phases[name] = entry
    result: dict[str, Any] = {"phases": phases}
    if after is not None:
        result["next_boot"] = {
            "login_uptime_s": after.report.login_uptime,
            "leaks": len(after.capture.leaks),
            "nft_tables_at_login": list(after.report.nft_tables),
            "initrd_bytes": after.image.initrd_bytes,
        }
    return result
