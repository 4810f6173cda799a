"""Captive-portal windows: `earlyfw portal [--minutes N] -- COMMAND`.

Hotel and airport networks show a login page before anything else works, and
the kill switch blocks that page with everything else. A window lets one
command (a browser) in a cgroup of its own resolve names through the
network's resolvers and browse over HTTP and HTTPS while the machine stays
blocked; every other process stays refused.

The window lives in the ruleset, never only in this process
(earlyfw.linux.window): set elements keyed by the command's cgroup (`socket
cgroupv2 level 2`), added with a kernel timeout, so the kernel closes it on
time even if earlyfw is killed, and every state change (a relax, a lock, the
watcher's restart) replaces the sets empty. A running watcher owns the guard
table, which only it may change, so the elements go in through it; without a
watcher they go into earlyfw's table directly. One window at a time.

The netdev egress chain ([egress] interfaces) cannot see cgroups: while a
window lasts it passes the web ports and the window's resolvers for every
sender, raw frames included; the inet table still lets only the window's
cgroup out through the IP stack.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import math
import os
import pwd
import re
import secrets
import shlex
import signal
import subprocess
import sys
import syslog
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from earlyfw import policy
from earlyfw.config import Config, IPAddress, parse_address
from earlyfw.errors import ConfigError, EarlyfwError
from earlyfw.linux import nft
from earlyfw.linux.window import CLOSE_WHY, PARENT, REQUEST_NAME, Log, Window, close_script, open_in
from earlyfw.policy import TABLE, State
from earlyfw.run import Runner

Popen = subprocess.Popen[bytes]

# nft reads a cgroup as a path under this directory (nft 1.0.6 takes no
# number): the v2 tree must be mounted here (unified) or one level below (hybrid).
SYSFS_CGROUP = Path("/sys/fs/cgroup")
# The resolvers the network handed out, in the order earlyfw trusts them:
# systemd-resolved's upstream list (the stub 127.0.0.53 in /etc/resolv.conf
# is resolved itself, whose queries are not the window's), NetworkManager's
# list without the stub, then /etc/resolv.conf as dhclient or ifupdown write it.
RESOLV_SOURCES = (
    Path("/run/systemd/resolve/resolv.conf"),
    Path("/run/NetworkManager/no-stub-resolv.conf"),
    Path("/etc/resolv.conf"),
)
# systemd-resolved's varlink socket: nss-resolve asks it before `dns`, so the
# command's own view hides it, and getaddrinfo reads the window's resolv.conf.
RESOLVED_SOCKET = Path("/run/systemd/resolve/io.systemd.Resolve")
# How long `earlyfw portal` waits for the watcher to confirm a request.
WATCHER_TIMEOUT = 10.0
# How often `earlyfw portal` looks whether its window is still in the ruleset.
POLL = 1.0
# After the command exits: how long what it left behind may take to stop.
STOP_GRACE = 5.0


# --- the network's resolvers -------------------------------------------------------------


def network_resolvers(config: Config, sources: Sequence[Path] = RESOLV_SOURCES) -> tuple[IPAddress, ...]:
    """The resolvers the network handed out: the nameservers of the first
    source that lists one usable here. Loopback stubs (resolved's, a local
    dnsmasq) are not the network's, and the VPN's own resolvers are reached
    only through the tunnel, so neither counts."""
    for source in sources:
        try:
            text = source.read_text(errors="replace")
        except OSError:
            continue
        found = [a for a in nameservers(text) if not a.is_loopback and a not in config.dns_servers]
        if found:
            return tuple(dict.fromkeys(found))
    raise EarlyfwError(
        "cannot tell which resolvers the network handed out: no nameserver in "
        + ", ".join(map(str, sources))
        + " but loopback or the VPN's",
        hint="name them: earlyfw portal --dns ADDRESS (as `resolvectl dns` or `nmcli dev show` list them)",
    )


def nameservers(text: str) -> list[IPAddress]:
    """`nameserver` lines as glibc reads them, but link-local ones
    (fe80::1%wlan0): the command's resolv.conf would need the zone, which
    the window's nft sets cannot hold."""
    found = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            with contextlib.suppress(ValueError):
                found.append(ipaddress.ip_address(words[1]))
    return [a for a in found if not (a.is_unspecified or a.is_multicast or a.is_link_local)]


def given_resolvers(values: Iterable[str]) -> tuple[IPAddress, ...]:
    found = tuple(parse_address(f"--dns {value}", value) for value in values)
    loopback = [str(a) for a in found if a.is_loopback]
    if loopback:
        raise ConfigError(f"--dns {loopback[0]}: a loopback resolver asks on the window's behalf from outside it")
    return found


# --- the cgroup ----------------------------------------------------------------------------


def cgroup2_mount(mountinfo: str) -> Path:
    """Where the cgroup v2 tree is mounted, checked usable for windows: its
    whole tree (not a cgroup namespace's part of it, where levels differ) at
    a place nft reads cgroup paths from."""
    for line in mountinfo.splitlines():
        fields = line.split(" - ", 1)
        if len(fields) != 2 or fields[1].split()[0] != "cgroup2":
            continue
        before = fields[0].split()
        root, mount = before[3], Path(before[4])
        if root != "/":
            raise EarlyfwError(f"the cgroup v2 tree at {mount} is a cgroup namespace's part of it ({root})")
        if SYSFS_CGROUP in (mount, mount.parent):
            return mount
        raise EarlyfwError(f"the cgroup v2 tree is mounted at {mount}; nft reads cgroups under {SYSFS_CGROUP} only")
    raise EarlyfwError("no cgroup v2 tree is mounted: portal windows need one (Linux 4.5+, systemd's default)")


@dataclass(frozen=True)
class Cgroup:
    path: Path  # in the file system
    nft_name: str  # as nft reads it

    @classmethod
    def create(cls, mount: Path) -> Cgroup:
        parent = mount / PARENT
        parent.mkdir(mode=0o755, exist_ok=True)
        for stale in parent.glob("w*"):
            # Left by a killed `earlyfw portal` whose command has ended since.
            with contextlib.suppress(OSError):
                stale.rmdir()
        name = f"w{secrets.token_hex(6)}"
        path = parent / name
        path.mkdir(mode=0o755)
        return cls(path, str(path.relative_to(SYSFS_CGROUP)))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def stop(self, grace: float = STOP_GRACE) -> None:
        """End every process still in it (what the command left behind), and remove it."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 2.0)
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
        with contextlib.suppress(OSError):
            self.path.rmdir()


# --- the command ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Invoker:
    """Who the command runs as: the user who ran sudo, else root."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    env: dict[str, str]

    @classmethod
    def from_environment(cls, environ: dict[str, str]) -> Invoker:
        uid_text, gid_text = environ.get("SUDO_UID", ""), environ.get("SUDO_GID", "")
        if not uid_text:
            return cls(0, 0, tuple(os.getgroups()), dict(environ))
        if not (uid_text.isdigit() and gid_text.isdigit()):
            raise EarlyfwError(f"SUDO_UID/SUDO_GID {uid_text!r}/{gid_text!r} are not numbers")
        try:
            user = pwd.getpwuid(int(uid_text))
        except KeyError:
            raise EarlyfwError(f"SUDO_UID {uid_text} is no user on this machine") from None
        gid = int(gid_text)
        env = {**environ, "HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name}
        return cls(user.pw_uid, gid, tuple(os.getgrouplist(user.pw_name, gid)), env)


def _libc_call(name: str, *args: object) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 0x80000


def _enter(cgroup: Cgroup, invoker: Invoker, resolv: Path) -> None:
    """In the child, before exec: into the window's cgroup (so every socket
    it opens is the window's), a mount namespace of its own where
    /etc/resolv.conf lists the window's resolvers, then the invoker's ids."""
    (cgroup.path / "cgroup.procs").write_text("0\n")
    _libc_call("unshare", CLONE_NEWNS)
    _libc_call("mount", b"none", b"/", None, MS_REC | MS_SLAVE, None)
    target = os.path.realpath("/etc/resolv.conf")
    if os.path.isfile(target):
        _libc_call("mount", str(resolv).encode(), target.encode(), None, MS_BIND, None)
    if RESOLVED_SOCKET.exists():
        _libc_call("mount", b"/dev/null", str(RESOLVED_SOCKET).encode(), None, MS_BIND, None)
    os.setgroups(list(invoker.groups))
    os.setresgid(invoker.gid, invoker.gid, invoker.gid)
    os.setresuid(invoker.uid, invoker.uid, invoker.uid)


def resolv_conf(resolvers: Sequence[IPAddress]) -> str:
    return "# earlyfw portal: the network's resolvers, for this window only\n" + "".join(
        f"nameserver {a}\n" for a in resolvers
    )


# --- the journal ---------------------------------------------------------------------------


def journal(message: str) -> None:
    """One line on stderr and in the system log (journald reads /dev/log)."""
    print(f"earlyfw: portal: {message}", file=sys.stderr, flush=True)
    syslog.openlog("earlyfw", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    syslog.syslog(syslog.LOG_NOTICE, f"portal: {message}")
    syslog.closelog()


# --- where the window goes: through the watcher, or straight into the table --------------


class Way:
    """How `earlyfw portal` puts its window into the ruleset and takes it out."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def open(self, window: Window) -> None:
        raise NotImplementedError

    def close(self, window: Window, why: str) -> None:
        """`why`: a key of CLOSE_WHY."""
        raise NotImplementedError

    def is_open(self) -> bool:
        """Whether earlyfw's table holds a window: one at a time, so ours."""
        result = self.runner.run([nft.NFT, "list", "set", "inet", TABLE, "portal_web"], check=False)
        return result.returncode == 0 and open_in(result.stdout)

    def check_loaded(self) -> None:
        result = self.runner.run([nft.NFT, "list", "set", "inet", TABLE, "portal_web"], check=False)
        if result.returncode != 0:
            raise EarlyfwError(
                f"the loaded table inet {TABLE} has no portal sets: it was loaded before [portal] allow was set",
                hint="put the blocked state in place again: `systemctl reload earlyfw-watch`, or `earlyfw lock`",
            )
        if open_in(result.stdout):
            raise EarlyfwError("a portal window is open already; one at a time", hint="wait for it to close")


class Direct(Way):
    """No watcher: earlyfw's own tables, which root may change."""

    def tables(self) -> list[tuple[str, str]]:
        present = nft.tables(self.runner)
        return [key for key in nft.MAIN_TABLES if key in present]

    def open(self, window: Window) -> None:
        self.check_loaded()
        nft.load(self.runner, window.open_script(self.tables()))

    def close(self, window: Window, why: str) -> None:
        nft.load(self.runner, close_script(self.tables()))


class ThroughWatcher(Way):
    """A running watcher owns the guard table: it adds and removes the window."""

    def __init__(self, runner: Runner, pid: int, interface: str, directory: Path) -> None:
        super().__init__(runner)
        self.pid, self.interface, self.directory = pid, interface, directory

    def open(self, window: Window) -> None:
        self.check_loaded()
        self._ask({"action": "open", "window": window.to_json()})

    def close(self, window: Window, why: str) -> None:
        self._ask({"action": "close", "cgroup": window.cgroup, "why": why})

    def _ask(self, request: dict[str, Any], timeout: float = WATCHER_TIMEOUT) -> None:
        from earlyfw.linux.watcher import daemon  # noqa: PLC0415 - the watcher's modules, only here

        token = secrets.token_hex(8)
        path = self.directory / REQUEST_NAME.format(interface=self.interface)
        fd, staging = tempfile.mkstemp(dir=self.directory, prefix=".portal-")
        with os.fdopen(fd, "w") as f:
            json.dump({**request, "id": token, "pid": os.getpid()}, f)
        os.rename(staging, path)
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            verdict = daemon.read_verdict(self.interface, self.directory)
            if verdict is None or verdict.get("pid") != self.pid or not verdict["running"] or verdict.get("stopped"):
                raise EarlyfwError(f"earlyfw watch (pid {self.pid}) stopped before it answered")
            answer = (verdict.get("portal") or {}).get("answer") or {}
            if answer.get("id") == token:
                if not answer.get("ok"):
                    raise EarlyfwError(f"earlyfw watch (pid {self.pid}) refused: {answer.get('error')}")
                return
            time.sleep(0.05)
        raise EarlyfwError(f"earlyfw watch (pid {self.pid}) did not answer within {timeout:.0f} s")


def way_for(config: Config, runner: Runner) -> Way:
    from earlyfw.linux import endpoints  # noqa: PLC0415 - imports the watcher's modules
    from earlyfw.linux.watcher import daemon  # noqa: PLC0415

    pid = endpoints.running_watcher(config.interface)
    return Direct(runner) if pid is None else ThroughWatcher(runner, pid, config.interface, daemon.VERDICT_DIR)


# --- `earlyfw portal` --------------------------------------------------------------------------


def seconds_of(minutes: float) -> int:
    return max(policy.PORTAL_MIN_SECONDS, math.ceil(minutes * 60))


class _Stopped(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_stop() -> Iterator[None]:
    def stop(signum: int, frame: object) -> None:
        raise _Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(  # noqa: PLR0917  (one argument per option)
    config: Config,
    runner: Runner,
    command: Sequence[str],
    minutes: float,
    dns: Sequence[str] = (),
    way: Way | None = None,
    log: Log = journal,
) -> int:
    """Run `command` in a window; its exit status."""
    nft.require_root_for("portal")
    if not config.portal_allow:
        raise ConfigError(
            "portal windows are off in the config",
            hint="set [portal] allow = true, then `earlyfw install` (or `earlyfw lock`) to load the window sets",
        )
    state = nft.live_state(runner)
    if state is not State.BLOCKED:
        raise EarlyfwError(
            f"earlyfw is {state or 'not loaded'}: a portal window opens only while blocked",
            hint="relaxed, the tunnel is up and the portal is reached through it" if state else None,
        )
    resolvers = given_resolvers(dns) if dns else network_resolvers(config)
    mount = cgroup2_mount(Path("/proc/self/mountinfo").read_text())
    invoker = Invoker.from_environment(dict(os.environ))
    way = way or way_for(config, runner)
    way.check_loaded()  # before a cgroup is made: a second window is refused with nothing left behind
    cgroup = Cgroup.create(mount)
    window = Window(cgroup.nft_name, seconds_of(minutes), resolvers)
    # One journal line: the command line as a shell would take it, whitespace folded, cut short.
    shown = re.sub(r"\s+", " ", shlex.join(command))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    opened = False
    try:
        with _signals_stop():
            # Taken before the kernel starts the elements' timers: never later than their end.
            deadline = time.monotonic() + window.seconds
            way.open(window)
            opened = True
            log(f"opened for {shown} as uid {invoker.uid}: {window.describe()}")
            process = _start(command, cgroup, invoker, resolvers)
            returncode, opened = _wait(process, way, window, deadline, log)
            if opened:
                _close(way, window, "exited", log)
                opened = False
            return returncode
    except _Stopped as e:
        if opened:
            _close(way, window, "stopped", log)
            opened = False
        log(f"stopped ({e}); ending {shown}")
        return 128 + e.signum
    finally:
        if opened:
            _close(way, window, "stopped", log)
        cgroup.stop()


def _start(command: Sequence[str], cgroup: Cgroup, invoker: Invoker, resolvers: Sequence[IPAddress]) -> Popen:
    fd, name = tempfile.mkstemp(prefix="earlyfw-portal-", suffix=".conf")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(resolv_conf(resolvers))
        os.chmod(name, 0o644)
        try:
            return subprocess.Popen(
                list(command),
                env=invoker.env,
                preexec_fn=lambda: _enter(cgroup, invoker, Path(name)),  # noqa: PLW1509 - single-threaded
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise EarlyfwError(f"cannot start {command[0]!r} in the window: {e}") from None
    finally:
        os.unlink(name)  # the command's mount holds it


def _wait(process: Popen, way: Way, window: Window, deadline: float, log: Log) -> tuple[int, bool]:
    """Until the command exits; the window may close before (its timeout, a
    state change), the command then runs on, refused like every other program."""
    opened = True
    while True:
        try:
            return process.wait(timeout=POLL), opened
        except subprocess.TimeoutExpired:
            pass
        if not opened:
            continue
        if time.monotonic() >= deadline:
            why = f"timed out after {window.seconds} s"
        elif not way.is_open():
            why = "the ruleset was replaced: a relax, a lock or the watcher's restart"
        else:
            continue
        opened = False
        log(f"closed ({why}); the command runs on, refused like every other program")


def _close(way: Way, window: Window, why: str, log: Log) -> None:
    try:
        way.close(window, why)
    except EarlyfwError as e:
        # Its cgroup is removed next, so nothing can use what is left until it times out.
        log(f"could not close the window at once ({e}); it expires with its timeout")
        return
    log(f"closed ({CLOSE_WHY[why]})")
