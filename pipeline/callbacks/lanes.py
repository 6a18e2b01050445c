"""Per-publisher lanes: at most `concurrency` requests at once, at most `limit`
taken (queued or in a request), and the pace at which they finish.

A lane is plain bookkeeping; the service runs up to `concurrency` workers per
lane, each taking the next queued job when its request is done (no task and no
semaphore wait per callback).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from aiokafka import TopicPartition

from pipeline.callbacks.offsets import Tracker


class Job:
    """One message being worked on: where it came from and its task."""

    __slots__ = ("tp", "offset", "tracker", "task")

    def __init__(self, tp: TopicPartition, offset: int, tracker: Tracker, task: dict):
        self.tp, self.offset, self.tracker, self.task = tp, offset, tracker, task


class Lane:
    """One publisher's share of the service."""

    def __init__(self, concurrency: int, limit: int, redact: Callable[[str], str]):
        self.concurrency = concurrency
        self.redact = redact  # the URL as logged
        self.limit = limit  # at most this many queued or running
        self.queue: deque[Job] = deque()  # taken, waiting for a worker
        self.workers = 0  # running workers, at most `concurrency`
        self.pending = 0
        self.busy_since = 0.0  # when pending last went from 0 to 1 (monotonic)
        # the last `limit` finishes of this busy spell: how long a full lane took to drain
        self.finished: deque[float] = deque(maxlen=max(2, limit))
        self.parking = False  # parks tasks (said once in the log per spell)

    @property
    def full(self) -> bool:
        return self.pending >= self.limit

    def take(self, job: Job, now: float) -> bool:
        """Queue `job`; True when a new worker should start for it."""
        if self.pending == 0:
            self.busy_since = now
            self.finished.clear()
        self.pending += 1
        self.queue.append(job)
        if self.workers < self.concurrency:
            self.workers += 1
            return True
        return False

    def release(self, now: float) -> bool:
        """One request done; True when the lane has room for a batch of waiting tasks."""
        self.pending -= 1
        self.finished.append(now)
        return self.pending == self.limit - max(1, self.limit // 4)

    def drop(self, keep: Callable[[Job], bool]) -> list[Job]:
        """Remove the queued jobs not to `keep` (their request never started)."""
        dropped = [job for job in self.queue if not keep(job)]
        if dropped:
            self.queue = deque(job for job in self.queue if keep(job))
            self.pending -= len(dropped)
        return dropped

    def backlog_seconds(self, now: float) -> float:
        """How long the lane would take to finish what it holds at its recent pace,
        and at least how long it has gone without finishing anything."""
        last = self.finished[-1] if self.finished else self.busy_since
        estimate = now - max(last, self.busy_since)
        if len(self.finished) >= 2:
            pace = (self.finished[-1] - self.finished[0]) / (len(self.finished) - 1)
            estimate = max(estimate, pace * self.pending)
        return estimate
