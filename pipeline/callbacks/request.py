"""Building one callback request: URL, JSON body, headers, Standard Webhooks signature.

Pure functions. The same task always yields the same URL and body; only the
`webhook-timestamp` (and so the signature) changes between attempts, which is
what the Standard Webhooks specification asks for (receivers reject old
timestamps). `Idempotency-Key` and `webhook-id` are the conversion ID on every
attempt, so a publisher can drop repeats.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import NamedTuple
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from pipeline import macros
from pipeline.callbacks.task import fields
from pipeline.config import Publisher, whsec_key

USER_AGENT = "postback-pipeline-callbacks/1"
# query parameter names whose values are credentials, whatever the publisher calls them
_SECRET_NAME_PARTS = ("token", "secret", "key", "pass", "pwd", "sig", "auth", "hash")
REDACTED = "***"


class Request(NamedTuple):  # a tuple: built once per attempt, cheaper than a dataclass
    method: str
    url: str  # already percent-encoded: send it as is
    headers: dict[str, str]
    body: bytes  # b"" for GET


def build(publisher: Publisher, task: Mapping, now_s: int) -> Request:
    """The request of one attempt of `task` to `publisher`, signed at `now_s` (Unix seconds).

    Every macro is filled (a missing value becomes empty), percent-encoded. POST
    sends the same fields as a compact JSON object with sorted keys.
    """
    values = fields(task)
    url = macros.fill(publisher.postback_url, values)
    headers = {"Idempotency-Key": task["conversion_id"], "User-Agent": USER_AGENT}
    body = b""
    if publisher.method == "POST":
        body = json.dumps(values, separators=(",", ":"), sort_keys=True).encode()
        headers["Content-Type"] = "application/json"
    if publisher.signing_secret:
        headers.update(
            signature_headers(publisher.signing_secret, task["conversion_id"], now_s, body)
        )
    return Request(publisher.method, url, headers, body)


def signature_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """`webhook-id`, `webhook-timestamp`, `webhook-signature` of the Standard Webhooks
    specification: v1 = base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(whsec_key(secret), signed, hashlib.sha256).digest()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
    }


def redact_url(url: str, secrets: Iterable[str] = ()) -> str:
    """The URL as logged: the userinfo password, values of secret-looking query
    parameters and any value equal to one of `secrets` become `***`.

    Works on the encoded text so everything else stays byte-for-byte as sent.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{hostport}"
    hidden = {s for s in secrets if s}
    hidden |= {s.removeprefix("whsec_") for s in hidden}
    query = "&".join(_redact_pair(pair, hidden) for pair in parts.query.split("&"))
    return urlunsplit(
        (parts.scheme, netloc, parts.path, query if parts.query else "", parts.fragment)
    )


def _redact_pair(pair: str, hidden: set[str]) -> str:
    name, eq, value = pair.partition("=")
    lowered = unquote_plus(name).lower()
    if (
        eq
        and value
        and (any(part in lowered for part in _SECRET_NAME_PARTS) or unquote_plus(value) in hidden)
    ):
        return f"{name}={REDACTED}"
    return pair


def redactor(publisher: Publisher) -> Callable[[str], str]:
    """`redact_url` for this publisher's URLs; the identity when none of them can hold
    anything to hide (no secrets, no userinfo, no secret-looking or macro parameter
    names: macro values are percent-encoded, so they cannot add any), which saves
    parsing every URL."""
    secrets = secrets_of(publisher)
    template = publisher.postback_url
    parts = urlsplit(template)
    names = [unquote_plus(pair.partition("=")[0]).lower() for pair in parts.query.split("&")]
    probe = macros.fill(template, {})
    if (
        secrets
        or "@" in parts.netloc
        or any("{" in name or any(p in name for p in _SECRET_NAME_PARTS) for name in names)
        or redact_url(probe) != probe
    ):
        return partial(redact_url, secrets=secrets)
    return _same


def _same(url: str) -> str:
    return url


def secrets_of(publisher: Publisher) -> tuple[str, ...]:
    """What must never appear in a logged URL of this publisher."""
    return (publisher.signing_secret,) if publisher.signing_secret else ()
