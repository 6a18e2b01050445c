"""Reversals through the worker's stages over plain dicts: stage 1 routes them, stage 2
resolves a txn_id to its conversion (or waits), stage 3 (worker.ledger) applies each
once; replays, waits, expiry and recovery from a copy of the tables.

`Flow` wires the Joiner and the Ledger the way pipeline/worker/app.py does, with the
repartition topics as in-memory queues whose records go through their Avro codecs."""

import copy
from collections import deque
from decimal import Decimal

import pytest

from pipeline import codec, config
from pipeline.core import ledger as accounting
from pipeline.core import validation as requests
from pipeline.worker.join import Joiner, txn_key
from pipeline.worker.ledger import Ledger
from pipeline.worker.state import loads

from .test_attribution import extended_doc, make_click, make_postback

GRACE_MS = 30_000
D = Decimal


@pytest.fixture(scope="module")
def settings() -> config.Settings:
    return config.parse(extended_doc())


class Flow:
    """The worker's three stages and the topics between them, drained in order."""

    def __init__(self, settings, margin_s=3600, tables=None):
        self.settings = settings
        self.state, self.txns, self.books = tables or ({}, {}, {})
        self.conversions, self.adjustments = [], []
        self.queue = deque()  # (stage, record): txn-check and ledger records in flight
        self.joiner = Joiner(
            settings,
            self.state,
            self.txns,
            self.emit,
            lambda row: self.send("txn", codec.CONVERSION, row),
            margin_s=margin_s,
            to_ledger=lambda r: self.send("ledger", codec.LEDGER, r),
            check_reversal=lambda r: self.send("txn-reversal", codec.LEDGER, r),
            adjust=lambda row: self.adjustments.append(self._through(codec.ADJUSTMENT, row)),
        )
        self.ledger = Ledger(
            settings,
            self.books,
            lambda row: self.adjustments.append(self._through(codec.ADJUSTMENT, row)),
            lambda row: self.conversions.append(self._through(codec.CONVERSION, row)),
            margin_s=margin_s,
        )
        self.now = 0

    @staticmethod
    def _through(c, record):
        return c.decode(c.encode(record))

    def send(self, stage, c, record):
        self.queue.append((stage, self._through(c, record)))

    def emit(self, row):  # app.emit: conversions, the ledger, a marker for txn-check
        self.conversions.append(self._through(codec.CONVERSION, row))
        self.send("ledger", codec.LEDGER, accounting.conversion_entry(self.settings, row))
        if row["txn_id"] and row["status"] != "attributed":
            self.send("txn", codec.CONVERSION, row)

    def drain(self):
        while self.queue:
            stage, record = self.queue.popleft()
            if stage == "txn":
                self.joiner.on_txn(0, record)
            elif stage == "txn-reversal":
                self.joiner.on_txn_reversal(0, record, self.now)
            elif record["kind"] == "reversal":
                self.ledger.on_reversal(0, record, self.now)
            else:
                self.ledger.on_conversion(0, record)

    def click(self, click):
        self.joiner.on_click(0, click)
        self.drain()

    def postback(self, record):
        self.joiner.on_postback(0, self._through(codec.POSTBACK, record))
        self.drain()

    def tick(self, now_ms):
        self.now = now_ms
        self.joiner.on_tick(0, now_ms, clicks_caught_up=True)
        self.joiner.on_txn_tick(0, now_ms)
        self.ledger.on_tick(0, now_ms)
        self.drain()

    def status(self, conversion_id):
        return [r["status"] for r in self.conversions if r["conversion_id"] == conversion_id]

    def outcomes(self):
        return [(a["adjustment_id"], a["outcome"]) for a in self.adjustments]


def reversal(settings, now_ms, token="adv-secret", **params):
    query = {"token": token, "status": "reversed", **params}
    record, rejection = requests.postback_record(settings, query, "198.51.100.4", "{}", now_ms)
    assert rejection is None, rejection
    return record


def purchase(settings, flow, txn_id="order-1", revenue="19.99", **params):
    click = make_click(settings)
    flow.click(click)
    pb = make_postback(
        settings, click, "purchase", txn_id=txn_id, revenue=revenue, currency="EUR", **params
    )
    flow.postback(pb)
    flow.now = pb["received_at_ms"]
    return click, pb


def test_reversal_by_txn_id_then_again(settings):
    f = Flow(settings)
    _, pb = purchase(settings, f)
    cid = pb["postback_id"]
    first = reversal(settings, f.now + 1000, txn_id="order-1")
    f.postback(first)
    [adj] = f.adjustments
    assert (adj["outcome"], adj["kind"], adj["conversion_id"]) == ("applied", "reversal", cid)
    assert adj["payout_delta"] == D("-3.998") and adj["revenue_delta_reporting"] == D("-21.5892")
    assert f.status(cid) == ["attributed", "reversed"]
    second = reversal(settings, f.now + 2000, txn_id="order-1")
    f.postback(second)
    assert f.outcomes()[1:] == [(second["postback_id"], "already_reversed")]
    assert f.status(cid) == ["attributed", "reversed"]  # no second reversed row


def test_refund_then_reversal_by_conversion_id(settings):
    f = Flow(settings)
    _, pb = purchase(settings, f)
    cid = pb["postback_id"]
    f.postback(reversal(settings, f.now + 1, conversion_id=cid, revenue="5"))
    f.postback(reversal(settings, f.now + 2, conversion_id=cid, revenue="15"))  # 14.99 left
    f.postback(reversal(settings, f.now + 3, conversion_id=cid))
    assert [a["outcome"] for a in f.adjustments] == ["applied", "exceeds_revenue", "applied"]
    net = [
        sum((a[d] for a in f.adjustments), D(0)) + f.conversions[0][amount]
        for d, amount in zip(accounting.DELTAS, accounting.AMOUNTS, strict=True)
    ]
    assert net == [0, 0, 0, 0]
    assert f.status(cid) == ["attributed", "reversed"]


def test_a_replayed_reversal_applies_nothing_twice(settings):
    f = Flow(settings)
    _, pb = purchase(settings, f)
    refund = reversal(settings, f.now + 1, conversion_id=pb["postback_id"], revenue="5")
    full = reversal(settings, f.now + 2, txn_id="order-1")
    for record in (refund, full, refund, full, copy.deepcopy(refund)):
        f.postback(record)
    ids = [refund["postback_id"], full["postback_id"]]
    assert f.outcomes() == [(ids[0], "applied"), (ids[1], "applied")] + [
        (ids[0], "applied"),
        (ids[1], "applied"),
        (ids[0], "applied"),
    ]
    assert f.adjustments[2] == f.adjustments[0] and f.adjustments[3] == f.adjustments[1]
    entry = loads(f.books[pb["postback_id"].encode()])
    assert entry["t"][0] == "19.990000" and entry["x"] == full["postback_id"]
    # each replay of the reversal sends its reversed row again: it stays the latest
    assert f.status(pb["postback_id"]) == ["attributed", "reversed", "reversed"]


def test_a_replayed_conversion_after_its_reversal_is_followed_by_the_reversed_row(settings):
    f = Flow(settings)
    click, pb = purchase(settings, f)
    f.postback(reversal(settings, f.now + 1, txn_id="order-1"))
    f.postback(pb)  # stage 1 replays the purchase: attributed again, then reversed again
    assert f.status(pb["postback_id"]) == ["attributed", "reversed", "attributed", "reversed"]
    assert len(f.adjustments) == 1


def test_reversal_before_its_conversion_waits_for_it(settings):
    """By conversion_id at the ledger, by txn_id at stage 2: both wait for the purchase,
    whose click is late."""
    f = Flow(settings)
    click = make_click(settings)
    pb = make_postback(settings, click, "purchase", txn_id="t-late", revenue="10")
    f.postback(pb)  # waits for its click
    f.now = pb["received_at_ms"]
    f.postback(reversal(settings, f.now + 1, conversion_id=pb["postback_id"], revenue="4"))
    f.postback(reversal(settings, f.now + 2, txn_id="t-late"))
    f.tick(f.now + GRACE_MS - 1)
    assert f.adjustments == []
    f.click(click)
    assert [(a["kind"], a["outcome"]) for a in f.adjustments] == [
        ("refund", "applied"),
        ("reversal", "applied"),
    ]
    assert f.adjustments[1]["revenue_delta"] == D("-6")  # what the refund left
    assert f.status(pb["postback_id"]) == ["attributed", "reversed"]


def test_unknown_conversion_after_the_grace_and_the_same_answer_on_replay(settings):
    f = Flow(settings)
    f.now = 1_000_000
    by_id = reversal(settings, f.now, conversion_id="0" * 32)
    by_txn = reversal(settings, f.now, txn_id="never")
    f.postback(by_id)
    f.postback(by_txn)
    f.tick(f.now + GRACE_MS - 1)
    assert f.adjustments == []
    f.tick(f.now + GRACE_MS)
    assert sorted(f.outcomes()) == sorted(
        [
            (by_id["postback_id"], "unknown_conversion"),
            (by_txn["postback_id"], "unknown_conversion"),
        ]
    )
    first = {a["adjustment_id"]: a for a in f.adjustments}
    assert first[by_txn["postback_id"]]["conversion_id"] == ""
    assert "within 30s" in first[by_id["postback_id"]]["detail"]
    f.tick(f.now + 2 * GRACE_MS)
    assert len(f.adjustments) == 2  # answered once
    for record in (by_id, by_txn):
        f.postback(record)
    assert f.adjustments[2:] == [first[by_id["postback_id"]], first[by_txn["postback_id"]]]


def test_not_attributed_by_txn_id_and_by_conversion_id(settings):
    f = Flow(settings)
    f.now = 1_000_000
    never = make_click(settings)  # its postback ends unknown_click
    lost = make_postback(settings, never, "purchase", txn_id="t-lost", revenue="3")
    f.postback(lost)
    f.tick(lost["received_at_ms"] + GRACE_MS)
    assert f.status(lost["postback_id"]) == ["unknown_click"]
    f.postback(reversal(settings, f.now + 1, txn_id="t-lost"))
    f.postback(reversal(settings, f.now + 2, conversion_id=lost["postback_id"]))
    _, pb = purchase(settings, f, txn_id="t-dup")
    click2 = make_click(settings)
    f.click(click2)
    dup = make_postback(settings, click2, "purchase", txn_id="t-dup", revenue="1")
    f.postback(dup)
    assert f.status(dup["postback_id"]) == ["duplicate"]
    f.postback(reversal(settings, f.now + 3, conversion_id=dup["postback_id"]))
    f.postback(reversal(settings, f.now + 4, txn_id="t-dup"))  # the owner: applied
    assert [a["outcome"] for a in f.adjustments] == [
        "not_attributed",
        "not_attributed",
        "not_attributed",
        "applied",
    ]
    assert f.adjustments[-1]["conversion_id"] == pb["postback_id"]
    assert {a["conversion_id"] for a in f.adjustments[:2]} == {lost["postback_id"]}


def test_another_advertisers_reversal_finds_nothing(settings):
    f = Flow(settings)
    _, pb = purchase(settings, f)
    f.postback(reversal(settings, f.now + 1, token="globex-secret", txn_id="order-1"))
    f.postback(
        reversal(settings, f.now + 2, token="globex-secret", conversion_id=pb["postback_id"])
    )
    f.tick(f.now + GRACE_MS + 10)
    assert [a["outcome"] for a in f.adjustments] == ["unknown_conversion"] * 2
    assert f.status(pb["postback_id"]) == ["attributed"]


def test_ledger_state_expires_with_retention(settings):
    f = Flow(settings, margin_s=1)
    _, pb = purchase(settings, f)
    f.postback(reversal(settings, f.now + 1, conversion_id=pb["postback_id"], revenue="1"))
    f.postback(reversal(settings, f.now + 2, conversion_id="f" * 32))
    assert len(f.books) == 2
    retention_ms = f.ledger.retention_ms
    f.tick(f.now + GRACE_MS)
    assert len(f.books) == 2  # the unknown one is answered, and kept for its replays
    f.tick(pb["received_at_ms"] + retention_ms + 10)
    assert f.books == {} and f.txns == {}


def test_recovered_tables_still_deduplicate(settings):
    """A restart restores the tables from their changelogs: a copy, with fresh indexes."""
    f = Flow(settings)
    _, pb = purchase(settings, f)
    refund = reversal(settings, f.now + 1, conversion_id=pb["postback_id"], revenue="5")
    waiting = reversal(settings, f.now + 2, txn_id="later")
    f.postback(refund)
    f.postback(waiting)
    g = Flow(settings, tables=copy.deepcopy((f.state, f.txns, f.books)))
    g.now = f.now
    g.joiner.prepare({0})
    g.ledger.prepare({0})
    g.postback(refund)
    assert [a["outcome"] for a in g.adjustments] == ["applied"]
    assert g.adjustments[0] == f.adjustments[0]
    g.postback(reversal(settings, f.now + 3, conversion_id=pb["postback_id"]))
    assert g.adjustments[-1]["revenue_delta"] == D("-14.99")
    g.tick(f.now + 2 + GRACE_MS)  # the reversal that waited is still answered
    assert g.adjustments[-1]["adjustment_id"] == waiting["postback_id"]
    assert g.adjustments[-1]["outcome"] == "unknown_conversion"
    assert loads(g.txns[txn_key({"advertiser": "acme", "txn_id": "later"})])["d"] == [
        waiting["postback_id"]
    ]


def test_a_wait_is_not_given_up_while_the_stage_is_behind_nor_across_a_restart(settings):
    """The wait counts from the reversal's arrival or its partition's assignment,
    whichever is later, and ends only while the stage's input is caught up."""
    f = Flow(settings)
    f.now = 1_000_000
    by_id = reversal(settings, f.now, conversion_id="a" * 32)
    by_txn = reversal(settings, f.now, txn_id="t-slow")
    f.postback(by_id)
    f.postback(by_txn)
    end = f.now + GRACE_MS
    f.joiner.on_txn_tick(0, end + 1, caught_up=False)
    f.ledger.on_tick(0, end + 1, caught_up=False)
    assert f.adjustments == []  # the conversions may be in the backlog
    # a restart: the tables come back, the partition is assigned again later
    g = Flow(settings, tables=copy.deepcopy((f.state, f.txns, f.books)))
    restart = end + 60_000
    g.joiner.prepare({0}, restart)
    g.ledger.prepare({0}, restart)
    g.tick(restart + GRACE_MS - 1)
    assert g.adjustments == []  # the downtime does not count
    g.tick(restart + GRACE_MS)
    assert sorted(a["outcome"] for a in g.adjustments) == ["unknown_conversion"] * 2
