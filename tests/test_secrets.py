"""Secrets never stored nor logged, tokens compared in constant time, and revenue
as plain ASCII decimals only: pure functions, no broker."""

import json
import logging
from decimal import Decimal

import pytest

from pipeline import logs
from pipeline.core import validation
from pipeline.core.secrets import Secrets, TokenIndex, secret_name
from pipeline.core.validation import Rejected

from .conftest import make_settings
from .test_validation import NOW, good

CLICK_SECRET = "dev-secret-change-me"


@pytest.fixture
def settings():
    return make_settings("127.0.0.1:1", "http://127.0.0.1:1")


def record_of(settings, params, method="POST"):
    raw = validation.redacted_raw(method, "/postback", params, settings.redaction)
    return validation.postback_record(settings, params, "1.2.3.4", raw, now_ms=NOW)


# --- revenue: plain ASCII decimals only


@pytest.mark.parametrize(
    "text",
    [
        " 1",
        "1 ",
        "1\n",
        "1_000",
        "\u0661\u0662",  # Arabic-Indic digits
        "\uff11\uff12",  # full-width digits
        "1E+2",
        "1e2",
        "-0",
        "+1",
        "-1",
        "1.",
        ".5",
        "1.0000001",
        "NaN",
        "Infinity",
        "0x10",
        "1,5",
        "",
    ],
)
def test_revenue_other_than_a_plain_decimal_is_refused(settings, text):
    params = good(settings, revenue=text)
    if text == "":
        assert record_of(settings, params)[1] is None
        return
    with pytest.raises(Rejected) as e:
        validation._revenue(text)
    assert e.value.code == "invalid_param"
    record, rejection = record_of(settings, params)
    assert (rejection.status, rejection.code) == (400, "invalid_param")


@pytest.mark.parametrize(
    "text,value",
    [("0", "0"), ("19.99", "19.99"), ("007.5", "7.5"), ("999999999999", None)],
)
def test_plain_decimals_are_accepted(settings, text, value):
    record, rejection = record_of(settings, good(settings, revenue=text))
    assert rejection is None
    assert record["revenue"] == Decimal(value or text).quantize(Decimal("0.000001"))


# --- tokens: a keyed hash, not the token, is what a lookup compares


def test_tokens_are_found_through_a_keyed_hash(settings):
    index = settings.token_index
    assert index.get("adv-secret").id == "acme"
    assert index.get("adv-secreT") is None and index.get("") is None
    assert all(len(d) == 32 for d in index._by_digest)  # digests, not tokens, are keys
    a, b = TokenIndex({"t": 1}, key=b"k" * 32), TokenIndex({"t": 1}, key=b"j" * 32)
    assert a._by_digest.keys() != b._by_digest.keys()  # the key is the process's own


def test_the_postback_check_never_looks_a_token_up_in_plain_text(settings):
    class Plain(dict):
        def get(self, *_):
            raise AssertionError("a dict lookup by the token itself")

        __getitem__ = get

    settings.__dict__["advertisers_by_token"] = Plain()
    settings.__dict__.pop("token_index", None)
    settings.__dict__["token_index"] = TokenIndex(
        {a.token: a for a in settings.advertisers.values()}
    )
    record, rejection = record_of(settings, good(settings))
    assert rejection is None and record["advertiser"] == "acme"


# --- redaction by value and by name


def test_names_that_hold_credentials():
    for name in ("token", "Token", "TOKEN", "amp;token", "api_key", "x-secret", "password"):
        assert secret_name(name), name
    for name in ("click_id", "event", "txn_id", "revenue", "tokens_left", "sub1"):
        assert not secret_name(name), name


@pytest.mark.parametrize(
    "params",
    [
        # a JSON body sent as text/plain: one form parameter named by the whole document
        lambda cid: {json.dumps({"token": "adv-secret", "click_id": cid}): ""},
        lambda cid: {"token": "adv-secret", "click_id": cid, "amp;token": "adv-secret"},
        lambda cid: {"token": "adv-secret", "click_id": cid, "Token": "adv-secret"},
        lambda cid: {"token": "adv-secret", "click_id": cid, "txn_id": "adv-secret"},
        lambda cid: {"token": "adv-secret", "click_id": cid, "sub": f"x{CLICK_SECRET}y"},
        lambda cid: {"token": "adv-secret", "click_id": "adv-secret", "event": "install"},
        lambda cid: {"token": "adv-secret", "click_id": cid, "adv-secret": "1"},
        lambda cid: {"token": "adv-secret", "click_id": cid, "n": ["adv-secret"]},
    ],
)
def test_no_configured_secret_reaches_a_row(settings, params):
    params = {"event": "install", **params(good(settings)["click_id"])}
    record, rejection = record_of(settings, params)
    stored = json.dumps(record, default=str)
    assert "adv-secret" not in stored and CLICK_SECRET not in stored, stored
    if rejection is not None:
        assert "adv-secret" not in rejection.detail


def test_secrets_hidden_in_their_encoded_forms():
    secrets = Secrets(['se"cr et/é'])
    for text in ['se"cr et/é', 'se\\"cr et/é', "se%22cr%20et%2F%C3%A9", "se%22cr+et%2F%C3%A9"]:
        assert secrets.hide(f"a {text} b") == "a *** b", text
    assert Secrets(["abc"]).hide("abc") == "abc"  # too short to be a configured secret


def test_every_log_line_hides_secrets(settings, capsys):
    logs.configure("INFO", "json", settings.redaction)
    try:
        log = logging.getLogger("test.secrets")
        log.error("GET /postback?token=adv-secret&click_id=x HTTP/1.1 from %s", "1.2.3.4")
        log.warning("named %s", "token=not-a-configured-one&x=1")
        try:
            raise ValueError(f"bad {CLICK_SECRET}")
        except ValueError:
            log.exception("failed")
        err = capsys.readouterr().err
    finally:
        logs.configure("INFO", "text", Secrets())
    lines = [json.loads(line) for line in err.splitlines()]
    assert len(lines) == 3
    assert "adv-secret" not in err and CLICK_SECRET not in err and "not-a-configured" not in err
    assert "token=***" in lines[0]["message"] and "click_id=x" in lines[0]["message"]
    assert "bad ***" in lines[2]["exception"]
