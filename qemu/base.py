"""The base guest: a small Debian 12 tree built by mmdebstrap from Debian's
packages, one per initramfs generator (dracut and initramfs-tools conflict in
Debian). The proof's own files go in per guest (qemu.guest), so changing them
does not rebuild a base.

Each base is cached under a directory named by a hash of every input: the
package list, the suite and mirror, the pruning, and this module's source.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from qemu import CACHE, sh

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"

PACKAGES = (
    "linux-image-amd64",
    "systemd",
    "systemd-sysv",
    "udev",
    "kmod",
    "systemd-timesyncd",
    "nftables",
    "iproute2",
    "iputils-ping",
)

# Kernel module trees a virtio guest never loads. Dropping them keeps the tree,
# the initramfs and its unpacking under TCG small; it changes nothing earlyfw
# depends on (netfilter, virtio, ext4 all stay).
PRUNED_MODULES = (
    "sound",
    *(
        f"drivers/{d}"
        for d in (
            *("gpu", "media", "infiniband", "usb", "iio", "staging", "comedi", "hwmon", "hid", "md", "platform"),
            *("isdn", "bluetooth", "mtd", "misc", "thunderbolt", "video", "mfd", "ata", "scsi", "target", "nvme"),
            *("firewire", "pcmcia", "parport", "power", "regulator", "rtc", "spi", "i2c", "gnss", "leds", "mmc"),
            *("memstick", "w1", "watchdog", "edac", "fpga", "soundwire", "ssb", "bcma", "nfc", "atm", "vfio"),
            *("vhost", "xen", "hv", "input", "crypto", "dma", "gpio", "pinctrl", "extcon"),
            *("net/wireless", "net/ethernet", "net/usb", "net/can", "net/ppp", "net/wan", "net/fddi"),
            *("net/hamradio", "net/ieee802154", "net/arcnet", "net/slip", "net/phy", "net/pcs", "net/mdio"),
            *("net/dsa", "net/ipa", "net/wwan", "net/plip"),
        )
    ),
)
KEPT_FILESYSTEMS = {"ext4", "jbd2", "mbcache.ko", "overlayfs", "autofs", "nls"}

# A fixed machine id: no first-boot logic, and the same DHCP client id on every boot.
MACHINE_ID = "e4a1f0c0ffee4b5aa11ce0f0b00710ad\n"
HOSTNAME = "earlyfw-guest"
RESOLV_CONF = "nameserver 10.0.2.3\nnameserver 192.0.2.53\noptions timeout:1 attempts:1\n"


class GuestGenerator(StrEnum):
    """The initramfs generator a guest base is built with: its Debian package,
    the earlyfw target that hooks into it, and the command the guest runs to
    build its initramfs."""

    DRACUT = "dracut"
    INITRAMFS_TOOLS = "initramfs-tools"

    @property
    def packages(self) -> tuple[str, ...]:
        return (self.value,)

    @property
    def target(self) -> str:
        return self.value

    def build_command(self, kernel_version: str) -> list[str]:
        if self is GuestGenerator.DRACUT:
            return ["dracut", "--force", f"/boot/initrd.img-{kernel_version}", kernel_version]
        return ["update-initramfs", "-c", "-k", kernel_version]


@dataclass(frozen=True)
class Base:
    generator: GuestGenerator
    directory: Path
    key: str

    @property
    def root(self) -> Path:
        return self.directory / "root"

    @property
    def kernel_version(self) -> str:
        versions = sorted(p.name for p in (self.root / "lib/modules").iterdir())
        if len(versions) != 1:
            raise sh.HarnessError(f"{self.root}: expected one kernel, found {versions}")
        return versions[0]


def key(generator: GuestGenerator) -> str:
    h = hashlib.sha256()
    for part in (SUITE, MIRROR, *PACKAGES, *generator.packages, *PRUNED_MODULES, *sorted(KEPT_FILESYSTEMS)):
        h.update(part.encode() + b"\0")
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def build(generator: GuestGenerator, cache: Path = CACHE) -> Base:
    """The cached base for `generator`, built first if its inputs changed."""
    k = key(generator)
    base = Base(generator, cache / f"base-{generator}-{k[:16]}", k)
    if (base.directory / "done").exists():
        return base
    sh.require("mmdebstrap", "unshare")
    staging = base.directory.with_name(base.directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    log = staging / "build.log"
    root = staging / "root"
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    archives = "/var/cache/apt/archives/"
    sh.run(
        [
            "mmdebstrap",
            "--variant=essential",
            "--include=" + ",".join((*PACKAGES, *generator.packages)),
            # Downloaded packages are kept between builds, so a rebuild costs no download.
            f'--setup-hook=mkdir -p "$1"{archives}',
            f"--setup-hook=sync-in {shlex.quote(str(debs))} {archives}",
            f"--customize-hook=sync-out {archives} {shlex.quote(str(debs))}",
            "--skip=download/empty",
            SUITE,
            str(root),
            MIRROR,
        ],
        log=log,
        # The kernel's postinst would build an initramfs now; the variants build
        # their own, after earlyfw is installed, so skip this one.
        env={**os.environ, "INITRD": "No"},
    )
    _customize(Base(generator, staging, k))
    (staging / "done").write_text(k + "\n")
    for stale in cache.glob(f"base-{generator}-*"):
        if stale != staging:
            shutil.rmtree(stale, ignore_errors=True)
    staging.rename(base.directory)
    return base


def _customize(base: Base) -> None:
    root = base.root
    log = base.directory / "build.log"
    kernel = root / "lib/modules" / base.kernel_version / "kernel"
    for tree in PRUNED_MODULES:
        shutil.rmtree(kernel / tree, ignore_errors=True)
    for entry in (kernel / "fs").iterdir():
        if entry.name not in KEPT_FILESYSTEMS:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    sh.chroot(root, ["depmod", "-a", base.kernel_version], log=log)
    install_file(root, "/etc/machine-id", MACHINE_ID.encode(), 0o444)
    install_file(root, "/etc/hostname", f"{HOSTNAME}\n".encode(), 0o644)
    install_file(root, "/etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n::1 localhost\n".encode(), 0o644)
    install_file(root, "/etc/resolv.conf", RESOLV_CONF.encode(), 0o644)


def install_file(root: Path, path: str, content: bytes, mode: int) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink():
        target.unlink()
    target.write_bytes(content)
    os.chown(target, 0, 0)
    os.chmod(target, mode)
