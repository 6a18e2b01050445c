"""aiokafka, adapted: the one module that reaches into aiokafka's internals.

What the pipeline relies on (tests/test_adapters.py pins each against the
installed aiokafka, so an upgrade that changes one fails a test):

- `Produce.send(node_id, batches)` sends the ready batches of several partitions
  (one per partition, each the partition's oldest) to their leader in ONE
  ProduceRequest on the producer's client, as aiokafka's sender
  (`SendProduceReqHandler`) would, without its accumulator, with the producer's
  acks and request timeout. It settles every batch from the broker's answer for
  its partition: delivered, failed with the error aiokafka's producer would
  raise, or handed back for a retry when the error is retriable and the batch
  younger than the request timeout (the producer's batch lifetime). What it hands
  back, it hands back after the producer's retry backoff, and after a metadata
  refresh when the error said the metadata was stale. Waiters of a batch are the
  futures its requests await; one cancelled (its HTTP request went away) is left
  alone.
- A consumer's fetch wait and minimum bytes, set between fetches (the Fetcher
  reads them for every request it builds).
- Whether a producer is idempotent or closed.
"""

from __future__ import annotations

import asyncio
import copy
import time

import aiokafka.errors as Errors
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.protocol.produce import ProduceRequest


class Batch:
    __slots__ = ("builder", "waiters", "created")

    def __init__(self, builder):
        self.builder = builder
        self.waiters: list[asyncio.Future] = []
        self.created = time.monotonic()

    def done(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)

    def fail(self, error: BaseException) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                # a copy each, so tracebacks do not pile up on one exception object
                waiter.set_exception(copy.copy(error))

    def cancel(self) -> None:
        for waiter in self.waiters:
            waiter.cancel()


class Produce:
    def __init__(self, producer: AIOKafkaProducer):
        # the producer's own settings, so both paths behave alike; aiokafka keeps them
        # private (the version is pinned in requirements.lock; tests/test_produce.py
        # reads them through a real producer)
        self.client = producer.client
        self.acks = producer._sender._acks
        self.timeout_ms = producer._request_timeout_ms
        self.backoff = self.client._retry_backoff  # seconds
        self.lifetime = self.timeout_ms / 1000  # aiokafka's batch_ttl

    def expired(self, batch: Batch, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) - batch.created > self.lifetime

    def request(self, batches: dict[tuple[str, int], Batch]) -> ProduceRequest:
        topics: dict[str, list[tuple[int, bytes]]] = {}
        for (topic, part), batch in batches.items():
            # _build() closes the batch for appends; it is what send_batch() hands over too
            topics.setdefault(topic, []).append((part, batch.builder._build()))
        return ProduceRequest(
            transactional_id=None,
            required_acks=self.acks,
            timeout=self.timeout_ms,
            topics=list(topics.items()),
        )

    async def send(
        self, node_id: int, batches: dict[tuple[str, int], Batch]
    ) -> dict[tuple[str, int], Batch]:
        """Send, settle the batches; return those to retry (after the backoff)."""
        retry: dict[tuple[str, int], Batch] = {}
        stale = False
        try:
            response = await self.client.send(node_id, self.request(batches))
        except KafkaError as error:
            stale = getattr(error, "invalid_metadata", False)
            for tp, batch in batches.items():
                self._retry_or_fail(tp, batch, error, retry)
        except asyncio.CancelledError:
            for batch in batches.values():
                batch.cancel()
            raise
        except Exception as error:  # noqa: BLE001 - a bug here must not leave requests hanging
            for batch in batches.values():
                batch.fail(KafkaError(f"produce request failed: {error!r}"))
            return retry
        else:
            if response is None:  # acks=0: the broker answers nothing
                for batch in batches.values():
                    batch.done()
                return retry
            pending = dict(batches)
            for topic, partitions in response.topics:
                for answer in partitions:
                    part, code = answer[0], answer[1]
                    batch = pending.pop((topic, part), None)
                    if batch is None:
                        continue
                    if code == 0:
                        batch.done()
                        continue
                    kind = Errors.for_code(code)
                    stale |= kind.invalid_metadata
                    error = kind(topic) if kind is Errors.TopicAuthorizationFailedError else kind()
                    self._retry_or_fail((topic, part), batch, error, retry)
            for batch in pending.values():  # a broker must answer for every partition
                batch.fail(KafkaError(f"no answer for the partition from broker {node_id}"))
        if retry:
            update = self.client.force_metadata_update() if stale else None
            try:
                await asyncio.sleep(self.backoff)
                if update is not None:
                    await update
            except BaseException:
                for batch in retry.values():
                    batch.cancel()
                raise
        return retry

    def _retry_or_fail(self, tp, batch: Batch, error: KafkaError, retry: dict) -> None:
        if error.retriable and not self.expired(batch):
            retry[tp] = batch
        else:
            batch.fail(error)


def is_idempotent(producer: AIOKafkaProducer) -> bool:
    """Idempotence and transactions need sequence numbers aiokafka's sender keeps."""
    return producer._txn_manager is not None


def is_closed(producer: AIOKafkaProducer) -> bool:
    return producer._closed


def set_fetch_min_bytes(consumer, value: int) -> None:
    """The minimum bytes of `consumer`'s next fetches (an AIOKafkaConsumer)."""
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is not None:
        fetcher._fetch_min_bytes = value


def set_fetch_max_wait_ms(consumer, value: int) -> None:
    """How long the broker may hold `consumer`'s fetches (before it starts)."""
    consumer._fetch_max_wait_ms = value
