"""Protobuf wire-format pieces for hot paths that write known messages without building them.

Writers that emit many small messages of a fixed shape (serving's prediction records, the
features service's Feast values) encode the bytes directly; each keeps a unit test that holds
its bytes equal to ``SerializeToString`` of the real message.
"""

from __future__ import annotations

import struct

DOUBLE = struct.Struct("<d")  # a double (fixed64) field's payload


def varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # protobuf writes a negative int64 as its 64-bit two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes, sub-message) with its one-byte ``tag``."""
    return bytes((tag,)) + varint(len(payload)) + payload
