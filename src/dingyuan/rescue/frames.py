"""The binary parts of the restore protocol (docs/protocols.md, "Restore (rescue)"), pure functions.

Both sides use this module: the vault encodes chunk streams, the rescue tool decodes them, so the
format has one definition. Standard library only (zlib, hashlib, struct).

A chunk stream (``GET /snapshots/{id}/chunks``) is the magic ``DYCHNK01`` then one frame per chunk,
in order, each a fixed header and its payload::

    index (u64 BE) | kind (u8: 0 hole, 1 raw, 2 zlib) | length (u32 BE) | payload length (u32 BE)
    | SHA-256 of the chunk's plaintext (32 bytes) | payload

A hole has no payload (its plaintext is ``length`` zero bytes, and its digest is theirs); a raw
payload is the plaintext; a zlib payload is the plaintext compressed (RFC 1950), strictly smaller
than ``length``. A reader MUST reject a stream whose magic, order, kinds or lengths differ from
this, a payload that does not decompress to exactly ``length`` bytes, and a chunk whose SHA-256
is not the one announced: it never hands on unverified bytes.

A compare body (``POST /snapshots/{id}/compare``) is SHA-256 digests back to back, 32 bytes each.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

from ..errors import TransferError

MAGIC = b"DYCHNK01"
HEADER = struct.Struct(">QBII32s")
assert HEADER.size == 49  # do not modify: the wire format
HOLE, RAW, ZLIB = 0, 1, 2
DIGEST_LEN = 32
MAX_CHUNK = 4 << 20  # the largest chunk size of a repository
MAX_STREAM_CHUNKS = 256  # chunks of one chunk stream ...
MAX_STREAM_BYTES = 16 << 20  # ... and their bytes (chunk size times count)
MAX_COMPARE = 4096  # digests of one compare request (128 KiB of body)
ZLIB_LEVEL = 1
SAMPLE = 1024  # bytes from the start, middle and end of a chunk that decide whether to compress it


def max_stream_chunks(chunk_size: int) -> int:
    """How many chunks one stream request may ask for at this chunk size."""
    return max(1, min(MAX_STREAM_CHUNKS, MAX_STREAM_BYTES // chunk_size))


@lru_cache(maxsize=8)
def zero_digest(length: int) -> bytes:
    """SHA-256 of ``length`` zero bytes: the digest of a hole (computed once per length)."""
    return hashlib.sha256(bytes(length)).digest()


def encode_hole(index: int, length: int) -> bytes:
    return HEADER.pack(index, HOLE, length, 0, zero_digest(length))


def worth_compressing(data: bytes | memoryview) -> bool:
    """Whether zlib shrinks samples of ``data`` by a tenth or more. zlib crawls over random bytes
    (about 30 MB/s, against 200 MB/s over text), so an encrypted or compressed chunk is sent as it is
    after compressing 3 KiB of it rather than all of it."""
    if len(data) <= 3 * SAMPLE:
        return True
    mid = len(data) // 2
    sample = b"".join((data[:SAMPLE], data[mid : mid + SAMPLE], data[-SAMPLE:]))
    return len(zlib.compress(sample, ZLIB_LEVEL)) * 10 <= len(sample) * 9


def encode_data(index: int, data: bytes | memoryview, digest: bytes, compress: bool = True) -> list[bytes]:
    """Header and payload of a data chunk whose SHA-256 is ``digest``; zlib only where it saves."""
    if compress and worth_compressing(data):
        packed = zlib.compress(data, ZLIB_LEVEL)
        if len(packed) < len(data):
            return [HEADER.pack(index, ZLIB, len(data), len(packed), digest), packed]
    return [HEADER.pack(index, RAW, len(data), len(data), digest), bytes(data)]


@dataclass(frozen=True)
class Chunk:
    """One verified chunk of a stream: ``data`` is None for a hole (``length`` zero bytes)."""

    index: int
    length: int
    data: bytes | None

    @property
    def hole(self) -> bool:
        return self.data is None


def _bad(detail: str) -> TransferError:
    return TransferError(f"the vault sent a malformed chunk stream: {detail}")


def read_exactly(read: Callable[[int], bytes], n: int, what: str) -> bytes:
    got = read(n)
    if len(got) != n:
        raise _bad(f"it ends {n - len(got)} bytes short in {what}")
    return got


def decode_stream(read: Callable[[int], bytes], start: int, lengths: list[int]) -> Iterator[Chunk]:
    """The chunks ``start, start + 1, ...`` of a stream read through ``read(n)`` (which returns
    fewer bytes only at its end), each checked against ``lengths`` (the expected plaintext length
    of each) and its digest, and nothing after the last. Raises :class:`TransferError` on anything
    malformed or corrupt."""
    if read_exactly(read, len(MAGIC), "its magic") != MAGIC:
        raise _bad("wrong magic (not a dingyuan chunk stream, or a newer format)")
    for n, want in enumerate(lengths):
        index = start + n
        header = read_exactly(read, HEADER.size, f"the header of chunk {index}")
        got_index, kind, length, plen, digest = HEADER.unpack(header)
        if got_index != index:
            raise _bad(f"chunk {got_index} where chunk {index} was due")
        if length != want:
            raise _bad(f"chunk {index} is {length} bytes long, expected {want}")
        if kind == HOLE:
            if plen != 0 or digest != zero_digest(length):
                raise _bad(f"hole {index} with a payload or the digest of data")
            yield Chunk(index, length, None)
            continue
        if kind == RAW:
            if plen != length:
                raise _bad(f"raw chunk {index} has a {plen}-byte payload for {length} bytes")
            data = read_exactly(read, plen, f"chunk {index}")
        elif kind == ZLIB:
            if not 0 < plen < length:
                raise _bad(f"compressed chunk {index} has a {plen}-byte payload for {length} bytes")
            data = inflate(read_exactly(read, plen, f"chunk {index}"), length, index)
        else:
            raise _bad(f"chunk {index} has unknown kind {kind}")
        if hashlib.sha256(data).digest() != digest:
            raise TransferError(
                f"chunk {index} from the vault does not match its SHA-256 (damaged on the way); "
                "nothing of it was written: run the restore again"
            )
        yield Chunk(index, length, data)
    if read(1):
        raise _bad(f"bytes follow its last chunk ({start + len(lengths) - 1})")


def inflate(payload: bytes, length: int, index: int) -> bytes:
    """``payload`` decompressed, refusing anything but exactly ``length`` bytes of one zlib stream."""
    d = zlib.decompressobj()
    try:
        data = d.decompress(payload, length)
    except zlib.error as e:
        raise _bad(f"chunk {index} does not decompress ({e})") from None
    if len(data) != length or not d.eof or d.unconsumed_tail or d.unused_data:
        raise _bad(f"chunk {index} does not decompress to exactly {length} bytes")
    return data


def unpack_digests(body: bytes) -> list[bytes]:
    """The digests of a compare body; ValueError if it is not a whole number of them."""
    if len(body) % DIGEST_LEN:
        raise ValueError(f"a compare body is SHA-256 digests of {DIGEST_LEN} bytes; got {len(body)} bytes")
    return [body[i : i + DIGEST_LEN] for i in range(0, len(body), DIGEST_LEN)]
