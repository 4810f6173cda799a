"""The systemd units and drop-ins of the systemd target, read by systemd
itself: `systemd-analyze verify` for every unit, and systemd's own loader
(`systemd --test`, which builds the boot transaction without running it) for
the dependency graph: the block is wanted by sysinit.target and ordered before
network-pre.target, and every network manager requires it.

The nftables.service drop-in's rulesets are loaded with the real nft in a
private network namespace, to show its `include` trick is one transaction.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from earlyfw import config as configuration
from earlyfw import install
from earlyfw.linux import firewalls, systemd
from earlyfw.root import Root
from tests.configs import CONFIG_TEXT
from tests.recording_runner import RecordingRunner

UNIT_DIR = "/etc/systemd/system"
UNITS = (systemd.BLOCK_UNIT, systemd.FAILED_UNIT, systemd.OFF_UNIT)
# Managers this host has no unit for get a stub, so systemd has something to
# apply the drop-in to; ifup@ is a template, checked through an instance.
INSTANCES = {"ifup@.service": "ifup@eth0.service"}
SYSTEMD = next((p for p in ("/usr/lib/systemd/systemd", "/lib/systemd/systemd") if os.path.exists(p)), None)


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing or SYSTEMD is None:
        pytest.fail(f"missing {missing or ['systemd']}: apt-get install systemd nftables util-linux")
    if os.geteuid() != 0:
        pytest.fail("these tests need root")


@pytest.fixture(scope="module")
def image() -> Iterator[Path]:
    """An image with the core and systemd targets installed, readable by
    nobody (systemd's test mode runs unprivileged) and stub units for the
    network managers this host lacks."""
    base = Path(tempfile.mkdtemp(prefix="earlyfw-units-"))
    base.chmod(0o755)
    try:
        root = Root(base / "image")
        root.path.mkdir()
        install.install(configuration.parse(CONFIG_TEXT), root, RecordingRunner(), ("systemd",))
        stubs = base / "stubs"
        stubs.mkdir()
        for unit in systemd.NETWORK_MANAGERS:
            if not any(Path(d, unit).exists() for d in ("/lib/systemd/system", "/usr/lib/systemd/system")):
                (stubs / unit).write_text(f"[Unit]\nDescription=stub {unit}\n[Service]\nExecStart=/bin/true\n")
        manifest = root / "/var/lib/earlyfw"
        manifest.chmod(0o755)
        yield base
    finally:
        shutil.rmtree(base)


def unit_path(image: Path, *, with_earlyfw: bool = True) -> str:
    dirs = [str(image / "image" / UNIT_DIR.lstrip("/"))] if with_earlyfw else []
    return ":".join([*dirs, str(image / "stubs"), ""])  # the empty entry appends systemd's own paths


def instance(unit: str) -> str:
    return INSTANCES.get(unit, unit)


# -- systemd-analyze verify ---------------------------------------------------


# verify checks that every command exists on this host: the image's /usr/lib
# (earlyfw-switch) is laid over the host's, read-only, in a private mount namespace.
OVERLAY_USR_LIB = 'mount -t overlay overlay -o lowerdir="$0/usr/lib:/usr/lib" /usr/lib && exec "$@"'


def verify(image: Path, *units: str, **env: str) -> subprocess.CompletedProcess[str]:
    need("unshare")
    return subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private", "sh", "-c", OVERLAY_USR_LIB, str(image / "image")),
            *("systemd-analyze", "verify", "--man=no", *units),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_UNIT_PATH": unit_path(image), **env},
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies_clean(image: Path, unit: str) -> None:
    need("systemd-analyze")
    result = verify(image, str(image / "image" / UNIT_DIR.lstrip("/") / unit))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""  # not even a warning


@pytest.mark.parametrize("unit", [*systemd.NETWORK_MANAGERS, "nftables.service"])
def test_drop_in_verifies_clean(image: Path, unit: str) -> None:
    need("systemd-analyze")
    result = verify(image, instance(unit))
    assert result.returncode == 0, result.stderr
    assert "earlyfw" not in result.stderr, result.stderr


def test_verify_does_read_our_files(image: Path, tmp_path: Path) -> None:
    """Control for the two tests above: a bad key in a unit or a drop-in, or a
    missing binary, is reported from exactly those paths."""
    need("systemd-analyze")
    broken = tmp_path / "units"
    shutil.copytree(image / "image" / UNIT_DIR.lstrip("/"), broken, symlinks=True)
    block = broken / systemd.BLOCK_UNIT
    block.write_text(block.read_text().replace("ExecStart=/usr/lib/earlyfw/", "ExecStart=/usr/lib/earlyfw-missing/"))
    drop_in = broken / "systemd-networkd.service.d/earlyfw.conf"
    drop_in.write_text(drop_in.read_text() + "Requieres=typo.service\n")
    env = {"SYSTEMD_UNIT_PATH": f"{broken}:{image / 'stubs'}:"}
    result = verify(image, str(block), **env)
    assert result.returncode != 0 and "/usr/lib/earlyfw-missing/earlyfw-switch is not executable" in result.stderr
    result = verify(image, "systemd-networkd.service", **env)
    assert f"{drop_in}:" in result.stderr and "Unknown key 'Requieres'" in result.stderr


# -- systemd's own loader: the boot transaction --------------------------------


def boot_transaction(image: Path, *, with_earlyfw: bool = True) -> dict[str, list[str]]:
    """Every unit systemd would load to reach a target that wants sysinit.target,
    the network managers and nftables.service: unit name -> its dump lines."""
    stubs = image / "stubs"
    wanted = " ".join(instance(u) for u in (*systemd.NETWORK_MANAGERS, "nftables.service"))
    (stubs / "earlyfw-test.target").write_text(f"[Unit]\nWants=sysinit.target {wanted}\n")
    return systemd_transaction(unit_path(image, with_earlyfw=with_earlyfw), os.environ["PATH"])


def systemd_transaction(unit_path: str, path: str) -> dict[str, list[str]]:
    """systemd's own transaction (`systemd --test`, unprivileged) for
    earlyfw-test.target on `unit_path`: unit name -> its dump lines."""
    need("setpriv")
    assert SYSTEMD is not None
    result = subprocess.run(
        [
            *("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
            *(SYSTEMD, "--test", "--system", "--unit=earlyfw-test.target", "--no-pager"),
        ],
        capture_output=True,
        text=True,
        env={"PATH": path, "SYSTEMD_UNIT_PATH": unit_path},
        cwd="/",
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    units: dict[str, list[str]] = {}
    current: list[str] = []
    for line in result.stdout.splitlines():
        if line.startswith("\t-> Unit "):
            current = units.setdefault(line.removeprefix("\t-> Unit ").rstrip(":"), [])
        elif line.startswith("\t\t"):
            current.append(line.strip())
    return units


@pytest.fixture(scope="module")
def transaction(image: Path) -> dict[str, list[str]]:
    return boot_transaction(image)


def test_block_unit_starts_with_the_system_before_any_network(transaction: dict[str, list[str]], image: Path) -> None:
    block = transaction[systemd.BLOCK_UNIT]
    assert f"Fragment Path: {image}/image{UNIT_DIR}/{systemd.BLOCK_UNIT}" in block
    for line in (
        "WantedBy: sysinit.target (destination-file)",
        "Wants: network-pre.target (origin-file)",
        "Before: network-pre.target (origin-file)",
        "DefaultDependencies: no",
        "OnFailure: earlyfw-block-failed.service (origin-file)",
        "Type: oneshot",
        "RemainAfterExit: yes",
        # Through the switch, which earlyfw=off turns into a no-op that succeeds.
        "Command Line: /usr/lib/earlyfw/earlyfw-switch on /usr/sbin/nft -f /etc/earlyfw/blocked.nft",
    ):
        assert line in block, line
    # No Condition*: systemd's ConditionKernelCommandLine= does not let the last
    # earlyfw= win, and a skipped unit would let the network managers start.
    assert not any(line.startswith("Condition") for line in block)
    # Stopping it must never open the firewall.
    assert not any(line.startswith("ExecStop") for line in block)


def test_break_glass_warning_runs_only_with_earlyfw_off(transaction: dict[str, list[str]]) -> None:
    off = transaction[systemd.OFF_UNIT]
    assert "Command Line: /usr/lib/earlyfw/earlyfw-switch off" in off  # ExecCondition=
    assert not any(line.startswith("ConditionKernelCommandLine") for line in off)
    assert "WantedBy: sysinit.target (destination-file)" in off
    assert "Before: network-pre.target (origin-file)" in off


@pytest.mark.parametrize("unit", systemd.NETWORK_MANAGERS)
def test_every_network_manager_requires_the_block(transaction: dict[str, list[str]], image: Path, unit: str) -> None:
    lines = transaction[instance(unit)]
    assert f"DropIn Path: {image}/image{UNIT_DIR}/{unit}.d/earlyfw.conf" in lines
    assert "Requires: earlyfw-block.service (origin-file)" in lines
    assert "After: earlyfw-block.service (origin-file)" in lines


def test_without_earlyfw_nothing_requires_the_block(image: Path) -> None:
    """Control: the same transaction without earlyfw's unit directory."""
    units = boot_transaction(image, with_earlyfw=False)
    assert systemd.BLOCK_UNIT not in units
    assert not any("earlyfw-block" in line for line in units["systemd-networkd.service"])


def test_nftables_service_loads_through_the_wrapper(transaction: dict[str, list[str]]) -> None:
    lines = transaction["nftables.service"]
    assert "After: earlyfw-block.service (origin-file)" in lines
    commands = [line for line in lines if line.startswith("Command Line:")]
    switch = "Command Line: /usr/lib/earlyfw/earlyfw-switch"
    assert commands == [
        f"{switch} on /usr/sbin/nft -f /etc/earlyfw/nftables/start.nft",
        f"{switch} off /usr/sbin/nft -f /etc/nftables.conf",
        f"{switch} on /usr/sbin/nft -f /etc/earlyfw/nftables/reload.nft",
        f"{switch} off /usr/sbin/nft -f /etc/nftables.conf",
        f"{switch} on /usr/sbin/nft -f /etc/earlyfw/nftables/stop.nft",
        f"{switch} off /usr/sbin/nft flush ruleset",
    ]


# -- nftables.service's rulesets: one transaction, with the real nft ----------

DISTRO_NFTABLES_CONF = """\
#!/usr/sbin/nft -f

flush ruleset

table inet filter {
	chain input {
		type filter hook input priority filter; policy accept;
	}
}
"""


BIND_ETC = 'mount --bind "$0" /etc && '


def nft_in_image(image: Path, tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `script` in a private user, mount and network namespace in which
    /etc is the image's /etc, so the drop-in's absolute includes resolve to the
    files install wrote."""
    need("unshare", "nft")
    etc = tmp_path / "etc"
    shutil.copytree(image / "image/etc", etc, symlinks=True)
    shutil.copy("/etc/ld.so.cache", etc / "ld.so.cache")
    (etc / "nftables.conf").write_text(DISTRO_NFTABLES_CONF)
    return subprocess.run(
        [*("unshare", "--user", "--map-root-user", "--mount", "--net"), "sh", "-c", BIND_ETC + script, str(etc), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def tables(stdout: str, marker: str) -> list[str]:
    block = stdout.split(f"--{marker}--\n", 1)[1].split("--", 1)[0]
    return sorted(line for line in block.splitlines() if line.startswith("table "))


@pytest.mark.netns
def test_wrappers_parse_with_nft_check(image: Path, tmp_path: Path) -> None:
    checks = " && ".join(f"nft -c -f /etc/earlyfw/nftables/{s}.nft" for s in systemd.NFTABLES_STATES)
    result = nft_in_image(image, tmp_path, checks + " && echo ok")
    assert result.stdout.strip() == "ok", result.stderr


@pytest.mark.netns
def test_distro_ruleset_alone_deletes_earlyfw_but_the_wrapper_keeps_it(image: Path, tmp_path: Path) -> None:
    script = textwrap.dedent("""\
        nft -f /etc/earlyfw/blocked.nft && nft add table ip canary
        nft -f /etc/nftables.conf; echo --plain--; nft list tables
        nft -f /etc/earlyfw/blocked.nft && nft add table ip canary
        nft -f /etc/earlyfw/nftables/start.nft; echo --start--; nft list tables
        nft add table ip canary
        nft -f /etc/earlyfw/nftables/reload.nft; echo --reload--; nft list tables
        nft -f /etc/earlyfw/nftables/stop.nft; echo --stop--; nft list tables
        echo --end--
        """)
    result = nft_in_image(image, tmp_path, script)
    assert result.returncode == 0, result.stderr
    # Control: what nftables.service does without earlyfw's drop-in.
    assert tables(result.stdout, "plain") == ["table inet filter"]
    assert tables(result.stdout, "start") == ["table inet earlyfw", "table inet filter"]
    assert tables(result.stdout, "reload") == ["table inet earlyfw", "table inet filter"]
    assert tables(result.stdout, "stop") == ["table inet earlyfw"]


@pytest.mark.netns
def test_the_include_trick_is_one_transaction(image: Path, tmp_path: Path) -> None:
    """When the kernel rejects the last statement of the batch, the `flush
    ruleset` of the included distro file is undone with it: the canary table
    and earlyfw's table survive, so there is never a moment without earlyfw."""
    script = textwrap.dedent("""\
        nft -f /etc/earlyfw/blocked.nft && nft add table ip canary
        echo 'delete table ip no_such_table' >> /etc/earlyfw/blocked.nft
        nft -f /etc/earlyfw/nftables/start.nft; echo "--status $?--"
        echo --after--; nft list tables; echo --end--
        """)
    result = nft_in_image(image, tmp_path, script)
    assert "--status 1--" in result.stdout, result.stdout + result.stderr
    # The kernel, not nft's parser, refused it: the whole batch had been sent.
    assert "Could not process rule: No such file or directory" in result.stderr
    assert tables(result.stdout, "after") == ["table inet earlyfw", "table ip canary"]


def drop_in_commands(image: Path, key: str) -> list[str]:
    """The drop-in's commands for `key` (ExecStart, ...), in order, as systemd
    would run them (the empty assignment resets the distribution's)."""
    text = (image / "image" / firewalls.NFTABLES_DROP_IN.lstrip("/")).read_text()
    commands: list[str] = []
    for line in text.splitlines():
        name, _, value = line.partition("=")
        if name == key:
            commands = [] if not value else [*commands, value]
    return commands


@pytest.mark.netns
@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        ("ro quiet", ["table inet earlyfw", "table inet filter"]),
        ("ro earlyfw=off quiet", ["table inet filter"]),
        ("earlyfw=off earlyfw=on", ["table inet earlyfw", "table inet filter"]),
        ('foo="x earlyfw=off"', ["table inet earlyfw", "table inet filter"]),
    ],
)
def test_nftables_service_with_earlyfw_off_loads_only_the_admins_ruleset(
    image: Path, tmp_path: Path, cmdline: str, expected: list[str]
) -> None:
    """nftables.service's start, reload and stop, run as systemd runs the
    drop-in's lines, with the real nft and earlyfw-switch reading `cmdline`:
    with the switch off, exactly what nftables.service does without earlyfw."""
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    steps = []
    for key, marker in (("ExecStart", "start"), ("ExecReload", "reload"), ("ExecStop", "stop")):
        steps += [*drop_in_commands(image, key), f"echo --{marker}--", "nft list tables"]
    script = (
        'mount --bind "$1" /proc/cmdline && '
        '{ [ ! -d "$2/usr/lib" ] || mount -t overlay overlay -o lowerdir="$2/usr/lib:/usr/lib" /usr/lib; } && '
        + " && ".join(steps)
        + " && echo --end--"
    )
    result = nft_in_image(image, tmp_path, script, str(tmp_path / "cmdline"), str(image / "image"))
    assert "--end--" in result.stdout, result.stdout + result.stderr
    assert tables(result.stdout, "start") == expected
    assert tables(result.stdout, "reload") == expected
    assert tables(result.stdout, "stop") == [t for t in expected if "earlyfw" in t]
