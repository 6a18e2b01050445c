"""Prometheus metrics of the ingress, in a registry of its own (one per app).

Every request updates a counter and a latency histogram. prometheus_client's
metric objects take a lock per update and walk the buckets in Python (about
1 µs a request, a few percent of a postback); the ingress updates them only
from its event loop's thread, so here they are plain numbers (a bisect picks
the bucket) behind a custom collector. The collector exposes exactly the
families, samples and labels prometheus_client's `Counter` and `Histogram`
would (a test compares the text), and `generate_latest` still writes them.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import INF, floatToGoString

PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, INF)


class Count:
    """One counter series; `inc()` only from the event loop's thread."""

    __slots__ = ("value", "created")

    def __init__(self):
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class Counts:
    """A labelled counter: `labels(*values)` is the series of those label values."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]):
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.series: dict[tuple[str, ...], Count] = {}

    def labels(self, *values: str) -> Count:
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = Count()
        return series

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in self.series.items():
            family.add_metric(values, series.value, created=series.created)
        return family


class Latency:
    """One histogram series; `observe()` only from the event loop's thread."""

    __slots__ = ("counts", "sum", "created")

    def __init__(self):
        self.counts = [0.0] * len(PUBLISH_BUCKETS)  # per bucket, not cumulative
        self.sum = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        # the first bucket whose bound is >= seconds, as prometheus_client picks it
        self.counts[bisect_left(PUBLISH_BUCKETS, seconds)] += 1
        self.sum += seconds


class IngressMetrics:
    def __init__(self):
        self.requests = Counts(
            "pipeline_ingress_requests",
            "Requests by route and outcome (accepted, redirect or a rejection code)",
            ("route", "outcome"),
        )
        self.spooled = Count()
        # the series every request touches, bound once (and shown from the start)
        self.accepted = self.requests.labels("postback", "accepted")
        self.redirected = self.requests.labels("click", "redirect")
        self.publish_latency = {t: Latency() for t in ("clicks", "postbacks", "skan-reports")}
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """The families, in the order and shape prometheus_client's metrics had."""
        yield self.requests.family()
        latency = HistogramMetricFamily(
            "pipeline_ingress_publish_seconds",
            "Time from publish to Kafka acknowledgement (acks=all)",
            labels=("topic",),
        )
        for topic, series in self.publish_latency.items():
            buckets, total = [], 0.0
            for bound, count in zip(PUBLISH_BUCKETS, series.counts, strict=True):
                total += count
                buckets.append((floatToGoString(bound), total))
            latency.add_metric((topic,), buckets, series.sum)
            latency.samples.append(
                latency.samples[-1]._replace(
                    name="pipeline_ingress_publish_seconds_created", value=series.created
                )
            )
        yield latency
        spooled = CounterMetricFamily(
            "pipeline_ingress_spooled",
            "Postback log records written to the local spool because Kafka refused them",
        )
        spooled.add_metric((), self.spooled.value, created=self.spooled.created)
        yield spooled
