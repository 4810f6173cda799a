"""The mkinitcpio target: install/earlyfw (build, help) and hooks/earlyfw
(run_earlyhook) under /etc/initcpio, plus earlyfw-initrd.service for systemd
images, and a mkinitcpio.conf.d drop-in that puts earlyfw before udev/systemd
in HOOKS, so /etc/mkinitcpio.conf itself is never edited."""

from __future__ import annotations

import sys
from typing import ClassVar

from earlyfw.config import Config
from earlyfw.errors import EarlyfwError
from earlyfw.linux import boot
from earlyfw.root import Transaction
from earlyfw.system import System
from earlyfw.targets import File, Plan

INSTALL = "/etc/initcpio/install/earlyfw"
HOOK = "/etc/initcpio/hooks/earlyfw"
CONF = "/etc/mkinitcpio.conf.d/earlyfw.conf"
SOURCE_DIR = "/usr/lib/earlyfw/initcpio"
LOADER_SOURCE = f"{SOURCE_DIR}/earlyfw-load"
UNIT_SOURCE = f"{SOURCE_DIR}/earlyfw-initrd.service"
# Where the build hook puts the loader inside the initramfs.
LOADER = "/usr/bin/earlyfw-load"

BINARIES = ("/usr/bin/mkinitcpio", "/usr/sbin/mkinitcpio")
PRESET_DIR = "/etc/mkinitcpio.d"


class Mkinitcpio(boot.InitramfsTarget):
    name: ClassVar[str] = "mkinitcpio"
    system: ClassVar[System] = System.LINUX
    generator_name: ClassVar[str] = "mkinitcpio"

    def plan(self, config: Config) -> Plan:
        context = {"loader": LOADER, "loader_source": LOADER_SOURCE, "unit_source": UNIT_SOURCE}
        return self.plan_of(
            File(INSTALL, boot.render("hooks/mkinitcpio/install.j2", **context)),
            File(HOOK, boot.render("hooks/mkinitcpio/hook.j2", **context)),
            File(CONF, boot.render("hooks/mkinitcpio/earlyfw.conf")),
            boot.executable(LOADER_SOURCE, boot.loader()),
            File(UNIT_SOURCE, boot.render("units/earlyfw-initrd.service.j2", **context)),
        )

    def apply(self, plan: Plan, txn: Transaction) -> None:
        self._check_drop_ins_are_read()
        super().apply(plan, txn)

    def _check_drop_ins_are_read(self) -> None:
        """The HOOKS edit is a conf.d drop-in: mkinitcpio reads those since v36,
        and only for the default config (a preset's *_config turns them off)."""
        # No binary: files for an image whose mkinitcpio is installed later.
        binary = next((b for b in BINARIES if self.root.exists(b)), None)
        if binary is not None and b"mkinitcpio.conf.d" not in self.root.read_bytes(binary):
            raise EarlyfwError(
                f"{self.root / binary} is older than mkinitcpio 36: it does not read {CONF}",
                hint="upgrade mkinitcpio, or add 'earlyfw' before 'udev'/'systemd' in HOOKS in /etc/mkinitcpio.conf "
                "yourself and install with the other targets only",
            )
        presets = self.root / PRESET_DIR
        for preset in sorted(presets.glob("*.preset")) if presets.is_dir() else ():
            for line in preset.read_text(errors="replace").splitlines():
                if line.lstrip().split("=", 1)[0].endswith("_config") and not line.lstrip().startswith("#"):
                    print(
                        f"earlyfw: warning: {preset} sets {line.strip()}: mkinitcpio then ignores {CONF}; "
                        "comment that line out or add 'earlyfw' before 'udev'/'systemd' in that config's HOOKS",
                        file=sys.stderr,
                    )
