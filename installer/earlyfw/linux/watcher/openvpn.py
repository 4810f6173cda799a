"""A client for OpenVPN's management interface (a unix socket; see OpenVPN's
doc/management-notes.txt), reduced to what the watcher needs: the state.

After connecting it sends `state on all`, which atomically turns on real-time
`>STATE:` notifications and prints the state history ending in `END`, so the
current state is known at once and no change can slip between the two.
A state line is: unix-time,NAME,description,tun-local-ip,remote-ip,remote-port,...
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from earlyfw.config import IPAddress
from earlyfw.handshake import SourceError, parse_endpoint

CONNECTED = "CONNECTED"
# The states in which OpenVPN is taking the tunnel down or rebuilding it.
LOSING = frozenset({"RECONNECTING", "EXITING"})
_MAX_LINE = 1 << 16


@dataclass(frozen=True)
class StateEvent:
    timestamp: int  # OpenVPN's own clock, whole seconds
    name: str
    description: str
    remote: tuple[IPAddress, int] | None
    live: bool  # a real-time notification, not history


def parse_state(line: str) -> StateEvent | None:
    """A `>STATE:` notification or a history line of `state all`; None for
    anything else (banners, SUCCESS:, END, >LOG:, ...)."""
    live = line.startswith(">STATE:")
    text = line.removeprefix(">STATE:")
    fields = text.split(",")
    if len(fields) < 2 or not fields[0].isdigit() or not fields[1].isupper():
        return None
    remote = None
    if len(fields) >= 6 and fields[4] and fields[5].isdigit():
        try:
            remote = parse_endpoint(f"[{fields[4]}]:{fields[5]}")
        except SourceError:
            remote = None
    return StateEvent(int(fields[0]), fields[1], fields[2] if len(fields) > 2 else "", remote, live)


class Management:
    """A non-blocking connection to the management socket, for a selector."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self._buffer = b""
        self.problem: str | None = None

    def connect(self) -> bool:
        self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(1.0)
            sock.connect(str(self.path))
            sock.sendall(b"state on all\n")
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            self.problem = f"management interface {self.path}: {e.strerror or e}"
            return False
        self.sock = sock
        self.problem = None
        return True

    def fileno(self) -> int | None:
        return self.sock.fileno() if self.sock else None

    def read(self) -> list[StateEvent]:
        """Every state line that arrived; on EOF the connection is closed."""
        if self.sock is None:
            return []
        events: list[StateEvent] = []
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as e:
                self.close(f"management interface {self.path}: {e.strerror or e}")
                break
            if not chunk:
                self.close(f"management interface {self.path} closed (OpenVPN stopped)")
                break
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > _MAX_LINE:
            self.close(f"management interface {self.path}: line too long")
        for raw in lines:
            line = raw.decode(errors="replace").rstrip("\r")
            if line.startswith("ENTER PASSWORD:"):
                self.close(
                    f"management interface {self.path} asks for a password, which earlyfw does not send; "
                    "protect the socket by its file mode instead"
                )
                break
            event = parse_state(line)
            if event is not None:
                events.append(event)
        return events

    def close(self, problem: str | None = None) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._buffer = b""
        if problem:
            self.problem = problem
