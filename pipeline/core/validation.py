"""Validation of click and postback requests: plain functions of plain values.

A rejection is an outcome with a code, an HTTP status and a sentence; the code
becomes a row in `postbacks`, a metric label and the error body. Nothing here
does I/O.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from pipeline.config import CURRENCY_RE, EVENT_RE, Campaign, Settings
from pipeline.core import clickid
from pipeline.core.secrets import MASK, NONE, Secrets, secret_name

MAX_SUB_LEN = 256
MAX_TXN_LEN = 128
MAX_REVENUE = Decimal("999999999999")  # Decimal(18, 6) holds 12 integer digits
REVENUE_EXP = Decimal("0.000001")
# plain ASCII decimals only: no sign, exponent, underscore, space or non-ASCII digit
# (all of which Decimal() accepts); a JSON number arrives as its JSON text
REVENUE_RE = re.compile(r"[0-9]+(\.[0-9]{1,6})?", re.ASCII)
SUB_PARAMS = ("sub1", "sub2", "sub3", "sub4", "sub5")
POSTBACK_PARAMS = (
    "token",
    "click_id",
    "event",
    "txn_id",
    "revenue",
    "currency",
    "status",
    "conversion_id",
)
REVERSED = "reversed"  # the one `status` a postback may carry: it takes a conversion back
CONVERSION_ID_RE = re.compile(r"^[0-9a-f]{32}$")  # what new_id issues


@dataclass(frozen=True)
class Rejected(Exception):
    """A request refused with `code` (the outcome), HTTP `status` and a human `detail`."""

    status: int
    code: str
    detail: str

    def body(self) -> dict:
        return {"error": self.code, "detail": self.detail}


def clean(text: str) -> str:
    """`text` as valid UTF-8: what cannot be encoded (lone surrogates, from JSON escapes
    or from header bytes that were not UTF-8) becomes U+FFFD."""
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def encodable(text: str) -> bool:
    """Whether `text` can be written as UTF-8 (no lone surrogates)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def client_ip(remote: str, forwarded_for: str | None, trusted: Sequence) -> str:
    """The client address: X-Forwarded-For is believed only hop by hop from trusted
    proxies, and only as far as its hops are IP addresses (a malformed hop ends the
    walk at the last address that was one)."""
    ip = remote or ""
    if not forwarded_for or not _in(ip, trusted):
        return ip
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        if not _is_ip(hop):
            break
        ip = hop
        if not _in(hop, trusted):
            break
    return ip


@functools.lru_cache(maxsize=4096)
def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# id(networks) -> (networks, {ip: answer}); the entry holds `networks`, so its id
# cannot be reused by another object while the entry exists
_IN_CACHE: dict[int, tuple[Sequence, dict[str, bool]]] = {}
_IN_CACHE_IPS = 4096


def _in(ip: str, networks: Sequence) -> bool:
    """Is `ip` in one of `networks`? Answers are memoized per (networks, ip): parsing
    an address and testing it against networks costs more than the rest of a
    postback's checks, and the addresses that send postbacks are few."""
    entry = _IN_CACHE.get(id(networks))
    if entry is None or entry[0] is not networks:
        if len(_IN_CACHE) >= 64:
            _IN_CACHE.clear()  # only tests make many settings objects
        entry = _IN_CACHE[id(networks)] = (networks, {})
    known = entry[1]
    answer = known.get(ip)
    if answer is None:
        if len(known) >= _IN_CACHE_IPS:
            known.clear()  # many client IPs (clicks behind proxies): start over, stay bounded
        answer = known[ip] = _in_uncached(ip, networks)
    return answer


def _in_uncached(ip: str, networks: Sequence) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks if net.version == addr.version)


def new_id(now_ms: int | None = None) -> str:
    """32 hex characters, time-ordered: 12 of milliseconds, 20 random."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    return f"{ms:012x}{os.urandom(10).hex()}"


def click_record(
    settings: Settings,
    campaign_id: str,
    params: Mapping[str, str],
    ip: str,
    user_agent: str,
    now_ms: int | None = None,
) -> tuple[Campaign, dict]:
    """Validate a click request; return the campaign and the click event to publish."""
    campaign = settings.campaigns.get(campaign_id)
    if campaign is None:
        raise Rejected(404, "unknown_campaign", f"no campaign {campaign_id!r}")
    pub = params.get("pub")
    if not pub:
        raise Rejected(400, "missing_param", "pub is required")
    if pub not in settings.publishers:
        raise Rejected(404, "unknown_publisher", f"no publisher {pub!r}")
    ts = int(time.time() * 1000) if now_ms is None else now_ms
    click = {
        "click_id": clickid.issue(settings.secrets, now_ms=ts),
        "ts_ms": ts,
        "campaign_id": campaign.id,
        "pub": pub,
    }
    for name in SUB_PARAMS:
        value = params.get(name, "")
        if len(value) > MAX_SUB_LEN:
            raise Rejected(400, "invalid_param", f"{name} is longer than {MAX_SUB_LEN} characters")
        click[name] = value
    click["ip"] = ip
    click["user_agent"] = clean(user_agent[:1024])
    return campaign, click


# json.dumps(..., ensure_ascii=False) builds an encoder per call; this is the same one, once
_RAW_JSON = json.JSONEncoder(ensure_ascii=False).encode
# the function that encoder writes every str with (C)
_JSON_STR = json.encoder.encode_basestring


def redacted_raw(
    method: str, path: str, params: Mapping[str, object], secrets: Secrets = NONE
) -> str:
    """The request as JSON for the log: credential-like parameters shown as ***, and
    every configured secret hidden wherever it appears (core.secrets)."""
    # a request's parameters are strings: their JSON is written here, the text the
    # encoder would write (a test compares), at a third of its cost; others go to it
    fields = []
    for name, value in params.items():
        if type(value) is not str or type(name) is not str:
            return _redacted_raw_encoded(method, path, params, secrets)
        if _secret_name(name):
            value = MASK
        fields.append(f"{_JSON_STR(name)}: {_JSON_STR(value)}")
    params_text = ", ".join(fields)
    head = f'{{"method": {_JSON_STR(method)}, "path": {_JSON_STR(path)}'
    text = f'{head}, "params": {{{params_text}}}}}'
    return clean(secrets.hide(text))


# the names a deployment's advertisers send are few: each is matched once
_secret_name = functools.lru_cache(maxsize=1024)(secret_name)


def _redacted_raw_encoded(
    method: str, path: str, params: Mapping[str, object], secrets: Secrets
) -> str:
    shown = dict(params)  # same order; a redacted value keeps its place
    for name in shown:
        if isinstance(name, str) and _secret_name(name):
            shown[name] = MASK
    return clean(secrets.hide(_RAW_JSON({"method": method, "path": path, "params": shown})))


def postback_record(
    settings: Settings,
    params: Mapping[str, object],
    source_ip: str,
    raw: str,
    now_ms: int | None = None,
) -> tuple[dict, Rejected | None]:
    """Validate a postback; always return the record to log, and the rejection if any.

    Checks run in order: token present, token known, source IP allowed, required
    parameters, click ID, then the optional parameters. The record's outcome is
    `accepted` or the rejection code. A reversal (`status=reversed`) needs
    `conversion_id` or `txn_id` instead of click_id and event; its `revenue`, if
    any, is a refund (more than 0).
    """
    now = int(time.time() * 1000) if now_ms is None else now_ms
    click_id, event = params.get("click_id"), params.get("event")
    record = {
        "postback_id": new_id(now),
        "received_at_ms": now,
        "click_id": clean(click_id[:256]) if isinstance(click_id, str) else "",
        "click_ts_ms": None,
        "advertiser": "",
        "event": clean(event[:64]) if isinstance(event, str) else "",
        "txn_id": None,
        "revenue": None,
        "currency": None,
        "source_ip": source_ip,
        "outcome": "accepted",
        "detail": "",
        "raw": raw,
        "status": "",
        "conversion_id": None,
    }
    rejection = None
    try:
        _check_postback(settings, params, source_ip, record, now)
    except Rejected as e:
        rejection = e
        record["outcome"], record["detail"] = e.code, e.detail
    secrets = settings.redaction
    if secrets:
        # a secret sent in any field (a token as txn_id, in a parameter's name) is
        # stored and answered as ***
        for name in _SHOWN_FIELDS:
            if record[name]:
                record[name] = secrets.hide(record[name])
        if rejection is not None and record["detail"] != rejection.detail:
            rejection = Rejected(rejection.status, rejection.code, record["detail"])
    return record, rejection


_SHOWN_FIELDS = ("click_id", "event", "txn_id", "detail")


def _check_postback(settings, params, source_ip, record, now) -> None:
    for name, value in params.items():
        if not isinstance(value, str):
            raise Rejected(400, "invalid_param", f"{clean(str(name))} must be a string")
        if not (encodable(value) and encodable(name)):
            raise Rejected(400, "invalid_param", f"{clean(name)} is not valid UTF-8")
    token = params.get("token")
    if not token:
        raise Rejected(400, "missing_param", "token is required")
    advertiser = settings.token_index.get(token)
    if advertiser is None:
        raise Rejected(401, "bad_token", "token matches no advertiser")
    record["advertiser"] = advertiser.id
    if not _in(source_ip, advertiser.allowed_ips):
        raise Rejected(403, "ip_not_allowed", f"{source_ip} is not in the advertiser's allowed_ips")
    status = params.get("status") or ""
    if status:
        if status != REVERSED:
            raise Rejected(400, "invalid_param", f"status must be {REVERSED!r} (or absent)")
        record["status"] = REVERSED
        _check_reversal(settings, params, record, now)
        return
    for name in ("click_id", "event"):
        if not params.get(name):
            raise Rejected(400, "missing_param", f"{name} is required")
    _check_click_id(settings, params["click_id"], record, now)
    _check_event(params["event"])
    _check_amounts(settings, params, record)


def _check_reversal(settings, params, record, now) -> None:
    """A reversal names its conversion by conversion_id or txn_id; click_id and event
    are optional (checked when sent); revenue, when sent, is a refund: positive."""
    conversion_id = params.get("conversion_id") or None
    if conversion_id is not None and not CONVERSION_ID_RE.match(conversion_id):
        raise Rejected(400, "invalid_param", "conversion_id must be 32 hex characters")
    if conversion_id is None and not params.get("txn_id"):
        raise Rejected(400, "missing_param", "a reversal needs txn_id or conversion_id")
    record["conversion_id"] = conversion_id
    if params.get("click_id"):
        _check_click_id(settings, params["click_id"], record, now)
    if params.get("event"):
        _check_event(params["event"])
    _check_amounts(settings, params, record)
    if record["revenue"] is not None and not record["revenue"]:
        raise Rejected(400, "invalid_param", "a refund's revenue must be more than 0")


def _check_click_id(settings, click_id, record, now) -> None:
    try:
        record["click_ts_ms"] = clickid.verify(click_id, settings.secrets, now_ms=now)
    except clickid.InvalidClickId as e:
        raise Rejected(400, "invalid_click_id", str(e)) from None


def _check_event(event) -> None:
    if not EVENT_RE.match(event):
        raise Rejected(400, "invalid_param", "event must match [a-z0-9_]{1,64}")


def _check_amounts(settings, params, record) -> None:
    """The optional txn_id, revenue and currency."""
    txn_id = params.get("txn_id") or None
    if txn_id is not None and len(txn_id) > MAX_TXN_LEN:
        raise Rejected(400, "invalid_param", f"txn_id is longer than {MAX_TXN_LEN} characters")
    record["txn_id"] = txn_id
    if params.get("revenue"):
        record["revenue"] = _revenue(params["revenue"])
    currency = params.get("currency") or None
    if currency is not None:
        if not CURRENCY_RE.match(currency):
            raise Rejected(400, "invalid_param", "currency must be an ISO 4217 code like USD")
        if currency not in settings.fx:
            raise Rejected(
                400,
                "invalid_param",
                f"currency {currency} is neither {settings.reporting_currency} nor in [fx]",
            )
    record["currency"] = currency


def record_key(record: dict) -> bytes:
    """The postbacks topic's key of a record: its click_id, or for a reversal the
    conversion_id or txn_id it names (so a conversion's reversals keep their order)."""
    if record["status"]:
        return (record["conversion_id"] or record["txn_id"] or "").encode()
    return record["click_id"].encode()


def _revenue(text: str) -> Decimal:
    if not REVENUE_RE.fullmatch(text):
        raise Rejected(
            400,
            "invalid_param",
            "revenue must be a plain decimal like 19.99 (ASCII digits, at most 6 decimals)",
        )
    value = Decimal(text)
    if value > MAX_REVENUE:
        raise Rejected(400, "invalid_param", f"revenue must be between 0 and {MAX_REVENUE}")
    return value.quantize(REVENUE_EXP)
