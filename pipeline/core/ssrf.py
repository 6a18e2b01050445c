"""The SSRF guard's rule: which addresses a callback may connect to. Pure.

Only globally routable unicast addresses pass. Addresses that embed an IPv4
address (IPv4-mapped `::ffff:a.b.c.d`, 6to4, Teredo, NAT64 `64:ff9b::a.b.c.d`,
which a NAT64 gateway connects to) are judged by the IPv4 address inside as
well, so `::ffff:127.0.0.1` is loopback. The resolver of
`deliver.py` applies this to every address a host name resolves to, and the
connection goes to exactly those addresses (no second lookup).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# IANA's special-purpose blocks that are not globally reachable, written out so the
# rule does not move with the Python release's idea of is_private / is_global
_SPECIAL = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
        "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        "::/128", "::1/128", "::/96", "64:ff9b:1::/48", "100::/64", "2001::/23",
        "2001:db8::/32", "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10",
        "ff00::/8",
    )
)  # fmt: skip
# NAT64: the well-known prefix and the local-use one (RFC 6052, RFC 8215)
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


def _nat64(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if any(address in net for net in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


class Blocked(Exception):
    """The callback's host is or resolves to an address the guard refuses."""


def refusal(address: str | _Address) -> str | None:
    """Why a connection to `address` is refused, or None when it is allowed.

    Raises ValueError for text that is not an IP address.
    """
    if isinstance(address, str):
        address = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            # a dual-stack socket connects to the IPv4 address itself: judge that alone
            reason = refusal(address.ipv4_mapped)
            return f"IPv4-mapped {reason}" if reason else None
        for embedded, how in (
            (address.sixtofour, "6to4"),
            (address.teredo[1] if address.teredo else None, "Teredo"),
            (_nat64(address), "NAT64"),
        ):
            if embedded is not None and (reason := refusal(embedded)):
                return f"{how} {reason}"
    for test, kind in (
        ("is_unspecified", "an unspecified"),
        ("is_loopback", "a loopback"),
        ("is_link_local", "a link-local"),
        ("is_site_local", "a site-local"),
        ("is_multicast", "a multicast"),
        ("is_private", "a private"),
        ("is_reserved", "a reserved"),
    ):
        if getattr(address, test, False):
            return f"{address} is {kind} address"
    special = next((n for n in _SPECIAL if n.version == address.version and address in n), None)
    if special is not None:
        return f"{address} is in {special}, reserved for special use"
    if not address.is_global:  # e.g. 100.64.0.0/10, shared address space
        return f"{address} is not a globally routable address"
    return None


def check(host: str, addresses: list[str]) -> None:
    """Raise Blocked unless every address `host` resolved to is allowed.

    All, not any: a name that mixes public and private answers is refused, so
    which one the connection picks never matters.
    """
    for address in addresses:
        reason = refusal(address)
        if reason:
            raise Blocked(reason if address == host else f"{host}: {reason}")


_HEX_LABEL = re.compile(r"0[xX][0-9A-Fa-f]*")


def noncanonical_ipv4(host: str) -> bool:
    """Whether some parser would read `host` as an IPv4 address although it is not one
    in canonical dotted decimal: the forms inet_aton and WHATWG URLs accept (`127.1`,
    `2130706433`, octal `0177.0.0.1`, hex `0x7f.1`), a trailing dot, or digits that
    are not ASCII. Such a host is refused everywhere: what it connects to depends on
    who parses it."""
    labels = unicodedata.normalize("NFKC", host).split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()
    last = labels[-1]
    if not (last.isdigit() or _HEX_LABEL.fullmatch(last)):
        return False  # a name: it does not end in a number
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return True
    return False
