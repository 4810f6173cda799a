"""earlyfw's Debian package, built the standard way (`dpkg-buildpackage -us
-uc -b` in a copy of the tree's tracked and new files, with Debian's own
python3 first on PATH), twice: as the tree has it, and the same tree with a
bumped version (a changelog entry above the first), which the package guest
upgrades to. The build is reproducible (debhelper takes its time stamps from
the changelog); the guest is keyed on what the packages install (payload_digest),
so it is rebuilt only when that changes, not for a README or changelog edit.

It also puts the package into a guest tree as an image pipeline would (the
config first, then `apt-get install ./earlyfw_*.deb`, whose postinst runs
`earlyfw install --initramfs-trigger` and whose trigger rebuilds the
initramfs), and adds the phases the guest runs after its login report
(guest/upgrade-phases). Like wireguard.py it imports no harness module but
`sh` and `base`, so guest.py can use it without a cycle.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from qemu import CACHE, GUEST_FILES, REPO, GuestFile, sh
from qemu.base import install_file

DEBIAN_PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
# Sorts after the tree's own version (dpkg: `+` after the end of a string),
# and no release of earlyfw will carry it.
UPGRADE_SUFFIX = "+upgrade"


@dataclass(frozen=True)
class Debs:
    """The tree's package and its bumped twin."""

    current: Path
    newer: Path

    @staticmethod
    def version(deb: Path) -> str:
        return deb.name.split("_")[1]


def changelog_version(source: Path) -> str:
    return sh.run(["dpkg-parsechangelog", "-l", str(source / "debian/changelog"), "-S", "Version"]).strip()


def bump(source: Path) -> str:
    """Put an entry with a newer version above the top one of source's
    changelog, dated as that one (the build takes its time stamps from it)."""
    changelog = source / "debian/changelog"
    text = changelog.read_text()
    version = changelog_version(source) + UPGRADE_SUFFIX
    trailer = next(line for line in text.splitlines() if line.startswith(" -- "))
    entry = (
        f"earlyfw ({version}) unstable; urgency=medium\n\n"
        "  * The same tree, a newer version: the QEMU upgrade proof's package.\n\n"
        f"{trailer}\n\n"
    )
    changelog.write_text(entry + text)
    return version


def build(out: Path, *, newer: bool = False) -> Path:
    """earlyfw_<version>_all.deb in `out`, built from a copy of the tree."""
    source = out / "earlyfw"
    source.mkdir(parents=True)
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout
    tar = subprocess.run(["tar", "-C", str(REPO), "--null", "-T", "-", "-cf", "-"], input=files,
                         capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-C", str(source), "-xf", "-"], input=tar, check=True)
    version = bump(source) if newer else changelog_version(source)
    log = out / "build.log"
    sh.run(["sh", "-c", f'cd "$1" && exec env {DEBIAN_PATH} dpkg-buildpackage -us -uc -b', "-", str(source)], log=log)
    deb = out / f"earlyfw_{version}_all.deb"
    if not deb.exists():
        raise sh.HarnessError(f"dpkg-buildpackage left no {deb.name} in {out} (log: {log})")
    return deb


def build_both(out: Path) -> Debs:
    """The tree's package and the bumped one, each in its own directory under `out`."""
    return Debs(build(out / "current"), build(out / "newer", newer=True))


# -- the guest ------------------------------------------------------------------

LIBEXEC = "/usr/local/libexec/earlyfw-qemu"
CONFIG = "/etc/earlyfw/earlyfw.toml"
# Where the guest's phases find the newer package and the changed config.
STAGED = "/var/local/earlyfw-qemu"
CHANGED_CONFIG = f"{STAGED}/earlyfw-changed.toml"
# apt's downloads for the package guest (earlyfw's dependencies), kept between builds.
ARCHIVES = "debs-package"
# apt itself and what it needs beyond the base, fetched once.
APT_DEBS = "debs-apt"
# The config change: a second DNS server inside the tunnel.
DNS_BEFORE = 'servers = ["10.64.0.1"]'
DNS_AFTER = 'servers = ["10.64.0.1", "10.64.0.2"]'
CHANGED_DNS = "10.64.0.2"

GUEST_FILES_UPGRADE = (
    GuestFile("upgrade-phases", f"{LIBEXEC}/upgrade-phases", 0o755),
    GuestFile("outside-probe", f"{LIBEXEC}/outside-probe", 0o755),
    GuestFile("earlyfw-qemu-upgrade.service", "/etc/systemd/system/earlyfw-qemu-upgrade.service"),
)
UPGRADE_UNIT = "earlyfw-qemu-upgrade.service"
# Named for the guest, not earlyfw: the checks look for earlyfw in the initramfs.
INITRAMFS_CONF = "/etc/initramfs-tools/conf.d/50-guest"
# The guest rebuilds its initramfs under TCG once (the removal; the upgrade
# and the config change need none): the base has no zstd, and gzip's default
# level makes a rebuild take minutes there.
INITRAMFS_SETTINGS = b"COMPRESS=gzip\nCOMPRESSLEVEL=1\n"


def changed_config(config_text: str) -> str:
    if DNS_BEFORE not in config_text:
        raise sh.HarnessError(f"the guest config has no {DNS_BEFORE!r} line for the config change to change")
    return config_text.replace(DNS_BEFORE, DNS_AFTER)


def key_parts(debs: Debs, config_text: str) -> bytes:
    """What a package guest's cache key must cover beyond the common proof files."""
    h = hashlib.sha256(changed_config(config_text).encode() + b"\0")
    for deb in (debs.current, debs.newer):
        h.update(deb.name.encode() + b"\0" + payload_digest(deb))
    for f in GUEST_FILES_UPGRADE:
        h.update(f"{f.source} {f.path} {f.mode:o}\0".encode() + (GUEST_FILES / f.source).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.digest()


# What a package's text changes (README in the wheel's METADATA, changelog,
# man page) reach: not what runs, so not part of the guest's key.
NOT_PAYLOAD = re.compile(r"^\./usr/share/(?:doc|man|lintian)/|\.dist-info/")
# The control fields that change what is installed; the maintainer scripts count whole.
CONTROL_FIELDS = ("Package", "Version", "Architecture", "Depends", "Pre-Depends", "Conflicts", "Breaks")


def payload_digest(deb: Path) -> bytes:
    """A digest of what installing `deb` runs and puts on the disk: every
    file but the documentation and the wheel's metadata (path, mode, bytes),
    the maintainer scripts and triggers, the fields above. A change to text
    alone then does not rebuild the guest."""
    h = hashlib.sha256()
    fields = sh.run(["dpkg-deb", "-f", str(deb), *CONTROL_FIELDS])
    h.update(fields.encode() + b"\0")
    for which in ("--ctrl-tarfile", "--fsys-tarfile"):
        tar = subprocess.run(["dpkg-deb", which, str(deb)], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            for member in sorted(archive.getmembers(), key=lambda m: m.name):
                if NOT_PAYLOAD.search(member.name) or member.name in ("./control", "./md5sums"):
                    continue
                h.update(f"{member.name}\0{member.mode:o}\0{member.type!r}\0{member.linkname}\0".encode())
                data = archive.extractfile(member) if member.isfile() else None
                h.update((data.read() if data is not None else b"") + b"\0")
    return h.digest()


def _add_apt(root: Path, log: Path, cache: Path) -> None:
    """apt, which an image has and the base (mmdebstrap's essential variant)
    has not: the packages it needs beyond the base, as the host's apt resolves
    them against the base's dpkg status, downloaded once and installed with dpkg."""
    status = root / "var/lib/dpkg/status"
    simulated = sh.run(["apt-get", "-s", "--no-install-recommends", "-o", f"Dir::State::Status={status}",
                        "install", "apt"], log=log)  # fmt: skip
    names = re.findall(r"^Inst (\S+)", simulated, re.M)
    if "apt" not in names:
        raise sh.HarnessError(f"the host's apt would not install apt into the guest (log: {log})")
    debs = cache / APT_DEBS
    debs.mkdir(parents=True, exist_ok=True)
    missing = [name for name in names if not any(debs.glob(f"{name}_*.deb"))]
    if missing:
        # apt-get download writes to the working directory.
        sh.run(["sh", "-c", 'cd "$0" && exec apt-get download "$@"', str(debs), *missing], log=log)
    staged = root / "tmp/apt-debs"
    staged.mkdir()
    for name in names:
        deb = max(debs.glob(f"{name}_*.deb"))
        shutil.copyfile(deb, staged / deb.name)
    sh.chroot(root, ["sh", "-c", "exec dpkg -i /tmp/apt-debs/*.deb"], log=log, network=False)
    shutil.rmtree(staged)


def install(root: Path, log: Path, debs: Debs, config_text: str, kernel_version: str, *, cache: Path = CACHE) -> None:
    """earlyfw into the guest tree from its package, as an image pipeline
    would, with the initramfs built by the package's trigger; then the newer
    package, the changed config and the phases the guest runs after login."""
    install_file(root, INITRAMFS_CONF, INITRAMFS_SETTINGS, 0o644)
    # The kernel's initramfs as an image has it before earlyfw (the base
    # skipped it): the trigger then has one to update, as on any machine.
    sh.chroot(root, ["update-initramfs", "-c", "-k", kernel_version], log=log)
    _add_apt(root, log, cache)
    install_file(root, CONFIG, config_text.encode(), 0o644)
    deb = f"/tmp/{debs.current.name}"
    shutil.copyfile(debs.current, root / deb.lstrip("/"))
    archives = cache / ARCHIVES
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    binds = {"/var/cache/apt/archives": archives}
    apt = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]
    # The dependencies come with the host's network; every maintainer script
    # then runs in a namespace of its own, holding only loopback.
    sh.chroot(root, ["sh", "-c", 'apt-get update -qq && exec "$@"', "-", *apt, "install", "-y", "--download-only", deb],
              log=log, binds=binds)  # fmt: skip
    output = sh.chroot(root, [*apt, "install", "-y", deb], log=log, binds=binds, network=False)
    (root / deb.lstrip("/")).unlink()
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)
    if "Processing triggers for initramfs-tools" not in output:
        raise sh.HarnessError(f"installing {debs.current.name} activated no initramfs trigger (log: {log})")
    listing = sh.chroot(root, ["lsinitramfs", f"/boot/initrd.img-{kernel_version}"], log=log)
    if "earlyfw" not in listing:
        raise sh.HarnessError(f"the initramfs the package's trigger built has no earlyfw in it (log: {log})")
    # From here on the guest rebuilds its initramfs itself, under TCG: only
    # the modules its own hardware needs (read from the running guest), which
    # halves each rebuild. The image's own initramfs above has the default.
    install_file(root, INITRAMFS_CONF, INITRAMFS_SETTINGS + b"MODULES=dep\n", 0o644)
    install_file(root, f"{STAGED}/{debs.newer.name}", debs.newer.read_bytes(), 0o644)
    install_file(root, CHANGED_CONFIG, changed_config(config_text).encode(), 0o644)
    for f in GUEST_FILES_UPGRADE:
        install_file(root, f.path, (GUEST_FILES / f.source).read_bytes(), f.mode)
    sh.chroot(root, ["systemctl", "enable", UPGRADE_UNIT], log=log)
    # python3 registers a binfmt for .pyc files, and the base pruned the
    # binfmt_misc module: systemd-binfmt would fail at every boot.
    sh.chroot(root, ["systemctl", "mask", "systemd-binfmt.service"], log=log)
