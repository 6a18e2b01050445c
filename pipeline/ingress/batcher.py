"""The ingress's produce batcher: many small records through one aiokafka client.

The ingress sends one record per HTTP request and answers only once that record
is acknowledged (acks=all). aiokafka's `send()` costs a partitioner call, a
coroutine, a future and a metadata object per record. Here the records of one
partition are appended to a record batch of our own (`producer.create_batch()`),
and the ready batches of every partition led by a broker leave as ONE produce
request (`adapters.aiokafka.Produce`); the broker's answer resolves the
requests' futures directly.

Contract of `Batcher.publish`: it returns once the broker acknowledged the
batch holding the record (with the producer's acks), or raises a KafkaError
when the batch could not be delivered: a non-retriable error, or a retriable
one (leader moved, connection lost, request timed out) that outlived the
producer's request timeout; retriable errors are retried after the producer's
retry backoff, with fresh metadata when the error says it is stale. A record
goes to the partition Kafka's default partitioner picks for its key over the
partition count of the producer's latest metadata, so consumers co-partitioned
by key see it where they would with `producer.send()`. Records of a partition
reach the broker in the order they were published: a partition has at most one
batch in flight, a retried batch goes before the partition's newer ones.

When a produce request leaves: a leader has at most one in flight. Its ready
batches leave together once none is in flight and either they hold `fill`
records (a full batch counts as `fill`) or the oldest of them has waited
`linger` seconds. Under load the records gathered while a request was in flight
reach `fill`, so the next request leaves the moment that one returns; at a few
thousand records a second the short wait saves most requests (bench/NOTES.md).
A batch stays open for appends until its request leaves.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from aiokafka import AIOKafkaProducer
from aiokafka.errors import LeaderNotAvailableError, NotLeaderForPartitionError, ProducerClosed
from aiokafka.structs import TopicPartition

from pipeline.adapters.aiokafka import Batch, Produce, is_closed, is_idempotent
from pipeline.kafka import partition

LINGER = 0.002  # seconds a small batch waits for more records (see the module docstring)
FILL = 16  # records that go at once, without waiting


class Batcher:
    def __init__(self, producer: AIOKafkaProducer, linger: float = LINGER, fill: int = FILL):
        if is_idempotent(producer):
            raise ValueError("the batcher needs a producer without idempotence")
        self.producer = producer
        self._cluster = producer.client.cluster
        self._produce = Produce(producer)
        self._counts: dict[str, int] = {}  # topic -> partitions
        self._queues: dict[tuple[str, int], deque[Batch]] = {}  # oldest first; last one open
        self._sending: set[tuple[str, int]] = set()  # partitions with a batch in flight
        self._busy: set[int] = set()  # brokers with a produce request in flight
        self._tasks: set[asyncio.Task] = set()
        self.linger, self.fill = linger, fill
        self._scheduled = False
        self._lingering: asyncio.TimerHandle | None = None  # a small batch's wait
        self._draining = False  # flush(): nothing waits for more records
        self._recheck: asyncio.TimerHandle | None = None
        # the producer learns about added partitions from metadata; so do we, when it does
        # (not per record: that copied the topic's partitions into a set every time)
        self._cluster.add_listener(self._metadata_updated)

    def _metadata_updated(self, cluster) -> None:
        for topic in self._counts:
            known = cluster.partitions_for_topic(topic)
            if known:
                self._counts[topic] = len(known)
        self._schedule()  # a partition may have found its leader

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        """Append the record to its partition's open batch and wait for the acks."""
        count = self._counts.get(topic)
        if count is None:
            count = self._counts[topic] = len(await self.producer.partitions_for(topic))
        tp = (topic, partition(key, count))
        queue = self._queues.get(tp)
        # append() answers None once the batch is full or built for a request
        if queue is None or queue[-1].builder.append(timestamp=None, key=key, value=value) is None:
            batch = Batch(self.producer.create_batch())
            batch.builder.append(timestamp=None, key=key, value=value)  # a first one always fits
            if queue is None:
                self._queues[tp] = deque((batch,))
            else:
                queue.append(batch)
            self._schedule()
        else:
            batch = queue[-1]
        waiter = asyncio.get_running_loop().create_future()
        batch.waiters.append(waiter)
        await waiter

    def _schedule(self) -> None:
        # the next loop iteration: the records of this one's requests join the batches
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_ready)

    def _send_ready(self) -> None:
        """Send every partition's oldest batch whose leader has no request in flight,
        unless the leader's batches are small and young (they wait for more records)."""
        self._scheduled = False
        closed = is_closed(self.producer)
        by_node: dict[int, list[tuple[str, int]]] = {}
        unknown = False
        now = time.monotonic()
        for tp, queue in list(self._queues.items()):
            if tp in self._sending:
                continue
            leader = self._cluster.leader_for_partition(TopicPartition(*tp))
            if closed or leader is None or leader == -1:
                if closed or self._produce.expired(queue[0], now):
                    self._pop(tp, queue).fail(_no_leader(closed, leader))
                else:
                    unknown = True
                continue
            if leader not in self._busy:
                by_node.setdefault(leader, []).append(tp)
        loop = asyncio.get_running_loop()
        for node_id, tps in by_node.items():
            wait = self._wait(tps, now)
            if wait > 0:
                self._linger(loop, wait)
                continue
            batches = {tp: self._pop(tp, self._queues[tp]) for tp in tps}
            self._busy.add(node_id)
            self._sending.update(batches)
            task = loop.create_task(self._send(node_id, batches))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if unknown and self._recheck is None:
            # ask for fresh metadata (its listener reschedules us) and look again after
            # the backoff in any case: a batch without a leader fails once it expires
            self.producer.client.force_metadata_update()
            self._recheck = asyncio.get_running_loop().call_later(
                self._produce.backoff, self._recheck_leaders
            )

    def _wait(self, tps: list[tuple[str, int]], now: float) -> float:
        """How much longer a leader's ready batches wait for more records (<= 0: none)."""
        if self._draining:
            return 0.0
        records, oldest = 0, now
        for tp in tps:
            queue = self._queues[tp]
            records += self.fill if len(queue) > 1 else len(queue[0].waiters)
            oldest = min(oldest, queue[0].created)
        return 0.0 if records >= self.fill else oldest + self.linger - now

    def _linger(self, loop: asyncio.AbstractEventLoop, wait: float) -> None:
        """Look again in `wait` seconds, or sooner if already due to: one timer
        serves every leader, set for the earliest of their waits."""
        timer = self._lingering
        if timer is not None:
            if timer.when() <= loop.time() + wait:
                return
            timer.cancel()
        self._lingering = loop.call_later(wait, self._lingered)

    def _lingered(self) -> None:
        self._lingering = None
        self._send_ready()

    def _recheck_leaders(self) -> None:
        self._recheck = None
        self._schedule()

    def _pop(self, tp: tuple[str, int], queue: deque[Batch]) -> Batch:
        batch = queue.popleft()
        if not queue:
            del self._queues[tp]
        return batch

    async def _send(self, node_id: int, batches: dict[tuple[str, int], Batch]) -> None:
        try:
            retry = await self._produce.send(node_id, batches)
        finally:
            self._busy.discard(node_id)
            self._sending.difference_update(batches)
        # retried batches go back in front of their partitions' newer batches
        for tp, batch in retry.items():
            queue = self._queues.get(tp)
            if queue is None:
                self._queues[tp] = deque((batch,))
            else:
                queue.appendleft(batch)
        self._schedule()

    def close(self) -> None:
        """Cancel the timers (after flush(), once the producer stops)."""
        for timer in (self._lingering, self._recheck):
            if timer is not None:
                timer.cancel()
        self._lingering = self._recheck = None

    async def flush(self) -> None:
        """Wait until every batch started so far is delivered or failed (none
        waits for more records meanwhile)."""
        self._draining = True
        try:
            while self._queues or self._tasks:
                self._schedule()
                if self._tasks:
                    await asyncio.wait(list(self._tasks))
                else:  # waiting for a leader: the batches expire at the latest
                    await asyncio.sleep(self._produce.backoff)
        finally:
            self._draining = False


def _no_leader(closed: bool, leader: int | None) -> Exception:
    """The error aiokafka's producer gives a batch that found no leader in time."""
    if closed:
        return ProducerClosed()
    return NotLeaderForPartitionError() if leader is None else LeaderNotAvailableError()
