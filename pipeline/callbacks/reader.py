"""The callbacks service's reading loop: Kafka records in, attempts started.

Checkpoint order, per message: make the attempt; publish its outcome (attempt
row, plus the next retry task or the dead letter; acks=all); only then mark the
offset finished (`attempts.Attempts` makes and publishes them, `outbox.Outbox`
batches the outcomes of many messages). Offsets are committed up to the lowest
unfinished offset of each partition (`offsets.Tracker`), so a crash redoes
unfinished messages and loses none: at-least-once, with the conversion ID as
Idempotency-Key on every attempt. A commit starts as soon as outcomes are
acknowledged and the commit before it has landed (and every COMMIT_INTERVAL for
messages that needed no work): what a crash makes the service do again (and a
publisher receive twice) is what finished during one commit's round trip, plus
the requests in flight. A commit runs beside the reads, one at a time; stopping
waits for it before the last one.

Durable retries: retry n of every callback goes to `callbacks-retry-<n>`, all
with the same delay, so within a partition `not_before_ms` grows with the
offset. A partition whose next task is not due is paused and rewound to it,
and resumed at its due time: a waiting retry lives in Kafka only, costs no
memory, and survives any restart with its due time. Between reads the retry
topics rest (paused) for a fifth of the shortest retry delay, at most a second,
so a retry is late by at most that: every fetch would otherwise carry all their
partitions, mostly empty, and the broker reads each of them per fetch. A read lasts
until the broker has answered a fetch for each of them, and reads follow each
other without a rest while they bring records.

Isolation and memory: each publisher has its own lane (at most `concurrency`
requests at once, at most `pending` queued or running). A task for a full lane
waits, with the rest of its partition (paused meanwhile), while the lane drains
fast: when what the lane holds would finish within `hold` seconds at the pace
it has been finishing, and it has finished something within the last `hold`
seconds. Otherwise (a stalled or overloaded publisher) the task is parked in
`callbacks-retry-1` without using an attempt. So a busy but fast publisher is
back-pressured and keeps its order, while a stalled one delays the others on
its partitions by at most about `hold` seconds and cannot fill the service.
The whole service holds at most `window` messages (read and waiting, or being
worked on); beyond that every partition is paused until work finishes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from pipeline import codec, kafka
from pipeline.callbacks.attempts import Attempts, now_ms
from pipeline.callbacks.lanes import Job, Lane
from pipeline.callbacks.metrics import CallbackMetrics
from pipeline.callbacks.offsets import Tracker
from pipeline.callbacks.seen import Seen
from pipeline.config import Settings

if TYPE_CHECKING:
    from pipeline.callbacks.app import Topics
from pipeline.core import callback as request
from pipeline.core import callback as tasks

log = logging.getLogger(__name__)

COMMIT_INTERVAL = 0.5  # seconds between commits when nothing finishes (skipped messages)
HOLD = 1.0  # seconds a partition may wait for a full lane (see the module docstring)
HELD_POLL_MS = 20  # how often partitions waiting for a lane are looked at again
RETRY_REST_MOST = 1.0  # seconds the retry topics rest between reads, at most
# what is read: the amounts of a campaign repeat, so their Decimals come from a cache
CONVERSION_READER = codec.Codec("conversion", cached_decimals=True)
ADJUSTMENT_READER = codec.ADJUSTMENT
TASK_READER = codec.Codec("callback_task", cached_decimals=True)


def park_delay(settings: Settings) -> float:
    """How long a deferred task waits: the first retry delay (the topic it goes to)."""
    return settings.retry_schedule[0] if settings.retry_schedule else 1.0


def retry_rest(settings: Settings) -> float:
    """How long the retry topics rest between reads: a fifth of the shortest retry
    delay (the lateness a retry may get), at most RETRY_REST_MOST."""
    shortest = min(settings.retry_schedule, default=park_delay(settings))
    return min(RETRY_REST_MOST, shortest / 5)


_TAKEN, _REWOUND, _HELD = "taken", "rewound", "held"  # what became of a message read


class CallbackService:
    def __init__(
        self,
        settings: Settings,
        topics: Topics,
        group: str,
        # requests at once per publisher: enough for a publisher that answers in a few
        # milliseconds to take thousands a second
        concurrency: int = 64,
        pending: int = 256,
        window: int = 10_000,
        hold: float = HOLD,
    ):
        self.settings, self.topics, self.group = settings, topics, group
        # one lane per publisher, and per advertiser that gets SKAdNetwork forwards
        self.lanes = {
            ("pub", pub): Lane(concurrency, pending, request.redactor(publisher))
            for pub, publisher in settings.publishers.items()
        }
        for advertiser in settings.advertisers.values():
            if advertiser.skan_forward_url:
                redact = request.forward_redactor(advertiser)
                self.lanes["advertiser", advertiser.id] = Lane(concurrency, pending, redact)
        self.window, self.hold = window, hold
        self.metrics = CallbackMetrics()
        self.conversions = settings.topic(topics.conversions)
        self.seen = Seen()  # records already taken: a worker's replay is skipped
        self.skan_postbacks = settings.topic(topics.skan_postbacks)
        self.adjustments = settings.topic(topics.adjustments)
        # the rest: retry topics
        self.inputs = frozenset((self.conversions, self.skan_postbacks, self.adjustments))
        self.trackers: dict[TopicPartition, Tracker] = {}
        self.delayed: dict[TopicPartition, int] = {}  # paused until this ms: head not due
        # read but not started, in offset order; a partition with any is paused (its
        # head waits for a full lane)
        self.backlog: dict[TopicPartition, deque] = {}
        self.backlogged = 0
        self.held: dict[TopicPartition, tuple[int, dict]] = {}  # decoded head of a backlog
        self.wake = asyncio.Event()  # a lane has room again, or the window has
        self.rest = retry_rest(settings)
        self.reading_retries: int | None = None  # ms: when the retry topics' read began
        self.rested_from = time.monotonic()  # when they last began to rest
        self.retries_brought = False  # records of a retry topic during this read
        self.in_flight = 0
        self.committing: asyncio.Task | None = None  # the commit in flight
        self.commit_again = False  # something finished while it was in flight
        self.commit_failure: BaseException | None = None  # what a commit raised (a bug)
        self.stopping = False
        self.attempts = Attempts(
            settings,
            self.metrics,
            {"attempts": settings.topic(topics.attempts), "dead": settings.topic(topics.dead)},
            lambda n: settings.topic(topics.retry(n)),
            park_delay(settings),
            self._finish,
            self.wake,
        )
        self.consumer = self.producer = None

    async def start(self) -> None:
        s = self.settings
        await kafka.ensure_topics(s, self.topics.all())
        self.producer = kafka.producer(s)
        await self.producer.start()
        await self.attempts.start(self.producer)
        self.consumer = kafka.consumer(s, s.topic(self.group), [])
        await self.consumer.start()
        # retry topics of a longer, older schedule may still hold tasks: drain them too
        prefix = s.topic(self.topics.retry_prefix)
        wanted = {s.topic(t) for t in self.topics.retries()}
        wanted |= {t for t in await self.consumer.topics() if t.startswith(prefix)}
        self.consumer.subscribe([*sorted(self.inputs), *sorted(wanted)], listener=_Rebalance(self))

    async def stop(self) -> None:
        """Drop queued work, let running requests finish and their outcomes be
        published (bounded), commit, close."""
        for lane in self.lanes.values():
            self._dropped(lane.drop(lambda _: False))
        await self.attempts.stop(timeout=self.settings.callback_timeout + 5)
        self.stopping = True  # the last commit is the one below
        if self.consumer is not None:
            if self.committing is not None:  # let it land first: commits go in order
                await asyncio.gather(self.committing, return_exceptions=True)
            await self.commit()
            await self.consumer.stop()
        await self.attempts.close()
        if self.producer is not None:
            await self.producer.stop()

    async def run(self) -> None:
        """Consume until cancelled; raises what a callback job raised (a bug)."""
        last_commit = time.monotonic()
        while True:
            if self.attempts.failure is not None:
                raise self.attempts.failure
            self._drain()
            fetching = self._flow_control()
            timeout_ms = self._poll_ms()
            if not fetching or self.backlog:
                # nothing to read, or heads wait for a full lane: wait for room (a lane,
                # the window) or a due time here, not in the poll, which a lane getting
                # room does not end (the lane would run dry meanwhile); fetched records
                # of the other partitions are taken by the poll below all the same
                self.wake.clear()
                try:
                    async with asyncio.timeout(timeout_ms / 1000):
                        await self.wake.wait()
                except TimeoutError:
                    pass
                timeout_ms = 0  # still poll: it keeps the group membership alive
            room = self.window - self.in_flight - self.backlogged
            batch = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max(1, room))
            for tp, messages in batch.items():
                if tp.topic not in self.inputs:
                    self.retries_brought = True
                if tp in self.backlog:  # read while it was being paused: keep the order
                    self.backlog[tp].extend(messages)
                else:
                    self.backlog[tp] = deque(messages)
                self.backlogged += len(messages)
            self._drain()
            self.metrics.in_flight.set(self.in_flight + self.backlogged)
            if self.commit_failure is not None:
                raise self.commit_failure
            if time.monotonic() - last_commit >= COMMIT_INTERVAL:
                self._commit_soon()
                last_commit = time.monotonic()

    def _commit_soon(self) -> None:
        """Commit what is finished now, or once the commit in flight has landed.
        Beside the reads: awaited in the loop, the broker's answer would hold up
        every record fetched meanwhile."""
        if self.stopping or self.consumer is None:
            return
        if self.committing is not None and not self.committing.done():
            self.commit_again = True
            return
        self.commit_again = False
        self.committing = asyncio.create_task(self.commit())
        self.committing.add_done_callback(self._committed)

    def _committed(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:  # a bug: `commit` handles Kafka's errors
            self.commit_failure = self.commit_failure or task.exception()
            self.wake.set()
            return
        if self.commit_again:
            self._commit_soon()

    def _drain(self) -> None:
        """Start what was read, in order per partition, until a head must wait."""
        if not self.backlog:
            return
        now = time.monotonic()
        for tp in list(self.backlog):
            queue = self.backlog[tp]
            while queue:
                verdict = self._accept(tp, queue[0], now)
                if verdict == _HELD:
                    break
                if verdict == _REWOUND:
                    self.backlogged -= len(queue)
                    queue.clear()
                    break
                queue.popleft()
                self.backlogged -= 1
            if not queue:
                del self.backlog[tp]

    def _flow_control(self) -> bool:
        """Pause what must not be read now, resume the rest; True when any is read."""
        now = now_ms()
        full = self.in_flight + self.backlogged >= self.window
        paused, assigned = self.consumer.paused(), self.consumer.assignment()
        fetching = not assigned  # none yet: the poll waits for the group
        for tp in assigned:
            if self.delayed.get(tp, now + 1) <= now:
                del self.delayed[tp]
        resting = self._retries_rest(assigned, now)
        for tp in assigned:
            hold = (
                full
                or tp in self.delayed
                or tp in self.backlog
                or (resting and tp.topic not in self.inputs)
            )
            if hold and tp not in paused:
                self.consumer.pause(tp)
            elif not hold and tp in paused:
                self.consumer.resume(tp)
            fetching = fetching or not hold
        return fetching

    def _retries_rest(self, assigned: set[TopicPartition], now: int) -> bool:
        """Whether the retry topics rest now (see the module docstring). A read ends
        once the broker answered a fetch for each retry partition that may be read
        (aiokafka's last_poll_timestamp, set from the answer) since it began."""
        if self.reading_retries is None:
            if time.monotonic() - self.rested_from < self.rest:
                return True
            self.reading_retries, self.retries_brought = now, False
            return False
        began = self.reading_retries
        for tp in assigned:
            if tp.topic in self.inputs or tp in self.delayed or tp in self.backlog:
                continue
            if (self.consumer.last_poll_timestamp(tp) or 0) < began:
                return False  # not answered yet
        if self.retries_brought:  # there may be more: read on
            self.reading_retries, self.retries_brought = now, False
            return False
        self.reading_retries, self.rested_from = None, time.monotonic()
        return True

    def _poll_ms(self) -> int:
        wait = HELD_POLL_MS if self.backlog else 200
        if self.reading_retries is None:  # resting: look again when the rest is over
            rest_left = self.rested_from + self.rest - time.monotonic()
            wait = min(wait, max(1, int(rest_left * 1000) + 1))
        if not self.delayed:
            return wait
        return max(1, min(wait, min(self.delayed.values()) - now_ms()))

    def _accept(self, tp: TopicPartition, message, now: float) -> str:
        """Start the work of one message, or say why not: its partition waits for its
        due time (rewound: read it again later) or for its lane (held: try again)."""
        tracker = self.trackers.get(tp)
        if tracker is None:
            tracker = self.trackers[tp] = Tracker()
        held = self.held.pop(tp, None)
        if held is not None and held[0] == message.offset:
            task = held[1]  # decoded when it first waited
        else:
            task = self._decode(tp, message, tracker)
            if task is None:
                return _TAKEN  # nothing to do: skipped (done)
        if task["not_before_ms"] > now_ms():
            # read it again when due; the tasks behind it are due even later
            self.consumer.seek(tp, message.offset)
            tracker.rewind(message.offset)
            self.delayed[tp] = task["not_before_ms"]
            self.consumer.pause(tp)
            return _REWOUND
        lane = self.lanes.get(request.lane_of(task))
        job = Job(tp, message.offset, tracker, task)
        if lane is None:
            work = self.attempts.unknown_publisher
        elif not lane.full:
            tracker.start(message.offset)
            self.in_flight += 1
            lane.parking = False
            self.attempts.take(lane, job, now)
            return _TAKEN
        elif lane.backlog_seconds(now) < self.hold:
            self.held[tp] = (message.offset, task)
            return _HELD  # the lane drains fast: wait for it
        else:
            if not lane.parking:
                lane.parking = True
                log.warning(
                    "%s %s is stalled or overloaded (%d in its lane): parking its callbacks in %s",
                    *request.lane_of(task),
                    lane.pending,
                    self.topics.retry(1),
                )
            work = self.attempts.park
        tracker.start(message.offset)
        self.in_flight += 1
        work(job)
        return _TAKEN

    def _decode(self, tp: TopicPartition, message, tracker: Tracker) -> dict | None:
        """The task of a message, or None when it needs no work (marked skipped)."""
        try:
            if tp.topic == self.conversions:
                conversion = CONVERSION_READER.decode(message.value)
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
                    return None
                key = ("conversion", conversion["conversion_id"], conversion["status"])
                if self._repeat(key, tp, message.offset, tracker):
                    return None
                return tasks.from_conversion(conversion)
            if tp.topic == self.skan_postbacks:
                record = codec.SKAN_POSTBACK.decode(message.value)
                advertiser = tasks.forward_target(record, self.settings)
                if advertiser is None:
                    tracker.skip(message.offset)
                    return None
                if self._repeat(("skan", record["skan_id"]), tp, message.offset, tracker):
                    return None
                return tasks.from_skan(record, advertiser.id)
            if tp.topic == self.adjustments:
                adjustment = ADJUSTMENT_READER.decode(message.value)
                if not tasks.wants_reversal_callback(adjustment, self.settings.publishers):
                    tracker.skip(message.offset)
                    return None
                key = ("adjustment", adjustment["adjustment_id"])
                if self._repeat(key, tp, message.offset, tracker):
                    return None
                return tasks.from_adjustment(adjustment)
            return TASK_READER.decode(message.value)
        except Exception:  # noqa: BLE001 - one bad record must not stop every callback
            log.exception("undecodable record %s@%d skipped", tp, message.offset)
            tracker.skip(message.offset)
            return None

    def _repeat(self, key: tuple, tp: TopicPartition, offset: int, tracker: Tracker) -> bool:
        """Whether the record is a worker's replay of one taken before (then skipped)."""
        if self.seen.first(key, (tp.topic, tp.partition, offset)):
            return False
        self.metrics.repeats.inc()
        tracker.skip(offset)  # its callback was taken already
        return True

    def _finish(self, job: Job) -> None:
        """The outcome of `job` is durable: its offset may be committed."""
        job.tracker.finish(job.offset)
        self.in_flight -= 1
        if self.in_flight + self.backlogged == self.window - 1:
            self.wake.set()  # the window has room again
        self._commit_soon()

    def _dropped(self, jobs: list[Job]) -> None:
        """Queued jobs dropped before their request: their offsets stay unfinished
        (uncommitted), so whoever owns the partition next redoes them."""
        if jobs:
            self.in_flight -= len(jobs)
            self.wake.set()

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
        for lane in self.lanes.values():
            self._dropped(lane.drop(lambda job: job.tp not in partitions))
        await self.commit(only=set(partitions))
        for tp in partitions:
            self.trackers.pop(tp, None)
            self.delayed.pop(tp, None)
            self.backlogged -= len(self.backlog.pop(tp, ()))
            self.held.pop(tp, None)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, service: CallbackService):
        self.service = service

    async def on_partitions_revoked(self, revoked) -> None:
        await self.service.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned) -> None:
        pass  # a new Tracker starts with the first message of each partition
