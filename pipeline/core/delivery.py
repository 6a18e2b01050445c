"""The delivery rules: what a response means and what happens next. Pure functions.

| what came back                              | kind      | outcome of the attempt       |
|---------------------------------------------|-----------|------------------------------|
| 2xx within the timeout                      | delivered | `delivered`                  |
| 3xx (never followed), 4xx but 408 and 429   | permanent | `failed`, dead-lettered      |
| 408, 429, 5xx, timeout, connection error    | retryable | `retry` while the schedule   |
|                                             |           | lasts, then `failed`, dead   |
| address refused by the SSRF guard           | blocked   | `blocked`, dead-lettered     |

Every HTTP request has its own `attempt_id`, drawn when it is made: a request
made again after a crash (the same attempt number: its outcome was never
published) is a row of its own, never a replacement of the first. Before the
request leaves, its `sending` record is published (`sending`); its outcome
record (`step`) carries the same attempt_id and replaces it in the table, so an
attempt whose outcome the service never published still has its row.
Attempt numbers keep counting across dead-letter replays. A SKAdNetwork
forward has pub "", its advertiser, and its skan_id as conversion_id.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from pipeline.core.callback import callback_id

DELIVERED, RETRYABLE, PERMANENT, BLOCKED = "delivered", "retryable", "permanent", "blocked"


class Attempt(NamedTuple):  # a tuple: built once per attempt, cheaper than a dataclass
    """What one try found (built by the I/O edge, judged here)."""

    kind: str
    status_code: int | None
    error: str
    started_ms: int
    duration_ms: int
    url: str  # redacted
    attempt_id: str = ""  # new_attempt_id() of the request; "" for none made


def new_attempt_id(now_ms: int | None = None) -> str:
    """32 hex characters, time-ordered: 12 of milliseconds, 20 random."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    return f"{ms:012x}{os.urandom(10).hex()}"


def sending(task: Mapping, attempt_id: str, started_ms: int, url: str) -> dict:
    """The record of a request about to leave (schemas/callback.avsc, outcome
    `sending`): acknowledged before the request, replaced by its outcome."""
    return {
        "attempt_id": attempt_id,
        "conversion_id": callback_id(task),
        "pub": task["pub"],
        "advertiser": task.get("advertiser", ""),
        "attempt": task["attempt"],
        "ts_ms": started_ms,
        "url": url,
        "status_code": None,
        "duration_ms": 0,
        "outcome": "sending",
        "error": "",
    }


class Step(NamedTuple):
    """Everything to publish after an attempt; the input offset may be committed
    only once all of it is acknowledged."""

    record: dict  # schemas/callback.avsc, for the callbacks table
    retry: int | None = None  # n: publish `task` to callbacks-retry-<n>
    task: dict | None = None
    dead: dict | None = None  # for callbacks-dead


def classify_status(status: int) -> tuple[str, str]:
    """(kind, error) of an HTTP status."""
    if 200 <= status < 300:
        return DELIVERED, ""
    if 300 <= status < 400:
        return PERMANENT, f"HTTP {status}: redirects are not followed"
    if 400 <= status < 500 and status not in (408, 429):
        return PERMANENT, f"HTTP {status}"
    # 408, 429, 5xx, and anything non-standard: the publisher may take it later
    return RETRYABLE, f"HTTP {status}"


def step(task: Mapping, attempt: Attempt, schedule: Sequence[float], now_ms: int) -> Step:
    """Judge `attempt` of `task` under `retry_schedule` (seconds) at `now_ms`."""
    outcome, error = attempt.kind, attempt.error
    retry_n, next_task, dead = None, None, None
    if attempt.kind == DELIVERED:
        outcome = "delivered"
    elif attempt.kind == RETRYABLE and task["retry"] < len(schedule):
        outcome = "retry"
        retry_n = task["retry"] + 1
        next_task = _following(task, attempt, outcome, error)
        next_task["retry"] = retry_n
        next_task["not_before_ms"] = now_ms + round(schedule[task["retry"]] * 1000)
    else:
        outcome = "blocked" if attempt.kind == BLOCKED else "failed"
        if attempt.kind == RETRYABLE:
            error = f"{error}; gave up after {task['retry']} retries"
        dead = _following(task, attempt, outcome, error)
    record = {
        "attempt_id": attempt.attempt_id or new_attempt_id(now_ms),
        "conversion_id": callback_id(task),
        "pub": task["pub"],
        "advertiser": task.get("advertiser", ""),
        "attempt": task["attempt"],
        "ts_ms": attempt.started_ms,
        "url": attempt.url,
        "status_code": attempt.status_code,
        "duration_ms": attempt.duration_ms,
        "outcome": outcome,
        "error": error,
    }
    return Step(record, retry_n, next_task, dead)


def _following(task: Mapping, attempt: Attempt, outcome: str, error: str) -> dict:
    return {
        **task,
        "attempt": task["attempt"] + 1,
        "last_outcome": outcome,
        "last_status_code": attempt.status_code,
        "last_error": error,
    }


def deferred(task: Mapping, now_ms: int, delay_s: float) -> dict:
    """The task parked for `delay_s` because its publisher has too much in flight:
    no request was made, so no attempt and no retry are used up."""
    return {
        **task,
        "deferrals": task["deferrals"] + 1,
        "not_before_ms": now_ms + round(delay_s * 1000),
    }


def replayed(dead: Mapping, now_ms: int) -> dict:
    """A dead letter sent round again: a fresh retry schedule, attempt numbers go on."""
    return {**dead, "retry": 0, "deferrals": 0, "not_before_ms": now_ms}
