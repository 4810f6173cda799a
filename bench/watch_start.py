"""How soon `earlyfw watch` is ready after it is started, against a baseline
tree in the same run (rounds alternate between the two).

  help:    `python -X importtime -m earlyfw --help`: all import time reported
           (the top-level entries' cumulative sum).
  ready:   exec -> READY=1 (sd_notify; what systemd waits for before starting
           the tunnel units ordered after the watcher) for
           `earlyfw --quiet --config C watch`, in a throwaway namespace, its
           WireGuard interface absent as at boot (see tests/ready.py); wall
           clock, and the watcher's CPU time at READY=1 (clock ticks).
  imports: the same start under -X importtime: import time until it stopped.
  frozen:  ready for the one-directory PyInstaller builds of both trees
           (--build-frozen builds them, about a minute each on two cores; or
           give --frozen and --frozen-baseline).
  instructions (--instructions, with the frozen builds): the frozen watcher
           under valgrind's callgrind, exec -> READY=1 -> SIGTERM and exit,
           instructions executed in user space: what the QEMU guests'
           instruction counter charges, whatever the host's load.

Both trees run staged alike, in the wheel's package layout on PYTHONPATH:
this worktree as it is on disk, and BASELINE from `git archive` (default
b031c56, the last commit before the watcher's start was made lighter).

  python3 bench/watch_start.py [--rounds 20] [--baseline REV] [--build-frozen] [--instructions]
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import netns, ready

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "b031c56"
FOLDERS = ("payload", "hooks", "units")


def unpack(rev: str, into: Path) -> Path:
    """The tree at `rev`, from git archive."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        archive.extractall(into, filter="data")
    return into


def stage(tree: Path, into: Path) -> Path:
    """`tree`'s package as the wheel lays it out (earlyfw.payload...); a PYTHONPATH entry."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(tree / "installer" / "earlyfw", into / "earlyfw", ignore=ignore)
    for folder in FOLDERS:
        shutil.copytree(tree / folder, into / "earlyfw" / folder, ignore=ignore)
    return into


def build_frozen(tree: Path, into: Path) -> Path:
    subprocess.run(
        [
            *(sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN"),
            *("--distpath", str(into / "dist"), "--workpath", str(into / "work")),
            str(tree / "installer" / "earlyfw.spec"),
        ],
        check=True,
    )
    return into / "dist" / "earlyfw" / "earlyfw"


def row(name: str, unit: str, baseline: Sequence[float], new: Sequence[float]) -> str:
    b, n = statistics.median(baseline), statistics.median(new)
    return (
        f"{name:34} baseline {b:8.1f} {unit}  new {n:8.1f} {unit}  new/baseline {n / b:5.2f}  "
        f"(n={len(new)}, new min {min(new):.1f} max {max(new):.1f})"
    )


def alternate(rounds: int, measure: Callable[[str], tuple[float, ...]]) -> dict[str, list[tuple[float, ...]]]:
    """`rounds` of measure("baseline") and measure("new"), interleaved, after one unmeasured warm-up each."""
    results: dict[str, list[tuple[float, ...]]] = {"baseline": [], "new": []}
    for which in results:
        measure(which)
    for _ in range(rounds):
        for which, values in results.items():
            values.append(measure(which))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare with [%(default)s]")
    parser.add_argument("--build-frozen", action="store_true", help="build both trees' one-directory binaries")
    parser.add_argument("--frozen", type=Path, help="this tree's frozen executable (dist/earlyfw/earlyfw)")
    parser.add_argument("--frozen-baseline", type=Path, help="the baseline's frozen executable")
    parser.add_argument(
        "--instructions", action="store_true", help="also count the frozen watchers' instructions (valgrind)"
    )
    args = parser.parse_args()
    netns.require_tools(["ip", "nft", *(["valgrind"] if args.instructions else [])])

    with tempfile.TemporaryDirectory(prefix="efw-bench-start-") as scratch, netns.Lab() as lab:
        work = Path(scratch)
        old_tree = unpack(args.baseline, work / "baseline-tree")
        paths = {"baseline": stage(old_tree, work / "baseline"), "new": stage(ROOT, work / "new")}
        frozen: dict[str, Path] = {}
        if args.build_frozen:
            frozen = {
                "baseline": build_frozen(old_tree, work / "frozen-baseline"),
                "new": build_frozen(ROOT, work / "frozen-new"),
            }
        elif args.frozen and args.frozen_baseline:
            frozen = {"baseline": args.frozen_baseline, "new": args.frozen}
        ns = lab.namespace("efwb")
        config = ready.watch_config(lab, work)
        watch = ("--quiet", "--config", str(config), "watch")

        def env(which: str) -> dict[str, str]:
            return {"PYTHONPATH": str(paths[which])}

        def help_imports(which: str) -> tuple[float, ...]:
            result = subprocess.run(
                [sys.executable, "-X", "importtime", "-m", "earlyfw", "--help"],
                env={**os.environ, **env(which)},
                capture_output=True,
                text=True,
                check=True,
            )
            return (ready.import_total_us(result.stderr) / 1000,)

        def start(which: str) -> tuple[float, ...]:
            started = ready.start_until_ready(ns, (sys.executable, "-m", "earlyfw", *watch), env=env(which))
            return started.seconds * 1000, started.cpu * 1000

        def start_imports(which: str) -> tuple[float, ...]:
            argv = (sys.executable, "-X", "importtime", "-m", "earlyfw", *watch)
            started = ready.start_until_ready(ns, argv, env=env(which))
            return (ready.import_total_us(started.stderr) / 1000,)

        def start_frozen(which: str) -> tuple[float, ...]:
            started = ready.start_until_ready(ns, (str(frozen[which]), *watch))
            return started.seconds * 1000, started.cpu * 1000

        print(f"baseline {args.baseline} against this worktree, {args.rounds} rounds each, medians")
        found = alternate(args.rounds, help_imports)
        print(row("--help: import time", "ms", *([v[0] for v in found[w]] for w in ("baseline", "new"))))
        found = alternate(args.rounds, start_imports)
        print(row("watch: import time to stop", "ms", *([v[0] for v in found[w]] for w in ("baseline", "new"))))
        found = alternate(args.rounds, start)
        print(row("watch: exec -> READY=1", "ms", *([v[0] for v in found[w]] for w in ("baseline", "new"))))
        print(row("watch: CPU at READY=1", "ms", *([v[1] for v in found[w]] for w in ("baseline", "new"))))
        if frozen:
            found = alternate(args.rounds, start_frozen)
            print(row("frozen watch: exec -> READY=1", "ms", *([v[0] for v in found[w]] for w in ("baseline", "new"))))
            print(row("frozen watch: CPU at READY=1", "ms", *([v[1] for v in found[w]] for w in ("baseline", "new"))))
        if frozen and args.instructions:
            count_instructions(ns, frozen, watch, work, min(args.rounds, 3))


def count_instructions(
    ns: netns.Namespace, frozen: dict[str, Path], watch: tuple[str, ...], work: Path, rounds: int
) -> None:
    """Each frozen watcher under callgrind (deterministic to a fraction of a
    percent: a few rounds suffice)."""

    def counted(which: str) -> tuple[float, ...]:
        out = work / f"callgrind-{which}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        valgrind = ("valgrind", "--tool=callgrind", "--trace-children=yes", f"--callgrind-out-file={out}/%p")
        ready.start_until_ready(ns, (*valgrind, str(frozen[which]), *watch), timeout=600)
        return (sum(instructions(path) for path in out.iterdir()) / 1e6,)

    found = alternate(rounds, counted)
    print(row("frozen watch: instructions", "M", *([v[0] for v in found[w]] for w in ("baseline", "new"))))


def instructions(callgrind_out: Path) -> int:
    """The instructions one callgrind output file counted."""
    m = re.search(r"^summary: (\d+)$", callgrind_out.read_text(), re.M)
    return int(m.group(1)) if m else 0


if __name__ == "__main__":
    main()
