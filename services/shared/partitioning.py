"""Which partition a keyed record goes to: the Java client's rule (murmur2), computed in C.

Kafka's default partitioner hashes the key with MurmurHash2 (seed 0x9747b28c), keeps the low
31 bits and takes them modulo the partition count. aiokafka's ``DefaultPartitioner`` computes
the hash byte by byte in Python (a few microseconds per key); the ``murmurhash2`` package is
the same algorithm in C, some fifteen times faster, and gives the same values
(tests/unit/test_shared_partitioning.py compares them with aiokafka's and the Java client's).
Used wherever a service places keyed records in record batches itself: ingestion's validated
events (labels are keyed by transaction id, so nearly every label needs a fresh hash),
serving's prediction records and the features service's re-keyed facts (which must meet the
labels ingestion placed).
"""

from __future__ import annotations

import random

from murmurhash2 import murmurhash2 as _murmurhash2

_SEED = 0x9747B28C


def murmur2(data: bytes) -> int:
    """MurmurHash2 as org.apache.kafka.common.utils.Utils.murmur2 (unsigned 32 bits)."""
    return _murmurhash2(data, _SEED)


def partition_for(key: bytes | None, partitions: list[int]) -> int:
    """The partition of ``key`` among ``partitions`` (sorted); random without a key."""
    if key is None:
        return random.choice(partitions)
    return partitions[(_murmurhash2(key, _SEED) & 0x7FFFFFFF) % len(partitions)]
