"""How each topic's records become a table's rows: the one path from event to row.

A `Table` names its ClickHouse table, its columns in insert order and the
Avro fields (milliseconds since the epoch) that fill DateTime64 columns under
another name; every other column is filled by the field of its own name. The
sink sends a table's message bodies undecoded, as one Avro container file under
`avro_schema(...)`, and ClickHouse reads each column from its field (FORMAT
Avro; fields without a column are skipped). A column change is made here and in
the migration that adds it; tests/test_sink_avro.py checks every schema example
against the row it becomes. Pure functions.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

SUBS = ("sub1", "sub2", "sub3", "sub4", "sub5")


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[str, ...]
    # Avro field (long, ms since the epoch) -> the DateTime64(3, 'UTC') column it fills
    millis: Mapping[str, str] = field(default_factory=dict)

    def field_of(self, column: str) -> str:
        """The Avro field a column is read from."""
        return next((f for f, c in self.millis.items() if c == column), column)

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


CLICKS = Table(
    "clicks",
    ("click_id", "ts", "campaign_id", "pub", *SUBS, "ip", "user_agent"),
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
    {"received_at_ms": "received_at"},
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
    {"click_ts_ms": "click_ts", "conversion_ts_ms": "conversion_ts"},
)
CALLBACKS = Table(
    "callbacks",
    (
        "attempt_id",
        "conversion_id",
        "pub",
        "attempt",
        "ts",
        "url",
        "status_code",
        "duration_ms",
        "outcome",
        "error",
        "advertiser",
    ),
    {"ts_ms": "ts"},
)
SKAN_POSTBACKS = Table(
    "skan_postbacks",
    (
        "skan_id",
        "received_at",
        "source_ip",
        "version",
        "ad_network_id",
        "source_identifier",
        "skan_campaign_id",
        "app_id",
        "source_app_id",
        "source_domain",
        "transaction_id",
        "redownload",
        "fidelity_type",
        "did_win",
        "conversion_value",
        "coarse_conversion_value",
        "postback_sequence_index",
        "attribution_signature",
        "outcome",
        "detail",
        "raw",
        "event",
        "revenue",
        "revenue_reporting",
        "currency",
        "campaign_id",
        "pub",
    ),
    {"received_at_ms": "received_at"},
)
ADJUSTMENTS = Table(
    "adjustments",
    (
        "adjustment_id",
        "conversion_id",
        "postback_id",
        "ts",
        "kind",
        "outcome",
        "detail",
        "campaign_id",
        "advertiser",
        "pub",
        "event",
        "currency",
        "conversion_ts",
        "revenue_delta",
        "payout_delta",
        "revenue_delta_reporting",
        "payout_delta_reporting",
    ),
    {"ts_ms": "ts", "conversion_ts_ms": "conversion_ts"},
)
