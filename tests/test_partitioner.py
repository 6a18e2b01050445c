"""Records go where Kafka's default partitioner puts them (the worker's tables depend on it)."""

import os

from aiokafka.partitioner import DefaultPartitioner

from pipeline import kafka


def test_partition_matches_aiokafkas_default_partitioner():
    default = DefaultPartitioner()
    for count in (1, 4, 8, 13):
        everything = list(range(count))
        for _ in range(500):
            key = os.urandom(36)
            assert kafka.partition(key, count) == default(key, everything, everything), key
