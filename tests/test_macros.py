from urllib.parse import quote

import pytest

from pipeline.config import CALLBACK_MACROS, DESTINATION_MACROS
from pipeline.core import macros


def test_fill_percent_encodes_and_empties_missing():
    url = macros.fill(
        "https://x.example/a?c={click_id}&s={sub1}&t={txn_id}",
        {"click_id": "ab-_9", "sub1": "a b&c=d/é"},
    )
    assert url == "https://x.example/a?c=ab-_9&s=a%20b%26c%3Dd%2F%C3%A9&t="


def test_fill_encodes_exactly_what_quote_encodes():
    for value in ["AZaz09_.~-", "a+b", "1.5%", "x\ny", "~user", "ü", "", 2, None]:
        expected = "" if value is None else quote(str(value), safe="")
        assert macros.fill("https://x.example/?v={v}", {"v": value}).endswith("?v=" + expected)


def test_fill_keeps_literal_text():
    assert macros.fill("https://x.example/p/{pub}/x", {"pub": "n1"}) == "https://x.example/p/n1/x"


@pytest.mark.parametrize(
    "template,message",
    [
        ("https://x.example/{nope}", "unknown macro {nope}"),
        ("https://x.example/{click_id", "malformed"),
        ("https://x.example/{click_id!r}", "malformed"),
        ("https://x.example/{click_id:>10}", "malformed"),
        ("ftp://x.example/{click_id}", "http"),
        ("/relative/{click_id}", "http"),
    ],
)
def test_bad_templates(template, message):
    with pytest.raises(ValueError, match=message):
        macros.check_url_template(template, CALLBACK_MACROS)


def test_destination_macros_exclude_conversion_fields():
    with pytest.raises(ValueError, match="unknown macro {payout}"):
        macros.check_url_template("https://x.example/{payout}", DESTINATION_MACROS)
    macros.check_url_template(
        "https://x.example/?{click_id}{campaign_id}{pub}{sub1}{sub2}{sub3}{sub4}{sub5}",
        DESTINATION_MACROS,
    )
