"""Reversals and refunds: append-only accounting over plain values. No Kafka, no Faust.

A conversion keeps the amounts it was attributed with; every change is an
adjustment (`schemas/adjustment.avsc`) whose deltas carry it:

| request                     | deltas                                                |
|-----------------------------|-------------------------------------------------------|
| reversal (no revenue)       | minus what is left of the four amounts (the           |
|                             | conversion's, minus what earlier refunds took back)   |
| refund of R (revenue = R)   | revenue -R; payout -share x R when the payout is a    |
|                             | share of revenue, 0 when it is fixed                  |

The `_reporting` twins are the deltas at the conversion's own fx rate, and a
refund of all that is left closes every amount exactly, so a conversion's amounts
plus its adjustments never drift from zero by rounding. The outcomes, checked in
this order: `unknown_conversion` (none, or another advertiser's),
`not_attributed`, `already_reversed`, `exceeds_revenue` (a refund above what is
left of the revenue), else `applied`. Only an applied reversal reverses the
conversion (its row is re-emitted with status `reversed` and the same amounts).
Money is `Decimal` with 6 places, rounded half-even.
"""

from __future__ import annotations

from decimal import Decimal
from typing import NamedTuple

from pipeline.config import Settings
from pipeline.core import rows
from pipeline.core.attribution import SUBS, ZERO, money

REVERSAL, REFUND = "reversal", "refund"
APPLIED = "applied"
UNKNOWN_CONVERSION = "unknown_conversion"
NOT_ATTRIBUTED = "not_attributed"
ALREADY_REVERSED = "already_reversed"
EXCEEDS_REVENUE = "exceeds_revenue"
OUTCOMES = (APPLIED, UNKNOWN_CONVERSION, NOT_ATTRIBUTED, ALREADY_REVERSED, EXCEEDS_REVENUE)

AMOUNTS = ("revenue", "payout", "revenue_reporting", "payout_reporting")
DELTAS = ("revenue_delta", "payout_delta", "revenue_delta_reporting", "payout_delta_reporting")
# the fields of a conversion row (schemas/conversion.avsc), in order
CONVERSION_FIELDS = tuple(rows.CONVERSIONS.field_of(c) for c in rows.CONVERSIONS.columns)
# what the ledger keeps of a conversion that was not attributed: enough to say so
MARKER_FIELDS = (
    "conversion_id",
    "campaign_id",
    "advertiser",
    "pub",
    "event",
    "txn_id",
    "status",
    "currency",
    "conversion_ts_ms",
)
# a ledger record's fields with their defaults (schemas/ledger.avsc)
_LEDGER_DEFAULTS = {
    "txn_id": None,
    "revenue": None,
    "currency": None,
    "status": "",
    "detail": "",
    "click_id": "",
    "campaign_id": "",
    "pub": "",
    **{s: "" for s in SUBS},
    "event": "",
    "payout": None,
    "revenue_reporting": None,
    "payout_reporting": None,
    "payout_share": None,
    "fx_rate": None,
    "click_ts_ms": None,
    "ctit_seconds": None,
}


class Book(NamedTuple):
    """What has been taken back from one conversion so far."""

    taken: tuple[Decimal, Decimal, Decimal, Decimal] = (ZERO, ZERO, ZERO, ZERO)  # AMOUNTS
    reversed_by: str | None = None  # the adjustment that reversed all of it


class Decision(NamedTuple):
    adjustment: dict  # schemas/adjustment.avsc
    book: Book  # after it
    reverses: bool = False  # the conversion is now reversed: re-emit its row


# --- ledger records: what the worker's ledger stage is told ---------------------------


def conversion_entry(settings: Settings, row: dict) -> dict:
    """The ledger record of a final conversion: an attributed one with its row, its
    payout share and fx rate (so later refunds need no config), any other one as a
    small marker with its status."""
    attributed = row["status"] == "attributed"
    fields = CONVERSION_FIELDS if attributed else MARKER_FIELDS
    entry = {
        **_LEDGER_DEFAULTS,
        **{f: row[f] for f in fields if f != "conversion_ts_ms"},
        "kind": "conversion",
        "postback_id": row["postback_id"],
        "ts_ms": row["conversion_ts_ms"],
    }
    if attributed:
        campaign = settings.campaigns.get(row["campaign_id"])
        rule = campaign.events.get(row["event"]) if campaign is not None else None
        share = rule.payout_share if rule is not None else None
        rate = settings.fx.get(row["currency"])
        entry["payout_share"] = None if share is None else str(share)
        entry["fx_rate"] = None if rate is None else str(rate)
    return entry


def reversal_entry(postback: dict, conversion_id: str = "") -> dict:
    """The ledger record of an accepted reversal postback; `conversion_id` the one it
    names or resolves to (empty while a txn_id is not resolved)."""
    return {
        **_LEDGER_DEFAULTS,
        "kind": "reversal",
        "conversion_id": conversion_id,
        "postback_id": postback["postback_id"],
        "ts_ms": postback["received_at_ms"],
        "advertiser": postback["advertiser"],
        "txn_id": postback["txn_id"],
        "revenue": postback["revenue"],
        "currency": postback["currency"],
    }


def kept(entry: dict) -> dict:
    """What the ledger keeps of a conversion record: an attributed conversion's row
    (and payout share, fx rate), or the marker fields of any other."""
    attributed = entry["status"] == "attributed"
    fields = CONVERSION_FIELDS if attributed else MARKER_FIELDS
    row = {f: entry[f] for f in fields if f != "conversion_ts_ms"}
    row["conversion_ts_ms"] = entry["ts_ms"]
    if attributed:
        row.update(payout_share=entry["payout_share"], fx_rate=entry["fx_rate"])
    return row


# --- decisions --------------------------------------------------------------------------


def kind_of(reversal: dict) -> str:
    return REFUND if reversal["revenue"] is not None else REVERSAL


def decide(settings: Settings, conversion: dict | None, book: Book, reversal: dict) -> Decision:
    """The adjustment a reversal makes to `conversion` (what `kept` returned, or None
    when the ledger has none), given what was taken back before (`book`)."""
    if conversion is None or conversion["advertiser"] != reversal["advertiser"]:
        detail = f"no conversion {_named(reversal)} of advertiser {reversal['advertiser']}"
        return Decision(adjustment(reversal, None, UNKNOWN_CONVERSION, detail), book)
    if conversion["status"] != "attributed":
        detail = f"conversion {conversion['conversion_id']} is {conversion['status']}"
        return Decision(adjustment(reversal, conversion, NOT_ATTRIBUTED, detail), book)
    if book.reversed_by is not None:
        detail = f"reversed by {book.reversed_by}"
        return Decision(adjustment(reversal, conversion, ALREADY_REVERSED, detail), book)
    left = tuple(conversion[a] - t for a, t in zip(AMOUNTS, book.taken, strict=True))
    if reversal["revenue"] is None:
        deltas = tuple(-x for x in left)
        full = tuple(conversion[a] for a in AMOUNTS)
        row = adjustment(reversal, conversion, APPLIED, "", deltas)
        return Decision(row, Book(full, reversal["postback_id"]), True)
    amount, why = refund_amount(settings, conversion, reversal)
    if amount is None or amount > left[0]:
        why = why or (
            f"refund {amount} {conversion['currency']} is more than the {left[0]} left "
            f"of revenue {conversion['revenue']}"
        )
        return Decision(adjustment(reversal, conversion, EXCEEDS_REVENUE, why), book)
    deltas = _refund_deltas(conversion, left, amount)
    taken = tuple(t - d for t, d in zip(book.taken, deltas, strict=True))
    return Decision(adjustment(reversal, conversion, APPLIED, "", deltas), Book(taken, None))


def _refund_deltas(conversion: dict, left: tuple, amount: Decimal) -> tuple:
    """A refund's deltas; refunding all that is left closes every amount exactly."""
    share, rate = _decimal(conversion["payout_share"]), _decimal(conversion["fx_rate"])
    rate = Decimal(1) if rate is None else rate
    if amount == left[0]:
        payout = left[1] if share is not None else ZERO
        return (-amount, -payout, -left[2], -left[3] if share is not None else ZERO)
    payout = ZERO if share is None else min(money(amount * share), left[1])
    return (
        -amount,
        -payout,
        -min(money(amount * rate), left[2]),
        -min(money(payout * rate), left[3]),
    )


def refund_amount(settings: Settings, conversion: dict, reversal: dict):
    """(the refund in the conversion's currency, None) or (None, why not)."""
    currency = reversal["currency"] or conversion["currency"]
    if currency == conversion["currency"]:
        return money(reversal["revenue"]), ""
    rate, own = settings.fx.get(currency), _decimal(conversion["fx_rate"])
    if rate is None or not own:
        return None, f"no [fx] rate to turn {currency} into {conversion['currency']}"
    return money(reversal["revenue"] * rate / own), ""


def unknown(reversal: dict, detail: str) -> dict:
    """`unknown_conversion`: no conversion came for it within the wait."""
    return adjustment(reversal, None, UNKNOWN_CONVERSION, detail)


def adjustment(
    reversal: dict, conversion: dict | None, outcome: str, detail: str, deltas=None
) -> dict:
    """An adjustment row; zero deltas unless given. `conversion`: what the ledger
    keeps of it, or None (then only the reversal's own fields are known)."""
    c = conversion or {}
    revenue, payout, revenue_reporting, payout_reporting = deltas or (ZERO,) * 4
    return {
        "adjustment_id": reversal["postback_id"],
        "conversion_id": c.get("conversion_id") or reversal["conversion_id"],
        "postback_id": reversal["postback_id"],
        "ts_ms": reversal["ts_ms"],
        "kind": kind_of(reversal),
        "outcome": outcome,
        "detail": detail,
        "campaign_id": c.get("campaign_id", ""),
        "advertiser": reversal["advertiser"],
        "pub": c.get("pub", ""),
        "event": c.get("event", ""),
        "currency": c.get("currency") or reversal["currency"] or "",
        "conversion_ts_ms": c.get("conversion_ts_ms", reversal["ts_ms"]),
        "revenue_delta": revenue,
        "payout_delta": payout,
        "revenue_delta_reporting": revenue_reporting,
        "payout_delta_reporting": payout_reporting,
        "click_id": c.get("click_id", ""),
        **{s: c.get(s, "") for s in SUBS},
        "txn_id": c.get("txn_id", reversal["txn_id"]),
        "click_ts_ms": c.get("click_ts_ms"),
    }


def reversed_row(conversion: dict, adjustment_id: str) -> dict:
    """The conversion's row as a full reversal leaves it: status `reversed`, the
    amounts it was attributed with (the adjustment carries the change)."""
    row = {f: conversion[f] for f in CONVERSION_FIELDS}
    row.update(status="reversed", detail=f"reversed by {adjustment_id}")
    return row


def _named(reversal: dict) -> str:
    if reversal["conversion_id"]:
        return reversal["conversion_id"]
    return f"with txn_id {reversal['txn_id']}"


def _decimal(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


# --- state: JSON-ready copies (Decimals as text) ----------------------------------------

_DECIMALS = frozenset((*AMOUNTS, *DELTAS))


def thaw(data: dict) -> dict:
    """A kept conversion, adjustment or reversal read back from JSON state: its
    amounts as Decimals again (`state.dumps` wrote them as text)."""
    return {k: Decimal(v) if k in _DECIMALS and isinstance(v, str) else v for k, v in data.items()}


def book_of(data: dict) -> Book:
    taken = data.get("t")
    taken = (ZERO,) * 4 if taken is None else tuple(Decimal(t) for t in taken)
    return Book(taken, data.get("x"))


def store_book(data: dict, book: Book) -> None:
    if any(book.taken):
        data["t"] = [str(t) for t in book.taken]
    if book.reversed_by is not None:
        data["x"] = book.reversed_by
