"""Exec a command only if the current network namespace holds nothing but
loopback: the last check before QEMU starts, so a mistake in how the harness
was launched cannot put a guest on a real network.

Usage (inside `unshare --map-root-user --net`):
    python3 -m qemu.isolated -- CMD...
    python3 -m qemu.isolated --wireguard-peer CONF --wireguard-address CIDR -- CMD...

With a peer, the check runs first all the same; then a wireguard-go peer
(configured from CONF with `wg setconf`) comes up in this same namespace, and
CMD runs as a child, so the peer can be stopped and its UAPI socket removed
when it ends. Slirp hands the guest's datagrams for the gateway to this
namespace's loopback, where the peer listens.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

# wireguard-go's UAPI sockets live in the host's /var/run/wireguard (only the
# network namespace is private), so the peer gets a name no other run uses.
UAPI_DIR = Path("/var/run/wireguard")
PR_SET_PDEATHSIG = 1
STARTUP_TIMEOUT = 10.0
USAGE = "usage: python3 -m qemu.isolated [--wireguard-peer CONF --wireguard-address CIDR] -- COMMAND..."


@dataclass(frozen=True)
class Peer:
    conf: Path
    address: str


def parse(argv: list[str]) -> tuple[Peer | None, list[str]] | None:
    options: dict[str, str] = {}
    while argv and argv[0] != "--":
        if argv[0] not in ("--wireguard-peer", "--wireguard-address") or len(argv) < 2:
            return None
        options[argv[0]] = argv[1]
        argv = argv[2:]
    command = argv[1:] if argv[:1] == ["--"] else argv
    if not command:
        return None
    if not options:
        return None, command
    if set(options) != {"--wireguard-peer", "--wireguard-address"}:
        return None
    return Peer(Path(options["--wireguard-peer"]), options["--wireguard-address"]), command


def main(argv: list[str]) -> int:
    parsed = parse(argv)
    if parsed is None:
        print(USAGE, file=sys.stderr)
        return 2
    peer, command = parsed
    interfaces = sorted(name for _, name in socket.if_nameindex())
    if interfaces != ["lo"]:
        print(f"refusing to run: this network namespace has {interfaces}, not only lo", file=sys.stderr)
        return 99
    if peer is None:
        os.execvp(command[0], command)  # noqa: S606 - argv is the harness's own QEMU command line
    return with_peer(peer, command)


def _die_with_parent() -> None:
    # If this supervisor is killed outright, the peer goes too rather than
    # keep the namespace (and its socket in /var/run/wireguard) alive.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _run(argv: list[str]) -> None:
    print("+ " + " ".join(argv), flush=True)
    subprocess.run(argv, check=True)


def with_peer(peer: Peer, command: list[str]) -> int:
    name = f"efwpeer{os.getpid()}"
    uapi = UAPI_DIR / f"{name}.sock"
    _run(["ip", "link", "set", "lo", "up"])
    wireguard = subprocess.Popen(
        ["wireguard-go", "-f", name],
        env={**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "verbose"},
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads in this process
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not uapi.exists():
            if wireguard.poll() is not None or time.monotonic() > deadline:
                print(f"wireguard-go did not create {uapi}", file=sys.stderr)
                return 98
            time.sleep(0.05)
        _run(["wg", "setconf", name, str(peer.conf)])
        _run(["ip", "address", "add", peer.address, "dev", name])
        _run(["ip", "link", "set", name, "up"])
        code = _supervise(command)
        _run(["wg", "show", name, "dump"])
    finally:
        wireguard.terminate()
        try:
            wireguard.wait(5)
        except subprocess.TimeoutExpired:
            wireguard.kill()
            wireguard.wait()
        uapi.unlink(missing_ok=True)
    if code < 0:
        # Exit as QEMU did, so the harness sees the signal it sent.
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _supervise(command: list[str]) -> int:
    child = subprocess.Popen(command)

    def forward(signum: int, frame: FrameType | None) -> None:
        child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
