"""The pure accounting of reversals and refunds (core.ledger): every outcome, every
delta rule, and the identity that a conversion plus its adjustments nets exactly.

Conversions come from `attribution.decide` and reversals from
`validation.postback_record`, so the records have the shape the worker sees; every
adjustment and ledger record must also encode with its schema."""

from decimal import Decimal

import pytest

from pipeline import codec, config
from pipeline.core import attribution, ledger
from pipeline.core import validation as requests

from .test_attribution import CLICK_TS, extended_doc, make_click, make_postback

D = Decimal


@pytest.fixture(scope="module")
def settings() -> config.Settings:
    return config.parse(extended_doc())


def convert(settings, campaign="c1", event="purchase", **params) -> dict:
    click = make_click(settings, campaign)
    return attribution.decide(
        settings, click, make_postback(settings, click, event, **params), None
    )


def kept(settings, row) -> dict:
    entry = ledger.conversion_entry(settings, row)
    assert codec.LEDGER.decode(codec.LEDGER.encode(entry)) == entry
    return ledger.kept(entry)


def reversal(settings, conversion_id="", token="adv-secret", after_ms=3_600_000, **params):
    query = {"token": token, "status": "reversed", **params}
    if conversion_id:
        query["conversion_id"] = conversion_id
    record, rejection = requests.postback_record(
        settings, query, "198.51.100.4", "{}", now_ms=CLICK_TS + after_ms
    )
    assert rejection is None, rejection
    entry = ledger.reversal_entry(record, conversion_id)
    assert codec.LEDGER.decode(codec.LEDGER.encode(entry)) == entry
    return entry


def deltas(row) -> tuple:
    assert codec.ADJUSTMENT.decode(codec.ADJUSTMENT.encode(row)) == row
    return tuple(row[d] for d in ledger.DELTAS)


def decide(settings, conversion, book, rev):
    decision = ledger.decide(settings, conversion, book, rev)
    deltas(decision.adjustment)  # fits its schema
    return decision


def test_full_reversal_takes_back_every_amount_and_reverses(settings):
    row = convert(settings, revenue="19.99", currency="EUR", txn_id="o-1")
    c = kept(settings, row)
    rev = reversal(settings, row["conversion_id"])
    d = decide(settings, c, ledger.Book(), rev)
    assert d.adjustment["outcome"] == "applied" and d.adjustment["kind"] == "reversal"
    assert deltas(d.adjustment) == (D("-19.99"), D("-3.998"), D("-21.5892"), D("-4.31784"))
    assert d.reverses and d.book.reversed_by == rev["postback_id"]
    a = d.adjustment
    assert (a["conversion_id"], a["campaign_id"], a["pub"], a["event"], a["currency"]) == (
        row["conversion_id"],
        "c1",
        "net1",
        "purchase",
        "EUR",
    )
    assert a["conversion_ts_ms"] == row["conversion_ts_ms"] and a["ts_ms"] == rev["ts_ms"]
    assert a["adjustment_id"] == a["postback_id"] == rev["postback_id"]
    reversed_row = ledger.reversed_row(c, rev["postback_id"])
    assert reversed_row["status"] == "reversed"
    assert {k: v for k, v in reversed_row.items() if k not in ("status", "detail")} == {
        k: v for k, v in row.items() if k not in ("status", "detail")
    }  # the same amounts, the same row
    assert codec.CONVERSION.decode(codec.CONVERSION.encode(reversed_row)) == reversed_row


def test_refund_takes_back_its_revenue_and_the_share_of_it(settings):
    row = convert(settings, revenue="19.99", currency="EUR")
    c = kept(settings, row)
    d = decide(settings, c, ledger.Book(), reversal(settings, row["conversion_id"], revenue="5"))
    assert (d.adjustment["outcome"], d.adjustment["kind"], d.reverses) == (
        "applied",
        "refund",
        False,
    )
    assert deltas(d.adjustment) == (D("-5"), D("-1"), D("-5.4"), D("-1.08"))
    # the reversal after it takes what is left, so the conversion nets to zero exactly
    rest = decide(settings, c, d.book, reversal(settings, row["conversion_id"]))
    assert deltas(rest.adjustment) == (D("-14.99"), D("-2.998"), D("-16.1892"), D("-3.23784"))
    for amount, first, second in zip(
        ledger.AMOUNTS, deltas(d.adjustment), deltas(rest.adjustment), strict=True
    ):
        assert row[amount] + first + second == 0


def test_refund_of_a_fixed_payout_leaves_the_payout(settings):
    row = convert(settings, "c1", "install")  # revenue 3 (campaign default), payout 2 fixed
    c = kept(settings, row)
    d = decide(settings, c, ledger.Book(), reversal(settings, row["conversion_id"], revenue="1.5"))
    assert deltas(d.adjustment) == (D("-1.5"), D("0"), D("-1.5"), D("0"))
    # the reversal takes the payout back whole, and what the refund left of the revenue
    rest = decide(settings, c, d.book, reversal(settings, row["conversion_id"]))
    assert deltas(rest.adjustment) == (D("-1.5"), D("-2"), D("-1.5"), D("-2"))


def test_refunds_add_up_to_at_most_the_revenue(settings):
    row = convert(settings, "c3", "sale", revenue="10")  # a 50% share
    c, book = kept(settings, row), ledger.Book()
    for amount in ("3.333333", "3.333333"):
        d = decide(settings, c, book, reversal(settings, row["conversion_id"], revenue=amount))
        assert d.adjustment["outcome"] == "applied"
        book = d.book
    too_much = decide(settings, c, book, reversal(settings, row["conversion_id"], revenue="3.4"))
    assert too_much.adjustment["outcome"] == "exceeds_revenue"
    assert "3.333334 left" in too_much.adjustment["detail"]
    assert deltas(too_much.adjustment) == (0, 0, 0, 0) and too_much.book == book
    last = decide(settings, c, book, reversal(settings, row["conversion_id"], revenue="3.333334"))
    assert last.adjustment["outcome"] == "applied" and not last.reverses
    total = [sum(x) for x in zip(*[book.taken, [-d for d in deltas(last.adjustment)]], strict=True)]
    assert total == [row[a] for a in ledger.AMOUNTS]  # closed exactly, rounding and all
    again = decide(settings, c, last.book, reversal(settings, row["conversion_id"], revenue="0.01"))
    assert again.adjustment["outcome"] == "exceeds_revenue"


def test_refund_above_the_revenue_exceeds(settings):
    row = convert(settings, revenue="19.99", currency="EUR")
    d = decide(
        settings,
        kept(settings, row),
        ledger.Book(),
        reversal(settings, row["conversion_id"], revenue="20"),
    )
    assert d.adjustment["outcome"] == "exceeds_revenue" and deltas(d.adjustment) == (0, 0, 0, 0)


def test_refund_in_another_currency_is_converted_at_the_fx_table(settings):
    row = convert(settings, revenue="10.80", currency="EUR")  # 11.664 USD
    c = kept(settings, row)
    d = decide(
        settings,
        c,
        ledger.Book(),
        reversal(settings, row["conversion_id"], revenue="5.4", currency="USD"),
    )
    assert deltas(d.adjustment)[:2] == (D("-5"), D("-1"))  # 5.40 USD is 5 EUR at 1.08


def test_after_a_full_reversal_everything_is_already_reversed(settings):
    row = convert(settings, revenue="19.99", currency="EUR")
    c = kept(settings, row)
    first = reversal(settings, row["conversion_id"])
    d = decide(settings, c, ledger.Book(), first)
    for again in (
        reversal(settings, row["conversion_id"]),
        reversal(settings, row["conversion_id"], revenue="1"),
    ):
        repeat = decide(settings, c, d.book, again)
        assert repeat.adjustment["outcome"] == "already_reversed"
        assert repeat.adjustment["detail"] == f"reversed by {first['postback_id']}"
        assert deltas(repeat.adjustment) == (0, 0, 0, 0) and not repeat.reverses


def test_not_attributed_and_unknown(settings):
    dup = attribution.txn_duplicate(convert(settings, txn_id="o-9", revenue="4"), "owner")
    marker = kept(settings, dup)
    assert set(marker) == set(ledger.MARKER_FIELDS)  # a marker, not the whole row
    d = decide(settings, marker, ledger.Book(), reversal(settings, dup["conversion_id"]))
    assert d.adjustment["outcome"] == "not_attributed"
    assert d.adjustment["detail"] == f"conversion {dup['conversion_id']} is duplicate"
    nobody = reversal(settings, "0" * 32)
    assert (
        decide(settings, None, ledger.Book(), nobody).adjustment["outcome"] == "unknown_conversion"
    )
    by_txn = reversal(settings, txn_id="o-404")
    row = ledger.unknown(by_txn, "no conversion")
    assert (row["outcome"], row["conversion_id"], row["txn_id"]) == (
        "unknown_conversion",
        "",
        "o-404",
    )
    assert deltas(row) == (0, 0, 0, 0)


def test_another_advertisers_conversion_is_unknown_to_it(settings):
    row = convert(settings, revenue="19.99", currency="EUR")
    rev = reversal(settings, row["conversion_id"], token="globex-secret")
    d = decide(settings, kept(settings, row), ledger.Book(), rev)
    assert d.adjustment["outcome"] == "unknown_conversion"
    assert d.adjustment["campaign_id"] == "" and d.adjustment["pub"] == ""  # nothing leaks


def test_state_round_trip(settings):
    """What the ledger stage keeps goes through JSON (Decimals as text) and back."""
    from pipeline.worker.state import dumps, loads

    row = convert(settings, revenue="19.99", currency="EUR")
    c = kept(settings, row)
    d = decide(settings, c, ledger.Book(), reversal(settings, row["conversion_id"], revenue="5"))
    data = {"c": c}
    ledger.store_book(data, d.book)
    back = loads(dumps(data))
    assert ledger.thaw(back["c"]) == c and ledger.book_of(back) == d.book
    assert ledger.thaw(loads(dumps(d.adjustment))) == d.adjustment
