"""Duplicate callbacks under SIGKILL: how many conversions a publisher receives
more than once when `pipeline callbacks` is killed while it delivers, and
whether every request it received has its row (attempt record).

    .venv/bin/python -m bench.callback_kills [--conversions 14000] [--kills 3]

Starts a Tansu broker and a loopback publisher (200 at once, counting requests
per Idempotency-Key), puts the conversions on the topic, runs `pipeline
callbacks` and kills it with SIGKILL `--kills` times, `--every` seconds apart,
restarting it each time; then waits until every conversion was delivered and
reads `callback-attempts`. Prints one JSON object: conversions delivered 2+
times, requests, attempt records, and requests without a record (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path

from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline import codec, config, kafka
from pipeline.dev.kafka import EmbeddedKafka, free_port

ROOT = Path(__file__).resolve().parent.parent


def conversion(pub: str) -> dict:
    now = int(time.time() * 1000)
    cid = uuid.uuid4().hex
    return {
        **{f"sub{i}": "" for i in range(1, 6)},
        "conversion_id": cid,
        "postback_id": cid,
        "click_id": f"clk-{cid[:12]}",
        "campaign_id": "c1",
        "advertiser": "acme",
        "pub": pub,
        "event": "install",
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
        "ctit_seconds": 60,
    }


def config_text(bootstrap: str, port: int) -> str:
    run = uuid.uuid4().hex[:8]
    return f"""
[pipeline]
secrets = ["bench-secret-0123"]
[kafka]
bootstrap_servers = "{bootstrap}"
partitions = 4
replication_factor = 1
topic_prefix = "kills{run}."
[clickhouse]
url = "http://127.0.0.1:9"
[callbacks]
timeout = "5s"
retry_schedule = ["1s", "2s"]
allow_private_networks = true
[[advertisers]]
id = "acme"
token = "bench-token-0123"
[[publishers]]
id = "net1"
postback_url = "http://127.0.0.1:{port}/cb?c={{conversion_id}}"
events = ["install"]
[[campaigns]]
id = "c1"
advertiser = "acme"
destination = "https://apps.example/x"
[campaigns.events.install]
payout = 2.0
"""


async def produce(settings: config.Settings, conversions: list[dict]) -> None:
    await kafka.ensure_topics(settings, ["conversions"])
    producer = kafka.producer(settings)
    await producer.start()
    try:
        topic = settings.topic("conversions")
        sent = [
            await producer.send(topic, codec.CONVERSION.encode(c), key=c["click_id"].encode())
            for c in conversions
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def attempt_records(settings: config.Settings) -> list[dict]:
    tps = [
        TopicPartition(settings.topic("callback-attempts"), p)
        for p in range(settings.kafka_partitions)
    ]
    ends = await kafka.log_end_offsets(settings.kafka_bootstrap, tps)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out = []
        for tp in tps:
            while await consumer.position(tp) < ends[tp]:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                out.extend(codec.CALLBACK.decode(m.value) for m in batch.get(tp, []))
        return out
    finally:
        await consumer.stop()


def start(config_path: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "callbacks", "--config", str(config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


async def measure(bootstrap: str, n: int, kills: int, every: float, work: Path) -> dict:
    received: Counter[str] = Counter()

    async def handle(request: web.Request) -> web.Response:
        received[request.headers["Idempotency-Key"]] += 1
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/cb", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    path = work / "callbacks.toml"
    path.write_text(config_text(bootstrap, port))
    settings = config.load(path)
    conversions = [conversion("net1") for _ in range(n)]
    await produce(settings, conversions)
    log = work / "callbacks.log"
    proc = start(path, log)
    started = time.monotonic()
    try:
        for _ in range(kills):
            while len(received) < 50 and time.monotonic() - started < 120:
                await asyncio.sleep(0.05)  # running and delivering before each kill
            await asyncio.sleep(every)
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
            proc = start(path, log)
        deadline = time.monotonic() + 600
        while len(received) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)  # the last outcomes reach Kafka
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 60)
        await runner.cleanup()
    records = await attempt_records(settings)
    ids_per_conversion: dict[str, set[str]] = {}
    for r in records:
        ids_per_conversion.setdefault(r["conversion_id"], set()).add(r["attempt_id"])
    without_row = sum(
        max(0, count - len(ids_per_conversion.get(cid, ()))) for cid, count in received.items()
    )
    duplicated = sum(1 for count in received.values() if count > 1)
    return {
        "conversions": n,
        "kills": kills,
        "delivered": len(received),
        "requests": sum(received.values()),
        "conversions_delivered_2_or_more_times": duplicated,
        "duplicate_rate": round(duplicated / n, 4),
        "max_deliveries_of_one": max(received.values(), default=0),
        "attempt_records": len({r["attempt_id"] for r in records}),
        "requests_without_a_row": without_row,
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversions", type=int, default=14_000)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--every", type=float, default=1.5, help="seconds of delivery between kills")
    p.add_argument("--kafka", help="an existing broker (default: a Tansu started here)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = None
        bootstrap = args.kafka
        if not bootstrap:
            broker = EmbeddedKafka(f"127.0.0.1:{free_port()}", work / "tansu")
            broker.start()
            bootstrap = broker.bootstrap_servers
        try:
            result = asyncio.run(measure(bootstrap, args.conversions, args.kills, args.every, work))
        finally:
            if broker is not None:
                broker.stop()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
