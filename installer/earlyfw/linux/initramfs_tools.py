"""The initramfs-tools target: a build hook that copies nft, its libraries,
the nf_tables modules and the initramfs ruleset into the image, and an
init-top script (ordered before udev's) that loads the ruleset."""

from __future__ import annotations

from typing import ClassVar

from earlyfw.config import Config
from earlyfw.linux import boot
from earlyfw.system import System
from earlyfw.targets import Plan

HOOK = "/etc/initramfs-tools/hooks/earlyfw"
# init-top runs first, and "earlyfw" sorts before "udev", the init-top script
# that starts udevd; neither names the other as a prerequisite.
SCRIPT = "/etc/initramfs-tools/scripts/init-top/earlyfw"

# initramfs-tools runs init-top scripts as children of init, so the loader
# stops the boot itself when nothing could be loaded.
PANIC = (
    "# shellcheck source=/dev/null\n"
    ". /scripts/functions\n"
    f'panic "earlyfw: no firewall could be loaded; boot with {boot.BREAK_GLASS} to go on without earlyfw"'
)


class InitramfsTools(boot.InitramfsTarget):
    name: ClassVar[str] = "initramfs-tools"
    system: ClassVar[System] = System.LINUX
    generator_name: ClassVar[str] = "initramfs-tools"

    def plan(self, config: Config) -> Plan:
        return self.plan_of(
            boot.executable(HOOK, boot.render("hooks/initramfs-tools/hook.j2")),
            boot.executable(SCRIPT, boot.loader(unprotected=PANIC)),
        )
