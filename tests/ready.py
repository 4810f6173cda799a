"""`earlyfw watch` from exec to READY=1: what systemd waits for (Type=notify)
before it starts the tunnel units ordered after the watcher.

The watcher runs in a namespace the caller created, with NOTIFY_SOCKET naming
a datagram socket this process listens on (a path, not an abstract name:
those are per network namespace). It is forked from a thread inside the
namespace, so nothing (no `ip netns exec`) runs between fork and its exec.

Used by tests/test_watch_start.py and bench/watch_start.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from earlyfw.linux.watcher.daemon import verdict_path
from tests.netns import Lab, Namespace, unique
from tests.watch_lab import config_for, write_config

TICKS = os.sysconf("SC_CLK_TCK")
# `-X importtime` lines: "import time: self | cumulative | <depth spaces>name".
_IMPORT = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


@dataclass(frozen=True)
class Start:
    seconds: float  # exec to READY=1, wall clock
    cpu: float  # the watcher's user+system CPU at READY=1 (clock-tick resolution)
    stderr: str  # what it wrote until it was stopped (its log; import times with -X importtime)


def imported(stderr: str) -> list[str]:
    """The modules `-X importtime` reported, in order."""
    return [m[4] for line in stderr.splitlines() if (m := _IMPORT.match(line))]


def import_total_us(stderr: str) -> int:
    """All import time `-X importtime` reported: the top-level entries' cumulative sum."""
    return sum(int(m[2]) for line in stderr.splitlines() if (m := _IMPORT.match(line)) and m[3] == " ")


def watch_config(lab: Lab, directory: Path) -> Path:
    """A WireGuard config whose interface is not there (yet): the watcher
    starts blocked, waiting for it, as at boot."""
    interface = unique("efwr")
    lab.callback(verdict_path(interface).unlink, missing_ok=True)
    return write_config(directory, config_for(interface))


def start_until_ready(
    ns: Namespace,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
) -> Start:
    """Run `argv` (an `earlyfw ... watch` command) in `ns` until it sends
    READY=1, then stop it with SIGTERM (it locks and exits 0)."""
    with tempfile.TemporaryDirectory(prefix="efw-ready-") as directory:
        path = os.path.join(directory, "notify")
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener,
            open(os.path.join(directory, "stderr"), "w+b") as log,
        ):
            listener.bind(path)
            listener.settimeout(timeout)
            with ns.entered():
                began = time.perf_counter()
                process = subprocess.Popen(
                    list(argv),
                    env={**os.environ, **(env or {}), "NOTIFY_SOCKET": path},
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            try:
                try:
                    message = listener.recv(256)
                except TimeoutError:
                    message = b""
                seconds = time.perf_counter() - began
                cpu = _cpu(process.pid)
                if message != b"READY=1":
                    process.kill()
                    process.wait()
                    log.seek(0)
                    raise RuntimeError(f"{argv}: no READY=1 ({message!r}):\n{log.read().decode(errors='replace')}")
            finally:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    try:
                        process.wait(30)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
            log.seek(0)
            stderr = log.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{argv}: exited {process.returncode} on SIGTERM:\n{stderr}")
    return Start(seconds, cpu, stderr)


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS
