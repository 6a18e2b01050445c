"""Publishing many small records through one aiokafka producer, batch by batch.

The ingress sends one record per HTTP request and must answer only once that
record is acknowledged (acks=all). aiokafka's `send()` costs a partitioner
call, a coroutine, a future and a metadata object per record; here the
records of one partition are appended to a batch of our own
(`producer.create_batch()`) that is handed to the producer with
`send_batch()`, so a batch costs one future and one task, and a record costs
an append and the future its request waits on.

Contract of `Publisher.publish`: it returns once the broker acknowledged the
batch holding the record (with the producer's acks), or raises the producer's
error (KafkaError, TimeoutError) when the batch could not be delivered. A
record goes to the partition Kafka's default partitioner picks for its key
(`pipeline.partitioner`) over the partition count of the producer's latest
metadata, so consumers co-partitioned by key see it where they would with
`producer.send()`. Records of a partition are handed to the
producer in the order they were published; a batch stays open for appends
until the producer takes it (after its linger, or once the previous request
to the broker returned), as with `send()`.
"""

from __future__ import annotations

import asyncio
import copy

from aiokafka import AIOKafkaProducer

from pipeline.partitioner import partition


class _Batch:
    __slots__ = ("builder", "waiters", "handed")

    def __init__(self, builder, handed: asyncio.Future):
        self.builder = builder
        self.waiters: list[asyncio.Future] = []
        # resolved once this batch is in the producer's queue (or failed to get there)
        self.handed = handed


class Publisher:
    def __init__(self, producer: AIOKafkaProducer):
        self.producer = producer
        self._counts: dict[str, int] = {}  # topic -> partitions
        self._open: dict[tuple[str, int], _Batch] = {}
        self._last: dict[tuple[str, int], _Batch] = {}  # the newest batch of a partition
        self._tasks: set[asyncio.Task] = set()
        # the producer learns about added partitions from metadata; so do we, when it does
        # (not per batch: that copied the topic's partitions into a set every time)
        producer.client.cluster.add_listener(self._metadata_updated)

    def _metadata_updated(self, cluster) -> None:
        for topic in self._counts:
            known = cluster.partitions_for_topic(topic)
            if known:
                self._counts[topic] = len(known)

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        """Append the record to its partition's open batch and wait for the acks."""
        count = self._counts.get(topic)
        if count is None:
            count = self._counts[topic] = len(await self.producer.partitions_for(topic))
        tp = (topic, partition(key, count))
        batch = self._open.get(tp)
        # append() answers None once the batch is full or taken by the producer
        if batch is None or batch.builder.append(timestamp=None, key=key, value=value) is None:
            batch = self._start(tp)
            batch.builder.append(timestamp=None, key=key, value=value)  # a first one always fits
        waiter = asyncio.get_running_loop().create_future()
        batch.waiters.append(waiter)
        await waiter

    def _start(self, tp: tuple[str, int]) -> _Batch:
        loop = asyncio.get_running_loop()
        batch = _Batch(self.producer.create_batch(), loop.create_future())
        previous = self._last.get(tp)
        self._open[tp] = self._last[tp] = batch
        task = loop.create_task(self._send(tp, batch, previous))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return batch

    async def _send(self, tp: tuple[str, int], batch: _Batch, previous: _Batch | None) -> None:
        topic, part = tp
        error: BaseException | None = None
        try:
            if previous is not None and not previous.handed.done():
                await asyncio.wait([previous.handed])  # keep the partition's order
            try:
                delivered = await self.producer.send_batch(batch.builder, topic, partition=part)
            finally:
                batch.handed.set_result(None)
            await delivered
        except asyncio.CancelledError as e:
            error = e
            raise
        except Exception as e:  # noqa: BLE001 - handed to every request waiting on the batch
            error = e
        finally:
            self._finish(tp, batch, error)

    def _finish(self, tp: tuple[str, int], batch: _Batch, error: BaseException | None) -> None:
        batch.builder.close()  # no more appends: a batch that failed is never sent
        if not batch.handed.done():
            batch.handed.set_result(None)
        if self._open.get(tp) is batch:
            del self._open[tp]
        if self._last.get(tp) is batch:
            del self._last[tp]
        for waiter in batch.waiters:
            if waiter.done():
                continue  # its request was cancelled
            if error is None:
                waiter.set_result(None)
            elif isinstance(error, asyncio.CancelledError):
                waiter.cancel()
            else:
                # a copy each, so tracebacks do not pile up on one exception object
                waiter.set_exception(copy.copy(error))

    async def flush(self) -> None:
        """Wait until every batch started so far is delivered or failed."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))
