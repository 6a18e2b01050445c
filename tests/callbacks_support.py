"""Helpers of the callbacks tests: publishers as real HTTP servers on 127.0.0.1, configs
with those publishers, conversions produced straight to Kafka, topics read back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from standardwebhooks import Webhook

from pipeline import codec, config, kafka
from pipeline.config import CALLBACK_MACROS

from .conftest import config_text, without_skan

# for tests without the sink: the config needs a URL, nothing connects to it
NO_CLICKHOUSE = "http://127.0.0.1:9"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ALL_MACROS = "&".join(f"{name}={{{name}}}" for name in sorted(CALLBACK_MACROS))


@dataclass
class Seen:
    path: str
    query: dict
    headers: dict
    body: bytes
    status: int | None = None  # what the server answered (None: never answered)
    signature_ok: bool | None = None


@dataclass
class PublisherServer:
    """One aiohttp server whose paths behave like publishers:

    /ok 200 · /flaky 500 twice per Idempotency-Key, then 200 · /busy 429 once, then 200 ·
    /notfound 404 · /redirect 302 to /target · /target 200 (must never be hit) ·
    /hang never answers · /slow 200 after `slow_seconds` · /stall waits for `release` ·
    /fixable 404 until `fixed` · /hook POST with a Standard Webhooks signature check.
    """

    slow_seconds: float = 0.5
    requests: dict = field(default_factory=lambda: defaultdict(list))
    release: asyncio.Event = field(default_factory=asyncio.Event)
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    fixed: bool = False
    in_progress: dict = field(default_factory=lambda: defaultdict(int))
    max_in_progress: dict = field(default_factory=lambda: defaultdict(int))
    port: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        seen = Seen(request.path, dict(request.query), dict(request.headers), await request.read())
        self.requests[name].append(seen)
        key = request.headers.get("Idempotency-Key")
        before = sum(1 for s in self.requests[name] if s.headers.get("Idempotency-Key") == key) - 1
        self.in_progress[name] += 1
        self.max_in_progress[name] = max(self.max_in_progress[name], self.in_progress[name])
        try:
            status, headers = await self._behave(name, before, seen)
        finally:
            self.in_progress[name] -= 1
        seen.status = status
        return web.Response(status=status, headers=headers, text="ok" if status < 300 else "no")

    async def _behave(self, name: str, before: int, seen: Seen) -> tuple[int, dict]:
        if name in ("ok", "target"):
            return 200, {}
        if name == "flaky":
            return (500 if before < 2 else 200), {}
        if name == "busy":
            return (429 if before < 1 else 200), {}
        if name == "notfound":
            return 404, {}
        if name == "fixable":
            return (200 if self.fixed else 404), {}
        if name == "redirect":
            return 302, {"Location": f"http://127.0.0.1:{self.port}/target"}
        if name == "slow":
            await asyncio.sleep(self.slow_seconds)
            return 200, {}
        if name == "hang":
            await self.closing.wait()
            return 200, {}
        if name == "stall":
            await _first(self.release, self.closing)
            return 200, {}
        if name == "hook":
            try:
                Webhook(SECRET).verify(seen.body, seen.headers)
                seen.signature_ok = True
            except Exception:  # noqa: BLE001
                seen.signature_ok = False
            return 200, {}
        return 500, {}

    def keys(self, name: str) -> list[str]:
        return [s.headers.get("Idempotency-Key") for s in self.requests[name]]

    def delivered(self, name: str) -> set[str]:
        return {s.headers["Idempotency-Key"] for s in self.requests[name] if s.status == 200}


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


@contextlib.asynccontextmanager
async def publisher_server(**kw):
    server = PublisherServer(**kw)
    app = web.Application()
    app.router.add_route("*", "/{name}", server.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = site._server.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        server.closing.set()
        await runner.cleanup()


def publishers_toml(port: int, names: list[str], host: str = "127.0.0.1") -> str:
    """[[publishers]] whose id is the server path; `hook` POSTs signed JSON."""
    out = []
    for name in names:
        url = f"http://{host}:{port}/{name}?{ALL_MACROS}"
        method, secret = "GET", ""
        if name == "hook":
            url, method, secret = f"http://{host}:{port}/hook", "POST", SECRET
        out.append(
            f'[[publishers]]\nid = "{name}"\npostback_url = "{url}"\n'
            f'events = ["install", "purchase"]\nmethod = "{method}"\n'
            f'signing_secret = "{secret}"\n'
        )
    return "\n".join(out)


def callbacks_config(bootstrap: str, clickhouse: str, publishers: str, **callbacks) -> str:
    """The test config with only `publishers`, and [callbacks] from keyword arguments."""
    body = {
        "timeout": '"2s"',
        "retry_schedule": '["200ms", "400ms", "800ms"]',
        "allow_private_networks": "true",
    }
    body.update(callbacks)
    text = config_text(
        bootstrap, clickhouse, callbacks="\n".join(f"{k} = {v}" for k, v in body.items())
    )
    text = re.sub(r"^\[\[publishers\]\]\n(?:[^\[\n].*\n|\n)*", "", without_skan(text), flags=re.M)
    return text + "\n" + publishers + "\n"


def settings_from(text: str) -> config.Settings:
    import tomllib

    return config.parse(tomllib.loads(text))


def conversion(pub: str, event: str = "install", **overrides) -> dict:
    now = int(time.time() * 1000)
    c = {
        "conversion_id": uuid.uuid4().hex,
        "postback_id": "",
        "click_id": f"clk-{uuid.uuid4().hex[:8]}",
        "campaign_id": "c1",
        "advertiser": "acme",
        "pub": pub,
        "sub1": "s 1&x",
        "sub2": "",
        "sub3": "",
        "sub4": "",
        "sub5": "five",
        "event": event,
        "txn_id": None,
        "status": "attributed",
        "detail": "",
        "revenue": Decimal("3"),
        "payout": Decimal("2"),
        "currency": "USD",
        "revenue_reporting": Decimal("3"),
        "payout_reporting": Decimal("2"),
        "click_ts_ms": now - 60_000,
        "conversion_ts_ms": now,
        "ctit_seconds": 60 if event == "install" else None,
    }
    c["postback_id"] = c["conversion_id"]
    c.update(overrides)
    return c


async def produce_conversions(settings: config.Settings, conversions: list[dict]) -> None:
    await kafka.ensure_topics(settings, ["conversions"])
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for c in conversions:
            await producer.send_and_wait(
                settings.topic("conversions"),
                codec.CONVERSION.encode(c),
                key=c["click_id"].encode(),
            )
    finally:
        await producer.stop()


async def read_topic(settings: config.Settings, name: str, c: codec.Codec) -> list[dict]:
    """Every record now in a topic, from the beginning (no group, nothing committed)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(settings.topic(name), p) for p in range(settings.kafka_partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await kafka.log_end_offsets(settings.kafka_bootstrap, tps)
        out = []
        for tp in tps:
            while await consumer.position(tp) < ends[tp]:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                out.extend(c.decode(m.value) for m in batch.get(tp, []))
        return out
    finally:
        await consumer.stop()


async def attempt_outcomes(settings: config.Settings) -> list[dict]:
    """The concluded attempt records of `callback-attempts` (each attempt's `sending`
    record, published before its request, left out)."""
    records = await read_topic(settings, "callback-attempts", codec.CALLBACK)
    return [r for r in records if r["outcome"] != "sending"]


async def eventually(predicate, timeout: float = 60, interval: float = 0.2, message: str = ""):
    """Await until `predicate()` (sync or async) is truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s: {message} (last: {last!r})")


@contextlib.asynccontextmanager
async def running(service):
    """A CallbackService (or Sink) started and run in this event loop."""
    await service.start()
    task = asyncio.create_task(service.run())
    try:
        yield service
    finally:
        task.cancel()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            await service.stop()


def query_json(seen: Seen) -> dict:
    return json.loads(seen.body)
