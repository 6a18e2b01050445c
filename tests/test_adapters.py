"""The private parts of aiokafka and Faust that pipeline/adapters relies on, pinned.

Two kinds of pin. An attribute the adapters read or set must still exist with the
meaning they give it (checked on real, unstarted objects, or in the source of the
class that sets it). A method the adapters copy or override must still have the
source they were derived from: its hash is recorded here, so an upgrade that
changes it fails this test instead of silently changing what the worker does.
When a hash fails, read the new upstream method, re-derive the adapter from it,
and record the new hash.

No broker: nothing here is started.
"""

from __future__ import annotations

import hashlib
import inspect

import aiokafka
import aiokafka.producer.sender as sender
import faust
import faust.tables.recovery as recovery
import faust.transport.consumer as faust_consumer
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.consumer.fetcher import Fetcher
from aiokafka.producer.message_accumulator import BatchBuilder
from faust.transport.drivers import aiokafka as driver

from pipeline.adapters import aiokafka as aiokafka_adapter
from pipeline.adapters import faust as faust_adapter

# the versions the pins below were read from (requirements.lock pins the same)
VERSIONS = {"aiokafka": "0.14.0", "faust-streaming": "0.15.3"}

# upstream methods the adapters copy or override -> sha256 of their source (first 16)
SOURCES = {
    # BatchConsumer._drain_messages is this method with batch topics handled per list
    faust_consumer.Consumer._drain_messages: "44a2500309e83c63",
    # Recovery.on_recovery_completed: the same steps in a safe order
    recovery.Recovery.on_recovery_completed: "6ef567acf072e46d",
    # Recovery._build_highwaters: the same table, highwaters from kafka.log_end_offsets
    recovery.Recovery._build_highwaters: "91b4cc0d3724ae7b",
    # ConsumerThread._fetch_records narrows what super() drains
    driver.AIOKafkaConsumerThread._fetch_records: "39a2c6c79fc1455a",
    # ConsumerThread._create_worker_consumer: super()'s consumer, fetch wait shortened
    driver.AIOKafkaConsumerThread._create_worker_consumer: "c2701bfc3e6f6cad",
    # Produce.request and Produce.settle do what the sender's handler does
    sender.SendProduceReqHandler.create_request: "807639a952058369",
    sender.SendProduceReqHandler.handle_response: "850323cc8f77abc3",
}


def digest(function) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def sets(cls: type, attribute: str) -> bool:
    """Does `cls` (or a base) assign `self.<attribute>` in its source?"""
    for klass in cls.__mro__:
        if klass is object:
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if f"self.{attribute} =" in source or f"self.{attribute}:" in source:
            return True
    return False


def test_the_installed_versions_are_those_pinned():
    from importlib.metadata import version

    assert {name: version(name) for name in VERSIONS} == VERSIONS


@pytest.mark.parametrize("function", list(SOURCES), ids=lambda f: f.__qualname__)
def test_copied_and_overridden_methods_are_unchanged_upstream(function):
    assert digest(function) == SOURCES[function], (
        f"{function.__module__}.{function.__qualname__} changed upstream: re-derive "
        "the adapter that copies or overrides it, then record the new hash"
    )


async def test_producer_attributes_produce_reads():
    producer = AIOKafkaProducer(
        bootstrap_servers="127.0.0.1:9", acks="all", request_timeout_ms=12345, retry_backoff_ms=250
    )
    try:
        # Produce.__init__: the producer's own acks, timeout and retry backoff
        assert producer._sender._acks == -1
        assert producer._request_timeout_ms == 12345
        assert producer.client._retry_backoff == 0.25  # seconds
        # is_idempotent / is_closed
        assert aiokafka_adapter.is_idempotent(producer) is False
        assert aiokafka_adapter.is_closed(producer) is False
        # Produce.request builds each batch's bytes as the sender does
        builder = producer.create_batch()
        assert isinstance(builder, BatchBuilder) and callable(builder._build)
        builder.append(timestamp=None, key=b"k", value=b"v")
        assert isinstance(builder._build(), bytes | bytearray | memoryview)
    finally:
        await producer.stop()
    assert aiokafka_adapter.is_closed(producer) is True
    idempotent = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9", enable_idempotence=True)
    assert aiokafka_adapter.is_idempotent(idempotent) is True
    await idempotent.stop()


async def test_consumer_fetch_settings_the_fetcher_reads():
    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9", fetch_max_wait_ms=500)
    try:
        assert consumer._fetch_max_wait_ms == 500
        aiokafka_adapter.set_fetch_max_wait_ms(consumer, 25)
        assert consumer._fetch_max_wait_ms == 25
        # set_fetch_min_bytes writes the Fetcher's copy, which it reads per request
        assert sets(Fetcher, "_fetch_min_bytes")
        assert "self._fetch_min_bytes" in inspect.getsource(Fetcher._get_actions_per_node)
        assert sets(AIOKafkaConsumer, "_fetcher")
    finally:
        await consumer.stop()


FAUST_CONSUMER_ATTRIBUTES = [
    "_read_offset",
    "_committed_offset",
    "_acked",
    "_acked_index",
    "_n_acked",
    "_waiting_for_ack",
    "_commit_every",
    "_buffered_partitions",
]
FAUST_CONSUMER_METHODS = ["_to_message", "_wait_next_records", "_add_gap", "perform_seek"]


@pytest.mark.parametrize("attribute", FAUST_CONSUMER_ATTRIBUTES)
def test_faust_consumer_state_batch_consumer_uses(attribute):
    assert sets(faust_consumer.Consumer, attribute), attribute


@pytest.mark.parametrize("method", FAUST_CONSUMER_METHODS)
def test_faust_consumer_methods_batch_consumer_calls(method):
    assert callable(getattr(faust_consumer.Consumer, method, None)), method


def test_faust_internals_the_other_adapters_use():
    # handling(): the current event a table read or write goes by
    from faust.streams import _current_event

    assert hasattr(_current_event, "set") and hasattr(_current_event, "reset")
    # ConsumerThread.start: the thread's start-up events it sets itself
    for attribute in ("_thread_started", "_thread_running"):
        assert sets(driver.AIOKafkaConsumerThread, attribute) or sets(
            driver.ThreadDelegateConsumer, attribute
        )
    # Recovery.on_recovery_completed calls these
    for method in ("_highwater_logtable", "_set_recovery_ended", "_wait", "_is_changelog_tp"):
        assert callable(getattr(recovery.Recovery, method, None)), method
    assert sets(faust.tables.TableManager, "_recovery")
    assert sets(faust.App, "_fetcher") or hasattr(faust.App, "_fetcher")
    # aiokafka_producer(): Faust's producer keeps aiokafka's as _producer
    assert sets(driver.Producer, "_producer")
    # table_bytes(): the memory store's dict, RocksDB's per-partition databases
    from faust.stores.memory import Store as MemoryStore

    assert sets(MemoryStore, "data")
    from faust.stores import rocksdb

    assert callable(getattr(rocksdb.Store, "_db_for_partition", None))


def test_adapters_override_what_they_say():
    assert (
        faust_adapter.BatchConsumer._drain_messages is not faust_consumer.Consumer._drain_messages
    )
    assert issubclass(faust_adapter.BatchConsumer, driver.Consumer)
    assert issubclass(faust_adapter.ConsumerThread, driver.AIOKafkaConsumerThread)
    assert issubclass(faust_adapter.Recovery, recovery.Recovery)
    assert aiokafka.__version__ == VERSIONS["aiokafka"]
