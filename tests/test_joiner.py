"""The Joiner over plain dicts: waiting for clicks, replays, both dedup stages, and
state that stays bounded, also after recovery from a changelog and a rebalance.

The dicts stand in for the Faust tables and the lists for the producer: the
Joiner is written against MutableMapping and callbacks so that this is exact.
"""

import copy
from decimal import Decimal
from types import SimpleNamespace

import pytest

from pipeline import codec, config
from pipeline.worker.expiry import DiskExpiryIndex
from pipeline.worker.join import Joiner, txn_key
from pipeline.worker.state import ExpiryIndex, loads

from .test_attribution import CLICK_TS, example_doc, make_click, make_postback

GRACE_MS = 30_000  # the example's unknown_click_grace


@pytest.fixture(scope="module")
def settings() -> config.Settings:
    return config.parse(example_doc())


def short_settings(window="2s", grace="1s") -> config.Settings:
    """Every campaign with a window of seconds, so state expires within a test."""
    doc = example_doc()
    for campaign in doc["campaigns"]:
        campaign["click_window"] = window
    doc["attribution"]["unknown_click_grace"] = grace
    return config.parse(doc)


@pytest.fixture(params=["heap", "disk"])
def indexes(request, tmp_path):
    """Expiry indexes of both kinds: heaps in memory, and RocksDB's on disk (the one
    a worker with store = "rocksdb://" uses)."""
    if request.param == "heap":
        return lambda: None
    made = []

    def disk():
        made.append(len(made))
        n = made[-1]
        return DiskExpiryIndex(tmp_path / f"state-{n}"), DiskExpiryIndex(tmp_path / f"txns-{n}")

    return disk


def built(index) -> set[int]:
    return set(index.heaps) if isinstance(index, ExpiryIndex) else set(index.built)


def make_joiner(settings, margin_s=3600, state=None, txns=None, indexes=None):
    emitted, checked = [], []
    state = {} if state is None else state
    txns = {} if txns is None else txns
    joiner = Joiner(
        settings, state, txns, emitted.append, checked.append, margin_s=margin_s, indexes=indexes
    )
    return SimpleNamespace(j=joiner, state=state, txns=txns, emitted=emitted, checked=checked)


def entry(h, click) -> dict | None:
    return loads(h.state.get(click["click_id"].encode()))


def statuses(rows) -> list[str]:
    return [r["status"] for r in rows]


# --- stage 1: clicks and postbacks ---------------------------------------------------


def test_postback_before_click_waits_then_is_attributed(settings):
    h = make_joiner(settings)
    click = make_click(settings)
    pb = make_postback(settings, click, "purchase", revenue="19.99", currency="EUR")
    h.j.on_postback(0, pb)
    assert h.emitted == [] and h.checked == []
    waiting = entry(h, click)
    assert "c" not in waiting and [p["postback_id"] for p in waiting["q"]] == [pb["postback_id"]]

    h.j.on_click(0, click)
    [row] = h.emitted
    assert (row["status"], row["conversion_id"], row["campaign_id"]) == (
        "attributed",
        pb["postback_id"],
        "c1",
    )
    # the revenue went through the JSON state and came back as Decimal
    assert type(row["revenue"]) is Decimal and row["revenue"] == Decimal("19.990000")
    assert row["payout_reporting"] == Decimal("4.317840")
    assert entry(h, click)["q"] == []


def test_click_first_then_install_is_attributed_and_owns_the_click(settings):
    h = make_joiner(settings)
    click = make_click(settings)
    h.j.on_click(0, click)
    pb = make_postback(settings, click)
    h.j.on_postback(0, pb)
    assert statuses(h.emitted) == ["attributed"] and h.emitted[0]["ctit_seconds"] == 60
    assert entry(h, click)["i"] == pb["postback_id"]


def test_pending_postback_gives_up_after_grace_only_when_clicks_caught_up(settings):
    h = make_joiner(settings)
    click = make_click(settings)  # never reaches the worker
    pb = make_postback(settings, click)
    h.j.on_postback(0, pb)
    due = pb["received_at_ms"] + GRACE_MS

    h.j.on_tick(0, due - 1, clicks_caught_up=True)
    assert h.emitted == []
    h.j.on_tick(0, due + 1, clicks_caught_up=False)  # the click may be in the backlog
    h.j.on_tick(0, due + 500, clicks_caught_up=False)
    assert h.emitted == [] and entry(h, click) is not None

    h.j.on_tick(0, due + 5_000, clicks_caught_up=True)
    [row] = h.emitted
    assert (row["status"], row["conversion_id"]) == ("unknown_click", pb["postback_id"])
    assert entry(h, click) is None
    h.j.on_tick(0, due + 10_000, clicks_caught_up=True)
    assert len(h.emitted) == 1


def test_click_in_backlog_arrives_after_grace_is_still_attributed(settings):
    h = make_joiner(settings)
    click = make_click(settings)
    pb = make_postback(settings, click)
    h.j.on_postback(0, pb)
    h.j.on_tick(0, pb["received_at_ms"] + GRACE_MS + 1, clicks_caught_up=False)
    h.j.on_click(0, click)
    assert statuses(h.emitted) == ["attributed"]


def test_pending_postbacks_of_one_click_expire_one_by_one(settings):
    h = make_joiner(settings)
    click = make_click(settings)
    first = make_postback(settings, click, "purchase", after_ms=10_000)
    second = make_postback(settings, click, "purchase", after_ms=20_000)
    h.j.on_postback(0, first)
    h.j.on_postback(0, second)
    h.j.on_tick(0, first["received_at_ms"] + GRACE_MS, clicks_caught_up=True)
    assert [r["conversion_id"] for r in h.emitted] == [first["postback_id"]]
    assert [p["postback_id"] for p in entry(h, click)["q"]] == [second["postback_id"]]
    h.j.on_tick(0, second["received_at_ms"] + GRACE_MS, clicks_caught_up=True)
    assert statuses(h.emitted) == ["unknown_click", "unknown_click"]
    assert entry(h, click) is None


def test_replayed_click_is_ignored(settings):
    h = make_joiner(settings)
    click = make_click(settings)
    h.j.on_click(0, click)
    h.j.on_postback(0, make_postback(settings, click))
    before = dict(h.state)
    h.j.on_click(0, click)
    h.j.on_click(0, {**click, "campaign_id": "c2", "pub": "other"})
    assert h.state == before
    assert len(h.emitted) == 1


def test_replayed_pending_postback_is_queued_once(settings):
    h = make_joiner(settings)
    click = make_click(settings)
    pb = make_postback(settings, click)
    h.j.on_postback(0, pb)
    h.j.on_postback(0, copy.deepcopy(pb))
    assert len(entry(h, click)["q"]) == 1
    h.j.on_click(0, click)
    assert [(r["status"], r["conversion_id"]) for r in h.emitted] == [
        ("attributed", pb["postback_id"])
    ]


def test_replayed_postback_after_attribution_yields_the_same_row(settings):
    h = make_joiner(settings)
    click = make_click(settings)
    h.j.on_click(0, click)
    pb = make_postback(settings, click)
    h.j.on_postback(0, pb)
    h.j.on_postback(0, copy.deepcopy(pb))
    first, replay = h.emitted
    assert replay == first and replay["status"] == "attributed"


def test_install_counts_once_per_click(settings):
    h = make_joiner(settings)
    click, other_click = make_click(settings), make_click(settings)
    h.j.on_click(0, click)
    h.j.on_click(0, other_click)
    first = make_postback(settings, click)
    h.j.on_postback(0, first)
    h.j.on_postback(0, make_postback(settings, click, after_ms=70_000))
    h.j.on_postback(0, make_postback(settings, click, "purchase", after_ms=80_000))
    h.j.on_postback(0, make_postback(settings, other_click))
    assert statuses(h.emitted) == ["attributed", "duplicate", "attributed", "attributed"]
    assert first["postback_id"] in h.emitted[1]["detail"]


def test_two_pending_installs_resolve_to_one_attributed_when_the_click_comes(settings):
    h = make_joiner(settings)
    click = make_click(settings)
    h.j.on_postback(0, make_postback(settings, click))
    h.j.on_postback(0, make_postback(settings, click, after_ms=61_000))
    h.j.on_click(0, click)
    assert statuses(h.emitted) == ["attributed", "duplicate"]


def test_postback_for_click_older_than_state_is_outside_window_at_once(settings):
    h = make_joiner(settings, margin_s=0)
    click = make_click(settings)
    pb = make_postback(settings, click, after_ms=h.j.retention_ms + 1)
    h.j.on_postback(0, pb)
    assert statuses(h.emitted) == ["outside_window"]
    assert h.state == {}


def test_rejected_postback_is_not_attributed(settings):
    h = make_joiner(settings)
    click = make_click(settings)
    h.j.on_click(0, click)
    h.j.on_postback(0, {**make_postback(settings, click), "outcome": "bad_token"})
    assert h.emitted == [] and h.checked == []


# --- stage 2: txn_id once per advertiser ------------------------------------------------


def test_txn_stage_first_attributed_second_duplicate_owner_replay_attributed(settings):
    h = make_joiner(settings)
    click_a, click_b = make_click(settings), make_click(settings)
    for click in (click_a, click_b):
        h.j.on_click(0, click)
        pb = make_postback(settings, click, "purchase", txn_id="order-1", revenue="10")
        h.j.on_postback(0, pb)
    # attributed rows with a txn_id go to stage 2, not straight out
    assert h.emitted == [] and statuses(h.checked) == ["attributed", "attributed"]
    # as the agent sees them: through the Avro codec of the txn-check topic
    row_a, row_b = (codec.CONVERSION.decode(codec.CONVERSION.encode(r)) for r in h.checked)

    h.j.on_txn(0, row_a)
    h.j.on_txn(0, row_b)
    h.j.on_txn(0, row_a)
    assert [(r["status"], r["conversion_id"]) for r in h.emitted] == [
        ("attributed", row_a["conversion_id"]),
        ("duplicate", row_b["conversion_id"]),
        ("attributed", row_a["conversion_id"]),
    ]
    assert h.emitted[0] == h.emitted[2] == row_a
    dup = h.emitted[1]
    assert row_a["conversion_id"] in dup["detail"]
    assert (dup["payout"], dup["payout_reporting"]) == (0, 0)
    assert list(h.txns) == [txn_key(row_a)]


def test_same_txn_id_of_another_advertiser_is_not_a_duplicate(settings):
    h = make_joiner(settings)
    click = make_click(settings)
    h.j.on_click(0, click)
    h.j.on_postback(0, make_postback(settings, click, "purchase", txn_id="t", revenue="1"))
    row = h.checked[0]
    other = {**row, "conversion_id": "x" * 32, "postback_id": "x" * 32, "advertiser": "globex"}
    h.j.on_txn(0, row)
    h.j.on_txn(0, other)
    assert statuses(h.emitted) == ["attributed", "attributed"]


def test_non_attributed_rows_with_txn_skip_stage_2(settings):
    h = make_joiner(settings)
    click = make_click(settings, "c2")  # no purchase event
    h.j.on_click(0, click)
    h.j.on_postback(0, make_postback(settings, click, "purchase", txn_id="t", revenue="1"))
    assert statuses(h.emitted) == ["unknown_event"] and h.checked == []


def test_txn_tick_expires_txns(settings):
    h = make_joiner(settings, margin_s=0)
    click = make_click(settings)
    h.j.on_click(0, click)
    h.j.on_postback(0, make_postback(settings, click, "purchase", txn_id="t", revenue="1"))
    row = h.checked[0]
    h.j.on_txn(0, row)
    expiry = row["conversion_ts_ms"] + h.j.retention_ms
    h.j.on_txn_tick(0, expiry - 1)
    assert list(h.txns) == [txn_key(row)]
    h.j.on_txn_tick(0, expiry)
    assert h.txns == {} and h.j.txn_index.size() == 0
    # after expiry the same txn_id counts again: the dedup horizon is the retention
    later = {**row, "conversion_id": "y" * 32, "postback_id": "y" * 32}
    h.j.on_txn(0, later)
    assert statuses(h.emitted) == ["attributed", "attributed"]


def test_txn_state_restored_from_changelog_still_expires(settings):
    h = make_joiner(settings, margin_s=0)
    click = make_click(settings)
    h.j.on_click(0, click)
    h.j.on_postback(0, make_postback(settings, click, "purchase", txn_id="t", revenue="1"))
    h.j.on_txn(0, h.checked[0])
    fresh = make_joiner(settings, margin_s=0, txns=dict(h.txns))
    fresh.j.on_txn_tick(0, h.checked[0]["conversion_ts_ms"] + h.j.retention_ms)
    assert fresh.txns == {}


# --- bounded state -----------------------------------------------------------------------

N_CLICKS = 5_000
PARTITIONS = 4


def load_traffic(h, settings):
    """N_CLICKS clicks over 5 s on 4 partitions; every 10th gets an install, and every
    7th postback's click never arrives. Returns the number of postbacks sent."""
    sent = 0
    for i in range(N_CLICKS):
        click = make_click(settings, ts_ms=CLICK_TS + i)
        partition = i % PARTITIONS
        if i % 7 == 0:
            h.j.on_postback(partition, make_postback(settings, click, after_ms=100))
            sent += 1
            continue
        h.j.on_click(partition, click)
        if i % 10 == 0:
            h.j.on_postback(partition, make_postback(settings, click, after_ms=500))
            sent += 1
    return sent


def test_state_is_bounded_by_window_grace_and_margin(indexes):
    settings = short_settings()
    h = make_joiner(settings, margin_s=1, indexes=indexes())
    assert h.j.retention_ms == 4_000  # 2 s window + 1 s grace + 1 s margin
    sent = load_traffic(h, settings)
    assert len(h.state) == N_CLICKS

    # ticks every 250 ms, each partition on its own, as the expire agent does
    for now in range(CLICK_TS, CLICK_TS + N_CLICKS + 5_000, 250):
        for partition in range(PARTITIONS):
            h.j.on_tick(partition, now, clicks_caught_up=True)
        # nothing older than the retention survives a tick
        assert all(loads(v)["exp"] > now for v in h.state.values())

    assert h.state == {}
    assert h.j.state_index.size() == 0
    # every postback yielded exactly one row
    assert len(h.emitted) == sent
    assert len({r["conversion_id"] for r in h.emitted}) == sent
    assert set(statuses(h.emitted)) == {"attributed", "unknown_click"}


def test_state_restored_from_changelog_still_expires(indexes):
    """faust-streaming#385: a table rebuilt from its changelog must expire too. A new
    Joiner has no index; its first tick per partition rebuilds it from the table."""
    settings = short_settings()
    before = make_joiner(settings, margin_s=1, indexes=indexes())
    sent = load_traffic(before, settings)
    restored = dict(before.state)  # what the changelog restores

    after = make_joiner(settings, margin_s=1, state=restored, indexes=indexes())
    assert after.j.state_index.size() == 0
    end = CLICK_TS + N_CLICKS + 5_000
    for partition in range(PARTITIONS):
        after.j.on_tick(partition, end, clicks_caught_up=True)
    assert after.state == {}
    assert after.j.state_index.size() == 0
    # the pending postbacks restored with the state are answered by the new Joiner
    assert len(before.emitted) + len(after.emitted) == sent
    assert set(statuses(after.emitted)) == {"unknown_click"}


def test_forget_after_revocation_then_rebuild_on_next_tick(indexes):
    settings = short_settings()
    h = make_joiner(settings, margin_s=1, indexes=indexes())
    clicks = [make_click(settings, ts_ms=CLICK_TS + i) for i in range(20)]
    for i, click in enumerate(clicks):
        h.j.on_click(i % 2, click)
    for partition in (0, 1):
        h.j.on_tick(partition, CLICK_TS, clicks_caught_up=True)  # builds both heaps
    assert built(h.j.state_index) == {0, 1}

    h.j.forget([1])
    assert built(h.j.state_index) == {0}
    # partition 1 comes back (its table restored) with a key the index never saw
    late = make_click(settings, ts_ms=CLICK_TS + 100)
    h.j.on_click(1, late)
    assert 1 not in built(h.j.state_index)

    end = CLICK_TS + 100 + h.j.retention_ms
    h.j.on_tick(1, end, clicks_caught_up=True)
    assert {loads(v)["p"] for v in h.state.values()} == {0}
    h.j.on_tick(0, end, clicks_caught_up=True)
    assert h.state == {} and h.j.state_index.size() == 0


def test_tick_of_one_partition_leaves_others_alone():
    settings = short_settings()
    h = make_joiner(settings, margin_s=1)
    h.j.on_click(0, make_click(settings))
    h.j.on_click(1, make_click(settings))
    h.j.on_tick(0, CLICK_TS + 60_000, clicks_caught_up=True)
    assert [loads(v)["p"] for v in h.state.values()] == [1]


def test_pending_postback_near_retention_still_yields_one_row():
    settings = short_settings(window="2s", grace="30s")
    h = make_joiner(settings, margin_s=1)
    assert h.j.retention_ms == 33_000
    click = make_click(settings)  # never arrives
    pb = make_postback(settings, click, after_ms=32_000)  # younger than retention: queued
    h.j.on_postback(0, pb)
    # its grace would end after the entry expires: it is answered now instead of queued
    assert [r["status"] for r in h.emitted] == ["outside_window"]
    assert entry(h, click) is None
    h.j.on_tick(0, CLICK_TS + 40_000, clicks_caught_up=True)
    h.j.on_tick(0, CLICK_TS + 70_000, clicks_caught_up=True)
    assert len(h.emitted) == 1


def test_prepare_indexes_assigned_partitions_in_one_scan(indexes):
    """After an assignment the worker indexes its partitions before handling records;
    partitions without keys count as indexed too, so no later tick scans again."""
    settings = short_settings()
    h = make_joiner(settings, margin_s=1, indexes=indexes())
    clicks = [make_click(settings, ts_ms=CLICK_TS + i) for i in range(10)]
    for click in clicks:
        h.j.on_click(0, click)
    restored = make_joiner(settings, margin_s=1, state=dict(h.state), indexes=indexes())
    restored.j.prepare({0, 1, 2})
    assert built(restored.j.state_index) == {0, 1, 2}
    restored.j.on_tick(0, CLICK_TS + 10 + restored.j.retention_ms, clicks_caught_up=True)
    assert restored.state == {}


def test_pending_postback_waits_out_a_long_backlog_then_is_answered_within_grace(settings):
    """While the clicks are behind, a pending postback is checked again after 1 s,
    2 s, 4 s... up to the grace (a backlog of them costs a few passes, not one a
    second); once the clicks catch up it is answered within one grace."""
    h = make_joiner(settings)
    click = make_click(settings)  # never reaches the worker
    pb = make_postback(settings, click)
    h.j.on_postback(0, pb)
    due = pb["received_at_ms"] + GRACE_MS
    for now in range(due, due + 120_000, 250):  # two minutes behind, a tick every 250 ms
        h.j.on_tick(0, now, clicks_caught_up=False)
    assert h.emitted == [] and entry(h, click) is not None
    assert h.j.recheck_ms[0] == GRACE_MS

    h.j.on_tick(0, due + 120_000 + GRACE_MS, clicks_caught_up=True)
    assert [r["status"] for r in h.emitted] == ["unknown_click"]
    assert 0 not in h.j.recheck_ms
