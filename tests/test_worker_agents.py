"""The Faust wiring of pipeline/worker/app.py, driven through its batch handlers.

Each handler of `create_app(settings)` gets Avro bytes with a key in a Faust
`Message`, exactly as the consumer hands over a fetched batch; the tables are the
app's own Faust tables (memory store). No broker runs in these unit tests, so the
producer is the one part missing: `app.outputs` queues each record the handlers
write (conversions, txn-check and the tables' changelogs) and the tests read that
queue, in order, instead of sending it to a broker. The expire handler also asks
the consumer for the clicks highwater, a broker fact, so that one method is set per
test. Every record is on partition 0 unless `put(partition=...)` says otherwise.
"""

import time
from contextlib import asynccontextmanager
from types import SimpleNamespace

import pytest
from faust.types import TP, Message

from pipeline import codec
from pipeline.worker import app as worker_app
from pipeline.worker.app import create_app
from pipeline.worker.join import txn_key
from pipeline.worker.state import loads

from .conftest import make_settings
from .test_attribution import CLICK_TS, make_click, make_postback

GRACE_MS = 30_000


@pytest.fixture
def settings():
    # the addresses are never dialled: nothing here connects to Kafka or ClickHouse
    return make_settings("127.0.0.1:1", "http://127.0.0.1:1")


@pytest.fixture
def worker(settings, monkeypatch):
    app, joiner = create_app(settings)
    sent = []
    add = app.outputs.add

    def record(topic, key, value, partition=None):
        partition = add(topic, key, value, partition)
        sent.append(SimpleNamespace(topic=topic, key=key, value=value, partition=partition))
        return partition

    monkeypatch.setattr(app.outputs, "add", record)
    highwater = {}
    monkeypatch.setattr(app.consumer, "highwater", lambda tp: highwater.get(tp.partition))
    return SimpleNamespace(
        app=app,
        joiner=joiner,
        settings=settings,
        sent=sent,
        highwater=highwater,
        state=app.tables["state"],
        txns=app.tables["txns"],
    )


HANDLERS = {
    "join_clicks": "clicks",
    "join_postbacks": "postbacks",
    "expire": "worker-ticks",
    "dedup_txn": "txn-check",
    "dedup_skan": "skan-reports",
}


class Feed:
    """Hands records to one batch handler, one record per batch, with growing offsets."""

    def __init__(self, w, name: str):
        self.topic = w.settings.topic(HANDLERS[name])
        self.handler = w.app.consumer.batch_handlers[self.topic]
        self.offsets: dict[int, int] = {}

    async def put(self, value: bytes, key: bytes | None = None, partition: int | None = None):
        partition = partition or 0
        offset = self.offsets[partition] = self.offsets.get(partition, -1) + 1
        message = Message(self.topic, partition, offset, time.time(), 0, [], key, value, None)
        self.handler([message])
        return SimpleNamespace(message=message)


@asynccontextmanager
async def batch(w, name):
    assert w.app.consumer.batch_handlers[w.settings.topic(HANDLERS[name])].__name__ == name
    yield Feed(w, name)


def on_topic(w, name) -> list:
    topic = w.settings.topic(name)
    return [m for m in w.sent if m.topic == topic]


def conversions(w) -> list[dict]:
    rows = []
    for m in on_topic(w, "conversions"):
        row = codec.CONVERSION.decode(m.value)
        assert m.key == row["click_id"].encode()
        rows.append(row)
    return rows


def set_now(monkeypatch, now_ms: int) -> None:
    """The expire agent reads the wall clock through `time.time` of its module."""
    monkeypatch.setattr(worker_app, "time", SimpleNamespace(time=lambda: now_ms / 1000))


async def put_click(ctx, click, partition=None):
    return await ctx.put(
        codec.CLICK.encode(click), key=click["click_id"].encode(), partition=partition
    )


async def put_postback(ctx, pb, partition=None):
    return await ctx.put(
        codec.POSTBACK.encode(pb), key=pb["click_id"].encode(), partition=partition
    )


def test_handlers_are_those_of_the_diagram(worker):
    handlers = worker.app.consumer.batch_handlers
    for name, topic in HANDLERS.items():
        assert handlers[worker.settings.topic(topic)].__name__ == name
    assert len(handlers) == len(HANDLERS)
    assert worker.app.agents == {}  # no per-event Faust agents: one handler per batch


async def test_click_then_install_emits_one_attributed_conversion(worker):
    w = worker
    click = make_click(w.settings)
    pb = make_postback(w.settings, click)
    async with batch(w, "join_clicks") as clicks, batch(w, "join_postbacks") as postbacks:
        event = await put_click(clicks, click)
        assert event.message.partition == 0
        assert conversions(w) == []
        await put_postback(postbacks, pb)

    [row] = conversions(w)
    assert (row["status"], row["conversion_id"], row["campaign_id"]) == (
        "attributed",
        pb["postback_id"],
        "c1",
    )
    assert str(row["payout"]) == "2.000000" and row["ctit_seconds"] == 60
    stored = loads(w.state[click["click_id"].encode()])
    assert stored["i"] == pb["postback_id"] and stored["p"] == 0
    # each table write went to the changelog partition of the event that made it
    changelog = [m for m in w.sent if m.topic == w.state.changelog_topic.get_topic_name()]
    assert changelog and {m.partition for m in changelog} == {0}
    assert changelog[-1].key == click["click_id"].encode()
    assert changelog[-1].value == w.state[click["click_id"].encode()]


async def test_postback_before_click_is_attributed_when_the_click_comes(worker):
    w = worker
    click = make_click(w.settings)
    pb = make_postback(w.settings, click, "purchase", revenue="19.99", currency="EUR")
    async with batch(w, "join_clicks") as clicks, batch(w, "join_postbacks") as postbacks:
        await put_postback(postbacks, pb)
        assert conversions(w) == []
        await put_click(clicks, click)
        await put_click(clicks, click)  # a replayed click changes nothing
    [row] = conversions(w)
    assert row["status"] == "attributed" and str(row["payout_reporting"]) == "4.317840"


async def test_rejected_postback_is_not_attributed(worker):
    w = worker
    click = make_click(w.settings)
    async with batch(w, "join_clicks") as clicks, batch(w, "join_postbacks") as postbacks:
        await put_click(clicks, click)
        pb = {**make_postback(w.settings, click), "outcome": "bad_token", "detail": "x"}
        await put_postback(postbacks, pb)
    assert conversions(w) == [] and on_topic(w, "txn-check") == []


async def test_txn_ids_go_through_txn_check_to_dedup_txn(worker):
    w = worker
    click_a, click_b = make_click(w.settings), make_click(w.settings)
    async with batch(w, "join_clicks") as clicks, batch(w, "join_postbacks") as postbacks:
        for click in (click_a, click_b):
            await put_click(clicks, click)
            pb = make_postback(w.settings, click, "purchase", txn_id="order-1", revenue="10")
            await put_postback(postbacks, pb)
    # attributed rows with a txn_id are not final yet: they wait for stage 2
    assert conversions(w) == []
    checks = on_topic(w, "txn-check")
    assert [m.key for m in checks] == [b"acme\x00order-1"] * 2
    first = codec.CONVERSION.decode(checks[0].value)
    assert txn_key(first) == checks[0].key

    async with batch(w, "dedup_txn") as dedup:
        for m in (*checks, checks[0]):  # the owner's message is replayed at the end
            await dedup.put(m.value, key=m.key)
    rows = conversions(w)
    assert [(r["status"], r["click_id"]) for r in rows] == [
        ("attributed", click_a["click_id"]),
        ("duplicate", click_b["click_id"]),
        ("attributed", click_a["click_id"]),
    ]
    assert rows[0] == rows[2] and rows[0]["conversion_id"] == first["conversion_id"]
    assert str(rows[1]["payout"]) == "0.000000"
    assert list(w.txns.data) == [b"acme\x00order-1"]


async def test_expire_gives_up_on_pending_postback_only_when_clicks_caught_up(worker, monkeypatch):
    w = worker
    missing = make_click(w.settings)  # never reaches the worker
    pb = make_postback(w.settings, missing)
    async with (
        batch(w, "join_clicks") as clicks,
        batch(w, "join_postbacks") as postbacks,
        batch(w, "expire") as expire,
    ):
        await put_click(clicks, make_click(w.settings))  # offset 0 of clicks partition 0
        await put_postback(postbacks, pb)
        set_now(monkeypatch, pb["received_at_ms"] + GRACE_MS + 1)

        w.highwater[0] = 2  # one more click is on its way: it may be the missing one
        await expire.put(b"")
        assert conversions(w) == []

        w.highwater[0] = 1  # every click of the partition has been read
        set_now(monkeypatch, pb["received_at_ms"] + GRACE_MS + 2_000)
        await expire.put(b"")
    [row] = conversions(w)
    assert (row["status"], row["conversion_id"]) == ("unknown_click", pb["postback_id"])
    key = missing["click_id"].encode()
    assert key not in w.state.data
    tombstones = [
        m for m in w.sent if m.topic == w.state.changelog_topic.get_topic_name() and m.key == key
    ]
    assert tombstones[-1].value is None


async def test_expire_removes_expired_state_and_txns(worker, monkeypatch):
    w = worker
    click = make_click(w.settings)
    async with batch(w, "join_clicks") as clicks, batch(w, "join_postbacks") as postbacks:
        await put_click(clicks, click)
        pb = make_postback(w.settings, click, "purchase", txn_id="t-1", revenue="1")
        await put_postback(postbacks, pb)
    [check] = on_topic(w, "txn-check")
    async with batch(w, "dedup_txn") as dedup:
        await dedup.put(check.value, key=check.key)
    assert len(w.state.data) == len(w.txns.data) == 1

    async with batch(w, "expire") as expire:
        w.highwater[0] = 1
        set_now(monkeypatch, CLICK_TS + 60_000)
        await expire.put(b"")
        assert len(w.state.data) == len(w.txns.data) == 1  # well inside the window
        set_now(monkeypatch, pb["received_at_ms"] + w.joiner.retention_ms)
        await expire.put(b"")
    assert len(w.state.data) == len(w.txns.data) == 0


async def test_revoked_partitions_drop_their_keys_and_index(worker, monkeypatch):
    w = worker
    kept, revoked = make_click(w.settings), make_click(w.settings)
    async with batch(w, "join_clicks") as clicks, batch(w, "expire") as expire:
        await put_click(clicks, kept, partition=0)
        await put_click(clicks, revoked, partition=1)
        w.highwater.update({0: 1, 1: 2})
        set_now(monkeypatch, CLICK_TS + 1_000)
        for partition in (0, 1):
            await expire.put(b"", partition=partition)  # builds both indexes
    assert set(w.joiner.state_index.heaps) == {0, 1}

    ticks = w.settings.topic("worker-ticks")
    await w.app.on_partitions_revoked.send({TP(ticks, 1), TP(w.settings.topic("clicks"), 1)})
    assert list(w.state.data) == [kept["click_id"].encode()]
    assert set(w.joiner.state_index.heaps) == {0}


async def test_pending_postback_becomes_unknown_click_after_restart_on_quiet_partition(
    worker, monkeypatch
):
    w = worker
    # before the restart all 10 clicks of partition 0 were read and committed
    tp = TP(w.settings.topic("clicks"), 0)
    w.highwater[0] = 10
    w.app.consumer._committed_offset[tp] = 10

    async def position(tp):
        return 10

    monkeypatch.setattr(w.app.consumer, "position", position)

    missing = make_click(w.settings)
    pb = make_postback(w.settings, missing)
    async with batch(w, "join_postbacks") as postbacks, batch(w, "expire") as expire:
        await put_postback(postbacks, pb)
        for step in range(5):
            set_now(monkeypatch, pb["received_at_ms"] + GRACE_MS + 1_000 * (step + 1))
            await expire.put(b"")
    assert [r["status"] for r in conversions(w)] == ["unknown_click"]


async def test_a_fetched_batch_is_handled_record_by_record_on_its_partition(worker):
    w = worker
    clicks = [make_click(w.settings) for _ in range(3)]
    postbacks = [make_postback(w.settings, c) for c in clicks]

    def batch_of(name, values, keys):
        topic = w.settings.topic(HANDLERS[name])
        return [
            Message(topic, 2, offset, time.time(), 0, [], key, value, None)
            for offset, (key, value) in enumerate(zip(keys, values, strict=True))
        ]

    handlers = w.app.consumer.batch_handlers
    keys = [c["click_id"].encode() for c in clicks]
    # the postbacks come first: each waits in the state until its click arrives
    handlers[w.settings.topic("postbacks")](
        batch_of("join_postbacks", [codec.POSTBACK.encode(p) for p in postbacks], keys)
    )
    assert conversions(w) == []
    handlers[w.settings.topic("clicks")](
        batch_of("join_clicks", [codec.CLICK.encode(c) for c in clicks], keys)
    )
    rows = conversions(w)
    assert [r["conversion_id"] for r in rows] == [p["postback_id"] for p in postbacks]
    assert {r["status"] for r in rows} == {"attributed"}
    changelog = [m for m in w.sent if m.topic == w.state.changelog_topic.get_topic_name()]
    assert {m.partition for m in changelog} == {2}
    assert {loads(w.state[k])["p"] for k in keys} == {2}


def test_a_fetch_is_handled_in_groups_of_at_most_chunk_records_in_offset_order():
    from pipeline.adapters.faust import _groups

    a, b, c = TP("clicks", 0), TP("clicks", 1), TP("postbacks", 0)
    batches = {a: list(range(5)), b: list(range(3)), c: list(range(2))}
    groups = list(_groups(batches, 4))
    # every record once, each partition's in order, no group over 4 records
    assert groups == [[(a, [0, 1, 2, 3])], [(a, [4]), (b, [0, 1, 2])], [(c, [0, 1])]]
    assert list(_groups({a: [0, 1], b: [0]}, 4)) == [[(a, [0, 1]), (b, [0])]]
    assert list(_groups({}, 4)) == []


def test_fetches_wait_for_a_few_milliseconds_of_records_only_when_busy():
    from pipeline.adapters.faust import Coalescer

    c = Coalescer(span=0.008, window=0.1, most=64 * 1024)
    # 100 KB/s in 200-byte records (500/s): 800 bytes a span, once a window is measured
    now = 0.0
    assert c.batch(200, now) == 1
    while now < 0.1:
        now += 0.002
        got = c.batch(200, now)
    assert 780 <= got <= 840  # int(200 / 0.002 * 0.008), give or take the first record
    # light traffic (one 200-byte record every 50 ms) needs under a record: no wait
    for _ in range(5):
        now += 0.05
        light = c.batch(200, now)
    assert light <= 200
    # a lull longer than the window answers the next fetch at once
    assert c.batch(200, now + 1.0) == 1
    # a flood is capped
    flood = Coalescer(span=0.008, window=0.1, most=64 * 1024)
    assert [flood.batch(1_000_000, t / 100) for t in range(12)][-1] == 64 * 1024
