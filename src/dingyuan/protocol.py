"""The agent-to-vault transfer protocol's binary parts (docs/protocols.md is the specification).

An upload body is a sequence of frames, each a fixed header and its payload::

    id (32 bytes) | type (1: 0 chunk, 1 tree node) | codec (1: 0 raw, 1 zstd)
    | raw length (u32 BE) | payload length (u32 BE) | payload

The payload is the blob's plaintext, compressed or not; the vault checks that it decompresses to
``raw length`` bytes whose keyed BLAKE3 is ``id`` before it stores it. A "missing" query body is
the ids back to back (32 bytes each).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import UploadRejected
from .repository.format import ID_LEN, BlobType, Codec

API = "/api/v1"
FRAME = struct.Struct(">32sBBII")
MAX_RAW = 4 << 20  # the largest chunk (4 MiB); tree nodes are far smaller
MAX_IDS_PER_QUERY = 65536
MAX_UPLOAD_BYTES = 64 << 20


@dataclass(frozen=True)
class Frame:
    id: bytes
    type: BlobType
    codec: Codec
    raw_length: int
    payload: memoryview


def frame_header(bid: bytes, btype: BlobType, codec: Codec, raw_length: int, payload_length: int) -> bytes:
    return FRAME.pack(bid, btype, codec, raw_length, payload_length)


def parse_frames(data: memoryview) -> tuple[list[Frame], int]:
    """The complete frames at the start of ``data`` and how many bytes they use (a truncated last
    frame is left for the caller to complete or drop). Raises UploadRejected on a bad header."""
    frames: list[Frame] = []
    pos, end = 0, len(data)
    while end - pos >= FRAME.size:
        bid, btype, codec, raw, plen = FRAME.unpack_from(data, pos)
        if btype not in (BlobType.CHUNK, BlobType.TREE):
            raise UploadRejected(detail=f"frame at byte {pos}: unknown blob type {btype}")
        if codec not in (Codec.RAW, Codec.ZSTD):
            raise UploadRejected(detail=f"frame at byte {pos}: unknown codec {codec}")
        if not 0 < raw <= MAX_RAW:
            raise UploadRejected(detail=f"frame at byte {pos}: raw length {raw} out of range")
        if (codec == Codec.RAW and plen != raw) or (codec == Codec.ZSTD and not 0 < plen < raw):
            raise UploadRejected(detail=f"frame at byte {pos}: payload length {plen} does not fit")
        if end - pos - FRAME.size < plen:
            break
        start = pos + FRAME.size
        frames.append(Frame(bid, BlobType(btype), Codec(codec), raw, data[start : start + plen]))
        pos = start + plen
    return frames, pos


def split_ids(data: bytes) -> list[bytes]:
    """The ids of a "missing" query body."""
    if len(data) % ID_LEN or len(data) // ID_LEN > MAX_IDS_PER_QUERY:
        raise UploadRejected(
            detail=f"a missing-query body is up to {MAX_IDS_PER_QUERY} ids of {ID_LEN} bytes each"
        )
    return [data[i : i + ID_LEN] for i in range(0, len(data), ID_LEN)]


def iter_batches(ids: list[bytes], size: int = MAX_IDS_PER_QUERY) -> Iterator[list[bytes]]:
    for i in range(0, len(ids), size):
        yield ids[i : i + size]
