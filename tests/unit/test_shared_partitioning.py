"""The shared partitioner: the partitions Kafka's Java client and aiokafka choose."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as reference

from services.shared.partitioning import murmur2, partition_for


def test_partitions_are_the_ones_the_java_client_and_aiokafka_choose() -> None:
    rng = random.Random(3)
    keys = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300))) for _ in range(3000)]
    keys += [f"tx-{n:08d}".encode() for n in range(500)] + [
        b"",
        b"a",
        "üser".encode(),
        b"\xff" * 300,
    ]
    for key in keys:
        assert murmur2(key) == reference(key)
        for count in (1, 2, 3, 4, 12):
            partitions = list(range(count))
            assert partition_for(key, partitions) == DefaultPartitioner()(
                key, partitions, partitions
            )
    # the Java client's own test values (org.apache.kafka.common.utils.UtilsTest, as int32)
    known = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    for key, value in known.items():
        assert murmur2(key) == value & 0xFFFFFFFF
    assert partition_for(None, [0, 1, 2]) in (0, 1, 2)
