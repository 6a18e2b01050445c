"""Attribution rules: plain functions from a click, a postback and the click's
dedup state to one conversion. No Kafka, no Faust: the worker calls these.

The steps of PRODUCT.md, in order: wrong_advertiser, unknown_event,
outside_window, duplicate (install once per click; txn_id once per advertiser,
checked by the worker's second stage), attributed with amounts.
Money is `Decimal` with 6 places, rounded half-even, never a binary float.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

from pipeline.config import Campaign, Settings

PLACES = Decimal("0.000001")
ZERO = Decimal(0).quantize(PLACES)
SUBS = ("sub1", "sub2", "sub3", "sub4", "sub5")
CLICK_FIELDS = ("campaign_id", "pub", *SUBS, "ts_ms")


def money(value: Decimal) -> Decimal:
    return value.quantize(PLACES, rounding=ROUND_HALF_EVEN)


def state_retention_s(settings: Settings, margin_s: float = 3600) -> float:
    """How long click state is kept: the longest click window plus a margin."""
    longest = max((c.click_window for c in settings.campaigns.values()), default=0)
    return longest + settings.unknown_click_grace + margin_s


def conversion(
    postback: dict, click: dict | None, status: str, detail: str = "", currency: str | None = None
) -> dict:
    """A conversion row for `postback`, with zero amounts (callers fill attributed ones)."""
    click = click or {}
    click_ts = click.get("ts_ms", postback.get("click_ts_ms"))
    return {
        "conversion_id": postback["postback_id"],
        "postback_id": postback["postback_id"],
        "click_id": postback["click_id"],
        "campaign_id": click.get("campaign_id", ""),
        "advertiser": postback["advertiser"],
        "pub": click.get("pub", ""),
        **{s: click.get(s, "") for s in SUBS},
        "event": postback["event"],
        "txn_id": postback["txn_id"],
        "status": status,
        "detail": detail,
        "revenue": money(postback["revenue"]) if postback["revenue"] is not None else ZERO,
        "payout": ZERO,
        "currency": currency or postback["currency"] or "",
        "revenue_reporting": ZERO,
        "payout_reporting": ZERO,
        "click_ts_ms": click_ts,
        "conversion_ts_ms": postback["received_at_ms"],
        "ctit_seconds": None,
    }


def decide(settings: Settings, click: dict, postback: dict, install_owner: str | None) -> dict:
    """The conversion for an accepted postback whose click is known.

    `install_owner` is the conversion_id that already counted this click's
    install, if any. A replay of that very postback is attributed again with the
    same conversion_id (idempotent), any other install is a duplicate.
    """
    campaign = settings.campaigns.get(click["campaign_id"])
    if campaign is None:
        return conversion(
            postback,
            click,
            "unknown_event",
            f"campaign {click['campaign_id']} is no longer configured",
            postback["currency"] or settings.reporting_currency,
        )
    currency = postback["currency"] or campaign.currency
    if campaign.advertiser != postback["advertiser"]:
        return conversion(
            postback,
            click,
            "wrong_advertiser",
            f"campaign {campaign.id} belongs to {campaign.advertiser}",
            currency,
        )
    rule = campaign.events.get(postback["event"])
    if rule is None:
        return conversion(
            postback,
            click,
            "unknown_event",
            f"campaign {campaign.id} has no event {postback['event']}",
            currency,
        )
    age_s = (postback["received_at_ms"] - click["ts_ms"]) / 1000
    if age_s > campaign.click_window:
        return conversion(
            postback,
            click,
            "outside_window",
            f"{age_s:.0f}s after the click; window {campaign.click_window:.0f}s",
            currency,
        )
    if postback["event"] == "install" and install_owner not in (None, postback["postback_id"]):
        return conversion(
            postback, click, "duplicate", f"install already counted as {install_owner}", currency
        )
    return attributed(settings, campaign, rule, click, postback, currency)


def attributed(
    settings: Settings, campaign: Campaign, rule, click: dict, postback: dict, currency: str
) -> dict:
    """An attributed conversion with revenue, payout and reporting amounts."""
    if currency not in settings.fx or campaign.currency not in settings.fx:
        return conversion(
            postback, click, "unknown_currency", f"no [fx] rate for {currency}", currency
        )
    # campaign defaults are in the campaign's currency; carry them into the row's
    to_row = settings.fx[campaign.currency] / settings.fx[currency]
    if postback["revenue"] is not None:
        revenue = money(postback["revenue"])
    else:
        revenue = money((rule.revenue or Decimal(0)) * to_row)
    if rule.payout_share is not None:
        payout = money(revenue * rule.payout_share)
    else:
        payout = money((rule.payout or Decimal(0)) * to_row)
    row = conversion(postback, click, "attributed", "", currency)
    rate = settings.fx[currency]
    row.update(
        revenue=revenue,
        payout=payout,
        revenue_reporting=money(revenue * rate),
        payout_reporting=money(payout * rate),
    )
    if postback["event"] == "install":
        row["ctit_seconds"] = max(0, (postback["received_at_ms"] - click["ts_ms"]) // 1000)
    return row


def too_old(settings: Settings, postback: dict, retention_s: float) -> dict | None:
    """outside_window for a click older than any state kept (the click ID tells its age)."""
    age_s = (postback["received_at_ms"] - postback["click_ts_ms"]) / 1000
    if age_s <= retention_s:
        return None
    return conversion(
        postback,
        None,
        "outside_window",
        f"click is {age_s:.0f}s old, older than any click window",
        postback["currency"] or settings.reporting_currency,
    )


def unknown_click(settings: Settings, postback: dict) -> dict:
    return conversion(
        postback,
        None,
        "unknown_click",
        f"no click arrived within {settings.unknown_click_grace:g}s",
        postback["currency"] or settings.reporting_currency,
    )


def txn_duplicate(row: dict, owner: str) -> dict:
    """Turn an attributed conversion into a txn_id duplicate of `owner`."""
    return {
        **row,
        "status": "duplicate",
        "detail": f"txn_id {row['txn_id']} already counted as {owner}",
        "payout": ZERO,
        "revenue_reporting": ZERO,
        "payout_reporting": ZERO,
        "ctit_seconds": None,
    }
