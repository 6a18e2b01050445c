"""Callbacks figure, measured only when `pipeline callbacks` exists (as is
the latency figure, bench/latency.py, which shares the publisher below).

Deliveries per second of one `pipeline callbacks` process to a fast loopback
publisher (`bench.publisher`), from attributed conversions put on the
conversions topic before it starts (rate from the first delivery to the last,
or to the end of a time limit; polled every 0.1 s); against `bench.clients
raw`, an aiohttp client sending as many of the same requests (URL, headers)
to the same publisher, 64 at a time. The same requests, not one URL over and
over: every callback URL is its own (it carries the click), and yarl and
aiohttp cache a URL they have parsed, a path no callback takes (a constant URL
cost the raw client 43 µs of CPU a request, distinct URLs 51).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

from bench import data
from bench.report import Figure
from bench.stack import ROOT, CpuMeter, Proc, Stack, cores_text, wait_http
from pipeline import codec, kafka
from pipeline.config import Settings
from pipeline.core import attribution
from pipeline.core import callback as request
from pipeline.core import callback as tasks
from pipeline.dev.kafka import free_port
from pipeline.worker.app import TOPICS

EXAMPLE_PUBLISHER = "127.0.0.1:9999"  # where deploy/example.toml points its publishers
CONCURRENCY = 64


def available() -> bool:
    """Whether this checkout has the callbacks service (`pipeline callbacks --help`)."""
    argv = [sys.executable, "-m", "pipeline", "callbacks", "--help"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=60)
    return done.returncode == 0


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def start_publisher(stack: Stack) -> tuple[Proc, str]:
    listen = f"127.0.0.1:{free_port()}"
    proc = stack.spawn("publisher", [sys.executable, "-m", "bench.publisher", "--listen", listen])
    wait_http(f"http://{listen}/_stats", 30, proc)
    return proc, listen


def net1_click(settings: Settings, click_id: str, i: int) -> dict:
    """A click of net1 whose sub1 (the callback's `click` parameter) is its key."""
    return {**data.click_record(settings, click_id, i), "pub": "net1", "sub1": f"k{i}"}


def conversion_rows(settings: Settings, n: int) -> Iterator[dict]:
    for i, click_id in enumerate(data.click_ids(settings, n)):
        click = net1_click(settings, click_id, i)
        row = attribution.decide(settings, click, data.postback_record(settings, click_id), None)
        if row["status"] != "attributed":
            raise RuntimeError(f"bench conversion is {row['status']}: {row['detail']}")
        yield row


def attributed_conversions(rows: list[dict]) -> Iterator[tuple[str, bytes, bytes]]:
    for row in rows:
        yield "conversions", row["click_id"].encode(), codec.CONVERSION.encode(row)


def callback_requests(settings: Settings, rows: list[dict]) -> list[list]:
    """[method, url, headers, body] of the first attempt of the callback of each
    conversion row, as the service builds it."""
    publisher, now = settings.publishers["net1"], int(time.time())
    out = []
    for row in rows:
        r = request.build(publisher, tasks.from_conversion(row), now)
        out.append([r.method, r.url, r.headers, r.body.decode()])
    return out


def _raw_client(stack: Stack, requests: list[list], count: int) -> dict:
    path = stack.workdir / "callbacks-requests.json"
    path.write_text(json.dumps(requests))
    argv = [
        sys.executable,
        "-m",
        "bench.clients",
        "raw",
        "--requests",
        str(path),
        "--count",
        str(count),
        "--concurrency",
        str(CONCURRENCY),
    ]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"bench.clients raw failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_callbacks(stack: Stack, count: int, seconds: float) -> Figure:
    """Deliveries per second over at most `seconds` from the first delivery."""
    publisher, listen = start_publisher(stack)
    try:
        path, settings = stack.config("callbacks", replace={EXAMPLE_PUBLISHER: listen})
        asyncio.run(kafka.ensure_topics(settings, TOPICS))
        rows = list(conversion_rows(settings, count))
        asyncio.run(data.produce(settings, attributed_conversions(rows)))
        # the same requests the service sends: each callback's URL is its own
        base = _raw_client(stack, callback_requests(settings, rows), max(count, 20_000))
        before = get_json(f"http://{listen}/_stats")["count"]
        proc = stack.pipeline("callbacks", path)
        meter = CpuMeter({"callbacks": proc.pid, "publisher": publisher.pid})
        try:
            first, deadline = None, time.monotonic() + 120
            while True:
                proc.check()
                delivered = get_json(f"http://{listen}/_stats")["count"] - before
                now = time.monotonic()
                if delivered and first is None:
                    first = (now, delivered)
                    meter.start()
                    stack.profile(proc, seconds)
                if delivered >= count or (first and now - first[0] >= seconds):
                    break
                if now > deadline:
                    raise TimeoutError(f"{delivered} of {count} callbacks delivered in 120 s")
                time.sleep(0.1)
            cpu = meter.stop()
        finally:
            stack.stop(proc)
    finally:
        stack.stop(publisher)
    elapsed, timed = now - first[0], delivered - first[1]
    if timed <= 0:
        raise RuntimeError("every callback arrived within 0.1 s: too few to time")
    rate = timed / elapsed
    return Figure(
        "callbacks",
        ">= 0.5",
        value=rate / base["per_s"],
        measured=f"{rate:,.0f} deliveries/s ({timed:,} after the first in {elapsed:.1f} s)",
        baseline=f"raw aiohttp client, the same requests, {CONCURRENCY} at a time: "
        f"{base['per_s']:,.0f} req/s "
        f"({base['ok']:,} in {base['seconds']:.1f} s)",
        note=f"GET callbacks of attributed installs to one loopback publisher; "
        f"{count:,} queued, timed for at most {seconds:g} s; {cores_text(cpu)}",
        numbers={
            "callbacks": {
                "delivered": delivered,
                "timed": timed,
                "seconds": elapsed,
                "per_s": rate,
                "cpu": cpu,
            },
            "raw": base,
        },
    )
