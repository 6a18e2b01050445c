"""From HTTP request through Kafka (Tansu) and the sink into ClickHouse (chDB),
read back over the HTTP interface with clickhouse-connect."""

import asyncio
import json
import signal
from decimal import Decimal

import pytest

from pipeline.core import clickid
from pipeline.sink import migrations as ddl

from .conftest import make_settings, wait_until, write_config
from .stack import ingress, rows_eventually, sink, start_component

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


@pytest.fixture
def settings(tansu, clickhouse_url):
    return make_settings(tansu, clickhouse_url)


@pytest.fixture
def ch(settings):
    client = ddl.connect(settings.clickhouse_url)
    yield client
    client.close()


async def test_clicks_and_postbacks_reach_clickhouse(settings, ch):
    db = settings.clickhouse_database
    async with ingress(settings) as http, sink(settings):
        async with http.get(
            "/click/c1?pub=net1&sub1=a%20b&sub5=z",
            allow_redirects=False,
            headers={"User-Agent": "test-agent"},
        ) as r:
            assert r.status == 302
            click_id = r.headers["X-Click-Id"]
            assert r.headers["Location"] == (
                f"https://apps.example/app/id123?clickid={click_id}&pub=net1"
            )
        async with http.get(
            "/click/c2?pub=net2&sub1=a%26b", headers={"Accept": "application/json"}
        ) as r:
            body = await r.json()
            assert r.status == 200
            assert body["location"].endswith(f"cid={body['click_id']}&s=a%26b")
        async with http.get("/click/nope?pub=net1") as r:
            assert (r.status, (await r.json())["error"]) == (404, "unknown_campaign")
        async with http.get("/click/c1?pub=nobody") as r:
            assert (r.status, (await r.json())["error"]) == (404, "unknown_publisher")

        forged = clickid.issue(["not-our-secret"])
        cases = [
            ("GET", {"token": "adv-secret", "click_id": click_id, "event": "install"}, 200, None),
            (
                "POST-form",
                {
                    "token": "adv-secret",
                    "click_id": click_id,
                    "event": "purchase",
                    "txn_id": "o-1",
                    "revenue": "9.99",
                    "currency": "EUR",
                },
                200,
                None,
            ),
            (
                "POST-json",
                {
                    "token": "adv-secret",
                    "click_id": click_id,
                    "event": "purchase",
                    "txn_id": "o-2",
                    "revenue": 5.5,
                },
                200,
                None,
            ),
            (
                "GET",
                {"token": "wrong-token", "click_id": click_id, "event": "install"},
                401,
                "bad_token",
            ),
            (
                "GET",
                {"token": "adv-secret", "click_id": forged, "event": "install"},
                400,
                "invalid_click_id",
            ),
            ("GET", {"token": "adv-secret", "event": "install"}, 400, "missing_param"),
            (
                "GET",
                {"token": "adv-secret", "click_id": click_id, "event": "x", "revenue": "-3"},
                400,
                "invalid_param",
            ),
        ]
        for method, params, status, code in cases:
            if method == "GET":
                request = http.get("/postback", params=params)
            elif method == "POST-form":
                request = http.post("/postback", data=params)
            else:
                request = http.post("/postback", json=params)
            async with request as r:
                body = await r.json()
                assert r.status == status, body
                assert body.get("error") == code
                if status == 200:
                    assert body["status"] == "accepted" and len(body["postback_id"]) == 32
        async with http.post("/postback?token=adv-secret", data=b"x" * 70_000) as r:
            assert (r.status, (await r.json())["error"]) == (413, "too_large")

        # two requests can share a millisecond: rows are matched by content, not order
        clicks = await rows_eventually(
            ch,
            f"SELECT click_id, campaign_id, pub, sub1, sub5, ip, user_agent "
            f"FROM {db}.clicks FINAL ORDER BY ts",
            2,
        )
        assert (click_id, "c1", "net1", "a b", "z", "127.0.0.1", "test-agent") in clicks
        postbacks = await rows_eventually(
            ch,
            f"SELECT outcome, event, revenue, currency, raw FROM {db}.postbacks FINAL "
            f"ORDER BY received_at",
            len(cases) + 1,
        )
    outcomes = sorted(row[0] for row in postbacks)
    assert outcomes == sorted(
        ["accepted"] * 3
        + ["bad_token", "invalid_click_id", "missing_param", "invalid_param", "too_large"]
    )
    accepted = sorted((row[1], row[2], row[3]) for row in postbacks if row[0] == "accepted")
    assert accepted == [
        ("install", None, None),
        ("purchase", Decimal("5.5"), None),
        ("purchase", Decimal("9.99"), "EUR"),
    ]
    for row in postbacks:
        assert "adv-secret" not in row[4] and "wrong-token" not in row[4]
        assert json.loads(row[4])["path"] == "/postback"


async def test_healthz_readyz_metrics(settings):
    async with ingress(settings) as http:
        async with http.get("/healthz") as r:
            assert r.status == 200
        async with http.get("/readyz") as r:
            assert r.status == 200
        async with http.get("/postback?token=nope-nope&click_id=x&event=install") as r:
            assert r.status == 401
        async with http.get("/metrics") as r:
            text = await r.text()
    assert 'pipeline_ingress_requests_total{outcome="bad_token",route="postback"} 1.0' in text


async def test_kafka_down_answers_503_spools_and_republishes(tmp_path, clickhouse_url, ch):
    """A broker of its own, stopped mid-test: the 503 is real, and so is the recovery."""
    from dataclasses import replace

    from pipeline.dev.kafka import EmbeddedKafka, free_port

    broker = EmbeddedKafka(f"127.0.0.1:{free_port()}")
    broker.start()
    settings = replace(
        make_settings(broker.bootstrap_servers, clickhouse_url), spool_dir=str(tmp_path)
    )
    params = {
        "token": "adv-secret",
        "click_id": clickid.issue(settings.secrets),
        "event": "install",
    }
    try:
        async with ingress(settings) as http:
            broker.stop()
            async with http.get("/postback", params=params) as r:
                assert (r.status, (await r.json())["error"]) == (503, "unavailable")
            async with http.get("/readyz") as r:
                assert r.status == 503
            spool = next(tmp_path.glob("*.spool"))
            assert spool.read_bytes().count(b"\n") == 1
            broker.start()
            # the ingress republishes the spooled record once Kafka is back
            await asyncio.to_thread(
                wait_until, lambda: spool.read_bytes() == b"", 30, 0.2, "spool drained"
            )
            async with sink(settings):
                rows = await rows_eventually(
                    ch,
                    f"SELECT outcome, detail FROM {settings.clickhouse_database}.postbacks FINAL",
                    1,
                )
    finally:
        broker.stop()
    assert rows[0][0] == "unavailable" and "Kafka unavailable" in rows[0][1]


async def test_sink_killed_mid_stream_loses_and_duplicates_nothing(
    tansu, clickhouse_url, ch, tmp_path
):
    path, settings = write_config(tmp_path, tansu, clickhouse_url)
    db, total = settings.clickhouse_database, 3000
    log = tmp_path / "sink.log"
    proc = start_component("sink", path, log)
    sent: list[str] = []
    try:
        async with ingress(settings) as http:

            async def send(n):
                for _ in range(n):
                    async with http.get("/click/c1?pub=net1", allow_redirects=False) as r:
                        assert r.status == 302
                        sent.append(r.headers["X-Click-Id"])

            await send(total // 3)
            await rows_eventually(ch, f"SELECT 1 FROM {db}.clicks LIMIT 1", 1, timeout=60)
            flowing = asyncio.create_task(send(total // 3))
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGKILL)  # no chance to commit or flush anything
            proc.wait()
            await flowing
            proc = start_component("sink", path, log)
            await send(total - len(sent))

            def all_there():
                return ch.query(f"SELECT count() FROM {db}.clicks FINAL").result_rows[0][0] >= total

            await asyncio.to_thread(wait_until, all_there, 60, 0.5, f"{total} clicks in ClickHouse")
    finally:
        proc.terminate()
        proc.wait(20)
    assert proc.returncode == 0, log.read_text()[-2000:]
    rows = ch.query(f"SELECT click_id FROM {db}.clicks FINAL").result_rows
    assert sorted(r[0] for r in rows) == sorted(sent)  # every click, exactly once
