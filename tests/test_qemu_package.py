"""The package guest (qemu/package.py, qemu/upgrade.py): the WireGuard guest
with earlyfw from its Debian package, installed in the image root as an image
pipeline would (config first, `apt-get install ./earlyfw_*.deb`, the initramfs
from the package's trigger). One power-on: the same boot proof as the other
guests to login, then, with the tunnel relaxed and a datagram every 5 ms to an
address outside the tunnel, the upgrade to the same tree with a bumped
version, a config change with `earlyfw install`, the naive reload with the
watcher running, the control (a naive upgrade: watcher stopped, table
deleted, reloaded), and `apt-get remove`; then the disk boots again.

The control must leak: its test fails if the capture shows none of the
probe's datagrams in its window, because then the probe or the capture is
broken and the no-leak phases prove nothing.

The first tests are fast checks of the analysis on hand-made records; the run
is one module fixture (one guest, two boots) whose properties each have a test.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from qemu import REPO, handshake, package, proof, upgrade
from qemu.guest import VARIANTS

from tests.test_qemu_boot import QEMU_TOOLS
from tests.test_qemu_wireguard import PEER_TOOLS

# -- the analysis, on hand-made records ----------------------------------------------

MONITOR = """\
10.000 add table inet earlyfw
10.001 delete table inet earlyfw
10.002 add table inet earlyfw
10.003 add table inet earlyfw_guard
10.004 # new generation 7 by process 300 (earlyfw)
20.000 delete table inet earlyfw
20.010 # new generation 8 by process 400 (nft)
20.020 add table inet earlyfw
20.030 # new generation 9 by process 300 (earlyfw)
30.000 delete table inet earlyfw_guard
30.010 # new generation 10 by process 500 (nft)
40.000 delete table inet earlyfw
40.500 # new generation 11 by process 600 (nft)
"""


def test_monitor_a_replacement_in_one_generation_is_no_absence() -> None:
    """declare-delete-define in one transaction (every state change) keeps the
    table; a delete on its own removes it until a later generation adds it;
    the guard's own name is another table."""
    absences = upgrade.parse_monitor(MONITOR)
    assert [(a.start, a.end, a.removed_by, a.restored_by) for a in absences] == [
        (20.01, 20.03, "nft", "earlyfw"),
        (40.5, None, "nft", None),
    ]
    assert absences[0].length() == 0.02


def phases(outside: tuple[float, ...], other: tuple[tuple[float, str], ...] = ()) -> upgrade.Phases:
    events = {"probe-start": 1.0, "upgrade-start": 3.0, "upgrade-end": 5.0, "reconfigure-start": 8.0,
              "naive-reload-start": 10.0, "naive-upgrade-start": 12.0, "remove-start": 15.0,
              "remove-end": 16.0, "probe-stop": 18.0}  # fmt: skip
    journal = handshake.parse_journal(
        "[    4.0] guest earlyfw[10]: blocked: watcher stopped (SIGTERM)\n"
        "[    4.5] guest earlyfw[20]: blocked: watcher started (wireguard on wg0, guarded); relaxing only on proof\n"
        "[    4.6] guest earlyfw[20]: relaxed: peer x at 10.0.2.2:51820: handshake 50.1s ago\n"
    )
    return upgrade.Phases(
        events=events,
        counts=((1.0, 0, 0), (3.0, 400, 400), (8.0, 1400, 1400), (18.0, 3400, 2000)),
        absences=(),
        journal=journal,
        tunnel=(),
        outside=outside,
        other_leaks=other,
        sections={},
    )


def test_phase_windows_leaks_and_attempts() -> None:
    p = phases(outside=(12.5, 12.6, 16.5), other=((12.7, "udp 10.0.2.15:1 -> 9.9.9.9:53"),))
    assert p.window("baseline") == (1.0, 3.0)
    assert p.window("upgrade") == (3.0, 8.0)
    assert p.window("naive-upgrade") == (12.0, 15.0)
    assert p.window("remove") == (15.0, 16.0)
    assert p.window("after-remove") == (16.0, 18.0)
    assert p.leaks("upgrade") == (0, 0)
    assert p.leaks("naive-upgrade") == (2, 1)
    assert p.leaks("after-remove") == (1, 0)
    assert p.attempts("upgrade") == (1000, 1000)
    r = p.restart("upgrade")
    assert (r.unguarded, r.relax_after_start, r.tunnel_blocked, r.guarded) == (0.5, 0.1, 0.6, True)
    assert p.restart("reconfigure").started is None


def test_a_leak_or_a_missing_table_in_an_upgrade_is_a_problem() -> None:
    """The checks that pass the package guest fail a record with one leaked
    datagram in the upgrade, or a table missing meanwhile."""
    assert upgrade._check_no_leaks(phases(outside=())) == []
    assert upgrade._check_no_leaks(phases(outside=(4.2,)))
    missing = upgrade.Absence(4.1, 4.2, "nft", "earlyfw")
    assert upgrade._check_no_leaks(dataclasses.replace(phases(outside=()), absences=(missing,)))
    assert upgrade._check_control(phases(outside=()))  # a control that leaks nothing is a problem


def test_the_bumped_version_sorts_after_the_tree_s(tmp_path: Path) -> None:
    (tmp_path / "debian").mkdir()
    shutil.copyfile(REPO / "debian/changelog", tmp_path / "debian/changelog")
    current = package.changelog_version(tmp_path)
    newer = package.bump(tmp_path)
    assert package.changelog_version(tmp_path) == newer == current + package.UPGRADE_SUFFIX
    assert subprocess.run(["dpkg", "--compare-versions", newer, "gt", current], check=False).returncode == 0


def test_the_guest_key_covers_what_a_package_installs_not_its_text(tmp_path: Path) -> None:
    """payload_digest, the package guest's key: a changed README (the wheel's
    METADATA), changelog or man page leaves it; a changed file that runs, a
    maintainer script or a mode changes it."""

    def deb(name: str, **changes: str) -> Path:
        tree = tmp_path / name
        files = {
            "DEBIAN/control": "Package: t\nVersion: 1\nArchitecture: all\nMaintainer: t <t@example.org>\n"
            "Description: t\n",
            "DEBIAN/postinst": "#!/bin/sh\nexit 0\n",
            "usr/bin/t": "#!/bin/sh\necho t\n",
            "usr/lib/python3/dist-packages/t-1.dist-info/METADATA": "readme\n",
            "usr/share/doc/t/changelog": "one\n",
            **changes,
        }
        for path, text in files.items():
            (tree / path).parent.mkdir(parents=True, exist_ok=True)
            (tree / path).write_text(text)
        for script in ("DEBIAN/postinst", "usr/bin/t"):
            (tree / script).chmod(0o755)
        out = tmp_path / f"{name}.deb"
        subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(out)], check=True, capture_output=True)
        return out

    base = package.payload_digest(deb("base"))
    text = {"usr/lib/python3/dist-packages/t-1.dist-info/METADATA": "new readme\n", "usr/share/doc/t/changelog": "2\n"}
    assert package.payload_digest(deb("text", **text)) == base
    assert package.payload_digest(deb("code", **{"usr/bin/t": "#!/bin/sh\necho u\n"})) != base
    assert package.payload_digest(deb("script", **{"DEBIAN/postinst": "#!/bin/sh\ntrue\n"})) != base
    moded = deb("mode")
    assert package.payload_digest(moded) == base
    (tmp_path / "mode/usr/bin/t").chmod(0o700)
    moded.unlink()
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-b", str(tmp_path / "mode"), str(moded)], check=True, capture_output=True
    )
    assert package.payload_digest(moded) != base


# -- the run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verdict(deb: Path, newer_deb: Path) -> proof.Verdict:
    tools = {**QEMU_TOOLS, **PEER_TOOLS, "lsinitramfs": "initramfs-tools-core", "debugfs": "e2fsprogs"}
    missing = sorted({package for tool, package in tools.items() if shutil.which(tool) is None})
    if missing:
        pytest.fail(f"the package guest needs: apt-get install {' '.join(missing)}", pytrace=False)
    result = proof.run(VARIANTS["package-upgrade"], debs=package.Debs(deb, newer_deb))
    print(proof.table([result]))
    print(json.dumps(proof.summary(result).get("upgrade"), indent=1))
    return result


def problems_about(verdict: proof.Verdict, *words: str) -> list[str]:
    return [p for p in verdict.problems if any(w in p for w in words)]


@pytest.mark.qemu
@pytest.mark.slow
def test_package_guest_passes_the_boot_proof(verdict: proof.Verdict) -> None:
    """Power-on to login, earlyfw from its package: nothing but DHCP, ARP, IPv6
    link plumbing and the endpoint; the block live before the NIC; the watcher
    (Debian's python3, the packaged code) relaxes only after the handshake."""
    boot_problems = proof._check_boot(verdict.variant, verdict.boot_outcome)
    assert boot_problems == (), "\n".join(boot_problems)
    assert verdict.boot_outcome.report.earlyfw_state == "relaxed"


@pytest.mark.qemu
@pytest.mark.slow
def test_upgrade_and_config_change_let_nothing_out(verdict: proof.Verdict) -> None:
    """`apt-get install ./earlyfw_<newer>.deb`, then a config change and
    `earlyfw install`: no packet out, table inet earlyfw in every generation,
    the watcher restarted guarded and relaxed again at once."""
    found = problems_about(verdict, "phase upgrade", "phase reconfigure", "phase baseline", "the upgrade", "config")
    found += problems_about(verdict, "outside probe tried", "phases' record", "never finished")
    assert found == [], "\n".join(found)
    p = upgrade.observe(verdict.outcome)
    for name in ("upgrade", "reconfigure"):
        assert p.leaks(name) == (0, 0)
        assert p.attempts(name)[0] >= upgrade.MIN_ATTEMPTS
        r = p.restart(name)
        assert r.guarded and r.relax_after_start is not None and r.relax_after_start <= upgrade.RELAX_AFTER_START


@pytest.mark.qemu
@pytest.mark.slow
def test_naive_reload_with_the_watcher_running_is_held_by_the_guard(verdict: proof.Verdict) -> None:
    """`nft delete table inet earlyfw; sleep 1; nft -f blocked.nft` while the
    watcher runs: the table is gone for a moment, nothing gets out."""
    assert problems_about(verdict, "phase naive-reload") == []
    p = upgrade.observe(verdict.outcome)
    assert p.absent("naive-reload"), "the naive reload never removed the table"
    assert p.leaks("naive-reload") == (0, 0)


@pytest.mark.qemu
@pytest.mark.slow
def test_naive_upgrade_control_leaks(verdict: proof.Verdict) -> None:
    """The control: the watcher stopped, the table deleted, a second later
    loaded again. The probe's datagrams are in the capture."""
    assert problems_about(verdict, "control", f"phase {upgrade.CONTROL}") == []
    p = upgrade.observe(verdict.outcome)
    outside, _ = p.leaks(upgrade.CONTROL)
    assert outside > 0
    assert any(a.length() is not None and a.length() >= 0.5 for a in p.absent(upgrade.CONTROL))  # type: ignore[operator]


@pytest.mark.qemu
@pytest.mark.slow
def test_remove_leaves_a_working_network_and_nothing_of_earlyfw(verdict: proof.Verdict) -> None:
    found = problems_about(verdict, "removal", "apt-get remove", "phase remove", "network manager")
    assert found == [], "\n".join(found)


@pytest.mark.qemu
@pytest.mark.slow
def test_next_boot_after_remove_is_clean(verdict: proof.Verdict) -> None:
    """The disk the guest powered off with, booted with the initramfs the
    removal left: login, no earlyfw anywhere, the network works."""
    assert verdict.after is not None
    found = upgrade.check_next_boot(verdict.after)
    assert found == [], "\n".join(found)


@pytest.mark.qemu
@pytest.mark.slow
def test_package_guest_verdict(verdict: proof.Verdict) -> None:
    """Everything above together, and nothing else found."""
    assert verdict.passed, verdict.explain()
