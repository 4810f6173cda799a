"""The Linux boot targets (dracut, initramfs-tools, mkinitcpio, systemd): the
files they write into a --root, checked with the real tools that read them
(sh -n, shellcheck, bash sourcing against stubs), their shell logic run for
real (break glass, fail loudly, fallback), detection and the rebuild commands.

The real generators (dracut, mkinitramfs) run in test_boot_targets_generators.py,
the units in test_units.py; the QEMU boot proof lives in qemu/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

from earlyfw import config as configuration
from earlyfw import firewalls, install, nft, templates
from earlyfw.errors import EarlyfwError
from earlyfw.root import MANIFEST, Root
from earlyfw.run import RecordingRunner, Result
from earlyfw.targets import File, Symlink, dracut, initramfs_tools, linux, load_all, mkinitcpio, systemd

CONFIG_TEXT = """\
[tunnel]
kind = "wireguard"
interface = "wg0"
[[endpoint]]
address = "198.51.100.7"
port = 51820
[[endpoint]]
address = "2001:db8::7"
port = 51820
[dns]
servers = ["10.64.0.1"]
[[initramfs.allow]]
address = "192.0.2.10"
port = 2049
protocol = "tcp"
"""
BOOT_TARGETS = ("systemd", "dracut", "initramfs-tools", "mkinitcpio")

# Every file the boot targets write, with its mode (None: a symlink).
EXPECTED = {
    "/etc/systemd/system/earlyfw-block.service": 0o644,
    "/etc/systemd/system/earlyfw-block-failed.service": 0o644,
    "/etc/systemd/system/earlyfw-off.service": 0o644,
    "/etc/systemd/system/sysinit.target.wants/earlyfw-block.service": None,
    "/etc/systemd/system/sysinit.target.wants/earlyfw-off.service": None,
    "/etc/earlyfw/fallback.nft": 0o644,
    **{f"/etc/systemd/system/{unit}.d/earlyfw.conf": 0o644 for unit in systemd.NETWORK_MANAGERS},
    "/etc/systemd/system/nftables.service.d/earlyfw.conf": 0o644,
    "/etc/earlyfw/nftables/start.nft": 0o644,
    "/etc/earlyfw/nftables/reload.nft": 0o644,
    "/etc/earlyfw/nftables/stop.nft": 0o644,
    "/usr/lib/dracut/modules.d/50earlyfw/module-setup.sh": 0o755,
    "/usr/lib/dracut/modules.d/50earlyfw/earlyfw-load.sh": 0o755,
    "/usr/lib/dracut/modules.d/50earlyfw/earlyfw-pre-udev.sh": 0o755,
    "/usr/lib/dracut/modules.d/50earlyfw/earlyfw-initrd.service": 0o644,
    "/etc/dracut.conf.d/earlyfw.conf": 0o644,
    "/etc/initramfs-tools/hooks/earlyfw": 0o755,
    "/etc/initramfs-tools/scripts/init-top/earlyfw": 0o755,
    "/etc/initcpio/install/earlyfw": 0o644,
    "/etc/initcpio/hooks/earlyfw": 0o644,
    "/etc/mkinitcpio.conf.d/earlyfw.conf": 0o644,
    "/usr/lib/earlyfw/initcpio/earlyfw-load": 0o755,
    "/usr/lib/earlyfw/initcpio/earlyfw-initrd.service": 0o644,
}
CORE = {f"/etc/earlyfw/{name}" for name in ("earlyfw.toml", "blocked.nft", "relaxed.nft", "initramfs.nft")}

# (path, shell) for every shell file; "bash" ones are read by bash only.
SHELL_FILES = (
    ("/usr/lib/dracut/modules.d/50earlyfw/module-setup.sh", "bash"),
    ("/usr/lib/dracut/modules.d/50earlyfw/earlyfw-load.sh", "sh"),
    ("/usr/lib/dracut/modules.d/50earlyfw/earlyfw-pre-udev.sh", "sh"),
    ("/etc/initramfs-tools/hooks/earlyfw", "sh"),
    ("/etc/initramfs-tools/scripts/init-top/earlyfw", "sh"),
    ("/etc/initcpio/install/earlyfw", "bash"),
    ("/etc/initcpio/hooks/earlyfw", "sh"),
    ("/etc/mkinitcpio.conf.d/earlyfw.conf", "bash"),
    ("/usr/lib/earlyfw/initcpio/earlyfw-load", "sh"),
)
LOADERS = (
    "/usr/lib/dracut/modules.d/50earlyfw/earlyfw-load.sh",
    "/etc/initramfs-tools/scripts/init-top/earlyfw",
    "/usr/lib/earlyfw/initcpio/earlyfw-load",
)


def need(*tools: str) -> None:
    packages = {"shellcheck": "shellcheck", "unshare": "util-linux", "nft": "nftables", "bash": "bash"}
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {missing}: apt-get install {' '.join(packages.get(t, t) for t in missing)}")
    if os.geteuid() != 0:
        pytest.fail("these tests need root (mount namespaces, chown to 0)")


@pytest.fixture
def config() -> configuration.Config:
    return configuration.parse(CONFIG_TEXT)


@pytest.fixture
def root(tmp_path: Path, config: configuration.Config) -> Root:
    """An image directory with every boot target installed."""
    image = Root(tmp_path / "image")
    image.path.mkdir()
    install.install(config, image, RecordingRunner(), BOOT_TARGETS)
    return image


def files_under(directory: Path) -> dict[str, int | None]:
    found: dict[str, int | None] = {}
    for path in directory.rglob("*"):
        if path.is_symlink():
            found["/" + str(path.relative_to(directory))] = None
        elif path.is_file():
            found["/" + str(path.relative_to(directory))] = path.stat().st_mode & 0o7777
    return found


# -- install into a root: exact paths, modes, idempotence, uninstall ----------


def test_install_writes_exactly_these_files_with_these_modes(root: Root) -> None:
    found = files_under(root.path)
    assert {p: m for p, m in found.items() if p not in CORE and p != MANIFEST} == EXPECTED
    for path, mode in EXPECTED.items():
        st = (root / path).lstat()
        assert (st.st_uid, st.st_gid) == (0, 0), path
        if mode is None:
            assert os.readlink(root / path) == "/etc/systemd/system/" + path.rsplit("/", 1)[1]


def test_install_twice_changes_nothing(root: Root, config: configuration.Config) -> None:
    before = {p: (root / p).read_bytes() if m is not None else os.readlink(root / p) for p, m in EXPECTED.items()}
    manifest = (root / MANIFEST).read_bytes()
    install.install(config, root, RecordingRunner(), BOOT_TARGETS)
    after = {p: (root / p).read_bytes() if m is not None else os.readlink(root / p) for p, m in EXPECTED.items()}
    assert after == before
    assert (root / MANIFEST).read_bytes() == manifest
    assert not list(root.path.rglob("*.new")) and not list(root.path.rglob("*.earlyfw-undo"))


def test_uninstall_leaves_nothing(root: Root) -> None:
    install.uninstall(root, RecordingRunner())
    assert list(root.path.rglob("*")) == []


def test_uninstall_restores_a_file_install_replaced(tmp_path: Path, config: configuration.Config) -> None:
    image = Root(tmp_path / "image")
    theirs = image / "/etc/dracut.conf.d/earlyfw.conf"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("# the admin's own earlyfw.conf\nhostonly=yes\n")
    os.chmod(theirs, 0o600)
    install.install(config, image, RecordingRunner(), ("dracut",))
    assert theirs.read_text() == templates.read("hooks", "dracut/earlyfw.conf")
    install.uninstall(image, RecordingRunner())
    assert theirs.read_text() == "# the admin's own earlyfw.conf\nhostonly=yes\n"
    assert theirs.stat().st_mode & 0o7777 == 0o600
    assert files_under(image.path) == {"/etc/dracut.conf.d/earlyfw.conf": 0o600}


def test_templates_get_constants_only(tmp_path: Path, config: configuration.Config) -> None:
    """Hooks and units are identical whatever the config says: only the
    rulesets (rendered by the core target) carry user values."""
    other = configuration.parse(CONFIG_TEXT.replace("198.51.100.7", "203.0.113.9").replace("wg0", "wg7"))
    plans = []
    for cfg in (config, other):
        targets = [load_all()[name](Root(tmp_path), RecordingRunner()) for name in BOOT_TARGETS]
        plans.append({a.path: a for t in targets for a in t.plan(cfg).artifacts})
    assert plans[0] == plans[1]
    for artifact in plans[0].values():
        if isinstance(artifact, File):
            assert b"198.51.100.7" not in artifact.content and b"wg0" not in artifact.content


def test_every_unit_and_hook_opens_with_why_it_runs_where_it_runs(root: Root) -> None:
    for path, mode in EXPECTED.items():
        if mode is None or path.endswith(".nft"):
            continue
        lines = (root / path).read_text().splitlines()
        body = lines[1:] if lines[0].startswith("#!") else lines
        assert body[0].startswith("# earlyfw: "), f"{path}: {body[0]!r}"


# -- shell files: the real parsers -------------------------------------------


@pytest.mark.parametrize(("path", "shell"), SHELL_FILES)
def test_shell_file_parses_and_passes_shellcheck(root: Root, path: str, shell: str) -> None:
    need("shellcheck", "bash", "sh")
    target = root / path
    parse = subprocess.run([shell, "-n", str(target)], capture_output=True, text=True, check=False)
    assert parse.returncode == 0, parse.stderr
    check = subprocess.run(["shellcheck", "--severity=style", str(target)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout


def test_shellcheck_would_catch_a_mistake(tmp_path: Path) -> None:
    """Control for the test above: shellcheck really reads these files."""
    need("shellcheck")
    loader = tmp_path / "loader"
    loader.write_bytes(linux.loader().replace(b'[ "$arg" =', b"[ $arg ="))
    assert subprocess.run(["shellcheck", str(loader)], capture_output=True, check=False).returncode != 0


# -- the loader's shell logic, run for real ----------------------------------

STUB_NFT = """\
#!/bin/sh
# Records each call; "$STUB_MODE" says which loads succeed.
echo "nft $*" >>"$STUB_LOG"
if [ "$2" = "-" ]; then cat >"$STUB_LOG.fallback"; fi
case "$STUB_MODE:$2" in
ok:*) exit 0 ;;
broken:-) exit 0 ;;
*) echo "Error: stub nft refuses $2" >&2; exit 1 ;;
esac
"""
STUB_MODPROBE = '#!/bin/sh\necho "modprobe $*" >>"$STUB_LOG"\n'


def run_loader(tmp_path: Path, loader: Path, cmdline: str, mode: str) -> tuple[int, str, list[str], str]:
    """Run `loader` with stub nft/modprobe on PATH, a fake /proc/cmdline and a
    file standing in for /dev/kmsg, in a private mount namespace."""
    need("unshare", "sh")
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name, text in (("nft", STUB_NFT), ("modprobe", STUB_MODPROBE)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    fake_cmdline, kmsg, log = tmp_path / "cmdline", tmp_path / "kmsg", tmp_path / "calls"
    fake_cmdline.write_text(cmdline + "\n")
    kmsg.write_text("")
    log.write_text("")
    script = 'mount --bind "$1" /proc/cmdline && mount --bind "$2" /dev/kmsg && exec sh "$3"'
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", fake_cmdline, kmsg, loader],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_MODE": mode, "STUB_LOG": str(log)},
        timeout=30,
        check=False,
    )
    return result.returncode, result.stderr, log.read_text().splitlines(), kmsg.read_text()


@pytest.mark.parametrize("loader", LOADERS)
def test_loader_loads_the_initramfs_ruleset(root: Root, tmp_path: Path, loader: str) -> None:
    status, stderr, calls, kmsg = run_loader(tmp_path, root / loader, "BOOT_IMAGE=/vmlinuz ro quiet", "ok")
    assert status == linux.LOADED, stderr
    assert calls[-1] == "nft -f /etc/earlyfw/initramfs.nft"
    assert [c for c in calls if c.startswith("modprobe")] == [
        "modprobe -q -a " + " ".join(linux.REQUIRED_MODULES + linux.OPTIONAL_MODULES)
    ]
    assert "<5>earlyfw: blocked: /etc/earlyfw/initramfs.nft loaded" in kmsg
    assert stderr == ""  # quiet on the console when all is well


@pytest.mark.parametrize("loader", LOADERS)
def test_loader_honours_break_glass(root: Root, tmp_path: Path, loader: str) -> None:
    status, stderr, calls, kmsg = run_loader(tmp_path, root / loader, "BOOT_IMAGE=/vmlinuz earlyfw=off quiet", "ok")
    assert status == linux.LOADED
    assert calls == []  # nothing loaded, nothing probed
    assert "earlyfw=off is on the kernel command line: the boot block is SKIPPED" in stderr
    assert kmsg.startswith("<2>earlyfw: WARNING: earlyfw=off")


@pytest.mark.parametrize("cmdline", ["earlyfw=offx", "xearlyfw=off", "rd.earlyfw=off", "earlyfw=on"])
def test_loader_break_glass_is_exact(root: Root, tmp_path: Path, cmdline: str) -> None:
    status, _, calls, _ = run_loader(tmp_path, root / LOADERS[0], f"ro {cmdline} quiet", "ok")
    assert status == linux.LOADED and calls[-1] == "nft -f /etc/earlyfw/initramfs.nft"


@pytest.mark.parametrize("loader", LOADERS)
def test_loader_fails_loudly_and_closed_on_a_broken_ruleset(root: Root, tmp_path: Path, loader: str) -> None:
    status, stderr, calls, kmsg = run_loader(tmp_path, root / loader, "ro quiet", "broken")
    assert status == linux.FALLBACK
    assert calls[-2:] == ["nft -f /etc/earlyfw/initramfs.nft", "nft -f -"]
    assert (tmp_path / "calls.fallback").read_text() == templates.read("hooks", "fallback.nft")
    assert "Error: stub nft refuses /etc/earlyfw/initramfs.nft" in stderr  # nft's own error reaches the console
    assert "earlyfw: FAILED to load /etc/earlyfw/initramfs.nft" in stderr
    assert "NO network until this is fixed" in stderr and "earlyfw=off" in stderr
    assert "<2>earlyfw: FAILED" in kmsg


def test_loader_says_so_when_nothing_can_be_loaded(root: Root, tmp_path: Path) -> None:
    status, stderr, calls, kmsg = run_loader(tmp_path, root / LOADERS[0], "ro quiet", "none")
    assert status == linux.UNPROTECTED
    assert calls[-2:] == ["nft -f /etc/earlyfw/initramfs.nft", "nft -f -"]
    assert "could not load ANY ruleset" in stderr and "NOT protected" in stderr
    assert "<2>earlyfw: could not load ANY ruleset" in kmsg


def test_initramfs_tools_script_panics_when_nothing_can_be_loaded(root: Root) -> None:
    script = (root / initramfs_tools.SCRIPT).read_text()
    tail = script[script.index("could not load ANY ruleset") :]
    assert ". /scripts/functions\npanic " in tail and tail.rstrip().endswith("exit 2")


@pytest.mark.netns
def test_loader_with_real_nft_falls_back_to_drop_everything(root: Root, tmp_path: Path) -> None:
    """The real nft, a really broken ruleset, a real packet: the fallback is
    loaded and blocks; the control send before it gets out."""
    need("unshare", "nft", "ip")
    etc = tmp_path / "etc"
    (etc / "earlyfw").mkdir(parents=True)
    shutil.copy("/etc/ld.so.cache", etc / "ld.so.cache")
    (etc / "earlyfw/initramfs.nft").write_text("table inet earlyfw {\n\tchain output { this is not nft }\n}\n")
    (tmp_path / "cmdline").write_text("ro quiet\n")
    (tmp_path / "kmsg").write_text("")
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "try:\n    s.sendto(b'x', ('192.0.2.2', 9))\nexcept OSError as e:\n    sys.exit(e.errno)\n"
    )
    script = textwrap.dedent("""\
        set -u
        ip link set lo up && ip link add v0 type veth peer name v1
        ip addr add 192.0.2.1/24 dev v0 && ip link set v1 up && ip link set v0 up
        "$PYTHON" -c "$PROBE"; echo "before=$?"
        mount --bind "$ETC" /etc && mount --bind "$CMDLINE" /proc/cmdline && mount --bind "$KMSG" /dev/kmsg
        sh "$LOADER"; echo "loader=$?"
        nft list table inet earlyfw | grep -c 'state=fallback' | sed 's/^/fallback=/'
        "$PYTHON" -c "$PROBE"; echo "after=$?"
        """)
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--net", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "PYTHON": sys.executable,
            "PROBE": probe,
            "ETC": str(etc),
            "CMDLINE": str(tmp_path / "cmdline"),
            "KMSG": str(tmp_path / "kmsg"),
            "LOADER": str(root / LOADERS[0]),
        },
        check=False,
    )
    lines = result.stdout.split()
    assert "before=0" in lines, result.stdout + result.stderr  # control: without earlyfw it gets out
    assert f"loader={linux.FALLBACK}" in lines, result.stdout + result.stderr
    assert "fallback=1" in lines
    assert "after=1" in lines  # EPERM: the output chain dropped it
    assert "syntax error" in result.stderr  # nft's own complaint is on the console


# -- the generator wrappers' own logic ---------------------------------------


def stub_loader(tmp_path: Path, status: int) -> Path:
    loader = tmp_path / f"loader-{status}"
    loader.write_text(f"#!/bin/sh\nexit {status}\n")
    loader.chmod(0o755)
    return loader


@pytest.mark.parametrize(("status", "dies"), [(0, False), (1, False), (2, True)])
def test_dracut_pre_udev_hook_dies_only_when_unprotected(tmp_path: Path, status: int, dies: bool) -> None:
    hook = tmp_path / "hook.sh"
    hook.write_bytes(linux.render("hooks/dracut/earlyfw-pre-udev.sh.j2", loader=stub_loader(tmp_path, status)))
    # dracut's init sources hooks; die() comes from dracut-lib.sh.
    script = 'die() { echo "die: $*"; }\n. "$1"\necho "sourced, status var: ${earlyfw_status-unset}"\n'
    result = subprocess.run(["sh", "-c", script, "sh", hook], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert ("die: earlyfw: no firewall could be loaded; boot with earlyfw=off" in result.stdout) is dies
    assert "status var: unset" in result.stdout  # leaves dracut's namespace clean


@pytest.mark.parametrize(("status", "shell"), [(0, False), (1, False), (2, True)])
def test_mkinitcpio_runtime_hook_drops_to_a_shell_only_when_unprotected(
    tmp_path: Path, status: int, shell: bool
) -> None:
    hook = tmp_path / "hook"
    hook.write_bytes(linux.render("hooks/mkinitcpio/hook.j2", loader=stub_loader(tmp_path, status)))
    script = (
        'err() { echo "err: $*"; }\nlaunch_interactive_shell() { echo "shell"; }\n'
        '. "$1"\nrun_earlyhook\necho "returned $?"\n'
    )
    result = subprocess.run(["sh", "-c", script, "sh", hook], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert ("shell" in result.stdout.split("\n")) is shell
    assert ("err: earlyfw: no firewall could be loaded" in result.stdout) is shell
    assert "returned 0" in result.stdout


# -- mkinitcpio: sourced by bash against stub functions -----------------------

MKINITCPIO_STUBS = """\
record() { printf '%s\\n' "$*" >>"$CALLS"; }
add_binary() { record add_binary "$@"; }
add_module() { record add_module "$@"; }
add_file() { record add_file "$@"; }
add_runscript() { record add_runscript "$@"; }
add_symlink() { record add_symlink "$@"; }
add_dir() { record add_dir "$@"; }
msg() { record msg "$@"; }
warning() { record warning "$@"; }
error() { record error "$@"; }
"""


def test_mkinitcpio_build_hook_adds_nft_modules_ruleset_loader_and_unit(root: Root, tmp_path: Path) -> None:
    need("bash")
    calls = tmp_path / "calls"
    script = MKINITCPIO_STUBS + '. "$1"\nbuild\nhelp >"$CALLS.help"\n'
    result = subprocess.run(
        ["bash", "-euc", script, "bash", root / mkinitcpio.INSTALL],
        capture_output=True,
        text=True,
        env={**os.environ, "CALLS": str(calls)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == [
        "add_binary nft",
        "add_binary modprobe",
        *(f"add_module {m}" for m in linux.REQUIRED_MODULES),
        *(f"add_module {m}?" for m in linux.OPTIONAL_MODULES),
        "add_file /etc/earlyfw/initramfs.nft",
        "add_file /usr/lib/earlyfw/initcpio/earlyfw-load /usr/bin/earlyfw-load 755",
        "add_runscript",
        "add_file /usr/lib/earlyfw/initcpio/earlyfw-initrd.service /usr/lib/systemd/system/earlyfw-initrd.service 644",
        "add_symlink /usr/lib/systemd/system/sysinit.target.wants/earlyfw-initrd.service ../earlyfw-initrd.service",
    ]
    assert "earlyfw=off" in (tmp_path / "calls.help").read_text()
    # The unit the build hook ships runs the loader the build hook ships.
    unit = (root / mkinitcpio.UNIT_SOURCE).read_text()
    assert f"ExecStart={mkinitcpio.LOADER}\n" in unit


@pytest.mark.parametrize(
    ("hooks", "expected"),
    [
        ("HOOKS=(base udev autodetect modconf block filesystems fsck)", "base earlyfw udev autodetect modconf"),
        ("HOOKS=(base systemd autodetect modconf sd-vconsole block)", "base earlyfw systemd autodetect"),
        ('HOOKS="base udev autodetect block filesystems"', "base earlyfw udev autodetect"),
        ("HOOKS=(base udev earlyfw autodetect)", "base earlyfw udev autodetect"),
        ("HOOKS=(base autodetect block filesystems)", "base earlyfw autodetect block"),
        ("HOOKS=(autodetect block)", "earlyfw autodetect block"),
    ],
)
def test_mkinitcpio_drop_in_puts_earlyfw_before_udev_or_systemd(
    root: Root, tmp_path: Path, hooks: str, expected: str
) -> None:
    need("bash")
    conf = tmp_path / "mkinitcpio.conf"
    conf.write_text(hooks + "\n")
    drop_in = root / mkinitcpio.CONF
    # mkinitcpio sources its config, then each drop-in; twice must change nothing more.
    script = '. "$1"; . "$2"; once="${HOOKS[*]}"; . "$2"; echo "$once"; echo "${HOOKS[*]}"; set | grep -c ^_earlyfw'
    result = subprocess.run(["bash", "-c", script, "bash", conf, drop_in], capture_output=True, text=True, check=False)
    once, twice, leftovers = result.stdout.splitlines()
    assert once.startswith(expected) and once.split().count("earlyfw") == 1, once
    assert twice == once
    assert leftovers == "0"


def test_mkinitcpio_refuses_a_version_without_drop_ins(tmp_path: Path, config: configuration.Config) -> None:
    image = Root(tmp_path)
    binary = image / "/usr/bin/mkinitcpio"
    binary.parent.mkdir(parents=True)
    binary.write_text('#!/bin/bash\n_f_config=mkinitcpio.conf\n. "$_f_config"\n')
    with pytest.raises(EarlyfwError, match="older than mkinitcpio 36"):
        install.install(config, image, RecordingRunner(), ("mkinitcpio",))
    assert not (image / mkinitcpio.CONF).exists()  # nothing half-written
    binary.write_text('#!/bin/bash\n_d_config=/etc/mkinitcpio.conf.d\nfor f in "$_d_config"/*.conf; do :; done\n')
    install.install(config, image, RecordingRunner(), ("mkinitcpio",))
    assert (image / mkinitcpio.CONF).exists()


def test_mkinitcpio_warns_about_a_preset_that_disables_drop_ins(
    tmp_path: Path, config: configuration.Config, capsys: pytest.CaptureFixture[str]
) -> None:
    image = Root(tmp_path)
    (image / "/etc/mkinitcpio.d").mkdir(parents=True)
    (image / "/etc/mkinitcpio.d/linux.preset").write_text(
        '#ALL_config="/etc/mkinitcpio.conf"\nALL_kver="/boot/vmlinuz-linux"\ndefault_config="/etc/mkinitcpio.conf"\n'
    )
    install.install(config, image, RecordingRunner(), ("mkinitcpio",))
    err = capsys.readouterr().err
    assert 'sets default_config="/etc/mkinitcpio.conf"' in err
    assert "ALL_config" not in err  # commented out: fine


# -- detection ---------------------------------------------------------------


def fake_root(tmp_path: Path, *paths: str, os_id: str = "debian") -> Root:
    image = Root(tmp_path / "fake")
    for path in paths:
        (image / path).parent.mkdir(parents=True, exist_ok=True)
        (image / path).write_text("")
    (image / "/etc").mkdir(parents=True, exist_ok=True)
    (image / "/etc/os-release").write_text(f"ID={os_id}\n")
    return image


@pytest.mark.parametrize(
    ("paths", "os_id", "expected"),
    [
        (("/usr/sbin/update-initramfs",), "debian", "initramfs-tools"),
        (("/usr/bin/dracut",), "fedora", "dracut"),
        (("/usr/bin/mkinitcpio",), "arch", "mkinitcpio"),
        # Debian with dracut-core beside initramfs-tools: the kernel hook decides.
        (("/usr/bin/dracut", "/usr/sbin/update-initramfs", "/etc/kernel/postinst.d/initramfs-tools"), "debian",
         "initramfs-tools"),
        (("/usr/bin/dracut", "/usr/sbin/update-initramfs", "/etc/kernel/postinst.d/dracut"), "debian", "dracut"),
        # No hook either way: the distribution's own generator.
        (("/usr/bin/dracut", "/usr/sbin/update-initramfs"), "ubuntu", "initramfs-tools"),
        (("/usr/bin/dracut", "/usr/bin/mkinitcpio"), "arch", "mkinitcpio"),
        ((), "debian", None),
    ],
)  # fmt: skip
def test_detects_the_one_generator_in_use(
    tmp_path: Path, paths: tuple[str, ...], os_id: str, expected: str | None
) -> None:
    image = fake_root(tmp_path, *paths, os_id=os_id)
    found = linux.active_generator(image)
    assert (found.name if found else None) == expected
    detected = {cls.name for cls in install.select(image)}
    for name in ("dracut", "initramfs-tools", "mkinitcpio"):
        assert (name in detected) is (name == expected)


def test_systemd_target_is_detected_by_systemd_itself(tmp_path: Path) -> None:
    assert "systemd" not in {cls.name for cls in install.select(fake_root(tmp_path))}
    with_systemd = fake_root(tmp_path, "/usr/lib/systemd/systemd")
    assert "systemd" in {cls.name for cls in install.select(with_systemd)}


# -- rebuilding: on the host, and inside an image -----------------------------


@pytest.mark.parametrize(
    ("cls", "command"),
    [
        (dracut.Dracut, ("dracut", "--force", "--regenerate-all")),
        (initramfs_tools.InitramfsTools, ("update-initramfs", "-u", "-k", "all")),
        (mkinitcpio.Mkinitcpio, ("mkinitcpio", "-P")),
    ],
)
def test_host_install_and_uninstall_rebuild_with_visible_progress(
    cls: type[linux.InitramfsTarget],
    command: tuple[str, ...],
    config: configuration.Config,
    capsys: pytest.CaptureFixture[str],
) -> None:
    runner = RecordingRunner()
    target = cls(Root(), runner)
    target.after_install(config)
    target.after_uninstall()
    assert runner.argvs() == [command, command]
    assert capsys.readouterr().err.count("earlyfw: rebuilding the initramfs") == 2


def test_image_install_prints_the_command_and_rebuild_runs_it_in_the_root(
    tmp_path: Path, config: configuration.Config
) -> None:
    image = Root(tmp_path / "image")
    image.path.mkdir()
    runner = RecordingRunner()
    report = install.install(config, image, runner, ("initramfs-tools", "systemd"))
    assert report.image_notes == [f"chroot {image.path} update-initramfs -u -k all"]
    assert runner.argvs() == []  # --root never runs anything by itself
    report = install.install(config, image, runner, ("initramfs-tools", "systemd"), rebuild_initramfs=True)
    assert runner.argvs() == [("chroot", str(image.path), "update-initramfs", "-u", "-k", "all")]
    assert report.image_notes == []
    report = install.uninstall(image, runner)
    assert report.image_notes == [f"chroot {image.path} update-initramfs -u -k all"]


def test_cli_rebuild_initramfs_goes_with_root_only(tmp_path: Path) -> None:
    conf = tmp_path / "earlyfw.toml"
    conf.write_text(CONFIG_TEXT)
    result = subprocess.run(
        [sys.executable, "-m", "earlyfw", "--config", conf, "install", "--rebuild-initramfs"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "--rebuild-initramfs goes with --root" in result.stderr
    image = tmp_path / "image"
    image.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "earlyfw", "-q", "--config", conf, "install", "--root", image, "--target", "dracut"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"next: chroot {image} dracut --force --regenerate-all" in result.stdout.splitlines()


def test_systemd_target_reloads_systemd_only_where_it_runs(tmp_path: Path, config: configuration.Config) -> None:
    runner = RecordingRunner()
    systemd.Systemd(Root(tmp_path), runner).after_install(config)
    assert runner.argvs() == []
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    systemd.Systemd(Root(tmp_path), runner).after_install(config)
    assert runner.argvs() == [("systemctl", "daemon-reload")]


def test_plans_are_pure(tmp_path: Path, config: configuration.Config) -> None:
    """plan() writes nothing and runs nothing."""
    runner = RecordingRunner()
    for name in BOOT_TARGETS:
        plan = load_all()[name](Root(tmp_path), runner).plan(config)
        assert plan.artifacts and all(isinstance(a, File | Symlink) for a in plan.artifacts)
    assert runner.argvs() == [] and list(tmp_path.iterdir()) == []


# -- earlyfw status: other firewalls ------------------------------------------


def test_status_warns_about_nftables_service_without_the_drop_in(tmp_path: Path) -> None:
    image = Root(tmp_path)
    (image / "/etc/systemd/system/sysinit.target.wants").mkdir(parents=True)
    (image / "/etc/nftables.conf").write_text("#!/usr/sbin/nft -f\n\nflush ruleset\n\ntable inet filter {\n}\n")
    assert firewalls.warnings([], image) == []  # installed but not enabled: fine
    (image / "/etc/systemd/system/sysinit.target.wants/nftables.service").symlink_to(
        "/lib/systemd/system/nftables.service"
    )
    (warning,) = firewalls.warnings([], image)
    assert "nftables.service is enabled and /etc/nftables.conf runs `flush ruleset`" in warning
    (image / firewalls.NFTABLES_DROP_IN).parent.mkdir(parents=True)
    (image / firewalls.NFTABLES_DROP_IN).write_text("[Service]\n")
    assert firewalls.warnings([], image) == []


def test_status_warns_about_firewalld_and_iptables_nft(tmp_path: Path) -> None:
    found = firewalls.warnings(["inet firewalld", "ip filter", "ip6 nat", "inet mine"], Root(tmp_path))
    assert len(found) == 2
    assert found[0].startswith("firewalld is active")
    assert "(ip filter, ip6 nat)" in found[1]


def test_nftables_conf_follows_the_distribution(tmp_path: Path) -> None:
    fedora = fake_root(tmp_path, "/etc/sysconfig/nftables.conf", os_id="fedora")
    assert firewalls.nftables_conf(fedora) == "/etc/sysconfig/nftables.conf"
    plan = systemd.Systemd(fedora, RecordingRunner()).plan(configuration.parse(CONFIG_TEXT))
    start = next(a for a in plan.artifacts if a.path == systemd.nftables_wrapper("start"))
    assert isinstance(start, File) and b'include "/etc/sysconfig/nftables.conf"' in start.content


def test_status_reports_other_firewalls(config: configuration.Config) -> None:
    """`earlyfw status` carries these warnings (the table lookups scripted:
    the live ones run in test_cli_netns.py)."""

    def respond(argv: Sequence[str], _input: str | None) -> Result:
        if list(argv) == ["nft", "-s", "list", "ruleset"]:
            return Result(0, "table inet firewalld {\n}\ntable ip filter {\n}\n", "")
        if list(argv) == ["nft", "-j", "list", "counters"]:
            return Result(0, json.dumps({"nftables": []}), "")
        return Result(1, "", "Error: No such file or directory")

    result = nft.status(RecordingRunner(respond=respond), config)
    assert not result.present
    assert result.warnings[0] == "table inet earlyfw is not loaded: nothing is blocked"
    assert any(w.startswith("firewalld is active") for w in result.warnings)
    assert any(w.startswith("iptables-nft tables are loaded (ip filter)") for w in result.warnings)
