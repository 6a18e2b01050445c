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

import asyncio
import time

import faust
import faust.tables.recovery
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
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
TABLES = ["state", "txns"]
# The tables' changelogs ("<app id>-<table>-changelog", the app id being topic("worker"))
# are created with the other topics, before Faust starts. Faust would create them
# itself, but on Apache Kafka a topic just created can stay missing from Metadata
# responses for a second or more: the group leader then assigns without the changelogs
# ("Ignoring missing topic") and its consumer keeps "0 partitions" for them until its
# next metadata refresh (consumer_metadata_max_age_ms, 5 minutes), so every table write
# raises PartitionsMismatch and the agents crash-loop on the leader's partitions.
# kafka.ensure_topics creates "-changelog" topics compacted, as Faust does.
CHANGELOGS = [f"worker-{table}-changelog" for table in TABLES]
TOPICS = ["clicks", "postbacks", "worker-ticks", "txn-check", "conversions", *CHANGELOGS]


# Faust's aiokafka driver hard-codes a 1.5 s fetch wait; Tansu answers a fetch only
# near its max wait, so every hop through the worker cost up to 1.5 s (bench: latency)
FETCH_MAX_WAIT_MS = 100


def tune_faust() -> None:
    """Shorten the worker consumer's fetch wait (aiokafka 0.14's attribute, pinned)."""
    from faust.transport.drivers import aiokafka as driver

    create = driver.AIOKafkaConsumerThread._create_worker_consumer
    if getattr(create, "tuned", False):
        return

    def _create_worker_consumer(self, transport):
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer

    _create_worker_consumer.tuned = True
    driver.AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer


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


class _FetchablePartitions:
    """The partitions aiokafka may hand to Faust, decided when it drains its buffers."""

    def __init__(self, consumer, active) -> None:
        self.consumer, self.active = consumer, active

    def __bool__(self) -> bool:
        return True  # aiokafka reads a falsy set as "every assigned partition"

    def __contains__(self, tp) -> bool:
        return self.consumer.flow_active and tp in self.active


_fetch_records = AIOKafkaConsumerThread._fetch_records


async def _fetch_fetchable_records(
    self, consumer, active_partitions, timeout=None, max_records=None
):
    """Faust's fetch, draining only partitions that Faust will not drop.

    Faust passes its live set of active partitions to the consumer thread, where
    aiokafka's `Fetcher.fetched_records(partitions, timeout)` waits up to a second
    (across a rebalance, too) and drains the records of `tp in partitions`, or of every
    partition if `partitions` is falsy. Faust's `Consumer.getmany` then drops what is
    not active by then, or, with the flow stopped, all of it: aiokafka's positions
    have moved past records nobody processes. That happens when the recovery pauses the
    changelogs while the stream partitions are still paused (the set is empty), and
    when a rebalance comes while a fetch waits. Partitions without a committed offset
    are never seeked back (a takeover loses the whole backlog); the others lose what
    comes after their seek, and the gap is committed over (`Consumer._add_gap`).
    Here a partition is drained only if it is active, with the flow running, at the
    moment aiokafka drains it.
    """
    if active_partitions is not None:
        if not active_partitions:
            return {}
        active_partitions = _FetchablePartitions(self.consumer, active_partitions)
    return await _fetch_records(
        self, consumer, active_partitions, timeout=timeout, max_records=max_records
    )


AIOKafkaConsumerThread._fetch_records = _fetch_fetchable_records


class Recovery(faust.tables.recovery.Recovery):
    """Faust's table recovery, resuming the stream partitions only once it is safe.

    Faust's `Recovery.on_recovery_completed` resumes the stream partitions first and
    only then awaits `perform_seek` and calls `app.flow_control.resume()`. The consumer
    flow is already running (it was resumed to read the changelogs), so records that
    aiokafka prefetched for those partitions during the recovery reach the agents'
    queues while `perform_seek` is awaited, and `flow_control.resume()` then empties
    those queues (they are `clear_on_resume`): dropped, never processed, never acked,
    while aiokafka's position has moved past them. Nothing seeks back (a partition
    without a committed offset is not seeked at all), later records are committed past
    them: a partition taken over after a rebalance silently loses its backlog, often
    all of it on Apache Kafka, which fills the prefetch buffers during the recovery.

    Same steps here, in a safe order: seek, clear the queues, then resume the stream
    partitions and the flow.
    """

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        app, consumer = self.app, self.app.consumer
        self.log.info("Restore complete!")
        await app.on_rebalance_complete.send()
        self._set_recovery_ended()
        callbacks = [
            asyncio.ensure_future(
                table.on_recovery_completed(
                    self.actives_for_table[table], self.standbys_for_table[table]
                )
            )
            for table in self.tables.values()
        ]
        if callbacks:
            await asyncio.wait(callbacks)
        if app.consumer_generation_id != generation_id:
            self.log.warning(
                "Recovery rebalancing again app id %r param %r",
                app.consumer_generation_id,
                generation_id,
            )
            return
        assignment = consumer.assignment()
        if assignment:
            self.log.info("Seek stream partitions to committed offsets.")
            await self._wait(consumer.perform_seek(), timeout=app.conf.broker_request_timeout)
        self.completed.set()
        app.flow_control.resume()  # clears the agents' queues: nothing of this generation yet
        consumer.resume_partitions({tp for tp in assignment if not self._is_changelog_tp(tp)})
        consumer.resume_flow()
        await app._fetcher.maybe_start()
        self.tables.on_actives_ready()
        if not app.assignor.assigned_standbys():
            self.tables.on_standbys_ready()
        app.on_rebalance_end()
        self.log.info("Worker ready")


class TableManager(faust.tables.TableManager):
    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = Recovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


def create_app(settings: Settings) -> tuple[faust.App, Joiner]:
    """The Faust app and the joiner behind its agents (tests drive either)."""
    app = faust.App(settings.topic("worker"), TableManager=TableManager, **faust_settings(settings))
    clicks = app.topic(settings.topic("clicks"), **RAW)
    postbacks = app.topic(settings.topic("postbacks"), **RAW)
    ticks = app.topic(settings.topic("worker-ticks"), **RAW)
    txn_check = app.topic(settings.topic("txn-check"), **RAW)
    conversions = app.topic(settings.topic("conversions"), **RAW)
    state = app.Table(TABLES[0], default=None, partitions=settings.kafka_partitions, **RAW)
    txns = app.Table(TABLES[1], default=None, partitions=settings.kafka_partitions, **RAW)
    for table, changelog in zip((state, txns), CHANGELOGS, strict=True):
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
        # Kafka's eager rebalance revokes *every* partition, also those assigned again
        # right after, and for those Faust's recovery replays the changelog only from the
        # offset its previous recovery reached (Recovery.active_offsets outlives the
        # rebalance): the keys dropped above would never come back, and repeats of clicks
        # converted before would count as new conversions. Forget that offset as well, so
        # a partition that comes back is restored from the start of its changelog.
        for table in (state, txns):
            for partition in partitions:
                app.tables.recovery.revoke(TP(table.changelog_topic.get_topic_name(), partition))

    @app.page("/metrics")
    async def metrics(web, request):
        return web.bytes(generate_latest(registry), content_type="text/plain; version=0.0.4")

    return app, joiner
