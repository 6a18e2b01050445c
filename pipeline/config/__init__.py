"""The TOML configuration, parsed once into a frozen, validated `Settings`.

`load(path)` is the only way in. Every problem raises `ConfigError` naming the
key (`campaigns[0].click_window`), so a bad config stops start-up instead of
showing up later as a half-working pipeline. Secrets and tokens may be given
as `env:NAME`: read from the environment here, at start-up, and nowhere else.
"""

from __future__ import annotations

import base64
import binascii
import re
import tomllib
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

from yarl import URL

from pipeline.config.reader import (
    CALLBACK_MACROS,
    CURRENCY_RE,
    DESTINATION_MACROS,
    EVENT_RE,
    ID_RE,
    ConfigError,
    Reader,
    env_value,
    listen,
    parse_duration,
)
from pipeline.config.settings import Advertiser, Campaign, EventRule, Publisher, Settings
from pipeline.core import macros, ssrf
from pipeline.core.skan_config import parse_skan

__all__ = [
    "CALLBACK_MACROS",
    "CURRENCY_RE",
    "DESTINATION_MACROS",
    "EVENT_RE",
    "ID_RE",
    "Advertiser",
    "Campaign",
    "ConfigError",
    "EventRule",
    "Publisher",
    "Settings",
    "load",
    "parse",
    "parse_duration",
    "whsec_key",
]

_SECTIONS = {
    "pipeline": {"secrets", "reporting_currency"},
    "kafka": {
        "bootstrap_servers",
        "partitions",
        "topic_prefix",
        "embedded_listen",
        "session_timeout",
        "replication_factor",
        "min_insync_replicas",
    },
    "clickhouse": {"url", "database", "embedded_listen", "embedded_path"},
    "ingress": {"listen", "trusted_proxies", "spool_dir"},
    "attribution": {"unknown_click_grace"},
    "callbacks": {"timeout", "retry_schedule", "allow_private_networks", "metrics_listen"},
    "sink": {"batch_rows", "batch_seconds"},
    "worker": {"store", "web_listen", "data_dir", "state_margin", "tick_interval"},
    "fx": None,  # free-form currency table
    "skan": None,  # validated by core.skan_config.parse_skan
    "advertisers": {"id", "token", "allowed_ips", "skan_forward_url", "signing_secret"},
    "publishers": {"id", "postback_url", "events", "method", "signing_secret"},
    "campaigns": {"id", "advertiser", "destination", "click_window", "currency", "events"},
}


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
    Reader(data, "", set(_SECTIONS))  # rejects unknown top-level sections
    sec = {
        name: Reader(data.get(name, {}), name, keys)
        for name, keys in _SECTIONS.items()
        if name not in ("advertisers", "publishers", "campaigns")
    }

    secrets = [
        env_value(s, f"pipeline.secrets[{i}]")
        for i, s in enumerate(sec["pipeline"].get("secrets", list, required=True))
    ]
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
    bootstrap = kafka.get("bootstrap_servers", str, "embedded")
    # one broker in development; three copies of every record on a real cluster
    replication = kafka.get("replication_factor", int, 1 if bootstrap == "embedded" else 3)
    if replication < 1:
        raise ConfigError("kafka.replication_factor", "must be >= 1")
    min_insync = kafka.get("min_insync_replicas", int, min(2, replication))
    if not 1 <= min_insync <= replication:
        raise ConfigError(
            "kafka.min_insync_replicas", f"must be between 1 and replication_factor ({replication})"
        )

    advertisers = _unique(data, "advertisers", _advertiser)
    publishers = _unique(data, "publishers", _publisher)
    campaigns = _unique(data, "campaigns", lambda r: _campaign(r, advertisers, fx))
    tokens: dict[str, str] = {}
    for adv in advertisers.values():
        if adv.token in tokens:
            raise ConfigError(f"advertisers.{adv.id}.token", f"same token as {tokens[adv.token]}")
        tokens[adv.token] = adv.id

    skan = parse_skan(data.get("skan"), campaigns, publishers, fx, reporting)

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
        kafka_bootstrap=bootstrap,
        kafka_replication_factor=replication,
        kafka_min_insync_replicas=min_insync,
        kafka_partitions=partitions,
        topic_prefix=kafka.get("topic_prefix", str, "attribution."),
        kafka_embedded_listen=listen(
            kafka.get("embedded_listen", str, "127.0.0.1:9092"), "kafka.embedded_listen"
        ),
        kafka_session_timeout=parse_duration(
            kafka.get("session_timeout", str, "6s"), "kafka.session_timeout"
        ),
        clickhouse_url=ch.secret("url", "embedded"),
        clickhouse_database=_db_name(ch.get("database", str, "attribution")),
        clickhouse_embedded_listen=listen(
            ch.get("embedded_listen", str, "127.0.0.1:8123"), "clickhouse.embedded_listen"
        ),
        clickhouse_embedded_path=ch.get("embedded_path", str, ".data/clickhouse"),
        ingress_listen=listen(
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
            listen(cb.get("metrics_listen", str), "callbacks.metrics_listen")
            if "metrics_listen" in cb.table
            else ""
        ),
        fx=fx,
        advertisers=advertisers,
        publishers=publishers,
        campaigns=campaigns,
        skan=skan,
        worker_store=store,
        worker_web_listen=listen(
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
        reader = Reader(table, f"{section}[{i}]", _SECTIONS[section])
        item = build(reader)
        if item.id in out:
            raise ConfigError(f"{section}[{i}].id", f"duplicate id {item.id!r}")
        out[item.id] = item
    return out


def _advertiser(r: Reader) -> Advertiser:
    token = r.secret("token", required=True)
    if len(token) < 8:
        raise ConfigError(r.key("token"), "must be at least 8 characters")
    forward = r.get("skan_forward_url", str, "")
    if forward:
        try:  # sent as it is: no macros
            macros.check_url_template(forward, ())
            _check_callback_authority(forward)
        except ValueError as e:
            raise ConfigError(r.key("skan_forward_url"), str(e)) from None
    secret = r.secret("signing_secret", "")
    if secret and not whsec_key(secret):
        raise ConfigError(r.key("signing_secret"), "must look like 'whsec_<base64 key>'")
    return Advertiser(
        r.ident("id"),
        token,
        r.networks("allowed_ips", ["0.0.0.0/0", "::/0"]),
        skan_forward_url=forward,
        signing_secret=secret,
    )


def _publisher(r: Reader) -> Publisher:
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
    secret = r.secret("signing_secret", "")
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


def _campaign(r: Reader, advertisers: dict, fx: dict) -> Campaign:
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
    events_table = Reader(r.get("events", dict, {}), r.key("events"), None)
    events = {}
    for name, rule in events_table.table.items():
        key = events_table.key(name)
        if not EVENT_RE.match(name):
            raise ConfigError(key, "is not an event name ([a-z0-9_]{1,64})")
        er = Reader(rule, key, {"revenue", "payout", "payout_share"})
        payout, share = er.money("payout"), er.money("payout_share")
        if payout is not None and share is not None:
            raise ConfigError(key, "set payout or payout_share, not both")
        if share is not None and share > 1:
            raise ConfigError(er.key("payout_share"), "must be between 0 and 1")
        events[name] = EventRule(er.money("revenue"), payout, share)
    window = parse_duration(r.get("click_window", str, "7d"), r.key("click_window"))
    return Campaign(cid, advertiser, destination, window, currency, events)
