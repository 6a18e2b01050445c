"""Row shaping for the warehouse, two equivalent ways.

Each `Table` names its ClickHouse table and its columns in insert order, and
shapes a Kafka record into a row twice over:
- `row`: a pure function from one decoded record to one row tuple;
- `avro_schema`: the record's Avro schema with its fields renamed to the
  columns (and ms timestamps marked `timestamp-millis`), under which ClickHouse
  reads the undecoded message bodies straight into the table (FORMAT Avro;
  fields without a column are skipped). The sink uses this one.
Both give the same table contents (tests/test_sink_avro.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
    # Avro field (long, ms since the epoch) -> the DateTime64(3, 'UTC') column it fills
    millis: Mapping[str, str] = field(default_factory=dict)

    def avro_schema(self, schema: dict) -> dict:
        """`schema` (a record's, as parsed JSON) as ClickHouse should read it into
        this table: each `millis` field renamed to its column and typed
        `timestamp-millis`. Names and logical types never change the binary
        encoding, so bodies written with `schema` are valid under the result.

        Raises ValueError when a column has no field of that name: ClickHouse
        would refuse the insert (or fill a default) instead.
        """
        shaped = copy.deepcopy(schema)
        for f in shaped["fields"]:
            if f["name"] in self.millis:
                f["name"] = self.millis[f["name"]]
                f["type"] = _timestamp_millis(f["type"])
        missing = set(self.columns) - {f["name"] for f in shaped["fields"]}
        if missing:
            raise ValueError(f"{schema['name']} has no field for column(s) {sorted(missing)}")
        return shaped


def _timestamp_millis(avro_type):
    if avro_type == "long":
        return {"type": "long", "logicalType": "timestamp-millis"}
    if isinstance(avro_type, list):  # a nullable union
        return [_timestamp_millis(t) for t in avro_type]
    if avro_type == "null":
        return avro_type
    raise ValueError(f"a timestamp in ms must be a long, not {avro_type!r}")


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
    {"ts_ms": "ts"},
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
    {"received_at_ms": "received_at"},
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
    {"click_ts_ms": "click_ts", "conversion_ts_ms": "conversion_ts"},
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
    {"ts_ms": "ts"},
)
