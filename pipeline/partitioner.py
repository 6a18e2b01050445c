"""Kafka's default partitioner for keyed records, bit for bit: murmur2 of the key.

Clicks and postbacks are keyed by click_id, and the worker's tables are
co-partitioned by that key: a record must land on exactly the partition that
Kafka's default partitioner (the Java client's, and aiokafka's
`DefaultPartitioner`) picks, or a postback would miss its click. This is the
same function as aiokafka's pure-Python `murmur2`, reading the key four bytes
at a time with `struct` instead of byte by byte (about 3x faster); a test
checks equality on many random keys. Pure functions.
"""

from __future__ import annotations

import struct

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
# little-endian 32-bit words of keys up to 255 bytes (click IDs are 36)
_WORDS = tuple(struct.Struct(f"<{n}I") for n in range(64))


def murmur2(data: bytes) -> int:
    """MurmurHash2 (32-bit, Kafka's seed) of `data`, as an unsigned int."""
    length = len(data)
    h = _SEED ^ length
    n = length >> 2
    words = _WORDS[n].unpack_from(data) if n < 64 else struct.unpack_from(f"<{n}I", data)
    for k in words:
        k = (k * _M) & _MASK
        k ^= k >> 24
        # (a mod 2^32) ^ (b mod 2^32) == (a ^ b) mod 2^32: one mask for both products
        h = ((h * _M) ^ (k * _M)) & _MASK
    tail = length & 3
    if tail:
        i = length - tail
        if tail == 3:
            h ^= data[i + 2] << 16
        if tail >= 2:
            h ^= data[i + 1] << 8
        h = ((h ^ data[i]) * _M) & _MASK
    h = ((h ^ (h >> 13)) * _M) & _MASK
    return h ^ (h >> 15)


def partition(key: bytes, count: int) -> int:
    """The partition (of `count`, numbered 0..count-1) Kafka's default partitioner
    gives `key`: toPositive(murmur2(key)) % count."""
    return (murmur2(key) & 0x7FFFFFFF) % count
