"""The sink's wiring: which topic fills which table, and the process around it.

    clicks ────────────┐
    postbacks ─────────┤                                  ┌─► clicks, postbacks,
    conversions ───────┼─► group "sink" ─► Sink (writer) ─┤   conversions, callbacks,
    callback-attempts ─┤                                  └─► skan_postbacks
    skan-postbacks ────┘                                      (ClickHouse, FORMAT Avro)

The group is the sink's own: a partner outage or a slow worker never holds up
the warehouse, nor the warehouse them.
"""

from __future__ import annotations

import asyncio
import logging

from pipeline import codec, runtime
from pipeline.config import Settings
from pipeline.core import rows
from pipeline.sink.writer import Sink

log = logging.getLogger(__name__)

GROUP = "sink"
# topic suffix -> (codec of its records, table of its rows)
ROUTES = {
    "clicks": (codec.CLICK, rows.CLICKS),
    "postbacks": (codec.POSTBACK, rows.POSTBACKS),
    "conversions": (codec.CONVERSION, rows.CONVERSIONS),
    "callback-attempts": (codec.CALLBACK, rows.CALLBACKS),
    "skan-postbacks": (codec.SKAN_POSTBACK, rows.SKAN_POSTBACKS),
}


def build(settings: Settings) -> Sink:
    return Sink(settings, ROUTES, GROUP)


async def run(settings: Settings) -> None:
    """Migrate, consume and write until SIGINT or SIGTERM."""
    sink = build(settings)
    await sink.start()
    runtime.settle_heap()
    log.info("sink consuming into %s", settings.clickhouse_url)
    await runtime.run_until_signal(sink.run(), sink.stop)


def serve(settings: Settings) -> None:
    """`pipeline sink`."""
    asyncio.run(run(settings))
