"""The callbacks service: attributed conversions in, publisher callbacks out.

    conversions ─────────┐                        ┌─► callback-attempts ─► sink ─► callbacks
                         ├─► group "callbacks" ─► │   (every attempt, one row each)
    callbacks-retry-1..N ┘   lane per publisher   ├─► callbacks-retry-<n> (retry n, due later)
          ▲                  ─► HTTP              └─► callbacks-dead (failed or blocked)
          └──────── `pipeline callbacks-replay` ◄───────┘

Checkpoint order, per message: make the attempt; publish its outcome (attempt
row, plus the next retry task or the dead letter; acks=all); only then mark the
offset finished. Offsets are committed every half second up to the lowest
unfinished offset of each partition (`offsets.Tracker`), so a crash redoes
unfinished messages and loses none: at-least-once, with the conversion ID as
Idempotency-Key on every attempt.

Durable retries: retry n of every callback goes to `callbacks-retry-<n>`, all
with the same delay, so within a partition `not_before_ms` grows with the
offset. A partition whose next task is not due is paused and rewound to it,
and resumed at its due time: a waiting retry lives in Kafka only, costs no
memory, and survives any restart with its due time.

Isolation and memory: each publisher has its own lane (at most `concurrency`
requests at once, at most `pending` queued or running); a task for a full lane
is parked in `callbacks-retry-1` without using an attempt, so a stalled
publisher cannot fill the service. The whole service holds at most `window`
messages; beyond that every partition is paused until work finishes.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from pipeline import codec, kafka
from pipeline.callbacks import policy, request
from pipeline.callbacks import task as tasks
from pipeline.callbacks.deliver import Deliverer
from pipeline.callbacks.metrics import CallbackMetrics
from pipeline.callbacks.offsets import Tracker
from pipeline.config import Settings

log = logging.getLogger(__name__)

GROUP = "callbacks"
CONVERSIONS = "conversions"
ATTEMPTS = "callback-attempts"
DEAD = "callbacks-dead"
RETRY = "callbacks-retry-"
COMMIT_INTERVAL = 0.5


def retry_topic(n: int) -> str:
    return f"{RETRY}{n}"


def topics(settings: Settings) -> list[str]:
    """Every topic of the service (suffixes); always at least one retry topic, which
    also parks deferred tasks and takes dead-letter replays."""
    retries = max(1, len(settings.retry_schedule))
    return [CONVERSIONS, ATTEMPTS, DEAD, *(retry_topic(n) for n in range(1, retries + 1))]


def park_delay(settings: Settings) -> float:
    """How long a deferred task waits: the first retry delay (the topic it goes to)."""
    return settings.retry_schedule[0] if settings.retry_schedule else 1.0


def now_ms() -> int:
    return int(time.time() * 1000)


class Lane:
    """One publisher's share of the service."""

    def __init__(self, concurrency: int):
        self.slots = asyncio.Semaphore(concurrency)
        self.pending = 0


class CallbackService:
    def __init__(
        self, settings: Settings, concurrency: int = 16, pending: int = 256, window: int = 10_000
    ):
        self.settings = settings
        self.lanes = {pub: Lane(concurrency) for pub in settings.publishers}
        self.pending_limit, self.window = pending, window
        self.metrics = CallbackMetrics()
        self.deliverer = Deliverer(settings.callback_timeout, settings.allow_private_networks)
        self.conversions = settings.topic(CONVERSIONS)
        self.trackers: dict[TopicPartition, Tracker] = {}
        self.jobs: dict[TopicPartition, set[asyncio.Task]] = {}
        self.started: set[asyncio.Task] = set()  # jobs past their lane's queue
        self.delayed: dict[TopicPartition, int] = {}  # paused until this ms: head not due
        self.in_flight = 0
        self.failure: BaseException | None = None
        self.consumer = self.producer = None

    async def start(self) -> None:
        s = self.settings
        await kafka.ensure_topics(s, topics(s))
        self.producer = kafka.producer(s)
        await self.producer.start()
        await self.deliverer.start()
        self.consumer = kafka.consumer(s, s.topic(GROUP), [])
        await self.consumer.start()
        # retry topics of a longer, older schedule may still hold tasks: drain them too
        wanted = {s.topic(t) for t in topics(s) if t.startswith(RETRY)}
        wanted |= {t for t in await self.consumer.topics() if t.startswith(s.topic(RETRY))}
        self.consumer.subscribe([self.conversions, *sorted(wanted)], listener=_Rebalance(self))

    async def stop(self) -> None:
        """Drop queued work, let running requests finish (bounded), commit, close."""
        for jobs in list(self.jobs.values()):
            for job in jobs - self.started:
                job.cancel()
        running = [job for jobs in self.jobs.values() for job in jobs]
        if running:
            await asyncio.wait(running, timeout=self.settings.callback_timeout + 5)
        if self.consumer is not None:
            await self.commit()
            await self.consumer.stop()
        if self.producer is not None:
            await self.producer.stop()
        await self.deliverer.close()

    async def run(self) -> None:
        """Consume until cancelled; raises what a callback job raised (a bug)."""
        last_commit = time.monotonic()
        while True:
            if self.failure is not None:
                raise self.failure
            self._flow_control()
            batch = await self.consumer.getmany(
                timeout_ms=self._poll_ms(), max_records=max(1, self.window - self.in_flight)
            )
            for tp, messages in batch.items():
                for message in messages:
                    if not self._accept(tp, message):
                        break
            self.metrics.in_flight.set(self.in_flight)
            if time.monotonic() - last_commit >= COMMIT_INTERVAL:
                await self.commit()
                last_commit = time.monotonic()

    def _flow_control(self) -> None:
        now, full = now_ms(), self.in_flight >= self.window
        paused = self.consumer.paused()
        for tp in self.consumer.assignment():
            if self.delayed.get(tp, now + 1) <= now:
                del self.delayed[tp]
            hold = full or tp in self.delayed
            if hold and tp not in paused:
                self.consumer.pause(tp)
            elif not hold and tp in paused:
                self.consumer.resume(tp)

    def _poll_ms(self) -> int:
        if not self.delayed:
            return 200
        return max(1, min(200, min(self.delayed.values()) - now_ms()))

    def _accept(self, tp: TopicPartition, message) -> bool:
        """Start the work of one message; False when its partition waits (stop reading it)."""
        tracker = self.trackers.get(tp)
        if tracker is None:
            tracker = self.trackers[tp] = Tracker()
            self.jobs[tp] = set()
        try:
            if tp.topic == self.conversions:
                conversion = codec.CONVERSION.decode(message.value)
                if not tasks.wants_callback(conversion, self.settings.publishers):
                    if conversion["status"] == "attributed" and (
                        conversion["pub"] not in self.settings.publishers
                    ):
                        log.warning(
                            "no callback for %s: publisher %r is not configured",
                            conversion["conversion_id"],
                            conversion["pub"],
                        )
                    tracker.skip(message.offset)
                    return True
                task = tasks.from_conversion(conversion)
            else:
                task = codec.CALLBACK_TASK.decode(message.value)
        except Exception:  # noqa: BLE001 - one bad record must not stop every callback
            log.exception("undecodable record %s@%d skipped", tp, message.offset)
            tracker.skip(message.offset)
            return True
        if task["not_before_ms"] > now_ms():
            # read it again when due; the tasks behind it are due even later
            self.consumer.seek(tp, message.offset)
            tracker.rewind(message.offset)
            self.delayed[tp] = task["not_before_ms"]
            self.consumer.pause(tp)
            return False
        lane = self.lanes.get(task["pub"])
        if lane is None:
            work = self._unknown_publisher(task)
        elif lane.pending >= self.pending_limit:
            work = self._park(task)
        else:
            lane.pending += 1
            work = self._attempt(lane, task)
        tracker.start(message.offset)
        self.in_flight += 1
        job = asyncio.create_task(work)
        jobs = self.jobs[tp]
        jobs.add(job)
        job.add_done_callback(lambda j: self._done(j, jobs, tracker, message.offset))
        return True

    def _done(self, job: asyncio.Task, jobs: set, tracker: Tracker, offset: int) -> None:
        jobs.discard(job)
        self.started.discard(job)
        self.in_flight -= 1
        if job.cancelled():
            return  # not finished: the offset stays uncommitted and is redone
        if job.exception() is not None:
            log.error("callback job failed", exc_info=job.exception())
            self.failure = self.failure or job.exception()
            return
        tracker.finish(offset)

    async def _attempt(self, lane: Lane, task: dict) -> None:
        try:
            async with lane.slots:
                self.started.add(asyncio.current_task())
                publisher = self.settings.publishers[task["pub"]]
                req = request.build(publisher, task, int(time.time()))
                url = request.redact_url(req.url, request.secrets_of(publisher))
                attempt = await self.deliverer.send(req, url)
        finally:
            lane.pending -= 1
        await self._conclude(task, attempt)

    async def _unknown_publisher(self, task: dict) -> None:
        self.started.add(asyncio.current_task())
        error = f"publisher {task['pub']!r} is not in the configuration"
        await self._conclude(task, policy.Attempt(policy.PERMANENT, None, error, now_ms(), 0, ""))

    async def _conclude(self, task: dict, attempt: policy.Attempt) -> None:
        step = policy.step(task, attempt, self.settings.retry_schedule, now_ms())
        out = [(ATTEMPTS, codec.CALLBACK, step.record)]
        if step.task is not None:
            out.append((retry_topic(step.retry), codec.CALLBACK_TASK, step.task))
        if step.dead is not None:
            out.append((DEAD, codec.CALLBACK_TASK, step.dead))
        await self._publish(out)
        record = step.record
        self.metrics.attempts.labels(record["pub"], record["outcome"]).inc()
        if step.dead is not None:
            self.metrics.dead.labels(record["pub"]).inc()
        # the callbacks table has every attempt; the log keeps what needs a look
        log.log(
            logging.DEBUG if record["outcome"] == "delivered" else logging.INFO,
            "callback %s pub=%s attempt=%d %s status=%s %dms %s",
            record["conversion_id"],
            record["pub"],
            record["attempt"],
            record["outcome"],
            record["status_code"],
            record["duration_ms"],
            record["error"],
        )

    async def _park(self, task: dict) -> None:
        self.started.add(asyncio.current_task())
        parked = policy.deferred(task, now_ms(), park_delay(self.settings))
        await self._publish([(retry_topic(1), codec.CALLBACK_TASK, parked)])
        self.metrics.deferred.labels(task["pub"]).inc()

    async def _publish(self, out: list[tuple[str, codec.Codec, dict]]) -> None:
        """Publish and wait for every acknowledgement; retries until Kafka takes it
        (a redelivered duplicate is harmless, a dropped outcome is not)."""
        delay = 0.2
        while True:
            try:
                sent = [
                    await self.producer.send(
                        self.settings.topic(name),
                        c.encode(value),
                        key=value["conversion_id"].encode(),
                    )
                    for name, c, value in out
                ]
                await asyncio.gather(*sent)
                return
            except KafkaError as e:
                log.warning("publishing callback outcome failed (%s); retrying in %.1fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        """Commit, per partition, everything below its lowest unfinished offset."""
        due = []
        for tp, tracker in list(self.trackers.items()):
            if only is None or tp in only:
                offset = tracker.commit_offset()
                if offset is not None:
                    due.append((tp, tracker, offset))
        if not due:
            return
        try:
            await self.consumer.commit({tp: offset for tp, _, offset in due})
        except (CommitFailedError, IllegalStateError, KafkaError) as e:
            # a rebalance moved them: their new owner redoes the unfinished ones
            log.warning("commit skipped: %s", e)
            return
        for _, tracker, offset in due:
            tracker.committed = offset

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        """Before a rebalance: drop queued work of these partitions, commit what is done."""
        for tp in partitions:
            for job in self.jobs.get(tp, set()) - self.started:
                job.cancel()
        await self.commit(only=set(partitions))
        for tp in partitions:
            self.trackers.pop(tp, None)
            self.jobs.pop(tp, None)
            self.delayed.pop(tp, None)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, service: CallbackService):
        self.service = service

    async def on_partitions_revoked(self, revoked) -> None:
        await self.service.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned) -> None:
        pass  # a new Tracker starts with the first message of each partition
