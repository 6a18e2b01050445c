"""The reference Apache Kafka broker of tests/apache_kafka.py: starts, serves, stops, dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

try:  # tests/ as a package, or (no tests/__init__.py) on sys.path by pytest's rootdir insertion
    from tests.apache_kafka import ApacheKafka
except ImportError:
    from apache_kafka import ApacheKafka

UNAVAILABLE = ApacheKafka.unavailable_reason()

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE)),
]

TOPIC = "apache-kafka-smoke"
PARTITIONS = 4
GROUP = "apache-kafka-smoke-group"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): it is gone as a process all the same
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture
def broker(tmp_path: Path):
    kafka = ApacheKafka(tmp_path / "kafka")
    t0 = time.monotonic()
    kafka.start()
    print(f"Apache Kafka {kafka.version} up in {time.monotonic() - t0:.1f}s")
    yield kafka
    kafka.stop()


async def _consume(consumer: AIOKafkaConsumer, n: int, timeout_ms: int = 30_000) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_ms / 1000
    while len(got) < n and time.monotonic() < deadline:
        batches = await consumer.getmany(timeout_ms=1000)
        for records in batches.values():
            got.extend(records)
    return got


async def test_produce_consume_commit_and_stop(broker: ApacheKafka):
    # aiokafka retries forever against a dead broker: fail with the broker's log instead
    try:
        async with asyncio.timeout(120):
            await _produce_consume_commit(broker)
    except TimeoutError:
        alive = broker.proc is not None and broker.proc.poll() is None
        pytest.fail(f"timed out (broker {'alive' if alive else 'dead'});\n" + broker.log_excerpt())
    except Exception as e:
        e.add_note(broker.log_excerpt())
        raise

    pid = broker.pid
    assert pid is not None and _alive(pid)
    broker.stop()
    assert not _alive(pid)
    assert broker.proc is None
    broker.stop()  # idempotent


async def _produce_consume_commit(broker: ApacheKafka) -> None:
    bootstrap = broker.bootstrap_servers
    assert bootstrap == f"127.0.0.1:{broker.port}"

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(TOPIC, num_partitions=PARTITIONS, replication_factor=1)]
        )
        # CreateTopics returns once the controller committed the topic: the broker's
        # metadata cache catches up a moment later
        for _ in range(100):
            described = await admin.describe_topics([TOPIC])
            if described[0]["error_code"] == 0 and described[0]["partitions"]:
                break
            await asyncio.sleep(0.1)
        assert len(described[0]["partitions"]) == PARTITIONS, described
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(20):
            md = await producer.send_and_wait(
                TOPIC, value=f"v{i}".encode(), key=f"k{i}".encode(), partition=i % PARTITIONS
            )
            assert md.partition == i % PARTITIONS
    finally:
        await producer.stop()

    tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]

    consumer = AIOKafkaConsumer(
        TOPIC,
        bootstrap_servers=bootstrap,
        group_id=GROUP,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        got = await _consume(consumer, 20)
        assert sorted(r.value for r in got) == sorted(f"v{i}".encode() for i in range(20))
        await consumer.commit()
    finally:
        await consumer.stop()

    # a new consumer of the same group sees the committed offsets and only what came after
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(TOPIC, value=b"late", partition=2)
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        TOPIC,
        bootstrap_servers=bootstrap,
        group_id=GROUP,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        for tp in tps:
            assert await consumer.committed(tp) == 5
        got = await _consume(consumer, 1)
        assert [(r.partition, r.offset, r.value) for r in got] == [(2, 5, b"late")]
    finally:
        await consumer.stop()


def test_broker_dies_with_the_process_that_started_it(tmp_path: Path):
    """PR_SET_PDEATHSIG: a SIGKILLed test process leaves no broker behind."""
    repo = Path(__file__).resolve().parent.parent
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(repo / "tests")!r})
        from apache_kafka import ApacheKafka
        kafka = ApacheKafka(Path({str(tmp_path / "kafka")!r}))
        kafka.start()
        print(kafka.pid, flush=True)
        time.sleep(600)
        """
    )
    child_err = tmp_path / "child.stderr"
    with open(child_err, "w") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=err, text=True, cwd=repo
        )
    try:
        line = child.stdout.readline()
        assert line.strip().isdigit(), (
            f"the child did not start a broker: {line!r}\n{child_err.read_text()[-3000:]}"
        )
        java_pid = int(line)
        assert _alive(java_pid)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(java_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(java_pid), "the broker outlived the process that started it"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
