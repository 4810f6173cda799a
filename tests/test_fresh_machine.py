"""The README's first command, verbatim, on a fresh Debian 12: a minimal root
(mmdebstrap minbase with python3, git and ca-certificates: Debian's python3
without pip, PEP 668, root without sudo) with a clone of this repository,
entered with chroot as a new user would log in.

The chroot shares the host's network, which apt and PyPI need; the demo it
runs loads its ruleset only into a throwaway `ip netns` (inside the chroot's
private mount namespace), and the test checks the host's own tables are
untouched. No daemon starts in the chroot (policy-rc.d), as in any chroot.

The clone is of this repository's HEAD plus the tracked changes not yet
committed; EARLYFW_FRESH_REF=<ref> tests a given commit instead (for
example main, to see the test fail on an older README).

apt's downloads and pip's cache are kept under /var/cache/earlyfw-test so a
second run does not download again; the root itself is the cached pristine
mmdebstrap root seen through an overlay. This workplace reaches PyPI through a
TLS-inspecting proxy: the root gets the host's trust store and pip's `cert`
setting, as the host has them (site configuration, like resolv.conf, which
mmdebstrap copies itself); a machine on an ordinary network needs neither.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_boot_targets_generators import CACHE, overlay, scratch_root

TOP = Path(__file__).parent.parent
FRESH_ROOT = ("python3", "git", "ca-certificates")
DOWNLOADS = CACHE.parent / "downloads"
CLONE = "/root/earlyfw"
TIMEOUT = 1800
# What a login shell on a stock Debian has; nothing from the test machine leaks in.
CLEAN_ENV = ["env", "-i", "HOME=/root", "LANG=C.UTF-8", "TERM=dumb",
             "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]  # fmt: skip


def readme_commands(readme: str) -> list[str]:
    """The commands of the README's first sh block, comments stripped."""
    block = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert block, "README.md has no sh block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def git(*argv: str, cwd: Path = TOP) -> str:
    return subprocess.run(["git", *argv], cwd=cwd, capture_output=True, text=True, check=True).stdout


def clone_into(root: Path) -> Path:
    """A clone of the repository at CLONE inside `root`, as a user would make it."""
    target = root / CLONE.lstrip("/")
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(TOP), str(target)], check=True)
    ref = os.environ.get("EARLYFW_FRESH_REF")
    git("checkout", "-q", git("rev-parse", ref or "HEAD").strip(), cwd=target)
    if not ref:
        diff = git("diff", "--binary", "HEAD")
        if diff:
            subprocess.run(["git", "apply"], input=diff, text=True, cwd=target, check=True)
    return target


def site_network(root: Path) -> None:
    """This workplace's TLS trust, as the host has it (see the module docstring)."""
    shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/certs/ca-certificates.crt")
    (root / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")


def host_tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout


def chroot_mounts(root: Path, cache: str) -> str:
    """Shell commands mounting what a chroot needs into `root` (to run in a
    private mount namespace): /proc, /sys, /dev, and the download caches."""
    apt, pip = DOWNLOADS / cache / "apt", DOWNLOADS / cache / "pip"
    (apt / "partial").mkdir(parents=True, exist_ok=True)
    pip.mkdir(parents=True, exist_ok=True)
    (root / "root/.cache/pip").mkdir(parents=True, exist_ok=True)
    r = shlex.quote(str(root))
    return (
        f"mount -t proc proc {r}/proc && mount -t sysfs sys {r}/sys && mount --rbind /dev {r}/dev"
        f" && mount --bind {shlex.quote(str(apt))} {r}/var/cache/apt/archives"
        f" && mount --bind {shlex.quote(str(pip))} {r}/root/.cache/pip"
    )


def in_chroot(
    root: Path, command: str, *, cwd: str = CLONE, netns: str | None = None, cache: str = "fresh"
) -> subprocess.CompletedProcess[str]:
    """`command` in `root` with /proc, /sys, /dev, in a private mount namespace
    (mounts and any `ip netns` it makes go away with it); in the network
    namespace `netns` when given. `cache` names the download cache (apt locks
    its cache, so tests that may run at once use their own)."""
    mounts = chroot_mounts(root, cache)
    enter = shlex.join(["chroot", str(root), *CLEAN_ENV, "sh", "-c", f"cd {cwd} && {command}"])
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run(
        [*prefix, "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", f"{mounts} && exec {enter}"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_readme_first_command_on_fresh_debian(tmp_path: Path) -> None:
    lower = scratch_root(FRESH_ROOT)
    before = host_tables()
    with overlay(lower, tmp_path) as root:
        # A stock Debian really: no sudo, no pip, and pip refused (PEP 668) by its python3.
        assert not (root / "usr/bin/sudo").exists()
        assert (root / "usr/lib/python3.11/EXTERNALLY-MANAGED").exists()
        assert in_chroot_bare(root, "python3 -m pip --version").returncode != 0
        (root / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\n# chroot: no daemon starts\nexit 101\n")
        (root / "usr/sbin/policy-rc.d").chmod(0o755)
        site_network(root)
        clone = clone_into(root)
        first = readme_commands((clone / "README.md").read_text())[0]
        result = in_chroot(root, first)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{first!r} failed ({result.returncode}):\n{output[-4000:]}"
    # What the demo prints: the install, the ruleset, the status from its netns.
    assert "== earlyfw install --root" in result.stdout
    assert "table inet earlyfw {" in result.stdout
    assert re.search(r"state\W+blocked", result.stdout), result.stdout[-3000:]
    assert host_tables() == before, "the demo changed the host's own nftables tables"


def in_chroot_bare(root: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", str(root), *CLEAN_ENV, "sh", "-c", command], capture_output=True, text=True, check=False
    )


def test_ci_runs_the_readme_test_command() -> None:
    """CI calls the README's second command (setup, then the test suite) as written."""
    setup, tests = (part.strip() for part in readme_commands((TOP / "README.md").read_text())[1].split("&&"))
    steps = [line.strip() for line in (TOP / ".ci/run").read_text().splitlines()]
    assert setup in steps
    assert tests in steps
    assert steps.index(setup) < steps.index(tests)
