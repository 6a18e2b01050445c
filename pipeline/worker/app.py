"""The worker's wiring, all in one place: topics, tables, handlers, timer, metrics.

    clicks ────────┐
    postbacks ─────┼─► stage 1 handlers ─► table `state` (by click_id) ─► conversions
    worker-ticks ──┘        │ attributed with a txn_id
                            ▼
    txn-check (by advertiser + txn_id) ─► stage 2 handler ─► table `txns` ─► conversions

    skan-reports (by transaction-id) ─► SKAN handler ─► table `skan` ─► skan-postbacks

clicks, postbacks, worker-ticks, txn-check and skan-reports have the same partition count
(checked at start-up), so Faust assigns partition p of each to the same worker
and the tables' changelogs line up with them. Each topic has one batch handler
(worker.consumer): Faust's consumer hands it the records of one partition per
fetch, and it never awaits, so nothing interleaves between reading and writing
state. Table writes and outputs are queued in `Outputs` and sent, one record batch
per partition, before the inputs are acked; Faust flushes the producer before it
commits offsets (at-least-once; conversion IDs make replays idempotent).
"""

from __future__ import annotations

import asyncio
import ctypes
import time
from pathlib import Path

import faust
from faust.types import TP
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from pipeline import codec, kafka, logs, runtime
from pipeline.adapters.faust import App, TableManager, committed_offset, handling
from pipeline.config import Settings
from pipeline.worker.join import Joiner, txn_key
from pipeline.worker.outputs import Changelogged, Outputs
from pipeline.worker.skan import SkanStage
from pipeline.worker.state import loads

RAW = dict(key_type=bytes, value_type=bytes)
TABLES = ["state", "txns", "skan"]
# The tables' changelogs ("<app id>-<table>-changelog", the app id being topic("worker"))
# are created with the other topics, before Faust starts. Faust would create them
# itself, but on Apache Kafka a topic just created can stay missing from Metadata
# responses for a second or more: the group leader then assigns without the changelogs
# ("Ignoring missing topic") and its consumer keeps "0 partitions" for them until its
# next metadata refresh (consumer_metadata_max_age_ms, 5 minutes), so every table write
# raises PartitionsMismatch and the workers crash-loop on the leader's partitions.
# kafka.ensure_topics creates "-changelog" topics compacted, as Faust does.
CHANGELOGS = [f"worker-{table}-changelog" for table in TABLES]
TOPICS = ["clicks", "postbacks", "worker-ticks", "txn-check", "conversions", *CHANGELOGS]
TOPICS += ["skan-reports", "skan-postbacks"]
# RocksDB tables (store = "rocksdb://"): Faust's defaults give each partition's
# database 3 write buffers of 64 MiB and a 2 GiB block cache, so memory grows with
# the state up to gigabytes. Each partition has its own database: these keep it to
# 5 MiB (reads of a click's entry are rare and short-lived: a postback's lookup)
ROCKSDB_OPTIONS = {
    "write_buffer_size": 2 << 20,
    "max_write_buffer_number": 2,
    "block_cache_size": 1 << 20,
}


def faust_settings(settings: Settings) -> dict:
    host, _, port = settings.worker_web_listen.rpartition(":")
    return dict(
        broker=[f"kafka://{server.strip()}" for server in settings.kafka_bootstrap.split(",")],
        store=settings.worker_store,
        datadir=f"{settings.worker_data_dir}/{port}",
        topic_partitions=settings.kafka_partitions,
        topic_replication_factor=settings.kafka_replication_factor,
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


RELEASE_INTERVAL_S = 5.0


def _malloc_trim():
    """glibc's malloc_trim, or None elsewhere (musl, macOS)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def create_app(settings: Settings) -> tuple[faust.App, Joiner]:
    """The Faust app and the joiner behind its handlers (tests drive either)."""
    app = App(settings.topic("worker"), TableManager=TableManager, **faust_settings(settings))
    clicks = app.topic(settings.topic("clicks"), **RAW)
    postbacks = app.topic(settings.topic("postbacks"), **RAW)
    ticks = app.topic(settings.topic("worker-ticks"), **RAW)
    txn_check = app.topic(settings.topic("txn-check"), **RAW)
    conversions = app.topic(settings.topic("conversions"), **RAW)
    skan_reports = app.topic(settings.topic("skan-reports"), **RAW)
    on_disk = not settings.worker_store.startswith("memory:")
    tables = dict(default=None, partitions=settings.kafka_partitions, **RAW)
    if on_disk:
        tables["options"] = dict(ROCKSDB_OPTIONS)  # Faust's store pops keys from it
    state, txns, skan = (app.Table(name, **tables) for name in TABLES)
    for table, changelog in zip((state, txns, skan), CHANGELOGS, strict=True):
        assert table.changelog_topic.get_topic_name() == settings.topic(changelog), changelog

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
    skan_outcomes = Counter(
        "pipeline_worker_skan_postbacks",
        "SKAdNetwork postbacks evaluated, by outcome",
        ["outcome"],
        registry=registry,
    )
    outputs = app.outputs = Outputs(app, settings.kafka_partitions)
    views = tuple(Changelogged(table, outputs) for table in (state, txns, skan))
    for name, view in zip(TABLES, views, strict=True):
        keys.labels(name).set_function(view.__len__)
    conversions_topic, txn_check_topic = conversions.get_topic_name(), txn_check.get_topic_name()
    skan_postbacks_topic = settings.topic("skan-postbacks")
    encode = codec.CONVERSION.encode

    def emit(row: dict) -> None:
        emitted.labels(row["status"]).inc()
        outputs.add(conversions_topic, row["click_id"].encode(), encode(row))

    def check_txn(row: dict) -> None:
        outputs.add(txn_check_topic, txn_key(row), encode(row))

    def emit_skan(key: bytes, record: dict) -> None:
        skan_outcomes.labels(record["outcome"]).inc()
        outputs.add(skan_postbacks_topic, key, codec.SKAN_POSTBACK.encode(record))

    indexes = None
    if on_disk:  # a heap item per key would be most of the memory a disk store saves
        from pipeline.worker.expiry import DiskExpiryIndex  # the rocksdb extra

        data = Path(app.conf.datadir)
        indexes = tuple(DiskExpiryIndex(data / f"expiry-{table}") for table in TABLES)
    joiner = Joiner(
        settings,
        *views[:2],
        emit,
        check_txn,
        margin_s=settings.state_margin,
        indexes=indexes and indexes[:2],
    )
    skan_stage = SkanStage(settings, views[2], emit_skan, indexes and indexes[2])
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
        # joined by the previous owner
        committed = committed_offset(app, tp)
        return highwater == 0 or (committed is not None and committed >= highwater)

    @app.batch(clicks)
    def join_clicks(messages: list[faust.types.Message]) -> None:
        decode, partition = codec.CLICK.decode, messages[0].partition
        with handling(messages[0]):
            for message in messages:
                joiner.on_click(partition, decode(message.value))
        clicks_seen[partition] = messages[-1].offset

    @app.batch(postbacks)
    def join_postbacks(messages: list[faust.types.Message]) -> None:
        decode, partition = codec.POSTBACK.decode, messages[0].partition
        with handling(messages[0]):
            for message in messages:
                joiner.on_postback(partition, decode(message.value))

    @app.batch(ticks)
    def expire(messages: list[faust.types.Message]) -> None:
        """Ticks carry no data: a batch of them is one expiry run of its partition."""
        partition, now = messages[0].partition, int(time.time() * 1000)
        with handling(messages[0]):
            joiner.on_tick(partition, now, clicks_caught_up(partition))
            joiner.on_txn_tick(partition, now)
            skan_stage.on_tick(partition, now)

    @app.batch(txn_check)
    def dedup_txn(messages: list[faust.types.Message]) -> None:
        decode, partition = codec.CONVERSION.decode, messages[0].partition
        with handling(messages[0]):
            for message in messages:
                joiner.on_txn(partition, decode(message.value))

    @app.batch(skan_reports)
    def dedup_skan(messages: list[faust.types.Message]) -> None:
        decode, partition = codec.SKAN_REPORT.decode, messages[0].partition
        with handling(messages[0]):
            for message in messages:
                skan_stage.on_report(partition, decode(message.value), message.key)

    @app.timer(settings.tick_interval)
    async def send_ticks():
        """One tick per assigned partition: expiry runs inside that partition's stream."""
        name = ticks.get_topic_name()
        for tp in app.assignor.assigned_actives():
            if tp.topic == name:
                await ticks.send(value=b"", partition=tp.partition)

    trim = _malloc_trim()
    if trim is not None:

        @app.timer(RELEASE_INTERVAL_S)
        async def release_memory():
            """Give the heap that batches of records freed back to the system: glibc
            keeps freed memory for reuse, so without this the RSS stays at its peak
            (the largest backlog ever read), not at what the state needs."""
            trim(0)

    @app.on_rebalance_complete.connect
    async def on_restored(app, **kwargs):
        name = ticks.get_topic_name()
        assigned = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == name}
        joiner.prepare(assigned)
        skan_stage.prepare(assigned)

    @app.on_partitions_revoked.connect
    async def on_revoked(app, revoked, **kwargs):
        partitions = {tp.partition for tp in revoked if tp.topic == ticks.get_topic_name()}
        joiner.forget(partitions)
        skan_stage.forget(partitions)
        for view in views:
            view.forget(partitions)
        for partition in {tp.partition for tp in revoked}:
            clicks_seen.pop(partition, None)
        # the memory store keeps revoked keys; drop them so memory follows the assignment
        for table in (state, txns, skan):
            for key in [k for k, v in table.data.items() if loads(v)["p"] in partitions]:
                del table.data[key]
        # Kafka's eager rebalance revokes *every* partition, also those assigned again
        # right after, and for those Faust's recovery replays the changelog only from the
        # offset its previous recovery reached (Recovery.active_offsets outlives the
        # rebalance): the keys dropped above would never come back, and repeats of clicks
        # converted before would count as new conversions. Forget that offset as well, so
        # a partition that comes back is restored from the start of its changelog.
        for table in (state, txns, skan):
            for partition in partitions:
                app.tables.recovery.revoke(TP(table.changelog_topic.get_topic_name(), partition))

    @app.page("/metrics")
    async def metrics(web, request):
        return web.bytes(generate_latest(registry), content_type="text/plain; version=0.0.4")

    return app, joiner


def serve(settings: Settings, log_level: str = "INFO", log_format: str = "text") -> None:
    """`pipeline worker`: create the topics, then run the Faust worker, which owns its
    event loop and signal handling (Ctrl-C stops it cleanly)."""
    asyncio.run(kafka.ensure_topics(settings, TOPICS))
    Path(settings.worker_data_dir).mkdir(parents=True, exist_ok=True)
    app, _ = create_app(settings)
    settled = False

    @app.on_rebalance_complete.connect
    async def settle(app, **kwargs):
        # once started and recovered; only once, so what a later rebalance leaves
        # behind stays collectable
        nonlocal settled
        if not settled:
            settled = True
            runtime.settle_heap()

    faust.Worker(
        app,
        loglevel=log_level,
        logging_config=logs.dict_config(log_level, log_format),
        redirect_stdouts=False,
    ).execute_from_commandline()
