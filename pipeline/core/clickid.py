"""Click IDs: URL-safe, unforgeable, and they tell when they were issued.

Layout before base64url (27 bytes -> 36 characters):

    6 bytes  issue time, milliseconds since the Unix epoch, big-endian
    9 bytes  random
    12 bytes HMAC-SHA256(secret, first 15 bytes), truncated

The first secret signs; every secret verifies, so secrets rotate by putting a
new one first and dropping the old one once its clicks are past every window.
Pure functions; `now_ms` and `nonce` are parameters so tests are exact.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import time
from collections.abc import Sequence

_TS_LEN, _NONCE_LEN, _MAC_LEN = 6, 9, 12
_RAW_LEN = _TS_LEN + _NONCE_LEN + _MAC_LEN
ENCODED_LEN = 36
_BLOCK = 64  # SHA-256's block size, HMAC's key length
# a click from the future is forged or the issuer's clock is broken; allow small skew
_MAX_FUTURE_MS = 5 * 60 * 1000
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


class InvalidClickId(ValueError):
    """The string is not a click ID this deployment issued."""


@functools.lru_cache(maxsize=64)
def _keyed(secret: str) -> tuple:
    """The inner and outer SHA-256 states of HMAC (RFC 2104) keyed with `secret`.

    hmac.HMAC.copy() is Python code around the same two states; copying the states
    directly costs about half as much, and every postback verifies a MAC. Tests
    compare with hmac.new on short and long keys."""
    key = secret.encode()
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    return inner.copy, outer.copy


def _mac(secret: str, body: bytes) -> bytes:
    inner, outer = _keyed(secret)
    h = inner()
    h.update(body)
    mac = outer()
    mac.update(h.digest())
    return mac.digest()[:_MAC_LEN]


def issue(secrets: Sequence[str], now_ms: int | None = None, nonce: bytes | None = None) -> str:
    """A new click ID signed with the first secret."""
    ts = int(time.time() * 1000) if now_ms is None else now_ms
    body = ts.to_bytes(_TS_LEN, "big") + (nonce if nonce is not None else os.urandom(_NONCE_LEN))
    # what base64.urlsafe_b64encode does, without its two Python-level calls
    return (
        binascii.b2a_base64(body + _mac(secrets[0], body), newline=False)
        .translate(_TO_URLSAFE)
        .decode()
    )


def verify(click_id: str, secrets: Sequence[str], now_ms: int | None = None) -> int:
    """The issue time (ms) of a valid click ID; raises InvalidClickId otherwise.

    Constant-time MAC comparison against every configured secret.
    """
    if not isinstance(click_id, str) or len(click_id) != ENCODED_LEN:
        raise InvalidClickId("click_id has the wrong length")
    try:
        # what base64.urlsafe_b64decode does, without its three Python-level calls
        raw = binascii.a2b_base64(click_id.encode("ascii").translate(_FROM_URLSAFE))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidClickId("click_id is not base64url") from None
    if len(raw) != _RAW_LEN:
        raise InvalidClickId("click_id has the wrong length")
    body, mac = raw[: _TS_LEN + _NONCE_LEN], raw[_TS_LEN + _NONCE_LEN :]
    for secret in secrets:
        if hmac.compare_digest(mac, _mac(secret, body)):
            break
    else:
        raise InvalidClickId("click_id signature does not match any configured secret")
    ts = int.from_bytes(body[:_TS_LEN], "big")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if ts > now + _MAX_FUTURE_MS:
        raise InvalidClickId("click_id was issued in the future")
    return ts


def issued_at_ms(click_id: str) -> int:
    """The issue time of a click ID already verified (no MAC check)."""
    raw = base64.urlsafe_b64decode(click_id.encode("ascii"))
    return int.from_bytes(raw[:_TS_LEN], "big")
