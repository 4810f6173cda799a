"""The Ansible role (payload/ansible/roles/earlyfw) with ansible-playbook
against a fresh Debian 12 root through Ansible's chroot connection: present
installs the session's package (tests/conftest.py, built once), writes the config
from variables and runs `earlyfw install`; a second run changes nothing; a
changed variable runs the handler; absent purges everything, twice idempotently.

Ansible is Debian's (`ansible`, with ansible-core 2.14): the chroot connection
lives in community.general, which ansible-core alone lacks. The package's
dependencies and python3-apt (the apt module's) are fetched with the host's
network first; the playbooks then run in a network namespace the test made,
so what the maintainer scripts load or unload is that namespace's, not the host's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_boot_targets_generators import overlay, scratch_root
from tests.test_fresh_machine import FRESH_ROOT, chroot_mounts, in_chroot

TOP = Path(__file__).parent.parent
ROLES = TOP / "payload/ansible/roles"
VARS = {
    "earlyfw_interface": "wg0",
    "earlyfw_endpoints": [{"address": "198.51.100.7", "port": 51820, "protocol": "udp"}],
    "earlyfw_dns_servers": ["10.64.0.1"],
    "earlyfw_lan_allow": False,
    "earlyfw_egress_interfaces": ["eth0"],
}
# The exceptions of issue 13, as a fleet would set them.
EXCEPTIONS: dict[str, Any] = {
    "earlyfw_lan_allow": ["192.168.1.0/24", "fd00:1::/64"],
    "earlyfw_allow": [{"interface": "tailscale0", "networks": ["100.64.0.0/10"]}, {"interface": "zt0"}],
    "earlyfw_forward_via_tunnel": ["docker0", "br-*"],
    "earlyfw_tunnel_mark": 51820,
    "earlyfw_portal_allow": True,
}
PLAYBOOK = """\
- hosts: fleet
  gather_facts: false
  roles: [earlyfw]
"""


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"efw-ans-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def recap(output: str) -> dict[str, int]:
    found = re.search(r"^machine\s+:\s+(.*)$", output, re.M)
    assert found, output[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", found.group(1))}


def check_exceptions(root: Path) -> dict[str, Any]:
    """The issue-13 keys reach the installed config as given: [lan] allow a
    list (not `| bool`, which made any list false), [[allow]] with and without
    networks, [forward], [tunnel] mark, [portal]."""
    installed = tomllib.loads((root / "etc/earlyfw/earlyfw.toml").read_text())
    assert installed["lan"] == {"allow": EXCEPTIONS["earlyfw_lan_allow"]}
    assert installed["allow"] == EXCEPTIONS["earlyfw_allow"]
    assert installed["forward"] == {"via_tunnel": EXCEPTIONS["earlyfw_forward_via_tunnel"]}
    assert installed["tunnel"]["mark"] == 51820 and installed["portal"] == {"allow": True}
    assert "fd00:1::/64" in (root / "etc/earlyfw/blocked.nft").read_text()
    return installed


def check_no_injection(
    playbook: Callable[..., subprocess.CompletedProcess[str]], root: Path, installed: dict[str, Any]
) -> None:
    """A quote cannot break out of the TOML string, and a misspelt key is
    refused rather than dropped (which would allow the whole interface)."""
    injected = [{"interface": 'tailscale0"\n[lan]\nallow = true #', "network": ["100.64.0.0/10"]}]
    bad = playbook(**{**EXCEPTIONS, "earlyfw_dns_servers": ["10.64.0.2"], "earlyfw_allow": injected})
    assert bad.returncode != 0 and "allow[0]" in bad.stdout, bad.stdout[-3000:]
    assert tomllib.loads((root / "etc/earlyfw/earlyfw.toml").read_text()) == installed


@pytest.mark.slow
def test_role_present_idempotent_handler_absent(deb: Path, tmp_path: Path, netns: str) -> None:
    if shutil.which("ansible-playbook") is None:
        pytest.fail("ansible-playbook is missing: apt-get install ansible (.ci/setup does)")
    lower = scratch_root(FRESH_ROOT)
    scratch = tmp_path / "overlay"
    scratch.mkdir()
    with overlay(lower, scratch) as root:
        (root / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\n# chroot: no daemon starts\nexit 101\n")
        (root / "usr/sbin/policy-rc.d").chmod(0o755)
        (root / "tmp" / deb.name).write_bytes(deb.read_bytes())
        fetch = f"apt-get install -y -qq python3-apt && apt-get install -y -qq --download-only /tmp/{deb.name}"
        fetched = in_chroot(root, f"apt-get update -qq && {fetch}", cwd="/", cache="ansible")
        assert fetched.returncode == 0, fetched.stderr[-3000:]
        (tmp_path / "inventory").write_text(
            f"machine ansible_host={root} ansible_connection=community.general.chroot"
            " ansible_python_interpreter=/usr/bin/python3\n[fleet]\nmachine\n"
        )
        (tmp_path / "site.yml").write_text(PLAYBOOK)

        def playbook(**extra: object) -> subprocess.CompletedProcess[str]:
            variables = json.dumps({**VARS, "earlyfw_deb": str(deb), **extra})
            argv = ["ansible-playbook", "-i", str(tmp_path / "inventory"), "-e", variables, str(tmp_path / "site.yml")]
            env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROLES), "ANSIBLE_NOCOLOR": "1"}
            # The same mounts and apt cache as the download step, in the test's netns.
            inside = f"{chroot_mounts(root, 'ansible')} && exec {shlex.join(argv)}"
            return subprocess.run(
                ["ip", "netns", "exec", netns, "unshare", "--mount", "--propagation", "private", "sh", "-c", inside],
                capture_output=True, text=True, check=False, timeout=900, env=env,
            )  # fmt: skip

        def play(**extra: object) -> tuple[dict[str, int], str]:
            result = playbook(**extra)
            assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
            return recap(result.stdout), result.stdout

        first, _ = play()
        assert first["changed"] > 0 and first["failed"] == 0
        config = (root / "etc/earlyfw/earlyfw.toml").read_text()
        assert '"198.51.100.7"' in config and '"eth0"' in config
        assert (root / "var/lib/earlyfw/manifest.json").exists()
        assert "10.64.0.1" in (root / "etc/earlyfw/relaxed.nft").read_text()

        again, out = play()
        assert again["changed"] == 0, out[-3000:]

        changed, out = play(earlyfw_dns_servers=["10.64.0.2"], **EXCEPTIONS)
        assert changed["changed"] > 0
        assert "RUNNING HANDLER [earlyfw : Earlyfw install]" in out
        assert "10.64.0.2" in (root / "etc/earlyfw/relaxed.nft").read_text()
        installed = check_exceptions(root)

        # A bad value is refused before the file is replaced; nothing changes.
        bad = playbook(earlyfw_endpoints=[{"address": "198.51.100.7", "port": 70000}])
        assert bad.returncode != 0
        assert "70000" in bad.stdout
        assert "10.64.0.2" in (root / "etc/earlyfw/earlyfw.toml").read_text()
        check_no_injection(playbook, root, installed)

        gone, _ = play(earlyfw_state="absent")
        assert gone["changed"] > 0
        assert not (root / "usr/bin/earlyfw").exists()
        assert not (root / "etc/earlyfw").exists()
        assert not (root / "var/lib/earlyfw").exists()
        still_gone, out = play(earlyfw_state="absent")
        assert still_gone["changed"] == 0, out[-3000:]
    host = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    assert "earlyfw" not in host.stdout
