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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from earlyfw import config as configuration
from earlyfw import install, templates
from earlyfw.errors import EarlyfwError
from earlyfw.linux import boot, dracut, firewalls, initramfs_tools, mkinitcpio, nft, systemd
from earlyfw.root import MANIFEST, Root
from earlyfw.run import Result
from earlyfw.targets import File, Symlink, load_all
from tests.configs import CONFIG_TEXT
from tests.recording_runner import RecordingRunner

BOOT_TARGETS = ("systemd", "dracut", "initramfs-tools", "mkinitcpio")

# Every file the boot targets write, with its mode (None: a symlink).
EXPECTED = {
    "/etc/systemd/system/earlyfw-block.service": 0o644,
    "/etc/systemd/system/earlyfw-block-failed.service": 0o644,
    "/etc/systemd/system/earlyfw-off.service": 0o644,
    "/etc/systemd/system/sysinit.target.wants/earlyfw-block.service": None,
    "/etc/systemd/system/sysinit.target.wants/earlyfw-off.service": None,
    "/etc/earlyfw/fallback.nft": 0o644,
    "/usr/lib/earlyfw/earlyfw-switch": 0o755,
    "/usr/lib/earlyfw/earlyfw-egress": 0o755,
    "/etc/udev/rules.d/60-earlyfw-egress.rules": 0o644,
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
    ("/usr/lib/earlyfw/earlyfw-switch", "sh"),
    ("/usr/lib/earlyfw/earlyfw-egress", "sh"),
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
    loader.write_bytes(boot.loader().replace(b'[ "$1" = off ]', b"[ $1 = off ]"))
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
    assert status == boot.LOADED, stderr
    assert calls[-1] == "nft -f /etc/earlyfw/initramfs.nft"
    assert [c for c in calls if c.startswith("modprobe")] == [
        "modprobe -q -a " + " ".join(boot.REQUIRED_MODULES + boot.OPTIONAL_MODULES)
    ]
    assert "<5>earlyfw: blocked: /etc/earlyfw/initramfs.nft loaded" in kmsg
    assert stderr == ""  # quiet on the console when all is well


@pytest.mark.parametrize("loader", LOADERS)
def test_loader_honours_break_glass(root: Root, tmp_path: Path, loader: str) -> None:
    status, stderr, calls, kmsg = run_loader(tmp_path, root / loader, "BOOT_IMAGE=/vmlinuz earlyfw=off quiet", "ok")
    assert status == boot.LOADED
    assert calls == []  # nothing loaded, nothing probed
    assert "earlyfw=off is on the kernel command line: the boot block is SKIPPED" in stderr
    assert kmsg.startswith("<2>earlyfw: WARNING: earlyfw=off")


@pytest.mark.parametrize("cmdline", ["earlyfw=offx", "xearlyfw=off", "rd.earlyfw=off", "earlyfw=on"])
def test_loader_break_glass_is_exact(root: Root, tmp_path: Path, cmdline: str) -> None:
    status, _, calls, _ = run_loader(tmp_path, root / LOADERS[0], f"ro {cmdline} quiet", "ok")
    assert status == boot.LOADED and calls[-1] == "nft -f /etc/earlyfw/initramfs.nft"


# The command lines the issue names, and what the switch is on each.
SWITCH_CASES = [
    ("ro quiet", False),
    ("BOOT_IMAGE=/vmlinuz earlyfw=off quiet", True),
    ('foo="a earlyfw=off b"', False),  # inside another parameter's quoted value
    ("earlyfw=off earlyfw=on", False),  # the last one wins
    ("earlyfw=on earlyfw=off", True),
    ("earlyfw=off earlyfw", False),
    ("ro -- earlyfw=off", False),  # after "--": arguments for init, not parameters
    ('ro "--" earlyfw=off', False),
    ("ro --x earlyfw=off", True),
    ('earlyfw="off"', True),
    ('"earlyfw=off"', True),
    ("ro\tearlyfw=off\n", True),
    ("earlyfw=offx", False),
    ("xearlyfw=off", False),
    ("rd.earlyfw=off", False),
    ("earlyfw=OFF", False),
]


def kernel_parameters(cmdline: bytes) -> list[tuple[bytes, bytes | None]]:
    """The reference: the kernel's own parsing of its command line, transcribed
    from lib/cmdline.c next_arg() and kernel/params.c parse_args(), NUL writes
    included: (name, value or None) up to a bare "--"."""
    spaces = set(b" \t\n\v\f\r\xa0")  # the kernel's isspace(), Latin-1 0xa0 included

    def cstr(buf: bytearray, start: int) -> bytes:
        end = buf.find(0, start)
        return bytes(buf[start : end if end >= 0 else len(buf)])

    params: list[tuple[bytes, bytes | None]] = []
    args = cmdline.lstrip(bytes(spaces))
    while args:
        in_quote = quoted = False
        if args[0] == ord('"'):
            args, in_quote, quoted = args[1:], True, True
        i = equals = 0
        while i < len(args):
            if args[i] in spaces and not in_quote:
                break
            if equals == 0 and args[i] == ord("="):
                equals = i
            if args[i] == ord('"'):
                in_quote = not in_quote
            i += 1
        word = bytearray(args[:i])
        value_at: int | None = None
        if equals:
            word[equals] = 0
            value_at = equals + 1
            if value_at < i and word[value_at] == ord('"'):
                value_at += 1
                if word[i - 1] == ord('"'):
                    word[i - 1] = 0
        if quoted and i > 0 and word[i - 1] == ord('"'):
            word[i - 1] = 0
        name, value = cstr(word, 0), None if value_at is None else cstr(word, value_at)
        args = args[i + 1 :].lstrip(bytes(spaces))
        if value is None and name == b"--":
            break
        params.append((name, value))
    return params


def reference_off(cmdline: bytes) -> bool:
    values = [value for name, value in kernel_parameters(cmdline) if name == b"earlyfw"]
    return bool(values) and values[-1] == b"off"


SWITCH_SNIPPET = 'LC_ALL=C; . "$0"; earlyfw_off "$1"'
SHELLS = (("dash",), ("busybox", "ash"), ("bash", "--posix"))


def shell_off(shell: Sequence[str], cmdline: bytes) -> bool:
    snippet = templates.resource("hooks", "earlyfw-switch.sh")
    result = subprocess.run([*shell, "-c", SWITCH_SNIPPET, str(snippet), cmdline], capture_output=True, check=False)
    assert result.returncode in (0, 1) and not result.stderr, result.stderr
    return result.returncode == 0


@pytest.mark.parametrize(("cmdline", "off"), SWITCH_CASES)
def test_reference_parser_reads_the_issues_examples(cmdline: str, off: bool) -> None:
    assert reference_off(cmdline.encode()) is off


# Tokens that exercise every rule: quotes anywhere, "=", "--", every kernel
# white-space byte, and the switch's own words.
TOKENS = st.sampled_from(
    [b"earlyfw", b"=", b"off", b"on", b'"', b"--", b"-", b" ", b"  ", b"\t", b"\n", b"\r", b"\v", b"\f", b"\xa0",
     b"a", b"x=", b"ro", b"earlyfw=off", b"earlyfw=on", b'"earlyfw=off"', b'="', b"'", b"\\", b"$", b"*", b"[", b"]"]
)  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TOKENS, max_size=14).map(b"".join))
def test_switch_reads_the_command_line_as_the_kernel_does(cmdline: bytes) -> None:
    """The one shell function every loader uses agrees with the kernel's own
    parsing on generated command lines, in every shell it runs under."""
    need("busybox", "dash", "bash")
    expected = reference_off(cmdline)
    for shell in SHELLS:
        assert shell_off(shell, cmdline) is expected, (shell, cmdline)


def test_switch_reads_a_long_command_line_fast_enough(tmp_path: Path) -> None:
    """The kernel allows 2048 bytes and more: the function copes, and ends."""
    need("dash")
    cmdline = b" ".join([b'foo="a b c earlyfw=on"'] * 150 + [b"earlyfw=off"])
    assert reference_off(cmdline) and shell_off(("dash",), cmdline)


@pytest.mark.parametrize(("cmdline", "off"), SWITCH_CASES)
@pytest.mark.parametrize("loader", LOADERS)
def test_loader_reads_the_switch_as_the_kernel_does(
    root: Root, tmp_path: Path, loader: str, cmdline: str, off: bool
) -> None:
    status, stderr, calls, _ = run_loader(tmp_path, root / loader, cmdline.replace("\n", " "), "ok")
    assert status == boot.LOADED, stderr
    assert (calls == []) is off, calls
    assert ("the boot block is SKIPPED" in stderr) is off


def run_switch(root: Root, tmp_path: Path, cmdline: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run the installed earlyfw-switch with `cmdline` as /proc/cmdline."""
    need("unshare")
    fake = tmp_path / "switch-cmdline"
    fake.write_text(cmdline + "\n")
    script = 'mount --bind "$0" /proc/cmdline && exec "$@"'
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, fake, root / boot.SWITCH, *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(("cmdline", "off"), SWITCH_CASES)
def test_switch_script_answers_and_runs_only_in_its_position(
    root: Root, tmp_path: Path, cmdline: str, off: bool
) -> None:
    on_status = run_switch(root, tmp_path, cmdline, "on").returncode
    off_status = run_switch(root, tmp_path, cmdline, "off").returncode
    assert (on_status, off_status) == ((1, 0) if off else (0, 1))
    ran = run_switch(root, tmp_path, cmdline, "on", "echo", "loaded")
    assert ran.returncode == 0 and (ran.stdout == "loaded\n") is not off
    ran = run_switch(root, tmp_path, cmdline, "off", "sh", "-c", "echo admin; exit 3")
    assert (ran.returncode, ran.stdout) == ((3, "admin\n") if off else (0, ""))


def test_switch_script_refuses_a_bad_position(root: Root, tmp_path: Path) -> None:
    result = run_switch(root, tmp_path, "ro", "maybe")
    assert result.returncode == 255 and "usage:" in result.stderr


@pytest.mark.parametrize("loader", LOADERS)
def test_loader_fails_loudly_and_closed_on_a_broken_ruleset(root: Root, tmp_path: Path, loader: str) -> None:
    status, stderr, calls, kmsg = run_loader(tmp_path, root / loader, "ro quiet", "broken")
    assert status == boot.FALLBACK
    assert calls[-2:] == ["nft -f /etc/earlyfw/initramfs.nft", "nft -f -"]
    assert (tmp_path / "calls.fallback").read_text() == boot.fallback()
    assert "Error: stub nft refuses /etc/earlyfw/initramfs.nft" in stderr  # nft's own error reaches the console
    assert "earlyfw: FAILED to load /etc/earlyfw/initramfs.nft" in stderr
    assert "NO network until this is fixed" in stderr and "earlyfw=off" in stderr
    assert "<2>earlyfw: FAILED" in kmsg


def test_loader_says_so_when_nothing_can_be_loaded(root: Root, tmp_path: Path) -> None:
    status, stderr, calls, kmsg = run_loader(tmp_path, root / LOADERS[0], "ro quiet", "none")
    assert status == boot.UNPROTECTED
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
    assert f"loader={boot.FALLBACK}" in lines, result.stdout + result.stderr
    assert "fallback=1" in lines
    assert "after=1" in lines  # EPERM: the output chain dropped it
    assert "syntax error" in result.stderr  # nft's own complaint is on the console


# -- the generator wrappers' own logic ---------------------------------------


# How each generator sources its hook, with its own die()/err() stubbed: the
# shell it runs under (busybox ash for mkinitcpio), and what to call.
WRAPPERS = {
    "dracut": (
        "hooks/dracut/earlyfw-pre-udev.sh.j2",
        ("sh",),
        'die() { echo "STOP: $*"; }\nwarn() { echo "warn: $*"; }\n',
        "",
    ),
    "mkinitcpio": (
        "hooks/mkinitcpio/hook.j2",
        ("busybox", "ash"),
        'err() { echo "err: $*"; }\nlaunch_interactive_shell() { echo "STOP: shell"; }\n',
        "run_earlyhook\n",
    ),
}
# Every way a loader can end: each exit status, killed by a signal, missing
# (127), not executable (126).
OUTCOMES = (*(f"exit {n}" for n in range(256)), "kill -KILL $$", "kill -TERM $$", "kill -SEGV $$", "missing", "noexec")


def run_wrapper(tmp_path: Path, generator: str, cmdline: str) -> dict[str, str]:
    """Source the generator's hook against a stub loader ending each way in
    OUTCOMES, with `cmdline` as /proc/cmdline: outcome -> "stop" or "go" (and
    the hook's own words)."""
    need("unshare", "busybox")
    template, shell, stubs, call = WRAPPERS[generator]
    loader = tmp_path / "loader"
    hook = tmp_path / "hook"
    hook.write_bytes(boot.render(template, loader=loader))
    fake_cmdline = tmp_path / "cmdline"
    fake_cmdline.write_text(cmdline + "\n")
    cases = tmp_path / "cases"
    cases.write_text("\n".join(OUTCOMES) + "\n")
    run_one = stubs + '. "$HOOK"\n' + call + 'echo "GO status=${earlyfw_status-unset}"\n'
    driver = textwrap.dedent("""\
        mount --bind "$CMDLINE" /proc/cmdline || exit 99
        while IFS= read -r outcome; do
            rm -f "$LOADER"
            case $outcome in
            missing) ;;
            noexec) printf '#!/bin/sh\nexit 0\n' >"$LOADER" ;;
            *) printf '#!/bin/sh\n%s\n' "$outcome" >"$LOADER"; chmod +x "$LOADER" ;;
            esac
            echo "@@ $outcome"
            "$@" -c "$RUN_ONE" 2>&1
        done <"$CASES"
        """)
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", driver, "sh", *shell],
        capture_output=True,
        text=True,
        env={**os.environ, "CMDLINE": str(fake_cmdline), "LOADER": str(loader), "HOOK": str(hook),
             "CASES": str(cases), "RUN_ONE": run_one},
        timeout=300,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = {}
    for block in result.stdout.split("@@ ")[1:]:
        outcome, _, said = block.partition("\n")
        found[outcome] = said
    assert list(found) == list(OUTCOMES), result.stdout[-2000:]
    return found


@pytest.mark.parametrize("generator", WRAPPERS)
def test_initramfs_hook_goes_on_only_when_a_table_is_in_place(tmp_path: Path, generator: str) -> None:
    """The dracut pre-udev hook and the mkinitcpio hook let the boot go on only
    when the loader says a table is loaded (0) or the fallback is (1); every
    other way it can end, a missing or unrunnable loader included, stops it."""
    found = run_wrapper(tmp_path, generator, "BOOT_IMAGE=/vmlinuz ro quiet")
    for outcome, said in found.items():
        table_loaded = outcome in ("exit 0", "exit 1")
        assert ("STOP" in said) is not table_loaded, (outcome, said)
        if not table_loaded:
            assert "no firewall could be loaded; boot with earlyfw=off" in said, (outcome, said)
    assert "status 127" in found["missing"] and "status 126" in found["noexec"]
    assert "status 137" in found["kill -KILL $$"]
    # dracut sources its hooks into init's own shell: leave nothing behind.
    if generator == "dracut":
        assert all("status=unset" in said for outcome, said in found.items() if "STOP" not in said)


@pytest.mark.parametrize("generator", WRAPPERS)
def test_initramfs_hook_never_locks_out_with_earlyfw_off(tmp_path: Path, generator: str) -> None:
    """A broken or missing loader must not stop a boot the user turned earlyfw
    off for: the break glass always gets the machine up."""
    found = run_wrapper(tmp_path, generator, "ro earlyfw=on quiet earlyfw=off")
    for outcome, said in found.items():
        assert "STOP" not in said and "GO" in said, (outcome, said)
        if outcome not in ("exit 0", "exit 1"):
            assert "earlyfw=off: going on without earlyfw" in said, (outcome, said)


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
        *(f"add_module {m}" for m in boot.REQUIRED_MODULES),
        *(f"add_module {m}?" for m in boot.OPTIONAL_MODULES),
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
    (image / "/etc/mkinitcpio.d/boot.preset").write_text(
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
    found = boot.active_generator(image)
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
    cls: type[boot.InitramfsTarget],
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


def test_systemd_target_uninstall_lets_systemd_forget_the_block_unit(tmp_path: Path) -> None:
    """The oneshot earlyfw-block.service stays `active (exited)` in systemd's
    memory once its file is gone (seen in the QEMU package guest after
    `apt-get remove`): uninstall stops it, which runs nothing, after the
    reload (before it, the network managers' Requires= drop-ins were still
    loaded and the stop took systemd-networkd down with it)."""
    runner = RecordingRunner()
    systemd.Systemd(Root(tmp_path), runner).after_uninstall()
    assert runner.argvs() == []
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    systemd.Systemd(Root(tmp_path), runner).after_uninstall()
    assert runner.argvs() == [("systemctl", "daemon-reload"), ("systemctl", "stop", "earlyfw-block.service")]


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


# -- raw-socket egress at boot: earlyfw-egress, with the real nft -------------

EGRESS_CONFIG = CONFIG_TEXT + '[egress]\ninterfaces = ["v0", "v2"]\n'
# Sends one hand-built frame out of argv[1] with an AF_PACKET socket (which no
# inet hook sees) and says whether it came out of the veth peer argv[2].
RAW_PROBE = """\
import socket, struct, sys
out, peer, kind = sys.argv[1:4]
rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
rx.bind((peer, 0))
rx.settimeout(0.5)
tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
tx.bind((out, 0))
dst, port = {"leak": ("192.0.2.99", 9999), "endpoint": ("198.51.100.7", 51820)}[kind]
marker = b"earlyfw raw probe " + kind.encode()
udp = struct.pack("!HHHH", 40000, port, 8 + len(marker), 0) + marker
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                 socket.inet_aton("192.0.2.1"), socket.inet_aton(dst))
try:
    # A frame the egress hook drops fails the send (ENOBUFS), or just vanishes.
    tx.send(b"\\xff" * 6 + b"\\x02\\x00\\x00\\x00\\x00\\x01" + b"\\x08\\x00" + ip + udp)
    while marker not in rx.recv(2048):
        pass
    print(f"{out}-{kind}=through")
except (TimeoutError, BlockingIOError, OSError):
    print(f"{out}-{kind}=blocked")
"""


@pytest.fixture
def egress_root(tmp_path: Path) -> Root:
    image = Root(tmp_path / "egress-image")
    image.path.mkdir()
    install.install(configuration.parse(EGRESS_CONFIG), image, RecordingRunner(), ("systemd",))
    return image


def run_egress(egress_root: Root, tmp_path: Path, script: str, cmdline: str = "ro quiet") -> dict[str, str]:
    """`script` in a private mount and network namespace whose /etc and
    /usr/lib/earlyfw are the image's, with its own /sys and `cmdline`; the
    shell function `probe OUT PEER KIND` sends a raw frame. Returns the
    key=value lines it printed."""
    need("unshare", "nft", "ip")
    etc = tmp_path / "etc"
    shutil.copytree(egress_root / "/etc", etc, symlinks=True)
    shutil.copy("/etc/ld.so.cache", etc / "ld.so.cache")
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    (tmp_path / "kmsg").write_text("")
    setup = textwrap.dedent("""\
        set -u
        mount --bind "$ETC" /etc && mount --bind "$CMDLINE" /proc/cmdline && mount --bind "$KMSG" /dev/kmsg
        mount -t overlay overlay -o lowerdir="$IMAGE/usr/lib:/usr/lib" /usr/lib
        mount -t sysfs sysfs /sys
        probe() { "$PYTHON" -c "$PROBE" "$@"; }
        veth() { ip link add "$1" type veth peer name "$2" && ip link set "$1" up && ip link set "$2" up; }
        egress() { /usr/lib/earlyfw/earlyfw-egress; echo "status=$?"; }
        """)
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--net", "sh", "-c", setup + script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ETC": str(etc), "CMDLINE": str(tmp_path / "cmdline"), "KMSG": str(tmp_path / "kmsg"),
             "IMAGE": str(egress_root.path), "PYTHON": sys.executable, "PROBE": RAW_PROBE},
        check=False,
    )  # fmt: skip
    found = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    found["stderr"] = result.stderr
    found["kmsg"] = (tmp_path / "kmsg").read_text()
    return found


@pytest.mark.netns
def test_egress_attach_filters_raw_sockets_on_each_interface_as_it_appears(egress_root: Root, tmp_path: Path) -> None:
    found = run_egress(
        egress_root,
        tmp_path,
        textwrap.dedent("""\
            veth v0 v1
            probe v0 v1 leak | sed s/^/before-/
            egress
            probe v0 v1 leak; probe v0 v1 endpoint
            veth v2 v3; veth v4 v5
            probe v2 v3 leak | sed s/^/before-/
            egress
            probe v2 v3 leak; probe v0 v1 leak | sed s/^/again-/; probe v2 v3 endpoint; probe v4 v5 leak
            echo "devices=$(nft list chain netdev earlyfw_egress egress | grep -o 'devices = {[^}]*}')"
            """),
    )
    # The control: before the attach, raw frames skip every inet hook.
    assert found["before-v0-leak"] == "through" and found["before-v2-leak"] == "through", found
    assert found["status"] == "0", found["stderr"]
    assert found["v0-leak"] == "blocked" and found["again-v0-leak"] == "blocked"
    assert found["v0-endpoint"] == "through" and found["v2-endpoint"] == "through"  # the policy, not a wall
    assert found["v2-leak"] == "blocked"
    assert found["v4-leak"] == "through"  # not listed in [egress]
    assert found["devices"] == "devices = { v0, v2 }"
    assert '<5>earlyfw: raw-socket egress filtered on "v0", "v2"' in found["kmsg"]


@pytest.mark.netns
def test_egress_attach_honours_the_switch_and_fails_closed(egress_root: Root, tmp_path: Path) -> None:
    off = run_egress(egress_root, tmp_path / "off", "veth v0 v1\negress\nprobe v0 v1 leak\n", "ro earlyfw=off")
    assert off["status"] == "0" and off["v0-leak"] == "through"
    (egress_root / boot.EGRESS_RULESET).write_text("table netdev earlyfw_egress { this is not nft }\n")
    broken = run_egress(egress_root, tmp_path / "broken", "veth v0 v1\negress\nprobe v0 v1 endpoint\n")
    assert broken["status"] == "1", broken["stderr"]
    assert broken["v0-endpoint"] == "blocked"  # nothing at all leaves
    assert "<2>earlyfw: FAILED to load /etc/earlyfw/egress.nft" in broken["kmsg"]


def test_egress_files_only_with_egress_configured(root: Root, egress_root: Root) -> None:
    assert not (root / boot.EGRESS_RULESET).exists() and not (root / boot.EGRESS_INTERFACES).exists()
    assert (egress_root / boot.EGRESS_INTERFACES).read_text() == "v0\nv2\n"
    rule = (egress_root / boot.EGRESS_RULE).read_text()
    assert 'ACTION=="add|move", SUBSYSTEM=="net", RUN+="/usr/lib/earlyfw/earlyfw-egress"' in rule
    block = (egress_root / "/etc/systemd/system/earlyfw-block.service").read_text()
    assert "ExecStart=/usr/lib/earlyfw/earlyfw-egress\n" in block
