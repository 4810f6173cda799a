"""earlyfw-watch.service is running and ready before anything can bring a
tunnel up: systemd's own loader (`systemd --test`) builds the boot
transaction of an image with the systemd and watch targets, and the watcher
must come before every network manager and before wg-quick@ in the ordering
systemd itself derived (Before=/After= followed transitively), and must be
Type=notify, so "before" means ready, not merely forked.

The control is the unit as it was (ordered after basic.target, Type=simple):
systemd's ordering then lets the managers start first.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from earlyfw import config as configuration
from earlyfw import install
from earlyfw.linux import systemd, watcher_unit
from earlyfw.root import Root
from tests.configs import CONFIG_TEXT
from tests.recording_runner import RecordingRunner
from tests.test_units import OVERLAY_USR_LIB, UNIT_DIR, instance, need, systemd_transaction, unit_path

# What brings tunnels up: every network manager earlyfw knows, and wg-quick
# (the host's real wg-quick@.service, from wireguard-tools).
TUNNEL_STARTERS = (*(instance(u) for u in systemd.NETWORK_MANAGERS), "wg-quick@wg0.service")
# The watcher's ordering as it was before it was ordered before the network.
OLD_ORDER = "[Unit]\nAfter=earlyfw-block.service basic.target\n[Service]\nType=simple\nExecStart=/bin/true\n"


@pytest.fixture(scope="module")
def image() -> Iterator[Path]:
    need("setpriv")
    if not any(Path(d, "wg-quick@.service").exists() for d in ("/lib/systemd/system", "/usr/lib/systemd/system")):
        pytest.fail("wg-quick@.service is missing: apt-get install wireguard-tools", pytrace=False)
    base = Path(tempfile.mkdtemp(prefix="earlyfw-watch-order-"))
    base.chmod(0o755)
    try:
        root = Root(base / "image")
        root.path.mkdir()
        (root.path / "usr/lib/systemd").mkdir(parents=True)
        (root.path / "usr/lib/systemd/systemd").touch()
        install.install(configuration.parse(CONFIG_TEXT), root, RecordingRunner(), ("systemd", "watch"))
        (root / "/var/lib/earlyfw").chmod(0o755)
        stubs = base / "stubs"
        stubs.mkdir()
        for unit in systemd.NETWORK_MANAGERS:
            if not any(Path(d, unit).exists() for d in ("/lib/systemd/system", "/usr/lib/systemd/system")):
                # A stub with no ordering of its own: only the watcher's orders it.
                (stubs / unit).write_text(f"[Unit]\nDescription=stub {unit}\n[Service]\nExecStart=/bin/true\n")
        wanted = " ".join((watcher_unit.WATCH_UNIT, *TUNNEL_STARTERS))
        (stubs / "earlyfw-test.target").write_text(f"[Unit]\nWants=sysinit.target {wanted}\n")
        yield base
    finally:
        shutil.rmtree(base)


def transaction(image: Path) -> dict[str, list[str]]:
    """systemd's boot transaction for the test target: unit -> its dump lines."""
    return systemd_transaction(unit_path(image), "/usr/sbin:/usr/bin:/sbin:/bin")


def started_after(units: dict[str, list[str]], first: str) -> set[str]:
    """Every unit systemd starts only after `first`: its Before= and After=
    edges, followed transitively."""
    edges: dict[str, set[str]] = {}
    for unit, lines in units.items():
        for line in lines:
            verb, _, rest = line.partition(": ")
            other = rest.split(" ", 1)[0]
            if verb == "Before":
                edges.setdefault(unit, set()).add(other)
            elif verb == "After":
                edges.setdefault(other, set()).add(unit)
    seen: set[str] = set()
    todo = [first]
    while todo:
        for later in edges.get(todo.pop(), ()):
            if later not in seen:
                seen.add(later)
                todo.append(later)
    return seen


def test_the_watcher_is_ready_before_anything_brings_a_tunnel_up(image: Path) -> None:
    units = transaction(image)
    unit = units[watcher_unit.WATCH_UNIT]
    assert f"Fragment Path: {image}/image{UNIT_DIR}/{watcher_unit.WATCH_UNIT}" in unit
    assert "Type: notify" in unit
    assert "DefaultDependencies: no" in unit
    assert "After: earlyfw-block.service (origin-file)" in unit
    later = started_after(units, watcher_unit.WATCH_UNIT)
    assert set(TUNNEL_STARTERS) - later == set()
    # Nothing the watcher itself waits for comes after it: no ordering cycle.
    assert watcher_unit.WATCH_UNIT not in later
    assert systemd.BLOCK_UNIT not in later


def test_control_the_old_ordering_lets_the_network_start_first(image: Path) -> None:
    """The same transaction with the watch target as it was (the old unit's
    ordering, no drop-ins): nothing that brings a tunnel up waits for the
    watcher, so the test above can fail."""
    units_dir = image / "image" / UNIT_DIR.lstrip("/")
    saved = {
        path: path.read_bytes()
        for path in (units_dir / watcher_unit.WATCH_UNIT, *units_dir.glob(f"*.d/{watcher_unit.ORDER_DROP_IN}"))
    }
    assert len(saved) == 1 + len(watcher_unit.ORDER_TEMPLATES)
    try:
        for path in saved:
            path.unlink()
        (units_dir / watcher_unit.WATCH_UNIT).write_text(OLD_ORDER)
        units = transaction(image)
    finally:
        for path, content in saved.items():
            path.write_bytes(content)
    assert "Type: simple" in units[watcher_unit.WATCH_UNIT]
    later = started_after(units, watcher_unit.WATCH_UNIT)
    assert not set(TUNNEL_STARTERS) & later


def test_the_watch_unit_verifies_clean(image: Path) -> None:
    need("systemd-analyze")
    result = subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private", "sh", "-c", OVERLAY_USR_LIB, str(image / "image")),
            *("systemd-analyze", "verify", "--man=no"),
            str(image / "image" / UNIT_DIR.lstrip("/") / watcher_unit.WATCH_UNIT),
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_UNIT_PATH": unit_path(image)},
        timeout=120,
        check=False,
    )
    # earlyfw itself is not installed on this host (systemd looks on its own
    # fixed path): that is the only complaint allowed (the image's /usr/lib, with
    # the switch script, is laid over the host's).
    missing = f"{watcher_unit.WATCH_UNIT}: Command earlyfw is not executable: No such file or directory"
    assert [line for line in result.stderr.splitlines() if line and line != missing] == [], result.stderr


def test_the_ordering_drop_ins_verify_clean(image: Path) -> None:
    """wg-quick@wg0 (the host's real unit) with the watcher's drop-in: systemd
    reads it, and has nothing to say about it."""
    need("systemd-analyze")
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "wg-quick@wg0.service"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_UNIT_PATH": unit_path(image)},
        timeout=120,
        check=False,
    )
    assert watcher_unit.ORDER_DROP_IN not in result.stderr, result.stderr
    units = transaction(image)
    drop_in = f"{image}/image{UNIT_DIR}/wg-quick@.service.d/{watcher_unit.ORDER_DROP_IN}"
    assert f"DropIn Path: {drop_in}" in units["wg-quick@wg0.service"]
    assert f"After: {watcher_unit.WATCH_UNIT} (origin-file)" in units["wg-quick@wg0.service"]
