"""Which partition a keyed record goes to: the Java client's rule (murmur2), computed faster.

aiokafka's ``DefaultPartitioner`` implements the same hash byte by byte in Python; this one
reads the key four bytes at a time, about twice as fast, and gives the same partitions
(tests/unit/test_shared_partitioning.py compares them). Used wherever a service places keyed
records in record batches itself: ingestion's validated events (labels are keyed by
transaction id, so nearly every label needs a fresh hash), serving's prediction records and
the features service's re-keyed facts (which must meet the labels ingestion placed).
"""

from __future__ import annotations

import random
import struct

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
_WORDS = [struct.Struct(f"<{n}I") for n in range(64)]


def murmur2(data: bytes) -> int:
    """MurmurHash2 as org.apache.kafka.common.utils.Utils.murmur2 (seed 0x9747b28c)."""
    length = len(data)
    h = 0x9747B28C ^ length
    words = length >> 2
    unpack = _WORDS[words].unpack_from if words < 64 else struct.Struct(f"<{words}I").unpack_from
    for word in unpack(data):
        k = (word * _M) & _MASK
        k ^= k >> 24
        h = ((h * _M) & _MASK) ^ ((k * _M) & _MASK)
    tail = length & 3
    if tail:
        base = length & ~3
        if tail == 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h ^= data[base]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


def partition_for(key: bytes | None, partitions: list[int]) -> int:
    """The partition of ``key`` among ``partitions`` (sorted); random without a key."""
    if key is None:
        return random.choice(partitions)
    return partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
