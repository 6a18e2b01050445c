"""The TOML configuration, parsed once into a frozen, validated `Settings`.

`load(path)` is the only way in. Every problem raises `ConfigError` naming the
key (`campaigns[0].click_window`), so a bad config stops start-up instead of
showing up later as a half-working pipeline. Nothing here reads the environment.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import tomllib
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from yarl import URL

from pipeline import macros
from pipeline.callbacks import ssrf

ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
EVENT_RE = re.compile(r"^[a-z0-9_]{1,64}$")
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}

DESTINATION_MACROS = frozenset(
    {"click_id", "campaign_id", "pub", "sub1", "sub2", "sub3", "sub4", "sub5"}
)
CALLBACK_MACROS = DESTINATION_MACROS | {
    "conversion_id",
    "event",
    "txn_id",
    "revenue",
    "payout",
    "currency",
    "ctit",
    "click_ts",
    "conversion_ts",
}


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending key."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"config error at {key}: {problem}")
        self.key = key


def parse_duration(value: Any, key: str) -> float:
    """`"30s"` -> 30.0 seconds. Units: ms s m h d."""
    match = _DURATION_RE.match(value) if isinstance(value, str) else None
    if not match:
        raise ConfigError(key, f"{value!r} is not a duration like '30s', '2m', '7d'")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@dataclass(frozen=True)
class EventRule:
    revenue: Decimal | None = None
    payout: Decimal | None = None
    payout_share: Decimal | None = None


@dataclass(frozen=True)
class Campaign:
    id: str
    advertiser: str
    destination: str
    click_window: float
    currency: str
    events: dict[str, EventRule]


@dataclass(frozen=True)
class Advertiser:
    id: str
    token: str
    allowed_ips: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


@dataclass(frozen=True)
class Publisher:
    id: str
    postback_url: str
    events: frozenset[str]
    method: str = "GET"
    signing_secret: str = ""


@dataclass(frozen=True)
class Settings:
    secrets: tuple[str, ...]
    reporting_currency: str
    kafka_bootstrap: str
    kafka_partitions: int
    topic_prefix: str
    kafka_embedded_listen: str
    kafka_session_timeout: float
    clickhouse_url: str
    clickhouse_database: str
    clickhouse_embedded_listen: str
    clickhouse_embedded_path: str
    ingress_listen: str
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    spool_dir: str
    unknown_click_grace: float
    callback_timeout: float
    retry_schedule: tuple[float, ...]
    allow_private_networks: bool
    fx: dict[str, Decimal]
    advertisers: dict[str, Advertiser]
    publishers: dict[str, Publisher]
    campaigns: dict[str, Campaign]
    worker_store: str = "memory://"
    worker_web_listen: str = "127.0.0.1:6066"
    worker_data_dir: str = ".data/worker"
    state_margin: float = 3600.0
    tick_interval: float = 1.0
    sink_batch_rows: int = 50000
    sink_batch_seconds: float = 1.0
    callbacks_metrics_listen: str = ""  # host:port of the callbacks /metrics; "": none

    @cached_property
    def advertisers_by_token(self) -> dict[str, Advertiser]:
        return {a.token: a for a in self.advertisers.values()}

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def with_endpoints(self, kafka: str | None = None, clickhouse: str | None = None) -> Settings:
        """A copy with resolved endpoints (how `pipeline dev` hands out the embedded stack)."""
        return replace(
            self,
            kafka_bootstrap=kafka or self.kafka_bootstrap,
            clickhouse_url=clickhouse or self.clickhouse_url,
        )


_SECTIONS = {
    "pipeline": {"secrets", "reporting_currency"},
    "kafka": {
        "bootstrap_servers",
        "partitions",
        "topic_prefix",
        "embedded_listen",
        "session_timeout",
    },
    "clickhouse": {"url", "database", "embedded_listen", "embedded_path"},
    "ingress": {"listen", "trusted_proxies", "spool_dir"},
    "attribution": {"unknown_click_grace"},
    "callbacks": {"timeout", "retry_schedule", "allow_private_networks", "metrics_listen"},
    "sink": {"batch_rows", "batch_seconds"},
    "worker": {"store", "web_listen", "data_dir", "state_margin", "tick_interval"},
    "fx": None,  # free-form currency table
    "advertisers": {"id", "token", "allowed_ips"},
    "publishers": {"id", "postback_url", "events", "method", "signing_secret"},
    "campaigns": {"id", "advertiser", "destination", "click_window", "currency", "events"},
}


class _Reader:
    """Typed access to one TOML table that remembers the key path for errors."""

    def __init__(self, table: dict, path: str, allowed: set[str] | None):
        if not isinstance(table, dict):
            raise ConfigError(path, "must be a table")
        self.table, self.path = table, path
        if allowed is not None:
            for key in table:
                if key not in allowed:
                    raise ConfigError(self.key(key), "unknown key")

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: type | tuple, default: Any = ..., required: bool = False):
        if name not in self.table:
            if required or default is ...:
                raise ConfigError(self.key(name), "is required")
            return default
        value = self.table[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(self.key(name), f"expected {_kind_name(kind)}, got {value!r}")
        return value

    def ident(self, name: str) -> str:
        value = self.get(name, str, required=True)
        if not ID_RE.match(value):
            raise ConfigError(self.key(name), f"{value!r} is not an ID ([A-Za-z0-9_.-]{{1,64}})")
        return value

    def money(self, name: str) -> Decimal | None:
        if name not in self.table:
            return None
        raw = self.table[name]
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ConfigError(self.key(name), f"expected a number, got {raw!r}")
        try:
            # via str so 0.2 stays 0.2, not 0.200000000000000011...
            value = Decimal(str(raw))
        except InvalidOperation:
            raise ConfigError(self.key(name), f"{raw!r} is not a number") from None
        if not value.is_finite() or value < 0:
            raise ConfigError(self.key(name), f"{raw!r} must be a number >= 0")
        return value

    def networks(self, name: str, default: list) -> tuple:
        out = []
        for i, cidr in enumerate(self.get(name, list, default)):
            try:
                out.append(ipaddress.ip_network(cidr, strict=False))
            except (TypeError, ValueError):
                raise ConfigError(f"{self.key(name)}[{i}]", f"{cidr!r} is not a CIDR") from None
        return tuple(out)


def _kind_name(kind) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    names.update({list: "a list", dict: "a table"})
    return names.get(kind, str(kind))


def _listen(value: str, key: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(key, f"{value!r} is not host:port")
    return value


def load(path: str | Path) -> Settings:
    """Parse and validate the config file; raises ConfigError naming the key."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"not valid TOML: {e}") from None
    return parse(data)


def parse(data: dict) -> Settings:
    """Validate an already-decoded TOML document (what `load` does after reading)."""
    _Reader(data, "", set(_SECTIONS))  # rejects unknown top-level sections
    sec = {
        name: _Reader(data.get(name, {}), name, keys)
        for name, keys in _SECTIONS.items()
        if name not in ("advertisers", "publishers", "campaigns")
    }

    secrets = sec["pipeline"].get("secrets", list, required=True)
    if not secrets or not all(isinstance(s, str) and len(s) >= 8 for s in secrets):
        raise ConfigError("pipeline.secrets", "needs at least one string of 8+ characters")
    reporting = sec["pipeline"].get("reporting_currency", str, "USD")
    if not CURRENCY_RE.match(reporting):
        raise ConfigError("pipeline.reporting_currency", f"{reporting!r} is not an ISO 4217 code")

    fx: dict[str, Decimal] = {}
    for code in sec["fx"].table:
        if not CURRENCY_RE.match(code):
            raise ConfigError(f"fx.{code}", "is not an ISO 4217 code")
        rate = sec["fx"].money(code)
        if not rate:
            raise ConfigError(f"fx.{code}", "must be a rate > 0")
        fx[code] = rate
    fx[reporting] = Decimal(1)

    kafka, ch = sec["kafka"], sec["clickhouse"]
    partitions = kafka.get("partitions", int, 8)
    if partitions < 1:
        raise ConfigError("kafka.partitions", "must be >= 1")

    advertisers = _unique(data, "advertisers", _advertiser)
    publishers = _unique(data, "publishers", _publisher)
    campaigns = _unique(data, "campaigns", lambda r: _campaign(r, advertisers, fx))
    tokens: dict[str, str] = {}
    for adv in advertisers.values():
        if adv.token in tokens:
            raise ConfigError(f"advertisers.{adv.id}.token", f"same token as {tokens[adv.token]}")
        tokens[adv.token] = adv.id

    cb = sec["callbacks"]
    schedule = cb.get("retry_schedule", list, ["5s", "30s", "2m", "10m", "1h", "6h"])
    sink, worker = sec["sink"], sec["worker"]
    store = worker.get("store", str, "memory://")
    if store.split("://")[0] not in ("memory", "rocksdb", "rocksdict"):
        raise ConfigError(
            "worker.store", f"{store!r} must be memory://, rocksdb:// or rocksdict://"
        )
    return Settings(
        secrets=tuple(secrets),
        reporting_currency=reporting,
        kafka_bootstrap=kafka.get("bootstrap_servers", str, "embedded"),
        kafka_partitions=partitions,
        topic_prefix=kafka.get("topic_prefix", str, "attribution."),
        kafka_embedded_listen=_listen(
            kafka.get("embedded_listen", str, "127.0.0.1:9092"), "kafka.embedded_listen"
        ),
        kafka_session_timeout=parse_duration(
            kafka.get("session_timeout", str, "6s"), "kafka.session_timeout"
        ),
        clickhouse_url=ch.get("url", str, "embedded"),
        clickhouse_database=_db_name(ch.get("database", str, "attribution")),
        clickhouse_embedded_listen=_listen(
            ch.get("embedded_listen", str, "127.0.0.1:8123"), "clickhouse.embedded_listen"
        ),
        clickhouse_embedded_path=ch.get("embedded_path", str, ".data/clickhouse"),
        ingress_listen=_listen(
            sec["ingress"].get("listen", str, "127.0.0.1:8080"), "ingress.listen"
        ),
        trusted_proxies=sec["ingress"].networks("trusted_proxies", []),
        spool_dir=sec["ingress"].get("spool_dir", str, ".data/spool"),
        unknown_click_grace=parse_duration(
            sec["attribution"].get("unknown_click_grace", str, "30s"),
            "attribution.unknown_click_grace",
        ),
        callback_timeout=parse_duration(cb.get("timeout", str, "10s"), "callbacks.timeout"),
        retry_schedule=tuple(
            parse_duration(v, f"callbacks.retry_schedule[{i}]") for i, v in enumerate(schedule)
        ),
        allow_private_networks=cb.get("allow_private_networks", bool, False),
        callbacks_metrics_listen=(
            _listen(cb.get("metrics_listen", str), "callbacks.metrics_listen")
            if "metrics_listen" in cb.table
            else ""
        ),
        fx=fx,
        advertisers=advertisers,
        publishers=publishers,
        campaigns=campaigns,
        worker_store=store,
        worker_web_listen=_listen(
            worker.get("web_listen", str, "127.0.0.1:6066"), "worker.web_listen"
        ),
        worker_data_dir=worker.get("data_dir", str, ".data/worker"),
        state_margin=parse_duration(worker.get("state_margin", str, "1h"), "worker.state_margin"),
        tick_interval=parse_duration(
            worker.get("tick_interval", str, "1s"), "worker.tick_interval"
        ),
        sink_batch_rows=sink.get("batch_rows", int, 50000),
        sink_batch_seconds=parse_duration(
            sink.get("batch_seconds", str, "1s"), "sink.batch_seconds"
        ),
    )


def _db_name(name: str) -> str:
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", name):
        raise ConfigError("clickhouse.database", f"{name!r} is not a plain identifier")
    return name


def _unique(data: dict, section: str, build) -> dict:
    items = data.get(section, [])
    if not isinstance(items, list):
        raise ConfigError(section, "must be an array of tables ([[" + section + "]])")
    out: dict = {}
    for i, table in enumerate(items):
        reader = _Reader(table, f"{section}[{i}]", _SECTIONS[section])
        item = build(reader)
        if item.id in out:
            raise ConfigError(f"{section}[{i}].id", f"duplicate id {item.id!r}")
        out[item.id] = item
    return out


def _advertiser(r: _Reader) -> Advertiser:
    token = r.get("token", str, required=True)
    if len(token) < 8:
        raise ConfigError(r.key("token"), "must be at least 8 characters")
    return Advertiser(r.ident("id"), token, r.networks("allowed_ips", ["0.0.0.0/0", "::/0"]))


def _publisher(r: _Reader) -> Publisher:
    url = r.get("postback_url", str, required=True)
    try:
        macros.check_url_template(url, CALLBACK_MACROS)
        _check_callback_authority(url)
    except ValueError as e:
        raise ConfigError(r.key("postback_url"), str(e)) from None
    events = r.get("events", list, ["install"])
    for i, event in enumerate(events):
        if not isinstance(event, str) or not EVENT_RE.match(event):
            raise ConfigError(f"{r.key('events')}[{i}]", f"{event!r} is not an event name")
    method = r.get("method", str, "GET").upper()
    if method not in ("GET", "POST"):
        raise ConfigError(r.key("method"), f"{method!r} must be GET or POST")
    secret = r.get("signing_secret", str, "")
    if secret and not whsec_key(secret):
        raise ConfigError(r.key("signing_secret"), "must look like 'whsec_<base64 key>'")
    return Publisher(r.ident("id"), url, frozenset(events), method, secret)


def _check_callback_authority(url: str) -> None:
    """Macros are filled from click data: keeping them out of the scheme, host and port
    means a click can never choose where a callback goes. The URL is read with yarl,
    the parser that sends it, so a URL that passes here is one it can send."""
    parts = urlsplit(url)
    if "{" in parts.scheme + parts.netloc:
        raise ValueError("macros are not allowed in the scheme, host or port")
    try:
        host = URL(macros.fill(url, {}), encoded=True).host or ""
    except ValueError as e:
        raise ValueError(f"{url!r}: {e}") from None
    if ssrf.noncanonical_ipv4(host):
        raise ValueError(f"{url!r}: {host!r} is not an IPv4 address in canonical form")


def whsec_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret `whsec_<base64>`; b"" when malformed.

    Padding is optional, as in the specification's reference libraries.
    """
    if not secret.startswith("whsec_"):
        return b""
    encoded = secret.removeprefix("whsec_")
    try:
        return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        return b""


def _campaign(r: _Reader, advertisers: dict, fx: dict) -> Campaign:
    cid = r.ident("id")
    advertiser = r.get("advertiser", str, required=True)
    if advertiser not in advertisers:
        raise ConfigError(r.key("advertiser"), f"unknown advertiser {advertiser!r}")
    destination = r.get("destination", str, required=True)
    try:
        macros.check_url_template(destination, DESTINATION_MACROS)
    except ValueError as e:
        raise ConfigError(r.key("destination"), str(e)) from None
    currency = r.get("currency", str, "USD")
    if currency not in fx:
        raise ConfigError(
            r.key("currency"), f"{currency!r} is neither the reporting currency nor in [fx]"
        )
    events_table = _Reader(r.get("events", dict, {}), r.key("events"), None)
    events = {}
    for name, rule in events_table.table.items():
        key = events_table.key(name)
        if not EVENT_RE.match(name):
            raise ConfigError(key, "is not an event name ([a-z0-9_]{1,64})")
        er = _Reader(rule, key, {"revenue", "payout", "payout_share"})
        payout, share = er.money("payout"), er.money("payout_share")
        if payout is not None and share is not None:
            raise ConfigError(key, "set payout or payout_share, not both")
        if share is not None and share > 1:
            raise ConfigError(er.key("payout_share"), "must be between 0 and 1")
        events[name] = EventRule(er.money("revenue"), payout, share)
    window = parse_duration(r.get("click_window", str, "7d"), r.key("click_window"))
    return Campaign(cid, advertiser, destination, window, currency, events)
