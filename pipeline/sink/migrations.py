"""The warehouse schema, as numbered migrations applied once each.

Tables are ReplacingMergeTree keyed by the event's own ID: a Kafka message
delivered twice becomes two identical rows that merge into one, and queries
read with FINAL see exactly one.
The same DDL runs on a ClickHouse server and on the embedded engine.
"""

from __future__ import annotations

import logging

import clickhouse_connect

log = logging.getLogger(__name__)

_SUBS = ", ".join(f"sub{i} String" for i in range(1, 6))

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "clicks and postbacks",
        [
            f"""CREATE TABLE IF NOT EXISTS {{db}}.clicks (
                click_id String, ts DateTime64(3, 'UTC'),
                campaign_id LowCardinality(String), pub LowCardinality(String),
                {_SUBS}, ip String, user_agent String
            ) ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMM(ts) ORDER BY (campaign_id, pub, ts, click_id)""",
            """CREATE TABLE IF NOT EXISTS {db}.postbacks (
                postback_id String, received_at DateTime64(3, 'UTC'), click_id String,
                advertiser LowCardinality(String), event LowCardinality(String),
                txn_id Nullable(String), revenue Nullable(Decimal(18, 6)),
                currency Nullable(String), source_ip String,
                outcome LowCardinality(String), detail String, raw String
            ) ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMM(received_at) ORDER BY (received_at, postback_id)""",
        ],
    ),
    (
        2,
        "conversions and hourly campaign stats",
        [
            f"""CREATE TABLE IF NOT EXISTS {{db}}.conversions (
                conversion_id String, postback_id String, click_id String,
                campaign_id LowCardinality(String), advertiser LowCardinality(String),
                pub LowCardinality(String), {_SUBS}, event LowCardinality(String),
                txn_id Nullable(String), status LowCardinality(String), detail String,
                revenue Decimal(18, 6), payout Decimal(18, 6), currency LowCardinality(String),
                revenue_reporting Decimal(18, 6), payout_reporting Decimal(18, 6),
                click_ts Nullable(DateTime64(3, 'UTC')), conversion_ts DateTime64(3, 'UTC'),
                ctit_seconds Nullable(Int64)
            ) ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMM(conversion_ts) ORDER BY (conversion_ts, conversion_id)""",
            # a plain view over the deduplicated tables: always exact, also after replays
            """CREATE VIEW IF NOT EXISTS {db}.campaign_stats_hourly AS
            SELECT hour, campaign_id, pub,
                   sum(clicks) AS clicks, sum(installs) AS installs, sum(events) AS events,
                   sum(revenue_reporting) AS revenue_reporting,
                   sum(payout_reporting) AS payout_reporting
            FROM (
                SELECT toStartOfHour(ts) AS hour, campaign_id, pub, count() AS clicks,
                       toUInt64(0) AS installs, toUInt64(0) AS events,
                       toDecimal128(0, 6) AS revenue_reporting,
                       toDecimal128(0, 6) AS payout_reporting
                FROM {db}.clicks FINAL GROUP BY hour, campaign_id, pub
                UNION ALL
                SELECT toStartOfHour(conversion_ts) AS hour, campaign_id, pub,
                       toUInt64(0) AS clicks, countIf(event = 'install') AS installs,
                       countIf(event != 'install') AS events,
                       toDecimal128(sum(revenue_reporting), 6) AS revenue_reporting,
                       toDecimal128(sum(payout_reporting), 6) AS payout_reporting
                FROM {db}.conversions FINAL WHERE status = 'attributed'
                GROUP BY hour, campaign_id, pub
            )
            GROUP BY hour, campaign_id, pub""",
        ],
    ),
    (
        3,
        "callback attempts",
        [
            # one row per attempt: (pub, conversion_id, attempt) is the attempt's identity
            """CREATE TABLE IF NOT EXISTS {db}.callbacks (
                conversion_id String, pub LowCardinality(String), attempt UInt32,
                ts DateTime64(3, 'UTC'), url String, status_code Nullable(UInt16),
                duration_ms UInt32, outcome LowCardinality(String), error String
            ) ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMM(ts) ORDER BY (pub, conversion_id, attempt)""",
        ],
    ),
    (
        5,
        "adjustments: reversals and refunds",
        [
            # one row per accepted reversal, its ID the reversal's postback_id: a replay
            # writes the same row again, which merges away
            """CREATE TABLE IF NOT EXISTS {db}.adjustments (
                adjustment_id String, conversion_id String, postback_id String,
                ts DateTime64(3, 'UTC'), kind LowCardinality(String),
                outcome LowCardinality(String), detail String,
                campaign_id LowCardinality(String), advertiser LowCardinality(String),
                pub LowCardinality(String), event LowCardinality(String),
                currency LowCardinality(String), conversion_ts DateTime64(3, 'UTC'),
                revenue_delta Decimal(18, 6), payout_delta Decimal(18, 6),
                revenue_delta_reporting Decimal(18, 6), payout_delta_reporting Decimal(18, 6)
            ) ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMM(ts) ORDER BY (ts, adjustment_id)""",
        ],
    ),
    (
        6,
        "SKAdNetwork postbacks, and forwards in callbacks",
        [
            # every postback a device sent, whatever its outcome; skan_id is the ingress's
            """CREATE TABLE IF NOT EXISTS {db}.skan_postbacks (
                skan_id String, received_at DateTime64(3, 'UTC'), source_ip String,
                version LowCardinality(String), ad_network_id LowCardinality(String),
                source_identifier String, skan_campaign_id String, app_id String,
                source_app_id String, source_domain String, transaction_id String,
                redownload Nullable(Bool), fidelity_type Nullable(Int32),
                did_win Nullable(Bool), conversion_value Nullable(Int32),
                coarse_conversion_value LowCardinality(String),
                postback_sequence_index Nullable(Int32), attribution_signature String,
                outcome LowCardinality(String), detail String, raw String,
                event LowCardinality(String), revenue Decimal(18, 6),
                revenue_reporting Decimal(18, 6), currency LowCardinality(String),
                campaign_id LowCardinality(String), pub LowCardinality(String)
            ) ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMM(received_at) ORDER BY (received_at, skan_id)""",
            # a forward's attempts: pub '', the advertiser here, conversion_id its skan_id
            """ALTER TABLE {db}.callbacks
            ADD COLUMN IF NOT EXISTS advertiser LowCardinality(String) DEFAULT ''""",
        ],
    ),
    (
        20,
        "callback attempts keyed by their attempt_id",
        [
            # each HTTP request is a row: a request made again after a crash has the same
            # attempt number and its own attempt_id (a new column may end the sorting key)
            """ALTER TABLE {db}.callbacks
                ADD COLUMN IF NOT EXISTS attempt_id String FIRST,
                MODIFY ORDER BY (pub, conversion_id, attempt, attempt_id)""",
        ],
    ),
]


def migrate(client, database: str) -> list[int]:
    """Create the database and apply pending migrations; return the versions applied.

    Idempotent: versions are recorded in `<db>.schema_migrations`.
    """
    client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
    client.command(
        f"CREATE TABLE IF NOT EXISTS {database}.schema_migrations "
        "(version UInt32, name String, applied_at DateTime DEFAULT now()) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )
    done = {
        row[0]
        for row in client.query(
            f"SELECT version FROM {database}.schema_migrations FINAL"
        ).result_rows
    }
    applied = []
    for version, name, statements in MIGRATIONS:
        if version in done:
            continue
        for sql in statements:
            client.command(sql.format(db=database))
        client.insert(f"{database}.schema_migrations", [(version, name)], ["version", "name"])
        log.info("migration %d applied: %s", version, name)
        applied.append(version)
    return applied


def connect(url: str, database: str | None = None, **kwargs):
    """A clickhouse-connect client for an http(s) URL (user and password may be in it)."""
    return clickhouse_connect.get_client(dsn=url, database=database or "", **kwargs)


def run(settings) -> list[int]:
    """`pipeline migrate`: create or upgrade the database; returns the versions applied."""
    client = connect(settings.clickhouse_url)
    try:
        applied = migrate(client, settings.clickhouse_database)
    finally:
        client.close()
    print(f"database {settings.clickhouse_database}: applied {applied or 'nothing, up to date'}")
    return applied
