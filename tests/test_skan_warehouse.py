"""The SKAdNetwork queries analysts run, on the table the sink fills: the README's
"SKAN installs and revenue by campaign and postback window" and the SQL of the
`skan_*` columns of campaign_stats_hourly (owned by the warehouse, given here)."""

import json
from datetime import UTC
from decimal import Decimal

import pytest

from pipeline import codec
from pipeline.sink import app as sink_app
from pipeline.sink import migrations as ddl

from .conftest import make_settings
from .test_skan_core import APPLE_V3_WIN, V4
from .test_skan_core import sign as signed
from .test_skan_wiring import Stage

pytestmark = pytest.mark.clickhouse

# A SKAN install is a verified postback that won the attribution, the first of its
# transaction (postback-sequence-index 0, or none before version 4); an event is a
# verified postback whose conversion value decodes to an event other than install;
# revenue is what the values decode to, in the reporting currency. Duplicates and
# every other outcome count nowhere.
ANALYST_QUERY = """
SELECT campaign_id, pub,
       ifNull(postback_sequence_index, 0) AS postback_window,
       count() AS postbacks,
       countIf(ifNull(did_win, true) AND postback_window = 0) AS installs,
       countIf(event NOT IN ('', 'install')) AS events,
       sum(revenue_reporting) AS revenue_reporting
FROM {db}.skan_postbacks FINAL
WHERE outcome = 'verified'
GROUP BY campaign_id, pub, postback_window
ORDER BY campaign_id, pub, postback_window
"""

# campaign_stats_hourly's skan_installs, skan_events, skan_revenue_reporting, in the
# hour the postback was received (Apple's postbacks carry no time of their own)
STATS_SQL = """
SELECT toStartOfHour(received_at) AS hour, campaign_id, pub,
       countIf(ifNull(did_win, true) AND ifNull(postback_sequence_index, 0) = 0)
           AS skan_installs,
       countIf(event NOT IN ('', 'install')) AS skan_events,
       toDecimal128(sum(revenue_reporting), 6) AS skan_revenue_reporting
FROM {db}.skan_postbacks FINAL
WHERE outcome = 'verified'
GROUP BY hour, campaign_id, pub
ORDER BY hour, campaign_id, pub
"""

HOUR = 1_795_636_800_000  # a whole hour, in ms


def postbacks() -> list[dict]:
    """Records of every kind, as the worker's stage makes them (example config plus
    source 1234 -> c1/net2; app 123456789: fine 0 install, 1-63 purchase 4.99;
    coarse low install, medium purchase, high purchase 9.99)."""
    s = Stage()
    a = {**V4, "transaction-id": "txn-a"}
    at = HOUR + 60_000
    s.put(signed({**a, "conversion-value": 5}), at)  # window 0: install + purchase 4.99
    s.put(signed({**a, "postback-sequence-index": 1, "coarse-conversion-value": "high"}), at)
    s.put(signed({**a, "postback-sequence-index": 1, "coarse-conversion-value": "high"}), at)
    later = HOUR + 3_600_000 + 5_000  # the next hour
    s.put(signed({**a, "postback-sequence-index": 2, "coarse-conversion-value": "low"}), later)
    s.put(signed({**V4, "transaction-id": "txn-b", "conversion-value": 0}), later)
    s.put(signed({**V4, "transaction-id": "txn-c", "did-win": False}), later)  # lost
    s.put({**V4, "transaction-id": "txn-d"}, later)  # unsigned: invalid_signature
    s.put(APPLE_V3_WIN, later)  # Apple's, source 42: c2/net2, app 525463029 (no rules)
    s.put(json.dumps({**APPLE_V3_WIN, "campaign-id": 43}).encode(), later)  # tampered
    records = [record for _, record in s.out]
    assert [r["outcome"] for r in records].count("verified") == 6
    return records


async def test_installs_and_revenue_by_campaign_and_postback_window(clickhouse_url):
    settings = make_settings("127.0.0.1:9", clickhouse_url)
    db = settings.clickhouse_database
    client = ddl.connect(clickhouse_url)
    sink = sink_app.build(settings)
    sink.client = client
    try:
        ddl.migrate(client, db)
        bodies = [codec.SKAN_POSTBACK.encode(r) for r in postbacks()]
        await sink._write({settings.topic("skan-postbacks"): bodies + bodies})  # a replay too
        by_window = client.query(ANALYST_QUERY.format(db=db)).result_rows
        stats = client.query(STATS_SQL.format(db=db)).result_rows
        outcomes = client.query(
            f"SELECT outcome, count() FROM {db}.skan_postbacks FINAL GROUP BY outcome"
        ).result_rows
    finally:
        client.close()
    assert dict(outcomes) == {"verified": 6, "duplicate": 1, "invalid_signature": 2}
    d = Decimal
    assert by_window == [
        ("c1", "net2", 0, 3, 2, 1, d("4.99")),  # a, b installs; c lost; a's purchase
        ("c1", "net2", 1, 1, 0, 1, d("9.99")),  # the duplicate of a's second is not here
        ("c1", "net2", 2, 1, 0, 0, d("0")),
        ("c2", "net2", 0, 1, 1, 0, d("0")),  # Apple's v3 postback: no rules for its app
    ]
    # clickhouse-connect reads DateTime64(3, 'UTC') as naive UTC datetimes
    hours = [(row[0].replace(tzinfo=UTC).timestamp() * 1000, *row[1:]) for row in stats]
    assert hours == [
        (HOUR, "c1", "net2", 1, 2, d("14.98")),
        (HOUR + 3_600_000, "c1", "net2", 1, 0, d("0")),
        (HOUR + 3_600_000, "c2", "net2", 1, 0, d("0")),
    ]
