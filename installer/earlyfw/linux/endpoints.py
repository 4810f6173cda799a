"""`earlyfw endpoints refresh`: re-resolve the hostnames endpoints were pinned
from (`host = "..."` in the config) and swap the pins.

A host whose lookup fails, or that answers with an address no endpoint may
have, keeps its old pins: a resolver outage or a poisoned answer never empties
the allow list under a running tunnel. And a pin the tunnel is using right now
(a live connection-tracking flow to it) stays even when DNS no longer lists it,
so a rotation never cuts the running tunnel; a later refresh drops it once the
client has moved on.

Applying the new pins (`apply`) changes, in one go, everything that carries
them: the config, the boot rulesets earlyfw installed beside it (so the
watcher's ExecStopPost and the next boot load the fresh pins; the initramfs
keeps its copy until it is rebuilt), and the kernel: through a running
`earlyfw watch` (SIGHUP: it reloads its tables and its owned guard in one
batch, and would otherwise put its old pins back), else by swapping the live
set elements, new before old. If the kernel side fails, the files are put
back as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import re
import signal
import time
from collections.abc import Callable, Set
from pathlib import Path

from earlyfw.config import Config, Endpoint, IPAddress, Transport, endpoint_dict, unusable_endpoint
from earlyfw.errors import EarlyfwError
from earlyfw.importers import Resolve
from earlyfw.linux import boot, nft
from earlyfw.linux.core import CONFIG_PATH, Core
from earlyfw.linux.watcher import daemon
from earlyfw.manifest import Manifest
from earlyfw.root import MANIFEST, Root, Transaction, sha256
from earlyfw.run import Runner
from earlyfw.targets import File

Log = Callable[[str], None]


Key = tuple[IPAddress, int, Transport]


def refreshed(config: Config, lookup: Resolve, log: Log, in_use: Set[Key] = frozenset()) -> Config:
    """`config` with each hostname's endpoints replaced by its current
    addresses, where its first endpoint was; every other endpoint unchanged,
    and every old pin in `in_use` kept."""
    answers = {host: _lookup(host, lookup, log) for host in dict.fromkeys(e.host for e in config.endpoints if e.host)}
    pins: dict[object, Endpoint] = {}
    done: set[tuple[str, int, str]] = set()
    for endpoint in config.endpoints:
        fresh = answers.get(endpoint.host) if endpoint.host else None
        if endpoint.host is None or fresh is None:
            pins.setdefault(endpoint.key, endpoint)
            continue
        group = (endpoint.host, endpoint.port, str(endpoint.protocol))
        if group not in done:
            done.add(group)
            for address in fresh:
                pin = Endpoint(address, endpoint.port, endpoint.protocol, endpoint.host)
                pins.setdefault(pin.key, pin)
        if endpoint.key in in_use and endpoint.address not in fresh:
            log(f"kept {endpoint} ({endpoint.host}): no longer in DNS, but the tunnel is using it")
            pins.setdefault(endpoint.key, endpoint)
    new = Config.from_dict({**config.to_dict(), "endpoint": [endpoint_dict(e) for e in pins.values()]})
    old_keys, new_keys = {e.key for e in config.endpoints}, {e.key for e in new.endpoints}
    for e in new.endpoints:
        if e.key not in old_keys:
            log(f"added {e} ({e.host})")
    for e in config.endpoints:
        if e.key not in new_keys:
            log(f"removed {e} ({e.host})")
    return new


def _lookup(host: str, lookup: Resolve, log: Log) -> list[IPAddress] | None:
    try:
        addresses = list(lookup(host, None))
    except EarlyfwError as e:
        log(f"kept the pins of {host}: {e}")
        return None
    if not addresses:
        log(f"kept the pins of {host}: it has no A or AAAA record")
        return None
    for address in addresses:
        why = unusable_endpoint(address)
        if why:
            log(f"kept the pins of {host}: it resolved to {address}, {why}")
            return None
    return addresses


_FLOW = re.compile(r"^ipv[46]\s+\d+\s+(?P<proto>udp|tcp)\s+\d+\s+\d+\s.*?\bdst=(?P<dst>\S+)\s.*?\bdport=(?P<dport>\d+)")


def tunnel_flows(config: Config, log: Log, table: Path = Path("/proc/net/nf_conntrack")) -> set[Key]:
    """The pinned endpoints with a live flow in this network namespace's
    connection tracking (the relaxed ruleset tracks every flow): the ones the
    tunnel is using now."""
    try:
        text = table.read_text()
    except OSError as e:
        log(f"cannot tell which endpoint the tunnel uses ({table}: {e.strerror}); removing what DNS dropped")
        return set()
    pinned = {e.key for e in config.endpoints}
    found: set[Key] = set()
    for line in text.splitlines():
        match = _FLOW.match(line)
        if match:
            key = (ipaddress.ip_address(match["dst"]), int(match["dport"]), Transport(match["proto"]))
            if key in pinned:
                found.add(key)
    return found


# How long `apply` waits for a running watcher to confirm its reload.
RELOAD_TIMEOUT = 10.0


def boot_files(root: Root, config_path: str, new: Config, runner: Runner, log: Log) -> list[File]:
    """The installed files beside the config that carry the endpoints,
    rendered from `new`: only when `config_path` is the installed config, and
    only the ones still as earlyfw wrote them (a file the admin edited is
    theirs: said, and left alone)."""
    if (root / config_path).resolve() != (root / CONFIG_PATH).resolve():
        return []
    manifest = Manifest.load(root)
    if manifest is None:
        return []
    rendered = [f for f in Core(root, runner).plan(new).artifacts if isinstance(f, File) and f.path != CONFIG_PATH]
    if new.egress_interfaces:
        rendered.append(File(boot.EGRESS_RULESET, boot.egress_ruleset(new)))
    files = []
    for file in rendered:
        if file.path not in manifest.entries:
            continue
        if not manifest.owns(root, file.path):
            log(f"warning: {root / file.path} was changed since install: left with the old pins")
            continue
        files.append(file)
    return files


def apply(root: Root, config_path: str, old: Config, new: Config, *, runner: Runner, log: Log) -> None:
    """Put `new`'s pins in the config, the installed boot rulesets and the
    kernel, or (on failure) nowhere. Under the install lock: an install or
    uninstall running meanwhile would record other checksums."""
    with root.locked():
        files = boot_files(root, config_path, new, runner, log)
        pid = running_watcher(old.interface)
        with Transaction(root) as txn:
            info = (root / config_path).stat()
            config_bytes = new.to_toml().encode()
            txn.write(config_path, config_bytes, mode=info.st_mode & 0o7777, uid=info.st_uid, gid=info.st_gid)
            for file in files:
                st = (root / file.path).stat()
                txn.write(file.path, file.content, mode=st.st_mode & 0o7777, uid=st.st_uid, gid=st.st_gid)
            _record(root, txn, [File(config_path, config_bytes), *files])
            if pid is None:
                nft.swap_endpoints(runner, old, new)
            else:
                try:
                    reload_watcher(pid, new, old.interface)
                except BaseException:
                    # The files go back as they were (leaving this block); ask
                    # again so a watcher that reloads late reads them too.
                    txn.rollback()
                    _signal(pid)
                    raise
        where = "the live sets" if pid is None else f"earlyfw watch (pid {pid}, its guard table too)"
        log(f"{root / config_path} and {where} now pin {len(new.endpoints)} endpoint(s)")
        if files:
            log("rewrote " + ", ".join(str(root / f.path) for f in files) + ": the next boot's systemd units load them")
            log(
                "the initramfs keeps its copy of the old pins until it is rebuilt "
                "(update-initramfs -u, dracut -f or mkinitcpio -P): only the first seconds of boot use it"
            )


def _record(root: Root, txn: Transaction, written: list[File]) -> None:
    """Keep the manifest's checksums with the files, so uninstall still knows them as earlyfw's."""
    manifest = Manifest.load(root)
    if manifest is None:
        return
    changed = False
    for file in written:
        entry = manifest.entries.get(file.path)
        if entry is not None:
            manifest.entries[file.path] = dataclasses.replace(entry, fingerprint="sha256:" + sha256(file.content))
            changed = True
    if changed:
        txn.write(MANIFEST, manifest.dump(), mode=0o600)


def running_watcher(interface: str, directory: Path = daemon.VERDICT_DIR, proc: Path = Path("/proc")) -> int | None:
    """The pid of the `earlyfw watch` enforcing `interface` in this network
    namespace, from its published verdict; None if there is none. The pid is
    checked to be that watcher (a stale file after a crash may name a reused
    pid, and SIGHUP would end most other processes)."""
    verdict = daemon.read_verdict(interface, directory)
    if verdict is None or not verdict["running"] or verdict.get("stopped"):
        return None
    pid = verdict["pid"]
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
        same_net = (proc / str(pid) / "ns" / "net").stat().st_ino == (proc / "self" / "ns" / "net").stat().st_ino
    except OSError:
        return None
    if not same_net or b"watch" not in argv or not any(b"earlyfw" in a for a in argv):
        return None
    return int(pid)


def _signal(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGHUP)


def reload_watcher(pid: int, new: Config, interface: str, timeout: float = RELOAD_TIMEOUT) -> None:
    """SIGHUP the watcher and wait until its published verdict says it
    enforces `new`'s endpoints, or that the reload failed."""
    asked = time.time()
    _signal(pid)
    wanted = [str(e) for e in new.endpoints]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        verdict = daemon.read_verdict(interface)
        if verdict is None or verdict.get("pid") != pid or not verdict["running"] or verdict.get("stopped"):
            raise EarlyfwError(f"earlyfw watch (pid {pid}) stopped before it reloaded", hint=_RESTART)
        reloaded = verdict.get("reloaded")
        if isinstance(reloaded, dict) and isinstance(reloaded.get("at"), float) and reloaded["at"] >= asked:
            if not reloaded.get("ok"):
                raise EarlyfwError(f"earlyfw watch (pid {pid}) refused the reload: {reloaded.get('error')}")
            if verdict.get("endpoints") == wanted:
                return
        time.sleep(0.05)
    raise EarlyfwError(f"earlyfw watch (pid {pid}) did not confirm the reload within {timeout:.0f}s", hint=_RESTART)


_RESTART = "the pins are unchanged; check `journalctl -u earlyfw-watch`, then refresh again"
