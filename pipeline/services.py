"""Each production component as a coroutine that runs until SIGINT/SIGTERM.

`serve(name, settings)` is what `pipeline <name>` runs. Endpoints given as
"embedded" mean the embedded stack of `pipeline dev`; when nothing answers on
its address, the component starts the embedded part itself and owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from pathlib import Path

from aiohttp import web

from pipeline.config import Settings

log = logging.getLogger(__name__)


def settle_heap() -> None:
    """Take what start-up built out of the cyclic collector's reach (`gc.freeze`).

    A full collection walks every tracked object, and a started component holds
    tens of thousands (modules, classes, clients) that live as long as it does:
    the callbacks service ran one every 1.5-4.5 s under load, each taking 23-71 ms
    with nothing to collect, and every callback in flight waited for it (bench:
    latency, 2026-11-26; 0.6-4.9 ms once frozen). Garbage first, so none is frozen;
    objects made later are collected as before."""
    gc.collect()
    gc.freeze()
    log.info("start-up heap frozen: %d objects out of garbage collection", gc.get_freeze_count())


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _run_until_signal(run, cleanup) -> None:
    """Run the coroutine `run` until it ends or a signal comes; then always `cleanup()`.

    An exception that ended `run` is re-raised after the cleanup.
    """
    task = asyncio.create_task(run)
    stopper = asyncio.create_task(_until_signal())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        stopper.cancel()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            await cleanup()


@contextlib.asynccontextmanager
async def resolved(settings: Settings, kafka_needed: bool = True, clickhouse_needed: bool = True):
    """Yield settings with real endpoints, starting embedded parts nobody serves yet.

    Only the parts a component needs are resolved: the ingress never starts chDB.
    """
    from pipeline.embedded.kafka import EmbeddedKafka, port_open

    owned_kafka, owned_ch = None, None
    kafka, ch = settings.kafka_bootstrap, settings.clickhouse_url
    if kafka == "embedded" and kafka_needed:
        host, _, port = settings.kafka_embedded_listen.rpartition(":")
        if int(port) and port_open(host, int(port)):
            kafka = settings.kafka_embedded_listen
        else:
            owned_kafka = EmbeddedKafka(settings.kafka_embedded_listen)
            owned_kafka.launch()  # on this thread: the child dies with it, see launch()
            kafka = await asyncio.to_thread(owned_kafka.wait_ready)
            log.info("embedded Kafka (Tansu) on %s", kafka)
    if ch == "embedded" and clickhouse_needed:
        from pipeline.embedded.clickhouse import EmbeddedClickHouse

        host, _, port = settings.clickhouse_embedded_listen.rpartition(":")
        if int(port) and port_open(host, int(port)):
            ch = f"http://{settings.clickhouse_embedded_listen}"
        else:
            owned_ch = EmbeddedClickHouse(settings.clickhouse_embedded_path, host, int(port))
            await owned_ch.start()
            ch = owned_ch.url
            log.info("embedded ClickHouse (chDB) on %s", ch)
    try:
        yield settings.with_endpoints(kafka=kafka, clickhouse=ch)
    finally:
        if owned_ch is not None:
            await owned_ch.stop()
        if owned_kafka is not None:
            await asyncio.to_thread(owned_kafka.stop)


async def ingress(settings: Settings) -> None:
    from pipeline.ingress.app import build_app

    runner = web.AppRunner(build_app(settings), access_log=None)
    await runner.setup()
    host, _, port = settings.ingress_listen.rpartition(":")
    site = web.TCPSite(runner, host, int(port), backlog=1024)
    await site.start()
    settle_heap()
    log.info("ingress listening on http://%s", settings.ingress_listen)
    try:
        await _until_signal()
    finally:
        await runner.cleanup()


async def sink(settings: Settings) -> None:
    from pipeline.sink.sink import Sink

    s = Sink(settings)
    await s.start()
    settle_heap()
    log.info("sink consuming into %s", settings.clickhouse_url)
    await _run_until_signal(s.run(), s.stop)


async def callbacks(settings: Settings) -> None:
    from pipeline.callbacks import metrics
    from pipeline.callbacks.service import CallbackService

    service = CallbackService(settings)
    await service.start()
    log.info("callbacks consuming %s", settings.topic("conversions"))
    scraper = None
    if settings.callbacks_metrics_listen:
        scraper = await metrics.serve(service.metrics, settings.callbacks_metrics_listen)
        log.info("callbacks metrics on http://%s/metrics", settings.callbacks_metrics_listen)
    settle_heap()

    async def cleanup():
        if scraper is not None:
            await scraper.cleanup()
        await service.stop()

    await _run_until_signal(service.run(), cleanup)


async def callbacks_replay(settings: Settings) -> None:
    from pipeline.callbacks.replay import replay_dead

    count = await replay_dead(settings)
    print(f"replayed {count} dead-lettered callbacks into {settings.topic('callbacks-retry-1')}")


async def migrate(settings: Settings) -> None:
    from pipeline.sink import ddl

    client = await asyncio.to_thread(ddl.connect, settings.clickhouse_url)
    applied = await asyncio.to_thread(ddl.migrate, client, settings.clickhouse_database)
    client.close()
    print(f"database {settings.clickhouse_database}: applied {applied or 'nothing, up to date'}")


# name -> (coroutine, needs Kafka, needs ClickHouse)
SERVICES = {
    "ingress": (ingress, True, False),
    "sink": (sink, True, True),
    "callbacks": (callbacks, True, False),
    "callbacks-replay": (callbacks_replay, True, False),
    "migrate": (migrate, False, True),
}


def worker(settings: Settings, log_level: str = "INFO") -> None:
    """The Faust worker: owns its event loop and signal handling (Ctrl-C stops it cleanly)."""
    import faust

    from pipeline import kafka
    from pipeline.worker.app import TOPICS, create_app

    async def prepare():
        async with resolved(settings, clickhouse_needed=False) as real:
            await kafka.ensure_topics(real, TOPICS)
            return real

    if settings.kafka_bootstrap == "embedded":
        from pipeline.embedded.kafka import port_open

        host, _, port = settings.kafka_embedded_listen.rpartition(":")
        if not (int(port) and port_open(host, int(port))):
            raise SystemExit("pipeline worker: no embedded Kafka is running; start `pipeline dev`")
    real = asyncio.run(prepare())
    Path(settings.worker_data_dir).mkdir(parents=True, exist_ok=True)
    app, _ = create_app(real)

    settled = False

    @app.on_rebalance_complete.connect
    async def settle(app, **kwargs):
        # started, tables recovered; only once, so what a later rebalance leaves
        # behind stays collectable
        nonlocal settled
        if not settled:
            settled = True
            settle_heap()

    faust.Worker(app, loglevel=log_level, redirect_stdouts=False).execute_from_commandline()


def serve(name: str, settings: Settings) -> None:
    """Run one component (with the embedded stack resolved) until a signal."""
    if name == "worker":
        return worker(settings)

    async def main():
        run, kafka_needed, clickhouse_needed = SERVICES[name]
        async with resolved(settings, kafka_needed, clickhouse_needed) as real:
            await run(real)

    Path(settings.spool_dir).mkdir(parents=True, exist_ok=True)
    asyncio.run(main())
