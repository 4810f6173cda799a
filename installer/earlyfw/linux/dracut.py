"""The dracut target: a dracut module that puts nft, its libraries, the
nf_tables modules and the initramfs ruleset into every initramfs and loads the
ruleset before udev, in shell-based (pre-udev hook) and systemd-based
(earlyfw-initrd.service) initrds alike."""

from __future__ import annotations

from typing import ClassVar

from earlyfw.config import Config
from earlyfw.linux import boot
from earlyfw.system import System
from earlyfw.targets import File, Plan

MODULE_DIR = "/usr/lib/dracut/modules.d/50earlyfw"
CONF = "/etc/dracut.conf.d/earlyfw.conf"
# Where the module puts the loader inside the initramfs.
LOADER = "/usr/sbin/earlyfw-load"


class Dracut(boot.InitramfsTarget):
    name: ClassVar[str] = "dracut"
    system: ClassVar[System] = System.LINUX
    generator_name: ClassVar[str] = "dracut"

    def plan(self, config: Config) -> Plan:
        def template(name: str) -> bytes:
            return boot.render(name, loader=LOADER)

        return self.plan_of(
            boot.executable(f"{MODULE_DIR}/module-setup.sh", template("hooks/dracut/module-setup.sh.j2")),
            boot.executable(f"{MODULE_DIR}/earlyfw-load.sh", boot.loader()),
            boot.executable(f"{MODULE_DIR}/earlyfw-pre-udev.sh", template("hooks/dracut/earlyfw-pre-udev.sh.j2")),
            File(f"{MODULE_DIR}/earlyfw-initrd.service", template("units/earlyfw-initrd.service.j2")),
            File(CONF, template("hooks/dracut/earlyfw.conf")),
        )
