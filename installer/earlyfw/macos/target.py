"""The macOS target: pf, held in place by a launchd job.

/etc/pf.conf is rewritten by system updates, Apple's pfctl job only loads it
(pf stays disabled), and `pfctl -d` from any tool turns pf off. So earlyfw edits
no system file: a LaunchDaemon runs earlyfw-pf at boot, which loads earlyfw's
own anchor inside Apple's com.apple/* anchor point (or calls it from the main
ruleset where that point is missing), enables pf with a reference of its own
(`pfctl -E`), and from then on re-asserts both every few seconds and relaxes
the `tunnel` sub-anchor when WireGuard's handshake completes.
"""

from __future__ import annotations

import os
import plistlib
import re
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from earlyfw import policy, templates
from earlyfw.config import Config, Endpoint, IPAddress, IPNetwork, Transport, TunnelKind
from earlyfw.errors import CommandError, ConfigError, EarlyfwError
from earlyfw.macos import pf
from earlyfw.policy import State
from earlyfw.root import Root, Transaction
from earlyfw.run import Result, Runner
from earlyfw.system import System
from earlyfw.targets import File, Plan, Target

LABEL = "org.earlyfw.pf"
PLIST = f"/Library/LaunchDaemons/{LABEL}.plist"
# Apple's pf.conf calls com.apple/* in name order, so "000." is evaluated
# before Apple's own 200.AirDrop and 250.ApplicationFirewall anchors.
ANCHOR = "com.apple/000.earlyfw"
TUNNEL = "tunnel"
TUNNEL_ANCHOR = f"{ANCHOR}/{TUNNEL}"
# What earlyfw-pf's add_hook puts into the main ruleset, as `pfctl -s rules` lists it.
HOOK_LINES = frozenset({f'scrub-anchor "{ANCHOR}" all', f'anchor "{ANCHOR}" all'})
PFCTL = "pfctl"
LAUNCHCTL = "launchctl"
# launchd's default PATH: system directories only. Homebrew's prefixes belong
# to the user who installed Homebrew, so a root job must never search them;
# `wg` is copied into earlyfw's root-owned support directory instead.
DAEMON_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
# Where `wg` is looked for at install: Homebrew (Apple silicon, Intel), MacPorts.
WG_SOURCES = ("/opt/homebrew/bin/wg", "/usr/local/bin/wg", "/opt/local/bin/wg")
WATCH_INTERVAL = 2  # seconds between two full watchdog passes
# pf has no change notification: between full passes a cheap check (pf
# enabled, the anchor call in place) runs this often, so `pfctl -d` or a
# flushed main ruleset is repaired within a quarter second, not two.
FAST_INTERVAL = 0.25
LAN_TABLE = "earlyfw_lan"
DNS_TABLE = "earlyfw_dns"
SYSTEM_VERSION = "/System/Library/CoreServices/SystemVersion.plist"

TEMPLATES = "payload/macos"

_UTUN = re.compile(r"utun[0-9]+")
# Paths are written into the shell script inside double quotes: no quote,
# dollar, backslash or backtick can ever reach it.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9 /._-]*")


@dataclass(frozen=True)
class Layout:
    """Where the files live on the Mac. Tests lay the same files out under a
    temporary directory (with a space in it, like Application Support)."""

    support_dir: str = "/Library/Application Support/earlyfw"
    run_dir: str = "/var/run/earlyfw"
    log_path: str = "/var/log/earlyfw.log"

    def __post_init__(self) -> None:
        for path in (self.support_dir, self.run_dir, self.log_path):
            if not _SAFE_PATH.fullmatch(path) or "/../" in f"{path}/":
                raise ValueError(f"unsafe path for the macOS layout: {path!r}")

    @property
    def script(self) -> str:
        return f"{self.support_dir}/earlyfw-pf"

    @property
    def rules(self) -> str:
        return f"{self.support_dir}/earlyfw.pf"

    @property
    def tunnel_rules(self) -> str:
        return f"{self.support_dir}/tunnel.pf"

    @property
    def emergency_rules(self) -> str:
        return f"{self.support_dir}/emergency.pf"

    @property
    def wg(self) -> str:
        return f"{self.support_dir}/wg"

    @property
    def lock_dir(self) -> str:
        return f"{self.run_dir}/lock"

    @property
    def token_file(self) -> str:
        return f"{self.run_dir}/pf.token"

    @property
    def locked_at_file(self) -> str:
        return f"{self.run_dir}/locked-at"


LAYOUT = Layout()


@dataclass(frozen=True)
class EndpointGroup:
    """Every endpoint address reached with one protocol and port: one pf
    table, since pf tables hold addresses only. Grouping by (protocol, port)
    keeps the pairing exact: an address is reachable only on its own port."""

    protocol: Transport
    port: int
    addresses: tuple[IPAddress, ...]

    @property
    def table(self) -> str:
        return f"earlyfw_{self.protocol}_{self.port}"

    @property
    def families(self) -> tuple[str, ...]:
        return families(self.addresses)


def families(addresses: Iterable[IPAddress | IPNetwork]) -> tuple[str, ...]:
    """pf's family keywords for the address versions present, inet first."""
    versions = {a.version for a in addresses}
    return tuple(name for name, version in (("inet", 4), ("inet6", 6)) if version in versions)


@dataclass(frozen=True)
class AllowedInterface:
    """An [[allow]] entry as pf rules: one device, its networks in one table."""

    index: int
    interface: str
    networks: tuple[IPNetwork, ...]
    dns: bool

    @property
    def table(self) -> str:
        return f"earlyfw_allow{self.index}"

    @property
    def families(self) -> tuple[str, ...]:
        return families(self.networks)


def allowed_interfaces(config: Config) -> tuple[AllowedInterface, ...]:
    entries = []
    for i, entry in enumerate(config.allow):
        if not pf.is_device(entry.interface):
            raise ConfigError(
                f"allow[{i}].interface: {entry.interface!r} is not one macOS device",
                hint="give the exact device, a lowercase name ending in its unit number (utun5, en1): "
                "pf reads any other name as a group of devices",
            )
        entries.append(AllowedInterface(i, entry.interface, entry.networks, entry.dns))
    return tuple(entries)


def refuse_unsupported(config: Config) -> None:
    if config.forward_via_tunnel:
        raise ConfigError(
            "forward.via_tunnel is not supported by the macos target: pf would need rdr rules in Apple's nat anchors "
            "for the bridges' DNS, which earlyfw does not write",
            hint="remove [forward] from the config for macOS; what the Mac forwards stays blocked outside the tunnel",
        )


def endpoint_groups(endpoints: Iterable[Endpoint]) -> tuple[EndpointGroup, ...]:
    groups: dict[tuple[Transport, int], list[IPAddress]] = defaultdict(list)
    for e in endpoints:
        groups[(e.protocol, e.port)].append(e.address)
    return tuple(
        EndpointGroup(protocol, port, tuple(sorted(addresses, key=lambda a: (a.version, int(a)))))
        for (protocol, port), addresses in sorted(groups.items())
    )


def wg_endpoint(endpoint: Endpoint) -> str:
    """An endpoint as `wg show dump` prints a peer's: host:port, [v6]:port."""
    host = f"[{endpoint.address}]" if endpoint.family == 6 else str(endpoint.address)
    return f"{host}:{endpoint.port}"


def require_utun(interface: str) -> str:
    """macOS names every tunnel device utunN; the rules must name the exact one."""
    if not _UTUN.fullmatch(interface):
        raise ConfigError(
            f"tunnel.interface: {interface!r} is not a macOS tunnel device (utunN)",
            hint='give the exact utun device your VPN uses, e.g. interface = "utun9" with '
            "`wg-quick up utun9` (a high number: macOS creates low-numbered utun devices itself)",
        )
    return interface


def require_darwin(action: str) -> None:
    if not System.MACOS.is_current:
        raise EarlyfwError(
            f"{action}: the macos target drives launchctl and pfctl, which exist only on macOS",
            hint="on Linux it can only install into a Mac image: --root DIR --target macos",
        )


def endpoint_user(config: Config) -> str | None:
    """Whose sockets may send to the endpoints: root's, which wireguard-go
    under wg-quick and Tunnelblick's OpenVPN are. pf has no packet marks, so
    an OpenVPN that drops to `user` cannot reconnect (its new socket is that
    user's); a manual tunnel's program is unknown, so it is not restricted."""
    return None if config.tunnel_kind is TunnelKind.MANUAL else "root"


@dataclass(frozen=True)
class Rendered:
    rules: str
    tunnel: str
    emergency: str
    script: str
    plist: bytes


def render(config: Config, layout: Layout = LAYOUT) -> Rendered:
    """Every file of the target, each checked against the pf subset and the
    anchor's required shape before it can be written."""
    interface = require_utun(config.interface)
    refuse_unsupported(config)
    allow = allowed_interfaces(config)
    common = {"anchor": ANCHOR, "tunnel": TUNNEL, "interface": interface, "dns_ports": policy.DNS_PORTS}
    lan = (*policy.lan_networks(config, 4), *policy.lan_networks(config, 6))
    rules = templates.render(
        f"{TEMPLATES}/earlyfw.pf.j2",
        groups=endpoint_groups(config.endpoints),
        endpoint_user=endpoint_user(config),
        lan=lan,
        lan_families=families(lan),
        lan_table=LAN_TABLE,
        allow=allow,
        **common,
    )
    tunnel = templates.render(
        f"{TEMPLATES}/tunnel.pf.j2",
        dns=sorted(config.dns_servers, key=lambda a: (a.version, int(a))),
        dns_table=DNS_TABLE,
        **common,
    )
    emergency = templates.render(f"{TEMPLATES}/emergency.pf.j2", **common)
    try:
        main = pf.parse(rules)
        pf.check_main(main, interface, TUNNEL, allowed=[a.interface for a in allow])
        pf.check_tunnel(pf.parse(tunnel), interface)
        pf.parse(emergency)
    except pf.PfError as e:  # a template bug, never a user error: refuse to write it
        raise EarlyfwError(f"rendered pf rules are invalid: {e}") from None
    script = templates.render(
        f"{TEMPLATES}/earlyfw-pf.sh.j2",
        label=LABEL,
        plist=PLIST,
        layout=layout,
        kind=config.tunnel_kind,
        wg_endpoints=[wg_endpoint(e) for e in config.endpoints if e.protocol is Transport.UDP],
        rule_count=len(main),
        reject_after=config.reject_after_seconds,
        interval=WATCH_INTERVAL,
        fast_interval=FAST_INTERVAL,
        fast_per_pass=round(WATCH_INTERVAL / FAST_INTERVAL),
        **common,
    )
    return Rendered(rules, tunnel, emergency, script, launchd_plist(layout))


def launchd_plist(layout: Layout = LAYOUT) -> bytes:
    """The LaunchDaemon: started at boot, restarted whenever it exits."""
    job = {
        "Label": LABEL,
        # /bin/sh explicitly: the job runs even if the script lost its x bit.
        "ProgramArguments": ["/bin/sh", layout.script, "watch"],
        "RunAtLoad": True,
        "KeepAlive": True,
        "EnvironmentVariables": {"PATH": DAEMON_PATH},
        "StandardOutPath": layout.log_path,
        "StandardErrorPath": layout.log_path,
    }
    return plistlib.dumps(job, fmt=plistlib.FMT_XML, sort_keys=True)


class MacOS(Target):
    name: ClassVar[str] = "macos"
    system: ClassVar[System] = System.MACOS
    reads = WG_SOURCES

    @classmethod
    def detect(cls, root: Root) -> bool:
        return System.MACOS.is_current and (root.is_host or root.exists(SYSTEM_VERSION))

    def plan(self, config: Config) -> Plan:
        r = render(config, LAYOUT)
        files = [
            # What `earlyfw relax|lock` read on the Mac; the job itself runs on the rendered files.
            File(System.MACOS.config_path, config.to_toml().encode(), 0o644),
            # launchd refuses a job whose plist is not root:wheel and not group/world-writable.
            File(PLIST, r.plist, 0o644),
            File(LAYOUT.script, r.script.encode(), 0o755),
            File(LAYOUT.rules, r.rules.encode(), 0o644),
            File(LAYOUT.tunnel_rules, r.tunnel.encode(), 0o644),
            File(LAYOUT.emergency_rules, r.emergency.encode(), 0o644),
        ]
        if config.tunnel_kind is TunnelKind.WIREGUARD:
            # A root-owned copy: the job runs it as root every two seconds.
            files.append(File(LAYOUT.wg, self._wg_binary(), 0o755))
        notes = (f"keep {PLIST} owned by root:wheel, mode 0644, when copying the image: launchd ignores it otherwise",)
        return Plan(self.name, tuple(files), notes)

    def _wg_binary(self) -> bytes:
        """wireguard-tools' `wg`, read from where Homebrew or MacPorts put it
        (a symlink into the Cellar is followed, but never out of the root)."""
        top = os.path.realpath(self.root.path)
        for source in WG_SOURCES:
            if not self.root.exists(source):
                continue
            real = os.path.realpath(self.root.resolve(source))
            if os.path.commonpath([top, real]) != top:
                raise EarlyfwError(f"{source} points outside {self.root.path}: refusing to copy it")
            return Path(real).read_bytes()
        raise EarlyfwError(
            "wg (wireguard-tools) not found in " + ", ".join(WG_SOURCES),
            hint="brew install wireguard-tools; earlyfw copies it into its root-owned support directory",
        )

    def apply(self, plan: Plan, txn: Transaction) -> None:
        if self.root.is_host:
            require_darwin("install --target macos")
        super().apply(plan, txn)

    def after_install(self, config: Config) -> None:
        require_darwin("install --target macos")
        # bootout + bootstrap rather than kickstart: launchd rereads the plist,
        # and the job's first pass reloads every rule file from disk.
        self.runner.run([LAUNCHCTL, "bootout", f"system/{LABEL}"], check=False)
        self.runner.run([LAUNCHCTL, "enable", f"system/{LABEL}"])
        bootstrap(self.runner)

    def after_uninstall(self) -> None:
        require_darwin("uninstall")
        # The job first, or its next pass would put everything back.
        self.runner.run([LAUNCHCTL, "bootout", f"system/{LABEL}"], check=False)
        token = self._recorded_token()
        if token:
            # A token from an earlier boot is simply unknown to pf: not an error.
            self.runner.run([PFCTL, "-X", token], check=False)
        failed = [] if self._remove_hook() else ["the anchor call in the main ruleset"]
        failed += [
            f"{anchor} ({what})"
            for anchor in (TUNNEL_ANCHOR, ANCHOR)
            for what in ("rules", "Tables")
            if self.runner.run([PFCTL, "-a", anchor, "-F", what], check=False).returncode != 0
        ]
        self.root.remove(LAYOUT.token_file)
        self.root.remove(LAYOUT.locked_at_file)
        self.root.rmdir_if_empty(LAYOUT.run_dir)
        self.root.remove(LAYOUT.log_path)
        if failed:
            raise EarlyfwError(
                "earlyfw's files are removed, but pf still holds: " + ", ".join(failed),
                hint=f"sudo pfctl -a '{ANCHOR}' -F all",
            )

    def _remove_hook(self) -> bool:
        """Take out the calls earlyfw-pf put into the main ruleset where
        pf.conf did not call com.apple/* (add_hook); False if that failed."""
        main = self.runner.run([PFCTL, "-s", "rules"], check=False)
        if main.returncode != 0:
            return False
        lines = main.stdout.splitlines()
        kept = [line for line in lines if line.strip() not in HOOK_LINES]
        if kept == lines:
            return True
        load = self.runner.run(
            [PFCTL, "-o", "none", "-R", "-f", "-"], input="".join(f"{k}\n" for k in kept), check=False
        )
        return load.returncode == 0

    def _recorded_token(self) -> str | None:
        try:
            token = self.root.read_bytes(LAYOUT.token_file).decode().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return token if token.isdigit() else None


def bootstrap(runner: Runner, attempts: int = 3, delay: float = 0.5) -> None:
    """`launchctl bootstrap` right after a bootout can fail while launchd is
    still tearing the old job down (EIO); it succeeds moments later."""
    for attempt in range(1, attempts + 1):
        try:
            runner.run([LAUNCHCTL, "bootstrap", "system", PLIST])
            return
        except CommandError as e:
            if attempt == attempts:
                raise EarlyfwError(
                    f"launchd did not load {PLIST}: {e}",
                    hint=f"sudo launchctl bootstrap system {PLIST}; then `sudo launchctl print system/{LABEL}`",
                ) from None
            time.sleep(delay)


# --- Relax and lock on a live Mac (`earlyfw relax` / `earlyfw lock`) ----------


def put_state(runner: Runner, config: Config, state: State, layout: Layout = LAYOUT, root: Root | None = None) -> None:
    """What `earlyfw relax|lock|apply --state` do on macOS: run the installed
    earlyfw-pf, so the CLI, the OpenVPN up/down hooks and the launchd job
    share one implementation (and its record of the last lock)."""
    require_darwin(f"apply --state {state}")
    require_utun(config.interface)
    require_pf_state(state)
    script = installed_script(root or Root(), layout)
    runner.run(["/bin/sh", script, "relax" if state is State.RELAXED else "lock"])


def status(runner: Runner, layout: Layout = LAYOUT, root: Root | None = None) -> Result:
    """What earlyfw-pf reads back from pf (`earlyfw-pf status`): its lines, and
    exit status 3 when earlyfw's block is not in force."""
    require_darwin("status")
    return runner.run(["/bin/sh", installed_script(root or Root(), layout), "status"], check=False)


def require_pf_state(state: State) -> None:
    if state is State.INITRAMFS:
        raise EarlyfwError(f"state {state} exists only in a Linux initramfs")


def installed_script(root: Root, layout: Layout = LAYOUT) -> str:
    """earlyfw-pf as installed under `root`, as a path on this machine."""
    if not root.exists(layout.script):
        raise EarlyfwError(f"{root / layout.script}: missing; earlyfw is not installed", hint="sudo earlyfw install")
    return str(root / layout.script)
