"""Apple's signature on an SKAdNetwork postback. Pure functions.

Apple signs, with ECDSA over SHA-256, the UTF-8 string of some of the postback's
values joined by U+2063 (INVISIBLE SEPARATOR), in an order that depends on the
version; booleans are written "true" or "false". `attribution-signature` is the
base64 DER signature. Versions 1.0 and 2.0 use Apple's P-192 key, 2.1 and later
its P-256 key. The orders are those of Apple's "Verifying an install-validation
postback" (4.0), "Combining parameters for SKAdNetwork 3 postbacks" (3.0) and
"Combining parameters for previous SKAdNetwork postback versions" (2.2, 2.1,
2.0, 1.0). Conversion values are never signed.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from functools import lru_cache
from types import MappingProxyType

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_private_key,
    load_der_public_key,
)

# base64 DER SubjectPublicKeyInfo, as Apple publishes them: P-192 in "SKAdNetwork 1
# release notes" and "SKAdNetwork 2 release notes", P-256 in "Verifying an
# install-validation postback"
APPLE_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "p192": "MEkwEwYHKoZIzj0CAQYIKoZIzj0DAQEDMgAEMyHD625uvsmGq4C43cQ9BnfN2xslVT5V1nOmAMP6qaRR"
        "Ull3PB1JYmgSm+62sosG",
        "p256": "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEWdp8GPcGqmhgzEFj9Z2nSpQVddayaPe4FMzqM9wib1+a"
        "HaaIzoHoLN9zW4K8y4SPykE3YVK3sVqW6Af0lfx3gg==",
    }
)
KEY_CURVES: Mapping[str, str] = MappingProxyType({"p192": "secp192r1", "p256": "secp256r1"})
KEY_FAMILY: Mapping[str, str] = MappingProxyType(
    {"1.0": "p192", "2.0": "p192", "2.1": "p256", "2.2": "p256", "3.0": "p256", "4.0": "p256"}
)

SEPARATOR = "\u2063"
_V2 = ("version", "ad-network-id", "campaign-id", "app-id", "transaction-id", "redownload")
SIGNED_FIELDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "1.0": ("ad-network-id", "campaign-id", "app-id", "transaction-id"),
        "2.0": (*_V2, "source-app-id"),
        "2.1": (*_V2, "source-app-id"),
        "2.2": (*_V2, "source-app-id", "fidelity-type"),
        "3.0": (*_V2, "source-app-id", "fidelity-type", "did-win"),
        "4.0": (
            *("version", "ad-network-id", "source-identifier", "app-id", "transaction-id"),
            *("redownload", "source-app-id", "source-domain", "fidelity-type", "did-win"),
            "postback-sequence-index",
        ),
    }
)
# signed only when the postback has them: Apple's privacy tier decides whether
# source-app-id is sent, and web ads send source-domain in its place
OPTIONAL_FIELDS = frozenset({"source-app-id", "source-domain"})


class SkanError(ValueError):
    """A postback that cannot be checked; `outcome` is its skan_postback outcome."""

    def __init__(self, outcome: str, detail: str):
        super().__init__(f"{outcome}: {detail}")
        self.outcome, self.detail = outcome, detail


def version_of(postback: dict) -> str:
    """The postback's version, "1.0" when absent (the original postbacks had none).

    SkanError `unsupported_version` for any other value than 1.0, 2.0, 2.1, 2.2,
    3.0 and 4.0 (strings, as Apple sends them)."""
    version = postback.get("version", "1.0")
    if not isinstance(version, str) or version not in SIGNED_FIELDS:
        raise SkanError("unsupported_version", f"version {text(version)!r} is not supported")
    return version


def signed_message(postback: dict) -> str:
    """The string Apple signed for this postback.

    SkanError `unsupported_version` for an unknown version; SkanError
    `invalid_signature` when a signed field other than source-app-id and
    source-domain is missing, or is not a string, integer or boolean (then no
    signature can hold)."""
    parts = []
    for name in SIGNED_FIELDS[version_of(postback)]:
        value = postback.get(name)
        if value is None and name in OPTIONAL_FIELDS:
            continue
        if value is None:
            raise SkanError("invalid_signature", f"signed field {name} is missing")
        if not isinstance(value, str | int):
            raise SkanError("invalid_signature", f"signed field {name} is {text(value)}")
        parts.append(text(value))
    return SEPARATOR.join(parts)


# family -> a base64 DER public key, or several (any of them may have signed)
Keys = Mapping[str, str | tuple[str, ...]]


def verify(postback: dict, keys: Keys = APPLE_KEYS) -> bool:
    """True when the postback's `attribution-signature` holds under
    `keys[KEY_FAMILY[version]]` (base64 DER public keys; Apple's by default).

    SkanError for an unsupported version; False for every other failure."""
    return not signature_problem(postback, keys)


def signature_problem(postback: dict, keys: Keys = APPLE_KEYS) -> str:
    """Why the signature does not hold, as a sentence; "" when it holds.

    SkanError for an unsupported version."""
    try:
        message = signed_message(postback).encode("utf-8")
    except SkanError as e:
        if e.outcome != "invalid_signature":
            raise
        return e.detail
    except UnicodeEncodeError:
        return "a signed field is not valid Unicode"
    signature = postback.get("attribution-signature")
    if not isinstance(signature, str) or not signature:
        return "attribution-signature is missing"
    try:
        der = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return "attribution-signature is not base64"
    family = KEY_FAMILY[version_of(postback)]
    if family not in keys:
        return f"no {family} public key to verify with"
    candidates = keys[family]
    for key in (candidates,) if isinstance(candidates, str) else candidates:
        try:
            _public_key(key).verify(der, message, ec.ECDSA(hashes.SHA256()))
            return ""
        except (InvalidSignature, ValueError):
            continue
    return f"attribution-signature does not verify with the {family} key"


def sign(postback: dict, private_key: str) -> dict:
    """The postback with an `attribution-signature` made with `private_key` (base64
    PKCS#8 DER) over its `signed_message`: how tests and `pipeline simulate` sign
    postbacks with a test key. SkanError as `signed_message`."""
    key = load_der_private_key(base64.b64decode(private_key), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("an SKAdNetwork key is an elliptic-curve key")
    signature = key.sign(signed_message(postback).encode("utf-8"), ec.ECDSA(hashes.SHA256()))
    return {**postback, "attribution-signature": base64.b64encode(signature).decode()}


def test_key(encoded, family: str) -> tuple[str, bool]:
    """(the base64 DER public key, whether `encoded` was a private key) of a test key
    of `family` given as base64 DER: a public key (SubjectPublicKeyInfo) or an
    unencrypted PKCS#8 private key. ValueError saying what is wrong."""
    try:
        der = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else b""
    except (binascii.Error, ValueError):
        der = b""
    if not der:
        raise ValueError("must be a base64 DER key (public SubjectPublicKeyInfo or PKCS#8)")
    private = False
    try:
        public = load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):
        try:
            public, private = load_der_private_key(der, password=None).public_key(), True
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError("is neither a DER public key nor an unencrypted PKCS#8 key") from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != KEY_CURVES[family]:
        raise ValueError(f"is not a {KEY_CURVES[family]} elliptic-curve key")
    spki = public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(spki).decode(), private


def text(value) -> str:
    """A postback value as text: strings as sent, integers in decimal, booleans
    "true" or "false", absent (None) "", anything else as JSON. Always encodable
    as UTF-8 (a lone surrogate from a JSON escape becomes "?")."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


@lru_cache(maxsize=16)
def _public_key(encoded: str) -> ec.EllipticCurvePublicKey:
    """Parsed once per key: verifying is the hot part, parsing DER need not be."""
    key = load_der_public_key(base64.b64decode(encoded))
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("an SKAdNetwork key is an elliptic-curve public key")
    return key
