"""Request validation: every rejection code, in the documented order."""

import ipaddress
import json
from decimal import Decimal

import pytest

from pipeline import config
from pipeline.core import clickid, validation
from pipeline.core.validation import Rejected

from .conftest import EXAMPLE_CONFIG

NOW = 1_795_637_791_064


@pytest.fixture(scope="module")
def settings():
    s = config.load(EXAMPLE_CONFIG)
    restricted = config.Advertiser(
        "strict",
        "strict-token",
        (ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("2001:db8::/32")),
    )
    from dataclasses import replace

    return replace(s, advertisers={**s.advertisers, "strict": restricted})


def good(settings, **extra):
    return {
        "token": "adv-secret",
        "click_id": clickid.issue(settings.secrets, now_ms=NOW - 1000),
        "event": "install",
        **extra,
    }


def test_accepted_postback_record(settings):
    params = good(settings, txn_id="t-1", revenue="19.99", currency="EUR")
    raw = validation.redacted_raw("GET", "/postback", params)
    record, rejection = validation.postback_record(
        settings, params, "198.51.100.1", raw, now_ms=NOW
    )
    assert rejection is None
    assert record["outcome"] == "accepted" and record["advertiser"] == "acme"
    assert record["click_ts_ms"] == NOW - 1000
    assert record["revenue"] == Decimal("19.990000")
    assert record["currency"] == "EUR" and record["txn_id"] == "t-1"
    assert json.loads(record["raw"])["params"]["token"] == "***"
    assert "adv-secret" not in record["raw"]


@pytest.mark.parametrize(
    "change,status,code",
    [
        ({"token": None}, 400, "missing_param"),
        ({"token": "wrong-token"}, 401, "bad_token"),
        ({"click_id": None}, 400, "missing_param"),
        ({"event": None}, 400, "missing_param"),
        ({"click_id": "forged-click-id"}, 400, "invalid_click_id"),
        ({"event": "Install!"}, 400, "invalid_param"),
        ({"txn_id": "x" * 129}, 400, "invalid_param"),
        ({"revenue": "abc"}, 400, "invalid_param"),
        ({"revenue": "-1"}, 400, "invalid_param"),
        ({"revenue": "NaN"}, 400, "invalid_param"),
        ({"revenue": "1.0000001"}, 400, "invalid_param"),
        ({"revenue": "1e20"}, 400, "invalid_param"),
        ({"currency": "usd"}, 400, "invalid_param"),
        ({"currency": "JPY"}, 400, "invalid_param"),
    ],
)
def test_rejections(settings, change, status, code):
    params = {k: v for k, v in {**good(settings), **change}.items() if v is not None}
    record, rejection = validation.postback_record(
        settings, params, "198.51.100.1", "{}", now_ms=NOW
    )
    assert (rejection.status, rejection.code) == (status, code)
    assert record["outcome"] == code and record["detail"] == rejection.detail
    assert rejection.body() == {"error": code, "detail": rejection.detail}


@pytest.mark.parametrize(
    "ip,allowed",
    [
        ("203.0.113.9", True),
        ("203.0.114.9", False),
        ("2001:db8::5", True),
        ("2001:db9::5", False),
        ("::ffff:203.0.113.9", True),
        ("not-an-ip", False),
    ],
)
def test_ip_allowlist(settings, ip, allowed):
    params = {**good(settings), "token": "strict-token"}
    _, rejection = validation.postback_record(settings, params, ip, "{}", now_ms=NOW)
    assert (rejection is None) == allowed
    if not allowed:
        assert (rejection.status, rejection.code) == (403, "ip_not_allowed")


def test_token_checked_before_click_id(settings):
    params = {"token": "nope-nope", "click_id": "garbage", "event": "install"}
    _, rejection = validation.postback_record(settings, params, "1.2.3.4", "{}", now_ms=NOW)
    assert rejection.code == "bad_token"


PROXY = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


@pytest.mark.parametrize(
    "remote,xff,expected",
    [
        ("198.51.100.1", "1.1.1.1", "198.51.100.1"),  # untrusted peer: header ignored
        ("10.0.0.5", "1.1.1.1", "1.1.1.1"),
        ("10.0.0.5", "6.6.6.6, 1.1.1.1, 10.0.0.9", "1.1.1.1"),  # spoofed left part ignored
        ("10.0.0.5", None, "10.0.0.5"),
        ("fd00::1", "2001:db8::7", "2001:db8::7"),
    ],
)
def test_client_ip(remote, xff, expected):
    assert validation.client_ip(remote, xff, PROXY) == expected


def test_click_record(settings):
    campaign, click = validation.click_record(
        settings, "c1", {"pub": "net1", "sub1": "a"}, "203.0.113.1", "UA", now_ms=NOW
    )
    assert campaign.id == "c1" and click["pub"] == "net1" and click["sub2"] == ""
    assert clickid.verify(click["click_id"], settings.secrets, now_ms=NOW) == NOW == click["ts_ms"]


@pytest.mark.parametrize(
    "campaign,params,status,code",
    [
        ("nope", {"pub": "net1"}, 404, "unknown_campaign"),
        ("c1", {"pub": "nobody"}, 404, "unknown_publisher"),
        ("c1", {}, 400, "missing_param"),
        ("c1", {"pub": "net1", "sub3": "x" * 257}, 400, "invalid_param"),
    ],
)
def test_click_rejections(settings, campaign, params, status, code):
    with pytest.raises(Rejected) as e:
        validation.click_record(settings, campaign, params, "1.2.3.4", "")
    assert (e.value.status, e.value.code) == (status, code)


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"token": "adv-secret", "click_id": "AZq7", "event": "install"},
        {"event": "install", "token": "t", "txn_id": 'a"b\\c\n\t\x00\x1f\x7f'},
        {"sub1": "é 中 \U0001f600 \u2028 \ud800", "": "", "to ken": "x"},
        {"token": "t", "revenue": "1.5", "flag": True, "none": None},  # a JSON body
        {"token": "t", "n": 3, "list": [1, "a"], "obj": {"token": "kept"}},
    ],
)
def test_redacted_raw_is_what_the_json_encoder_writes(params):
    shown = {k: "***" if k == "token" else v for k, v in params.items()}
    expected = json.dumps(
        {"method": "POST", "path": "/postback", "params": shown}, ensure_ascii=False
    )
    # what cannot be stored as UTF-8 (a lone surrogate) is replaced, the rest kept
    assert validation.redacted_raw("POST", "/postback", params) == validation.clean(expected)
