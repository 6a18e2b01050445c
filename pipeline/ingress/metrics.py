"""Prometheus metrics of the ingress, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class IngressMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pipeline_ingress_requests",
            "Requests by route and outcome (accepted, redirect or a rejection code)",
            ("route", "outcome"),
            registry=self.registry,
        )
        latency = Histogram(
            "pipeline_ingress_publish_seconds",
            "Time from publish to Kafka acknowledgement (acks=all)",
            ("topic",),
            buckets=PUBLISH_BUCKETS,
            registry=self.registry,
        )
        self.spooled = Counter(
            "pipeline_ingress_spooled",
            "Postback log records written to the local spool because Kafka refused them",
            registry=self.registry,
        )
        # the series every request touches, bound once (and shown from the start)
        self.accepted = self.requests.labels("postback", "accepted")
        self.redirected = self.requests.labels("click", "redirect")
        self.publish_latency = {
            t: latency.labels(t) for t in ("clicks", "postbacks", "skan-reports")
        }
