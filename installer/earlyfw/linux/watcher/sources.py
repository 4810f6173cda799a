"""Where the watcher reads a WireGuard tunnel's peers from.

Three ways to ask, as `wg` itself has them:
  UapiSource     userspace implementations (wireguard-go, boringtun): the text
                 protocol on /var/run/wireguard/IF.sock ("get=1").
  NetlinkSource  the kernel module: generic netlink WG_CMD_GET_DEVICE, through
                 pyroute2.
  WgShowSource   `wg show IF dump` through the Runner: the kernel module's
                 peers when `wg` is installed (or pyroute2 is not).
`AutoSource` picks per call, so a tunnel can come, go and change
implementation while the watcher runs; for the kernel module it prefers `wg`
when installed, so no read waits for pyroute2's import. What they read
(`Peer`) and the `wg show dump` format are WireGuard's on every platform
(earlyfw.handshake). Each read also notes the tunnel's listen port
(`listen_port`), the one UDP port only its own socket can hold.
"""

from __future__ import annotations

import base64
import errno
import importlib.util
import shutil
import socket
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from earlyfw.errors import EarlyfwError
from earlyfw.handshake import Peer, SourceError, handshake_time, parse_endpoint, parse_wg_dump
from earlyfw.run import Runner

UAPI_DIR = Path("/var/run/wireguard")
SYS_CLASS_NET = Path("/sys/class/net")
UAPI_TIMEOUT = 2.0


class InterfaceGone(EarlyfwError):
    """The tunnel interface does not exist (now)."""


_UAPI_NUMBERS = {
    "last_handshake_time_sec": "sec",
    "last_handshake_time_nsec": "nsec",
    "persistent_keepalive_interval": "keepalive",
    "rx_bytes": "rx",
    "tx_bytes": "tx",
}


def parse_uapi(text: str) -> tuple[Peer, ...]:
    """The reply to `get=1`: interface keys, then one block per peer, each
    opening with public_key=, and a final errno=."""
    peers: list[Peer] = []
    current: dict[str, Any] | None = None
    status: str | None = None

    def close() -> None:
        if current is not None:
            peers.append(
                Peer(
                    current["key"],
                    current.get("endpoint"),
                    handshake_time(current.get("sec", 0), current.get("nsec", 0)),
                    current.get("keepalive", 0),
                    current.get("rx", 0),
                    current.get("tx", 0),
                )
            )

    for line in text.splitlines():
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise SourceError(f"UAPI: unexpected line {line!r}")
        if key == "errno":
            status = value
        elif key == "public_key":
            close()
            try:
                current = {"key": base64.b64encode(bytes.fromhex(value)).decode()}
            except ValueError:
                raise SourceError(f"UAPI: bad public key {value!r}") from None
        elif current is None:
            continue  # the interface's own keys
        elif key == "endpoint":
            current["endpoint"] = parse_endpoint(value)
        elif key in _UAPI_NUMBERS:
            if not value.isdigit():
                raise SourceError(f"UAPI: {key}={value!r} is not a number")
            current[_UAPI_NUMBERS[key]] = int(value)
    close()
    if status is None:
        raise SourceError("UAPI: reply ended without errno=")
    if status != "0":
        raise SourceError(f"UAPI: errno={status}")
    return tuple(peers)


def listen_port(value: object, where: str) -> int | None:
    """A listen port as a source reports it; 0 (no socket bound) is None."""
    text = str(value)
    if not (text.isascii() and text.isdigit()) or int(text) >= 1 << 16:  # isdigit alone takes '²'
        raise SourceError(f"{where}: listen port {value!r} is not a port")
    return int(text) or None


def uapi_listen_port(text: str) -> int | None:
    """`listen_port=` among the interface's keys, before the first peer."""
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "public_key":
            break
        if key == "listen_port":
            return listen_port(value, "UAPI")
    return None


def dump_listen_port(text: str) -> int | None:
    """The third field of `wg show IF dump`'s interface line (private key,
    public key, listen port, fwmark); parse_wg_dump has checked its shape."""
    interface = next(line for line in text.splitlines() if line)
    return listen_port(interface.split("\t")[2], "wg show dump")


def netlink_listen_port(messages: Iterable[Any]) -> int | None:
    """WGDEVICE_A_LISTEN_PORT of the first WG_CMD_GET_DEVICE reply (each
    carries the device's attributes)."""
    for message in messages:
        return listen_port(message.get_attr("WGDEVICE_A_LISTEN_PORT") or 0, "netlink")
    return None


def peers_from_netlink(messages: Iterable[Any]) -> tuple[Peer, ...]:
    """Peers from pyroute2's decoded WG_CMD_GET_DEVICE replies (a device with
    many peers arrives as several messages)."""
    peers = []
    for message in messages:
        for peer in message.get_attr("WGDEVICE_A_PEERS") or ():
            key = peer.get_attr("WGPEER_A_PUBLIC_KEY")
            if key is None:
                raise SourceError("netlink: peer without a public key")
            endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
            handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME") or {"tv_sec": 0, "tv_nsec": 0}
            # pyroute2 hands the key over already base64-encoded.
            value = key.get("value") if isinstance(key, dict) else key
            peers.append(
                Peer(
                    value.decode() if isinstance(value, bytes) else str(value),
                    parse_endpoint(f"[{endpoint['addr']}]:{endpoint['port']}") if endpoint else None,
                    handshake_time(int(handshake["tv_sec"]), int(handshake["tv_nsec"])),
                    int(peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0),
                    int(peer.get_attr("WGPEER_A_RX_BYTES") or 0),
                    int(peer.get_attr("WGPEER_A_TX_BYTES") or 0),
                )
            )
    return tuple(peers)


class PeerSource(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def listen_port(self) -> int | None:
        """The tunnel's listen port as of the last peers() (None: not known)."""

    @property
    def fast_poll(self) -> float:
        """How often a blocked watcher may ask while it waits for a handshake."""

    def peers(self) -> tuple[Peer, ...]: ...

    def set_keepalive(self, public_key: str, seconds: int) -> None:
        """Set one peer's persistent keepalive at runtime (only if the peer
        still exists): nothing on disk changes."""

    def close(self) -> None: ...


class UapiSource:
    name = "uapi"
    fast_poll = 0.02

    def __init__(self, interface: str, directory: Path = UAPI_DIR) -> None:
        self.path = directory / f"{interface}.sock"
        self.listen_port: int | None = None

    def _ask(self, request: bytes) -> str:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(UAPI_TIMEOUT)
                sock.connect(str(self.path))
                sock.sendall(request)
                reply = b""
                while not reply.endswith(b"\n\n"):
                    chunk = sock.recv(1 << 16)
                    if not chunk:
                        break
                    reply += chunk
        except (FileNotFoundError, ConnectionRefusedError):
            raise InterfaceGone(f"{self.path}: no WireGuard UAPI socket") from None
        except OSError as e:
            raise SourceError(f"{self.path}: {e.strerror or e}") from None
        return reply.decode(errors="replace")

    def peers(self) -> tuple[Peer, ...]:
        reply = self._ask(b"get=1\n\n")
        peers = parse_uapi(reply)
        self.listen_port = uapi_listen_port(reply)
        return peers

    def set_keepalive(self, public_key: str, seconds: int) -> None:
        key = _key_hex(public_key)
        reply = self._ask(
            f"set=1\npublic_key={key}\nupdate_only=true\npersistent_keepalive_interval={seconds}\n\n".encode()
        )
        if reply.strip() != "errno=0":
            raise SourceError(f"UAPI set: {reply.strip() or 'no reply'}")

    def close(self) -> None:
        pass


def _key_hex(public_key: str) -> str:
    try:
        raw = base64.b64decode(public_key, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise SourceError(f"bad public key {public_key!r}")
    return raw.hex()


def wg_set_keepalive(runner: Runner, interface: str, public_key: str, seconds: int) -> None:
    """The kernel's way, through `wg set`: a fork and exec, but only when the
    watcher starts a handshake, and no netlink library to import for it."""
    _key_hex(public_key)  # never hand `wg` anything but a well-formed key
    result = runner.run(["wg", "set", interface, "peer", public_key, "persistent-keepalive", str(seconds)], check=False)
    if result.returncode != 0:
        raise SourceError(f"wg set {interface} peer … persistent-keepalive {seconds}: {result.stderr.strip()}")


class NetlinkSource:
    name = "netlink"
    fast_poll = 0.02

    def __init__(self, interface: str, runner: Runner | None = None) -> None:
        self.interface = interface
        self.runner = runner or Runner(verbose=False)
        self._wg: Any = None
        self.listen_port: int | None = None

    def peers(self) -> tuple[Peer, ...]:
        try:
            # Imported on first use only: pyroute2 is optional, and its asyncio
            # core costs memory a userspace-WireGuard watcher never needs.
            from pyroute2 import WireGuard  # noqa: PLC0415
            from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415
        except ImportError:
            raise SourceError("pyroute2 is not installed", hint="pip install pyroute2, or let `wg` be used") from None
        gone = InterfaceGone(f"{self.interface}: no UAPI socket and no kernel WireGuard device")
        if self._wg is None:
            try:
                self._wg = WireGuard()
            except NetlinkError as e:
                # No "wireguard" generic netlink family: no kernel module.
                if e.code == errno.ENOENT:
                    raise gone from None
                raise SourceError(f"WireGuard netlink: {e}") from None
        try:
            messages = list(self._wg.info(self.interface))
        except NetlinkError as e:
            self.close()
            if e.code in (errno.ENODEV, errno.ENOENT, errno.EOPNOTSUPP):
                raise gone from None
            raise SourceError(f"{self.interface}: WireGuard netlink: {e}") from None
        peers = peers_from_netlink(messages)
        self.listen_port = netlink_listen_port(messages)
        return peers

    def set_keepalive(self, public_key: str, seconds: int) -> None:
        wg_set_keepalive(self.runner, self.interface, public_key, seconds)

    def close(self) -> None:
        if self._wg is not None:
            self._wg.close()
            self._wg = None


class WgShowSource:
    name = "wg"
    # A fork and exec per poll: ask less often.
    fast_poll = 0.2

    def __init__(self, interface: str, runner: Runner) -> None:
        self.interface = interface
        self.runner = runner
        self.listen_port: int | None = None

    def peers(self) -> tuple[Peer, ...]:
        result = self.runner.run(["wg", "show", self.interface, "dump"], check=False)
        if result.returncode != 0:
            if "No such device" in result.stderr:
                raise InterfaceGone(f"{self.interface}: no such WireGuard device")
            raise SourceError(f"wg show {self.interface} dump: {result.stderr.strip()}")
        peers = parse_wg_dump(result.stdout)
        self.listen_port = dump_listen_port(result.stdout)
        return peers

    def set_keepalive(self, public_key: str, seconds: int) -> None:
        wg_set_keepalive(self.runner, self.interface, public_key, seconds)

    def close(self) -> None:
        pass


class SourceKind(StrEnum):
    AUTO = "auto"
    UAPI = "uapi"
    NETLINK = "netlink"
    WG = "wg"


def _pyroute2_available() -> bool:
    return importlib.util.find_spec("pyroute2") is not None


class AutoSource:
    """Per call: the UAPI socket if the interface has one (userspace), else
    kernel netlink through pyroute2, else `wg show`."""

    def __init__(
        self,
        interface: str,
        runner: Runner,
        *,
        uapi_dir: Path = UAPI_DIR,
        sys_class_net: Path = SYS_CLASS_NET,
    ) -> None:
        self.interface = interface
        self.sys_class_net = sys_class_net
        self.uapi = UapiSource(interface, uapi_dir)
        # The kernel module through `wg` where it is installed: nothing to
        # import. pyroute2's import (its package loads all of it: 0.25 s of
        # CPU here, 3.4 s under QEMU TCG) would fall on the first read, which
        # at boot comes as the tunnel handshakes, and hold the relax back.
        self.kernel: PeerSource = (
            WgShowSource(interface, runner)
            if shutil.which("wg") is not None or not _pyroute2_available()
            else NetlinkSource(interface, runner)
        )
        self.current: PeerSource = self.uapi

    @property
    def name(self) -> str:
        return self.current.name

    @property
    def fast_poll(self) -> float:
        return self.current.fast_poll

    @property
    def listen_port(self) -> int | None:
        return self.current.listen_port

    def peers(self) -> tuple[Peer, ...]:
        if not (self.sys_class_net / self.interface).exists():
            raise InterfaceGone(f"interface {self.interface} does not exist")
        self.current = self.uapi if self.uapi.path.exists() else self.kernel
        try:
            return self.current.peers()
        except SourceError:
            # A userspace device going away removes its socket before its link:
            # the kernel reader then fails on a link that is about to vanish.
            if not (self.sys_class_net / self.interface).exists():
                raise InterfaceGone(f"interface {self.interface} does not exist") from None
            raise

    def set_keepalive(self, public_key: str, seconds: int) -> None:
        self.current.set_keepalive(public_key, seconds)

    def close(self) -> None:
        self.kernel.close()


def make_source(kind: SourceKind, interface: str, runner: Runner) -> PeerSource:
    match kind:
        case SourceKind.UAPI:
            return UapiSource(interface)
        case SourceKind.NETLINK:
            return NetlinkSource(interface, runner)
        case SourceKind.WG:
            return WgShowSource(interface, runner)
        case SourceKind.AUTO:
            return AutoSource(interface, runner)
