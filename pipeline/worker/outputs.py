"""What the worker's handlers write to Kafka, sent as one record batch per partition.

Faust sends each table write and each output through its producer buffer, one
message, future and callback at a time. Here the handlers only append: `Outputs`
keeps the records of the batch being handled per topic partition and, once the
handler returned, hands each partition's records to aiokafka as one record batch
(`send_batch`). The records are sent before their inputs are acked, and Faust
flushes the producer before it commits offsets, so a commit never passes a write
still in flight; a failed send stops the worker before anything after it is acked.

`Changelogged` is the table a handler sees: reads and writes go to the Faust
table's store, and every write also becomes a changelog record on the partition of
the record being handled, exactly the record Faust itself would have written, so
Faust's recovery restores the store from the changelog as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, MutableMapping

from faust.types import TP

from pipeline import kafka
from pipeline.adapters.faust import aiokafka_producer, current_partition, table_bytes

# record batches sent and not yet acknowledged before the handlers wait for them
MAX_IN_FLIGHT = 64


class Outputs:
    def __init__(self, app, partitions: int):
        self.app = app
        self.partitions = partitions
        self.pending: dict[tuple[str, int], list[tuple[bytes, bytes | None]]] = {}
        self.in_flight: list[asyncio.Future] = []
        # topic -> called with (partition, last offset written) once a batch is stored
        self.on_sent: dict[str, Callable[[TP, int], None]] = {}

    def add(self, topic: str, key: bytes, value: bytes | None, partition: int | None = None) -> int:
        """Queue one record; without a partition, the key's (Kafka's default partitioner).
        Returns the partition."""
        if partition is None:
            partition = kafka.partition(key, self.partitions)
        records = self.pending.get((topic, partition))
        if records is None:
            records = self.pending[(topic, partition)] = []
        records.append((key, value))
        return partition

    async def flush(self) -> None:
        """Hand every queued record to the producer, one batch per partition (or more
        if a partition's records exceed the producer's batch size)."""
        if not self.pending:
            return
        pending, self.pending = self.pending, {}
        producer = aiokafka_producer(self.app)
        for (topic, partition), records in pending.items():
            on_sent = self.on_sent.get(topic)
            for future, count in await kafka.send_records(producer, topic, partition, records):
                if on_sent is not None:
                    future.add_done_callback(_report(on_sent, TP(topic, partition), count))
                self.in_flight.append(future)
        await self._bound_in_flight()

    async def _bound_in_flight(self) -> None:
        self.in_flight = [f for f in self.in_flight if not f.done() or f.exception()]
        failed = [f for f in self.in_flight if f.done()]
        if failed:
            failed[0].result()  # raises: stop before the inputs are acked
        if len(self.in_flight) > MAX_IN_FLIGHT:
            done = self.in_flight
            self.in_flight = []
            await asyncio.gather(*done)


def _report(on_sent: Callable[[TP, int], None], tp: TP, count: int):
    """A delivery callback telling `on_sent` the last offset of a stored batch."""

    def done(future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            on_sent(tp, future.result().offset + count - 1)

    return done


class Changelogged(MutableMapping):
    """A Faust table's store, each write also queued as a changelog record.

    It also counts the live keys of each partition (the state-keys gauge), without
    asking the store: RocksDB can only count by scanning. A write or delete follows a
    read of the same key in every handler, so that read says whether the key is new;
    after an assignment, `recount` sets each partition's count from the scan that
    rebuilds its expiry index.
    """

    def __init__(self, table, outputs: Outputs):
        self.store = table.data
        self._bytes = table_bytes(table)  # partition -> its raw mapping
        self.topic = table.changelog_topic.get_topic_name()
        self.outputs = outputs
        outputs.on_sent[self.topic] = self._persisted
        self.live: dict[int, int] = {}
        self._last: tuple[bytes | None, bool] = (None, False)  # last key read, found?

    def _persisted(self, tp: TP, offset: int) -> None:
        # what Faust's own changelog callback records: the offset the store holds
        # (RocksDB keeps it, so a restart replays the changelog from there only)
        self.store.set_persisted_offset(tp, offset)

    def _known(self, raw, key: bytes) -> bool:
        last, found = self._last
        return found if last == key else raw.get(key) is not None

    def __getitem__(self, key: bytes) -> bytes:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: bytes, default=None):
        value = self._bytes(current_partition()).get(key)
        self._last = (key, value is not None)
        return default if value is None else value

    def __setitem__(self, key: bytes, value: bytes) -> None:
        partition = current_partition()
        raw = self._bytes(partition)
        if not self._known(raw, key):
            self.live[partition] = self.live.get(partition, 0) + 1
        raw[key] = value
        self._last = (key, True)
        self.outputs.add(self.topic, key, value, partition)

    def __delitem__(self, key: bytes) -> None:
        partition = current_partition()
        raw = self._bytes(partition)
        if self._known(raw, key):
            self.live[partition] = self.live.get(partition, 0) - 1
            del raw[key]
        self._last = (key, False)
        self.outputs.add(self.topic, key, None, partition)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.store)

    def __len__(self) -> int:
        return sum(self.live.values())

    def items(self):
        return self.store.items()

    def recount(self, counts: dict[int, int]) -> None:
        """The live keys of partitions just scanned."""
        self.live.update(counts)

    def forget(self, partitions) -> None:
        for partition in partitions:
            self.live.pop(partition, None)
