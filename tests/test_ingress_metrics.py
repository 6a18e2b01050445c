"""The ingress's own metric tallies expose what prometheus_client's metrics would."""

import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from pipeline.ingress.metrics import PUBLISH_BUCKETS, IngressMetrics


def reference() -> tuple[CollectorRegistry, Counter, Histogram, Counter]:
    """The metrics as prometheus_client objects (what the ingress used before)."""
    registry = CollectorRegistry()
    requests = Counter(
        "pipeline_ingress_requests",
        "Requests by route and outcome (accepted, redirect or a rejection code)",
        ["route", "outcome"],
        registry=registry,
    )
    latency = Histogram(
        "pipeline_ingress_publish_seconds",
        "Time from publish to Kafka acknowledgement (acks=all)",
        ["topic"],
        buckets=PUBLISH_BUCKETS,
        registry=registry,
    )
    spooled = Counter(
        "pipeline_ingress_spooled",
        "Postback log records written to the local spool because Kafka refused them",
        registry=registry,
    )
    requests.labels("postback", "accepted")
    requests.labels("click", "redirect")
    for topic in ("clicks", "postbacks", "skan-reports"):
        latency.labels(topic)
    return registry, requests, latency, spooled


def text(registry: CollectorRegistry) -> str:
    # creation times differ by microseconds: compare that they are there, not their value
    return re.sub(
        r"^(\w+_created(\{.*\})?) \S+$", r"\1 T", generate_latest(registry).decode(), flags=re.M
    )


def test_same_exposition_as_prometheus_client():
    ours = IngressMetrics()
    registry, requests, latency, spooled = reference()
    assert text(ours.registry) == text(registry)  # nothing counted yet

    seconds = [0.0, 0.0004, 0.001, 0.0010001, 0.003, 0.0025, 0.7, 5, 5.5, 1e9, 0.01]
    for s in seconds:
        ours.publish_latency["postbacks"].observe(s)
        latency.labels("postbacks").observe(s)
    ours.publish_latency["clicks"].observe(0.002)
    latency.labels("clicks").observe(0.002)
    for route, outcome in [
        ("postback", "accepted"),
        ("postback", "bad_token"),
        ("click", "redirect"),
        ("postback", "bad_token"),
        ("click", "unknown_campaign"),
    ]:
        ours.requests.labels(route, outcome).inc()
        requests.labels(route, outcome).inc()
    ours.accepted.inc()
    requests.labels("postback", "accepted").inc()
    ours.redirected.inc()
    requests.labels("click", "redirect").inc()
    ours.spooled.inc()
    spooled.inc()

    assert text(ours.registry) == text(registry)
    assert 'pipeline_ingress_publish_seconds_bucket{le="0.001",topic="postbacks"} 3.0' in text(
        ours.registry
    )
