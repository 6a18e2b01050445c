"""The worker's wiring, all in one place: topics, tables, agents, timer, metrics.

    clicks ────────┐
    postbacks ─────┼─► stage 1 agents ─► table `state` (by click_id) ─► conversions
    worker-ticks ──┘        │ attributed with a txn_id
                            ▼
    txn-check (by advertiser + txn_id) ─► stage 2 agent ─► table `txns` ─► conversions

clicks, postbacks, worker-ticks and txn-check have the same partition count
(checked at start-up), so Faust assigns partition p of each to the same worker
and the tables' changelogs line up with them. Every agent runs with
concurrency 1 and its handlers never await between reading and writing state;
outputs go through the producer buffer, which Faust flushes before it commits
offsets (at-least-once; conversion IDs make replays idempotent).
"""

from __future__ import annotations

import time

import faust
from faust.types import TP
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from pipeline import codec
from pipeline.config import Settings
from pipeline.worker.join import Joiner, txn_key
from pipeline.worker.state import loads

RAW = dict(key_type=bytes, value_type=bytes)
TOPICS = ["clicks", "postbacks", "worker-ticks", "txn-check", "conversions"]


def faust_settings(settings: Settings) -> dict:
    host, _, port = settings.worker_web_listen.rpartition(":")
    return dict(
        broker=[f"kafka://{server.strip()}" for server in settings.kafka_bootstrap.split(",")],
        store=settings.worker_store,
        datadir=f"{settings.worker_data_dir}/{port}",
        topic_partitions=settings.kafka_partitions,
        topic_replication_factor=1,
        table_standby_replicas=0,
        # Tansu's JoinGroup waits half the session timeout: keep it short
        broker_session_timeout=settings.kafka_session_timeout,
        broker_heartbeat_interval=max(settings.kafka_session_timeout / 6, 0.1),
        broker_rebalance_timeout=max(settings.kafka_session_timeout, 10),
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        # Avro is encoded and decoded by our codecs; Faust moves bytes
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=True,
        web_bind=host,
        web_host=host,
        web_port=int(port),
        web_in_thread=False,
    )


def create_app(settings: Settings) -> tuple[faust.App, Joiner]:
    """The Faust app and the joiner behind its agents (tests drive either)."""
    app = faust.App(settings.topic("worker"), **faust_settings(settings))
    clicks = app.topic(settings.topic("clicks"), **RAW)
    postbacks = app.topic(settings.topic("postbacks"), **RAW)
    ticks = app.topic(settings.topic("worker-ticks"), **RAW)
    txn_check = app.topic(settings.topic("txn-check"), **RAW)
    conversions = app.topic(settings.topic("conversions"), **RAW)
    state = app.Table("state", default=None, partitions=settings.kafka_partitions, **RAW)
    txns = app.Table("txns", default=None, partitions=settings.kafka_partitions, **RAW)

    registry = CollectorRegistry()
    emitted = Counter(
        "pipeline_worker_conversions",
        "Conversions emitted, by status",
        ["status"],
        registry=registry,
    )
    keys = Gauge(
        "pipeline_worker_state_keys",
        "Live keys in the worker's tables",
        ["table"],
        registry=registry,
    )
    keys.labels("state").set_function(lambda: len(state.data))
    keys.labels("txns").set_function(lambda: len(txns.data))

    def emit(row: dict) -> None:
        emitted.labels(row["status"]).inc()
        conversions.send_soon(key=row["click_id"].encode(), value=codec.CONVERSION.encode(row))

    def check_txn(row: dict) -> None:
        txn_check.send_soon(key=txn_key(row), value=codec.CONVERSION.encode(row))

    joiner = Joiner(settings, state, txns, emit, check_txn, margin_s=settings.state_margin)
    clicks_seen: dict[int, int] = {}

    def clicks_caught_up(partition: int) -> bool:
        """Has every click already in this partition been joined?"""
        tp = TP(clicks.get_topic_name(), partition)
        highwater = app.consumer.highwater(tp)
        if highwater is None:
            return False
        seen = clicks_seen.get(partition)
        if seen is not None:
            return seen >= highwater - 1
        # nothing read since the assignment: what lies before the committed offset was
        # joined by the previous owner (Faust keeps that offset in a private map)
        committed = app.consumer._committed_offset.get(tp)
        return highwater == 0 or (committed is not None and committed >= highwater)

    @app.agent(clicks)
    async def join_clicks(stream):
        async for event in stream.events():
            partition = event.message.partition
            joiner.on_click(partition, codec.CLICK.decode(event.value))
            clicks_seen[partition] = event.message.offset

    @app.agent(postbacks)
    async def join_postbacks(stream):
        async for event in stream.events():
            joiner.on_postback(event.message.partition, codec.POSTBACK.decode(event.value))

    @app.agent(ticks)
    async def expire(stream):
        async for event in stream.events():
            partition, now = event.message.partition, int(time.time() * 1000)
            joiner.on_tick(partition, now, clicks_caught_up(partition))
            joiner.on_txn_tick(partition, now)

    @app.agent(txn_check)
    async def dedup_txn(stream):
        async for event in stream.events():
            joiner.on_txn(event.message.partition, codec.CONVERSION.decode(event.value))

    @app.timer(settings.tick_interval)
    async def send_ticks():
        """One tick per assigned partition: expiry runs inside that partition's stream."""
        name = ticks.get_topic_name()
        for tp in app.assignor.assigned_actives():
            if tp.topic == name:
                await ticks.send(value=b"", partition=tp.partition)

    @app.on_partitions_revoked.connect
    async def on_revoked(app, revoked, **kwargs):
        partitions = {tp.partition for tp in revoked if tp.topic == ticks.get_topic_name()}
        joiner.forget(partitions)
        for partition in {tp.partition for tp in revoked}:
            clicks_seen.pop(partition, None)
        # the memory store keeps revoked keys; drop them so memory follows the assignment
        for table in (state, txns):
            for key in [k for k, v in table.data.items() if loads(v)["p"] in partitions]:
                del table.data[key]

    @app.page("/metrics")
    async def metrics(web, request):
        return web.bytes(generate_latest(registry), content_type="text/plain; version=0.0.4")

    return app, joiner
