"""The frozen settings every component is given: what the config file says, checked."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from decimal import Decimal
from functools import cached_property
from urllib.parse import urlsplit

from pipeline.core.secrets import Secrets, TokenIndex
from pipeline.core.skan_config import SkanConfig


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
    skan_forward_url: str = ""  # where its apps' verified SKAdNetwork postbacks go; "": none
    signing_secret: str = ""  # "whsec_<base64>": SKAdNetwork forwards are signed


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
    skan: SkanConfig = field(default_factory=SkanConfig)
    worker_store: str = "memory://"
    worker_web_listen: str = "127.0.0.1:6066"
    worker_data_dir: str = ".data/worker"
    state_margin: float = 3600.0
    tick_interval: float = 1.0
    sink_batch_rows: int = 50000
    sink_batch_seconds: float = 1.0
    callbacks_metrics_listen: str = ""  # host:port of the callbacks /metrics; "": none
    kafka_replication_factor: int = 1
    kafka_min_insync_replicas: int = 1

    @cached_property
    def advertisers_by_token(self) -> dict[str, Advertiser]:
        return {a.token: a for a in self.advertisers.values()}

    @cached_property
    def token_index(self) -> TokenIndex:
        """Advertisers by token, looked up in constant time (core.secrets)."""
        return TokenIndex(self.advertisers_by_token)

    @cached_property
    def redaction(self) -> Secrets:
        """Every secret value of this config, hidden wherever it would be stored or logged."""
        values = [*self.secrets, *(a.token for a in self.advertisers.values())]
        values += [p.signing_secret for p in self.publishers.values() if p.signing_secret]
        values += [p.signing_secret.removeprefix("whsec_") for p in self.publishers.values()]
        password = urlsplit(self.clickhouse_url).password if "://" in self.clickhouse_url else None
        if password:
            values.append(password)
        return Secrets(values)

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def resolved(self) -> Settings:
        """A copy whose "embedded" endpoints are the addresses `pipeline dev` serves them on
        (`kafka.embedded_listen`, `clickhouse.embedded_listen`)."""
        return self.with_endpoints(
            kafka=self.kafka_embedded_listen if self.kafka_bootstrap == "embedded" else None,
            clickhouse=(
                f"http://{self.clickhouse_embedded_listen}"
                if self.clickhouse_url == "embedded"
                else None
            ),
        )

    def with_endpoints(self, kafka: str | None = None, clickhouse: str | None = None) -> Settings:
        """A copy with resolved endpoints (how `pipeline dev` hands out the embedded stack)."""
        return replace(
            self,
            kafka_bootstrap=kafka or self.kafka_bootstrap,
            clickhouse_url=clickhouse or self.clickhouse_url,
        )
