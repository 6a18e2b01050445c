"""Outcome records to Kafka in batches, acknowledged before anything counts as done.

Every attempt publishes a few small records (the attempt row, the next retry
task or the dead letter). Sent one by one, each costs a producer call, a future
and a wake-up; here what was put meanwhile goes out as one produce batch per
topic partition, and one acknowledgement covers it. Fewer than `fill` outcomes
first wait `linger` seconds for others. The outcome of a callback is not on
its way to the publisher (the request has been answered), so the wait costs
only a later offset commit and saves most produce requests at moderate load;
under full load `fill` are waiting at once, and nothing waits (bench/NOTES.md).

`put` never blocks. The `done` of an entry runs once every record of the entry
is acknowledged (the producer has acks=all), never before: the service marks the
input offset finished only there. A flush Kafka refuses is sent again after a
pause until it is taken (a redelivered duplicate is harmless, a dropped outcome
is not), so `done` may be late but is never skipped while the service runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from pipeline import kafka

log = logging.getLogger(__name__)

Record = tuple[str, int, bytes, bytes]  # topic, partition, key, value
Entry = tuple[list[Record], Callable[[], None]]


LINGER = 0.005  # seconds a few outcomes wait for others (see the module docstring)
FILL = 32  # outcomes that go at once, without waiting


class Outbox:
    def __init__(self, producer: AIOKafkaProducer, linger: float = LINGER, fill: int = FILL):
        self.producer = producer
        self.linger, self.fill = linger, fill
        self.failure: BaseException | None = None  # a `done` that raised (a bug)
        self._entries: list[Entry] = []
        self._ready = asyncio.Event()
        self._unacked = 0  # entries sent and not acknowledged yet
        self._delay = 0.2  # pause before sending a refused flush again
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def put(self, records: list[Record], done: Callable[[], None]) -> None:
        """Publish `records`; call `done()` once all of them are acknowledged."""
        self._entries.append((records, done))
        self._ready.set()

    @property
    def idle(self) -> bool:
        return not self._entries and not self._unacked

    async def drain(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds) until everything put is acknowledged."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.idle and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            if self.linger and len(self._entries) < self.fill:
                await asyncio.sleep(self.linger)
            self._ready.clear()
            entries, self._entries = self._entries, []
            if not entries:
                continue
            self._unacked += len(entries)
            try:
                acks = await self._send(entries)
            except KafkaError as e:
                self._refused(entries, e)
                continue
            except Exception as e:  # noqa: BLE001 - a bug: the service raises it
                self.failure = self.failure or e
                raise
            gathered = asyncio.gather(*acks, return_exceptions=True)
            gathered.add_done_callback(partial(self._acked, entries))

    async def _send(self, entries: list[Entry]) -> list[asyncio.Future]:
        """One batch per topic partition (more when one fills up); their futures."""
        by_partition: dict[tuple[str, int], list[tuple[bytes, bytes]]] = {}
        for records, _ in entries:
            for topic, partition, key, value in records:
                by_partition.setdefault((topic, partition), []).append((key, value))
        acks = []
        for (topic, partition), records in by_partition.items():
            sent = await kafka.send_records(self.producer, topic, partition, records)
            acks.extend(future for future, _ in sent)
        return acks

    def _acked(self, entries: list[Entry], gathered: asyncio.Future) -> None:
        if gathered.cancelled():
            return  # shutting down: the offsets stay uncommitted and are redone
        errors = [r for r in gathered.result() if isinstance(r, BaseException)]
        if errors:
            self._refused(entries, errors[0])
            return
        self._unacked -= len(entries)
        self._delay = 0.2
        for _, done in entries:
            try:
                done()
            except Exception as e:  # noqa: BLE001 - a bug: the service raises it
                log.exception("finishing a callback outcome failed")
                self.failure = self.failure or e

    def _refused(self, entries: list[Entry], error: BaseException) -> None:
        log.warning(
            "publishing %d callback outcomes failed (%s); retrying in %.1fs",
            len(entries),
            error,
            self._delay,
        )
        asyncio.get_running_loop().call_later(self._delay, self._again, entries)
        self._delay = min(self._delay * 2, 10)

    def _again(self, entries: list[Entry]) -> None:
        self._unacked -= len(entries)
        self._entries[:0] = entries
        self._ready.set()
