"""Worker figures, each on clicks and install postbacks (10:1) put in Kafka
before one `pipeline worker` process starts on them.

- worker: messages per second from the moment the worker starts working (its
  state-keys gauge leaves 0) to the last expected conversion on the
  conversions topic (one per postback), so Faust's start-up and rebalance are
  not counted; against `bench.rawconsumer`, a raw aiokafka
  consumer decoding the same messages with the same codecs. The worker runs
  on the default store, memory://; its throughput on rocksdb:// is in the note.
- state memory: the worker's VmRSS once it holds the large number of live
  clicks, against the same with a tenth of them (each run in a fresh process
  on fresh topics, measured once the state-keys gauge of its /metrics shows
  every click and the worker has settled), on rocksdb://, the store for state
  that outgrows memory; the memory:// RSS is in the note.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench import data
from bench.report import Figure
from bench.stack import CpuMeter, Proc, Stack, cores_text, rss_kib
from pipeline import kafka
from pipeline.config import Settings
from pipeline.dev.kafka import free_port
from pipeline.worker.app import RELEASE_INTERVAL_S, TOPICS

STATE_KEYS = 'pipeline_worker_state_keys{table="state"}'
# the store of the memory figure: on disk, so memory stays flat as state grows
STORE = "rocksdb://"
# the store of the throughput figure: the default (deploy/example.toml)
THROUGHPUT_STORE = "memory://"


async def watch_conversions(
    settings: Settings, expected: int, proc: Proc, timeout: float, on_working=lambda: None
) -> tuple[float, float]:
    """Count records on the conversions topic until `expected`. Returns the
    monotonic time the worker started working (its state-keys gauge left 0,
    polled every 0.1 s) and the time the last expected conversion arrived.

    Not the first conversion: Faust drains the clicks backlog before it turns
    to postbacks, so conversions start long after the work did."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        topic = settings.topic("conversions")
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen, started = 0, None
        deadline = time.monotonic() + timeout
        while seen < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{seen} of {expected} conversions after {timeout:.0f}s")
            proc.check()
            if started is None and _state_keys(settings) > 0:
                started = time.monotonic()
                on_working()
            batch = await consumer.getmany(timeout_ms=100)
            seen += sum(len(messages) for messages in batch.values())
        return started or time.monotonic(), time.monotonic()
    finally:
        await consumer.stop()


def _state_keys(settings: Settings) -> float:
    try:
        return worker_metrics(settings).get(STATE_KEYS, 0)
    except OSError:  # the web server is not up yet
        return 0


def worker_metrics(settings: Settings) -> dict[str, float]:
    """The worker's /metrics samples as {'name{labels}': value}."""
    url = f"http://{settings.worker_web_listen}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def wait_state(settings: Settings, clicks: int, proc: Proc, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        proc.check()
        try:
            samples = worker_metrics(settings)
        except OSError:  # its web server is not up yet
            samples = {}
        if samples.get(STATE_KEYS, 0) >= clicks:
            return samples
        if time.monotonic() > deadline:
            raise TimeoutError(f"state holds {samples.get(STATE_KEYS)} of {clicks} clicks")
        time.sleep(0.2)


def prepare(stack: Stack, clicks: int, store: str = STORE):
    """A fresh config and topics holding `clicks` clicks and clicks/10 postbacks."""
    path, settings = stack.config(
        "worker",
        worker=f'web_listen = "127.0.0.1:{free_port()}"\n'
        f'data_dir = "{stack.workdir / "worker-data"}"\nstore = "{store}"',
    )
    asyncio.run(kafka.ensure_topics(settings, TOPICS))
    counts = asyncio.run(data.produce(settings, data.clicks_and_postbacks(settings, clicks)))
    return path, settings, counts


def run_worker(
    stack: Stack, path, settings: Settings, counts: dict, timeout: float
) -> Callable[[], dict]:
    """Start a worker on prepared topics and time it. Returns `finish`, which waits
    until the worker has settled, reads its RSS, stops it and gives its numbers: call
    it before the next worker starts (the next run's topics may be filled meanwhile,
    by another process and on other topics: the settling worker is idle)."""
    started = time.monotonic()
    store = settings.worker_store.split(":")[0]
    proc = stack.pipeline("worker", path, name=f"worker-{store}-{counts['clicks']}")
    try:
        meter = CpuMeter({"worker": proc.pid, "broker": stack.kafka.proc.pid})

        def on_working() -> None:
            meter.start()
            stack.profile(proc)

        working, done = asyncio.run(
            watch_conversions(settings, counts["postbacks"], proc, timeout, on_working)
        )
        cpu = meter.stop()
        samples = wait_state(settings, counts["clicks"], proc, 60)
    except BaseException:
        stack.stop(proc)
        raise
    # steady state: the last changelog batch sent, and the worker's periodic release
    # of freed heap (RELEASE_INTERVAL_S) run once after the last record
    settled = time.monotonic() + RELEASE_INTERVAL_S + 1

    def finish() -> dict:
        try:
            time.sleep(max(0.0, settled - time.monotonic()))
            proc.check()
            rss = rss_kib(proc.pid)
        finally:
            stack.stop(proc)
        messages = counts["clicks"] + counts["postbacks"]
        statuses = {
            k.split('"')[1]: int(v)
            for k, v in samples.items()
            if k.startswith("pipeline_worker_conversions_total{")
        }
        return {
            "messages": messages,
            "seconds": done - working,
            "per_s": messages / (done - working),
            "startup_s": working - started,
            "rss_kib": rss,
            "statuses": statuses,
            "cpu": cpu,
        }

    return finish


def raw_consumer(settings: Settings, count: int, timeout: float) -> dict:
    argv = [
        sys.executable,
        "-m",
        "bench.rawconsumer",
        "--bootstrap",
        settings.kafka_bootstrap,
        "--prefix",
        settings.topic(""),
        "--count",
        str(count),
        "--timeout",
        str(timeout),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
    if out.returncode != 0:
        raise RuntimeError(f"bench.rawconsumer failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(stack: Stack, small: int, large: int, full_counts: bool) -> list[Figure]:
    """The throughput figure on `large` clicks with the default store (memory://);
    the memory figure on `large` and `small` clicks with the on-disk store
    (rocksdb://), whose throughput goes in the notes."""
    path, settings, counts = prepare(stack, large, THROUGHPUT_STORE)
    raw = raw_consumer(settings, counts["clicks"] + counts["postbacks"], timeout=300)
    finish = run_worker(stack, path, settings, counts, timeout=600)
    # each next run's topics are filled while the worker before settles
    path, settings, counts = prepare(stack, small)
    fast = finish()
    finish = run_worker(stack, path, settings, counts, timeout=300)
    path, settings, counts = prepare(stack, large)
    low = finish()
    high = run_worker(stack, path, settings, counts, timeout=600)()

    attributed = fast["statuses"].get("attributed", 0)
    mib = lambda kib: f"{kib / 1024:,.0f} MiB"  # noqa: E731
    scale = "" if full_counts else f"quick run: {large:,} vs {small:,} clicks, not 1M vs 100k; "
    return [
        Figure(
            "worker",
            ">= 0.25",
            value=fast["per_s"] / raw["per_s"],
            measured=(
                f"{fast['per_s']:,.0f} msg/s ({fast['messages']:,} messages in "
                f"{fast['seconds']:.1f} s; {attributed:,} attributed; "
                f"store {THROUGHPUT_STORE})"
            ),
            baseline=f"raw aiokafka + Avro decode, best of {len(raw['passes'])}: "
            f"{raw['per_s']:,.0f} msg/s "
            f"({raw['messages']:,} in {raw['seconds']:.1f} s)",
            note=f"clicks:postbacks 10:1; worker start-up {fast['startup_s']:.1f} s not counted; "
            f"{cores_text(fast['cpu'])}; with store {STORE} (the memory figure's run): "
            f"{high['per_s']:,.0f} msg/s, {high['per_s'] / raw['per_s']:.2f} of the baseline",
            numbers={"worker": fast, "raw": raw, "rocksdb": high},
        ),
        Figure(
            "state memory",
            "<= 1.5",
            value=high["rss_kib"] / low["rss_kib"],
            measured=f"RSS {mib(high['rss_kib'])} with {large:,} live clicks",
            baseline=f"RSS {mib(low['rss_kib'])} with {small:,} live clicks",
            note=f"{scale}store {settings.worker_store}, plus postbacks 10:1; with "
            f"{THROUGHPUT_STORE} (the throughput run): RSS {mib(fast['rss_kib'])}",
            numbers={"large": high, "small": low},
        ),
    ]
