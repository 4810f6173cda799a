"""The systemd target (every Linux system with systemd): earlyfw-block.service
loads the blocked ruleset with plain `nft -f` before network-pre.target, so a
machine is blocked before networking even without an initramfs hook; drop-ins
make the network managers require it (fail closed) and keep nftables.service's
`flush ruleset` from removing earlyfw's table.
"""

from __future__ import annotations

from typing import ClassVar

from earlyfw.config import Config
from earlyfw.linux import boot, firewalls
from earlyfw.linux.core import CONFIG_DIR
from earlyfw.root import Root
from earlyfw.run import Runner
from earlyfw.system import System
from earlyfw.targets import Artifact, File, Plan, Symlink, Target

UNIT_DIR = firewalls.UNIT_DIR
BLOCK_UNIT = "earlyfw-block.service"
FAILED_UNIT = "earlyfw-block-failed.service"
OFF_UNIT = "earlyfw-off.service"
# Both start with the system, whatever else is enabled.
WANTED_BY = "sysinit.target"

# Every service that configures addresses and routes; each gets
# Requires=/After=earlyfw-block.service. A drop-in for a unit that does not
# exist is inert, so the list can be generous.
NETWORK_MANAGERS = (
    "systemd-networkd.service",
    "NetworkManager.service",
    "networking.service",  # ifupdown, `auto` interfaces
    "ifup@.service",  # ifupdown, `allow-hotplug` interfaces (Debian's default)
    "dhcpcd.service",
    "connman.service",
    "iwd.service",  # with EnableNetworkConfiguration it runs DHCP itself
)
DROP_IN = "earlyfw.conf"

NFTABLES_DIR = f"{CONFIG_DIR}/nftables"
NFTABLES_STATES = ("start", "reload", "stop")


def drop_in(unit: str) -> str:
    return f"{UNIT_DIR}/{unit}.d/{DROP_IN}"


def nftables_wrapper(state: str) -> str:
    return f"{NFTABLES_DIR}/{state}.nft"


class Systemd(Target):
    name: ClassVar[str] = "systemd"
    system: ClassVar[System] = System.LINUX
    order: ClassVar[int] = 20

    def __init__(self, root: Root, runner: Runner) -> None:
        super().__init__(root, runner)
        self.nftables_conf = firewalls.nftables_conf(root)

    @classmethod
    def detect(cls, root: Root) -> bool:
        return boot.has_systemd(root)

    def plan(self, config: Config) -> Plan:
        context = {
            "nftables_conf": self.nftables_conf,
            **{f"nftables_{state}": nftables_wrapper(state) for state in NFTABLES_STATES},
        }
        artifacts: list[Artifact] = [
            File(f"{UNIT_DIR}/{BLOCK_UNIT}", boot.render("units/earlyfw-block.service.j2")),
            File(f"{UNIT_DIR}/{FAILED_UNIT}", boot.render("units/earlyfw-block-failed.service.j2")),
            File(f"{UNIT_DIR}/{OFF_UNIT}", boot.render("units/earlyfw-off.service.j2")),
            Symlink(f"{UNIT_DIR}/{WANTED_BY}.wants/{BLOCK_UNIT}", f"{UNIT_DIR}/{BLOCK_UNIT}"),
            Symlink(f"{UNIT_DIR}/{WANTED_BY}.wants/{OFF_UNIT}", f"{UNIT_DIR}/{OFF_UNIT}"),
            boot.executable(boot.SWITCH, boot.render("units/earlyfw-switch.j2")),
            boot.executable(boot.EGRESS_ATTACH, boot.render("units/earlyfw-egress.j2")),
            File(boot.EGRESS_RULE, boot.render("units/udev/earlyfw-egress.rules")),
            File(boot.FALLBACK_RULESET, boot.fallback().encode()),
        ]
        if config.egress_interfaces:
            artifacts += [
                File(boot.EGRESS_RULESET, boot.egress_ruleset(config)),
                File(boot.EGRESS_INTERFACES, "".join(f"{name}\n" for name in config.egress_interfaces).encode()),
            ]
        network = boot.render("units/network-manager.conf.j2")
        artifacts += [File(drop_in(unit), network) for unit in NETWORK_MANAGERS]
        artifacts.append(File(firewalls.NFTABLES_DROP_IN, boot.render("units/nftables.conf.j2", **context)))
        artifacts += [
            File(nftables_wrapper(state), boot.render(f"units/nftables/{state}.nft.j2", **context))
            for state in NFTABLES_STATES
        ]
        return Plan(self.name, tuple(artifacts))

    def after_install(self, config: Config) -> None:
        self._daemon_reload()

    def after_uninstall(self) -> None:
        self._daemon_reload()
        # earlyfw-block.service (oneshot, RemainAfterExit) would stay "active
        # (exited)" in systemd's memory with its file gone. Stopping it runs
        # nothing (it has no ExecStop) and lets systemd forget it. Only after
        # the reload: until then the network managers' drop-ins still say
        # Requires=, and the stop would stop them too (a DHCP lease lost).
        if self.root.exists("/run/systemd/system"):
            self.runner.run(["systemctl", "stop", BLOCK_UNIT], check=False)

    def _daemon_reload(self) -> None:
        # Only a running systemd has units to reload (not a container or chroot).
        if self.root.exists("/run/systemd/system"):
            self.runner.run(["systemctl", "daemon-reload"])
