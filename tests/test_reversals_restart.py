"""Reversals across a worker killed mid-way (SIGKILL: no commit, no flush): every
reversal is applied exactly once, a reversal waiting for its conversion survives the
restart, and repeats afterwards find the conversions reversed. Through the HTTP API,
checked in ClickHouse; on Tansu and Apache Kafka, and with the RocksDB store."""

from __future__ import annotations

import asyncio
import signal
from decimal import Decimal

import pytest

from pipeline.core import clickid
from pipeline.sink import migrations as ddl

from .conftest import write_config
from .stack import ingress, rows_eventually, sink, start_component, stop_component
from .test_reversals_scenario import late_click, query, reverse
from .test_worker_e2e import click, postback, worker_sections

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.e2e]

D = Decimal


@pytest.fixture
def ch(clickhouse_url):
    client = ddl.connect(clickhouse_url)
    yield client
    client.close()


async def purchases(http, n: int, prefix: str) -> list[tuple[str, str]]:
    """n purchases of 10.00 (payout 2.00), each with its own txn_id: (txn_id, conversion_id)."""
    out = []
    for i in range(n):
        txn = f"{prefix}-{i}"
        out.append(
            (txn, await postback(http, await click(http), "purchase", txn_id=txn, revenue="10"))
        )
    return out


async def take_back(http, bought) -> list[str]:
    """For each purchase: a refund of 4 by conversion_id, then a full reversal by txn_id."""
    ids = []
    for txn, conversion_id in bought:
        ids.append(await reverse(http, conversion_id=conversion_id, revenue="4"))
        ids.append(await reverse(http, txn_id=txn))
    return ids


@pytest.mark.parametrize(
    "broker_name,store",
    [("tansu", "memory://"), ("tansu", "rocksdb://"), ("apache_kafka", "memory://")],
)
async def test_reversals_survive_a_worker_killed_mid_way(
    broker_name, store, request, clickhouse_url, ch, tmp_path
):
    broker = request.getfixturevalue(broker_name)
    sections = worker_sections()
    sections["worker"] += f'\nstore = "{store}"\ndata_dir = "{tmp_path / "data"}"'
    path, settings = write_config(tmp_path, broker, clickhouse_url, **sections)
    db, log = settings.clickhouse_database, tmp_path / "worker.log"
    worker = start_component("worker", path, log)
    try:
        async with ingress(settings) as http, sink(settings):
            bought = await purchases(http, 40, "o")
            ids = "', '".join(c for _, c in bought)
            sql = f"SELECT 1 FROM {db}.conversions FINAL WHERE conversion_id IN ('{ids}')"
            await rows_eventually(ch, sql, len(bought), 120)
            # a purchase whose click is late, and its reversal, waiting across the restart
            late = clickid.issue(settings.secrets)
            waiting = (
                "o-late",
                await postback(http, late, "purchase", txn_id="o-late", revenue="10"),
            )
            waiting_reversal = await reverse(http, txn_id="o-late")

            reversals = await take_back(http, bought[:10])
            flowing = asyncio.create_task(take_back(http, bought[10:]))
            await asyncio.sleep(0.5)
            worker.send_signal(signal.SIGKILL)  # mid-way: no commit, no flush
            worker.wait()
            reversals += await flowing
            worker = start_component("worker", path, log)
            await late_click(settings, broker, late, pub="net1")
            applied = [*reversals, waiting_reversal]
            await rows_eventually(ch, f"SELECT 1 FROM {db}.adjustments FINAL", len(applied), 180)
            repeats = [await reverse(http, txn_id=txn) for txn, _ in bought[::4]]
            await rows_eventually(
                ch, f"SELECT 1 FROM {db}.adjustments FINAL", len(applied) + len(repeats), 120
            )
            await asyncio.sleep(2)  # anything applied twice would show by now
            rows = {
                r["adjustment_id"]: r for r in query(ch, f"SELECT * FROM {db}.adjustments FINAL")
            }
            conversions = {
                r["conversion_id"]: r for r in query(ch, f"SELECT * FROM {db}.conversions FINAL")
            }
            raw = ch.query(
                f"SELECT adjustment_id, uniqExact(outcome, revenue_delta, payout_delta) "
                f"FROM {db}.adjustments GROUP BY adjustment_id"
            ).result_rows
    finally:
        assert stop_component(worker) == 0, log.read_text()[-3000:]

    assert set(rows) == {*applied, *repeats}, "one adjustment per reversal, no more"
    assert [rows[r]["outcome"] for r in applied] == ["applied"] * len(applied), log.read_text()[
        -3000:
    ]
    assert [rows[r]["outcome"] for r in repeats] == ["already_reversed"] * len(repeats)
    assert all(same == 1 for _, same in raw), "a replayed reversal writes the very same row"
    for i, (_, conversion_id) in enumerate(bought):
        refund, full = rows[reversals[2 * i]], rows[reversals[2 * i + 1]]
        assert (refund["kind"], refund["revenue_delta"], refund["payout_delta"]) == (
            "refund",
            D("-4"),
            D("-0.8"),
        )
        assert (full["kind"], full["revenue_delta"], full["payout_delta"]) == (
            "reversal",
            D("-6"),
            D("-1.2"),
        )
        assert refund["conversion_id"] == full["conversion_id"] == conversion_id
    late_row = rows[waiting_reversal]
    assert (late_row["conversion_id"], late_row["revenue_delta"]) == (waiting[1], D("-10"))
    for _, conversion_id in [*bought, waiting]:
        row = conversions[conversion_id]
        assert (row["revenue"], row["payout"]) == (D("10"), D("2"))  # append-only
    statuses = dict(
        ch.query(
            f"SELECT conversion_id, argMax(status, (_part_index, _part_offset)) "
            f"FROM {db}.conversions GROUP BY conversion_id"
        ).result_rows
    )
    finals = {c: conversions[c]["status"] for c in conversions}
    for _, conversion_id in [*bought, waiting]:
        assert "reversed" in (finals[conversion_id], statuses[conversion_id]), conversion_id
