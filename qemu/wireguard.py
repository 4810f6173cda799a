"""The WireGuard boot: a guest whose wg0 (kernel WireGuard, brought up by
wg-quick@wg0.service once the network is online, as most users have it)
talks to a wireguard-go peer that runs in QEMU's own private
network namespace, behind slirp's gateway 10.0.2.2 (slirp hands the guest's
datagrams to 127.0.0.1:51820 there).

This module holds what the guest gets beyond the common proof files (the
frozen earlyfw, one directory under /usr/local/lib/earlyfw linked from
/usr/local/bin/earlyfw, which `ExecStart=earlyfw --quiet watch` finds; wg0, the
tunnel probe, the report's extra part, `wg` from Debian's wireguard-tools) and
the peer's side. It imports no other harness module but `sh` and `base`, so
guest.py can use it without a cycle.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import sys
from pathlib import Path

from qemu import CACHE, GUEST_FILES, REPO, GuestFile, sh
from qemu.base import install_file

# Fixed, throwaway test keys (generated with `wg genkey` for this proof; they
# protect nothing): a fixed pair keeps the guest image reproducible.
GUEST_PRIVATE = "4EUvfR3biffQ4oQYai8NUIHm7wEA06uaVCB/Mg+JpWU="
GUEST_PUBLIC = "FHcrfqPxhV7j5NoPK002lJpzY+Q5YKzXhhJhQuZUlVs="
PEER_PRIVATE = "KDDEiQ0ldMrRLL5g6Vg1TzVPQtOiEm13WFmqUmJ+Y3I="
PEER_PUBLIC = "90+ZCyi4ocT8+BLnus5W4gzLQnjT5Z/DfA0ziAaua2E="

# The tunnel's inside: a private range that exists only between the guest and
# the peer. The guest routes only the peer's address into the tunnel, so the
# leak sources' default-route traffic still goes to the NIC, where it must stay blocked.
PEER_TUNNEL = "10.99.0.1"
GUEST_TUNNEL = "10.99.0.2"
TUNNEL_PREFIX = 24
# The configured endpoint (qemu/guest/earlyfw.toml) as the guest dials it, and
# the port slirp delivers it to inside the namespace.
ENDPOINT = "10.0.2.2:51820"
PEER_PORT = 51820

LIBEXEC = "/usr/local/libexec/earlyfw-qemu"
# The one-directory build where an image would put it, and the link on PATH.
FROZEN_DIR = "/usr/local/lib/earlyfw"
BINARY = "/usr/local/bin/earlyfw"
WG_QUICK_CONF = "/etc/wireguard/wg0.conf"
SPEC = REPO / "installer" / "earlyfw.spec"
# Everything the spec puts into the binary: keyed on these, never on the
# binary, which PyInstaller does not build byte for byte the same twice.
FROZEN_SOURCES = ("installer/earlyfw", "payload", "hooks", "units")
FROZEN_BUNDLED = ("pyinstaller", "pyroute2")
WG_PACKAGE = "wireguard-tools"


GUEST_FILES_WG = (
    GuestFile("tunnel-probe", f"{LIBEXEC}/tunnel-probe", 0o755),
    GuestFile("wireguard-report", f"{LIBEXEC}/report-extra", 0o755),
    GuestFile("earlyfw-qemu-probe.service", "/etc/systemd/system/earlyfw-qemu-probe.service"),
    GuestFile(
        "wait-online-ipv4.conf", "/etc/systemd/system/systemd-networkd-wait-online.service.d/50-earlyfw-qemu.conf"
    ),
)
# wg-quick@ waits for network-online.target, which means something only with
# networkd's wait-online (not enabled by Debian's networkd): the tunnel's
# first handshake then goes out once the NIC has its address, never into a
# missing route (WireGuard would retry only 5 s later), so boots with and
# without earlyfw time the first packet through the tunnel alike.
ENABLED_UNITS = ("earlyfw-qemu-probe.service", "wg-quick@wg0.service", "systemd-networkd-wait-online.service")


def wg_quick_conf() -> bytes:
    """wg0 as wg-quick brings it up: kernel WireGuard, one peer at the
    configured endpoint, only the peer's address routed into the tunnel, and
    no PersistentKeepalive, as many providers' configs have it: WireGuard then
    starts a handshake only for traffic into wg0, which the block refuses, so
    at boot only earlyfw's watcher can start it."""
    return (
        "# The guest's tunnel; its handshake is what earlyfw's watcher waits for.\n"
        f"[Interface]\nPrivateKey = {GUEST_PRIVATE}\nAddress = {GUEST_TUNNEL}/{TUNNEL_PREFIX}\n\n"
        f"[Peer]\nPublicKey = {PEER_PUBLIC}\nEndpoint = {ENDPOINT}\nAllowedIPs = {PEER_TUNNEL}/32\n"
    ).encode()


def peer_config() -> str:
    """The peer's side, for `wg setconf`: it learns the guest's endpoint from
    the first handshake (slirp's 127.0.0.1:PORT), so it names none."""
    return (
        f"[Interface]\nPrivateKey = {PEER_PRIVATE}\nListenPort = {PEER_PORT}\n\n"
        f"[Peer]\nPublicKey = {GUEST_PUBLIC}\nAllowedIPs = {GUEST_TUNNEL}/32\n"
    )


def peer_args(run_dir: Path) -> tuple[str, ...]:
    """qemu.isolated's options that start the peer next to QEMU."""
    conf = run_dir / "peer.conf"
    conf.write_text(peer_config())
    conf.chmod(0o600)
    return ("--wireguard-peer", str(conf), "--wireguard-address", f"{PEER_TUNNEL}/{TUNNEL_PREFIX}")


# -- the guest ------------------------------------------------------------------


def _source_files() -> list[Path]:
    files = [SPEC]
    for top in FROZEN_SOURCES:
        files += sorted(
            p for p in (REPO / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        )
    return files


def frozen_key() -> str:
    h = hashlib.sha256(f"{sys.version}\0".encode())
    for name in FROZEN_BUNDLED:
        try:
            h.update(f"{name} {importlib.metadata.version(name)}\0".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{name} missing\0".encode())
    for path in _source_files():
        h.update(f"{path.relative_to(REPO)}\0".encode() + path.read_bytes() + b"\0")
    return h.hexdigest()


def frozen_build(cache: Path = CACHE) -> Path:
    """The one-directory earlyfw for these sources (the executable `earlyfw`
    beside _internal/), built (about 30 s) only when no build of the same
    sources is cached."""
    k = frozen_key()
    directory = cache / f"frozen-{k[:16]}"
    build = directory / "dist" / "earlyfw"
    if (directory / "done").exists():
        return build
    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    sh.run(
        [
            *(sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN"),
            *("--distpath", str(staging / "dist"), "--workpath", str(staging / "work"), str(SPEC)),
        ],
        log=staging / "build.log",
    )
    shutil.rmtree(staging / "work")
    if not (staging / "dist" / "earlyfw" / "earlyfw").is_file():
        raise sh.HarnessError(f"PyInstaller left no one-directory build in {staging / 'dist'}")
    (staging / "done").write_text(k + "\n")
    for stale in cache.glob("frozen-*"):
        if stale != staging:
            shutil.rmtree(stale, ignore_errors=True)
    staging.rename(directory)
    return build


def install_frozen(root: Path, build: Path) -> None:
    """The build under FROZEN_DIR, root-owned, and BINARY linked to its executable."""
    target = root / FROZEN_DIR.lstrip("/")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(build, target, symlinks=True)
    for path in (target, *target.rglob("*")):
        os.lchown(path, 0, 0)
    link = root / BINARY.lstrip("/")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(f"{FROZEN_DIR}/earlyfw")


def wg_deb(cache: Path = CACHE) -> Path:
    """Debian's wireguard-tools for the guest (its `wg` reads the handshake
    for the report), fetched once with apt, as the base's packages are."""
    debs = cache / "debs-extra"
    found = sorted(debs.glob(f"{WG_PACKAGE}_*.deb"))
    if not found:
        debs.mkdir(parents=True, exist_ok=True)
        # apt-get download writes to the working directory.
        sh.run(["sh", "-c", 'cd "$0" && exec apt-get download "$1"', str(debs), WG_PACKAGE], log=debs / "download.log")
        found = sorted(debs.glob(f"{WG_PACKAGE}_*.deb"))
        if not found:
            raise sh.HarnessError(f"apt-get download {WG_PACKAGE} left no .deb in {debs}")
    return found[-1]


def key_parts(cache: Path = CACHE, *, frozen: bool = True) -> bytes:
    """What the guest's cache key must cover beyond the common proof files."""
    h = hashlib.sha256((frozen_key() if frozen else "from its package").encode() + b"\0" + wg_quick_conf() + b"\0")
    deb = wg_deb(cache)
    h.update(deb.name.encode() + b"\0" + deb.read_bytes())
    for f in GUEST_FILES_WG:
        h.update(f"{f.source} {f.path} {f.mode:o}\0".encode() + (GUEST_FILES / f.source).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.digest()


def install(root: Path, log: Path, cache: Path = CACHE, *, frozen: bool = True) -> None:
    """Add the WireGuard boot's parts to a guest tree; `frozen`: with the
    one-directory earlyfw (not for the guest that has it from its package)."""
    deb = wg_deb(cache)
    shutil.copyfile(deb, root / "tmp" / deb.name)
    sh.chroot(root, ["dpkg", "-i", f"/tmp/{deb.name}"], log=log)
    (root / "tmp" / deb.name).unlink()
    if frozen:
        install_frozen(root, frozen_build(cache))
    for f in GUEST_FILES_WG:
        install_file(root, f.path, (GUEST_FILES / f.source).read_bytes(), f.mode)
    install_file(root, WG_QUICK_CONF, wg_quick_conf(), 0o600)
    sh.chroot(root, ["systemctl", "enable", *ENABLED_UNITS], log=log)
