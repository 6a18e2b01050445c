"""The ingress's produce batcher against a real broker: every record where
Kafka's default partitioner puts it, acknowledged before publish() returns, in
publish order per partition, also when a produce request is lost on the way."""

import asyncio
import random

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError, NotLeaderForPartitionError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import TopicPartition

from pipeline import kafka
from pipeline.ingress.batcher import Batcher
from pipeline.kafka import partition

from .conftest import make_settings

pytestmark = pytest.mark.kafka


async def started(broker: str, batcher: dict | None = None, **options):
    """Settings, the postbacks topic, a started producer and its Batcher (made
    with `batcher` options; the producer with `options`)."""
    settings = make_settings(broker, "http://127.0.0.1:1")
    await kafka.ensure_topics(settings, ["postbacks"])
    producer = kafka.producer(settings, **options)
    await producer.start()
    return settings, settings.topic("postbacks"), producer, Batcher(producer, **(batcher or {}))


async def test_records_are_acked_in_their_default_partition(tansu):
    settings, topic, producer, batcher = await started(tansu)
    rng = random.Random(3)
    records = [(rng.randbytes(rng.randrange(1, 60)), b"v%d" % i) for i in range(3000)]
    try:
        # many concurrent requests, as the ingress has them: batches of several per partition
        await asyncio.gather(*(batcher.publish(topic, k, v) for k, v in records))
        await batcher.flush()
    finally:
        await producer.stop()

    seen = {m.value: (m.key, m.partition) for m in await consume(tansu, topic, len(records))}
    partitions = list(range(settings.kafka_partitions))
    default = DefaultPartitioner()
    for key, value in records:
        assert seen[value] == (key, default(key, partitions, partitions))


async def consume(bootstrap: str, topic: str, count: int) -> list:
    """The first `count` messages of the topic, each partition's in offset order."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    messages = []
    try:
        while len(messages) < count:
            batch = await consumer.getmany(timeout_ms=5000)
            assert batch, f"only {len(messages)} of {count} records in the topic"
            for part in batch.values():
                messages += part
    finally:
        await consumer.stop()
    return messages


async def test_records_of_a_partition_arrive_in_publish_order(broker):
    _, topic, producer, batcher = await started(broker)
    # several rounds of produce requests: a batch per request and partition, and
    # batches queued behind the one in flight
    values = [b"%d" % i for i in range(2000)]
    try:
        await asyncio.gather(
            *(batcher.publish(topic, b"k%d" % (i % 3), v) for i, v in enumerate(values))
        )
        await batcher.flush()
    finally:
        await producer.stop()
    by_key: dict[bytes, list[int]] = {}
    for m in await consume(broker, topic, len(values)):
        by_key.setdefault(m.key, []).append(int(m.value))
    assert sorted(by_key) == [b"k0", b"k1", b"k2"]
    for key, order in by_key.items():
        assert order == sorted(order), key
        assert len(order) == len(set(order))


async def test_a_lost_produce_request_is_sent_again(tansu):
    _, topic, producer, batcher = await started(tansu)
    await batcher.publish(topic, b"warm", b"up")  # connected, metadata known
    sent = [asyncio.ensure_future(batcher.publish(topic, b"k%d" % i, b"lost")) for i in range(50)]
    conns = list(producer.client._conns.values())
    while not any(c._requests for c in conns):  # the produce request is on its way
        await asyncio.sleep(0)
    for conn in conns:
        conn.close()  # its answer never arrives: a retriable connection error
    try:
        await asyncio.gather(*sent)  # delivered by the retry
        await batcher.flush()
    finally:
        await producer.stop()
    # the broker may have stored the lost request too (at least once)
    values = [m.value for m in await consume(tansu, topic, 51)]
    assert values.count(b"lost") >= 50


async def test_a_record_without_a_partition_leader_fails_after_the_request_timeout(tansu):
    _, topic, producer, batcher = await started(tansu, request_timeout_ms=300)
    await batcher.publish(topic, b"warm", b"up")
    # as if the metadata had lost the leaders
    producer.client.cluster.leader_for_partition = lambda tp: None
    try:
        with pytest.raises(NotLeaderForPartitionError):
            await batcher.publish(topic, b"k", b"never")
        await batcher.flush()
    finally:
        await producer.stop()


async def test_a_record_waits_for_its_partition_leader(tansu):
    _, topic, producer, batcher = await started(tansu)
    await batcher.publish(topic, b"warm", b"up")
    cluster = producer.client.cluster
    known = cluster.leader_for_partition
    cluster.leader_for_partition = lambda tp: None
    try:
        waiting = asyncio.ensure_future(batcher.publish(topic, b"k", b"later"))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not waiting.done()  # no leader, nowhere to send it
        cluster.leader_for_partition = known  # back (well before the request timeout)
        await waiting
        await batcher.flush()
    finally:
        cluster.leader_for_partition = known
        await producer.stop()


async def test_a_failed_batch_fails_every_waiting_request(tansu):
    _, topic, producer, batcher = await started(tansu)
    await batcher.publish(topic, b"first", b"v")
    await producer.stop()  # a closed producer refuses every batch
    results = await asyncio.gather(
        *(batcher.publish(topic, b"k%d" % i, b"v") for i in range(20)),
        return_exceptions=True,
    )
    assert all(isinstance(r, KafkaError) for r in results), results
    await batcher.flush()


async def test_added_partitions_are_used_once_the_metadata_shows_them(apache_kafka):
    """Tansu cannot add partitions; the Apache Kafka reference can."""
    from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

    settings, topic, producer, batcher = await started(apache_kafka)
    admin = AIOKafkaAdminClient(bootstrap_servers=apache_kafka)
    await admin.start()
    count = settings.kafka_partitions + 4
    try:
        await batcher.publish(topic, b"before", b"v")
        await admin.create_partitions({topic: NewPartitions(count)})
        assert await producer.client.force_metadata_update()
        keys = [b"k%d" % i for i in range(200)]
        await asyncio.gather(*(batcher.publish(topic, k, b"after") for k in keys))
    finally:
        await admin.close()
        await batcher.flush()
        await producer.stop()
    messages = await consume(apache_kafka, topic, 1 + len(keys))  # "before" and the keys
    seen = {m.key: m.partition for m in messages if m.value == b"after"}
    partitions = list(range(count))
    default = DefaultPartitioner()
    assert seen == {k: default(k, partitions, partitions) for k in keys}
    assert max(seen.values()) >= settings.kafka_partitions  # the new ones are used


def counting_requests(batcher: Batcher) -> list[int]:
    """Records per produce request the batcher sends from now on."""
    sizes: list[int] = []
    send = batcher._produce.send

    async def counted(node_id, batches):
        sizes.append(sum(len(batch.waiters) for batch in batches.values()))
        return await send(node_id, batches)

    batcher._produce.send = counted
    return sizes


async def test_records_of_a_quiet_moment_wait_for_each_other(tansu):
    """Fewer than `fill` records wait up to `linger` for more: one request, not five."""
    _, topic, producer, batcher = await started(tansu, {"linger": 0.5, "fill": 100})
    try:
        await batcher.publish(topic, b"warm", b"up")  # connected, metadata known
        sizes = counting_requests(batcher)
        sent = []
        for i in range(5):  # one every 10 ms: each alone would be its own request
            sent.append(asyncio.ensure_future(batcher.publish(topic, b"k%d" % i, b"v")))
            await asyncio.sleep(0.01)
        await asyncio.gather(*sent)
        assert sizes == [5]
    finally:
        await producer.stop()


async def test_a_full_fill_goes_at_once_and_flush_waits_for_nothing(tansu):
    # an hour's linger: only `fill` records, or flush(), send
    _, topic, producer, batcher = await started(tansu, {"linger": 3600, "fill": 8})
    try:
        async with asyncio.timeout(30):  # catches a hang only
            await asyncio.gather(*(batcher.publish(topic, b"k%d" % i, b"v") for i in range(8)))
            lone = asyncio.ensure_future(batcher.publish(topic, b"lone", b"v"))
            for _ in range(20):
                await asyncio.sleep(0)
            assert not lone.done()  # one record: it waits for more
            await batcher.flush()  # ... but not when the ingress stops
            assert lone.done() and lone.exception() is None
    finally:
        await producer.stop()
    values = [m.value for m in await consume(tansu, topic, 9)]
    assert len(values) == 9


async def test_each_leader_s_small_batch_waits_only_its_own_linger(tansu):
    """One timer serves every leader: it is set for the earliest of their waits, not
    for the first one asked for. Partition 1 is made to look led by another broker
    (its requests still go to the one broker there is); leader 0's first request
    is slow, so its next batch starts waiting only when that returns, after the
    other leader's batch began to wait."""
    linger = 0.8
    settings, topic, producer, batcher = await started(tansu, {"linger": linger, "fill": 100})
    keys = [b"k%d" % i for i in range(1000)]
    key = {p: next(k for k in keys if partition(k, settings.kafka_partitions) == p) for p in (0, 1)}
    try:
        await batcher.publish(topic, b"warm", b"up")  # connected, metadata known
        real = batcher._cluster.leader_for_partition
        broker, other = real(TopicPartition(topic, 0)), 10_000  # no such broker
        leaders = lambda tp: other if tp.partition == 1 else real(tp)  # noqa: E731
        batcher._cluster.leader_for_partition = leaders
        send, sends, loop = batcher._produce.send, [], asyncio.get_running_loop()

        async def routed(node_id, batches):
            sends.append(({part for _, part in batches}, loop.time()))
            if len(sends) == 1:
                await asyncio.sleep(0.6)  # leader 0's first request is slow
            return await send(broker, batches)

        batcher._produce.send = routed
        async with asyncio.timeout(30):  # catches a hang only
            a1 = asyncio.ensure_future(batcher.publish(topic, key[0], b"a1"))
            await asyncio.sleep(linger + 0.1)  # a1 has left: leader 0 is busy until +1.4 s
            a2 = asyncio.ensure_future(batcher.publish(topic, key[0], b"a2"))  # due at +1.7 s
            await asyncio.sleep(0.1)
            b1 = asyncio.ensure_future(batcher.publish(topic, key[1], b"b1"))  # due at +1.8 s
            await asyncio.gather(a1, a2, b1)
    finally:
        await producer.stop()
    assert [parts for parts, _ in sends] == [{0}, {0}, {1}]
    (_, a1_at), (_, a2_at), (_, b1_at) = sends
    # with one timer for the first leader that asked, a2 waited for b1's and both left together
    assert b1_at - a2_at > 0.05, (a1_at, a2_at, b1_at)
