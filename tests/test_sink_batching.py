"""When the sink cuts a batch: full, old, or caught up (but a batch that is not
full at most once per batch_seconds). A fake consumer stands in for Kafka."""

from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition

from pipeline.sink import app as sink_app
from pipeline.sink.writer import Sink

from .conftest import make_settings


class Waited(Exception):
    """The sink polled an empty log: it chose to wait for more messages."""


class FakeConsumer:
    """Partitions as lists of values; every poll reads all that is there, and the
    high watermarks are those of the last poll, as a Kafka fetch reports them."""

    def __init__(self, partitions: list[TopicPartition], unfetched: tuple = ()):
        self.logs = {tp: [] for tp in partitions}
        self.unfetched = set(unfetched)  # assigned, but no fetch answered for them yet
        self.positions = dict.fromkeys(partitions, 0)
        self.highwaters: dict[TopicPartition, int] = {}
        self.waits: list[int] = []

    def produce(self, tp: TopicPartition, count: int) -> None:
        self.logs[tp].extend(b"x" for _ in range(count))

    async def getmany(self, timeout_ms: int, max_records: int) -> dict:
        out = {}
        for tp, log in self.logs.items():
            start = self.positions[tp]
            take = log[start : start + max_records - sum(map(len, out.values()))]
            self.highwaters[tp] = len(log)
            if take:
                out[tp] = [SimpleNamespace(value=v, offset=start + i) for i, v in enumerate(take)]
                self.positions[tp] += len(take)
        if not out:
            self.waits.append(timeout_ms)
            raise Waited
        return out

    def assignment(self) -> set:
        return set(self.logs) | self.unfetched

    def highwater(self, tp: TopicPartition):
        return self.highwaters.get(tp)

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]


def make_sink(unfetched: int = 0) -> Sink:
    settings = make_settings(
        "127.0.0.1:9", "http://127.0.0.1:9", sink='batch_rows = 100\nbatch_seconds = "1h"'
    )
    sink = sink_app.build(settings)
    topic = settings.topic("clicks")
    sink.consumer = FakeConsumer(
        [TopicPartition(topic, 0), TopicPartition(topic, 1)],
        unfetched=tuple(TopicPartition(settings.topic("postbacks"), p) for p in range(unfetched)),
    )
    return sink


@pytest.fixture
def sink():
    return make_sink()


async def test_a_full_batch_is_cut_at_batch_rows(sink):
    tp0, tp1 = sorted(sink.consumer.logs)
    sink.consumer.produce(tp0, 80)
    sink.consumer.produce(tp1, 80)
    batch, offsets = await sink._collect()
    assert sum(map(len, batch.values())) == 100
    assert offsets == {tp0: 80, tp1: 20}
    assert sink.consumer.waits == []


async def test_a_drained_backlog_is_cut_without_waiting(sink):
    tp0, tp1 = sorted(sink.consumer.logs)
    sink.consumer.produce(tp0, 30)
    sink.consumer.produce(tp1, 12)
    batch, offsets = await sink._collect()
    assert sum(map(len, batch.values())) == 42
    assert offsets == {tp0: 30, tp1: 12}
    assert sink.consumer.waits == []  # caught up: written now, not in an hour


async def test_an_unfetched_partition_is_not_caught_up():
    sink = make_sink(unfetched=1)
    sink.consumer.produce(min(sink.consumer.logs), 5)
    with pytest.raises(Waited):  # it may hold rows: wait for its fetch, or the hour
        await sink._collect()


async def test_only_one_partial_batch_per_batch_seconds(sink):
    tp0, _ = sorted(sink.consumer.logs)
    sink.consumer.produce(tp0, 5)
    await sink._collect()
    sink.consumer.produce(tp0, 3)
    with pytest.raises(Waited):  # caught up again, but the last partial batch was just cut
        await sink._collect()
    assert 3_500_000 < sink.consumer.waits[-1] <= 3_600_000  # until the hour is up
