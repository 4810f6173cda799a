"""The Debian package, built the standard way (`dpkg-buildpackage -us -uc -b`
from a copy of the tree, with Debian's own python3 first on PATH, as on any
Debian machine), checked by lintian, then installed with `apt-get install
./earlyfw_*.deb` into a fresh Debian 12 root (mmdebstrap: a kernel,
initramfs-tools, systemd, nftables; cached) and removed and purged there.

The dependencies are downloaded into the root with the host's network first;
every step that runs a maintainer script then runs in a network namespace the
test made, so the tables those scripts load or delete are that namespace's,
never the host's, and the test reads them there.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.package import DEBIAN_PATH, Debs

from earlyfw import __version__
from tests.configs import CONFIG_TEXT
from tests.test_boot_targets_generators import INITRAMFS_TOOLS_ROOT, overlay, scratch_root
from tests.test_fresh_machine import in_chroot

HOOK = "etc/initramfs-tools/hooks/earlyfw"
MANIFEST = "var/lib/earlyfw/manifest.json"


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload,no-any-return]


# `deb`: the session's package (tests/conftest.py, qemu/package.py), built once and shared with the QEMU package guest.


def test_package_carries_the_tree_s_version(deb: Path) -> None:
    assert deb.name == f"earlyfw_{__version__}_all.deb"


def test_lintian_clean(deb: Path) -> None:
    """Clean at --pedantic with info tags; each override says why in debian/earlyfw.lintian-overrides."""
    changes = next(deb.parent.glob("earlyfw_*.changes"))
    result = run(["env", DEBIAN_PATH, "lintian", "--pedantic", "-I", str(changes)])
    tags = [line for line in result.stdout.splitlines() if re.match(r"[EWIPX]: ", line)]
    assert tags == [], "\n".join(tags)


def test_depends_on_debians_own_libraries(deb: Path) -> None:
    depends = run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
    # iproute2: `earlyfw verify` makes stand-in devices for [egress] interfaces with ip (a minbase
    # root lacks it); python3-dnspython: `import --resolve` and `endpoints refresh`.
    for name in ("python3-click", "python3-jinja2", "python3-distro", "python3-plumbum", "python3-tomli-w",
                 "python3-pyroute2", "python3-dnspython", "nftables", "iproute2"):  # fmt: skip
        assert re.search(rf"(^|, ){re.escape(name)}(,|$| )", depends.strip()), (name, depends)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"efw-deb-{id(object()) % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def tables(netns: str) -> str:
    return run(["ip", "netns", "exec", netns, "nft", "list", "tables"]).stdout


@pytest.mark.slow
def test_install_configure_upgrade_remove_purge(deb: Path, newer_deb: Path, tmp_path: Path, netns: str) -> None:
    lower = scratch_root(INITRAMFS_TOOLS_ROOT)
    host_before = run(["nft", "list", "tables"]).stdout
    with overlay(lower, tmp_path) as root:
        (root / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\n# chroot: no daemon starts\nexit 101\n")
        (root / "usr/sbin/policy-rc.d").chmod(0o755)
        (root / "tmp" / deb.name).write_bytes(deb.read_bytes())
        inside = f"/tmp/{deb.name}"

        def step(command: str, *, network: bool = False) -> str:
            result = in_chroot(root, command, cwd="/", netns=None if network else netns, cache="deb")
            output = result.stdout + result.stderr
            assert result.returncode == 0, f"{command}:\n{output[-4000:]}"
            return output

        def in_initramfs() -> list[str]:
            listing = step("lsinitramfs /boot/initrd.img-*")
            return [line for line in listing.splitlines() if "earlyfw" in line]

        # Downloads need the host's network; nothing is configured yet.
        step(f"apt-get update -qq && apt-get install -y -qq --download-only {inside}", network=True)

        # Installed without a config: files shipped, nothing enabled, nothing loaded.
        step(f"apt-get install -y -qq {inside}")
        assert (root / "usr/bin/earlyfw").exists()
        assert not (root / MANIFEST).exists()
        assert not (root / HOOK).exists()
        assert "earlyfw" not in tables(netns)
        step("apt-get remove -y -qq earlyfw")

        # Installed with a config (an image pipeline or Ansible writes it first):
        # configuring does what `earlyfw install` does, initramfs by the trigger.
        (root / "etc/earlyfw").mkdir()
        (root / "etc/earlyfw/earlyfw.toml").write_text(CONFIG_TEXT)
        out = step(f"apt-get install -y {inside}")
        assert "rebuilding the initramfs" not in out, "the generator ran directly, not through its trigger"
        assert re.search(r"Processing triggers for initramfs-tools", out), out[-3000:]
        assert (root / MANIFEST).exists()
        assert (root / HOOK).exists()
        assert any(line.endswith("init-top/earlyfw") for line in in_initramfs()), in_initramfs()

        # The block is live (as after a boot); an upgrade keeps it. The newer
        # version's hook and ruleset are the same files: no initramfs rebuild.
        step("earlyfw --quiet apply --state blocked")
        assert "table inet earlyfw" in tables(netns)
        (root / "tmp" / newer_deb.name).write_bytes(newer_deb.read_bytes())
        out = step(f"apt-get install -y /tmp/{newer_deb.name}")
        assert f"Unpacking earlyfw ({Debs.version(newer_deb)})" in out, out[-3000:]
        assert "table inet earlyfw" in tables(netns) and "Processing triggers for initramfs-tools" not in out, (
            "an upgrade that changes no file the initramfs carries rebuilt it"
        )
        # A config change that reaches the initramfs ruleset, configured again: rebuilt with it.
        (root / "etc/earlyfw/earlyfw.toml").write_text(CONFIG_TEXT.replace("192.0.2.10", "192.0.2.11"))
        out = step(f"apt-get install -y --reinstall /tmp/{newer_deb.name}")
        assert re.search(r"Processing triggers for initramfs-tools", out), out[-3000:]
        unpacked = step(
            "unmkinitramfs /boot/initrd.img-* /tmp/unpacked"
            " && find /tmp/unpacked -path '*/etc/earlyfw/initramfs.nft' -exec cat {} +"
        )
        assert "192.0.2.11" in unpacked
        assert "table inet earlyfw" in tables(netns)

        # Remove: the network works (no table), no hook in the next initramfs, config kept.
        out = step("apt-get remove -y earlyfw")
        assert "table inet earlyfw" not in tables(netns)
        assert not (root / HOOK).exists()
        assert in_initramfs() == []
        assert not (root / "usr/bin/earlyfw").exists()
        # Kept: the file from before earlyfw's first install, which its manifest holds as the backup.
        assert (root / "etc/earlyfw/earlyfw.toml").read_text() == CONFIG_TEXT

        # Purge: config and state gone.
        step("apt-get purge -y -qq earlyfw")
        assert not (root / "etc/earlyfw").exists()
        assert not (root / "var/lib/earlyfw").exists()
    assert run(["nft", "list", "tables"]).stdout == host_before
