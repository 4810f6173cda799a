"""Boot one guest under QEMU TCG, in a network namespace that holds only
loopback, with the NIC's traffic captured from power-on, until the guest
reports on its second serial port that it reached login.

Times: QEMU stamps each captured frame with its virtual clock (which starts at
power-on and runs only while the guest does) added to the guest's RTC at
start-up. The RTC is pinned to a fixed date and driven by that same clock, so
subtracting the date gives seconds since power-on exactly. The kernel log's
times are the guest's uptime, which starts when the kernel does.
"""

from __future__ import annotations

import calendar
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from earlyfw.config import Endpoint
from qemu import REPO, pcap, sh
from qemu.guest import Image

RTC_BASE = "2025-06-01T00:00:00"
RTC_EPOCH = calendar.timegm(time.strptime(RTC_BASE, "%Y-%m-%dT%H:%M:%S"))
# virtio_net says when it registered a device only at debug level; kmod passes
# this option on when udev loads the module, wherever that happens.
# `quiet` keeps the console (an emulated UART, slow under TCG) to warnings;
# the kernel log itself keeps everything and reaches the host in the report.
# log_buf_len: virtio_net's debug lines (one per packet, for its registration
# time) would push the early lines out of the default buffer in a long boot
# with a busy tunnel, and the checks read them back at the end.
CMDLINE = "root=/dev/vda rw console=ttyS0 quiet virtio_net.dyndbg=+p log_buf_len=16M"
# With -icount, idle time (waiting for the disk or for QEMU's network) still
# passes at the host's pace; sleep=off would instead jump the guest clock to its
# next timer, seconds at a time, at moments that depend on the host.
ICOUNT_SLEEP = "on"
DEFAULT_TIMEOUT = 600.0  # TCG on a busy two-core machine: generous on purpose
# The login report's last line.
DONE = "@@done"

# The kernel log lines the proof reads. NIC_REGISTERED is virtio_net's own
# message, printed right after register_netdev() returns.
NIC_REGISTERED = re.compile(r"virtnet: registered device (\S+)")
# earlyfw's boot hooks write one line to /dev/kmsg once nft has loaded a ruleset.
# (hooks/earlyfw-load.sh.j2): the rendered ruleset, or the drop-everything fallback.
BLOCK_LIVE = re.compile(r"earlyfw: (?:blocked: \S+ loaded|loaded the drop-everything fallback)")
DMESG_LINE = re.compile(r"^\[\s*(\d+\.\d+)\]\s?(.*)$")
EARLYFW_STATE = re.compile(r'comment "earlyfw state=(\w+)"')


@dataclass(frozen=True)
class KernelLine:
    uptime: float
    text: str


@dataclass(frozen=True)
class GuestReport:
    """What the guest said on its second serial port when it reached login."""

    login_uptime: float | None = None
    # When the guest stopped the capture window: login, then DHCP done (or 60 s).
    window_end_uptime: float | None = None
    kernel_log: tuple[KernelLine, ...] = ()
    sections: dict[str, str] = field(default_factory=dict)
    complete: bool = False

    def first(self, pattern: re.Pattern[str]) -> KernelLine | None:
        return next((line for line in self.kernel_log if pattern.search(line.text)), None)

    @property
    def block_live(self) -> float | None:
        line = self.first(BLOCK_LIVE)
        return line.uptime if line else None

    @property
    def nic_registered(self) -> float | None:
        line = self.first(NIC_REGISTERED)
        return line.uptime if line else None

    @property
    def nft_tables(self) -> tuple[str, ...]:
        return tuple(line.strip() for line in self.sections.get("nft-tables", "").splitlines() if line.strip())

    @property
    def failed_units(self) -> tuple[str, ...]:
        return tuple(line.split()[0] for line in self.sections.get("failed-units", "").splitlines() if line.strip())

    @property
    def addresses(self) -> str:
        return self.sections.get("addresses", "")

    @property
    def earlyfw_state(self) -> str | None:
        """The state table inet earlyfw says it is in at login."""
        m = EARLYFW_STATE.search(self.sections.get("earlyfw-table", ""))
        return m.group(1) if m else None

    def unit_times(self, unit: str) -> dict[str, float]:
        """When systemd started ("start") and finished starting ("end") `unit`
        (a target: when it was reached), in uptime. Before journald runs,
        systemd logs to the kernel log only, so both logs are searched (the
        journal's earlyfw units; all of systemd's unit lines where a guest
        reports them, as the WireGuard guests do)."""
        lines = [*self.kernel_log]
        for section in ("journal", "timeline"):
            for text in self.sections.get(section, "").splitlines():
                m = DMESG_LINE.match(text)
                if m:
                    lines.append(KernelLine(float(m.group(1)), m.group(2)))
        times: dict[str, float] = {}
        pattern = re.compile(rf"systemd\[1\]: (Starting|Finished|Started|Reached target) {re.escape(unit)}\b")
        for line in sorted(lines, key=lambda line: line.uptime):
            verb = pattern.search(line.text)
            if verb:
                times.setdefault("start" if verb.group(1) == "Starting" else "end", line.uptime)
        return times

    def unit_seconds(self, unit: str) -> float | None:
        """How long systemd took to start `unit`."""
        times = self.unit_times(unit)
        return round(times["end"] - times["start"], 3) if {"start", "end"} <= times.keys() else None


def parse_report(text: str) -> GuestReport:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    login: float | None = None
    window_end: float | None = None
    complete = False
    for raw in text.replace("\r", "").splitlines():
        if raw.startswith("@@login "):
            login = float(raw.split()[1])
        elif raw.startswith("@@window-end "):
            window_end = float(raw.split()[1])
        elif raw == "@@done":
            complete = True
            current = None
        elif raw.startswith("@@"):
            current = sections.setdefault(raw[2:], [])
        elif current is not None:
            current.append(raw)
    kernel: list[KernelLine] = []
    for line in sections.get("dmesg", []):
        m = DMESG_LINE.match(line)
        if m:
            kernel.append(KernelLine(float(m.group(1)), m.group(2)))
    return GuestReport(
        login_uptime=login,
        window_end_uptime=window_end,
        kernel_log=tuple(kernel),
        sections={name: "\n".join(lines) for name, lines in sections.items()},
        complete=complete,
    )


@dataclass(frozen=True)
class Outcome:
    image: Image
    run_dir: Path
    report: GuestReport
    capture: pcap.Capture
    # Host seconds from starting QEMU to the guest's login line; None if it never came.
    wall_to_login: float | None
    timed_out: bool

    @property
    def console_tail(self) -> str:
        path = self.run_dir / "console.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.replace("\r", "").splitlines()[-40:])


def qemu_argv(image: Image, run_dir: Path, *, icount: int | None = None, writable: bool = False) -> list[str]:
    """QEMU's command line. With `icount`, the guest's clock counts executed
    instructions (2**icount ns each) instead of host time, so its boot time
    hardly depends on how busy the host is: what a benchmark on a shared
    machine needs. icount runs every vCPU on one host thread, and a second
    vCPU never comes up under it with sleep=off (QEMU 7.2), so those boots
    have one. `writable`: the guest's writes go to the disk image (a copy the
    caller made), for a next boot, and its flushes are not passed on
    (cache=unsafe: the image is read again only after QEMU exited, and dpkg's
    fsync per file would cost the host's disk a flush each); otherwise they go
    to a throwaway overlay."""
    clock = ["-icount", f"shift={icount},sleep={ICOUNT_SLEEP}"] if icount is not None else []
    cpus = "2" if icount is None else "1"
    return [
        "qemu-system-x86_64",
        "-accel", "tcg",
        # RDRAND (every x86-64 CPU since 2012) seeds the kernel's RNG at once;
        # without it boots stall, for a random while, waiting for entropy.
        "-cpu", "qemu64,+rdrand",
        "-smp", cpus,
        "-m", "1024",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-rtc", f"base={RTC_BASE},clock=vm",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", " ".join(filter(None, (CMDLINE, image.variant.cmdline))),
        "-drive", f"file={image.disk},format=raw,if=virtio," + ("cache=unsafe" if writable else "snapshot=on"),
        # Both families named: naming only one turns the other off.
        "-netdev", "user,id=n0,ipv4=on,ipv6=on",
        "-device", f"virtio-net-pci,netdev=n0,mac={pcap.GUEST_MAC}",
        "-object", f"filter-dump,id=f0,netdev=n0,file={run_dir / 'capture.pcap'}",
        "-device", "virtio-rng-pci",
        "-serial", f"file:{run_dir / 'console.log'}",
        "-serial", f"file:{run_dir / 'report.log'}",
        *clock,
    ]  # fmt: skip


def boot(
    image: Image,
    run_dir: Path,
    endpoints: tuple[Endpoint, ...],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    icount: int | None = None,
    isolated: Sequence[str] = (),
    until: str | None = DONE,
    writable: bool = False,
) -> Outcome:
    """Power the guest on, wait for its login report (or the timeout), power it off.
    `isolated` are options to qemu.isolated (a WireGuard peer beside QEMU).
    `until`: the report's line that ends the run; None: the guest powers
    itself off (what it wrote to its disk is then complete, for a next boot)."""
    sh.require("qemu-system-x86_64", "unshare")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("capture.pcap", "console.log", "report.log", "qemu.log"):
        (run_dir / stale).unlink(missing_ok=True)
    argv = [
        # A private user and network namespace: only loopback, so QEMU's
        # user-mode network has nowhere to send anything the guest lets out.
        "unshare", "--map-root-user", "--net", "--",
        sys.executable, "-m", "qemu.isolated", *isolated, "--",
        *qemu_argv(image, run_dir, icount=icount, writable=writable),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "TZ": "UTC"}
    report_log = run_dir / "report.log"
    with (run_dir / "qemu.log").open("wb") as qemu_log:
        print("+ " + " ".join(argv), file=sys.stderr, flush=True)
        started = time.monotonic()
        process = subprocess.Popen(argv, stdout=qemu_log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        wall_to_login: float | None = None
        timed_out = False
        try:
            while True:
                text = report_log.read_text(errors="replace") if report_log.exists() else ""
                if wall_to_login is None and "@@login " in text:
                    wall_to_login = time.monotonic() - started
                if (until is not None and until in text) or process.poll() is not None:
                    break
                if time.monotonic() - started > timeout:
                    timed_out = True
                    break
                time.sleep(0.1)
        finally:
            _stop(process)
    if process.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL) and wall_to_login is None:
        output = (run_dir / "qemu.log").read_text(errors="replace")[-2000:]
        raise sh.HarnessError(f"QEMU exited with status {process.returncode}: {output}")
    report = parse_report(report_log.read_text(errors="replace") if report_log.exists() else "")
    capture = pcap.analyse(run_dir / "capture.pcap", endpoints, epoch=RTC_EPOCH)
    return Outcome(image, run_dir, report, capture, wall_to_login, timed_out)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
