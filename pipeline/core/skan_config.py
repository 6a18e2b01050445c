"""The `[skan]` table of the configuration, parsed once into a frozen `SkanConfig`.

```toml
[skan]
ad_network_ids = ["example123.skadnetwork"]
[[skan.sources]]
id = "12"            # v4 source-identifier prefix (2-4 digits) or v2/v3 campaign-id (1-100)
campaign = "c1"
pub = "net1"
[skan.apps."123456789"]
currency = "USD"     # optional, default the reporting currency
fine = [ { values = "0", event = "install" },
         { values = "1-63", event = "purchase", revenue = 4.99 } ]
coarse = { low = "install", medium = "purchase", high = { event = "purchase", revenue = 4.99 } }
```

Two more keys, both optional:

- `dedup_retention = "60d"`: how long a verified postback's (transaction-id,
  postback-sequence-index) is remembered; a copy arriving later counts again.
  Apple sends a transaction's last postback at most about 41 days after the first
  launch (third conversion window: days 8-35, then up to 144 hours of delay), so
  the default covers a whole transaction with three weeks to spare.
- `test_keys = { p256 = "<base64 DER>", p192 = "<base64 DER>" }`: FOR TESTS AND
  DEMOS ONLY. Keys accepted *in addition to* Apple's (p192 verifies versions 1.0
  and 2.0, p256 the later ones): a public key (SubjectPublicKeyInfo), or a private
  key (PKCS#8), which also lets `pipeline simulate` sign postbacks. Whoever holds
  a test private key can forge postbacks this config believes: never in production.

Fine `values` are one value or a range of 0-63 ("5", "1-63"; an integer is one
value), and no two rules of an app may share a value; values without a rule are
allowed. A coarse value names an event, or is a table `{ event, revenue }` like a
fine rule; revenue defaults to 0 and is in the app's currency.

A missing or empty `[skan]` table turns SKAdNetwork off: no ad network ID is
ours, so every postback is `wrong_ad_network`. Every problem raises `ConfigError`
naming the key (`skan.apps."123".fine[1].values`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from pipeline.core.skan_signature import APPLE_KEYS, KEY_CURVES, test_key

AD_NETWORK_ID_RE = re.compile(r"^[a-z0-9]+\.skadnetwork$")
EVENT_RE = re.compile(r"^[a-z0-9_]{1,64}$")
SOURCE_ID_RE = re.compile(r"^[0-9]{1,4}$")
APP_ID_RE = re.compile(r"^[0-9]{1,20}$")
COARSE_VALUES = ("low", "medium", "high")
FINE_VALUES = 64  # a fine conversion value is 6 bits: 0-63
# an amount must fit the decimal(18, 6) of the schemas: 12 digits before the point
AMOUNT_LIMIT = Decimal(10) ** 12

DEDUP_RETENTION = "60d"

_RANGE_RE = re.compile(r"^([0-9]{1,2})(?:-([0-9]{1,2}))?$")


@dataclass(frozen=True)
class SkanSource:
    id: str
    campaign: str
    pub: str


@dataclass(frozen=True)
class ValueRule:
    """What a conversion value decodes to: an event and its revenue in the app's currency."""

    event: str
    revenue: Decimal = Decimal(0)


@dataclass(frozen=True)
class SkanApp:
    id: str
    currency: str
    rate: Decimal  # units of reporting currency per unit of `currency`
    fine: tuple[ValueRule | None, ...]  # indexed by the fine value, 0-63; None: no rule
    coarse: dict[str, ValueRule]  # "low" | "medium" | "high" -> rule


@dataclass(frozen=True)
class SkanConfig:
    ad_network_ids: frozenset[str] = frozenset()  # lowercase
    sources: dict[str, SkanSource] = field(default_factory=dict)
    apps: dict[str, SkanApp] = field(default_factory=dict)
    reporting_currency: str = "USD"
    # key family -> the base64 DER public keys a signature may hold under (Apple's first)
    keys: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {f: (k,) for f, k in APPLE_KEYS.items()}
    )
    test_signers: dict[str, str] = field(default_factory=dict)  # family -> PKCS#8 base64
    dedup_retention_s: float = 60 * 86400


def parse_skan(
    table: dict | None, campaigns: dict, publishers: dict, fx: dict, reporting_currency: str
) -> SkanConfig:
    """Validate the `[skan]` table (None or {} when absent).

    `campaigns` and `publishers` are keyed by ID (only membership is read); `fx`
    maps a currency to units of reporting currency, as `Settings.fx`.
    """
    if table is None:
        table = {}
    allowed = {"ad_network_ids", "sources", "apps", "test_keys", "dedup_retention"}
    _check_table(table, "skan", allowed)
    rates = {**fx, reporting_currency: Decimal(1)}
    keys, signers = _test_keys(table.get("test_keys", {}))
    return SkanConfig(
        ad_network_ids=_ad_network_ids(table.get("ad_network_ids", [])),
        sources=_sources(table.get("sources", []), campaigns, publishers),
        apps=_apps(table.get("apps", {}), rates, reporting_currency),
        reporting_currency=reporting_currency,
        keys=keys,
        test_signers=signers,
        dedup_retention_s=_retention(table.get("dedup_retention", DEDUP_RETENTION)),
    )


def _error(key: str, problem: str) -> Exception:
    # imported here, not at the top: config.py calls parse_skan, and either module
    # may be imported first without a cycle
    from pipeline.config import ConfigError

    return ConfigError(key, problem)


def _check_table(table, key: str, allowed: set[str]) -> None:
    if not isinstance(table, dict):
        raise _error(key, "must be a table")
    for name in table:
        if name not in allowed:
            raise _error(f"{key}.{name}", "unknown key")


def _retention(value) -> float:
    from pipeline.config.reader import parse_duration  # as ConfigError, see _error

    seconds = parse_duration(value, "skan.dedup_retention")
    if seconds <= 0:
        raise _error("skan.dedup_retention", "must be longer than 0s")
    return seconds


def _test_keys(table) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """(Apple's keys with the test keys after them, the test private keys)."""
    _check_table(table, "skan.test_keys", set(KEY_CURVES))
    keys = {family: (key,) for family, key in APPLE_KEYS.items()}
    signers = {}
    for family, value in table.items():
        try:
            public, private = test_key(value, family)
        except ValueError as e:
            raise _error(f"skan.test_keys.{family}", str(e)) from None
        keys[family] += (public,)
        if private:
            signers[family] = value
    return keys, signers


def _ad_network_ids(ids) -> frozenset[str]:
    if not isinstance(ids, list):
        raise _error("skan.ad_network_ids", "must be a list of strings")
    seen: set[str] = set()
    for i, value in enumerate(ids):
        key = f"skan.ad_network_ids[{i}]"
        if not isinstance(value, str) or not AD_NETWORK_ID_RE.match(value):
            raise _error(key, f"{value!r} does not look like '<lowercase alnum>.skadnetwork'")
        if value in seen:
            raise _error(key, f"duplicate ad network ID {value!r}")
        seen.add(value)
    return frozenset(seen)


def _sources(items, campaigns: dict, publishers: dict) -> dict[str, SkanSource]:
    if not isinstance(items, list):
        raise _error("skan.sources", "must be an array of tables ([[skan.sources]])")
    out: dict[str, SkanSource] = {}
    for i, item in enumerate(items):
        key = f"skan.sources[{i}]"
        _check_table(item, key, {"id", "campaign", "pub"})
        sid = item.get("id")
        # a string, so that "012" (a v4 prefix) and 12 (a campaign-id) stay apart
        if not isinstance(sid, str) or not SOURCE_ID_RE.match(sid):
            raise _error(f"{key}.id", f"{sid!r} is not a string of 1-4 digits")
        if sid == "0":
            raise _error(f"{key}.id", "matches no postback: a 1-digit id is a campaign-id 1-100")
        if sid in out:
            raise _error(f"{key}.id", f"duplicate source id {sid!r}")
        campaign, pub = item.get("campaign"), item.get("pub")
        if not isinstance(campaign, str) or campaign not in campaigns:
            raise _error(f"{key}.campaign", f"unknown campaign {campaign!r}")
        if not isinstance(pub, str) or pub not in publishers:
            raise _error(f"{key}.pub", f"unknown publisher {pub!r}")
        out[sid] = SkanSource(sid, campaign, pub)
    return out


def _apps(apps, rates: dict, reporting_currency: str) -> dict[str, SkanApp]:
    if not isinstance(apps, dict):
        raise _error("skan.apps", 'must be a table of apps ([skan.apps."<app-id>"])')
    out: dict[str, SkanApp] = {}
    for app_id, table in apps.items():
        key = f"skan.apps.{json.dumps(app_id)}"
        if not APP_ID_RE.match(app_id):
            raise _error(key, "an app ID is the App Store ID: digits only")
        _check_table(table, key, {"currency", "fine", "coarse"})
        currency = table.get("currency", reporting_currency)
        if not isinstance(currency, str) or currency not in rates:
            raise _error(
                f"{key}.currency", f"{currency!r} is neither the reporting currency nor in [fx]"
            )
        rate = rates[currency]
        out[app_id] = SkanApp(
            id=app_id,
            currency=currency,
            rate=rate,
            fine=_fine(table.get("fine", []), f"{key}.fine", rate),
            coarse=_coarse(table.get("coarse", {}), f"{key}.coarse", rate),
        )
    return out


def _fine(items, key: str, rate: Decimal) -> tuple[ValueRule | None, ...]:
    if not isinstance(items, list):
        raise _error(key, "must be a list of { values, event, revenue } tables")
    table: list[ValueRule | None] = [None] * FINE_VALUES
    owner: list[int | None] = [None] * FINE_VALUES
    for i, item in enumerate(items):
        item_key = f"{key}[{i}]"
        _check_table(item, item_key, {"values", "event", "revenue"})
        low, high = _values(item.get("values"), f"{item_key}.values")
        rule = _rule(item, item_key, rate)
        for value in range(low, high + 1):
            if owner[value] is not None:
                raise _error(
                    f"{item_key}.values", f"overlaps {key}[{owner[value]}] at value {value}"
                )
            table[value], owner[value] = rule, i
    return tuple(table)


def _values(raw, key: str) -> tuple[int, int]:
    """`"5"` -> (5, 5), `"1-63"` -> (1, 63); an integer is one value."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    match = _RANGE_RE.match(raw) if isinstance(raw, str) else None
    if not match:
        raise _error(key, f"{raw!r} is not a value or a range like '0' or '1-63'")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) is not None else low
    if high >= FINE_VALUES:
        raise _error(key, f"{raw!r} is outside 0-63")
    if low > high:
        raise _error(key, f"{raw!r} is an empty range")
    return low, high


def _coarse(table, key: str, rate: Decimal) -> dict[str, ValueRule]:
    _check_table(table, key, set(COARSE_VALUES))
    out = {}
    for name, raw in table.items():
        value_key = f"{key}.{name}"
        if isinstance(raw, str):
            out[name] = ValueRule(_event(raw, value_key))
            continue
        _check_table(raw, value_key, {"event", "revenue"})
        out[name] = _rule(raw, value_key, rate)
    return out


def _rule(item: dict, key: str, rate: Decimal) -> ValueRule:
    event = _event(item.get("event"), f"{key}.event")
    return ValueRule(event, _revenue(item, f"{key}.revenue", rate))


def _event(event, key: str) -> str:
    if not isinstance(event, str) or not EVENT_RE.match(event):
        raise _error(key, f"{event!r} is not an event name ([a-z0-9_]{{1,64}})")
    return event


def _revenue(item: dict, key: str, rate: Decimal) -> Decimal:
    raw = item.get("revenue", 0)
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise _error(key, f"expected a number, got {raw!r}")
    try:
        # via str so 4.99 stays 4.99, not 4.9900000000000002131...
        value = Decimal(str(raw))
    except InvalidOperation:
        raise _error(key, f"{raw!r} is not a number") from None
    if not value.is_finite() or value < 0:
        raise _error(key, f"{raw!r} must be a number >= 0")
    if value >= AMOUNT_LIMIT or value * rate >= AMOUNT_LIMIT:
        raise _error(key, f"{raw!r} is too large for an amount (12 digits before the point)")
    return value
