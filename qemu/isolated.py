"""Exec a command only if the current network namespace holds nothing but
loopback: the last check before QEMU starts, so a mistake in how the harness
was launched cannot put a guest on a real network.

Usage (inside `unshare --map-root-user --net`): python3 -m qemu.isolated -- CMD...
"""

from __future__ import annotations

import os
import socket
import sys


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python3 -m qemu.isolated -- COMMAND...", file=sys.stderr)
        return 2
    interfaces = sorted(name for _, name in socket.if_nameindex())
    if interfaces != ["lo"]:
        print(f"refusing to run: this network namespace has {interfaces}, not only lo", file=sys.stderr)
        return 99
    os.execvp(argv[0], argv)  # noqa: S606 - argv is the harness's own QEMU command line


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
