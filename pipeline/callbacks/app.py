"""The callbacks service's wiring: its topics, its group, and the process around it.

    conversions ─────────┐                        ┌─► callback-attempts ─► sink ─► callbacks
    skan-postbacks ──────┼─► group "callbacks" ─► │   (every attempt, one row each)
    callbacks-retry-1..N ┘   lane per publisher   ├─► callbacks-retry-<n> (retry n, due later)
                             (and per advertiser  │
                             of SKAN forwards)    │
          ▲                  ─► HTTP              └─► callbacks-dead (failed or blocked)
          └──────── `pipeline callbacks-replay` ◄───────┘

`reader.CallbackService` reads and paces (lanes per publisher, durable retries);
`attempts.Attempts` makes each request (`deliver.Deliverer`) and publishes its
outcome through `outbox.Outbox`; `replay` sends dead letters round again. The
group is the service's own: a partner outage never holds up the warehouse.
Verified SKAdNetwork postbacks of an advertiser with a `skan_forward_url` are
forwarded the same way, with their own lane (`core.callback.forward_target`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import NamedTuple

from pipeline import runtime
from pipeline.callbacks import metrics
from pipeline.callbacks.reader import CallbackService
from pipeline.config import Settings

log = logging.getLogger(__name__)

GROUP = "callbacks"
REPLAY_GROUP = "callbacks-replay"


class Topics(NamedTuple):
    """The service's topics (suffixes of `kafka.topic_prefix`)."""

    conversions: str = "conversions"
    skan_postbacks: str = "skan-postbacks"
    attempts: str = "callback-attempts"
    dead: str = "callbacks-dead"
    retry_prefix: str = "callbacks-retry-"
    # retry topics: one a step of the schedule, at least one (it also parks deferred
    # tasks and takes dead-letter replays)
    retry_count: int = 1

    def retry(self, n: int) -> str:
        return f"{self.retry_prefix}{n}"

    def retries(self) -> list[str]:
        return [self.retry(n) for n in range(1, self.retry_count + 1)]

    def all(self) -> list[str]:
        return [self.conversions, self.skan_postbacks, self.attempts, self.dead, *self.retries()]


def topics(settings: Settings) -> Topics:
    return Topics(retry_count=max(1, len(settings.retry_schedule)))


def build(settings: Settings, **options) -> CallbackService:
    return CallbackService(settings, topics(settings), GROUP, **options)


async def run(settings: Settings) -> None:
    """Deliver until SIGINT or SIGTERM; `/metrics` on `callbacks.metrics_listen`."""
    service = build(settings)
    await service.start()
    log.info("callbacks consuming %s", settings.topic(service.topics.conversions))
    scraper = None
    if settings.callbacks_metrics_listen:
        scraper = await metrics.serve(service.metrics, settings.callbacks_metrics_listen)
        log.info("callbacks metrics on http://%s/metrics", settings.callbacks_metrics_listen)
    runtime.settle_heap()

    async def cleanup():
        if scraper is not None:
            await scraper.cleanup()
        await service.stop()

    await runtime.run_until_signal(service.run(), cleanup)


def serve(settings: Settings) -> None:
    """`pipeline callbacks`."""
    asyncio.run(run(settings))


def replay(settings: Settings) -> int:
    """`pipeline callbacks-replay`."""
    from pipeline.callbacks.replay import replay_dead

    names = topics(settings)
    count = asyncio.run(replay_dead(settings, names, REPLAY_GROUP))
    print(f"replayed {count} dead-lettered callbacks into {settings.topic(names.retry(1))}")
    return count
