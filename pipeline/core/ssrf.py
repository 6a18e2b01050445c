"""The SSRF guard's rule: which addresses a callback may connect to. Pure.

Only globally routable unicast addresses pass. Addresses that embed an IPv4
address (IPv4-mapped `::ffff:a.b.c.d`, 6to4, Teredo) are judged by the IPv4
address inside as well, so `::ffff:127.0.0.1` is loopback. The resolver of
`deliver.py` applies this to every address a host name resolves to, and the
connection goes to exactly those addresses (no second lookup).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


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
        ):
            if embedded is not None and (reason := refusal(embedded)):
                return f"{how} {reason}"
    for test, kind in (
        ("is_unspecified", "an unspecified"),
        ("is_loopback", "a loopback"),
        ("is_link_local", "a link-local"),
        ("is_multicast", "a multicast"),
        ("is_private", "a private"),
        ("is_reserved", "a reserved"),
    ):
        if getattr(address, test):
            return f"{address} is {kind} address"
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
