"""Python load generators of the callbacks and latency figures, each its own process.

python -m bench.clients raw --requests FILE --count N --concurrency C
    the callbacks baseline: N requests to a publisher, C at a time, with a raw
    aiohttp client, going through the [method, url, headers, body] list of
    FILE (the requests the callbacks service sends); prints {"requests", "ok",
    "seconds", "per_s"}.
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
from collections import deque

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline import config, kafka
from pipeline.config import Settings
from pipeline.runtime import settle_heap


async def raw(requests: list, count: int, concurrency: int) -> dict:
    """`count` requests, going round `requests` ([method, url, headers, body] each):
    each callback URL is its own (a click ID in it), and a client sending one URL
    over and over takes a path every callback cannot (yarl and aiohttp cache a URL
    they parsed: 43 µs of CPU a request against 51 for distinct URLs)."""
    ok, sent = 0, iter(range(count))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def loop() -> None:
            nonlocal ok
            for i in sent:
                method, url, headers, body = requests[i % len(requests)]
                data = body.encode() if body else None
                async with http.request(
                    method, url, headers=headers, data=data, allow_redirects=False
                ) as r:
                    await r.read()
                    ok += 200 <= r.status < 300

        started = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        seconds = time.monotonic() - started
    return {"requests": count, "ok": ok, "seconds": seconds, "per_s": ok / seconds}


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of the paced client, a request at a time.
    The answer is read as far as its status and Content-Length (aiohttp's answers
    always have one)."""

    def __init__(self, client: _Paced):
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.key: str | None = None  # of the request waiting for its answer

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, key: str, request: bytes) -> None:
        self.key = key
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower()
        at = head.find(b"\r\ncontent-length:")
        length = int(head[at + 17 : head.find(b"\r\n", at + 2)]) if at >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return
        status = int(self.buffer[9:12])
        self.buffer = self.buffer[end + 4 + length :]
        key, self.key = self.key, None
        self.client.answered(self, key, status)

    def connection_lost(self, exc) -> None:
        self.client.lost(self)


class _Paced:
    """Open-loop postbacks over a pool of keep-alive connections, opened as needed."""

    def __init__(self, host: str, port: int, limit: int):
        self.host, self.port, self.limit = host, port, limit
        self.idle: list[_Connection] = []
        self.opened = 0
        self.waiting: deque[tuple[str, bytes]] = deque()  # no connection free
        self.outstanding = 0
        self.accepted: dict[str, float] = {}
        self.failed = 0
        self.all_answered = asyncio.Event()
        self.all_answered.set()  # nothing sent yet

    def send(self, key: str, click_id: str) -> None:
        request = (
            f"GET /postback?token=adv-secret&click_id={click_id}&event=install HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\n\r\n"
        ).encode()
        self.outstanding += 1
        self.all_answered.clear()
        if self.idle:
            self.idle.pop().send(key, request)
        elif self.opened < self.limit:
            self.opened += 1
            asyncio.get_running_loop().create_task(self._open(key, request))
        else:
            self.waiting.append((key, request))

    async def _open(self, key: str, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except OSError:
            self.opened -= 1
            self._done(None, key, 0)
            return
        conn.send(key, request)

    def answered(self, conn: _Connection, key: str, status: int) -> None:
        self._done(conn, key, status)

    def lost(self, conn: _Connection) -> None:
        self.opened -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.key is not None:
            self._done(None, conn.key, 0)

    def _done(self, conn: _Connection | None, key: str, status: int) -> None:
        if status == 200:
            self.accepted[key] = time.time()
        else:
            self.failed += 1
        if conn is not None:
            if self.waiting:
                conn.send(*self.waiting.popleft())
            else:
                self.idle.append(conn)
        self.outstanding -= 1
        if self.outstanding == 0:
            self.all_answered.set()

    def close(self) -> None:
        for conn in self.idle:
            conn.transport.close()


async def paced(url: str, lines: list[str], rate: float, timeout: float) -> dict:
    """Each line's postback at its time (open loop: a slow answer delays no other
    request). Raw HTTP/1.1 over asyncio, not aiohttp's client: at a few thousand
    requests/s that client took a third of a core, CPU the pipeline under test
    shares on this machine."""
    address = url.removeprefix("http://").rstrip("/")
    host, _, port = address.rpartition(":")
    client = _Paced(host, int(port), limit=512)
    start = time.monotonic()
    for i, line in enumerate(lines):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        client.send(*line.split())
    try:
        async with asyncio.timeout(timeout):
            await client.all_answered.wait()
    except TimeoutError:
        client.failed += client.outstanding  # never answered
    client.close()
    return {"accepted": client.accepted, "failed": client.failed}


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
        # ensure_topics made it with kafka.partitions (the consumer's metadata may not
        # know it yet: Apache Kafka answers a consumer without topics with none)
        tps = [TopicPartition(topic, p) for p in range(settings.kafka_partitions)]
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
    r.add_argument("--requests", required=True)
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
    # once its inputs are loaded, a client takes them out of the collector's reach, as
    # the pipeline's components do (pipeline.runtime.settle_heap): no full collection
    # walks them while it measures
    if args.mode == "roundtrip":
        settings = config.load(args.config)
        settle_heap()
        latencies = asyncio.run(roundtrip(settings, args.rate, args.count, 120))
        with open(args.out, "w") as f:
            json.dump(latencies, f)
    elif args.mode == "raw":
        with open(args.requests) as f:
            requests = json.load(f)
        settle_heap()
        print(json.dumps(asyncio.run(raw(requests, args.count, args.concurrency))), flush=True)
    else:
        with open(args.ids) as f:
            lines = [line for line in f.read().splitlines() if line]
        settle_heap()
        result = asyncio.run(paced(args.url, lines, args.rate, args.timeout))
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
