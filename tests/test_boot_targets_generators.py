"""The real initramfs generators on a --root install, as an image pipeline runs
them: `earlyfw install --root DIR --target dracut|initramfs-tools --target
systemd --rebuild-initramfs`, which runs the generator inside DIR with chroot.
The images are then listed with lsinitrd / lsinitramfs and unpacked to show
nft, its libraries, the nf_tables modules, the ruleset and the hook are in,
in shell-based and systemd-based dracut builds alike, and what it costs.

DIR is a Debian 12 root (mmdebstrap, with Debian's linux-image-amd64), built
once and cached under /var/cache/earlyfw-test/roots/<hash of its package list>;
each test works on an overlay of it, so the cache stays pristine.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from earlyfw.linux import boot, dracut, initramfs_tools
from tests.configs import CONFIG_TEXT

CACHE = Path("/var/cache/earlyfw-test/roots")
SUITE = "bookworm"
# Bump when the recipe below changes, so cached roots are rebuilt.
RECIPE = 1
DRACUT_ROOT = ("linux-image-amd64", "dracut", "systemd", "nftables", "kmod", "udev")
INITRAMFS_TOOLS_ROOT = ("linux-image-amd64", "initramfs-tools", "systemd", "nftables", "kmod", "udev")
# The budget earlyfw may add to an initramfs (compressed, as the generator writes it).
GROWTH_LIMIT = 2 * 1024 * 1024
BUILD_TIMEOUT = 1200


def need(*tools: str) -> None:
    packages = {
        "mmdebstrap": "mmdebstrap",
        "lsinitrd": "dracut-core",
        "lsinitramfs": "initramfs-tools-core",
        "unmkinitramfs": "initramfs-tools-core",
        "systemd-analyze": "systemd",
    }
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {missing}: apt-get install {' '.join(packages.get(t, t) for t in missing)}")
    if os.geteuid() != 0:
        pytest.fail("these tests need root (mmdebstrap, overlay mounts, chroot)")


def scratch_root(packages: tuple[str, ...]) -> Path:
    """A Debian root with `packages`, built once per package list."""
    need("mmdebstrap")
    key = hashlib.sha256(json.dumps([RECIPE, SUITE, "minbase", sorted(packages)]).encode()).hexdigest()[:16]
    root, done = CACHE / key, CACHE / f"{key}.done"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return root
        partial = CACHE / f"{key}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        result = subprocess.run(
            ["mmdebstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(partial)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(f"mmdebstrap failed (it needs the Debian archive):\n{result.stderr[-3000:]}")
        partial.rename(root)
        done.write_text(" ".join(packages) + "\n")
    return root


@contextlib.contextmanager
def overlay(lower: Path, scratch: Path) -> Iterator[Path]:
    """`lower` seen through a writable overlay: the cached root stays pristine."""
    upper, work, merged = scratch / "upper", scratch / "work", scratch / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True)
    try:
        yield merged
    finally:
        subprocess.run(["umount", "--lazy", str(merged)], check=False)


@dataclass(frozen=True)
class Pipeline:
    """An image root after `earlyfw install --root ... --rebuild-initramfs`."""

    lower: Path
    root: Path
    version: str
    scratch: Path
    output: subprocess.CompletedProcess[str]

    @property
    def image(self) -> Path:
        return self.root / f"boot/initrd.img-{self.version}"

    @property
    def pristine(self) -> Path:
        return self.lower / f"boot/initrd.img-{self.version}"


@contextlib.contextmanager
def pipeline(packages: tuple[str, ...], generator: str, scratch: Path) -> Iterator[Pipeline]:
    lower = scratch_root(packages)
    with overlay(lower, scratch) as root:
        output = earlyfw(scratch, "install", "--root", root, "--target", generator, "--target", "systemd",
                         "--rebuild-initramfs")  # fmt: skip
        assert output.returncode == 0, output.stderr[-3000:]
        yield Pipeline(lower, root, kernel_version(lower), scratch, output)


def kernel_version(root: Path) -> str:
    (version,) = [p.name for p in (root / "lib/modules").iterdir()]
    return version


def earlyfw(tmp_path: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "earlyfw.toml"
    config.write_text(CONFIG_TEXT)
    return subprocess.run(
        [sys.executable, "-m", "earlyfw", "--config", str(config), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )


def chroot(root: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["chroot", str(root), *argv], capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
    )
    if check:
        assert result.returncode == 0, f"{argv}: {result.stderr[-3000:]}"
    return result


def expected_libraries(root: Path) -> list[str]:
    """nft's shared libraries as the root's own ldd resolves them."""
    ldd = chroot(root, "ldd", "/usr/sbin/nft").stdout
    return sorted({Path(m).name for m in re.findall(r"=> (/\S+)", ldd)})


def expected_modules(root: Path, version: str) -> list[str]:
    """The required modules and everything they depend on, from the root's modprobe."""
    argv = ["modprobe", "--all", "--set-version", version, "--show-depends", *boot.REQUIRED_MODULES]
    shown = chroot(root, *argv).stdout
    return sorted({Path(p).name for p in re.findall(r"^insmod (\S+)", shown, re.M)})


def modules_the_ruleset_needs(root: Path, version: str) -> set[str]:
    """The kernel modules the kernel would request to load the ruleset: every
    expression nft sends for it (as `nft --debug=netlink` shows) and the inet
    filter chain type, resolved through the root's modules.alias. Whatever is
    built in has no alias and needs nothing."""
    ruleset = root / "etc/earlyfw/initramfs.nft"
    debug = run(["unshare", "--map-root-user", "--net", "nft", "--debug=netlink", "-c", "-f", str(ruleset)])
    assert debug.returncode == 0, debug.stderr
    expressions = set(re.findall(r"^\s*\[ ([a-z_]+) ", debug.stdout, re.M))
    assert {"payload", "lookup", "meta", "counter"} <= expressions, expressions
    aliases = dict(
        line.split()[1:3]
        for line in (root / f"lib/modules/{version}/modules.alias").read_text().splitlines()
        if line.startswith("alias nft-")
    )
    wanted = {f"nft-expr-{e}" for e in expressions} | {f"nft-expr-1-{e}" for e in expressions}
    wanted |= {"nft-chain-1-filter"}  # inet filter chains
    return {aliases[a] for a in wanted if a in aliases}


def assert_has_the_block(listing: str, unpacked: Path, root: Path, version: str) -> None:
    assert re.search(r"usr/s?bin/nft$", listing, re.M), "nft is missing"
    libraries = expected_libraries(root)
    assert "libnftables.so.1" in libraries
    for library in libraries:
        assert f"/{library}" in listing, f"{library} is missing"
    modules = expected_modules(root, version)
    assert {"nf_tables.ko", "nfnetlink.ko"} <= {m.split(".ko")[0] + ".ko" for m in modules}
    for module in modules:
        assert f"/{module}" in listing, f"{module} is missing"
    # Everything the initramfs ruleset asks the kernel for is in the image. On
    # Debian 12's 6.1 kernel that is nothing beyond nf_tables: a `counter name`
    # would need nft_objref, ct state nft_ct and nf_conntrack, each a module
    # load before udev (this check once caught nft_objref missing).
    needed = modules_the_ruleset_needs(root, version)
    assert needed <= set(boot.REQUIRED_MODULES), needed
    for module in needed:
        assert re.search(rf"/{module}\.ko(\.[a-z]+)?$", listing, re.M), f"{module} is missing"
    unneeded = re.findall(r"/(nf_conntrack|nft_ct|nft_reject_inet|nft_objref)\.ko", listing)
    assert not unneeded, f"modules the initramfs does not need: {unneeded}"
    ruleset = "etc/earlyfw/initramfs.nft"
    assert (unpacked / ruleset).read_bytes() == (root / ruleset).read_bytes()
    assert b"initramfs_hosts_v4" in (unpacked / ruleset).read_bytes()  # the initramfs state, not blocked


def unpack_dracut(image: Path, into: Path) -> Path:
    into.mkdir()
    subprocess.run(["lsinitrd", "--unpack", str(image)], cwd=into, check=True, capture_output=True)
    return into


def run(argv: list[str], *, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=BUILD_TIMEOUT)


def size(path: Path) -> int:
    return path.stat().st_size


# -- dracut -------------------------------------------------------------------


@pytest.fixture(scope="module")
def dracut_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    need("lsinitrd", "systemd-analyze")
    with pipeline(DRACUT_ROOT, "dracut", tmp_path_factory.mktemp("dracut")) as built:
        yield built


def test_dracut_rebuild_shows_progress(dracut_pipeline: Pipeline) -> None:
    stderr = dracut_pipeline.output.stderr
    assert f"+ chroot {dracut_pipeline.root} dracut --force --regenerate-all" in stderr
    assert "dracut: *** Creating initramfs image file" in stderr


def test_dracut_systemd_initrd_has_the_block(dracut_pipeline: Pipeline) -> None:
    """Debian's default dracut build is systemd-based: the unit, enabled, runs the loader."""
    p = dracut_pipeline
    listing = run(["lsinitrd", str(p.image)]).stdout
    assert "dracut modules:" in listing and "\nearlyfw\n" in listing
    unpacked = unpack_dracut(p.image, p.scratch / "systemd")
    assert_has_the_block(listing, unpacked, p.root, p.version)
    source = p.root / dracut.MODULE_DIR.lstrip("/") / "earlyfw-load.sh"
    assert (unpacked / dracut.LOADER.lstrip("/")).read_bytes() == source.read_bytes()
    assert os.readlink(unpacked / "init").endswith("systemd")
    assert (unpacked / "usr/lib/systemd/system/earlyfw-initrd.service").exists()
    assert (unpacked / "etc/systemd/system/sysinit.target.wants/earlyfw-initrd.service").is_symlink()
    assert not list(unpacked.rglob("*earlyfw-pre-udev*"))
    # The initrd unit, checked by systemd against the initrd it runs in.
    verify = run(["systemd-analyze", "verify", "--man=no", f"--root={unpacked}", "earlyfw-initrd.service"])
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr


def test_dracut_growth(dracut_pipeline: Pipeline) -> None:
    p = dracut_pipeline
    growth = size(p.image) - size(p.pristine)
    print(f"\ndracut (systemd, default Debian build): {size(p.pristine)} -> {size(p.image)} bytes, +{growth}")
    assert 0 < growth < GROWTH_LIMIT


def test_dracut_shell_initrd_has_the_pre_udev_hook(dracut_pipeline: Pipeline) -> None:
    """A shell-based initrd (no systemd module): the pre-udev hook instead of the unit."""
    p = dracut_pipeline
    shell = chroot(p.root, "dracut", "--force", "-m", "base earlyfw", "/tmp/shell.img", p.version)
    assert "*** Including module: earlyfw ***" in shell.stderr
    listing = run(["lsinitrd", str(p.root / "tmp/shell.img")]).stdout
    unpacked = unpack_dracut(p.root / "tmp/shell.img", p.scratch / "shell")
    assert_has_the_block(listing, unpacked, p.root, p.version)
    hooks = list(unpacked.rglob("pre-udev/00-earlyfw-pre-udev.sh"))
    assert len(hooks) == 1, listing
    assert b"/usr/sbin/earlyfw-load" in hooks[0].read_bytes()
    assert not (unpacked / "usr/lib/systemd/system/earlyfw-initrd.service").exists()
    assert not (unpacked / "usr/lib/systemd/systemd").exists()
    bare = chroot(p.root, "dracut", "--force", "-m", "base", "-o", "earlyfw", "/tmp/bare.img", p.version)
    assert "Including module: earlyfw" not in bare.stderr
    with_it, without = size(p.root / "tmp/shell.img"), size(p.root / "tmp/bare.img")
    print(f"\ndracut (shell, base module only): {without} -> {with_it} bytes, +{with_it - without}")
    assert 0 < with_it - without < GROWTH_LIMIT


def test_dracut_refuses_to_build_without_the_ruleset(dracut_pipeline: Pipeline) -> None:
    """Fail closed at build time: no ruleset, no new initramfs (the old one stays)."""
    p = dracut_pipeline
    ruleset = p.root / "etc/earlyfw/initramfs.nft"
    ruleset.rename(ruleset.with_suffix(".away"))
    try:
        failed = chroot(p.root, "dracut", "--force", "/tmp/broken.img", p.version, check=False)
    finally:
        ruleset.with_suffix(".away").rename(ruleset)
    assert failed.returncode != 0
    assert "earlyfw: /etc/earlyfw/initramfs.nft is missing" in failed.stderr
    assert "dracut module 'earlyfw' cannot be found or installed" in failed.stderr
    assert not (p.root / "tmp/broken.img").exists()


def test_dracut_uninstall_leaves_nothing_for_the_next_build(dracut_pipeline: Pipeline) -> None:
    p = dracut_pipeline
    result = earlyfw(p.scratch, "uninstall", "--root", p.root)
    assert result.returncode == 0, result.stderr
    assert f"next: chroot {p.root} dracut --force --regenerate-all" in result.stdout
    assert not (p.root / dracut.MODULE_DIR.lstrip("/")).exists()
    assert not (p.root / dracut.CONF.lstrip("/")).exists()
    # -m base still takes add_dracutmodules from dracut.conf.d: had earlyfw's
    # conf been left behind, this build would fail for want of the module.
    after = chroot(p.root, "dracut", "--force", "-m", "base", "/tmp/after.img", p.version)
    assert "Including module: earlyfw" not in after.stderr
    assert "earlyfw" not in run(["lsinitrd", str(p.root / "tmp/after.img")]).stdout


# -- initramfs-tools -----------------------------------------------------------


@pytest.fixture(scope="module")
def itools_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    need("lsinitramfs", "unmkinitramfs")
    with pipeline(INITRAMFS_TOOLS_ROOT, "initramfs-tools", tmp_path_factory.mktemp("itools")) as built:
        yield built


def test_initramfs_tools_rebuild_shows_progress(itools_pipeline: Pipeline) -> None:
    p = itools_pipeline
    assert f"+ chroot {p.root} update-initramfs -u -k all" in p.output.stderr
    assert f"update-initramfs: Generating /boot/initrd.img-{p.version}" in p.output.stderr


def test_initramfs_tools_image_has_the_block_before_udev(itools_pipeline: Pipeline) -> None:
    p = itools_pipeline
    listing = run(["lsinitramfs", str(p.image)]).stdout
    unpacked = p.scratch / "unpacked"
    run(["unmkinitramfs", str(p.image), str(unpacked)], check=True)
    main = unpacked / "main" if (unpacked / "main").is_dir() else unpacked
    assert_has_the_block(listing, main, p.root, p.version)
    script = main / "scripts/init-top/earlyfw"
    assert script.read_bytes() == (p.root / initramfs_tools.SCRIPT.lstrip("/")).read_bytes()
    assert os.access(script, os.X_OK)
    # init-top runs first; earlyfw must come before udev, which loads network drivers.
    order = [
        line.split()[0]
        for line in (main / "scripts/init-top/ORDER").read_text().splitlines()
        if line.startswith("/scripts/")
    ]
    assert order.index("/scripts/init-top/earlyfw") < order.index("/scripts/init-top/udev"), order


def test_initramfs_tools_growth(itools_pipeline: Pipeline) -> None:
    p = itools_pipeline
    growth = size(p.image) - size(p.pristine)
    print(f"\ninitramfs-tools (default Debian build): {size(p.pristine)} -> {size(p.image)} bytes, +{growth}")
    assert 0 < growth < GROWTH_LIMIT


def test_initramfs_tools_hook_refuses_an_image_that_would_boot_open(itools_pipeline: Pipeline) -> None:
    """The hook, run as mkinitramfs runs it (its environment, the root's
    hook-functions, modinfo and ldd), fails the build loudly."""
    p = itools_pipeline
    chroot(p.root, "mkdir", "-p", "/tmp/destdir")

    def hook(version: str) -> subprocess.CompletedProcess[str]:
        env = ("env", "DESTDIR=/tmp/destdir", f"version={version}", "verbose=n")
        return chroot(p.root, *env, initramfs_tools.HOOK, check=False)

    assert hook(p.version).returncode == 0
    assert (p.root / "tmp/destdir/usr/sbin/nft").exists()
    missing_kernel = hook("0.0.0-none")
    assert missing_kernel.returncode == 1
    assert "E: earlyfw: kernel 0.0.0-none has no nf_tables module" in missing_kernel.stderr
    ruleset = p.root / "etc/earlyfw/initramfs.nft"
    ruleset.rename(ruleset.with_suffix(".away"))
    try:
        no_ruleset = hook(p.version)
    finally:
        ruleset.with_suffix(".away").rename(ruleset)
    assert no_ruleset.returncode == 1
    assert "E: earlyfw: /etc/earlyfw/initramfs.nft is missing" in no_ruleset.stderr


def test_initramfs_tools_uninstall_rebuilds_without_earlyfw(itools_pipeline: Pipeline) -> None:
    """Uninstall rebuilds too, so nobody is left with a block they cannot lift."""
    p = itools_pipeline
    result = earlyfw(p.scratch, "uninstall", "--root", p.root, "--rebuild-initramfs")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"+ chroot {p.root} update-initramfs -u -k all" in result.stderr
    listing = run(["lsinitramfs", str(p.image)]).stdout
    assert "earlyfw" not in listing
    assert not (p.root / "etc/earlyfw").exists()
    assert abs(size(p.image) - size(p.pristine)) < 64 * 1024  # back to what it was
