"""Hostname lookups for `import --resolve` and `endpoints refresh`, with dnspython.

Two ways, for two moments. At import time (before install, or while relaxed)
the system's resolvers from /etc/resolv.conf answer. A refresh runs while the
tunnel is up and asks only the VPN's own resolvers (`[dns] servers`) from
sockets bound to the tunnel interface, so a query can leave only inside the
tunnel, whatever the routing table says; the relaxed ruleset refuses DNS to
any other server anyway.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver

from earlyfw.config import IPAddress
from earlyfw.errors import ConfigError, EarlyfwError
from earlyfw.importers import Resolve

TIMEOUT = 3.0  # per query; a lookup gives up after LIFETIME in all
LIFETIME = 8.0


class LookupFailed(EarlyfwError):
    """No answer (timeout, refused, SERVFAIL): the network, not the name."""


def _types(family: int | None) -> list[dns.rdatatype.RdataType]:
    # A before AAAA: the order the companion file and the config list them in.
    return [t for f, t in ((4, dns.rdatatype.A), (6, dns.rdatatype.AAAA)) if family in (None, f)]


def _addresses(answers: Sequence[object]) -> list[IPAddress]:
    return list(dict.fromkeys(ipaddress.ip_address(str(a)) for a in answers))


def system(host: str, family: int | None = None) -> list[IPAddress]:
    """Every A and AAAA address of `host` from the resolvers in /etc/resolv.conf."""
    try:
        resolver = dns.resolver.Resolver()
    except dns.resolver.NoResolverConfiguration as e:
        raise LookupFailed(f"cannot resolve {host}: no resolver configured ({e})") from None
    resolver.lifetime = LIFETIME
    found: list[object] = []
    for rdtype in _types(family):
        try:
            answer = resolver.resolve(host, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise ConfigError(f"{host}: no such host (NXDOMAIN)") from None
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise LookupFailed(
                f"cannot resolve {host}: {e}",
                hint="is earlyfw blocking DNS? resolve before `earlyfw install`, or while the tunnel is up",
            ) from None
        if answer.rrset is not None:
            found += list(answer.rrset)
    return _addresses(found)


def through(servers: Sequence[IPAddress], interface: str) -> Resolve:
    """A lookup that asks `servers` (the VPN's resolvers), in order, over UDP
    from sockets bound to `interface`: nothing can leave outside the tunnel."""
    if not servers:
        raise ConfigError(
            "dns.servers: empty; a refresh asks only the VPN's resolvers, through the tunnel",
            hint="list the VPN's resolvers in [dns] servers (the importers take them from DNS = / dhcp-option DNS)",
        )

    def lookup(host: str, family: int | None = None) -> list[IPAddress]:
        found: list[object] = []
        for rdtype in _types(family):
            found += _ask(servers, interface, host, rdtype)
        return _addresses(found)

    return lookup


def _ask(servers: Sequence[IPAddress], interface: str, host: str, rdtype: dns.rdatatype.RdataType) -> list[object]:
    failures = []
    for server in servers:
        query = dns.message.make_query(host, rdtype)
        family = socket.AF_INET6 if server.version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            sock.setblocking(False)  # dnspython waits with its own timeout on a socket it is given
            try:
                reply = dns.query.udp(query, str(server), timeout=TIMEOUT, sock=sock)
            except (dns.exception.DNSException, OSError) as e:
                failures.append(f"{server}: {e or type(e).__name__}")
                continue
        rcode = reply.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            raise ConfigError(f"{host}: no such host (NXDOMAIN from {server})")
        if rcode != dns.rcode.NOERROR:
            failures.append(f"{server}: {dns.rcode.to_text(rcode)}")
            continue
        # The answer section may lead through CNAMEs: keep the records asked for.
        return [rdata for rrset in reply.answer if rrset.rdtype == rdtype for rdata in rrset]
    raise LookupFailed(f"cannot resolve {host} through {interface}: " + "; ".join(failures))
