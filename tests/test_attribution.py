"""The pure attribution rules: one case per status, then every amount rule.

Clicks carry real click IDs and postbacks come from `requests.postback_record`,
so the records have exactly the shape the worker sees. Money is Decimal with 6
places, never float; every row must also encode with the conversion schema.
"""

import copy
import json
import tomllib
from decimal import Decimal
from urllib.parse import parse_qsl

import pytest

from pipeline import codec, config
from pipeline.core import attribution, clickid
from pipeline.core import validation as requests

from .conftest import EXAMPLE_CONFIG

CLICK_TS = 1_795_637_791_064
MONEY_FIELDS = ("revenue", "payout", "revenue_reporting", "payout_reporting")
DAY_S = 86400


def example_doc() -> dict:
    return tomllib.loads(EXAMPLE_CONFIG.read_text())


def extended_doc() -> dict:
    """The example plus a second advertiser with its campaign, and a campaign with a
    50% payout share (a tie at the 7th decimal shows the rounding)."""
    doc = example_doc()
    doc["advertisers"].append({"id": "globex", "token": "globex-secret"})
    doc["campaigns"] += [
        {
            "id": "g1",
            "advertiser": "globex",
            "destination": "https://globex.example/?c={click_id}",
            "click_window": "1h",
            "currency": "GBP",
            "events": {"install": {"payout": 1.0}},
        },
        {
            "id": "c3",
            "advertiser": "acme",
            "destination": "https://half.example/?c={click_id}",
            "click_window": "1h",
            "events": {"sale": {"payout_share": 0.5}},
        },
    ]
    return doc


@pytest.fixture(scope="module")
def settings() -> config.Settings:
    return config.parse(extended_doc())


def make_click(settings, campaign_id="c1", ts_ms=CLICK_TS, **fields) -> dict:
    """A click record as the ingress writes it (schemas/examples/click)."""
    return {
        "click_id": clickid.issue(settings.secrets, now_ms=ts_ms),
        "ts_ms": ts_ms,
        "campaign_id": campaign_id,
        "pub": "net1",
        "sub1": "s1-abc",
        "sub2": "",
        "sub3": "",
        "sub4": "",
        "sub5": "",
        "ip": "203.0.113.7",
        "user_agent": "Mozilla/5.0",
        **fields,
    }


def make_postback(
    settings, click, event="install", after_ms=60_000, token="adv-secret", **params
) -> dict:
    """An accepted postback record for `click`, received `after_ms` after it."""
    query = {"token": token, "click_id": click["click_id"], "event": event, **params}
    raw = requests.redacted_raw("GET", "/postback", query)
    record, rejection = requests.postback_record(
        settings, query, "198.51.100.4", raw, now_ms=click["ts_ms"] + after_ms
    )
    assert rejection is None, rejection
    return record


def assert_money(row: dict) -> None:
    for name in MONEY_FIELDS:
        value = row[name]
        assert type(value) is Decimal, f"{name} is {type(value).__name__}, not Decimal"
        assert value.as_tuple().exponent == -6, f"{name}={value} is not at 6 places"
    # the row is a valid conversion record (types agree with the schema)
    assert codec.CONVERSION.decode(codec.CONVERSION.encode(row)) == row


# --- one case per status ---------------------------------------------------------


def _attributed(s):
    click = make_click(s)
    return attribution.decide(s, click, make_postback(s, click), None)


def _second_install(s):
    click = make_click(s)
    first, second = make_postback(s, click), make_postback(s, click, after_ms=90_000)
    return attribution.decide(s, click, second, first["postback_id"])


def _txn_duplicate(s):
    click = make_click(s)
    pb = make_postback(s, click, "purchase", txn_id="order-1", revenue="10", currency="EUR")
    row = attribution.decide(s, click, pb, None)
    assert row["status"] == "attributed"
    return attribution.txn_duplicate(row, "owner-conversion")


def _outside_window(s):
    click = make_click(s, "c2")  # 1d window
    return attribution.decide(s, click, make_postback(s, click, after_ms=DAY_S * 1000 + 1), None)


def _unknown_event(s):
    click = make_click(s, "c2")  # install only
    return attribution.decide(s, click, make_postback(s, click, "purchase"), None)


def _campaign_gone(s):
    click = make_click(s, "retired")
    return attribution.decide(s, click, make_postback(s, click), None)


def _wrong_advertiser(s):
    click = make_click(s, "g1")  # globex's campaign, postback with acme's token
    return attribution.decide(s, click, make_postback(s, click), None)


def _unknown_click(s):
    return attribution.unknown_click(s, make_postback(s, make_click(s)))


def _unknown_currency(s):
    # the ingress accepted GBP; by the time the worker decides, [fx] no longer has it
    click = make_click(s)
    pb = make_postback(s, click, "purchase", revenue="5", currency="GBP")
    doc = extended_doc()
    del doc["fx"]["GBP"]
    doc["campaigns"] = [c for c in doc["campaigns"] if c.get("currency") != "GBP"]
    return attribution.decide(config.parse(doc), click, pb, None)


STATUS_CASES = {
    "attributed": (_attributed, "attributed", ""),
    "duplicate-second-install": (_second_install, "duplicate", "install already counted as"),
    "duplicate-txn": (_txn_duplicate, "duplicate", "txn_id order-1 already counted as owner"),
    "outside_window": (_outside_window, "outside_window", "window 86400s"),
    "unknown_event": (_unknown_event, "unknown_event", "has no event purchase"),
    "unknown_event-campaign-gone": (_campaign_gone, "unknown_event", "no longer configured"),
    "wrong_advertiser": (_wrong_advertiser, "wrong_advertiser", "belongs to globex"),
    "unknown_click": (_unknown_click, "unknown_click", "within 30s"),
    "unknown_currency": (_unknown_currency, "unknown_currency", "no [fx] rate for GBP"),
}


@pytest.mark.parametrize("case", STATUS_CASES)
def test_status(settings, case):
    build, status, detail = STATUS_CASES[case]
    row = build(settings)
    assert row["status"] == status
    assert detail in row["detail"]
    assert row["conversion_id"] == row["postback_id"]
    assert_money(row)
    if status != "attributed":
        assert row["payout"] == row["payout_reporting"] == row["revenue_reporting"] == 0
        assert row["ctit_seconds"] is None


def test_wrong_advertiser_is_checked_before_the_event():
    s = config.parse(extended_doc())
    click = make_click(s, "g1")
    row = attribution.decide(s, click, make_postback(s, click, "nonexistent"), None)
    assert row["status"] == "wrong_advertiser"


def test_globex_postback_for_its_own_campaign_is_attributed(settings):
    click = make_click(settings, "g1")
    pb = make_postback(settings, click, token="globex-secret")
    row = attribution.decide(settings, click, pb, None)
    assert (row["status"], row["currency"], row["payout"]) == ("attributed", "GBP", Decimal(1))
    assert row["payout_reporting"] == Decimal("1.270000")


def test_window_edge_is_inclusive(settings):
    click = make_click(settings, "c2")
    at_edge = make_postback(settings, click, after_ms=DAY_S * 1000)
    assert attribution.decide(settings, click, at_edge, None)["status"] == "attributed"


def test_row_carries_click_fields(settings):
    click = make_click(settings, pub="net2", sub3="x")
    row = _decide(settings, click, make_postback(settings, click))
    assert (row["campaign_id"], row["pub"], row["sub1"], row["sub3"]) == (
        "c1",
        "net2",
        "s1-abc",
        "x",
    )
    assert (row["click_ts_ms"], row["advertiser"]) == (CLICK_TS, "acme")
    assert row["conversion_ts_ms"] == CLICK_TS + 60_000


# --- amounts -----------------------------------------------------------------------


def _decide(settings, click, pb, owner=None):
    row = attribution.decide(settings, click, pb, owner)
    assert_money(row)
    return row


AMOUNT_CASES = {
    # campaign, event, postback query -> "currency revenue payout revenue_rep payout_rep"
    "install-default-revenue-fixed-payout": (
        ("c1", "install", ""),
        "USD 3.000000 2.000000 3.000000 2.000000",
    ),
    "install-postback-revenue-wins": (
        ("c1", "install", "revenue=5.5"),
        "USD 5.500000 2.000000 5.500000 2.000000",
    ),
    "purchase-payout-share": (
        ("c1", "purchase", "revenue=10"),
        "USD 10.000000 2.000000 10.000000 2.000000",
    ),
    "purchase-no-revenue-no-default": (
        ("c1", "purchase", ""),
        "USD 0.000000 0.000000 0.000000 0.000000",
    ),
    "purchase-eur-to-reporting": (
        ("c1", "purchase", "revenue=19.99&currency=EUR"),
        "EUR 19.990000 3.998000 21.589200 4.317840",
    ),
    "purchase-gbp-to-reporting": (
        ("c1", "purchase", "revenue=10&currency=GBP"),
        "GBP 10.000000 2.000000 12.700000 2.540000",
    ),
    # the campaign default is in USD; a EUR postback gets it at 1 / 1.08
    "usd-default-into-eur-row": (
        ("c1", "install", "currency=EUR"),
        "EUR 2.777778 1.851852 3.000000 2.000000",
    ),
    # c2 is a EUR campaign: no postback currency means EUR amounts
    "eur-campaign-own-currency": (("c2", "install", ""), "EUR 0.000000 1.500000 0.000000 1.620000"),
    # ... and a USD postback carries the EUR payout across at 1.08
    "eur-campaign-usd-postback": (
        ("c2", "install", "revenue=10&currency=USD"),
        "USD 10.000000 1.620000 10.000000 1.620000",
    ),
    # ... and a GBP postback through the cross rate 1.08 / 1.27
    "eur-campaign-gbp-postback": (
        ("c2", "install", "currency=GBP"),
        "GBP 0.000000 1.275591 0.000000 1.620001",
    ),
    # 0.000005 x 0.5 = 0.0000025: half-even keeps 2, half-up would give 3
    "half-even-down": (
        ("c3", "sale", "revenue=0.000005"),
        "USD 0.000005 0.000002 0.000005 0.000002",
    ),
    # 0.000007 x 0.5 = 0.0000035: half-even goes up to 4
    "half-even-up": (("c3", "sale", "revenue=0.000007"), "USD 0.000007 0.000004 0.000007 0.000004"),
}


@pytest.mark.parametrize("case", AMOUNT_CASES)
def test_amounts(settings, case):
    (campaign, event, query), expected = AMOUNT_CASES[case]
    click = make_click(settings, campaign)
    pb = make_postback(settings, click, event, **dict(parse_qsl(query)))
    row = _decide(settings, click, pb)
    assert row["status"] == "attributed", row["detail"]
    assert " ".join([row["currency"], *(str(row[f]) for f in MONEY_FIELDS)]) == expected


@pytest.mark.parametrize(
    "value,rounded",
    [
        ("0.0000025", "0.000002"),
        ("0.0000035", "0.000004"),
        ("-0.0000025", "-0.000002"),
        ("1.2345675", "1.234568"),
        ("1.2345665", "1.234566"),
        ("2", "2.000000"),
    ],
)
def test_money_rounds_half_even_to_six_places(value, rounded):
    result = attribution.money(Decimal(value))
    assert type(result) is Decimal
    assert str(result) == rounded


def test_config_amounts_are_decimal_not_float(settings):
    rule = settings.campaigns["c1"].events["purchase"]
    assert type(rule.payout_share) is Decimal and rule.payout_share == Decimal("0.2")
    assert all(type(rate) is Decimal for rate in settings.fx.values())


@pytest.mark.parametrize(
    "event,after_ms,ctit", [("install", 60_999, 60), ("install", 0, 0), ("purchase", 60_000, None)]
)
def test_ctit_seconds_for_installs_only(settings, event, after_ms, ctit):
    click = make_click(settings)
    row = _decide(settings, click, make_postback(settings, click, event, after_ms=after_ms))
    assert row["status"] == "attributed"
    assert row["ctit_seconds"] == ctit
    assert ctit is None or type(row["ctit_seconds"]) is int


def test_replay_of_install_owner_is_attributed_again_with_same_id(settings):
    click = make_click(settings)
    pb = make_postback(settings, click)
    first = _decide(settings, click, pb, None)
    replay = _decide(settings, click, copy.deepcopy(pb), first["conversion_id"])
    assert replay == first
    assert replay["status"] == "attributed" and replay["conversion_id"] == pb["postback_id"]


def test_other_events_are_not_limited_per_click(settings):
    click = make_click(settings)
    owner = make_postback(settings, click)["postback_id"]
    pb = make_postback(settings, click, "purchase", revenue="1")
    assert _decide(settings, click, pb, owner)["status"] == "attributed"


def test_txn_duplicate_keeps_identity_and_zeroes_what_is_paid(settings):
    click = make_click(settings)
    pb = make_postback(settings, click, "install", txn_id="t-9", revenue="4")
    row = _decide(settings, click, pb)
    dup = attribution.txn_duplicate(row, "first")
    assert_money(dup)
    assert dup["conversion_id"] == row["conversion_id"] and dup["txn_id"] == "t-9"
    assert (dup["payout"], dup["payout_reporting"], dup["revenue_reporting"]) == (0, 0, 0)
    assert dup["ctit_seconds"] is None
    assert row["status"] == "attributed" and row["ctit_seconds"] == 60  # input untouched


# --- retention and too_old -----------------------------------------------------------


def test_state_retention_is_longest_window_plus_grace_plus_margin(settings):
    assert attribution.state_retention_s(settings, margin_s=3600) == 7 * DAY_S + 30 + 3600
    assert attribution.state_retention_s(settings) == 7 * DAY_S + 30 + 3600


def test_too_old_beyond_retention(settings):
    retention = attribution.state_retention_s(settings, margin_s=60)
    click = make_click(settings)
    inside = make_postback(settings, click, after_ms=int(retention * 1000))
    assert attribution.too_old(settings, inside, retention) is None
    beyond = make_postback(settings, click, "purchase", after_ms=int(retention * 1000) + 1)
    row = attribution.too_old(settings, beyond, retention)
    assert row["status"] == "outside_window"
    assert "older than any click window" in row["detail"]
    # the click is gone: only what the click ID tells is known
    assert (row["campaign_id"], row["pub"], row["click_ts_ms"]) == ("", "", CLICK_TS)
    assert row["currency"] == "USD"
    assert_money(row)


def test_unknown_click_keeps_postback_amount_and_currency(settings):
    pb = make_postback(settings, make_click(settings), "purchase", revenue="7.25", currency="EUR")
    row = attribution.unknown_click(settings, pb)
    assert (row["revenue"], row["currency"]) == (Decimal("7.250000"), "EUR")
    assert row["revenue_reporting"] == 0
    assert_money(row)


def test_example_conversion_matches_decide(settings):
    """schemas/examples/conversion/install-attributed.json is what decide() makes."""
    path = EXAMPLE_CONFIG.parent.parent / "schemas/examples/conversion/install-attributed.json"
    example = codec.CONVERSION.from_json(json.loads(path.read_text()))
    click = make_click(settings, ts_ms=example["click_ts_ms"])
    pb = make_postback(settings, click)
    row = _decide(settings, click, pb)
    ignore = {"conversion_id", "postback_id", "click_id", "sub1"}
    assert {k: v for k, v in row.items() if k not in ignore} == {
        k: v for k, v in example.items() if k not in ignore
    }
