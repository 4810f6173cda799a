"""What the Linux boot targets share: the fixed paths their templates name,
the kernel modules the ruleset needs, which initramfs generator a system uses,
and running that generator (on the host, or inside an image with chroot).

Every value a template receives from here is a constant, so nothing from the
config or the filesystem is ever interpolated into a shell script or a unit.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import distro

from earlyfw import policy, templates
from earlyfw.config import Config
from earlyfw.linux.core import CONFIG_DIR, ruleset_path
from earlyfw.policy import State
from earlyfw.root import STATE_DIR, Root
from earlyfw.run import Runner
from earlyfw.targets import File, Plan, Target

# Debian, Fedora and Arch all have nft at /usr/sbin/nft (on Arch /usr/sbin is a
# symlink to /usr/bin); units need an absolute path.
NFT = "/usr/sbin/nft"

# Loaded inside the initramfs; equals the blocked state plus [initramfs] allow.
INITRAMFS_RULESET = ruleset_path(State.INITRAMFS)
# Loaded after switch_root, replacing the initramfs allowances.
BLOCKED_RULESET = ruleset_path(State.BLOCKED)
# Drop-everything table for when the rendered ruleset cannot be loaded.
FALLBACK_RULESET = f"{CONFIG_DIR}/fallback.nft"

# The dpkg trigger Debian's initramfs-tools and dracut both take an interest in:
# activated from a package's maintainer script, dpkg runs the generator once, at
# the end of the run (`earlyfw install --initramfs-trigger`).
INITRAMFS_TRIGGER = "update-initramfs"
# Written before an install rebuilds the initramfs and removed once it did: an
# install that finds it rebuilds even if none of the initramfs's files changed.
INITRAMFS_PENDING = f"{STATE_DIR}/initramfs-pending"

# The kernel command-line switch that skips the block for one boot.
BREAK_GLASS = "earlyfw=off"
# The one reading of that switch for the units (units/earlyfw-switch.j2); the
# initramfs scripts carry the same function (hooks/earlyfw-switch.sh).
SWITCH = "/usr/lib/earlyfw/earlyfw-switch"

# Raw-socket egress at boot: udev runs EGRESS_ATTACH for each interface that
# appears, and earlyfw-block.service once before networking; it loads
# EGRESS_RULESET for the [egress] interfaces (EGRESS_INTERFACES) present.
EGRESS_ATTACH = "/usr/lib/earlyfw/earlyfw-egress"
EGRESS_RULESET = f"{CONFIG_DIR}/egress.nft"
EGRESS_INTERFACES = f"{CONFIG_DIR}/egress.interfaces"
EGRESS_RULE = "/etc/udev/rules.d/60-earlyfw-egress.rules"
# The placeholder in EGRESS_RULESET that the attach script replaces with the
# devices (an nft variable name, so the file stays nft syntax).
EGRESS_DEVICES_VARIABLE = "EARLYFW_EGRESS_DEVICES"

# What the initramfs ruleset needs: nf_tables itself and nothing else (see
# State.core_only), because every module loaded before udev delays the boot.
# A missing one fails the initramfs build. The blocked and relaxed rulesets
# use more (nft_ct, nft_reject_inet, nft_objref); after switch_root the kernel
# loads those on demand from the real root's modules.
REQUIRED_MODULES = ("nf_tables",)
# Built into nf_tables on current kernels, modules on older ones (before 4.17
# for the families, 4.x for counters); taken when they exist.
OPTIONAL_MODULES = ("nft_counter", "nf_tables_inet", "nf_tables_ipv4", "nf_tables_ipv6")
# What the blocked and relaxed rulesets add: ct state, reject, named counters.
BLOCKED_MODULES = ("nft_ct", "nft_reject_inet", "nft_objref")

# The shared loader's exit statuses (hooks/earlyfw-load.sh.j2).
LOADED, FALLBACK, UNPROTECTED = 0, 1, 2


@dataclass(frozen=True)
class InitramfsGenerator:
    """An initramfs generator a Linux system may use: how to recognise it and
    how to rebuild with it."""

    name: str
    binaries: tuple[str, ...]
    # Evidence that kernel installs run this generator, for when several are
    # installed (Debian ships dracut-core beside initramfs-tools).
    kernel_hooks: tuple[str, ...]
    distros: tuple[str, ...]
    rebuild: tuple[str, ...]


GENERATORS = (
    InitramfsGenerator(
        "dracut",
        ("/usr/bin/dracut", "/usr/sbin/dracut", "/sbin/dracut"),
        ("/etc/kernel/postinst.d/dracut", "/usr/lib/kernel/install.d/50-dracut.install"),
        ("fedora", "rhel", "centos", "rocky", "almalinux", "opensuse", "suse", "sles", "void", "gentoo"),
        ("dracut", "--force", "--regenerate-all"),
    ),
    InitramfsGenerator(
        "initramfs-tools",
        ("/usr/sbin/update-initramfs", "/sbin/update-initramfs"),
        ("/etc/kernel/postinst.d/initramfs-tools",),
        ("debian", "ubuntu", "linuxmint", "pop", "raspbian", "kali"),
        ("update-initramfs", "-u", "-k", "all"),
    ),
    InitramfsGenerator(
        "mkinitcpio",
        ("/usr/bin/mkinitcpio", "/usr/sbin/mkinitcpio"),
        ("/usr/share/libalpm/hooks/90-mkinitcpio-install.hook", "/usr/lib/kernel/install.d/50-mkinitcpio.install"),
        ("arch", "manjaro", "endeavouros", "artix"),
        ("mkinitcpio", "-P"),
    ),
)


def generator(name: str) -> InitramfsGenerator:
    return next(g for g in GENERATORS if g.name == name)


def distro_ids(root: Root) -> tuple[str, ...]:
    """ID and ID_LIKE of the system under `root`, from its os-release."""
    info = distro.LinuxDistribution(include_lsb=False, include_uname=False, root_dir=str(root.path))
    return (info.id(), *info.like().split())


def active_generator(root: Root) -> InitramfsGenerator | None:
    """The one initramfs generator the system under `root` uses: the only one
    installed, else the one wired into kernel installation, else the distro's."""
    installed = [g for g in GENERATORS if any(root.exists(b) for b in g.binaries)]
    if len(installed) <= 1:
        return installed[0] if installed else None
    hooked = [g for g in installed if any(root.exists(h) for h in g.kernel_hooks)]
    if len(hooked) == 1:
        return hooked[0]
    ids = distro_ids(root)
    for candidate in hooked or installed:
        if any(i in candidate.distros for i in ids):
            return candidate
    return None


def has_systemd(root: Root) -> bool:
    return any(root.exists(p) for p in ("/usr/lib/systemd/systemd", "/lib/systemd/systemd"))


def render(template: str, **context: object) -> bytes:
    """A boot template rendered with the shared constants."""
    return templates.render(
        template,
        nft=NFT,
        initramfs_ruleset=INITRAMFS_RULESET,
        blocked_ruleset=BLOCKED_RULESET,
        fallback_ruleset=FALLBACK_RULESET,
        break_glass=BREAK_GLASS,
        switch=SWITCH,
        egress_attach=EGRESS_ATTACH,
        egress_ruleset=EGRESS_RULESET,
        egress_interfaces=EGRESS_INTERFACES,
        egress_table=policy.EGRESS_TABLE,
        egress_variable=EGRESS_DEVICES_VARIABLE,
        required_modules=REQUIRED_MODULES,
        optional_modules=OPTIONAL_MODULES,
        blocked_modules=BLOCKED_MODULES,
        loaded=LOADED,
        fallback_loaded=FALLBACK,
        unprotected_status=UNPROTECTED,
        **context,
    ).encode()


def loader(*, unprotected: str = "") -> bytes:
    """The shell script that loads the initramfs ruleset before udev.
    `unprotected` is the generator's own way to halt when nothing could be
    loaded (initramfs-tools runs it as a child, so it panics itself)."""
    return render(
        "hooks/earlyfw-load.sh.j2",
        fallback=fallback(),
        unprotected=unprotected,
    )


def egress_ruleset(config: Config) -> bytes:
    """The netdev egress table of the blocked state, for every [egress]
    interface, attached to the devices in the nft variable EARLYFW_EGRESS_DEVICES
    (the attach script puts the listed interfaces present in its place): the same
    table the watcher loads, so the two cannot drift."""
    return render(
        "units/earlyfw-egress.nft.j2", counters=policy.counter_values(), **policy.context(config, State.BLOCKED)
    )


def fallback() -> str:
    """The drop-everything table for when the rendered ruleset cannot be loaded."""
    return templates.render("hooks/fallback.nft.j2", table=policy.TABLE, claim=f"{policy.CLAIM}fallback")


def executable(path: str, content: bytes) -> File:
    return File(path, content, 0o755)


class InitramfsTarget(Target):
    """A target whose files only take effect once its generator rebuilds the
    initramfs: on the host it rebuilds after install and uninstall; for an
    image, install says what the pipeline must run inside the root (or runs it
    there with --rebuild-initramfs)."""

    generator_name: ClassVar[str]
    order: ClassVar[int] = 60  # after the systemd units: the rebuild is the slow, last step

    @classmethod
    def detect(cls, root: Root) -> bool:
        found = active_generator(root)
        return found is not None and found.name == cls.generator_name

    def in_root_commands(self) -> tuple[tuple[str, ...], ...]:
        return (generator(self.generator_name).rebuild,)

    def in_root_inputs(self, plan: Plan) -> tuple[str, ...]:
        # The hooks copy the core target's initramfs ruleset in beside their own files.
        return (*plan.paths(), INITRAMFS_RULESET)

    def plan_of(self, *artifacts: File) -> Plan:
        return Plan(self.name, artifacts)

    def after_install(self, config: Config) -> None:
        rebuild(self.runner, self.in_root_commands(), why="to include earlyfw's hook")

    def after_uninstall(self) -> None:
        rebuild(self.runner, self.in_root_commands(), why="to drop earlyfw's hook")


def rebuild(runner: Runner, commands: Sequence[Sequence[str]], *, why: str) -> None:
    """Run the generator with its output shown as it goes: it takes a while,
    and until it is done the old initramfs is the one that boots."""
    for command in commands:
        print(f"earlyfw: rebuilding the initramfs {why} (this takes a minute)...", file=sys.stderr)
        runner.run(command, stream=True)
