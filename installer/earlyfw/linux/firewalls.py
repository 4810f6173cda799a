"""Other firewalls on the same machine, and what `earlyfw status` says about them.

No other table can open what earlyfw's table drops (a packet must pass every
base chain), so the danger is not their rules but their loaders: nftables.service
loads a file that usually begins with `flush ruleset`, which deletes earlyfw's
table too. The systemd target's drop-in makes that load one transaction with
earlyfw's table; these checks say when that protection is missing.
"""

from __future__ import annotations

from collections.abc import Iterable

from earlyfw.root import Root

UNIT_DIR = "/etc/systemd/system"
NFTABLES_UNIT = "nftables.service"
# The drop-in the systemd target writes (see earlyfw.linux.systemd).
NFTABLES_DROP_IN = f"{UNIT_DIR}/{NFTABLES_UNIT}.d/earlyfw.conf"
# Where the distributions keep the ruleset nftables.service loads (Fedora
# under /etc/sysconfig).
NFTABLES_CONFS = ("/etc/nftables.conf", "/etc/sysconfig/nftables.conf")

# Tables iptables-nft (and ebtables/arptables-nft) create; they do not flush
# anyone else's table.
IPTABLES_NFT_TABLES = {
    f"{family} {name}" for family in ("ip", "ip6") for name in ("filter", "nat", "mangle", "raw", "security")
} | {"arp filter", "bridge filter", "bridge nat", "bridge broute"}


def nftables_conf(root: Root) -> str:
    """The file the system's nftables.service loads; Debian's and Arch's path
    when there is none yet."""
    return next((p for p in NFTABLES_CONFS if root.exists(p)), NFTABLES_CONFS[0])


def nftables_enabled(root: Root) -> bool:
    units = root / UNIT_DIR
    return units.is_dir() and any(units.glob(f"*.wants/{NFTABLES_UNIT}"))


def warnings(other_tables: Iterable[str], root: Root | None = None) -> list[str]:
    """What `earlyfw status` warns about: loaders that can remove earlyfw's
    table, and other firewalls it found loaded."""
    root = root or Root()
    found: list[str] = []
    conf = nftables_conf(root)
    if nftables_enabled(root) and not root.exists(NFTABLES_DROP_IN) and _flushes(root, conf):
        found.append(
            f"nftables.service is enabled and {conf} runs `flush ruleset`, with no earlyfw drop-in "
            f"({NFTABLES_DROP_IN}): restarting or reloading it deletes earlyfw's table; "
            "run `earlyfw install` to add the drop-in"
        )
    tables = set(other_tables)
    if any(t.endswith(" firewalld") for t in tables):
        found.append(
            "firewalld is active: its tables cannot open what earlyfw blocks, but keep its backend on nftables "
            "(FirewallBackend=nftables) and never run `nft flush ruleset`"
        )
    iptables = sorted(tables & IPTABLES_NFT_TABLES)
    if iptables:
        found.append(
            f"iptables-nft tables are loaded ({', '.join(iptables)}): they cannot open what earlyfw blocks, "
            "and `iptables -F` flushes only them; `nft flush ruleset` would remove earlyfw too"
        )
    return found


def _flushes(root: Root, conf: str) -> bool:
    try:
        text = root.read_bytes(conf).decode(errors="replace")
    except OSError:
        return False
    return any(line.split("#", 1)[0].split() == ["flush", "ruleset"] for line in text.splitlines())
