"""A pending callback (`schemas/callback_task.avsc`) and the values its request carries.

Pure functions of plain dicts. A task holds the conversion fields a callback is
built from, not the built request: the request is rebuilt (and re-signed with a
fresh timestamp) on every attempt from the publisher's current settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from functools import lru_cache

from pipeline.config import Publisher

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
    task.update(
        attempt=1,
        retry=0,
        not_before_ms=0,
        deferrals=0,
        last_outcome="",
        last_status_code=None,
        last_error="",
    )
    return task


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
