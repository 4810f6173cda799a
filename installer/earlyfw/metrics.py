"""earlyfw's health for fleet monitoring: `earlyfw status --json` as a
versioned document, and the Prometheus text format node_exporter's textfile
collector reads. Both are built from the status data (`Status.to_json()`) in
one place, so the status internals can grow without changing either schema."""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from earlyfw.config import Config, TunnelKind
from earlyfw.errors import EarlyfwError
from earlyfw.linux.watcher.sources import SourceKind, make_source
from earlyfw.policy import State
from earlyfw.run import Runner

# Bumped only when a key changes meaning or goes away; new keys may appear.
SCHEMA = 1


def status_document(status: Mapping[str, Any], *, last_handshake: float | None) -> dict[str, Any]:
    """`earlyfw status --json`: the status data plus the schema version and
    the newest tunnel handshake (seconds since the epoch, or null)."""
    return {"schema": SCHEMA, **status, "last_handshake": last_handshake}


def last_handshake(config: Config, runner: Runner) -> float | None:
    """The newest handshake of the WireGuard tunnel's peers; None when there was
    none, the interface is down, or the tunnel is not WireGuard."""
    if config.tunnel_kind is not TunnelKind.WIREGUARD:
        return None
    source = make_source(SourceKind.AUTO, config.interface, runner)
    try:
        peers = source.peers()
    except (EarlyfwError, OSError):
        return None
    finally:
        source.close()
    return max((p.last_handshake for p in peers if p.last_handshake is not None), default=None)


def _number(value: float) -> str:
    """Exact for counters (ints beyond 1e6 included); +Inf as Prometheus spells it."""
    if isinstance(value, int):
        return str(value)
    return "+Inf" if math.isinf(value) else repr(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(document: Mapping[str, Any], *, now: float) -> str:
    """The Prometheus text exposition of a status document (status_document)."""
    out: list[str] = []

    def family(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

    family("earlyfw_table_present", "gauge", "1 when table inet earlyfw is loaded.",
           [("", int(bool(document["present"])))])  # fmt: skip
    family("earlyfw_table_intact", "gauge", "1 when the loaded table is exactly a state the config renders.",
           [("", int(bool(document["intact"])))])  # fmt: skip
    family("earlyfw_state", "gauge", "1 for the state the loaded table is in (none: absent or altered).",
           [(f'{{state="{s}"}}', int(document["state"] == str(s))) for s in State])  # fmt: skip
    counters = sorted(document["counters"].items())
    family("earlyfw_packets_total", "counter", "Packets counted by earlyfw's named counters.",
           [(f'{{counter="{_escape(n)}"}}', c["packets"]) for n, c in counters])  # fmt: skip
    family("earlyfw_bytes_total", "counter", "Bytes counted by earlyfw's named counters.",
           [(f'{{counter="{_escape(n)}"}}', c["bytes"]) for n, c in counters])  # fmt: skip
    handshake = document.get("last_handshake")
    family("earlyfw_last_handshake_age_seconds", "gauge",
           "Seconds since the tunnel's newest handshake (+Inf: none, or not WireGuard).",
           [("", now - handshake if handshake is not None else float("inf"))])  # fmt: skip
    family("earlyfw_warnings", "gauge", "Warnings `earlyfw status` reports.", [("", len(document["warnings"]))])
    return "\n".join(out) + "\n"


def write_textfile(path: Path, text: str) -> None:
    """Atomically, as the textfile collector wants: it must never read half a file."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def now() -> float:
    return time.time()
