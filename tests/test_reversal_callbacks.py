"""Reversal callbacks through the callbacks service: adjustments produced straight to
the adjustments topic (the worker that makes them is tested elsewhere), publishers as
real loopback HTTP servers, attempts read back from the sink's callbacks table.

A publisher whose `events` lists `reversal` gets one callback per applied adjustment,
with the same durability, retries, dead letters and attempt rows as a conversion's,
under the adjustment's ID (Idempotency-Key, webhook-id, callbacks.conversion_id)."""

import asyncio
import json
import uuid
from decimal import Decimal

import pytest

from pipeline import codec, kafka
from pipeline.callbacks import app as callbacks_app
from pipeline.sink import app as sink_app
from pipeline.sink import migrations as ddl

from .callbacks_support import (
    ALL_MACROS,
    SECRET,
    callbacks_config,
    eventually,
    publisher_server,
    read_topic,
    running,
    settings_from,
)

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def publishers(port: int) -> str:
    out = []
    for name, events, extra in [
        ("flaky", '["purchase", "reversal"]', ""),  # 500 twice, then 200
        ("notfound", '["reversal"]', ""),  # 404: failed for good, dead-lettered
        ("ok", '["install", "purchase"]', ""),  # did not ask for reversals
        ("hook", '["reversal"]', f'method = "POST"\nsigning_secret = "{SECRET}"'),
    ]:
        url = f"http://127.0.0.1:{port}/{name}" + ("" if name == "hook" else f"?{ALL_MACROS}")
        out.append(
            f'[[publishers]]\nid = "{name}"\npostback_url = "{url}"\nevents = {events}\n{extra}\n'
        )
    return "\n".join(out)


def adjustment(pub: str, outcome: str = "applied", kind: str = "reversal") -> dict:
    path = codec.SCHEMA_DIR / "examples/adjustment/reversal-applied-after-refund.json"
    a = codec.ADJUSTMENT.from_json(json.loads(path.read_text()))
    a.update(
        adjustment_id=uuid.uuid4().hex,
        conversion_id=uuid.uuid4().hex,
        pub=pub,
        outcome=outcome,
        kind=kind,
    )
    a["postback_id"] = a["adjustment_id"]
    if outcome != "applied":
        a.update({d: Decimal(0) for d in ("revenue_delta", "payout_delta")})
    return a


async def produce(settings, adjustments) -> None:
    await kafka.ensure_topics(settings, ["adjustments"])
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for a in adjustments:
            await producer.send_and_wait(
                settings.topic("adjustments"),
                codec.ADJUSTMENT.encode(a),
                key=a["conversion_id"].encode(),
            )
    finally:
        await producer.stop()


async def test_reversal_callbacks_retry_dead_letter_and_log_every_attempt(tansu, clickhouse_url):
    async with publisher_server() as server:
        settings = settings_from(callbacks_config(tansu, clickhouse_url, publishers(server.port)))
        flaky, lost, signed = adjustment("flaky"), adjustment("notfound"), adjustment("hook")
        refund = adjustment("flaky", kind="refund")
        ignored = [
            adjustment("ok"),  # its publisher did not ask
            adjustment("flaky", outcome="already_reversed"),
            adjustment("flaky", outcome="unknown_conversion"),
            adjustment("nobody"),
        ]
        wanted = {flaky["adjustment_id"], refund["adjustment_id"]}
        async with running(callbacks_app.build(settings)), running(sink_app.build(settings)):
            await produce(settings, [flaky, lost, signed, refund, *ignored, signed])  # a replay
            client = ddl.connect(settings.clickhouse_url)
            db = settings.clickhouse_database

            def rows():
                return client.query(
                    f"SELECT pub, conversion_id, attempt, outcome FROM {db}.callbacks FINAL "
                    f"ORDER BY pub, conversion_id, attempt"
                ).result_rows

            await eventually(
                lambda: len(server.delivered("flaky")) == 2 and len(server.requests["hook"]) >= 1,
                60,
                0.3,
                "reversal callbacks delivered",
            )
            table = await eventually(
                lambda: (lambda r: r if len(r) >= 8 else None)(rows()), 60, 0.5, "attempt rows"
            )
            dead = await eventually(
                lambda: read_topic(settings, "callbacks-dead", codec.CALLBACK_TASK), 30, 0.5, "dead"
            )
            await asyncio.sleep(1)
            client.close()

    keys = server.keys("flaky")
    assert sorted(keys) == sorted([*wanted, *wanted, *wanted])  # 500, 500, then 200 each
    assert server.delivered("flaky") == wanted
    by_key = {s.headers["Idempotency-Key"]: s.query for s in server.requests["flaky"]}
    for a in (flaky, refund):
        query = by_key[a["adjustment_id"]]
        assert (query["status"], query["reason"]) == ("reversed", a["kind"])
        assert query["conversion_id"] == a["conversion_id"] and query["event"] == "purchase"
        assert (query["revenue"], query["payout"]) == ("-14.99", "-2.998")
    assert server.requests["ok"] == [] and server.requests["nobody"] == []
    # the worker's replay of an adjustment (the same one at a later offset) is skipped
    assert server.keys("hook") == [signed["adjustment_id"]]
    hook = server.requests["hook"][0]
    assert hook.signature_ok and hook.headers["webhook-id"] == signed["adjustment_id"]
    body = json.loads(hook.body)
    assert (body["status"], body["payout"], body["conversion_id"]) == (
        "reversed",
        "-2.998",
        signed["conversion_id"],
    )
    assert [d["adjustment_id"] for d in dead] == [lost["adjustment_id"]]
    attempts = {(pub, cid): [] for pub, cid, _, _ in table}
    for pub, cid, attempt, outcome in table:
        attempts[(pub, cid)].append((attempt, outcome))
    assert attempts[("flaky", flaky["adjustment_id"])] == [
        (1, "retry"),
        (2, "retry"),
        (3, "delivered"),
    ]
    assert attempts[("notfound", lost["adjustment_id"])] == [(1, "failed")]
    assert attempts[("hook", signed["adjustment_id"])] == [(1, "delivered")]
    assert not any(cid == flaky["conversion_id"] for _, cid in attempts)  # its own ID
