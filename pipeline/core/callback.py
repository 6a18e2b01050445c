"""A pending callback and the request each attempt of it sends. Pure functions.

A task (`schemas/callback_task.avsc`) holds the conversion fields a callback is
built from, not the built request: the request is rebuilt, and re-signed with a
fresh `webhook-timestamp`, on every attempt from the publisher's current
settings, as the Standard Webhooks specification asks (receivers reject old
timestamps). The URL and body of a task never change; `Idempotency-Key` and
`webhook-id` are the conversion ID on every attempt, so a publisher can drop
repeats.

A task with an `advertiser` is a SKAdNetwork forward instead: the verified
postback's body (`body`, verbatim) POSTed to that advertiser's
`skan_forward_url`, its skan_id in place of the conversion ID, through the same
retries, SSRF guard and signing (the advertiser's `signing_secret`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from functools import lru_cache, partial
from typing import NamedTuple
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from pipeline.config import Advertiser, Publisher, Settings, whsec_key
from pipeline.core import macros

# conversion fields a task copies; everything a callback macro can show
CONVERSION_FIELDS = (
    "conversion_id",
    "click_id",
    "campaign_id",
    "pub",
    "sub1",
    "sub2",
    "sub3",
    "sub4",
    "sub5",
    "event",
    "txn_id",
    "revenue",
    "payout",
    "currency",
    "click_ts_ms",
    "conversion_ts_ms",
    "ctit_seconds",
)


def wants_callback(conversion: Mapping, publishers: Mapping[str, Publisher]) -> bool:
    """An attributed conversion whose event its publisher subscribes to gets a callback."""
    if conversion["status"] != "attributed":
        return False
    publisher = publishers.get(conversion["pub"])
    return publisher is not None and conversion["event"] in publisher.events


def from_conversion(conversion: Mapping) -> dict:
    """The task of a conversion's first attempt, due at once."""
    task = {name: conversion[name] for name in CONVERSION_FIELDS}
    task.update(_FIRST_ATTEMPT, advertiser="", body="")
    return task


_FIRST_ATTEMPT = dict(
    attempt=1,
    retry=0,
    not_before_ms=0,
    deferrals=0,
    last_outcome="",
    last_status_code=None,
    last_error="",
)


def forward_target(record: Mapping, settings: Settings) -> Advertiser | None:
    """The advertiser a skan_postback record is forwarded to, or None. "Its apps'"
    postbacks: a verified one goes to the advertiser of the campaign its
    `[[skan.sources]]` entry names, when that advertiser has a `skan_forward_url`.
    Duplicates and every other outcome are never forwarded."""
    if record["outcome"] != "verified":
        return None
    campaign = settings.campaigns.get(record["campaign_id"])
    advertiser = settings.advertisers.get(campaign.advertiser) if campaign else None
    return advertiser if advertiser is not None and advertiser.skan_forward_url else None


def from_skan(record: Mapping, advertiser: str) -> dict:
    """The task of a SKAdNetwork forward's first attempt, due at once: keyed by the
    skan_id, the body as the device sent it, no publisher."""
    task = {name: "" for name in CONVERSION_FIELDS}
    task.update(
        conversion_id=record["skan_id"],
        campaign_id=record["campaign_id"],
        event=record["event"],
        txn_id=record["transaction_id"] or None,
        revenue=record["revenue"],
        payout=Decimal(0),
        currency=record["currency"],
        click_ts_ms=None,
        conversion_ts_ms=record["received_at_ms"],
        ctit_seconds=None,
    )
    task.update(_FIRST_ATTEMPT, advertiser=advertiser, body=record["raw"])
    return task


def lane_of(task: Mapping) -> tuple[str, str]:
    """Whose share of the service a task takes: its publisher's, or its advertiser's."""
    advertiser = task.get("advertiser")
    return ("advertiser", advertiser) if advertiser else ("pub", task["pub"])


def destination(task: Mapping) -> str:
    """Whom a task calls, for logs and errors: "publisher net1", "advertiser acme"."""
    kind, name = lane_of(task)
    return f"{'publisher' if kind == 'pub' else 'advertiser'} {name}"


@lru_cache(maxsize=4096)  # payouts and revenues repeat: a few distinct amounts
def money(value: Decimal) -> str:
    """Plain notation, at least two decimals, no trailing zeros beyond: 2 -> "2.00",
    1.998000 -> "1.998" (never "2E+1")."""
    value = value.normalize()
    if value.as_tuple().exponent > -2:
        value = value.quantize(Decimal("0.01"))
    return format(value, "f")


def _seconds(ms: int | None) -> int | None:
    return None if ms is None else ms // 1000


def fields(task: Mapping) -> dict[str, str | int | None]:
    """Every callback macro's value, typed for JSON: amounts as exact decimal strings,
    `ctit` and the Unix timestamps (seconds) as integers, None when there is none
    (`txn_id` not sent, `ctit` of an in-app event, `click_ts` of an unknown click)."""
    return {
        "click_id": task["click_id"],
        "conversion_id": task["conversion_id"],
        "campaign_id": task["campaign_id"],
        "pub": task["pub"],
        "sub1": task["sub1"],
        "sub2": task["sub2"],
        "sub3": task["sub3"],
        "sub4": task["sub4"],
        "sub5": task["sub5"],
        "event": task["event"],
        "txn_id": task["txn_id"],
        "revenue": money(task["revenue"]),
        "payout": money(task["payout"]),
        "currency": task["currency"],
        "ctit": task["ctit_seconds"],
        "click_ts": _seconds(task["click_ts_ms"]),
        "conversion_ts": _seconds(task["conversion_ts_ms"]),
    }


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


def build_forward(advertiser: Advertiser, task: Mapping, now_s: int) -> Request:
    """The request of one attempt of a SKAdNetwork forward: POST, the body verbatim."""
    body = task["body"].encode("utf-8")
    headers = {
        "Idempotency-Key": task["conversion_id"],
        "User-Agent": USER_AGENT,
        "Content-Type": "application/json",
    }
    if advertiser.signing_secret:
        headers.update(
            signature_headers(advertiser.signing_secret, task["conversion_id"], now_s, body)
        )
    return Request("POST", advertiser.skan_forward_url, headers, body)


def request_of(settings: Settings, task: Mapping, now_s: int) -> Request:
    """The request of one attempt of any task, from the current settings."""
    if task.get("advertiser"):
        return build_forward(settings.advertisers[task["advertiser"]], task, now_s)
    return build(settings.publishers[task["pub"]], task, now_s)


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


def forward_redactor(advertiser: Advertiser) -> Callable[[str], str]:
    """`redact_url` for an advertiser's forward URL (forwards are few: always parsed)."""
    return partial(redact_url, secrets=(advertiser.signing_secret, advertiser.token))


def secrets_of(publisher: Publisher) -> tuple[str, ...]:
    """What must never appear in a logged URL of this publisher."""
    return (publisher.signing_secret,) if publisher.signing_secret else ()
