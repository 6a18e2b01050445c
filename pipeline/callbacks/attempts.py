"""Making attempts and publishing their outcomes: what happens to a job once the
service has taken it from Kafka.

Each lane runs up to `concurrency` workers; a worker takes the lane's next
queued job, builds its request, publishes the attempt's `sending` record and
waits for Kafka's acknowledgement (so a request never leaves without its row,
whatever happens to the process during it), sends the request, and hands the
outcome (the attempt row under the same attempt_id, plus the next retry task or
the dead letter) to the outbox. A job that is
parked (its lane is stalled) or names an unknown publisher is published the
same way without a request. `finish(job)` is called only once everything the
job published is acknowledged by Kafka: the service then marks its offset done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial

from aiokafka import AIOKafkaProducer

from pipeline import codec
from pipeline.callbacks.deliver import Deliverer
from pipeline.callbacks.lanes import Job, Lane
from pipeline.callbacks.metrics import CallbackMetrics
from pipeline.callbacks.outbox import Outbox
from pipeline.config import Settings
from pipeline.core import callback as request
from pipeline.core import delivery as policy

log = logging.getLogger(__name__)


def now_ms() -> int:
    return int(time.time() * 1000)


class Attempts:
    def __init__(
        self,
        settings: Settings,
        metrics: CallbackMetrics,
        topics: dict[str, str],  # ATTEMPTS, DEAD and each retry topic: full names
        retry_topic: Callable[[int], str],  # n -> name of callbacks-retry-<n>
        park_delay: float,
        finish: Callable[[Job], None],
        wake: asyncio.Event,  # set when a lane has room again
    ):
        self.settings, self.metrics = settings, metrics
        self.topics, self.retry_topic, self.park_delay = topics, retry_topic, park_delay
        self.finish, self.wake = finish, wake
        self.deliverer = Deliverer(settings.callback_timeout, settings.allow_private_networks)
        self.outbox: Outbox | None = None
        self.workers: set[asyncio.Task] = set()  # at most `concurrency` per lane
        self._failure: BaseException | None = None  # what a worker raised (a bug)
        self._counters: dict[tuple, object] = {}  # labelled metric children

    @property
    def failure(self) -> BaseException | None:
        """What a worker or the outbox raised (a bug): the service stops with it."""
        return self._failure or (self.outbox.failure if self.outbox else None)

    async def start(self, producer: AIOKafkaProducer) -> None:
        self.outbox = Outbox(producer)
        self.outbox.start()
        await self.deliverer.start()

    async def stop(self, timeout: float) -> None:
        """Let running requests finish and every outcome be acknowledged (bounded)."""
        if self.workers:
            await asyncio.wait(list(self.workers), timeout=timeout)
        if self.outbox is not None:
            await self.outbox.drain(timeout=10)

    async def close(self) -> None:
        if self.outbox is not None:
            await self.outbox.close()
        await self.deliverer.close()

    def take(self, lane: Lane, job: Job, now: float) -> None:
        """Queue `job` in `lane` (which has room); a worker makes its attempt."""
        if lane.take(job, now):
            worker = asyncio.create_task(self._work(lane))
            self.workers.add(worker)
            worker.add_done_callback(self._worker_done)

    def unknown_publisher(self, job: Job) -> None:
        error = f"{request.destination(job.task)} is not in the configuration"
        if job.task.get("advertiser"):
            error += " with a skan_forward_url"
        self._conclude(job, policy.Attempt(policy.PERMANENT, None, error, now_ms(), 0, ""))

    def park(self, job: Job) -> None:
        """Put the task back in callbacks-retry-1 without an attempt (its lane is stalled)."""
        parked = policy.deferred(job.task, now_ms(), self.park_delay)
        self._publish(
            job,
            [(self.retry_topic(1), codec.CALLBACK_TASK, parked)],
            partial(self._parked, job),
        )

    def _worker_done(self, worker: asyncio.Task) -> None:
        self.workers.discard(worker)
        if not worker.cancelled() and worker.exception() is not None:
            log.error("callback worker failed", exc_info=worker.exception())
            self._failure = self._failure or worker.exception()
            self.wake.set()

    async def _work(self, lane: Lane) -> None:
        """One of a lane's workers: requests its queued jobs one at a time."""
        try:
            while lane.queue:
                job = lane.queue.popleft()
                req = request.request_of(self.settings, job.task, int(time.time()))
                try:
                    url, started = lane.redact(req.url), now_ms()
                    attempt_id = policy.new_attempt_id(started)
                    await self._sending(job, policy.sending(job.task, attempt_id, started, url))
                    attempt = await self.deliverer.send(req, url, attempt_id, started)
                finally:
                    if lane.release(time.monotonic()):
                        self.wake.set()
                self._conclude(job, attempt)
        finally:
            lane.workers -= 1

    async def _sending(self, job: Job, record: dict) -> None:
        """Publish the `sending` record of an attempt; return once Kafka has it."""
        acked = asyncio.get_running_loop().create_future()
        self._publish(
            job,
            [(self.topics["attempts"], codec.CALLBACK, record)],
            lambda: acked.done() or acked.set_result(None),
        )
        await acked

    def _conclude(self, job: Job, attempt: policy.Attempt) -> None:
        """Publish the outcome of an attempt (attempt row, next retry or dead letter)."""
        step = policy.step(job.task, attempt, self.settings.retry_schedule, now_ms())
        out = [(self.topics["attempts"], codec.CALLBACK, step.record)]
        if step.task is not None:
            out.append((self.retry_topic(step.retry), codec.CALLBACK_TASK, step.task))
        if step.dead is not None:
            out.append((self.topics["dead"], codec.CALLBACK_TASK, step.dead))
        self._publish(job, out, partial(self._concluded, job, step))

    def _concluded(self, job: Job, step: policy.Step) -> None:
        record = step.record
        if record["advertiser"]:
            self._child(self.metrics.forwards, record["advertiser"], record["outcome"]).inc()
        else:
            self._child(self.metrics.attempts, record["pub"], record["outcome"]).inc()
            if step.dead is not None:
                self._child(self.metrics.dead, record["pub"]).inc()
        # the callbacks table has every attempt; the log keeps what needs a look
        log.log(
            logging.DEBUG if record["outcome"] == "delivered" else logging.INFO,
            "callback %s pub=%s advertiser=%s attempt=%d %s status=%s %dms %s",
            record["conversion_id"],
            record["pub"],
            record["advertiser"],
            record["attempt"],
            record["outcome"],
            record["status_code"],
            record["duration_ms"],
            record["error"],
        )
        self.finish(job)

    def _parked(self, job: Job) -> None:
        self._child(self.metrics.deferred, job.task["pub"]).inc()
        self.finish(job)

    def _child(self, metric, *labels: str):
        counter = self._counters.get((metric, labels))
        if counter is None:
            counter = self._counters[metric, labels] = metric.labels(*labels)
        return counter

    def _publish(self, job: Job, out: list[tuple[str, codec.Codec, dict]], done) -> None:
        """Hand the records to the outbox; `done` runs once Kafka has all of them.

        Every record of a callback goes to the partition number its message came
        from, in every topic (all have `kafka.partitions`): a callback keeps to one
        partition through its retries, and no key is hashed per record.
        """
        partition = job.tp.partition % self.settings.kafka_partitions
        key = request.callback_id(job.task).encode()
        records = [(topic, partition, key, c.encode(value)) for topic, c, value in out]
        self.outbox.put(records, done)
