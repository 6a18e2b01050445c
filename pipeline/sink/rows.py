"""Row shaping for the warehouse: pure functions from a decoded event to a row.

Each `Table` names its ClickHouse table, its columns in insert order, and the
function that turns one decoded Kafka record into one row tuple.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

SUBS = ("sub1", "sub2", "sub3", "sub4", "sub5")


def ts(ms: int | None) -> datetime | None:
    """Milliseconds since the epoch -> aware UTC datetime (ClickHouse DateTime64(3, 'UTC'))."""
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[str, ...]
    row: Callable[[dict], tuple]


def click_row(c: dict) -> tuple:
    return (
        c["click_id"],
        ts(c["ts_ms"]),
        c["campaign_id"],
        c["pub"],
        *(c[s] for s in SUBS),
        c["ip"],
        c["user_agent"],
    )


def postback_row(p: dict) -> tuple:
    return (
        p["postback_id"],
        ts(p["received_at_ms"]),
        p["click_id"],
        p["advertiser"],
        p["event"],
        p["txn_id"],
        p["revenue"],
        p["currency"],
        p["source_ip"],
        p["outcome"],
        p["detail"],
        p["raw"],
    )


CLICKS = Table(
    "clicks",
    ("click_id", "ts", "campaign_id", "pub", *SUBS, "ip", "user_agent"),
    click_row,
)
POSTBACKS = Table(
    "postbacks",
    (
        "postback_id",
        "received_at",
        "click_id",
        "advertiser",
        "event",
        "txn_id",
        "revenue",
        "currency",
        "source_ip",
        "outcome",
        "detail",
        "raw",
    ),
    postback_row,
)


def conversion_row(c: dict) -> tuple:
    return (
        c["conversion_id"],
        c["postback_id"],
        c["click_id"],
        c["campaign_id"],
        c["advertiser"],
        c["pub"],
        *(c[s] for s in SUBS),
        c["event"],
        c["txn_id"],
        c["status"],
        c["detail"],
        c["revenue"],
        c["payout"],
        c["currency"],
        c["revenue_reporting"],
        c["payout_reporting"],
        ts(c["click_ts_ms"]),
        ts(c["conversion_ts_ms"]),
        c["ctit_seconds"],
    )


CONVERSIONS = Table(
    "conversions",
    (
        "conversion_id",
        "postback_id",
        "click_id",
        "campaign_id",
        "advertiser",
        "pub",
        *SUBS,
        "event",
        "txn_id",
        "status",
        "detail",
        "revenue",
        "payout",
        "currency",
        "revenue_reporting",
        "payout_reporting",
        "click_ts",
        "conversion_ts",
        "ctit_seconds",
    ),
    conversion_row,
)


def callback_row(c: dict) -> tuple:
    return (
        c["conversion_id"],
        c["pub"],
        c["attempt"],
        ts(c["ts_ms"]),
        c["url"],
        c["status_code"],
        c["duration_ms"],
        c["outcome"],
        c["error"],
    )


CALLBACKS = Table(
    "callbacks",
    (
        "conversion_id",
        "pub",
        "attempt",
        "ts",
        "url",
        "status_code",
        "duration_ms",
        "outcome",
        "error",
    ),
    callback_row,
)
