"""The watcher target (every Linux system with systemd): earlyfw-watch.service
runs `earlyfw watch`, which relaxes the boot block only on the tunnel's
handshake; earlyfw-sleep.service locks before suspend; for OpenVPN without a
management socket, the --up/--down hook the watcher follows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from earlyfw import templates
from earlyfw.config import Config, TunnelKind
from earlyfw.linux import boot, nft
from earlyfw.linux.systemd import NETWORK_MANAGERS, UNIT_DIR
from earlyfw.linux.watcher.ruleset import WAKE_MODULES
from earlyfw.root import Root
from earlyfw.system import System
from earlyfw.targets import Artifact, File, Plan, Symlink, Target

WATCH_UNIT = "earlyfw-watch.service"
SLEEP_UNIT = "earlyfw-sleep.service"
WANTS = {WATCH_UNIT: "multi-user.target", SLEEP_UNIT: "sleep.target"}
# What can bring a tunnel up starts only once the watcher is ready: the
# watcher names these in Before= (besides network-pre.target, which orders the
# rest)...
ORDERED_BEFORE = tuple(unit for unit in NETWORK_MANAGERS if "@." not in unit)
# ...and templates, which Before= cannot name, get a drop-in ordering every
# instance after it (wg-quick@ comes after network-online.target anyway).
ORDER_TEMPLATES = (*(unit for unit in NETWORK_MANAGERS if "@." in unit), "wg-quick@.service")
ORDER_DROP_IN = "earlyfw-watch.conf"
OPENVPN_HOOK = "/usr/lib/earlyfw/openvpn-hook"


def render_unit(unit: str) -> bytes:
    return boot.render(f"units/{unit}.j2", network_managers=ORDERED_BEFORE, wake_modules=WAKE_MODULES)


def openvpn_notes(config: Config) -> tuple[str, ...]:
    if config.tunnel_kind is not TunnelKind.OPENVPN:
        return ()
    if config.openvpn_management is not None:
        return (
            f"add `management {config.openvpn_management} unix` to the OpenVPN client config: "
            "earlyfw watch relaxes on its CONNECTED state",
        )
    return (
        f"add `script-security 2`, `up {OPENVPN_HOOK}` and `down {OPENVPN_HOOK}` to the OpenVPN client config "
        "(or set [watch] openvpn_management): earlyfw watch follows the hook",
    )


class Watcher(Target):
    name: ClassVar[str] = "watch"
    system: ClassVar[System] = System.LINUX
    # After the systemd target, whose earlyfw-block.service this unit follows.
    order: ClassVar[int] = 25
    # Its units run the switch script (earlyfw=off) that the systemd target installs.
    requires: ClassVar[tuple[str, ...]] = ("systemd",)

    @classmethod
    def detect(cls, root: Root) -> bool:
        return boot.has_systemd(root)

    def plan(self, config: Config) -> Plan:
        artifacts: list[Artifact] = []
        for unit, target in WANTS.items():
            artifacts.append(File(f"{UNIT_DIR}/{unit}", render_unit(unit)))
            artifacts.append(Symlink(f"{UNIT_DIR}/{target}.wants/{unit}", f"{UNIT_DIR}/{unit}"))
        order = boot.render("units/watch-order.conf.j2")
        artifacts += [File(f"{UNIT_DIR}/{unit}.d/{ORDER_DROP_IN}", order) for unit in ORDER_TEMPLATES]
        if config.tunnel_kind is TunnelKind.OPENVPN:
            hook = templates.read("payload", "openvpn/earlyfw-openvpn-hook").encode()
            artifacts.append(File(OPENVPN_HOOK, hook, 0o755))
        return Plan(self.name, tuple(artifacts), openvpn_notes(config))

    def after_install(self, config: Config) -> None:
        if self._systemd_running():
            self.runner.run(["systemctl", "daemon-reload"])
            # A running watcher picks up the new config; one not running starts
            # at the next boot (or with `systemctl start earlyfw-watch`).
            self.runner.run(["systemctl", "try-restart", WATCH_UNIT])
        for note in openvpn_notes(config):
            print(f"earlyfw: next: {note}")

    def after_uninstall(self) -> None:
        for _, step in self.uninstall_steps():
            step()

    def uninstall_steps(self) -> list[tuple[str, Callable[[], object]]]:
        # Separate steps, so that uninstall runs each even if one before it failed.
        if not self._systemd_running():
            return []
        return [
            (f"systemctl stop {WATCH_UNIT}", lambda: self.runner.run(["systemctl", "stop", WATCH_UNIT], check=False)),
            ("systemctl daemon-reload", lambda: self.runner.run(["systemctl", "daemon-reload"])),
            # The core target removed the tables before this ran, and the watcher,
            # still running then, put them back: remove them again.
            ("delete earlyfw's nft tables", lambda: nft.delete_tables(self.runner)),
        ]

    def _systemd_running(self) -> bool:
        return self.root.exists("/run/systemd/system")
