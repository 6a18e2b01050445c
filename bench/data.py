"""Benchmark data: valid clicks and postbacks, encoded with the pipeline's own
codecs, and a fast bulk producer to put them in Kafka before a measurement.

Click IDs are issued with the config's first secret (so the worker and the
ingress accept them); postbacks are the records the ingress would publish for
an accepted `install`, built by `pipeline.validation.postback_record`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline import codec, kafka
from pipeline.config import Settings
from pipeline.core import clickid, validation

PUBS = ("net1", "net2")


def click_ids(settings: Settings, n: int, now_ms: int | None = None) -> list[str]:
    now = int(time.time() * 1000) if now_ms is None else now_ms
    return [clickid.issue(settings.secrets, now_ms=now - (n - i)) for i in range(n)]


def click_record(settings: Settings, click_id: str, i: int) -> dict:
    return {
        "click_id": click_id,
        "ts_ms": clickid.issued_at_ms(click_id),
        "campaign_id": "c1",
        "pub": PUBS[i % len(PUBS)],
        "sub1": f"s{i % 1000}",
        "sub2": "ios" if i % 2 else "android",
        "sub3": "",
        "sub4": "",
        "sub5": "",
        "ip": f"10.0.{i % 250}.{i % 200 + 1}",
        "user_agent": "Mozilla/5.0 (bench)",
    }


def postback_record(settings: Settings, click_id: str) -> dict:
    """The record the ingress publishes for an accepted install of `click_id`."""
    params = {"token": "adv-secret", "click_id": click_id, "event": "install"}
    raw = validation.redacted_raw("GET", "/postback", params)
    record, rejection = validation.postback_record(settings, params, "127.0.0.1", raw)
    if rejection is not None:
        raise RuntimeError(f"bench postback rejected: {rejection}")
    return record


def clicks_and_postbacks(
    settings: Settings, clicks: int, every: int = 10
) -> Iterator[tuple[str, bytes, bytes]]:
    """(topic suffix, key, value): `clicks` clicks and an install postback for
    every `every`-th click, the postback right after its click."""
    for i, cid in enumerate(click_ids(settings, clicks)):
        key = cid.encode()
        yield "clicks", key, codec.CLICK.encode(click_record(settings, cid, i))
        if every and i % every == 0:
            yield "postbacks", key, codec.POSTBACK.encode(postback_record(settings, cid))


async def produce(
    settings: Settings, messages: Iterable[tuple[str, bytes, bytes]], window: int = 20000
) -> dict[str, int]:
    """Send every message (acks=all) and wait for all acknowledgements.
    Returns the count per topic suffix. At most `window` sends are in flight."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        linger_ms=20,
        max_batch_size=1024 * 1024,
        max_request_size=8 * 1024 * 1024,
        request_timeout_ms=30000,
    )
    await producer.start()
    counts: dict[str, int] = {}
    pending: list[asyncio.Future] = []
    try:
        for suffix, key, value in messages:
            pending.append(await producer.send(settings.topic(suffix), value, key=key))
            counts[suffix] = counts.get(suffix, 0) + 1
            if len(pending) >= window:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return counts


async def end_offsets(settings: Settings, suffix: str) -> int:
    """How many records the topic holds (sum of its partitions' high watermarks)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        topic = settings.topic(suffix)
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()  # noqa: SLF001
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        offsets = await kafka.log_end_offsets(settings.kafka_bootstrap, tps)
        return sum(offsets.values())
    finally:
        await consumer.stop()
