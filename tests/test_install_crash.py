"""Crash safety: a kill at any mutating step of `install`, of a re-install with
a changed config, and of `uninstall`, is finished by running `install` again
(the complete new state) or undone by `uninstall` (the exact tree from before
the first install: content, mode, owner, no leftovers), byte for byte.

The kill is the Root's fault-injection seam: from step N on, every change
raises, so nothing more is written — not even a rollback — as after SIGKILL.
A spot check kills a real `earlyfw install` with strace's syscall injection.
The lock test holds the root's lock and watches a second run wait for it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from earlyfw import config, install
from earlyfw.errors import EarlyfwError
from earlyfw.root import MANIFEST, Root
from tests.recording_runner import RecordingRunner
from tests.test_install import EXAMPLE, snapshot

FAST_TMP = "/dev/shm" if os.path.isdir("/dev/shm") else None
TARGETS = ["core", "watch"]
A = config.load(EXAMPLE)
# Another tunnel kind: a different file set (the OpenVPN hook) and contents.
B = config.Config.from_dict(
    {
        "tunnel": {"kind": "openvpn", "interface": "tun0"},
        "endpoint": [{"address": "198.51.100.9", "port": 1194, "protocol": "udp"}],
        "lan": {"allow": True},
    }
)


class Killed(BaseException):
    """Not an Exception: nothing earlyfw does may catch it, as nothing catches SIGKILL."""


def dies_at(step: int) -> Callable[[str, str], None]:
    count = 0

    def fault(operation: str, path: str) -> None:
        nonlocal count
        count += 1
        if count > step:
            raise Killed(f"step {step}: {operation} {path}")

    return fault


def steps_of(action: Callable[[Root], object], root_dir: Path) -> int:
    seen: list[tuple[str, str]] = []
    action(Root(root_dir, fault=lambda op, path: seen.append((op, path))))
    return len(seen)


def image_before(root: Path) -> None:
    """An image with files of its own where earlyfw writes: they must come back exactly."""
    (root / "etc/earlyfw").mkdir(parents=True)
    mine = root / "etc/earlyfw/blocked.nft"
    mine.write_text("# the admin's own\n")
    os.chmod(mine, 0o640)
    os.chown(mine, 0, 4)
    wants = root / "etc/systemd/system/sleep.target.wants"
    wants.mkdir(parents=True)
    (wants / "earlyfw-sleep.service").symlink_to("/dev/null")
    os.chown(wants / "earlyfw-sleep.service", 7, 7, follow_symlinks=False)
    (root / "etc/hostname").write_text("image\n")


def do_install(cfg: config.Config) -> Callable[[Root], object]:
    return lambda root: install.install(cfg, root, RecordingRunner(), TARGETS)


def do_uninstall(root: Root) -> object:
    try:
        return install.uninstall(root, RecordingRunner())
    except EarlyfwError as e:  # killed before anything was written: that is the pristine tree
        if "is not installed" not in str(e):
            raise
        return None


@contextlib.contextmanager
def fresh(prepare: Callable[[Path], object]) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="earlyfw-crash-", dir=FAST_TMP) as t:
        root = Path(t)
        image_before(root)
        prepare(root)
        yield root


def nothing(root: Path) -> None:
    pass


def installed_with(cfg: config.Config) -> Callable[[Path], object]:
    return lambda root: install.install(cfg, Root(root), RecordingRunner(), TARGETS)


def expected(prepare: Callable[[Path], object], then: Callable[[Root], object] | None = None) -> dict[str, Any]:
    with fresh(prepare) as root:
        if then is not None:
            then(Root(root))
        return snapshot(root)


SCENARIOS = {
    # name: (state before the killed run, the killed run)
    "install": (nothing, do_install(A)),
    "re-install with a changed config": (installed_with(B), do_install(A)),
    "uninstall": (installed_with(B), do_uninstall),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_a_kill_at_every_step_is_finished_by_install_or_undone_by_uninstall(scenario: str) -> None:
    prepare, killed_run = SCENARIOS[scenario]
    pristine = expected(nothing)
    complete = expected(prepare, do_install(A))
    with fresh(prepare) as root:
        total = steps_of(killed_run, root)
    assert total > 20, "the seam sees every change"
    for step in range(total):
        for recovery, want in ((do_install(A), complete), (do_uninstall, pristine)):
            with fresh(prepare) as root:
                with pytest.raises(Killed):
                    killed_run(Root(root, fault=dies_at(step)))
                try:
                    recovery(Root(root))
                except Exception as e:  # say which step left what
                    pytest.fail(f"{scenario}, killed at step {step}/{total}: recovery raised {e!r}")
                got = snapshot(root)
                if got != want:
                    extra = sorted(set(got) - set(want))
                    missing = sorted(set(want) - set(got))
                    changed = sorted(k for k in set(got) & set(want) if got[k] != want[k])
                    pytest.fail(
                        f"{scenario}, killed at step {step}/{total}, recovered by "
                        f"{'install' if want is complete else 'uninstall'}: "
                        f"extra {extra}, missing {missing}, changed {changed}"
                    )


ALL_FILE_TARGETS = ["core", "systemd", "watch", "initramfs-tools"]
PRISTINE = expected(nothing)
COMPLETE: dict[str, dict[str, Any]] = {}  # the tree each scenario's recovery by install must reach


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["install", "re-install", "uninstall"]), st.floats(0, 1, exclude_max=True))
def test_a_kill_with_every_file_target_is_recoverable(scenario: str, where: float) -> None:
    """The same property with every Linux target that only writes files (the
    systemd units and drop-ins, the watcher, initramfs-tools' hooks): more
    steps, so a sample of them."""

    def run(cfg: config.Config) -> Callable[[Root], object]:
        return lambda root: install.install(cfg, root, RecordingRunner(), ALL_FILE_TARGETS)

    def with_b(root: Path) -> object:
        return run(B)(Root(root))

    prepare, killed_run = {
        "install": (nothing, run(A)),
        "re-install": (with_b, run(A)),
        "uninstall": (with_b, do_uninstall),
    }[scenario]
    with fresh(prepare) as root:
        step = int(steps_of(killed_run, root) * where)
    if "all " + scenario not in COMPLETE:
        COMPLETE["all " + scenario] = expected(prepare, run(A))
    for recovery, want in ((run(A), COMPLETE["all " + scenario]), (do_uninstall, PRISTINE)):
        with fresh(prepare) as root:
            with pytest.raises(Killed):
                killed_run(Root(root, fault=dies_at(step)))
            recovery(Root(root))
            assert snapshot(root) == want, f"{scenario} killed at step {step}"


def fails_then_dies(fail_at: int, die_after: int) -> Callable[[str, str], None]:
    """A full disk at step `fail_at`, then a kill `die_after` steps into the rollback."""
    count = 0

    def fault(operation: str, path: str) -> None:
        nonlocal count
        count += 1
        if count == fail_at + 1:
            raise OSError(28, "No space left on device")
        if count > fail_at + 1 + die_after:
            raise Killed(f"rollback step {die_after}: {operation} {path}")

    return fault


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["install", "re-install with a changed config"]),
    st.floats(0, 1, exclude_max=True),
    st.integers(0, 40),
)
def test_a_kill_during_the_rollback_of_a_failed_install_is_recoverable(scenario: str, where: float, into: int) -> None:
    """An error rolls the install back; a kill part-way through that rollback
    is recovered like any other kill."""
    prepare, killed_run = SCENARIOS[scenario]
    with fresh(prepare) as root:
        step = int(steps_of(killed_run, root) * where)
    if scenario not in COMPLETE:
        COMPLETE[scenario] = expected(prepare, do_install(A))
    for recovery, want in ((do_install(A), COMPLETE[scenario]), (do_uninstall, PRISTINE)):
        with fresh(prepare) as root:
            with pytest.raises((Killed, OSError)):
                killed_run(Root(root, fault=fails_then_dies(step, into)))
            recovery(Root(root))
            assert snapshot(root) == want, f"{scenario}: failed at step {step}, killed {into} steps into the rollback"


def test_a_run_after_a_kill_does_not_back_up_earlyfws_own_files() -> None:
    """The reproduction: kill install part-way, install again, uninstall: the
    old code took its own leftovers for the user's and "restored" the block."""
    pristine = expected(nothing)
    with fresh(nothing) as root:
        total = steps_of(do_install(A), root)
    with fresh(nothing) as root:
        with pytest.raises(Killed):
            do_install(A)(Root(root, fault=dies_at(total * 2 // 3)))
        do_install(A)(Root(root))
        do_uninstall(Root(root))
        assert snapshot(root) == pristine


def cli_env() -> dict[str, str]:
    # No .pyc writes: they would be renames too, and shift strace's count.
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.mark.parametrize("when", [1, 9, 14])
def test_strace_sigkill_at_a_rename_then_both_recoveries(tmp_path: Path, when: int) -> None:
    """A real SIGKILL, from strace's syscall fault injection, at the when-th rename."""
    strace = shutil.which("strace")
    assert strace, "strace is missing (apt-get install strace; .ci/setup installs it)"
    config_file = tmp_path / "a.toml"
    config_file.write_text(A.to_toml())
    pristine = expected(nothing)
    complete = expected(nothing, do_install(A))
    for recovery, want in (("install", complete), ("uninstall", pristine)):
        with fresh(nothing) as root:
            base = [sys.executable, "-m", "earlyfw", "--config", str(config_file)]
            killed = subprocess.run(
                [strace, "-f", "-qq", "-o", "/dev/null", "-e", "trace=rename,renameat,renameat2",
                 "-e", f"inject=rename,renameat,renameat2:signal=SIGKILL:when={when}",
                 *base, "install", "--root", str(root), *[a for t in TARGETS for a in ("--target", t)]],
                capture_output=True, text=True, check=False, env=cli_env(),
            )  # fmt: skip
            assert killed.returncode in (-9, 137), killed.stderr
            args = [*base, recovery, "--root", str(root)]
            if recovery == "install":
                args += [a for t in TARGETS for a in ("--target", t)]
            again = subprocess.run(args, capture_output=True, text=True, check=False, env=cli_env())
            assert again.returncode == 0, again.stderr
            assert snapshot(root) == want, f"killed at rename {when}, recovered by {recovery}"


def test_a_second_run_waits_for_the_lock(tmp_path: Path) -> None:
    config_file = tmp_path / "a.toml"
    config_file.write_text(A.to_toml())
    root = tmp_path / "root"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running install holds
    waiting = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "earlyfw",
            "--config",
            str(config_file),
            "install",
            "--root",
            str(root),
            "--target",
            "core",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert waiting.stderr is not None
        line = waiting.stderr.readline()
        assert line.strip() == f"earlyfw: waiting for another earlyfw install or uninstall in {root}"
        time.sleep(0.5)
        assert waiting.poll() is None, "it waits while the lock is held"
        assert not (root / MANIFEST.lstrip("/")).exists(), "and writes nothing meanwhile"
    finally:
        os.close(fd)
    assert waiting.wait(timeout=60) == 0
    assert (root / MANIFEST.lstrip("/")).exists()


def test_two_installs_at_once_leave_nothing_after_uninstall(tmp_path: Path) -> None:
    """The reproduction: two concurrent installs into one root, then uninstall."""
    config_file = tmp_path / "a.toml"
    config_file.write_text(A.to_toml())
    root = tmp_path / "root"
    root.mkdir()
    image_before(root)
    before = snapshot(root)
    argv = [sys.executable, "-m", "earlyfw", "-q", "--config", str(config_file), "install", "--root", str(root)]
    argv += ["--target", "core", "--target", "systemd", "--target", "watch"]
    runs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    assert [r.wait(timeout=120) for r in runs] == [0, 0, 0]
    result = subprocess.run(
        [sys.executable, "-m", "earlyfw", "uninstall", "--root", str(root)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert snapshot(root) == before
