"""An in-process libnftables context.

The watcher talks to nftables through libnftables rather than through the `nft`
binary (the Runner seam) for two reasons. The guard tables carry the `owner`
flag, which ties a table to the netlink socket that created it: only a context
that stays open for the watcher's whole life can create, replace and keep them.
And a state change then costs one batch on an open socket, about 5 ms, instead
of a fork and exec of `nft` on the path between a handshake and the relax.

Every call is one `nft_run_cmd_from_buffer`, that is one netlink batch: one
atomic transaction, exactly as `nft -f` would make it.
"""

from __future__ import annotations

import ctypes

from earlyfw.errors import CommandError
from earlyfw.linux.nft import TableCounters, parse_counters

LIBRARY = "libnftables.so.1"

# enum nft_ctx_output_flags in <nftables/libnftables.h>
OUTPUT_STATELESS = 1 << 2
OUTPUT_JSON = 1 << 4


def _load(name: str) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        raise CommandError(
            f"cannot load {name}: {e}",
            hint="install libnftables (Debian/Ubuntu: libnftables1; Fedora/Arch: part of nftables)",
        ) from None
    void_p = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_new.restype = void_p
    lib.nft_ctx_free.argtypes = [void_p]
    lib.nft_ctx_free.restype = None
    lib.nft_ctx_buffer_output.argtypes = [void_p]
    lib.nft_ctx_buffer_error.argtypes = [void_p]
    lib.nft_ctx_get_output_buffer.argtypes = [void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_output_set_flags.argtypes = [void_p, ctypes.c_uint]
    lib.nft_ctx_output_set_flags.restype = None
    lib.nft_run_cmd_from_buffer.argtypes = [void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    return lib


class Libnftables:
    """One libnftables context, and so one netlink socket, for the watcher's life."""

    def __init__(self, library: str = LIBRARY) -> None:
        self._lib = _load(library)
        self._ctx = self._lib.nft_ctx_new(0)
        if not self._ctx:
            raise CommandError("nft_ctx_new failed")
        self._lib.nft_ctx_buffer_output(self._ctx)
        self._lib.nft_ctx_buffer_error(self._ctx)

    def close(self) -> None:
        """Closing the context closes its socket, and the kernel drops every
        table it owned in the same instant."""
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def run(self, commands: str, *, flags: int = 0) -> str:
        if not self._ctx:
            raise CommandError("libnftables context is closed")
        self._lib.nft_ctx_output_set_flags(self._ctx, flags)
        code = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
        error = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if code != 0:
            lines = error.strip().splitlines()
            raise CommandError(
                "nft: " + (lines[0] if lines else f"command failed ({code})"),
                hint="\n".join(lines[1:4]) or None,
            )
        return output

    def list_table(self, family: str, name: str) -> str | None:
        """The table as `nft -s list table` prints it, or None if it does not exist."""
        try:
            return self.run(f"list table {family} {name}", flags=OUTPUT_STATELESS)
        except CommandError as e:
            if "No such file or directory" in str(e):
                return None
            raise

    def counters(self) -> TableCounters:
        """Every named counter, by table. A counter listing prints no table
        object, so it is safe from nft 1.0.6's JSON bug with owned tables
        (see earlyfw.linux.nft)."""
        return parse_counters(self.run("list counters", flags=OUTPUT_JSON))
