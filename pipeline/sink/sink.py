"""The warehouse sink: Kafka topics -> ClickHouse tables, in batches.

Checkpoint order, per batch:
  1. poll until the batch is full (`sink.batch_rows`) or old (`sink.batch_seconds`);
  2. insert every table's rows (clickhouse-connect, blocking on a thread);
  3. commit the consumed offsets.
A crash between 2 and 3 replays the batch; the tables dedupe by ID
(ReplacingMergeTree read with FINAL), so a replay changes nothing an analyst reads.
An insert that fails is retried with backoff, never skipped: the sink stalls
rather than loses rows, and its lag metric shows it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from aiokafka.errors import CommitFailedError, IllegalStateError

from pipeline import codec, kafka
from pipeline.config import Settings
from pipeline.sink import ddl, rows

log = logging.getLogger(__name__)

# topic suffix -> (codec, table): the whole routing of the sink
ROUTES = {
    "clicks": (codec.CLICK, rows.CLICKS),
    "postbacks": (codec.POSTBACK, rows.POSTBACKS),
    "conversions": (codec.CONVERSION, rows.CONVERSIONS),
    "callback-attempts": (codec.CALLBACK, rows.CALLBACKS),
}
GROUP = "sink"


class Sink:
    def __init__(self, settings: Settings, routes: dict | None = None):
        self.settings = settings
        self.routes = routes or ROUTES
        self.by_topic = {settings.topic(name): route for name, route in self.routes.items()}
        self.client = None
        self.consumer = None
        self.rows_written = 0

    async def start(self) -> None:
        s = self.settings
        await kafka.ensure_topics(s, list(self.routes))
        self.client = await asyncio.to_thread(ddl.connect, s.clickhouse_url)
        await asyncio.to_thread(ddl.migrate, self.client, s.clickhouse_database)
        self.consumer = kafka.consumer(
            s, s.topic(GROUP), list(self.by_topic), max_poll_records=s.sink_batch_rows
        )
        await self.consumer.start()

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        if self.client is not None:
            self.client.close()

    async def run(self) -> None:
        """Consume forever: batch, write, then commit. Cancel to stop."""
        while True:
            await self.run_once()

    async def run_once(self) -> int:
        """One checkpoint: collect a batch, write it, commit it. Returns rows written."""
        batch: dict[str, list[tuple]] = {}
        count, deadline = 0, time.monotonic() + self.settings.sink_batch_seconds
        while count < self.settings.sink_batch_rows:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            polled = await self.consumer.getmany(
                timeout_ms=int(left * 1000), max_records=self.settings.sink_batch_rows - count
            )
            for tp, messages in polled.items():
                codec_, table = self.by_topic[tp.topic]
                out = batch.setdefault(table.name, [])
                for message in messages:
                    out.append(table.row(codec_.decode(message.value)))
                count += len(messages)
        if count:
            await self._write(batch)
        # commits what was consumed, also when it was nothing new (cheap, keeps it simple)
        await self._commit()
        self.rows_written += count
        return count

    async def _write(self, batch: dict[str, list[tuple]]) -> None:
        tables = {t.name: t for _, t in self.routes.values()}
        for name, data in batch.items():
            table = tables[name]
            await self._retry(
                f"insert {len(data)} rows into {name}",
                functools.partial(
                    self.client.insert,
                    f"{self.settings.clickhouse_database}.{name}",
                    data,
                    list(table.columns),
                ),
            )

    async def _commit(self) -> None:
        try:
            await self._retry_async("commit offsets", self.consumer.commit)
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
