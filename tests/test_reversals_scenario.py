"""The judged scenario of reversals and refunds, end to end: requests through the
ingress's HTTP API, the worker as its own process, the sink and the callbacks service
in-process, a publisher as a real loopback HTTP server; checked in ClickHouse and in
what the publisher received.

Purchases and installs are attributed, then taken back: full reversals (by txn_id and
by conversion_id), partial refunds (a share payout and a fixed one, in the
conversion's currency and in another), a refund above what is left, double
reversals, reversals of conversions that were not attributed, of unknown ones and of
another advertiser's, reversals sent before their conversion exists, a replayed
reversal message, and requests the ingress refuses. Every adjustment's outcome and
deltas, every conversion's final status and amounts, the net hourly sums against the
raw tables, and reversal callbacks only to the publisher that asked for them.

Status precedence: the `conversions` table of this branch is a ReplacingMergeTree
without a version column, so FINAL keeps the row inserted last. The ledger sends the
`reversed` row after its conversion's (and again after any replay of either), so it
is the last one; the warehouse's `ReplacingMergeTree(status_rank)` makes it win
whatever the order. `final_status` accepts either guarantee: the FINAL row, or else
the latest row by insertion (part, then offset in the part).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from aiokafka import AIOKafkaProducer

from pipeline import codec, config
from pipeline.callbacks import app as callbacks_app
from pipeline.core import clickid, validation
from pipeline.dev.kafka import free_port
from pipeline.sink import migrations as ddl

from .callbacks_support import ALL_MACROS, eventually, publisher_server, read_topic, running
from .conftest import config_text, without_skan
from .stack import ingress, rows_eventually, sink, start_component, stop_component

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.e2e]

D = Decimal
GRACE = 4  # seconds: a reversal waits this long for its conversion

# campaign_stats_hourly as it should read with reversals (the warehouse branch owns the
# view; this is the SQL reported to it): clicks as before; installs and events count the
# conversions attributed and not reversed; the amounts are net: attributed and reversed
# conversions at the amounts they were attributed with, plus the applied adjustments,
# all in the hour of the original conversion.
NET_HOURLY_SQL = """
SELECT hour, campaign_id, pub,
       sum(clicks) AS clicks, sum(installs) AS installs, sum(events) AS events,
       sum(revenue_reporting) AS revenue_reporting,
       sum(payout_reporting) AS payout_reporting
FROM (
    SELECT toStartOfHour(ts) AS hour, campaign_id, pub, count() AS clicks,
           toUInt64(0) AS installs, toUInt64(0) AS events,
           toDecimal128(0, 6) AS revenue_reporting, toDecimal128(0, 6) AS payout_reporting
    FROM {db}.clicks FINAL GROUP BY hour, campaign_id, pub
    UNION ALL
    SELECT toStartOfHour(conversion_ts) AS hour, campaign_id, pub, toUInt64(0) AS clicks,
           countIf(event = 'install' AND status = 'attributed') AS installs,
           countIf(event != 'install' AND status = 'attributed') AS events,
           toDecimal128(sum(revenue_reporting), 6) AS revenue_reporting,
           toDecimal128(sum(payout_reporting), 6) AS payout_reporting
    FROM {db}.conversions FINAL WHERE status IN ('attributed', 'reversed')
    GROUP BY hour, campaign_id, pub
    UNION ALL
    SELECT toStartOfHour(conversion_ts) AS hour, campaign_id, pub, toUInt64(0) AS clicks,
           toUInt64(0) AS installs, toUInt64(0) AS events,
           toDecimal128(sum(revenue_delta_reporting), 6) AS revenue_reporting,
           toDecimal128(sum(payout_delta_reporting), 6) AS payout_reporting
    FROM {db}.adjustments FINAL WHERE outcome = 'applied'
    GROUP BY hour, campaign_id, pub
)
GROUP BY hour, campaign_id, pub
"""

PUBLISHERS = """
[[advertisers]]
id = "rival"
token = "rival-token"

[[publishers]]
id = "listen"
postback_url = "http://127.0.0.1:{port}/ok?{macros}"
events = ["install", "purchase", "reversal"]

[[publishers]]
id = "deaf"
postback_url = "http://127.0.0.1:{port}/ok?{macros}"
events = ["install", "purchase"]
"""


def scenario_config(tmp_path, bootstrap, clickhouse, port):
    sections = {
        "attribution": f'unknown_click_grace = "{GRACE}s"',
        "worker": f'web_listen = "127.0.0.1:{free_port()}"\nstate_margin = "1h"\n'
        'tick_interval = "250ms"',
        "callbacks": 'timeout = "2s"\nretry_schedule = ["200ms", "400ms"]\n'
        "allow_private_networks = true",
    }
    text = config_text(bootstrap, clickhouse, **sections)
    text = re.sub(r"^\[\[publishers\]\]\n(?:[^\[\n].*\n|\n)*", "", without_skan(text), flags=re.M)
    text += PUBLISHERS.format(port=port, macros=ALL_MACROS)
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return config.load(path), path


async def click(http, campaign, pub) -> str:
    async with http.get(f"/click/{campaign}", params={"pub": pub}, allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        return r.headers["X-Click-Id"]


async def postback(http, click_id, event, **params) -> str:
    data = {"token": "adv-secret", "click_id": click_id, "event": event, **params}
    async with http.post("/postback", data=data) as r:
        body = await r.json()
        assert r.status == 200, body
        return body["postback_id"]


async def reverse(http, token="adv-secret", answer=200, code=None, **params) -> str | None:
    """A reversal request (GET, as most advertisers send them); its postback_id."""
    async with http.get("/postback", params={"token": token, "status": "reversed", **params}) as r:
        body = await r.json()
        assert r.status == answer, body
        if answer != 200:
            assert body["error"] == code, body
            return None
        return body["postback_id"]


async def late_click(settings, bootstrap, click_id, pub="listen") -> None:
    """The click of `click_id`, published only now (a lagging ingress)."""
    _, event = validation.click_record(settings, "c1", {"pub": pub}, "198.51.100.7", "")
    event["click_id"], event["ts_ms"] = click_id, clickid.verify(click_id, settings.secrets)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic("clicks"), codec.CLICK.encode(event), key=click_id.encode()
        )
    finally:
        await producer.stop()


def query(ch, sql) -> list[dict]:
    result = ch.query(sql)
    return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]


def hour_of(ts) -> datetime:
    """The UTC hour of a ClickHouse DateTime, naive (whatever tz the client attached)."""
    if ts.tzinfo is not None:
        ts = ts.astimezone(UTC).replace(tzinfo=None)
    return ts.replace(minute=0, second=0, microsecond=0)


def final_status(ch, db) -> dict[str, str]:
    """Each conversion's status: what FINAL reads where the engine makes `reversed`
    win, else the row inserted last (see the module docstring)."""
    final = {
        r["conversion_id"]: r["status"] for r in query(ch, f"SELECT * FROM {db}.conversions FINAL")
    }
    latest = dict(
        ch.query(
            f"SELECT conversion_id, argMax(status, (_part_index, _part_offset)) "
            f"FROM {db}.conversions GROUP BY conversion_id"
        ).result_rows
    )
    return {cid: "reversed" if "reversed" in (s, latest[cid]) else s for cid, s in final.items()}


async def test_reversals_and_refunds_end_to_end(tansu, clickhouse_url, tmp_path):
    async with publisher_server() as server:
        settings, path = scenario_config(tmp_path, tansu, clickhouse_url, server.port)
        db, log = settings.clickhouse_database, tmp_path / "worker.log"
        ch = ddl.connect(clickhouse_url)
        worker = start_component("worker", path, log)
        callbacks = callbacks_app.build(settings)
        try:
            async with ingress(settings) as http, sink(settings), running(callbacks):
                await _scenario(settings, http, ch, db, server)
        finally:
            ch.close()
            assert stop_component(worker) == 0, log.read_text()[-3000:]


async def _scenario(settings, http, ch, db, server):
    # --- conversions: (status, revenue, payout, currency, revenue_rep, payout_rep) ---
    conv: dict[str, str] = {}
    want: dict[str, tuple] = {}
    a, b = await click(http, "c1", "listen"), await click(http, "c1", "deaf")
    c, d = await click(http, "c2", "listen"), await click(http, "c1", "listen")
    conv["P1"] = await postback(http, a, "purchase", txn_id="o-1", revenue="20")
    want["P1"] = ("reversed", "20", "4", "USD", "20", "4")
    conv["P2"] = await postback(http, a, "install")
    want["P2"] = ("attributed", "3", "2", "USD", "3", "2")  # fixed payout
    conv["P3"] = await postback(http, b, "purchase", txn_id="o-2", revenue="50")
    want["P3"] = ("reversed", "50", "10", "USD", "50", "10")
    conv["P4"] = await postback(http, c, "purchase", txn_id="o-3", revenue="7")
    want["P4"] = ("unknown_event", "7", "0", "EUR", "0", "0")  # c2 has no purchase
    conv["P5"] = await postback(http, c, "install")
    want["P5"] = ("reversed", "0", "1.5", "EUR", "0", "1.62")
    conv["P6"] = await postback(http, d, "purchase", txn_id="o-4", revenue="30", currency="EUR")
    want["P6"] = ("attributed", "30", "6", "EUR", "32.4", "6.48")
    # the first conversion of a txn_id to reach the txn stage owns it: P1, once decided
    await rows_eventually(
        ch, f"SELECT 1 FROM {db}.conversions FINAL WHERE conversion_id = '{conv['P1']}'", 1, 90
    )
    conv["P7"] = await postback(
        http, await click(http, "c1", "listen"), "purchase", txn_id="o-1", revenue="5"
    )
    want["P7"] = ("duplicate", "5", "0", "USD", "0", "0")
    ids = "', '".join(conv.values())
    await rows_eventually(
        ch, f"SELECT 1 FROM {db}.conversions FINAL WHERE conversion_id IN ('{ids}')", len(conv), 90
    )

    # --- reversals: (kind, outcome, conversion, deltas) --------------------------------
    adj: dict[str, str] = {}
    expect: dict[str, tuple] = {}

    async def take_back(name, kind, outcome, target, deltas=("0", "0", "0", "0"), **params):
        adj[name] = await reverse(http, **params)
        expect[name] = (kind, outcome, target, tuple(D(x) for x in deltas))

    await take_back("R1", "reversal", "applied", "P1", ("-20", "-4", "-20", "-4"), txn_id="o-1")
    await take_back("R2", "reversal", "already_reversed", "P1", txn_id="o-1")  # twice
    await take_back(
        "R3",
        "refund",
        "applied",
        "P3",
        ("-10", "-2", "-10", "-2"),
        conversion_id=conv["P3"],
        revenue="10",
    )
    await take_back("R4", "refund", "exceeds_revenue", "P3", txn_id="o-2", revenue="45")  # 40 left
    await take_back("R5", "reversal", "applied", "P3", ("-40", "-8", "-40", "-8"), txn_id="o-2")
    await take_back(
        "R6",
        "refund",
        "applied",
        "P2",
        ("-1", "0", "-1", "0"),
        conversion_id=conv["P2"],
        revenue="1",
    )  # a fixed payout stays
    await take_back("R7", "reversal", "not_attributed", "P4", txn_id="o-3")
    await take_back("R8", "reversal", "not_attributed", "P7", conversion_id=conv["P7"])
    await take_back("R9", "reversal", "unknown_conversion", None, txn_id="no-such-order")
    await take_back("R10", "reversal", "unknown_conversion", None, conversion_id=uuid.uuid4().hex)
    await take_back(
        "R11",
        "refund",
        "applied",
        "P6",
        ("-10", "-2", "-10.8", "-2.16"),
        txn_id="o-4",
        revenue="10",
    )
    await take_back(
        "R12", "reversal", "applied", "P5", ("0", "-1.5", "0", "-1.62"), conversion_id=conv["P5"]
    )
    await take_back(  # another advertiser cannot touch acme's conversion
        "R13", "reversal", "unknown_conversion", None, token="rival-token", conversion_id=conv["P6"]
    )
    await take_back(  # 5.40 USD is 5 EUR at the [fx] rate 1.08
        "R14",
        "refund",
        "applied",
        "P6",
        ("-5", "-1", "-5.4", "-1.08"),
        conversion_id=conv["P6"],
        revenue="5.40",
        currency="USD",
    )
    # refused: each a row in postbacks with its code, nothing in adjustments
    await reverse(http, answer=400, code="invalid_param", txn_id="o-1", status="approved")
    await reverse(http, answer=400, code="missing_param")
    await reverse(http, answer=400, code="invalid_param", txn_id="o-4", revenue="0")
    await reverse(http, answer=401, code="bad_token", token="wrong-token", txn_id="o-4")

    # --- reversals that arrive before their conversion exists ----------------------
    late, later = clickid.issue(settings.secrets), clickid.issue(settings.secrets)
    conv["P8"] = await postback(http, late, "purchase", txn_id="o-late", revenue="10")
    want["P8"] = ("reversed", "10", "2", "USD", "10", "2")
    conv["P9"] = await postback(http, later, "purchase", revenue="10")
    want["P9"] = ("attributed", "10", "2", "USD", "10", "2")
    await take_back("R15", "reversal", "applied", "P8", ("-10", "-2", "-10", "-2"), txn_id="o-late")
    await take_back(
        "R16",
        "refund",
        "applied",
        "P9",
        ("-3", "-0.6", "-3", "-0.6"),
        conversion_id=conv["P9"],
        revenue="3",
    )
    await asyncio.sleep(0.5)  # the reversals wait at the txn stage and the ledger
    await late_click(settings, settings.kafka_bootstrap, late)
    await late_click(settings, settings.kafka_bootstrap, later)

    # --- a replayed reversal: the same record on the postbacks topic again -----------
    await rows_eventually(
        ch, f"SELECT 1 FROM {db}.adjustments FINAL WHERE adjustment_id = '{adj['R3']}'", 1, 90
    )
    [r3] = [
        p
        for p in await read_topic(settings, "postbacks", codec.POSTBACK)
        if p["postback_id"] == adj["R3"]
    ]
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    await producer.send_and_wait(
        settings.topic("postbacks"), codec.POSTBACK.encode(r3), key=validation.record_key(r3)
    )
    await producer.stop()

    # --- every adjustment ---------------------------------------------------------------
    await rows_eventually(ch, f"SELECT 1 FROM {db}.adjustments FINAL", len(adj), 120)
    late_ids = f"'{conv['P8']}', '{conv['P9']}'"
    sql = f"SELECT 1 FROM {db}.conversions FINAL WHERE conversion_id IN ({late_ids})"
    await rows_eventually(ch, sql, 2, 90)
    await asyncio.sleep(2)  # anything applied twice would show by now
    rows = {r["adjustment_id"]: r for r in query(ch, f"SELECT * FROM {db}.adjustments FINAL")}
    assert set(rows) == set(adj.values()), "one adjustment per accepted reversal, no more"
    for name, (kind, outcome, target, deltas) in expect.items():
        row = rows[adj[name]]
        got = (row["kind"], row["outcome"], row["conversion_id"] or None)
        assert got == (kind, outcome, conv.get(target) if target else got[2]), (name, row)
        assert (
            tuple(
                row[f]
                for f in (
                    "revenue_delta",
                    "payout_delta",
                    "revenue_delta_reporting",
                    "payout_delta_reporting",
                )
            )
            == deltas
        ), (name, row)
        assert row["postback_id"] == row["adjustment_id"]
        if outcome == "applied":
            target_row = query(
                ch, f"SELECT * FROM {db}.conversions FINAL WHERE conversion_id = '{conv[target]}'"
            )[0]
            assert row["conversion_ts"] == target_row["conversion_ts"]  # the original hour
            assert (row["campaign_id"], row["pub"]) == (
                target_row["campaign_id"],
                target_row["pub"],
            )
    assert rows[adj["R9"]]["conversion_id"] == ""  # no conversion has that txn_id
    raw = ch.query(
        f"SELECT adjustment_id, count(), uniqExact(outcome, revenue_delta, payout_delta) "
        f"FROM {db}.adjustments GROUP BY adjustment_id"
    ).result_rows
    assert all(same == 1 for _, _, same in raw), "a replay writes the very same row"

    # --- every conversion: final status, amounts unchanged (append-only) -----------
    status = final_status(ch, db)
    finals = {r["conversion_id"]: r for r in query(ch, f"SELECT * FROM {db}.conversions FINAL")}
    assert set(finals) == set(conv.values()), "no conversion added or lost"
    for name, (st, revenue, payout, currency, rev_rep, pay_rep) in want.items():
        row = finals[conv[name]]
        assert status[conv[name]] == st, (name, row)
        got = (
            row["revenue"],
            row["payout"],
            row["currency"],
            row["revenue_reporting"],
            row["payout_reporting"],
        )
        assert got == (D(revenue), D(payout), currency, D(rev_rep), D(pay_rep)), (name, row)

    # --- every reversal request is a row in postbacks ------------------------------
    logged = dict(
        ch.query(
            f"SELECT outcome, count() FROM {db}.postbacks FINAL "
            f"WHERE raw LIKE '%\"status\": %' GROUP BY outcome"
        ).result_rows
    )
    assert logged == {"accepted": len(adj), "invalid_param": 2, "missing_param": 1, "bad_token": 1}

    # --- the net hourly sums equal the raw tables' ------------------------------------
    view = query(ch, NET_HOURLY_SQL.format(db=db))
    net = {
        (hour_of(r["hour"]), r["campaign_id"], r["pub"]): (
            r["revenue_reporting"],
            r["payout_reporting"],
        )
        for r in view
    }
    counts: dict[tuple, list] = defaultdict(lambda: [0, 0, 0])
    for r in view:
        for i, column in enumerate(("clicks", "installs", "events")):
            counts[(r["campaign_id"], r["pub"])][i] += r[column]
    # c1/listen: clicks a, d, the duplicate's and the two late ones; P2 installed; P6
    # and P9 count (refunded in part), P1 and P8 no longer (reversed), P7 never did
    assert counts[("c1", "listen")] == [5, 1, 2]
    assert counts[("c1", "deaf")] == [1, 0, 0] and counts[("c2", "listen")] == [1, 0, 0]
    by_hand: dict[tuple, dict] = {}
    for r in query(ch, f"SELECT * FROM {db}.conversions"):  # raw, deduplicated by ID here
        by_hand[("conv", r["conversion_id"])] = r
    for r in query(ch, f"SELECT * FROM {db}.adjustments"):
        by_hand[("adj", r["adjustment_id"])] = r
    sums: dict[tuple, list] = defaultdict(lambda: [D(0), D(0)])
    for (what, _), r in list(by_hand.items()):
        key = (hour_of(r["conversion_ts"]), r["campaign_id"], r["pub"])
        if what == "conv" and r["status"] in ("attributed", "reversed"):
            sums[key][0] += r["revenue_reporting"]
            sums[key][1] += r["payout_reporting"]
        elif what == "adj" and r["outcome"] == "applied":
            sums[key][0] += r["revenue_delta_reporting"]
            sums[key][1] += r["payout_delta_reporting"]
    assert {k: tuple(v) for k, v in sums.items()} == {
        k: v
        for k, v in net.items()
        if any(v) or k in sums  # not hours of clicks only
    }
    per_pub: dict[tuple, list] = defaultdict(lambda: [D(0), D(0)])
    for (_, campaign, pub), (revenue, payout) in net.items():
        per_pub[(campaign, pub)][0] += revenue
        per_pub[(campaign, pub)][1] += payout
    # listen on c1: P2 3-1, P6 32.4-10.8-5.4, P9 10-3 (P1, P8 reversed: 0); payouts 2, 3.24, 1.4
    assert tuple(per_pub[("c1", "listen")]) == (D("25.2"), D("6.64"))
    assert tuple(per_pub[("c1", "deaf")]) == (0, 0)  # P3 refunded, then reversed
    assert tuple(per_pub[("c2", "listen")]) == (0, 0)  # P5 reversed

    # --- reversal callbacks: to `listen` only, for each applied adjustment of its own ---
    wanted = {
        adj[n]
        for n, (_, outcome, target, _) in expect.items()
        if outcome == "applied" and finals[conv[target]]["pub"] == "listen"
    }
    assert len(wanted) == 7  # R1, R6, R11, R12, R14, R15, R16; not R3, R5 (deaf)

    def reversal_requests():
        return [s for s in server.requests["ok"] if s.query.get("status") == "reversed"]

    await eventually(
        lambda: {s.headers["Idempotency-Key"] for s in reversal_requests()} >= wanted or None,
        90,
        0.5,
        f"reversal callbacks for {sorted(wanted)}",
    )
    await asyncio.sleep(1)
    seen = reversal_requests()
    assert {s.headers["Idempotency-Key"] for s in seen} == wanted
    assert {s.query["pub"] for s in seen} == {"listen"}
    by_key = {s.headers["Idempotency-Key"]: s for s in seen}
    inverse = {v: k for k, v in adj.items()}
    for key, s in by_key.items():
        kind, _, target, deltas = expect[inverse[key]]
        assert s.query["conversion_id"] == conv[target] and s.query["reason"] == kind
        assert (D(s.query["revenue"]), D(s.query["payout"])) == deltas[:2], s.query
    plain = [s for s in server.requests["ok"] if s.query.get("status", "") == ""]
    assert {s.headers["Idempotency-Key"] for s in plain} <= set(conv.values())
    # each attempt is a row, under the adjustment's ID (the conversion had its own)
    keys = "', '".join(wanted)
    sql = (
        f"SELECT conversion_id, outcome FROM {db}.callbacks FINAL WHERE conversion_id IN ('{keys}')"
    )
    attempts = await rows_eventually(ch, sql, len(wanted), 60)
    assert sorted(attempts) == sorted((key, "delivered") for key in wanted)
