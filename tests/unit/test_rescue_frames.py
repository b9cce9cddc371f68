"""The restore protocol's chunk streams (dingyuan.rescue.frames): what the vault encodes, the rescue
tool decodes to the same bytes, and anything malformed or damaged is refused before it is used."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import zlib
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dingyuan.errors import TransferError
from dingyuan.rescue import frames

CS = 4096

# a chunk: None for a hole, else its bytes (random, or a repeated pattern that zlib shrinks)
chunk_st = st.one_of(
    st.none(),
    st.binary(min_size=1, max_size=CS),
    st.tuples(st.binary(min_size=1, max_size=8), st.integers(1, CS)).map(lambda t: (t[0] * CS)[: t[1]]),
)


def encode(start: int, chunks: list[bytes | None], lengths: list[int], compress: bool = True) -> bytes:
    parts = [frames.MAGIC]
    for n, (data, length) in enumerate(zip(chunks, lengths, strict=True)):
        if data is None:
            parts.append(frames.encode_hole(start + n, length))
        else:
            parts.extend(frames.encode_data(start + n, data, hashlib.sha256(data).digest(), compress))
    return b"".join(parts)


def decode(body: bytes, start: int, lengths: list[int]) -> list[frames.Chunk]:
    return list(frames.decode_stream(io.BytesIO(body).read, start, lengths))


@given(
    st.integers(0, 1 << 40),
    st.lists(st.tuples(chunk_st, st.integers(1, CS)), min_size=1, max_size=8),
    st.booleans(),
)
def test_round_trip(start: int, items: list[tuple[bytes | None, int]], compress: bool) -> None:
    chunks = [data for data, _ in items]
    lengths = [len(data) if data is not None else hole for data, hole in items]
    got = decode(encode(start, chunks, lengths, compress), start, lengths)
    assert [c.index for c in got] == list(range(start, start + len(items)))
    assert [c.data for c in got] == chunks
    assert [c.length for c in got] == lengths


def test_compressible_chunks_travel_compressed_and_random_ones_raw() -> None:
    text = b"dingyuan " * 1000
    header, payload = frames.encode_data(0, text, hashlib.sha256(text).digest())
    assert frames.HEADER.unpack(header)[1] == frames.ZLIB and len(payload) < len(text) // 10
    noise = random.Random(1).randbytes(CS)
    header, payload = frames.encode_data(0, noise, hashlib.sha256(noise).digest())
    assert frames.HEADER.unpack(header)[1] == frames.RAW and payload == noise
    mostly_zeros = noise[:1500] + bytes(CS * 4)  # random where the first sample looks
    header, payload = frames.encode_data(0, mostly_zeros, hashlib.sha256(mostly_zeros).digest())
    assert frames.HEADER.unpack(header)[1] == frames.ZLIB and len(payload) < 2000


@pytest.fixture
def good() -> tuple[bytes, list[int]]:
    chunks: list[bytes | None] = [b"a" * CS, None, bytes(range(256)) * 16, b"tail" * 100]
    lengths = [CS, CS, CS, 400]
    return encode(10, chunks, lengths), lengths


def test_every_truncation_is_refused(good: tuple[bytes, list[int]]) -> None:
    body, lengths = good
    for cut in range(len(body)):
        with pytest.raises(TransferError, match="malformed"):
            decode(body[:cut], 10, lengths)


def _frame_at(body: bytes, n: int) -> int:
    """Offset of frame ``n``'s header in ``body``."""
    pos = len(frames.MAGIC)
    for _ in range(n):
        plen = frames.HEADER.unpack_from(body, pos)[3]
        pos += frames.HEADER.size + plen
    return pos


def _patch(body: bytes, n: int, field: int, value: int | bytes) -> bytes:
    pos = _frame_at(body, n)
    fields = list(frames.HEADER.unpack_from(body, pos))
    fields[field] = value
    return body[:pos] + frames.HEADER.pack(*fields) + body[pos + frames.HEADER.size :]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b"DYCHNK99" + b[8:], "wrong magic"),
        (lambda b: _patch(b, 1, 0, 12), "chunk 12 where chunk 11 was due"),
        (lambda b: _patch(b, 0, 1, 7), "unknown kind 7"),
        (lambda b: _patch(b, 3, 2, 399), "399 bytes long, expected 400"),
        (lambda b: _patch(b, 1, 4, b"\1" * 32), "hole 11 with a payload or the digest of data"),
        (lambda b: _patch(b, 0, 4, b"\1" * 32), "does not match its SHA-256"),
        (lambda b: b + b"\0", "bytes follow its last chunk"),
    ],
)
def test_malformed_streams_are_refused(
    good: tuple[bytes, list[int]], change: Callable[[bytes], bytes], message: str
) -> None:
    body, lengths = good
    with pytest.raises(TransferError, match=message):
        decode(change(body), 10, lengths)


def test_a_flipped_payload_byte_is_caught() -> None:
    data = bytes(range(256)) * 16
    body = encode(0, [data], [len(data)], compress=False)
    damaged = body[:-1] + bytes([body[-1] ^ 1])
    with pytest.raises(TransferError, match="does not match its SHA-256"):
        decode(damaged, 0, [len(data)])


def test_zlib_payloads_must_inflate_to_exactly_the_length() -> None:
    data = b"x" * CS
    digest = hashlib.sha256(data).digest()

    def stream(payload: bytes, length: int = CS) -> bytes:
        return frames.MAGIC + frames.HEADER.pack(0, frames.ZLIB, length, len(payload), digest) + payload

    assert decode(stream(zlib.compress(data)), 0, [CS])[0].data == data
    for bad in (
        zlib.compress(data[:-1]),
        zlib.compress(data + b"x"),
        zlib.compress(data) + b"junk",
        b"\0" * 40,
    ):
        with pytest.raises(TransferError, match="decompress"):
            decode(stream(bad), 0, [CS])
    with pytest.raises(TransferError, match="payload"):  # a "compressed" payload as long as the data
        decode(stream(data), 0, [CS])


def test_digest_bodies_split_into_32_byte_digests() -> None:
    body = b"".join(struct.pack(">32s", bytes([i]) * 32) for i in range(5))
    assert frames.unpack_digests(body) == [bytes([i]) * 32 for i in range(5)]
    with pytest.raises(ValueError, match="32 bytes"):
        frames.unpack_digests(body[:-1])


def test_stream_limits_keep_a_request_within_16_mib() -> None:
    assert frames.max_stream_chunks(64 << 10) == 256
    assert frames.max_stream_chunks(4 << 20) == 4
    assert all(frames.max_stream_chunks(cs) * cs <= 16 << 20 for cs in (4096 << k for k in range(11)))
