"""A parser for exactly the pf.conf subset earlyfw writes, and the checks that
guard every rendering of the macOS anchor.

pf exists only on macOS and the BSDs, so earlyfw reviews its own anchor before
writing it: every rule is parsed into typed fields (nothing earlyfw does not
emit is accepted) and checked for the mistakes that silently open a pf ruleset
(a rule that is not `quick`, an address of the wrong family, a table that was
never defined, an interface group such as `utun` that matches every tunnel
device); `check_main` and `check_tunnel` hold the anchors to earlyfw's shape.
The same parser reads a main ruleset as `pfctl -s rules` prints it (scrub,
scrub-anchor and anchor calls), so the tests' model of pf's evaluation
(tests/pf_evaluator.py) can run the whole chain on these types.
On a Mac, `pfctl -vnf FILE` is the authority; this parser is the reviewer that
runs everywhere.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# A device is a name ending in its unit number (lo0, en0, utun9). pf reads a
# name without one (utun, en) as an interface *group*: every such device.
_DEVICE = re.compile(r"[a-z][a-z0-9]*[0-9]")
_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,30}")  # PF_TABLE_NAME_SIZE is 32
_ANCHOR_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
# A relative name, a path (com.apple/000.earlyfw) or every child (com.apple/*).
_ANCHOR = re.compile(rf"{_ANCHOR_PART}(?:/{_ANCHOR_PART})*(?:/\*)?")
USERS = {"root": 0}
_TOKEN = re.compile(r'"[^"\n]*"|[{},!]|[^\s{},!"]+')

ICMP6_TYPES = {
    "toobig": 2,
    "echoreq": 128,
    "echorep": 129,
    "routersol": 133,
    "routeradv": 134,
    "neighbrsol": 135,
    "neighbradv": 136,
}
ICMP_TYPES = {"unreach": 3, "echoreq": 8, "echorep": 0}
ICMP_CODES = {"needfrag": 4}
PROTOCOLS = ("tcp", "udp", "icmp", "ipv6-icmp")


class PfError(ValueError):
    """A line outside the subset, or a rule that would not do what it says."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


class Action(StrEnum):
    PASS = "pass"  # noqa: S105 - a pf keyword, not a password
    BLOCK = "block"


class Direction(StrEnum):
    IN = "in"
    OUT = "out"


class Family(StrEnum):
    INET = "inet"
    INET6 = "inet6"

    @property
    def version(self) -> int:
        return 4 if self is Family.INET else 6


@dataclass(frozen=True)
class Table:
    name: str
    entries: tuple[IPNetwork, ...]
    flags: frozenset[str] = frozenset()
    line: int = 0


@dataclass(frozen=True)
class Address:
    """`any`, one network, or `[!] <table>`."""

    network: IPNetwork | None = None
    table: str | None = None
    negated: bool = False

    @property
    def is_any(self) -> bool:
        return self.network is None and self.table is None

    def __str__(self) -> str:
        if self.table is not None:
            return ("! " if self.negated else "") + f"<{self.table}>"
        if self.network is None:
            return "any"
        if self.network.num_addresses == 1:
            return str(self.network.network_address)
        return str(self.network)


ANY = Address()


@dataclass(frozen=True)
class Rule:
    line: int
    action: Action
    # block only: `return` (TCP RST / ICMP unreachable) or `drop` (silence).
    policy: str | None
    direction: Direction | None
    quick: bool
    interface: str | None = None
    interface_negated: bool = False
    family: Family | None = None
    proto: str | None = None
    src: Address = ANY
    src_port: int | None = None
    dst: Address = ANY
    dst_port: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    keep_state: bool = False
    user: int | None = None  # uid of the socket's owner


@dataclass(frozen=True)
class AnchorCall:
    line: int
    name: str


@dataclass(frozen=True)
class Scrub:
    """`scrub [in|out] all fragment reassemble`, or `scrub-anchor "name" all`:
    normalisation, evaluated before any filter rule."""

    line: int
    direction: Direction | None = None
    anchor: str | None = None
    reassemble: bool = False


Statement = Rule | AnchorCall


@dataclass(frozen=True)
class PfRuleset:
    """One pf ruleset as `parse` read it: an anchor's rules, or a main ruleset
    as `pfctl -s rules` lists it."""

    rules: tuple[Statement, ...]
    tables: Mapping[str, Table] = field(default_factory=dict)
    scrubs: tuple[Scrub, ...] = ()

    def __len__(self) -> int:
        """What `pfctl -s rules` lists: scrub rules, then filter rules."""
        return len(self.scrubs) + len(self.rules)

    def filter_rules(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if isinstance(r, Rule))

    def anchor_calls(self) -> tuple[AnchorCall, ...]:
        return tuple(r for r in self.rules if isinstance(r, AnchorCall))


class _Tokens:
    def __init__(self, line: int, text: str) -> None:
        self.line = line
        self.items = _TOKEN.findall(text)
        self.pos = 0

    def error(self, message: str) -> PfError:
        return PfError(self.line, message)

    def peek(self) -> str | None:
        return self.items[self.pos] if self.pos < len(self.items) else None

    def take(self, what: str = "a word") -> str:
        token = self.peek()
        if token is None:
            raise self.error(f"expected {what}, got end of line")
        self.pos += 1
        return token

    def accept(self, *words: str) -> str | None:
        if self.peek() in words:
            return self.take()
        return None

    def expect(self, word: str) -> None:
        token = self.take(repr(word))
        if token != word:
            raise self.error(f"expected {word!r}, got {token!r}")

    def end(self) -> None:
        token = self.peek()
        if token is not None:
            raise self.error(f"unexpected {token!r}")


def _lines(text: str) -> Iterator[tuple[int, str]]:
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            yield number, line


def parse(text: str) -> PfRuleset:
    """Parse and validate one anchor's rules. Raises PfError on anything
    outside the subset earlyfw emits."""
    tables: dict[str, Table] = {}
    rules: list[Statement] = []
    scrubs: list[Scrub] = []
    for number, line in _lines(text):
        tokens = _Tokens(number, line)
        keyword = tokens.take()
        if keyword in ("scrub", "scrub-anchor"):
            if rules:
                # pfctl: "Rules must be in order: options, normalization, ..., filtering"
                raise tokens.error("scrub rules must come before the filter rules")
            scrubs.append(_scrub(tokens, keyword))
        elif keyword == "table":
            if rules or scrubs:
                raise tokens.error("table definitions must come before the rules")
            table = _table(tokens)
            if table.name in tables:
                raise tokens.error(f"table <{table.name}> is defined twice")
            tables[table.name] = table
        elif keyword == "anchor":
            rules.append(_anchor_call(tokens))
        elif keyword in ("pass", "block"):
            rules.append(_rule(tokens, Action(keyword), tables))
        else:
            raise tokens.error(f"{keyword!r} is not a statement earlyfw writes")
    return PfRuleset(tuple(rules), tables, tuple(scrubs))


def _scrub(tokens: _Tokens, keyword: str) -> Scrub:
    anchor = None
    if keyword == "scrub-anchor":
        anchor = _anchor_name(tokens)
    direction = tokens.accept("in", "out")
    tokens.expect("all")
    reassemble = tokens.accept("fragment") is not None
    if reassemble:
        tokens.expect("reassemble")
    tokens.end()
    return Scrub(tokens.line, Direction(direction) if direction else None, anchor, reassemble)


def _table(tokens: _Tokens) -> Table:
    name = _table_name(tokens, tokens.take("<table>"))
    flags: set[str] = set()
    while (flag := tokens.accept("const", "persist")) is not None:
        if flag in flags:
            raise tokens.error(f"table <{name}>: {flag} given twice")
        flags.add(flag)
    tokens.expect("{")
    entries: list[IPNetwork] = []
    while (word := tokens.take("an address or '}'")) != "}":
        if word == ",":
            continue
        entries.append(_network(tokens, word))
    tokens.end()
    if not entries:
        raise tokens.error(f"table <{name}> is empty")
    return Table(name, tuple(entries), frozenset(flags), tokens.line)


def _table_name(tokens: _Tokens, token: str) -> str:
    match = re.fullmatch(r"<([^>]*)>", token)
    if not match or not _TABLE.fullmatch(match[1]):
        raise tokens.error(f"{token!r} is not a table name like <name>")
    return match[1]


def _network(tokens: _Tokens, token: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(token)
    except ValueError:
        raise tokens.error(f"{token!r} is not an address or a network with its host bits clear") from None


def _anchor_name(tokens: _Tokens) -> str:
    token = tokens.take("an anchor name")
    name = token[1:-1] if len(token) >= 2 and token[0] == token[-1] == '"' else ""
    if not _ANCHOR.fullmatch(name):
        raise tokens.error(f"anchor {token}: expected a quoted anchor name or path")
    return name


def _anchor_call(tokens: _Tokens) -> AnchorCall:
    name = _anchor_name(tokens)
    tokens.accept("all")
    tokens.end()
    return AnchorCall(tokens.line, name)


def _rule(tokens: _Tokens, action: Action, tables: Mapping[str, Table]) -> Rule:
    """`pass|block [return|drop] [in|out] quick [on [!] DEV] [inet|inet6] [proto P]
    (all | from A [port N] to B [port N]) [user U] [icmp(6)-type T [code C]] [no state]`,
    read in that order."""
    policy = _policy(tokens, action)
    direction = tokens.accept("in", "out")
    if tokens.accept("quick") is None:
        # pf lets the LAST matching rule win unless one is quick: a rule that
        # is not quick can be overridden by anything evaluated after it.
        raise tokens.error("rule is not `quick`: every earlyfw rule must decide on the spot")
    interface, interface_negated = _interface(tokens)
    family_word = tokens.accept("inet", "inet6")
    family = Family(family_word) if family_word else None
    proto = _proto(tokens, family)
    src, src_port, dst, dst_port = ANY, None, ANY, None
    if tokens.accept("all") is None:
        tokens.expect("from")
        src, src_port = _endpoint(tokens, family, proto, tables)
        tokens.expect("to")
        dst, dst_port = _endpoint(tokens, family, proto, tables)
    user = _user(tokens, proto)
    icmp_type, icmp_code = _icmp(tokens, proto)
    keep_state = _keeps_state(tokens, action)
    return Rule(
        line=tokens.line,
        action=action,
        policy=policy,
        direction=Direction(direction) if direction else None,
        quick=True,
        interface=interface,
        interface_negated=interface_negated,
        family=family,
        proto=proto,
        src=src,
        src_port=src_port,
        dst=dst,
        dst_port=dst_port,
        icmp_type=icmp_type,
        icmp_code=icmp_code,
        keep_state=keep_state,
        user=user,
    )


def _policy(tokens: _Tokens, action: Action) -> str | None:
    policy = tokens.accept("return", "drop")
    if action is Action.BLOCK and policy is None:
        raise tokens.error("block without `return` or `drop` depends on the ruleset's block-policy")
    if action is Action.PASS and policy is not None:
        raise tokens.error(f"pass takes no {policy!r}")
    return policy


def _interface(tokens: _Tokens) -> tuple[str | None, bool]:
    """`on [!] DEVICE`: the device, and whether it is negated."""
    if not tokens.accept("on"):
        return None, False
    negated = tokens.accept("!") is not None
    interface = tokens.take("an interface")
    if not _DEVICE.fullmatch(interface):
        raise tokens.error(
            f"{interface!r} is not one device: pf reads it as an interface group (every {interface} device)"
        )
    return interface, negated


def _proto(tokens: _Tokens, family: Family | None) -> str | None:
    if not tokens.accept("proto"):
        return None
    proto = tokens.take("a protocol")
    if proto not in PROTOCOLS:
        raise tokens.error(f"proto {proto!r} is not one of {', '.join(PROTOCOLS)}")
    needs = {"icmp": Family.INET, "ipv6-icmp": Family.INET6}.get(proto)
    if needs is not None and family is not needs:
        raise tokens.error(f"proto {proto} needs {needs}")
    return proto


def _icmp(tokens: _Tokens, proto: str | None) -> tuple[int | None, int | None]:
    """`icmp6-type T` or `icmp-type T [code C]`: the type and code."""
    if tokens.accept("icmp6-type"):
        if proto != "ipv6-icmp":
            raise tokens.error("icmp6-type needs proto ipv6-icmp")
        return _icmp_number(tokens, ICMP6_TYPES), None
    if tokens.accept("icmp-type"):
        if proto != "icmp":
            raise tokens.error("icmp-type needs proto icmp")
        icmp_type = _icmp_number(tokens, ICMP_TYPES)
        icmp_code = _icmp_number(tokens, ICMP_CODES) if tokens.accept("code") else None
        return icmp_type, icmp_code
    return None, None


def _keeps_state(tokens: _Tokens, action: Action) -> bool:
    """`no state` or nothing: the last words of a rule, so the line ends here."""
    stateless = tokens.accept("no") is not None
    if stateless:
        tokens.expect("state")
    tokens.end()
    if action is Action.PASS and not stateless:
        # pf keeps state by default; earlyfw flushes states on every change,
        # which would cut any flow a stateful pass had let through mid-stream.
        raise tokens.error("pass without `no state`")
    if action is Action.BLOCK and stateless:
        raise tokens.error("`no state` on a block rule")
    return not stateless


def _endpoint(
    tokens: _Tokens, family: Family | None, proto: str | None, tables: Mapping[str, Table]
) -> tuple[Address, int | None]:
    negated = tokens.accept("!") is not None
    word = tokens.take("an address")
    if word.startswith("<"):
        name = _table_name(tokens, word)
        if name not in tables:
            # pfctl would create an empty table on the fly: a typo that turns
            # `! <dns>` into "every address".
            raise tokens.error(f"table <{name}> is not defined in this file")
        if family and not negated and not any(n.version == family.version for n in tables[name].entries):
            raise tokens.error(f"table <{name}> holds no {family} address")
        address = Address(table=name, negated=negated)
    elif negated:
        raise tokens.error("only a table can be negated (a negated list or network is a classic pf trap)")
    elif word == "any":
        address = ANY
    else:
        network = _network(tokens, word)
        if family is None:
            raise tokens.error(f"{word} in a rule without inet or inet6")
        if network.version != family.version:
            raise tokens.error(f"{word} is not an {family} address")
        address = Address(network=network)
    port = None
    if tokens.accept("port"):
        if proto not in ("tcp", "udp"):
            raise tokens.error("port needs proto tcp or udp")
        word = tokens.take("a port number")
        if not word.isdigit() or not 1 <= int(word) <= 65535:
            raise tokens.error(f"port {word!r} is not 1-65535")
        port = int(word)
    return address, port


def _user(tokens: _Tokens, proto: str | None) -> int | None:
    if tokens.accept("user") is None:
        return None
    word = tokens.take("a user")
    if proto not in ("tcp", "udp"):
        raise tokens.error("user needs proto tcp or udp: pf knows a socket's owner only for those")
    if word not in USERS:
        raise tokens.error(f"user {word!r} is not one earlyfw uses")
    return USERS[word]


def _icmp_number(tokens: _Tokens, names: Mapping[str, int]) -> int:
    word = tokens.take("an ICMP type")
    if word in names:
        return names[word]
    if word.isdigit() and int(word) <= 255:
        return int(word)
    raise tokens.error(f"{word!r} is not an ICMP type or code earlyfw uses")


# --- What earlyfw's own anchors must look like -------------------------------


def is_device(name: str) -> bool:
    """One device (utun5), not a group (utun) that pf would match every member of."""
    return _DEVICE.fullmatch(name) is not None


def check_main(ruleset: PfRuleset, interface: str, tunnel_anchor: str, *, allowed: Collection[str] = ()) -> None:
    """The shape of earlyfw's anchor: loopback first, the tunnel sub-anchor
    right before the catch-all blocks, those last for both families, and no
    rule before them that passes anything on a tunnel device. Rules name no
    interface but the tunnel (negated), lo0 and the `allowed` ([[allow]]) ones."""
    rules = ruleset.rules
    if len(rules) < 6:
        raise PfError(rules[-1].line if rules else 0, "too few rules for an earlyfw anchor")
    catch_all = rules[-4:]
    expected: list[tuple[str, Direction | None, Family] | None] = [
        ("return", Direction.OUT, Family.INET),
        ("return", Direction.OUT, Family.INET6),
    ]
    expected += [("drop", None, Family.INET), ("drop", None, Family.INET6)]
    actual = [
        (r.policy, r.direction, r.family)
        if isinstance(r, Rule) and r.action is Action.BLOCK and r.src.is_any and r.dst.is_any and not r.proto
        else None
        for r in catch_all
    ]
    if actual != expected:
        line = catch_all[0].line if catch_all else 0
        raise PfError(line, "the anchor must end with block return out / block drop, for inet and inet6")
    calls = ruleset.anchor_calls()
    if len(calls) != 1 or calls[0].name != tunnel_anchor or rules[-5] is not calls[0]:
        raise PfError(rules[-5].line, f'anchor "{tunnel_anchor}" must come right before the catch-all blocks')
    for rule in ruleset.filter_rules():
        if rule.interface == interface and not rule.interface_negated:
            raise PfError(rule.line, f"{interface} belongs in the tunnel sub-anchor, loaded only once it is up")
        if rule.interface and rule.interface not in (interface, "lo0", *allowed):
            raise PfError(rule.line, f"unexpected interface {rule.interface}")
    first = rules[0]
    if not (isinstance(first, Rule) and first.action is Action.PASS and first.interface == "lo0"):
        raise PfError(first.line, "the first rule must pass loopback")
    if not any(s.reassemble and s.direction in (None, Direction.IN) and s.anchor is None for s in ruleset.scrubs):
        # pf cannot see the ports of an unreassembled fragment: fragmented
        # packets from the VPN server would fall to the catch-all block.
        raise PfError(first.line, "the anchor must reassemble fragments (scrub in all fragment reassemble)")


def check_tunnel(ruleset: PfRuleset, interface: str) -> None:
    """Every rule of the tunnel sub-anchor names exactly the tunnel device."""
    if ruleset.anchor_calls():
        raise PfError(ruleset.anchor_calls()[0].line, "the tunnel anchor calls no further anchor")
    if not ruleset.rules:
        raise PfError(0, "the tunnel anchor is empty")
    for rule in ruleset.filter_rules():
        if rule.interface != interface or rule.interface_negated:
            raise PfError(rule.line, f"every tunnel rule must be `on {interface}`")
