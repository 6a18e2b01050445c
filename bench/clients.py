"""Python load generators of the callback figures, each run as its own process.

python -m bench.clients raw --url URL --count N --concurrency C
    the callbacks baseline: N GETs to a publisher, C at a time, with a raw
    aiohttp client; prints {"requests", "ok", "seconds", "per_s"}.
python -m bench.clients paced --url INGRESS --ids FILE --rate R --out FILE
    the latency load: one accepted install postback per line of FILE
    ("<key> <click_id>"), sent open-loop at R per second; writes the Unix
    time each was accepted (200) as {key: seconds} to --out.
python -m bench.clients roundtrip --config FILE --rate R --count N --out FILE
    the latency baseline: N records produced at R per second to the broker of
    FILE and consumed back; writes their latencies (s) as a list to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline import config, kafka
from pipeline.config import Settings


async def raw(url: str, count: int, concurrency: int) -> dict:
    ok, sent = 0, iter(range(count))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def loop() -> None:
            nonlocal ok
            for _ in sent:
                async with http.get(url, allow_redirects=False) as r:
                    await r.read()
                    ok += 200 <= r.status < 300

        started = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        seconds = time.monotonic() - started
    return {"requests": count, "ok": ok, "seconds": seconds, "per_s": ok / seconds}


async def paced(url: str, lines: list[str], rate: float, timeout: float) -> dict:
    accepted: dict[str, float] = {}
    failed = 0
    connector = aiohttp.TCPConnector(limit=512)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as http:

        async def one(key: str, click_id: str) -> None:
            nonlocal failed
            params = {"token": "adv-secret", "click_id": click_id, "event": "install"}
            try:
                async with http.get(f"{url}/postback", params=params) as r:
                    await r.read()
                    if r.status == 200:
                        accepted[key] = time.time()
                    else:
                        failed += 1
            except (aiohttp.ClientError, TimeoutError):
                failed += 1

        start, tasks = time.monotonic(), []
        for i, line in enumerate(lines):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(*line.split())))
        await asyncio.gather(*tasks)
    return {"accepted": accepted, "failed": failed}


async def roundtrip(settings: Settings, rate: float, count: int, timeout: float) -> list[float]:
    """Latencies (s) of `count` records produced at `rate` (the ingress's
    producer settings: acks=all, no linger) and consumed from the same broker
    (the fetch wait of the pipeline's consumers)."""
    await kafka.ensure_topics(settings, ["roundtrip"])
    topic = settings.topic("roundtrip")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, fetch_max_wait_ms=kafka.FETCH_MAX_WAIT_MS
    )
    producer = kafka.producer(settings, linger_ms=0)
    await consumer.start()
    await producer.start()
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)  # resolve the end now, before anything is sent
        latencies: list[float] = []
        deadline = time.monotonic() + timeout

        async def receive() -> None:
            while len(latencies) < count and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=100)
                now = time.time()
                for messages in batch.values():
                    latencies.extend(now - float(m.value) for m in messages)

        receiver = asyncio.create_task(receive())
        start, sends = time.monotonic(), []
        for i in range(count):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            value = repr(time.time()).encode()
            sends.append(asyncio.create_task(producer.send_and_wait(topic, value, key=b"%d" % i)))
        await asyncio.gather(*sends)
        await receiver
        if len(latencies) < count:
            raise TimeoutError(f"round trip: {len(latencies)} of {count} records came back")
        return latencies
    finally:
        await producer.stop()
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.clients")
    sub = parser.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("raw")
    r.add_argument("--url", required=True)
    r.add_argument("--count", type=int, required=True)
    r.add_argument("--concurrency", type=int, default=64)
    p = sub.add_parser("paced")
    p.add_argument("--url", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=30)
    t = sub.add_parser("roundtrip")
    t.add_argument("--config", required=True)
    t.add_argument("--rate", type=float, required=True)
    t.add_argument("--count", type=int, required=True)
    t.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.mode == "roundtrip":
        settings = config.load(args.config)
        latencies = asyncio.run(roundtrip(settings, args.rate, args.count, 120))
        with open(args.out, "w") as f:
            json.dump(latencies, f)
    elif args.mode == "raw":
        print(json.dumps(asyncio.run(raw(args.url, args.count, args.concurrency))), flush=True)
    else:
        with open(args.ids) as f:
            lines = [line for line in f.read().splitlines() if line]
        result = asyncio.run(paced(args.url, lines, args.rate, args.timeout))
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
