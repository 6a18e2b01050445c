"""Faust, adapted: the one module that reaches into Faust's internals.

What the worker relies on, and why (tests/test_adapters.py pins each against the
installed Faust, so an upgrade that changes one fails a test, not production):

- `BatchConsumer._drain_messages`: Faust delivers every record on its own, through
  a task race, a queue and a stream step, which costs far more than the handling
  (bench/NOTES.md). Here the records of a fetch that belong to a batch topic go to
  that topic's handler as one list per partition; everything of Faust that matters
  for correctness stays (group membership, the co-partitioned assignment, table
  recovery, flow control across rebalances, acks and commits, the producer flush
  before each commit). A handler is a plain function that never awaits, so no
  rebalance interleaves between reading and writing a key. Records are acked once
  their handler returned and its outputs were handed to the producer.
- `handling(message)`: makes `message` Faust's current event, which decides the
  partition of a table read or write and of its changelog record.
- `ConsumerThread`: the aiokafka consumer on the worker's own event loop instead of
  a thread and loop of its own (a fetch is an await, not two hand-overs between
  threads), with the pipeline's short fetch wait, draining only partitions Faust
  will not drop.
- `Recovery`: table recovery that resumes the stream partitions only once it is
  safe, with highwaters read as `kafka.log_end_offsets` reads them.
- Accessors for the few private attributes the worker reads: the producer under
  Faust's, the committed offsets, a table store's raw bytes.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import faust
import faust.tables.recovery
from aiokafka import TopicPartition
from faust.streams import _current_event, current_event
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as driver
from faust.types import TP, Message
from faust.types.tuples import ack_lock
from mode.utils.futures import maybe_async, notify

from pipeline import kafka
from pipeline.adapters import aiokafka as aiokafka_adapter

# a handler gets the records of one partition: aiokafka's ConsumerRecords (or Faust
# Messages in tests), each with .topic, .partition, .offset, .key and .value
BatchHandler = Callable[[list[Message]], None]

# Faust's driver hard-codes a 1.5 s fetch wait, and Tansu answers a fetch that found
# nothing only at its max wait: every hop through the worker would wait that long
FETCH_MAX_WAIT_MS = kafka.FETCH_MAX_WAIT_MS
# records handled between two yields to the event loop (its web server, timers, the
# Kafka consumer's fetches and heartbeats)
CHUNK = 2000
# A busy worker's fetch waits at the broker for about this many seconds' worth of
# records at the recent rate (fetch_min_bytes): its cost is mostly per fetch, so
# fewer, fuller fetches save CPU; a light load is never held
COALESCE_S = 0.004
COALESCE_WINDOW_S = 0.1  # the rate is measured over this long; a longer lull resets it
COALESCE_MOST = 64 * 1024


class _Current:
    """What Faust's tables read from the current event: the record's topic and partition."""

    __slots__ = ("message", "__weakref__")

    def __init__(self, message: Message):
        self.message = message


@contextmanager
def handling(message: Message) -> Iterator[None]:
    """Make `message` Faust's current event: table reads and writes (and the
    changelog partition of a write) follow its partition."""
    current = _Current(message)
    token = _current_event.set(weakref.ref(current))
    try:
        yield
    finally:
        _current_event.reset(token)


class BatchConsumer(driver.Consumer):
    """Faust's aiokafka consumer; records of `batch_handlers`' topics go to them in batches."""

    batch_handlers: dict[str, BatchHandler]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_handlers = {}

    async def _drain_messages(self, fetcher) -> None:  # pragma: no cover - Faust's loop, batched
        """Faust's `Consumer._drain_messages`, with the records of batch topics
        collected per fetch and handed over per topic and partition."""
        handlers = self.batch_handlers
        to_message = self._to_message
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        acks_enabled_for = self.app.topics.acks_enabled_for
        wait_until_ebb = self.app.producer.buffer.wait_until_ebb
        loop, coalescer = asyncio.get_running_loop(), Coalescer()
        try:
            while not (self._stopped.is_set() or fetcher._stopped.is_set()):
                self.diag.set_flag(CONSUMER_FETCHING)
                await self.sleep(0)
                if self.should_stop:
                    continue
                # Faust's `getmany`, per partition instead of per record: a batch
                # topic's records stay aiokafka's ConsumerRecords (topic, partition,
                # offset, key, value), with no Faust message built for each
                records, active = await self._wait_next_records(1.0)
                if records is None or self.should_stop:
                    continue
                if not self.flow_active:
                    await self._seek_back()
                    continue
                generation = self.app.consumer_generation_id
                batches: dict[TP, list] = {}
                size = 0
                for tp, fetched in records.items():
                    if not self.flow_active or self.app.consumer_generation_id != generation:
                        break  # a rebalance: the rest is fetched again after its seek
                    if (
                        active is not None
                        and tp not in active
                        and tp not in self._buffered_partitions
                    ):
                        continue
                    self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                    kept = batches.setdefault(tp, []) if tp.topic in handlers else None
                    for record in fetched:
                        size += record.serialized_value_size
                        offset = record.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is not None and offset < r_offset:
                            continue  # read before (Faust: "DROPPED MESSAGE ROFF")
                        if offset - (r_offset or 0) > 1 and r_offset and acks_enabled_for(tp.topic):
                            await self._add_gap(tp, r_offset + 1, offset)
                        if kept is not None:
                            kept.append(record)
                        else:
                            message = to_message(tp, record)
                            await self.wait_first(self.callback(message), self.suspend_flow.wait())
                        set_read_offset(tp, offset)
                self._set_fetch_min_bytes(coalescer.batch(size, loop.time()))
                for group in _groups(batches, CHUNK):
                    await wait_until_ebb()  # the producer buffer is the back-pressure
                    if not self._may_handle(generation):
                        break  # a rebalance: not acked, so the new owner replays them
                    for tp, chunk in group:
                        handlers[tp.topic](chunk)
                    if self.app.outputs is not None:
                        await self.app.outputs.flush()  # sent before the inputs are acked
                    if self.app.consumer_generation_id != generation:
                        break  # revoked while sending: its new owner replays the group
                    for tp, chunk in group:
                        self._ack_all(tp, chunk)
                    await asyncio.sleep(0)
                if self._commit_every is not None and self._n_acked >= self._commit_every:
                    self._n_acked = 0
                    await self.commit()
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)

    def _set_fetch_min_bytes(self, value: int) -> None:
        """The minimum bytes of the consumer thread's next fetches."""
        consumer = getattr(self._thread, "_consumer", None)
        if consumer is not None:
            aiokafka_adapter.set_fetch_min_bytes(consumer, value)

    async def _seek_back(self) -> None:
        """Faust's `getmany` with the flow stopped: back to the committed offsets."""
        self.log.dev("getmany called while flow not active. Seek back to committed offsets.")
        try:
            await self.perform_seek()
        except Exception as exc:  # noqa: BLE001 - Faust's own handling
            self.log.warning(f"exception performing seek when flow not active {exc}")

    def _ack_all(self, tp, messages: list[Message]) -> None:
        """`Consumer.ack` for a chunk of one partition, under one lock: the offsets
        join Faust's acked set, from which its commits take the contiguous prefix."""
        with ack_lock:
            committed = self._committed_offset[tp]
            index, acked = self._acked_index[tp], self._acked[tp]
            count = 0
            for message in messages:
                offset = message.offset
                if (committed is None or offset >= committed) and offset not in index:
                    index.add(offset)
                    acked.append(offset)
                    count += 1
            self._n_acked += count
            notify(self._waiting_for_ack)

    def _may_handle(self, generation: int) -> bool:
        return (
            self.flow_active
            and not self.suspend_flow.is_set()
            and self.app.flow_control.is_active()
            and self.app.consumer_generation_id == generation
        )

    def _new_consumer_thread(self) -> ConsumerThread:
        # the thread's loop is this one: see ConsumerThread
        return ConsumerThread(self, loop=self.loop, thread_loop=self.loop, beacon=self.beacon)


class Coalescer:
    """The fetch_min_bytes that makes a fetch wait for about `span` seconds of
    records at the rate of the last `window`: 1 (answer at once) when traffic is
    light or resumes after a lull, so only a busy worker's fetches wait, and by a
    few milliseconds."""

    def __init__(
        self, span: float = COALESCE_S, window: float = COALESCE_WINDOW_S, most: int = COALESCE_MOST
    ):
        self.span, self.window, self.most = span, window, most
        self.min_bytes = 1
        self.start: float | None = None  # of the window being measured
        self.last: float | None = None  # when the last batch came
        self.bytes = 0  # in the window so far

    def batch(self, size: int, now: float) -> int:
        """A fetched batch of `size` bytes came at `now`: the next fetches' minimum."""
        if self.start is None or now - self.last > self.window:
            self.start, self.bytes, self.min_bytes = now, 0, 1  # first, or after a lull
        self.last = now
        self.bytes += size
        elapsed = now - self.start
        if elapsed >= self.window:
            rate = self.bytes / elapsed
            self.min_bytes = max(1, min(self.most, int(rate * self.span)))
            self.start, self.bytes = now, 0
        return self.min_bytes


def _groups(batches: dict[TP, list], size: int) -> Iterator[list[tuple[TP, list]]]:
    """The records of a fetch as groups of at most `size` (a partition's records in
    chunks of at most `size`, in order): each group is handled, its outputs sent as
    one produce request, and acked, before the event loop runs again."""
    group: list[tuple[TP, list]] = []
    count = 0
    for tp, messages in batches.items():
        for start in range(0, len(messages), size):
            chunk = messages[start : start + size]
            if group and count + len(chunk) > size:
                yield group
                group, count = [], 0
            group.append((tp, chunk))
            count += len(chunk)
    if group:
        yield group


class ConsumerThread(driver.AIOKafkaConsumerThread):
    """Faust's consumer "thread", run as a task of the worker's own event loop, with a
    short fetch wait and a safe fetch. The consumer's heartbeats share the loop with
    the handlers, which yield to it every `CHUNK` records (tens of milliseconds, far
    under the session timeout)."""

    _serving: asyncio.Future | None = None

    async def start(self) -> None:
        """`ServiceThread.start` without the thread: serve as a task of this loop."""
        assert not self._thread_started.is_set()
        self._thread_started.set()
        self._thread_running = self.parent_loop.create_future()
        self._serving = asyncio.ensure_future(self._serve())
        try:
            if not self.should_stop:
                await self._thread_running  # started, or raises what start-up raised
        finally:
            self._thread_running = None

    async def stop(self) -> None:
        await super().stop()  # a no-op unless started
        if self._serving is not None:
            await asyncio.gather(self._serving, return_exceptions=True)

    async def _gather_remaining_tasks(self) -> None:
        """A thread's loop ends with the thread; this loop is the worker's, and
        its other tasks are not this service's to cancel."""

    async def call_thread(self, fun, *args, **kwargs):
        return await maybe_async(fun(*args, **kwargs))

    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        aiokafka_adapter.set_fetch_max_wait_ms(consumer, FETCH_MAX_WAIT_MS)
        return consumer

    async def _fetch_records(self, consumer, active_partitions, timeout=None, max_records=None):
        """Faust's fetch, draining only partitions that Faust will not drop.

        Faust passes its live set of active partitions to the consumer thread, where
        aiokafka's `Fetcher.fetched_records(partitions, timeout)` waits up to a second
        (across a rebalance, too) and drains the records of `tp in partitions`, or of
        every partition if `partitions` is falsy. Faust's `Consumer.getmany` then drops
        what is not active by then, or, with the flow stopped, all of it: aiokafka's
        positions have moved past records nobody processes. That happens when the
        recovery pauses the changelogs while the stream partitions are still paused
        (the set is empty), and when a rebalance comes while a fetch waits. Partitions
        without a committed offset are never seeked back (a takeover loses the whole
        backlog); the others lose what comes after their seek, and the gap is committed
        over (`Consumer._add_gap`). Here a partition is drained only if it is active,
        with the flow running, at the moment aiokafka drains it.
        """
        if active_partitions is not None:
            if not active_partitions:
                return {}
            active_partitions = _FetchablePartitions(self.consumer, active_partitions)
        return await super()._fetch_records(
            consumer, active_partitions, timeout=timeout, max_records=max_records
        )


class _FetchablePartitions:
    """The partitions aiokafka may hand to Faust, decided when it drains its buffers."""

    def __init__(self, consumer, active) -> None:
        self.consumer, self.active = consumer, active

    def __bool__(self) -> bool:
        return True  # aiokafka reads a falsy set as "every assigned partition"

    def __contains__(self, tp) -> bool:
        return self.consumer.flow_active and tp in self.active


class Transport(driver.Transport):
    Consumer = BatchConsumer


class App(faust.App):
    """A Faust app whose consumer hands batch topics to `batch(topic)` handlers."""

    #: where the batch handlers queue their writes (pipeline.worker.outputs.Outputs)
    outputs = None

    def _new_transport(self):
        return Transport(self.conf.broker_consumer, self)

    def batch(self, topic: faust.TopicT) -> Callable[[BatchHandler], BatchHandler]:
        """Register a handler for every fetched batch of `topic` (one partition per call)."""

        def register(handler: BatchHandler) -> BatchHandler:
            self.topics.add(topic)
            self.consumer.batch_handlers[topic.get_topic_name()] = handler
            return handler

        return register


class Recovery(faust.tables.recovery.Recovery):
    """Faust's table recovery, resuming the stream partitions only once it is safe.

    Faust's `Recovery.on_recovery_completed` resumes the stream partitions first and
    only then awaits `perform_seek` and calls `app.flow_control.resume()`. The consumer
    flow is already running (it was resumed to read the changelogs), so records that
    aiokafka prefetched for those partitions during the recovery reach the streams'
    queues while `perform_seek` is awaited, and `flow_control.resume()` then empties
    those queues (they are `clear_on_resume`): dropped, never processed, never acked,
    while aiokafka's position has moved past them. Nothing seeks back (a partition
    without a committed offset is not seeked at all), later records are committed past
    them: a partition taken over after a rebalance silently loses its backlog, often
    all of it on Apache Kafka, which fills the prefetch buffers during the recovery.

    Same steps here, in a safe order: seek, clear the queues, then resume the stream
    partitions and the flow.
    """

    async def _build_highwaters(self, consumer, tps, destination, title: str) -> None:
        """Faust's highwaters (the last offset to restore) from `kafka.log_end_offsets`:
        Faust asks ListOffsets, which on Tansu stops short of the last record batch."""
        bootstrap = ",".join(f"{url.host}:{url.port}" for url in self.app.conf.broker_consumer)
        ends = await kafka.log_end_offsets(
            bootstrap, [TopicPartition(tp.topic, tp.partition) for tp in tps]
        )
        highwaters = {tp: ends[TopicPartition(tp.topic, tp.partition)] - 1 for tp in tps}
        self.log.info(
            "Highwater for %s changelog partitions:\n%s",
            title,
            self._highwater_logtable(highwaters, title=title),
        )
        destination.clear()
        destination.update(highwaters)

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        app, consumer = self.app, self.app.consumer
        self.log.info("Restore complete!")
        await app.on_rebalance_complete.send()
        self._set_recovery_ended()
        callbacks = [
            asyncio.ensure_future(
                table.on_recovery_completed(
                    self.actives_for_table[table], self.standbys_for_table[table]
                )
            )
            for table in self.tables.values()
        ]
        if callbacks:
            await asyncio.wait(callbacks)
        if app.consumer_generation_id != generation_id:
            self.log.warning(
                "Recovery rebalancing again app id %r param %r",
                app.consumer_generation_id,
                generation_id,
            )
            return
        assignment = consumer.assignment()
        if assignment:
            self.log.info("Seek stream partitions to committed offsets.")
            await self._wait(consumer.perform_seek(), timeout=app.conf.broker_request_timeout)
        self.completed.set()
        app.flow_control.resume()  # clears Faust's stream queues: nothing of this generation yet
        consumer.resume_partitions({tp for tp in assignment if not self._is_changelog_tp(tp)})
        consumer.resume_flow()
        await app._fetcher.maybe_start()
        self.tables.on_actives_ready()
        if not app.assignor.assigned_standbys():
            self.tables.on_standbys_ready()
        app.on_rebalance_end()
        self.log.info("Worker ready")


class TableManager(faust.tables.TableManager):
    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = Recovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


def aiokafka_producer(app: faust.App):
    """The started aiokafka producer under Faust's producer."""
    return app.producer._producer


def committed_offset(app: faust.App, tp: TP) -> int | None:
    """The offset Faust last committed for `tp` (None when none since the assignment)."""
    return app.consumer._committed_offset.get(tp)


def table_bytes(table) -> Callable[[int], Any]:
    """`partition -> mapping` of a table's raw bytes underneath Faust's store (keys and
    values are bytes already, so Faust's (de)serializing layers only cost time): the
    memory store's dict, RocksDB's database of the partition, or the store itself."""
    store = table.data
    raw = getattr(store, "data", None)
    if isinstance(raw, dict):
        return lambda partition: raw
    per_partition = getattr(store, "_db_for_partition", None)
    if per_partition is not None:
        return per_partition
    return lambda partition: store


def current_partition() -> int:
    """The partition of the record being handled (see `handling`)."""
    return current_event().message.partition
