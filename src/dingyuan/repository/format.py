"""Byte layouts of the repository objects (see docs/format.md, which is the normative spec).

DO NOT MODIFY the magic values or layouts of version 1: repositories on disk depend on them.
A new layout gets a new magic and a reader for the old one.

All integers are little-endian. Ids are 32 bytes (keyed BLAKE3). ``ZERO_ID`` (32 zero bytes)
stands for an all-zero chunk or an all-zero subtree: a hole, never stored.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum

from ..errors import CorruptObject, UnsupportedFormat

FORMAT_VERSION = 1
ID_LEN = 32
ZERO_ID = bytes(ID_LEN)


def _magic(label: str) -> bytes:
    """Self-describing 8-byte magic: the first 8 bytes of sha256(label)."""
    return hashlib.sha256(label.encode()).digest()[:8]


PACK_MAGIC = _magic("dingyuan pack v1")
PACK_END_MAGIC = _magic("dingyuan pack end v1")
TOC_MAGIC = _magic("dingyuan pack toc v1")
INDEX_MAGIC = _magic("dingyuan index v1")
MANIFEST_MAGIC = _magic("dingyuan snapshot manifest v1")
TREE_MAGIC = _magic("dingyuan tree node v1")
NOTE_MAGIC = _magic("dingyuan snapshot note v1")
CLONE_MAGIC = _magic("dingyuan clone v1")
CLONE_MAP_MAGIC = _magic("dingyuan clone map v1")  # a clone's local overlay map (not an object)

SALT_LEN = 16
TAG_LEN = 16


class BlobType(IntEnum):
    CHUNK = 0
    TREE = 1


class Codec(IntEnum):
    RAW = 0
    ZSTD = 1


# Pack: header | blob* | sealed TOC | trailer
PACK_HEADER = struct.Struct("<8s8x")  # magic, reserved
PACK_TRAILER = struct.Struct("<I4x8s")  # sealed TOC length, reserved, end magic
assert PACK_HEADER.size == 16 and PACK_TRAILER.size == 16

# One blob entry, in a pack TOC and in an index object.
ENTRY = struct.Struct("<32sBBxxIII")  # id, type, codec, raw length, offset in pack, stored length
assert ENTRY.size == 48

PACK_REF = struct.Struct("<32sQI")  # pack id, pack size, number of entries (index object)
assert PACK_REF.size == 44

TREE_HEADER = struct.Struct("<8sBxxxI")  # magic, level, count of child ids
assert TREE_HEADER.size == 16

COUNT = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class BlobEntry:
    """Where a blob lives inside its pack."""

    id: bytes
    type: BlobType
    codec: Codec
    raw_length: int
    offset: int
    length: int

    def pack(self) -> bytes:
        return ENTRY.pack(self.id, self.type, self.codec, self.raw_length, self.offset, self.length)


def _entries(data: memoryview, pos: int, count: int, name: str) -> tuple[list[BlobEntry], int]:
    end = pos + count * ENTRY.size
    if end > len(data):
        raise CorruptObject(name=name, detail="entry table truncated")
    out = []
    for off in range(pos, end, ENTRY.size):
        bid, btype, codec, raw, offset, length = ENTRY.unpack_from(data, off)
        try:
            out.append(BlobEntry(bid, BlobType(btype), Codec(codec), raw, offset, length))
        except ValueError:
            raise UnsupportedFormat(what=name, detail=f"blob type {btype} codec {codec}") from None
    return out, end


def encode_toc(entries: list[BlobEntry]) -> bytes:
    """Plaintext of a pack's table of contents (sealed with TOC_MAGIC)."""
    return COUNT.pack(len(entries)) + b"".join(e.pack() for e in entries)


def decode_toc(data: bytes, name: str) -> list[BlobEntry]:
    mv = memoryview(data)
    if len(mv) < COUNT.size:
        raise CorruptObject(name=name, detail="pack table of contents truncated")
    (count,) = COUNT.unpack_from(mv, 0)
    entries, end = _entries(mv, COUNT.size, count, name)
    if end != len(mv):
        raise CorruptObject(name=name, detail="trailing bytes after pack table of contents")
    return entries


@dataclass(frozen=True, slots=True)
class PackRef:
    """A pack as an index object lists it."""

    id: bytes
    size: int
    entries: list[BlobEntry]


def encode_index(packs: list[PackRef]) -> bytes:
    """Plaintext of an index object (sealed with INDEX_MAGIC)."""
    parts = [COUNT.pack(len(packs))]
    for p in packs:
        parts.append(PACK_REF.pack(p.id, p.size, len(p.entries)))
        parts.extend(e.pack() for e in p.entries)
    return b"".join(parts)


def decode_index(data: bytes, name: str) -> list[PackRef]:
    mv = memoryview(data)
    if len(mv) < COUNT.size:
        raise CorruptObject(name=name, detail="index truncated")
    (npacks,) = COUNT.unpack_from(mv, 0)
    pos = COUNT.size
    packs = []
    for _ in range(npacks):
        if pos + PACK_REF.size > len(mv):
            raise CorruptObject(name=name, detail="index truncated")
        pid, size, count = PACK_REF.unpack_from(mv, pos)
        entries, pos = _entries(mv, pos + PACK_REF.size, count, name)
        packs.append(PackRef(pid, size, entries))
    if pos != len(mv):
        raise CorruptObject(name=name, detail="trailing bytes after index")
    return packs


def encode_tree_node(level: int, ids: list[bytes]) -> bytes:
    return TREE_HEADER.pack(TREE_MAGIC, level, len(ids)) + b"".join(ids)


def decode_tree_node(data: bytes, name: str) -> tuple[int, list[bytes]]:
    if len(data) < TREE_HEADER.size:
        raise CorruptObject(name=name, detail="tree node truncated")
    magic, level, count = TREE_HEADER.unpack_from(data, 0)
    if magic != TREE_MAGIC:
        raise UnsupportedFormat(what=name, detail="tree node magic")
    if len(data) != TREE_HEADER.size + count * ID_LEN:
        raise CorruptObject(name=name, detail="tree node length does not match its count")
    base = TREE_HEADER.size
    return level, [data[base + i * ID_LEN : base + (i + 1) * ID_LEN] for i in range(count)]


def pack_name(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"packs/{h[:2]}/{h}"


def index_name(index_id: bytes) -> str:
    return f"index/{index_id.hex()}"


def snapshot_name(snapshot_id: str) -> str:
    return f"snapshots/{snapshot_id}"


def note_name(snapshot_id: str, revision: int) -> str:
    """A snapshot's mutable metadata, revision ``revision`` (the highest revision counts)."""
    return f"notes/{snapshot_id}/{revision:010d}"


def clone_name(clone_id: str) -> str:
    """A clone's record: a writable volume born from a snapshot (its overlay is local)."""
    return f"clones/{clone_id}"
