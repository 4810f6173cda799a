"""The QEMU boot proof: build small Debian 12 guests with and without earlyfw,
boot them under TCG with a capture on the NIC from power-on, and show from the
capture what left the guest before login."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GUEST_FILES = HERE / "guest"
# Guest trees, disk images and boot records: gigabytes, so outside the source
# tree (where mypy and editors would walk into them). CI caches this directory.
CACHE = Path(os.environ.get("EARLYFW_QEMU_CACHE", "/var/cache/earlyfw-qemu"))


@dataclass(frozen=True)
class GuestFile:
    """A file of the proof's own (under qemu/guest/) and where the guest gets it."""

    source: str
    path: str
    mode: int = 0o644
