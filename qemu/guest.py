"""The guests the proof boots: a base tree, earlyfw installed into it with
`earlyfw install --root` (or not, for the controls; or from its Debian package
with apt-get, qemu.package), perhaps one deliberate change, then the guest's
own generator builds its initramfs in a chroot (the package's trigger, for
the package guest).

Each guest is cached under a directory named by a hash of its base's key, the
change, every file earlyfw's targets render for it, and this module's source.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from earlyfw import config as configuration
from earlyfw import install as installer
from earlyfw import policy
from earlyfw.config import Config
from earlyfw.policy import State
from earlyfw.root import Root
from earlyfw.run import Runner
from earlyfw.targets import File, Symlink
from qemu import CACHE, GUEST_FILES, GuestFile, package, sh, wireguard
from qemu.base import Base, GuestGenerator, install_file
from qemu.base import build as build_base

CONFIG_FILE = GUEST_FILES / "earlyfw.toml"
RULESETS = ("/etc/earlyfw/initramfs.nft", "/etc/earlyfw/blocked.nft", "/etc/earlyfw/relaxed.nft")
BROKEN_RULESET = b"# A ruleset nft refuses to load.\ntable inet earlyfw {\n\tthis is not nft\n"


PROOF_FILES = (
    GuestFile("leak-source", "/usr/local/libexec/earlyfw-qemu/leak-source", 0o755),
    GuestFile("proof-report", "/usr/local/libexec/earlyfw-qemu/proof-report", 0o755),
    GuestFile("earlyfw-qemu-leak.service", "/etc/systemd/system/earlyfw-qemu-leak.service"),
    GuestFile("earlyfw-qemu-login.service", "/etc/systemd/system/earlyfw-qemu-login.service"),
    GuestFile("50-guest.network", "/etc/systemd/network/50-guest.network"),
    GuestFile("timesyncd-leak.conf", "/etc/systemd/timesyncd.conf.d/50-leak.conf"),
)
GENERATOR_FILES = {
    GuestGenerator.DRACUT: (GuestFile("dracut-guest.conf", "/etc/dracut.conf.d/50-guest.conf"),),
    GuestGenerator.INITRAMFS_TOOLS: (),
}
ENABLED_UNITS = ("systemd-networkd.service", "earlyfw-qemu-leak.service", "earlyfw-qemu-login.service")
# The anchor's early-boot unit and where it finds its ruleset (earlyfw's blocked.nft).
ANCHOR_UNIT = GuestFile("anchor-block.service", "/etc/systemd/system/anchor-block.service")
ANCHOR_RULESET = "/etc/anchor/blocked.nft"


class Change(StrEnum):
    """What a variant does to its guest beyond installing earlyfw (or not)."""

    NONE = "none"
    # The mutant: the kill switch in an `ip` table, which never sees IPv6.
    IP_ONLY = "ip-only"
    # Every ruleset replaced by one nft cannot load.
    BROKEN_RULESET = "broken-ruleset"
    # Debian's nftables.service enabled with its default /etc/nftables.conf,
    # whose first line is `flush ruleset`.
    NFTABLES_SERVICE = "nftables-service"
    # The raw-socket (AF_PACKET) leak source (guest/raw-leak.c), built static
    # on the host; with `egress`, [egress] lists the guest's NIC.
    RAW_EGRESS = "raw-egress"
    # wg0 to a wireguard-go peer in QEMU's namespace, the frozen earlyfw
    # binary and the tunnel probe (qemu.wireguard).
    WIREGUARD = "wireguard"
    # No earlyfw: the anchor's (Mullvad's) approach, a oneshot unit loading
    # earlyfw's blocked ruleset before network-pre.target, nothing in the
    # initramfs. A comparison for bench/boot.py, not a proof.
    ANCHOR = "anchor"


@dataclass(frozen=True)
class Variant:
    name: str
    generator: GuestGenerator
    earlyfw: bool = True
    change: Change = Change.NONE
    summary: str = ""
    # earlyfw's watch target too: earlyfw-watch.service relaxes on the handshake.
    watch: bool = False
    # Booted with the break-glass switch: earlyfw installed, nothing of it loaded.
    break_glass: bool = False
    # [egress] interfaces lists the guest's NIC (raw-socket egress filtered).
    egress: bool = False
    # earlyfw from its Debian package, installed in the image with apt-get as
    # an image pipeline would; after the login report the guest upgrades it,
    # changes the config, runs the naive controls and removes it (qemu.upgrade).
    package: bool = False

    @property
    def cmdline(self) -> str:
        """What this variant adds to the kernel command line. The switch comes
        last, after an earlyfw=on it must override (the last one wins)."""
        return "earlyfw=on earlyfw=off" if self.break_glass else ""

    @property
    def expect_leaks(self) -> bool:
        """The controls and the mutant must leak: if they do not, the leak
        sources or the capture are broken and no "no leak" result means anything."""
        raw_control = self.change is Change.RAW_EGRESS and not self.egress
        no_block = not self.earlyfw and self.change is not Change.ANCHOR
        return no_block or self.change is Change.IP_ONLY or self.break_glass or raw_control

    @property
    def targets(self) -> tuple[str, ...]:
        if not self.earlyfw:
            return ()
        return (self.generator.target, "systemd", *(("watch",) if self.watch else ()))


VARIANTS = {
    v.name: v
    for v in (
        Variant("control-dracut", GuestGenerator.DRACUT, earlyfw=False, summary="dracut guest without earlyfw"),
        Variant(
            "control-initramfs-tools",
            GuestGenerator.INITRAMFS_TOOLS,
            earlyfw=False,
            summary="initramfs-tools guest without earlyfw",
        ),
        Variant("dracut", GuestGenerator.DRACUT, summary="earlyfw with dracut and systemd"),
        Variant("initramfs-tools", GuestGenerator.INITRAMFS_TOOLS, summary="earlyfw with initramfs-tools and systemd"),
        Variant(
            "mutant-ip-only", GuestGenerator.DRACUT, change=Change.IP_ONLY, summary="mutant: ip-only table (dracut)"
        ),
        Variant(
            "broken-dracut", GuestGenerator.DRACUT, change=Change.BROKEN_RULESET, summary="unloadable rulesets (dracut)"
        ),
        Variant(
            "broken-initramfs-tools",
            GuestGenerator.INITRAMFS_TOOLS,
            change=Change.BROKEN_RULESET,
            summary="unloadable rulesets (initramfs-tools)",
        ),
        Variant(
            "nftables-service",
            GuestGenerator.INITRAMFS_TOOLS,
            change=Change.NFTABLES_SERVICE,
            summary="earlyfw plus nftables.service flushing the ruleset (initramfs-tools)",
        ),
        Variant(
            "nftables-service-off",
            GuestGenerator.INITRAMFS_TOOLS,
            change=Change.NFTABLES_SERVICE,
            break_glass=True,
            summary="the nftables-service guest booted with earlyfw=off: the admin's ruleset only, no earlyfw table",
        ),
        Variant(
            "raw-egress",
            GuestGenerator.INITRAMFS_TOOLS,
            change=Change.RAW_EGRESS,
            egress=True,
            summary="a raw-socket (AF_PACKET) leak source from early boot; [egress] lists the NIC",
        ),
        Variant(
            "control-raw-egress",
            GuestGenerator.INITRAMFS_TOOLS,
            change=Change.RAW_EGRESS,
            summary="control: the same raw-socket leak source, no [egress]: raw frames bypass the inet table",
        ),
        Variant(
            "wireguard",
            GuestGenerator.INITRAMFS_TOOLS,
            change=Change.WIREGUARD,
            watch=True,
            summary="wg0 to a wireguard-go peer; earlyfw-watch.service relaxes on the handshake",
        ),
        Variant(
            "wireguard-no-earlyfw",
            GuestGenerator.INITRAMFS_TOOLS,
            earlyfw=False,
            change=Change.WIREGUARD,
            summary="control: the same WireGuard guest without earlyfw (no block, no watcher): the tunnel's pace",
        ),
        *(
            Variant(
                f"anchor-{generator}",
                generator,
                earlyfw=False,
                change=Change.ANCHOR,
                summary=f"the anchor's early-boot unit instead of earlyfw ({generator}): bench/boot.py's comparison",
            )
            for generator in GuestGenerator
        ),
        Variant(
            "wireguard-no-watch",
            GuestGenerator.INITRAMFS_TOOLS,
            change=Change.WIREGUARD,
            summary="control: the same WireGuard guest without the watcher stays blocked",
        ),
        Variant(
            "package-upgrade",
            GuestGenerator.INITRAMFS_TOOLS,
            change=Change.WIREGUARD,
            watch=True,
            package=True,
            summary="the WireGuard guest with earlyfw from its .deb; then upgrade, config change, the naive "
            "controls and removal under a 5 ms leak probe, and the next boot",
        ),
    )
}


# The guest's NIC as systemd names it (virtio-net in slot 2).
GUEST_NIC = "ens2"
RAW_LEAK_SOURCE = GUEST_FILES / "raw-leak.c"
RAW_LEAK = "/usr/local/libexec/earlyfw-qemu/raw-leak"
RAW_LEAK_UNIT = GuestFile("earlyfw-qemu-raw-leak.service", "/etc/systemd/system/earlyfw-qemu-raw-leak.service")


def config_text(variant: Variant | None = None) -> str:
    text = CONFIG_FILE.read_text()
    if variant is not None and variant.egress:
        text += f'\n[egress]\ninterfaces = ["{GUEST_NIC}"]\n'
    return text


def guest_config(variant: Variant | None = None) -> Config:
    return configuration.parse(config_text(variant))


@dataclass(frozen=True)
class Image:
    variant: Variant
    directory: Path
    kernel_version: str

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def disk(self) -> Path:
        return self.directory / "root.img"

    @property
    def initrd_bytes(self) -> int:
        return self.initrd.stat().st_size


def key(variant: Variant, base: Base, debs: package.Debs | None = None) -> str:
    h = hashlib.sha256()
    h.update(f"{base.key}\0{variant.name}\0{variant.earlyfw}\0{variant.change}\0".encode())
    if variant.change is Change.WIREGUARD:
        h.update(wireguard.key_parts(frozen=not variant.package))
    if debs is not None:
        h.update(package.key_parts(debs, config_text(variant)))
    h.update(config_text(variant).encode())
    if variant.change is Change.RAW_EGRESS:
        h.update(RAW_LEAK_SOURCE.read_bytes() + (GUEST_FILES / RAW_LEAK_UNIT.source).read_bytes())
    if variant.change is Change.ANCHOR:
        h.update((GUEST_FILES / ANCHOR_UNIT.source).read_bytes() + b"\0" + anchor_ruleset())
    for f in (*PROOF_FILES, *GENERATOR_FILES[variant.generator]):
        h.update(f"{f.source} {f.path} {f.mode:o}\0".encode() + (GUEST_FILES / f.source).read_bytes())
    for artifact in rendered(variant):
        if isinstance(artifact, File):
            h.update(f"{artifact.path} {artifact.mode:o}\0".encode() + artifact.content)
        else:
            h.update(f"{artifact.path} -> {artifact.target}\0".encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def rendered(variant: Variant) -> list[File | Symlink]:
    """Every file `earlyfw install` will write for this variant, from the same
    targets the CLI runs, so a change to any hook or unit rebuilds the guest."""
    if not variant.earlyfw:
        return []
    root = Root(Path("/nonexistent"))
    targets = [cls(root, Runner(verbose=False)) for cls in installer.select(root, variant.targets)]
    plans = installer.plan(guest_config(variant), targets)
    return [a for p in plans for a in p.artifacts]


def build(variant: Variant, cache: Path = CACHE, debs: package.Debs | None = None) -> Image:
    """The cached guest for `variant`, built first if any of its inputs changed.
    A package variant needs `debs` (qemu.package.build_both)."""
    if variant.package and debs is None:
        raise sh.HarnessError(f"{variant.name}: earlyfw comes from its package here; build it (qemu.package)")
    base = build_base(variant.generator, cache)
    k = key(variant, base, debs if variant.package else None)
    image = Image(variant, cache / f"guest-{variant.name}-{k[:16]}", base.kernel_version)
    if (image.directory / "done").exists():
        return image
    sh.require("mke2fs", "unshare", "nft")
    staging = image.directory.with_name(image.directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    log = staging / "build.log"
    root = staging / "root"
    sh.run(["cp", "-a", "--reflink=auto", str(base.root), str(root)], log=log)
    for f in (*PROOF_FILES, *GENERATOR_FILES[variant.generator]):
        install_file(root, f.path, (GUEST_FILES / f.source).read_bytes(), f.mode)
    sh.chroot(root, ["systemctl", "enable", *ENABLED_UNITS], log=log)
    if variant.package and debs is not None:
        package.install(root, log, debs, config_text(variant), base.kernel_version, cache=cache)
    elif variant.earlyfw:
        config_file = staging / "earlyfw.toml"
        config_file.write_text(config_text(variant))
        install = [sys.executable, "-m", "earlyfw", "--config", str(config_file), "install", "--root", str(root)]
        sh.run([*install, *(arg for t in variant.targets for arg in ("--target", t))], log=log)
    _apply(variant, root, log)
    if variant.change is Change.RAW_EGRESS:
        _install_raw_leak(staging, root, log)
    if not variant.package:  # there the package's trigger built it, earlyfw's hook included
        sh.chroot(root, variant.generator.build_command(base.kernel_version), log=log)
    shutil.copyfile(root / f"boot/vmlinuz-{base.kernel_version}", staging / "vmlinuz")
    shutil.copyfile(root / f"boot/initrd.img-{base.kernel_version}", staging / "initrd.img")
    _make_disk(root, staging / "root.img", log)
    shutil.rmtree(root)
    (staging / "done").write_text(k + "\n")
    for stale in cache.glob(f"guest-{variant.name}-*"):
        if stale != staging:
            shutil.rmtree(stale, ignore_errors=True)
    staging.rename(image.directory)
    return image


def _apply(variant: Variant, root: Path, log: Path) -> None:
    change = variant.change
    if change is Change.IP_ONLY:
        for path in RULESETS:
            target = root / path.lstrip("/")
            mutant = ip_only(target.read_text())
            # The mutant must load, or it would test the broken-ruleset case instead.
            sh.run(["unshare", "--map-root-user", "--net", "nft", "-c", "-f", "-"], input=mutant.encode(), log=log)
            install_file(root, path, mutant.encode(), 0o644)
    elif change is Change.BROKEN_RULESET:
        for path in RULESETS:
            install_file(root, path, BROKEN_RULESET, 0o644)
    elif change is Change.WIREGUARD:
        wireguard.install(root, log, frozen=not variant.package)
    elif change is Change.ANCHOR:
        install_file(root, ANCHOR_RULESET, anchor_ruleset(), 0o644)
        install_file(root, ANCHOR_UNIT.path, (GUEST_FILES / ANCHOR_UNIT.source).read_bytes(), ANCHOR_UNIT.mode)
        sh.chroot(root, ["systemctl", "enable", ANCHOR_UNIT.source], log=log)
    elif change is Change.NFTABLES_SERVICE:
        statements = [s for s in (root / "etc/nftables.conf").read_text().splitlines() if s and not s.startswith("#")]
        if statements[:1] != ["flush ruleset"]:
            raise sh.HarnessError(f"{root}/etc/nftables.conf does not begin with `flush ruleset`: nothing to prove")
        sh.chroot(root, ["systemctl", "enable", "nftables.service"], log=log)


def _install_raw_leak(staging: Path, root: Path, log: Path) -> None:
    sh.require("gcc")
    binary = staging / "raw-leak"
    sh.run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(binary), str(RAW_LEAK_SOURCE)], log=log)
    install_file(root, RAW_LEAK, binary.read_bytes(), 0o755)
    unit = RAW_LEAK_UNIT
    install_file(root, unit.path, (GUEST_FILES / unit.source).read_bytes(), unit.mode)
    sh.chroot(root, ["systemctl", "enable", unit.path.rsplit("/", 1)[1]], log=log)


def anchor_ruleset() -> bytes:
    """The anchor's ruleset: earlyfw's blocked state for the guest's config, so
    the comparison is only where and when it is loaded."""
    return policy.render(guest_config(), State.BLOCKED).encode()


def ip_only(script: str) -> str:
    """earlyfw's ruleset as it would be if its table were `ip`, not `inet`: the
    IPv6 rules dropped (an ip table cannot hold them), everything else kept.

    Refusals drop instead of rejecting: an ip table has no icmpx, and its own
    reject needs nft_reject_ipv4, which the initramfs does not carry; a mutant
    that failed to load there would only exercise the fallback."""
    lines = [line for line in script.splitlines() if not re.search(r"\bip6\b|icmpv6", line)]
    text = "\n".join(lines) + "\n"
    text = text.replace("table inet earlyfw", "table ip earlyfw")
    return text.replace("reject with icmpx admin-prohibited", "drop")


def _make_disk(root: Path, disk: Path, log: Path) -> None:
    used = sum(
        (p.lstat().st_blocks * 512 for p in root.rglob("*") if not p.is_symlink()),
        start=0,
    )
    size_mib = used * 13 // 10 // (1 << 20) + 128
    sh.run(
        ["mke2fs", "-q", "-t", "ext4", "-L", "guestroot", "-d", str(root), str(disk), f"{size_mib}M"],
        log=log,
    )
