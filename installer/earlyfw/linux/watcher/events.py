"""Kernel notifications the watcher sleeps on, read from netlink sockets.

nftables: the NFNLGRP_NFTABLES multicast group, the same feed `nft monitor`
prints. The watcher reads it itself rather than running `nft monitor` because
it needs three things the group carries and the text drops or garbles: the
table each change touched, the end of each transaction (NFT_MSG_NEWGEN), and
the pid and name of the process that made it, so its own changes are ignored
and everyone else's are named in the log. It also saves a process (and its
RSS) and the text parsing: a removed table is noticed within microseconds.

links: RTNLGRP_LINK, so a tunnel interface appearing or disappearing is acted
on at once instead of at the next poll.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7
RTNLGRP_LINK = 1
SO_RCVBUFFORCE = 33  # not exported by the socket module

NLMSG_OVERRUN = 4
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFT_MSG_TRACE = 17
# Every nftables object message (table, chain, rule, set, element, object,
# flowtable) carries its table's name as attribute 1.
NFTA_TABLE = 1
NFTA_GEN_PROC_PID = 2
NFTA_GEN_PROC_NAME = 3
RTM_NEWLINK = 16
RTM_DELLINK = 17

_NLMSGHDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_NFGENMSG_SIZE = 4
_NLA_TYPE_MASK = 0x3FFF
RECEIVE_BUFFER = 4 << 20

# A generation whose changes were lost (the socket's buffer overflowed): the
# watcher must assume its tables were among them.
UNKNOWN = "*"


@dataclass(frozen=True)
class Generation:
    """One committed nftables transaction."""

    tables: frozenset[str]
    pid: int
    process: str

    def touches(self, names: frozenset[str]) -> bool:
        return UNKNOWN in self.tables or bool(self.tables & names)

    def who(self) -> str:
        return f"pid {self.pid} ({self.process})" if self.pid else "an unknown process"


def _align(n: int) -> int:
    return (n + 3) & ~3


def messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink message in one datagram."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            return
        yield kind, data[offset + _NLMSGHDR.size : offset + length]
        offset += _align(length)


def attributes(payload: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _NLA.size <= len(payload):
        length, kind = _NLA.unpack_from(payload, offset)
        if length < _NLA.size:
            return
        yield kind & _NLA_TYPE_MASK, payload[offset + _NLA.size : offset + length]
        offset += _align(length)


def _string(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode(errors="replace")


class NftablesParser:
    """Turns the group's messages into committed generations."""

    def __init__(self) -> None:
        self._touched: set[str] = set()

    def feed(self, data: bytes) -> list[Generation]:
        done: list[Generation] = []
        for kind, payload in messages(data):
            if kind == NLMSG_OVERRUN:
                self._touched.add(UNKNOWN)
                continue
            if kind >> 8 != NFNL_SUBSYS_NFTABLES or (kind & 0xFF) == NFT_MSG_TRACE:
                continue
            attrs = dict(attributes(payload[_NFGENMSG_SIZE:]))
            if kind & 0xFF == NFT_MSG_NEWGEN:
                pid_raw = attrs.get(NFTA_GEN_PROC_PID, b"")
                pid = struct.unpack(">I", pid_raw[:4])[0] if len(pid_raw) >= 4 else 0
                name = _string(attrs.get(NFTA_GEN_PROC_NAME, b"?"))
                done.append(Generation(frozenset(self._touched), pid, name))
                self._touched.clear()
            elif NFTA_TABLE in attrs:
                self._touched.add(_string(attrs[NFTA_TABLE]))
        return done

    def overflowed(self) -> Generation:
        self._touched.clear()
        return Generation(frozenset({UNKNOWN}), 0, "?")


def _subscribe(protocol: int, group: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, protocol)
    try:
        # FORCE needs CAP_NET_ADMIN, which the watcher has; fall back quietly.
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.bind((0, 0))
    sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
    return sock


def _drain(sock: socket.socket) -> Iterator[bytes | None]:
    """Each pending datagram; None where the kernel dropped some (ENOBUFS)."""
    while True:
        try:
            yield sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise
            yield None


class NftablesEvents:
    def __init__(self) -> None:
        self.sock = _subscribe(NETLINK_NETFILTER, NFNLGRP_NFTABLES)
        self.parser = NftablesParser()

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[Generation]:
        found: list[Generation] = []
        for data in _drain(self.sock):
            found += self.parser.feed(data) if data is not None else [self.parser.overflowed()]
        return found

    def close(self) -> None:
        self.sock.close()


class LinkEvents:
    def __init__(self) -> None:
        self.sock = _subscribe(NETLINK_ROUTE, RTNLGRP_LINK)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> bool:
        """True if any interface appeared, changed or disappeared."""
        changed = False
        for data in _drain(self.sock):
            changed = changed or data is None or any(k in (RTM_NEWLINK, RTM_DELLINK) for k, _ in messages(data))
        return changed

    def close(self) -> None:
        self.sock.close()


# NFLOG (nfnetlink_log), for the wake table's `log group`.
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_META = 1
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
# "EF": the NFLOG group the wake table logs to (groups are per network namespace).
WAKE_GROUP = 0x4546


def _nla(kind: int, payload: bytes) -> bytes:
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


class HandshakeLog:
    """An NFLOG group binding: readable when the wake table logged a
    handshake packet from an endpoint. Only the metadata is copied; the
    watcher just needs to know that it happened."""

    def __init__(self, group: int = WAKE_GROUP) -> None:
        self.group = group
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            self.sock.settimeout(2.0)
            self._configure(1, _nla(NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_BIND)))
            # Each packet at once: the kernel's default batches up to 100, or a second.
            self._configure(
                2,
                _nla(NFULA_CFG_MODE, struct.pack(">IBx", 0, NFULNL_COPY_META))
                + _nla(NFULA_CFG_QTHRESH, struct.pack(">I", 1)),
            )
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise

    def _configure(self, seq: int, attrs: bytes) -> None:
        body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(self.group)) + attrs
        kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body)
        for reply_kind, payload in messages(self.sock.recv(1 << 16)):
            if reply_kind == NLMSG_ERROR:
                code = -struct.unpack_from("=i", payload)[0]
                if code:
                    raise OSError(code, f"NFLOG group {self.group}: {errno.errorcode.get(code, code)}")

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> int:
        """How many logged packets arrived (drained)."""
        count = 0
        for data in _drain(self.sock):
            if data is None:
                count += 1
                continue
            count += sum(1 for kind, _ in messages(data) if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET)
        return count

    def close(self) -> None:
        self.sock.close()
