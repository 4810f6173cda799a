#!/usr/bin/env python3
"""How earlyfw's ruleset scales with the number of VPN endpoints, against one
iptables rule per endpoint (how IVPN's Linux firewall allows its hosts:
`iptables -A OUTPUT -d ADDR -p udp --dport PORT -j ACCEPT` each), measured in
the same run, in throwaway network namespaces.

For each size:
- render: `policy.render` of the blocked state (earlyfw only);
- load / reload: wall time of one atomic `nft -f` (earlyfw) or `iptables-restore`
  (the baseline, through Debian's nft-backed iptables) into an empty namespace,
  then over the loaded one; both include starting the tool (a few ms);
- per-packet cost of a UDP datagram from a Python loop:
  `accept`: to the LAST endpoint, the WireGuard hot path (every encrypted
  packet goes there): earlyfw does one set lookup, iptables walks every rule;
  `reject`: to a non-endpoint, which walks the whole list and is rejected;
  each against the same path with no ruleset (accept) or a reject-only
  ruleset (reject), so `+ns` is what the rules add.
Medians over --repeat runs. Needs root. Packets go only to a namespace this
script creates, whose ingress drops them.

    python3 bench/ruleset_scale.py [--quick] [--repeat 5] [--window 0.2]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

# Run as a script from anywhere: the repository root holds `tests.netns`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import netns

from earlyfw import policy
from earlyfw.config import Config, Endpoint, Transport, TunnelKind
from earlyfw.policy import State

SIZES = (1, 100, 1_000, 10_000, 100_000)
QUICK_SIZES = (1, 100, 1_000, 10_000)
FIRST_ENDPOINT = ipaddress.IPv4Address("198.18.0.1")  # RFC 2544 benchmarking range
PORT = 51820
MISS = ipaddress.IPv4Address("203.0.113.99")  # no endpoint: walks every rule, then rejected
VPN_DNS = ipaddress.IPv4Address("10.64.0.1")
REJECT_ONLY = "table inet baseline {\n chain o { type filter hook output priority 0; reject; }\n}\n"


def endpoints(n: int) -> list[ipaddress.IPv4Address]:
    return [FIRST_ENDPOINT + i for i in range(n)]


def earlyfw_script(n: int, repeat: int) -> tuple[str, float]:
    """The blocked state for `n` endpoints, and the median time to render it
    (the template is compiled once beforehand, as in a long-lived process)."""
    config = Config(
        tunnel_kind=TunnelKind.WIREGUARD,
        interface="wg0",
        endpoints=tuple(Endpoint(a, PORT, Transport.UDP) for a in endpoints(n)),
        dns_servers=(VPN_DNS,),
    )
    policy.render(config, State.BLOCKED)
    times = []
    for _ in range(repeat):
        begin = time.perf_counter()
        script = policy.render(config, State.BLOCKED)
        times.append(time.perf_counter() - begin)
    return script, statistics.median(times)


def iptables_script(n: int) -> str:
    rules = "".join(f"-A OUTPUT -d {a}/32 -p udp -m udp --dport {PORT} -j ACCEPT\n" for a in endpoints(n))
    return (
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT DROP [0:0]\n"
        "-A OUTPUT -o lo -j ACCEPT\n" + rules + "-A OUTPUT -j REJECT --reject-with icmp-admin-prohibited\nCOMMIT\n"
    )


@dataclass
class Bench:
    lab: netns.Lab
    pair: netns.ClientWorld
    workdir: Path
    repeat: int
    window: float

    @property
    def client(self) -> netns.Namespace:
        return self.pair.client

    def flush(self) -> None:
        self.client.exec(["nft", "flush", "ruleset"])

    def timed(self, argv: Sequence[str]) -> float:
        begin = time.perf_counter()
        self.client.exec(argv, timeout=900)
        return time.perf_counter() - begin

    def loads(self, argv: Sequence[str], repeat: int) -> tuple[float, float]:
        """Median (first load into an empty namespace, reload over it)."""
        first, again = [], []
        for _ in range(repeat):
            self.flush()
            first.append(self.timed(argv))
            again.append(self.timed(argv))
        return statistics.median(first), statistics.median(again)

    def per_packet(self, dst: ipaddress.IPv4Address) -> float:
        """Median CPU ns of the sending thread per datagram to `dst`: the
        output hook runs in the sender's system call, and CPU time, unlike
        wall time, does not count the time other processes hold the core."""
        payload = b"\0" * 64
        address = (str(dst), PORT)
        runs = []
        with self.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            send = sock.sendto
            for _ in range(self.repeat):
                count, begin = 0, time.thread_time_ns()
                deadline = time.perf_counter() + self.window
                while time.perf_counter() < deadline:
                    for _ in range(50):
                        with contextlib.suppress(OSError):  # EPERM: rejected by the output hook
                            send(payload, address)
                    count += 50
                runs.append((time.thread_time_ns() - begin) / count)
        return statistics.median(runs)


def setup(lab: netns.Lab, workdir: Path, repeat: int, window: float) -> Bench:
    pair = netns.client_world(lab, (), tag="bn")
    # world swallows every IP packet at ingress, the cheapest possible sink,
    # and the client never waits on ARP.
    pair.world.nft(
        "table netdev sink {\n"
        f" chain in {{ type filter hook ingress device {pair.world_if} priority 0; ether type {{ ip, ip6 }} drop; }}\n"
        "}\n"
    )
    mac = pair.world.mac(pair.world_if).hex(":")
    pair.client.ip("neigh", "replace", str(netns.WORLD_V4), "lladdr", mac, "dev", pair.client_if, "nud", "permanent")
    return Bench(lab, pair, workdir, repeat, window)


@dataclass
class Result:
    size: int
    render: float | None = None
    load: float | None = None
    reload: float | None = None
    accept: float | None = None
    reject: float | None = None
    note: str = ""


def measure(
    bench: Bench, size: int, script: str, *, argv: Callable[[Path], list[str]], name: str, repeat: int
) -> Result:
    path = bench.workdir / f"{name}-{size}"
    path.write_text(script)
    load, reload = bench.loads(argv(path), repeat)
    last = endpoints(size)[-1]
    return Result(size, None, load, reload, bench.per_packet(last), bench.per_packet(MISS))


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value / 1000:.1f} µs" if value >= 10_000 else f"{value:.0f} ns"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b <= 0 else f"{a / b:.1f}x"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def _loadavg() -> str:
    """Per-packet figures are only as quiet as the machine: print how busy it was."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} only")
    parser.add_argument("--repeat", type=int, default=7, help="runs per per-packet figure (median)")
    parser.add_argument("--window", type=float, default=0.2, help="seconds per per-packet run")
    parser.add_argument(
        "--iptables-max", type=int, default=100_000, help="largest iptables size to load (slow: minutes at 1e6)"
    )
    args = parser.parse_args(argv)
    netns.require_tools(["ip", "nft", "iptables-restore"])
    sizes = QUICK_SIZES if args.quick else SIZES
    began = time.perf_counter()
    load_before = _loadavg()

    with netns.Lab() as lab, TemporaryDirectory() as tmp:
        bench = setup(lab, Path(tmp), args.repeat, args.window)
        bench.flush()
        base_accept = bench.per_packet(endpoints(1)[0])
        bench.client.nft(REJECT_ONLY)
        base_reject = bench.per_packet(MISS)

        ours: dict[int, Result] = {}
        theirs: dict[int, Result] = {}
        for size in sizes:
            load_repeat = 1 if size >= 100_000 else 3
            script, render = earlyfw_script(size, load_repeat)
            ours[size] = measure(
                bench, size, script, argv=lambda p: ["nft", "-f", str(p)], name="earlyfw", repeat=load_repeat
            )
            ours[size].render = render
            if size <= args.iptables_max:
                theirs[size] = measure(
                    bench,
                    size,
                    iptables_script(size),
                    argv=lambda p: ["iptables-restore", str(p)],
                    name="iptables",
                    repeat=load_repeat,
                )
            else:
                theirs[size] = Result(size, note=f"not measured (over --iptables-max {args.iptables_max})")
            print(f"measured {size} endpoints ({time.perf_counter() - began:.0f} s so far)", file=sys.stderr)
        bench.flush()

    print(f"earlyfw ruleset scale: {len(sizes)} sizes, per-packet medians of {args.repeat} x {args.window} s")
    print(f"load average at the start: {load_before}, at the end: {_loadavg()} ({os.cpu_count()} CPUs)")
    print(f"baseline per packet: {fmt(base_accept, 'ns')} with no ruleset, {fmt(base_reject, 'ns')} reject-only")
    table(
        "Render and atomic load (load into an empty netns / reload over the loaded table)",
        ["endpoints", "earlyfw render", "nft -f", "nft -f again", "iptables-restore", "again", "load ratio"],
        [
            [
                f"{s:,}",
                fmt(ours[s].render, "s"),
                fmt(ours[s].load, "s"),
                fmt(ours[s].reload, "s"),
                fmt(theirs[s].load, "s") if theirs[s].load is not None else theirs[s].note,
                fmt(theirs[s].reload, "s"),
                ratio(theirs[s].load, ours[s].load),
            ]
            for s in sizes
        ],
    )

    def extra(value: float | None, base: float) -> str:
        if value is None:
            return "-"
        added = value - base  # below zero: the rules cost less than the run-to-run noise
        return f"{fmt(value, 'ns')} ({'+' if added >= 0 else '-'}{fmt(abs(added), 'ns')})"

    table(
        "Per-packet cost (ns per datagram; + = added by the rules; ratio = iptables / earlyfw total)",
        ["endpoints", "accept earlyfw", "accept iptables", "ratio", "reject earlyfw", "reject iptables", "ratio"],
        [
            [
                f"{s:,}",
                extra(ours[s].accept, base_accept),
                extra(theirs[s].accept, base_accept),
                ratio(theirs[s].accept, ours[s].accept),
                extra(ours[s].reject, base_reject),
                extra(theirs[s].reject, base_reject),
                ratio(theirs[s].reject, ours[s].reject),
            ]
            for s in sizes
        ],
    )
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
