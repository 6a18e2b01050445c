"""The outbox and the lanes of the callbacks service, against a fake producer:
what is acknowledged, when `done` runs, what a refused flush does. No broker."""

import asyncio

from aiokafka.errors import KafkaTimeoutError

from pipeline.callbacks.lanes import Job, Lane
from pipeline.callbacks.offsets import Tracker
from pipeline.callbacks.outbox import Outbox


class FakeBatch:
    def __init__(self, room: int):
        self.records, self.room = [], room

    def append(self, *, timestamp, key, value):
        if len(self.records) >= self.room:
            return None  # full, as BatchBuilder says it
        self.records.append((key, value))
        return object()


class FakeProducer:
    """create_batch/send_batch of AIOKafkaProducer; the test settles each batch."""

    def __init__(self, room: int = 100):
        self.room = room
        self.sent: list[tuple[str, int, list, asyncio.Future]] = []

    def create_batch(self):
        return FakeBatch(self.room)

    async def send_batch(self, batch, topic, *, partition):
        ack = asyncio.get_running_loop().create_future()
        self.sent.append((topic, partition, batch.records, ack))
        return ack


async def until(condition):
    """Wait until `condition()` holds; a generous bound only catches a hang."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.005)


async def test_one_batch_per_partition_and_done_only_after_the_acknowledgement():
    producer = FakeProducer()
    outbox = Outbox(producer)
    outbox.start()
    done = []
    try:
        two = [("attempts", 0, b"a", b"1"), ("retry-1", 0, b"a", b"2")]
        outbox.put(two, lambda: done.append("a"))
        outbox.put([("attempts", 0, b"b", b"3")], lambda: done.append("b"))
        outbox.put([("attempts", 3, b"c", b"4")], lambda: done.append("c"))
        await until(lambda: len(producer.sent) == 3)
        batches = {(topic, partition): records for topic, partition, records, _ in producer.sent}
        assert batches == {
            ("attempts", 0): [(b"a", b"1"), (b"b", b"3")],
            ("retry-1", 0): [(b"a", b"2")],
            ("attempts", 3): [(b"c", b"4")],
        }
        for _, _, _, ack in producer.sent[:2]:
            ack.set_result(None)
        await asyncio.sleep(0.05)
        assert done == [] and not outbox.idle  # one batch of the flush is not acknowledged
        producer.sent[2][3].set_result(None)
        await until(lambda: len(done) == 3)
        assert sorted(done) == ["a", "b", "c"] and outbox.idle
    finally:
        await outbox.close()


async def test_a_refused_flush_is_sent_again_and_only_then_done():
    producer = FakeProducer()
    outbox = Outbox(producer)
    outbox.start()
    done = []
    try:
        outbox.put([("attempts", 1, b"a", b"1")], lambda: done.append("a"))
        await until(lambda: len(producer.sent) == 1)
        producer.sent[0][3].set_exception(KafkaTimeoutError())
        await until(lambda: len(producer.sent) == 2)
        assert done == [] and not outbox.idle
        assert producer.sent[1][:3] == ("attempts", 1, [(b"a", b"1")])
        producer.sent[1][3].set_result(None)
        await until(lambda: done == ["a"])
        assert outbox.idle
    finally:
        await outbox.close()


async def test_a_full_batch_starts_another():
    producer = FakeProducer(room=2)
    outbox = Outbox(producer)
    outbox.start()
    done = []
    try:
        for i in range(5):
            outbox.put([("attempts", 0, b"k", bytes([i]))], lambda: done.append(1))
        await until(lambda: len(producer.sent) == 3)
        assert [len(records) for _, _, records, _ in producer.sent] == [2, 2, 1]
        for *_, ack in producer.sent:
            ack.set_result(None)
        await until(lambda: len(done) == 5)
    finally:
        await outbox.close()


def test_a_lane_bounds_its_workers_and_drops_only_queued_jobs():
    lane = Lane(concurrency=2, limit=4, redact=str)
    tracker = Tracker()
    jobs = [Job(("t", p), offset, tracker, {}) for offset, p in enumerate([0, 1, 0, 1])]
    started = [lane.take(job, now=1.0) for job in jobs]
    assert started == [True, True, False, False]  # at most `concurrency` workers
    assert lane.full and lane.pending == 4
    dropped = lane.drop(lambda job: job.tp[1] != 1)
    assert [job.offset for job in dropped] == [1, 3]
    assert [job.offset for job in lane.queue] == [0, 2] and lane.pending == 2


async def test_outcomes_put_within_the_linger_share_a_batch():
    producer = FakeProducer()
    outbox = Outbox(producer, linger=0.2)
    outbox.start()
    done = []
    try:
        outbox.put([("attempts", 0, b"a", b"1")], lambda: done.append("a"))
        await asyncio.sleep(0.02)  # a later turn of the loop, within the linger
        outbox.put([("attempts", 0, b"b", b"2")], lambda: done.append("b"))
        await until(lambda: len(producer.sent) == 1)
        assert producer.sent[0][:3] == ("attempts", 0, [(b"a", b"1"), (b"b", b"2")])
        producer.sent[0][3].set_result(None)
        await until(lambda: len(done) == 2)
    finally:
        await outbox.close()


async def test_a_fill_of_outcomes_goes_without_waiting():
    producer = FakeProducer()
    outbox = Outbox(producer, linger=3600, fill=3)  # an hour: only the fill sends
    outbox.start()
    try:
        for i in range(3):
            outbox.put([("attempts", 0, b"k", bytes([i]))], lambda: None)
        await until(lambda: len(producer.sent) == 1)
        assert len(producer.sent[0][2]) == 3
    finally:
        await outbox.close()
