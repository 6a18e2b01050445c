"""Prometheus metrics of the callbacks service, in a registry of its own."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)


class CallbackMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.attempts = Counter(
            "pipeline_callbacks_attempts",
            "Callback attempts by publisher and outcome (delivered, retry, failed, blocked)",
            ["pub", "outcome"],
            registry=self.registry,
        )
        self.forwards = Counter(
            "pipeline_callbacks_skan_forwards",
            "SKAdNetwork forward attempts by advertiser and outcome (as attempts)",
            ["advertiser", "outcome"],
            registry=self.registry,
        )
        self.deferred = Counter(
            "pipeline_callbacks_deferred",
            "Callbacks parked in Kafka because their publisher had too many in flight",
            ["pub"],
            registry=self.registry,
        )
        self.dead = Counter(
            "pipeline_callbacks_dead_letters",
            "Callbacks given up and written to the dead-letter topic",
            ["pub"],
            registry=self.registry,
        )
        self.repeats = Counter(
            "pipeline_callbacks_repeats",
            "Records skipped: a worker's replay of a conversion or SKAdNetwork postback "
            "whose callback this process already took",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "pipeline_callbacks_in_flight",
            "Messages read and not finished (waiting for or queued in a publisher lane, in a "
            "request, or publishing)",
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def serve(metrics: CallbackMetrics, listen: str) -> web.AppRunner:
    """`GET /metrics` (Prometheus text) and `GET /healthz` on `listen`; cleanup() stops it."""

    async def scrape(_: web.Request) -> web.Response:
        return web.Response(
            body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    await web.TCPSite(runner, host, int(port)).start()
    return runner
