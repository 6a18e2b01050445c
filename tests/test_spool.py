"""The ingress's spool (pipeline.ingress.spool) on a real file."""

import asyncio

import pytest

from pipeline.ingress.spool import CHUNK, Spool


async def test_drain_republishes_everything_in_file_order_then_truncates(tmp_path):
    spool = Spool(tmp_path / "ingress.spool")
    records = [(b"k%d" % i, b"v%d" % i) for i in range(2 * CHUNK + 7)]  # three chunks
    for key, value in records:
        spool.append(key, value)
    published = []

    async def publish(key, value):
        published.append((key, value))  # the order the publisher appends them in
        await asyncio.sleep(0)

    assert await spool.drain(publish) == len(records)
    assert published == records
    assert not spool.pending() and spool.path.read_bytes() == b""


async def test_a_failed_drain_keeps_the_whole_file(tmp_path):
    spool = Spool(tmp_path / "ingress.spool")
    for i in range(CHUNK + 1):
        spool.append(b"k%d" % i, b"v")
    before = spool.path.read_bytes()

    async def publish(key, value):
        if key == b"k%d" % CHUNK:  # the second chunk's record: Kafka refuses it
            raise ConnectionError("kafka went away")

    with pytest.raises(ConnectionError):
        await spool.drain(publish)
    assert spool.path.read_bytes() == before  # tried again later, whole


async def test_a_failed_drain_returns_once_its_chunk_has_settled(tmp_path):
    spool = Spool(tmp_path / "ingress.spool")
    spool.append(b"fails", b"v")
    spool.append(b"slow", b"v")
    settled = []

    async def publish(key, value):
        if key == b"fails":
            raise ConnectionError("kafka went away")
        await asyncio.sleep(0.05)  # still in flight when the other one fails
        settled.append(key)

    with pytest.raises(ConnectionError):
        await spool.drain(publish)
    assert settled == [b"slow"]  # not left running past the spool's lock
