"""The anchor in bench/boot.py is a fair comparison: the same guest, the same
blocked ruleset earlyfw installs, loaded the way Mullvad's early-boot unit
does (a oneshot before network-pre.target), and nothing in the initramfs.
The boots themselves are bench/boot.py's."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from qemu import GUEST_FILES, guest
from qemu.base import GuestGenerator
from qemu.guest import VARIANTS, Change

from earlyfw.targets import File


def test_the_anchor_loads_earlyfws_own_blocked_ruleset() -> None:
    installed = {a.path: a.content for a in guest.rendered(VARIANTS["initramfs-tools"]) if isinstance(a, File)}
    assert guest.anchor_ruleset() == installed["/etc/earlyfw/blocked.nft"]
    assert b"table inet earlyfw" in guest.anchor_ruleset()


def test_the_anchor_guests_have_no_earlyfw_and_nothing_in_the_initramfs() -> None:
    for generator in GuestGenerator:
        variant = VARIANTS[f"anchor-{generator}"]
        assert variant.change is Change.ANCHOR and variant.generator is generator
        assert not variant.earlyfw and variant.targets == () and guest.rendered(variant) == []
        # A comparison, not a control: the proof does not demand it leak.
        assert not variant.expect_leaks


def test_the_anchor_unit_verifies_and_runs_before_the_network(tmp_path: Path) -> None:
    unit = tmp_path / guest.ANCHOR_UNIT.source
    unit.write_bytes((GUEST_FILES / guest.ANCHOR_UNIT.source).read_bytes())
    text = unit.read_text()
    for line in ("DefaultDependencies=no", "Type=oneshot", "Before=network-pre.target basic.target"):
        assert line in text
    assert f"ExecStart=/usr/sbin/nft -f {guest.ANCHOR_RULESET}" in text
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
