"""The one command: `python3 -m qemu` builds every guest (cached), boots each
once under QEMU TCG, prints the per-boot report and exits non-zero unless every
boot showed what it must (no leak with earlyfw; leaks from the controls and
the mutant).

    python3 -m qemu                      # the whole proof
    python3 -m qemu dracut control-dracut
    python3 -m qemu --list
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from qemu import boot, package, proof
from qemu.guest import VARIANTS
from qemu.sh import HarnessError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m qemu", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("variants", nargs="*", metavar="VARIANT", help="boot only these (default: all)")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    parser.add_argument("--timeout", type=float, default=boot.DEFAULT_TIMEOUT, help="seconds to wait for login")
    args = parser.parse_args(argv)
    if args.list:
        for variant in VARIANTS.values():
            print(f"{variant.name:24} {variant.summary}")
        return 0
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    chosen = [VARIANTS[name] for name in args.variants] or list(VARIANTS.values())
    started = time.monotonic()
    verdicts: list[proof.Verdict] = []
    try:
        # The package guest's .debs, built from this tree (reproducibly: the
        # guest is rebuilt only if they changed).
        debs = (
            package.build_both(Path(tempfile.mkdtemp(prefix="earlyfw-debs-")))
            if any(v.package for v in chosen)
            else None
        )
        for variant in chosen:
            verdict = proof.run(variant, timeout=args.timeout, debs=debs)
            print(verdict.explain(), flush=True)
            verdicts.append(verdict)
    except HarnessError as e:
        print(f"qemu proof: error: {e}", file=sys.stderr)
        return 2
    elapsed = time.monotonic() - started
    print()
    print(proof.table(verdicts))
    print(f"\n{sum(v.passed for v in verdicts)}/{len(verdicts)} boots as required, in {elapsed:.0f} s")
    proof.RUNS.mkdir(parents=True, exist_ok=True)
    (proof.RUNS / "summary.json").write_text(
        json.dumps({"elapsed_s": round(elapsed, 1), "boots": [proof.summary(v) for v in verdicts]}, indent=2) + "\n"
    )
    return 0 if all(v.passed for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
