"""Our partitioner is Kafka's default one, bit for bit (the worker's tables depend on it)."""

import random

from aiokafka.partitioner import DefaultPartitioner, murmur2

from pipeline import partitioner
from pipeline.core import clickid


def test_murmur2_and_partition_match_aiokafka_on_random_keys():
    rng = random.Random(7)
    default = DefaultPartitioner()
    for _ in range(20000):
        key = rng.randbytes(rng.randrange(0, 300))
        assert partitioner.murmur2(key) == murmur2(key), key
        count = rng.randrange(1, 200)
        everything = list(range(count))
        assert partitioner.partition(key, count) == default(key, everything, everything), key


def test_click_ids_land_where_aiokafka_puts_them():
    default = DefaultPartitioner()
    for i in range(5000):
        key = clickid.issue(["bench-secret"], now_ms=1_795_637_791_064 + i).encode()
        for count in (1, 3, 8, 12, 64):
            everything = list(range(count))
            assert partitioner.partition(key, count) == default(key, everything, everything)


def test_known_values_of_the_java_client():
    # org.apache.kafka.common.utils.Utils.murmur2 test vectors (as signed 32-bit ints)
    vectors = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    for key, signed in vectors.items():
        assert partitioner.murmur2(key) == signed & 0xFFFFFFFF, key
