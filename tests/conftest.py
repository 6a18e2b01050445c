"""Shared fixtures. Tests that need infrastructure say so with a marker:
`kafka` (a broker, started here), `clickhouse` (the embedded engine), `e2e`
(pipeline processes). Each run uses its own topics and database."""

import os
import re
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from pipeline import config
from pipeline.dev.kafka import EmbeddedKafka, die_with_parent, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "deploy" / "example.toml"


@pytest.fixture(scope="session")
def tansu(tmp_path_factory):
    """A Tansu broker for the whole run (memory storage); tests isolate by topic prefix.

    PIPELINE_TEST_KAFKA=host:port runs the suite against that broker instead.
    """
    external = os.environ.get("PIPELINE_TEST_KAFKA")
    if external:
        yield external
        return
    broker = EmbeddedKafka(f"127.0.0.1:{free_port()}", tmp_path_factory.mktemp("tansu") / "log")
    broker.start()
    yield broker.bootstrap_servers
    broker.stop()


@pytest.fixture(scope="session")
def clickhouse_url(tmp_path_factory):
    """The embedded ClickHouse (chDB behind the HTTP interface) as its own process."""
    port = free_port()
    path = tmp_path_factory.mktemp("chdb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.dev.clickhouse",
            "--path",
            str(path),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        preexec_fn=die_with_parent,
    )
    try:
        wait_for_port("127.0.0.1", port, 60, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(20)


def config_text(bootstrap: str, clickhouse: str, extra: str = "", **sections) -> str:
    """The example config with its own topic prefix and database, pointed at the test stack.

    `sections` adds or replaces whole tables: `sink='batch_rows = 500'`; `extra` is
    appended (more [[advertisers]] or [[campaigns]]).
    """
    run = uuid.uuid4().hex[:10]
    text = EXAMPLE_CONFIG.read_text()
    replacements = {
        'bootstrap_servers = "embedded"': f'bootstrap_servers = "{bootstrap}"',
        'url = "embedded"': f'url = "{clickhouse}"',
        'topic_prefix = "attribution."': f'topic_prefix = "t{run}."',
        'database = "attribution"': f'database = "t{run}"',
        # one broker: one copy of each record
        "partitions = 8": "partitions = 4\nreplication_factor = 1",
    }
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    sections = {"sink": 'batch_rows = 500\nbatch_seconds = "200ms"', **sections}
    for name, body in sections.items():
        text = re.sub(rf"^\[{name}\]\n(?:[^\[\n].*\n|\n)*", "", text, flags=re.M)
        text = f"[{name}]\n{body}\n\n" + text
    return text + "\n" + extra


def without_skan(text: str) -> str:
    """A config text without its [skan] tables ([skan], [[skan.sources]], [skan.apps.*]):
    for tests that replace the publishers or campaigns the example's SKAN sources name."""
    return re.sub(r"^\[\[?skan[.\]].*?(?=^\[(?!\[?skan[.\]])|\Z)", "", text, flags=re.M | re.S)


def make_settings(bootstrap: str, clickhouse: str, extra: str = "", **sections) -> config.Settings:
    doc = tomllib.loads(config_text(bootstrap, clickhouse, extra, **sections))
    return config.parse(doc)


def write_config(tmp_path: Path, bootstrap: str, clickhouse: str, extra: str = "", **sections):
    """A config file for a subprocess, and the same settings parsed."""
    path = tmp_path / "pipeline.toml"
    path.write_text(config_text(bootstrap, clickhouse, extra, **sections))
    return path, config.load(path)


def wait_until(predicate, timeout: float = 30, interval: float = 0.2, message: str = ""):
    """Poll `predicate` until it returns a truthy value; fail with `message` after `timeout`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s: {message} (last: {last!r})")


@pytest.fixture(scope="session")
def apache_kafka_broker(tmp_path_factory):
    """Apache Kafka in KRaft mode from Maven Central jars (the `ApacheKafka`, which a test
    may restart: its log stays on disk); skips where java or mvn is missing."""
    from .apache_kafka import ApacheKafka

    reason = ApacheKafka.unavailable_reason()
    if reason:
        pytest.skip(f"Apache Kafka reference broker unavailable: {reason}")
    broker = ApacheKafka(tmp_path_factory.mktemp("apache-kafka"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def apache_kafka(apache_kafka_broker):
    """The bootstrap address of the reference broker."""
    apache_kafka_broker.start()  # running, also after a test restarted it
    return apache_kafka_broker.bootstrap_servers


@pytest.fixture(params=["tansu", "apache-kafka"])
def broker(request):
    """Each test using this runs on the embedded Tansu and on the Apache Kafka reference."""
    return request.getfixturevalue("tansu" if request.param == "tansu" else "apache_kafka")
