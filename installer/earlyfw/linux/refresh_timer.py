"""The refresh target (every Linux system with systemd): earlyfw-refresh.timer
runs `earlyfw endpoints refresh`, which re-pins endpoints from their hostnames
through the tunnel. Installed but not enabled: the user turns it on.
"""

from __future__ import annotations

from typing import ClassVar

from earlyfw.config import Config
from earlyfw.linux import boot
from earlyfw.linux.systemd import UNIT_DIR
from earlyfw.root import Root
from earlyfw.system import System
from earlyfw.targets import File, Plan, Target

REFRESH_SERVICE = "earlyfw-refresh.service"
REFRESH_TIMER = "earlyfw-refresh.timer"


class Refresh(Target):
    name: ClassVar[str] = "refresh"
    system: ClassVar[System] = System.LINUX
    order: ClassVar[int] = 26  # beside the watcher, whose service it runs after

    @classmethod
    def detect(cls, root: Root) -> bool:
        return boot.has_systemd(root)

    def plan(self, config: Config) -> Plan:
        units = (REFRESH_SERVICE, REFRESH_TIMER)
        # No timers.target.wants link: off until `systemctl enable --now earlyfw-refresh.timer`.
        notes: tuple[str, ...] = ()
        if any(e.host for e in config.endpoints):
            notes = (f"to keep the endpoint pins fresh: systemctl enable --now {REFRESH_TIMER}",)
        return Plan(self.name, tuple(File(f"{UNIT_DIR}/{u}", boot.render(f"units/{u}.j2")) for u in units), notes)
