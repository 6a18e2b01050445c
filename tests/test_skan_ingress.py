"""The ingress's SKAdNetwork endpoint on a real broker: what it answers, what it
publishes to skan-reports (the body verbatim, keyed by transaction-id, on the
partition Kafka's partitioner picks), and the spool when Kafka refuses."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline import codec, kafka
from pipeline.dev.kafka import EmbeddedKafka, free_port

from .conftest import make_settings, wait_until
from .stack import ingress
from .test_skan_core import APPLE_V3_WIN, DEVICE_V1_0

pytestmark = pytest.mark.kafka

PATH = "/.well-known/skadnetwork/report-attribution/"
JSON = {"Content-Type": "application/json"}


async def reports(settings) -> list[tuple[int, bytes, dict]]:
    """(partition, key, report) of every record now in skan-reports."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        name = settings.topic("skan-reports")
        tps = [TopicPartition(name, p) for p in range(settings.kafka_partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await kafka.log_end_offsets(settings.kafka_bootstrap, tps)
        out = []
        for tp in tps:
            while await consumer.position(tp) < ends[tp]:
                for m in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                    out.append((tp.partition, m.key, codec.SKAN_REPORT.decode(m.value)))
        return out
    finally:
        await consumer.stop()


async def test_answers_and_reports(tansu):
    settings = make_settings(tansu, "http://127.0.0.1:9")
    sent = {
        "apple": json.dumps(APPLE_V3_WIN, indent=2).encode(),  # kept byte for byte
        "no txn": b'{"version": "4.0"}',
        "not an object": b'"4.0"',
        "not utf-8": b'{"transaction-id": "\xff"}',
    }
    async with ingress(settings) as http:
        answers = {}
        for name, data in sent.items():
            async with http.post(PATH, data=data, headers=JSON) as r:
                answers[name] = (r.status, await r.json())
        async with http.post(PATH, data=b"[" * 70_000, headers=JSON) as r:
            answers["too large"] = (r.status, await r.json())
        async with http.get(PATH) as r:
            assert r.status == 405
        async with http.get("/metrics") as r:
            metrics = await r.text()
    assert answers["apple"][0] == answers["no txn"][0] == 200
    assert answers["apple"][1]["status"] == "received"
    assert answers["not an object"] == (
        400,
        {"error": "invalid_json", "detail": "a JSON str, not an object"},
    )
    assert answers["not utf-8"][0] == 400 and answers["not utf-8"][1]["error"] == "invalid_json"
    assert answers["too large"] == (
        413,
        {"error": "too_large", "detail": "body is over 65536 bytes"},
    )
    assert 'pipeline_ingress_requests_total{outcome="received",route="skan"} 2.0' in metrics
    assert 'pipeline_ingress_requests_total{outcome="invalid_json",route="skan"} 2.0' in metrics

    published = await reports(settings)
    assert len(published) == 5  # every request, refused or not
    by_body = {report["body"]: (partition, key, report) for partition, key, report in published}
    partition, key, report = by_body[sent["apple"].decode()]
    assert key == APPLE_V3_WIN["transaction-id"].encode()
    assert partition == kafka.partition(key, settings.kafka_partitions)
    assert report["skan_id"] == answers["apple"][1]["skan_id"]
    assert (report["outcome"], report["spooled"], report["source_ip"]) == ("", False, "127.0.0.1")
    _, key, report = by_body[sent["no txn"].decode()]
    assert key == report["skan_id"].encode()
    _, _, report = by_body['"4.0"']
    assert (report["outcome"], report["detail"]) == ("invalid_json", "a JSON str, not an object")
    assert by_body[""][2]["outcome"] == "too_large"
    assert by_body['{"transaction-id": "\ufffd"}'][2]["outcome"] == "invalid_json"


async def test_kafka_down_answers_503_spools_and_republishes(tmp_path):
    """A broker of its own, stopped mid-test: the 503 is real, and so is the recovery."""
    broker = EmbeddedKafka(f"127.0.0.1:{free_port()}")
    broker.start()
    settings = replace(
        make_settings(broker.bootstrap_servers, "http://127.0.0.1:9"), spool_dir=str(tmp_path)
    )
    data = json.dumps(DEVICE_V1_0).encode()
    try:
        async with ingress(settings) as http:
            broker.stop()
            async with http.post(PATH, data=data, headers=JSON) as r:
                assert (r.status, (await r.json())["error"]) == (503, "unavailable")
            spool = next(tmp_path.glob("*.skan.spool"))
            assert spool.read_bytes().count(b"\n") == 1
            broker.start()
            await asyncio.to_thread(
                wait_until, lambda: spool.read_bytes() == b"", 60, 0.2, "skan spool drained"
            )
            published = await reports(settings)
    finally:
        broker.stop()
    [(_, key, report)] = published
    assert key == DEVICE_V1_0["transaction-id"].encode()
    assert report["spooled"] is True and report["body"] == data.decode()
