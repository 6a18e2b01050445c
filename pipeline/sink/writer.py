"""The warehouse sink: Kafka topics -> ClickHouse tables, in batches.

Checkpoint order, per batch:
  1. poll until the batch is full (`sink.batch_rows`) or old (`sink.batch_seconds`),
     or the sink has caught up (every partition read to the end of its last fetch);
     a batch that is not full is written at most once per `sink.batch_seconds`, so
     low traffic still makes few, large inserts, and a drained backlog waits for nothing;
  2. insert every table's rows (clickhouse-connect, blocking on a thread), while
     the next batch is polled;
  3. commit the batch's own offsets (never those of the batch being polled).
A crash between 2 and 3 replays the batch; the tables dedupe by ID
(ReplacingMergeTree read with FINAL), so a replay changes nothing an analyst reads.
An insert that fails is retried with backoff, never skipped: the sink stalls
rather than loses rows, and its lag metric shows it.

The sink decodes nothing: the message values are bare Avro bodies, so a
table's batch is sent as one Avro container file of them, under the record's
schema with fields named as columns (`core.rows.Table.avro_schema`), and ClickHouse
decodes and shapes the rows (`INSERT INTO t (columns) FORMAT Avro`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from pipeline import codec, kafka
from pipeline.config import Settings
from pipeline.sink import migrations

log = logging.getLogger(__name__)


class Sink:
    def __init__(self, settings: Settings, routes: dict, group: str):
        """`routes`: topic suffix -> (codec, rows.Table); `group`: the consumer group."""
        self.settings = settings
        self.routes, self.group = routes, group
        # topic -> (table, the container its bodies are sent in)
        self.by_topic = {
            settings.topic(name): (table, codec.Container(table.avro_schema(codec_.raw_schema)))
            for name, (codec_, table) in self.routes.items()
        }
        self.client = None
        self.consumer = None
        self._partial_at = float("-inf")  # when the last batch that was not full was cut

    async def start(self) -> None:
        s = self.settings
        await kafka.ensure_topics(s, list(self.routes))
        self.client = await asyncio.to_thread(migrations.connect, s.clickhouse_url)
        await asyncio.to_thread(migrations.migrate, self.client, s.clickhouse_database)
        self.consumer = kafka.consumer(
            s, s.topic(self.group), list(self.by_topic), max_poll_records=s.sink_batch_rows
        )
        await self.consumer.start()

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        if self.client is not None:
            self.client.close()

    async def run(self) -> None:
        """Consume forever; cancel to stop.

        Batch N+1 is polled while batch N is being written, so the insert's wait
        overlaps the consumer's own work (fetching and unpacking records). Batch
        N's offsets are committed after its write and before batch N+1 is
        written: a crash replays, never skips.
        """
        writing: asyncio.Task | None = None
        try:
            while True:
                batch, offsets = await self._collect()
                if writing is not None:
                    await writing
                writing = asyncio.create_task(self._checkpoint(batch, offsets))
        finally:
            if writing is not None and not writing.done():
                # let the write in flight finish (its rows are already being inserted)
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(writing), 10)

    async def _collect(self) -> tuple[dict[str, list[bytes]], dict]:
        """Poll until the batch is full or old; return message values by topic and
        the offsets to commit."""
        batch: dict[str, list[bytes]] = {}
        offsets: dict[TopicPartition, int] = {}
        size, period = self.settings.sink_batch_rows, self.settings.sink_batch_seconds
        count, deadline = 0, time.monotonic() + period
        early = self._partial_at + period  # a caught-up batch may not go before this
        while count < size:
            now = time.monotonic()
            if now >= deadline or (count and now >= early and await self._caught_up()):
                break
            until = min(deadline, early) if count and now < early else deadline
            polled = await self.consumer.getmany(
                timeout_ms=max(1, int((until - now) * 1000)), max_records=size - count
            )
            for tp, messages in polled.items():
                batch.setdefault(tp.topic, []).extend(m.value for m in messages)
                offsets[tp] = messages[-1].offset + 1
                count += len(messages)
        if 0 < count < size:
            self._partial_at = time.monotonic()
        return batch, offsets

    async def _caught_up(self) -> bool:
        """Whether every assigned partition has been read up to the high watermark
        of its last fetch: nothing more is to be had without new messages."""
        assigned = self.consumer.assignment()
        try:
            for tp in assigned:
                high = self.consumer.highwater(tp)
                if high is None or await self.consumer.position(tp) < high:
                    return False
        except (IllegalStateError, AssertionError):
            # unassigned while position() waited (a rebalance); highwater() asserts
            return False
        return bool(assigned)

    async def _checkpoint(self, batch: dict[str, list[bytes]], offsets: dict) -> None:
        if batch:
            await self._write(batch)
        if offsets:
            await self._commit(offsets)

    async def _write(self, batch: dict[str, list[bytes]]) -> None:
        for topic, bodies in batch.items():
            table, container = self.by_topic[topic]
            await self._retry(
                f"insert {len(bodies)} rows into {table.name}",
                functools.partial(
                    self.client.raw_insert,
                    f"{self.settings.clickhouse_database}.{table.name}",
                    list(table.columns),
                    container.file(bodies),
                    fmt="Avro",
                ),
            )

    async def _commit(self, offsets: dict) -> None:
        try:
            await self._retry_async("commit offsets", lambda: self.consumer.commit(offsets))
        except (CommitFailedError, IllegalStateError) as e:
            # the partitions moved in a rebalance: their new owner replays the batch,
            # and the replay dedupes by ID
            log.warning("commit skipped after rebalance: %s", e)

    async def _retry(self, what: str, fn) -> None:
        await self._retry_async(what, lambda: asyncio.to_thread(fn))

    async def _retry_async(self, what: str, fn) -> None:
        delay = 0.2
        while True:
            try:
                await fn()
                return
            except (asyncio.CancelledError, CommitFailedError, IllegalStateError):
                raise
            except Exception as e:  # noqa: BLE001 - any failure: wait and retry, never skip
                log.warning(
                    "%s failed (%s: %s); retrying in %.1fs", what, type(e).__name__, e, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
