"""SKAdNetwork install-validation postbacks, from the body a device sent to a row.

Pure functions of plain values (the signature itself is `skan_signature`'s).
`evaluate` turns a body into the record of `schemas/skan_postback.avsc` less the
three fields the ingress adds; `postback_record` adds them from a
`schemas/skan_report.avsc` record. Checks, in order, each with its outcome:

- `invalid_json`: the body is not a UTF-8 JSON object (`too_large`: the ingress
  refused a body over 64 KiB unread).
- `unsupported_version`: `version` is none of 2.0, 2.1, 2.2, 3.0, 4.0, or 1.0
  (also when absent: the original postbacks had no version).
- `wrong_ad_network`: `ad-network-id` is not in `[skan] ad_network_ids` (any case).
- `invalid_signature`: `attribution-signature` does not verify with Apple's key
  for the version (`skan_signature.signed_message` says over what).
- `unknown_source`: no `[[skan.sources]]` id matches (see `match_source`).
- `verified`: counted. `duplicate` is decided later by a stateful stage: verified
  postbacks with the same `dedup_key` are one (`duplicate` makes the record of a
  later one).

A verified postback decodes to an event and its revenue (in the app's currency):

- `did-win` false (a qualifying ad of ours that lost the attribution): event "",
  counted in no statistics.
- else `conversion-value` (fine, 0-63): the app's `fine` rule holding it;
- else `coarse-conversion-value` (low, medium, high): the app's `coarse` rule;
- else "install".

A value with no rule, or an app with no `[skan.apps]` entry, decodes to event ""
with the reason in `detail`. `revenue_reporting` is the revenue times the fx
rate of the app's currency (`[fx]`; the reporting currency's is 1). Amounts have
6 places, rounded half-even.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import ROUND_HALF_EVEN, Decimal

from pipeline.core.skan_config import COARSE_VALUES, SkanApp, SkanConfig, SkanSource
from pipeline.core.skan_signature import (
    APPLE_KEYS,
    KEY_FAMILY,
    SIGNED_FIELDS,
    Keys,
    SkanError,
    sign,
    signature_problem,
    signed_message,
    verify,
    version_of,
)
from pipeline.core.skan_signature import text as _text

__all__ = [
    "APPLE_KEYS",
    "KEY_FAMILY",
    "SIGNED_FIELDS",
    "SkanError",
    "decode",
    "dedup_key",
    "duplicate",
    "evaluate",
    "match_source",
    "parse_body",
    "postback_record",
    "report",
    "sign",
    "signed_message",
    "verify",
    "version_of",
]

# columns of schemas/skan_postback.avsc -> Apple's field, by column type
TEXT_FIELDS = {
    "version": "version",
    "ad_network_id": "ad-network-id",
    "source_identifier": "source-identifier",
    "skan_campaign_id": "campaign-id",
    "app_id": "app-id",
    "source_app_id": "source-app-id",
    "source_domain": "source-domain",
    "transaction_id": "transaction-id",
    "coarse_conversion_value": "coarse-conversion-value",
    "attribution_signature": "attribution-signature",
}
FLAG_FIELDS = {"redownload": "redownload", "did_win": "did-win"}
INT_FIELDS = {
    "fidelity_type": "fidelity-type",
    "conversion_value": "conversion-value",
    "postback_sequence_index": "postback-sequence-index",
}

_PLACES = Decimal("0.000001")
_ZERO = Decimal(0).quantize(_PLACES)
_INT_RANGE = range(-(2**31), 2**31)  # an Avro int


def match_source(postback: dict, sources: Mapping[str, SkanSource]) -> SkanSource | None:
    """The `[[skan.sources]]` entry of a postback of a supported version, or None.

    Version 4: the longest id of 2-4 digits that is a prefix of `source-identifier`
    (Apple sends 2, 3 or 4 of its digits, by privacy tier). Earlier versions: the
    id equal to `campaign-id`.
    """
    if version_of(postback) == "4.0":
        sid = postback.get("source-identifier")
        if not isinstance(sid, str) or not (sid.isascii() and sid.isdigit() and len(sid) <= 4):
            return None
        for size in range(len(sid), 1, -1):
            if (source := sources.get(sid[:size])) is not None:
                return source
        return None
    campaign = postback.get("campaign-id")
    if isinstance(campaign, bool) or not isinstance(campaign, int | str):
        return None
    return sources.get(str(campaign))


def decode(postback: dict, app: SkanApp | None) -> tuple[str, Decimal, str]:
    """(event, revenue in the app's currency, detail) of a verified postback."""
    if postback.get("did-win") is False:
        return "", _ZERO, "did not win the attribution"
    fine, coarse = postback.get("conversion-value"), postback.get("coarse-conversion-value")
    if fine is None and coarse is None:
        return "install", _ZERO, ""
    if fine is not None:
        name = f"conversion-value {_text(fine)}"
        valid = isinstance(fine, int) and not isinstance(fine, bool) and 0 <= fine <= 63
        rule = app.fine[fine] if app is not None and valid else None
    else:
        name = f"coarse-conversion-value {_text(coarse)!r}"
        valid = isinstance(coarse, str) and coarse in COARSE_VALUES
        rule = app.coarse.get(coarse) if app is not None and valid else None
    if rule is not None:
        return rule.event, _amount(rule.revenue), ""
    if not valid:
        return "", _ZERO, f"{name} is not a valid value"
    if app is None:
        app_id = _text(postback.get("app-id"))
        return "", _ZERO, f"{name}: app {app_id} has no [skan.apps] entry"
    return "", _ZERO, f"{name} has no rule in [skan.apps.{json.dumps(app.id)}]"


def parse_body(body: bytes) -> dict:
    """The JSON object of a body; SkanError `invalid_json` saying why it is none (the
    ingress answers 400 for exactly these)."""
    try:
        postback = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SkanError("invalid_json", f"not JSON: {e}"[:200]) from None
    if not isinstance(postback, dict):
        raise SkanError("invalid_json", f"a JSON {type(postback).__name__}, not an object")
    return postback


def report(
    skan_id: str, received_at_ms: int, source_ip: str, body: bytes | None, limit: int
) -> tuple[dict, bytes]:
    """The skan_report record of a request and its Kafka key; `body` None: over `limit`.

    The key is the body's transaction-id, so that the copies of a transaction's
    postbacks meet in one partition of the dedup stage; the skan_id when it has
    none (nothing to deduplicate)."""
    record = dict(skan_id=skan_id, received_at_ms=received_at_ms, source_ip=source_ip)
    record.update(body="", outcome="", detail="", spooled=False)
    postback = None
    if body is None:
        record.update(outcome="too_large", detail=f"body is over {limit} bytes")
    else:
        record["body"] = body.decode("utf-8", "replace")
        try:
            postback = parse_body(body)
        except SkanError as e:
            record.update(outcome=e.outcome, detail=e.detail)
    txn = _text(postback.get("transaction-id")) if postback else ""
    return record, (txn or skan_id).encode()


def evaluate(body: bytes, config: SkanConfig, keys: Keys | None = None) -> dict:
    """The skan_postback record of a body (without `skan_id`, `received_at_ms`,
    `source_ip`). `keys`: family -> public keys (default `config.keys`: Apple's and
    any `[skan] test_keys`).

    Never raises for any body. Absent Apple fields are "" (text columns) or None.
    """
    raw = body.decode("utf-8", "replace")
    try:
        postback = parse_body(body)
    except SkanError as e:
        return {**_record({}, raw), "outcome": e.outcome, "detail": e.detail}
    record = _record(postback, raw)
    try:
        _check(postback, config, config.keys if keys is None else keys)
    except SkanError as e:
        return {**record, "outcome": e.outcome, "detail": e.detail}
    source = match_source(postback, config.sources)
    if source is None:
        detail = f"{_source_text(postback)} matches no [[skan.sources]] id"
        return {**record, "outcome": "unknown_source", "detail": detail}
    app = config.apps.get(_text(postback.get("app-id")))
    event, revenue, detail = decode(postback, app)
    currency, rate = (app.currency, app.rate) if app else (config.reporting_currency, 1)
    return {
        **record,
        "outcome": "verified",
        "detail": detail,
        "event": event,
        "revenue": revenue,
        "revenue_reporting": _amount(revenue * rate),
        "currency": currency,
        "campaign_id": source.campaign,
        "pub": source.pub,
    }


SPOOLED = "answered 503 (Kafka unavailable); published later from the ingress's spool"


def postback_record(report: dict, config: SkanConfig, keys: Keys | None = None) -> dict:
    """The skan_postback record of a skan_report record.

    A report the ingress refused (`outcome` invalid_json or too_large) keeps that
    verdict and its detail: the device was answered 400 or 413 for it. A spooled
    report is evaluated like any other, its detail saying it was answered 503."""
    head = {
        "skan_id": report["skan_id"],
        "received_at_ms": report["received_at_ms"],
        "source_ip": report.get("source_ip", ""),
    }
    if report.get("outcome"):
        refused = _record({}, report["body"])
        return {**head, **refused, "outcome": report["outcome"], "detail": report["detail"]}
    record = {**head, **evaluate(report["body"].encode(), config, keys)}
    if report.get("spooled"):
        record["detail"] = "; ".join(filter(None, (record["detail"], SPOOLED)))
    return record


def duplicate(record: dict, owner: str) -> dict:
    """A verified record whose `dedup_key` was verified before, as skan_id `owner`:
    decoded to nothing, like every record that is not verified (counted once)."""
    index = record["postback_sequence_index"]
    detail = f"transaction-id {record['transaction_id']!r}"
    if index is not None:
        detail += f" postback-sequence-index {index}"
    decoded = {k: v for k, v in _record({}, "").items() if k in _DECODED}
    return {
        **record,
        **decoded,
        "outcome": "duplicate",
        "detail": f"{detail} was verified before ({owner})",
    }


_DECODED = ("event", "revenue", "revenue_reporting", "currency", "campaign_id", "pub")


def dedup_key(result: dict) -> bytes:
    """What makes two verified postbacks one: transaction-id and postback-sequence-index
    (absent before version 4, when a transaction has one postback)."""
    index = result["postback_sequence_index"]
    return f"{result['transaction_id']}\x00{'' if index is None else index}".encode()


def _check(postback: dict, config: SkanConfig, keys: Keys) -> None:
    version_of(postback)
    network = postback.get("ad-network-id")
    if not isinstance(network, str) or network.lower() not in config.ad_network_ids:
        ours = ", ".join(sorted(config.ad_network_ids)) or "none: SKAdNetwork is off"
        raise SkanError(
            "wrong_ad_network", f"ad-network-id {_text(network)!r} is not ours ({ours})"
        )
    if problem := signature_problem(postback, keys):
        raise SkanError("invalid_signature", problem)


def _record(postback: dict, raw: str) -> dict:
    """Apple's fields as columns, and the decoded ones empty."""
    record: dict = {col: _text(postback.get(name)) for col, name in TEXT_FIELDS.items()}
    for col, name in FLAG_FIELDS.items():
        value = postback.get(name)
        record[col] = value if isinstance(value, bool) else None
    for col, name in INT_FIELDS.items():
        value = postback.get(name)
        ok = isinstance(value, int) and not isinstance(value, bool) and value in _INT_RANGE
        record[col] = value if ok else None
    record.update(outcome="", detail="", raw=raw, event="", revenue=_ZERO)
    record.update(revenue_reporting=_ZERO, currency="", campaign_id="", pub="")
    return record


def _source_text(postback: dict) -> str:
    if version_of(postback) == "4.0":
        return f"source-identifier {_text(postback.get('source-identifier'))!r}"
    return f"campaign-id {_text(postback.get('campaign-id'))}"


def _amount(value: Decimal) -> Decimal:
    return value.quantize(_PLACES, rounding=ROUND_HALF_EVEN)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")
