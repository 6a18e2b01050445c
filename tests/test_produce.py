"""How the ingress's produce requests settle their batches, against scripted
broker answers: delivered, failed with the producer's error, or retried (after
the backoff, with fresh metadata when the error says it is stale) until the
producer's request timeout is over."""

import asyncio
from types import SimpleNamespace

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    RequestTimedOutError,
)

from pipeline.adapters.aiokafka import Batch, Produce

TOPIC = "t"


class Broker:
    """Stands in for the client: answers each request with the next scripted answer,
    an error code per partition, or raises it; records what was sent."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[list[int]] = []
        self.metadata_updates = 0

    async def send(self, node_id, request):
        self.requests.append([part for _, parts in request._topics for part, _ in parts])
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        parts = [(part, code, 0, -1, 0) for part, code in answer.items()]
        return SimpleNamespace(topics=[(TOPIC, parts)])

    def force_metadata_update(self):
        self.metadata_updates += 1
        done = asyncio.get_running_loop().create_future()
        done.set_result(True)
        return done


@pytest.fixture
async def produce():
    """Makes a Produce on an unstarted producer, its client replaced by a Broker;
    stops the producers afterwards."""
    producers = []

    def make(broker: Broker, timeout_ms: int = 5000) -> Produce:
        producer = AIOKafkaProducer(
            bootstrap_servers="127.0.0.1:1",
            acks="all",
            request_timeout_ms=timeout_ms,
            retry_backoff_ms=1,
        )
        producers.append(producer)
        p = Produce(producer)
        p.client, p.producer = broker, producer
        return p

    yield make
    for producer in producers:
        await producer.stop()


def batches(p: Produce, *parts: int) -> dict:
    """One batch of one record per partition, each with a request waiting on it."""
    out = {}
    for part in parts:
        batch = Batch(p.producer.create_batch())
        batch.builder.append(timestamp=None, key=b"k", value=b"v")
        batch.waiters.append(asyncio.get_running_loop().create_future())
        out[(TOPIC, part)] = batch
    return out


def waiter(batch: Batch) -> asyncio.Future:
    return batch.waiters[0]


async def test_acknowledged_partitions_are_delivered_the_others_fail_with_their_error(produce):
    p = produce(Broker({0: 0, 1: MessageSizeTooLargeError.errno}))
    sent = batches(p, 0, 1)
    assert await p.send(1, sent) == {}
    assert waiter(sent[(TOPIC, 0)]).result() is None
    assert isinstance(waiter(sent[(TOPIC, 1)]).exception(), MessageSizeTooLargeError)


async def test_a_retriable_error_hands_the_batch_back_after_a_metadata_refresh(produce):
    broker = Broker({0: 0, 1: NotLeaderForPartitionError.errno})
    p = produce(broker)
    sent = batches(p, 0, 1)
    retry = await p.send(1, sent)
    assert list(retry) == [(TOPIC, 1)]
    assert not waiter(sent[(TOPIC, 1)]).done()  # still waiting for the retry
    assert waiter(sent[(TOPIC, 0)]).result() is None
    assert broker.metadata_updates == 1


async def test_a_lost_request_is_retried_until_the_request_timeout_is_over(produce):
    broker = Broker(RequestTimedOutError())
    p = produce(broker, timeout_ms=50)
    sent = batches(p, 0)
    first = waiter(sent[(TOPIC, 0)])
    while not first.done():  # as the publisher does: send again what is handed back
        sent = await p.send(1, sent)
    assert isinstance(first.exception(), RequestTimedOutError)
    assert len(broker.requests) > 1
    assert broker.metadata_updates == 0  # a timeout says nothing about the metadata


async def test_a_partition_the_broker_did_not_answer_for_fails(produce):
    p = produce(Broker({0: 0}))
    sent = batches(p, 0, 1)
    assert await p.send(1, sent) == {}
    assert isinstance(waiter(sent[(TOPIC, 1)]).exception(), KafkaError)


async def test_a_cancelled_request_is_left_alone(produce):
    p = produce(Broker({0: 0}))
    sent = batches(p, 0)
    waiter(sent[(TOPIC, 0)]).cancel()  # its HTTP request went away
    assert await p.send(1, sent) == {}
