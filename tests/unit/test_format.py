"""Byte layouts of repository objects: roundtrips, pinned constants, and hostile input."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dingyuan.errors import CorruptObject, DingyuanError, UnsupportedFormat
from dingyuan.repository import format as fmt
from dingyuan.repository.crypto import Cipher
from dingyuan.repository.format import (
    ID_LEN,
    ZERO_ID,
    BlobEntry,
    BlobType,
    Codec,
    PackRef,
    decode_index,
    decode_toc,
    decode_tree_node,
    encode_index,
    encode_toc,
    encode_tree_node,
)
from dingyuan.repository.manifest import Snapshot

U32 = st.integers(0, 2**32 - 1)
IDS = st.binary(min_size=ID_LEN, max_size=ID_LEN)

entries = st.builds(
    BlobEntry,
    id=IDS,
    type=st.sampled_from(BlobType),
    codec=st.sampled_from(Codec),
    raw_length=U32,
    offset=U32,
    length=U32,
)
pack_refs = st.builds(PackRef, id=IDS, size=st.integers(0, 2**64 - 1), entries=st.lists(entries, max_size=8))

MAGICS = {
    "PACK_MAGIC": ("dingyuan pack v1", "1c1185e8a9faaf52"),
    "PACK_END_MAGIC": ("dingyuan pack end v1", "887096533ce1559e"),
    "TOC_MAGIC": ("dingyuan pack toc v1", "389be967f83a984d"),
    "INDEX_MAGIC": ("dingyuan index v1", "118f17e8d6c44dcf"),
    "MANIFEST_MAGIC": ("dingyuan snapshot manifest v1", "407dbdbe4deb8d20"),
    "TREE_MAGIC": ("dingyuan tree node v1", "eff3cc0884a0bd88"),
}

Decoder = Callable[[bytes, str], object]
DECODERS: dict[str, Decoder] = {
    "toc": decode_toc,
    "index": decode_index,
    "tree": decode_tree_node,
}


def expect_repository_error(decode: Decoder, data: bytes) -> None:
    """``decode`` either succeeds or raises CorruptObject/UnsupportedFormat, nothing else."""
    with contextlib.suppress(CorruptObject, UnsupportedFormat):
        decode(data, "fuzz")


# --- constants -----------------------------------------------------------------------------------


def test_magics_are_pinned_8_bytes_and_distinct() -> None:
    values = []
    for name, (label, hexval) in MAGICS.items():
        value = getattr(fmt, name)
        assert isinstance(value, bytes) and len(value) == 8
        assert value == hashlib.sha256(label.encode()).digest()[:8]
        assert value.hex() == hexval, f"{name} changed: existing repositories would become unreadable"
        values.append(value)
    assert len(set(values)) == len(values)


def test_struct_sizes() -> None:
    assert fmt.PACK_HEADER.size == 16
    assert fmt.PACK_TRAILER.size == 16
    assert fmt.ENTRY.size == 48
    assert fmt.PACK_REF.size == 44
    assert fmt.TREE_HEADER.size == 16
    assert fmt.COUNT.size == 4
    assert fmt.ID_LEN == 32 and bytes(32) == ZERO_ID
    assert fmt.SALT_LEN == 16 and fmt.TAG_LEN == 16
    assert fmt.FORMAT_VERSION == 1
    assert [int(t) for t in BlobType] == [0, 1]
    assert [int(c) for c in Codec] == [0, 1]


def test_entry_layout_is_little_endian() -> None:
    e = BlobEntry(bytes(range(32)), BlobType.TREE, Codec.ZSTD, 0x01020304, 0x05060708, 0x090A0B0C)
    assert e.pack() == bytes(range(32)) + b"\x01\x01\x00\x00" + bytes.fromhex("04030201080706050c0b0a09")
    toc = encode_toc([e])
    assert toc[:4] == b"\x01\x00\x00\x00" and toc[4:] == e.pack()
    ref = PackRef(b"\xaa" * 32, 0x1122334455667788, [e])
    index = encode_index([ref])
    assert index[:4] == b"\x01\x00\x00\x00"
    assert index[4:48] == b"\xaa" * 32 + bytes.fromhex("8877665544332211") + b"\x01\x00\x00\x00"
    assert index[48:] == e.pack()
    node = encode_tree_node(3, [b"\x11" * 32, b"\x22" * 32])
    assert node[:8] == fmt.TREE_MAGIC and node[8:16] == b"\x03\x00\x00\x00\x02\x00\x00\x00"
    assert node[16:] == b"\x11" * 32 + b"\x22" * 32


def test_object_names() -> None:
    pid = bytes.fromhex("ab" + "00" * 31)
    assert fmt.pack_name(pid) == f"packs/ab/{pid.hex()}"
    assert fmt.index_name(pid) == f"index/{pid.hex()}"
    assert fmt.snapshot_name("0123") == "snapshots/0123"


# --- roundtrips ----------------------------------------------------------------------------------


@given(st.lists(entries, max_size=20))
def test_toc_roundtrip(es: list[BlobEntry]) -> None:
    data = encode_toc(es)
    assert len(data) == 4 + 48 * len(es)
    assert decode_toc(data, "toc") == es


@given(st.lists(pack_refs, max_size=6))
def test_index_roundtrip(packs: list[PackRef]) -> None:
    assert decode_index(encode_index(packs), "index") == packs


@given(st.integers(0, 255), st.lists(IDS, max_size=40))
def test_tree_node_roundtrip(level: int, ids: list[bytes]) -> None:
    assert decode_tree_node(encode_tree_node(level, ids), "node") == (level, ids)


# --- rejection -----------------------------------------------------------------------------------


@st.composite
def encodings(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(sorted(DECODERS)))
    if kind == "toc":
        return kind, encode_toc(draw(st.lists(entries, max_size=5)))
    if kind == "index":
        return kind, encode_index(draw(st.lists(pack_refs, max_size=3)))
    return kind, encode_tree_node(draw(st.integers(0, 255)), draw(st.lists(IDS, max_size=5)))


@given(encodings(), st.data())
def test_truncated_input_is_corrupt(enc: tuple[str, bytes], data: st.DataObject) -> None:
    kind, full = enc
    cut = data.draw(st.integers(0, len(full) - 1))
    with pytest.raises(CorruptObject):
        DECODERS[kind](full[:cut], "truncated")


@given(encodings(), st.binary(min_size=1, max_size=100))
def test_trailing_bytes_are_corrupt(enc: tuple[str, bytes], extra: bytes) -> None:
    kind, full = enc
    with pytest.raises(CorruptObject):
        DECODERS[kind](full + extra, "trailing")


@given(st.binary(min_size=8, max_size=8), st.integers(0, 255), st.lists(IDS, max_size=3))
def test_tree_node_with_wrong_magic_is_unsupported(magic: bytes, level: int, ids: list[bytes]) -> None:
    data = encode_tree_node(level, ids)
    if magic == fmt.TREE_MAGIC:
        return
    with pytest.raises(UnsupportedFormat):
        decode_tree_node(magic + data[8:], "node")


def test_unknown_blob_type_or_codec_is_unsupported() -> None:
    good = BlobEntry(bytes(32), BlobType.CHUNK, Codec.RAW, 1, 2, 3).pack()
    for pos, value in ((32, 2), (33, 2), (32, 255)):
        bad = bytearray(good)
        bad[pos] = value
        with pytest.raises(UnsupportedFormat):
            decode_toc(fmt.COUNT.pack(1) + bytes(bad), "toc")
        with pytest.raises(UnsupportedFormat):
            decode_index(fmt.COUNT.pack(1) + fmt.PACK_REF.pack(bytes(32), 0, 1) + bytes(bad), "index")


def test_huge_counts_are_corrupt_not_memory_errors() -> None:
    with pytest.raises(CorruptObject):
        decode_toc(struct.pack("<I", 2**32 - 1), "toc")
    with pytest.raises(CorruptObject):
        decode_index(struct.pack("<I", 2**32 - 1), "index")
    with pytest.raises(CorruptObject):
        decode_index(struct.pack("<I", 1) + fmt.PACK_REF.pack(bytes(32), 0, 2**32 - 1), "index")
    with pytest.raises(CorruptObject):
        decode_tree_node(fmt.TREE_HEADER.pack(fmt.TREE_MAGIC, 0, 2**32 - 1), "node")


@given(st.sampled_from(sorted(DECODERS)), st.binary(max_size=600))
@settings(max_examples=500)
def test_decoders_fuzzed_with_random_bytes_raise_only_dingyuan_errors(kind: str, data: bytes) -> None:
    expect_repository_error(DECODERS[kind], data)
    # the same bytes behind a plausible header reach deeper into the decoder
    for n in (0, 1, 3):
        expect_repository_error(DECODERS[kind], fmt.COUNT.pack(n) + data)
    expect_repository_error(decode_tree_node, fmt.TREE_MAGIC + data)


@given(encodings(), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
@settings(max_examples=300)
def test_decoders_fuzzed_with_mutated_encodings_raise_only_dingyuan_errors(
    enc: tuple[str, bytes], flips: list[tuple[int, int]]
) -> None:
    kind, full = enc
    data = bytearray(full)
    for pos, value in flips:
        if data:
            data[pos % len(data)] = value
    expect_repository_error(DECODERS[kind], bytes(data))


# --- sealed objects ------------------------------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["aes-256-gcm", "none"])
def cipher(request: pytest.FixtureRequest) -> Cipher:
    return Cipher(bytes(range(64)), encrypted=request.param)


@given(plain=st.binary(max_size=2000))
@settings(max_examples=50)
def test_seal_roundtrip(plain: bytes) -> None:
    for encrypted in (True, False):
        c = Cipher(bytes(range(64)), encrypted=encrypted)
        sealed = c.seal(fmt.INDEX_MAGIC, plain)
        assert sealed[:8] == fmt.INDEX_MAGIC
        assert c.unseal(fmt.INDEX_MAGIC, sealed, "obj") == plain


def test_unseal_rejects_wrong_magic(cipher: Cipher) -> None:
    sealed = cipher.seal(fmt.INDEX_MAGIC, b"payload")
    for other in (fmt.TOC_MAGIC, fmt.MANIFEST_MAGIC, fmt.PACK_MAGIC):
        with pytest.raises(UnsupportedFormat):
            cipher.unseal(other, sealed, "obj")
    with pytest.raises(CorruptObject):
        cipher.unseal(fmt.INDEX_MAGIC, sealed[:39], "obj")


def test_unseal_rejects_another_keys_object(cipher: Cipher) -> None:
    other = Cipher(bytes(64), encrypted=cipher.encrypted)
    with pytest.raises(CorruptObject):
        cipher.unseal(fmt.INDEX_MAGIC, other.seal(fmt.INDEX_MAGIC, b"payload"), "obj")


@given(st.binary(max_size=300), st.booleans())
@settings(max_examples=300)
def test_unseal_fuzzed_raises_only_dingyuan_errors(data: bytes, with_magic: bool) -> None:
    for encrypted in (True, False):
        c = Cipher(bytes(range(64)), encrypted=encrypted)
        blob = fmt.MANIFEST_MAGIC + data if with_magic else data
        with contextlib.suppress(CorruptObject, UnsupportedFormat):
            c.unseal(fmt.MANIFEST_MAGIC, blob, "fuzz")
        with contextlib.suppress(CorruptObject, UnsupportedFormat):
            c.unseal_json(fmt.MANIFEST_MAGIC, blob, "fuzz")
        with contextlib.suppress(CorruptObject):
            c.open_blob(data, b"aad", "fuzz")


def test_unseal_json_rejects_non_objects(cipher: Cipher) -> None:
    for plain in (b"not json", b"\xff\xfe\x00", b"[1, 2]", b"42", b"null"):
        with pytest.raises(CorruptObject):
            cipher.unseal_json(fmt.MANIFEST_MAGIC, cipher.seal(fmt.MANIFEST_MAGIC, plain), "obj")


# --- manifests -----------------------------------------------------------------------------------


def manifest_doc(**core: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "format": 1,
        "volume": "vol",
        "host": "host",
        "time": "2024-01-02T03:04:05.000006Z",
        "size": 4096,
        "chunk_size": 4096,
        "fanout": 256,
        "height": 1,
        "root": "00" * 32,
        "consistency": "crash",
        "labels": {},
        "parent": None,
    }
    base.update(core)
    return {"core": base, "mutable": {"retention_until": None, "annotations": {}}}


def test_manifest_doc_roundtrip() -> None:
    snap = Snapshot.from_doc(manifest_doc(), "m")
    assert snap.size == 4096 and snap.root == ZERO_ID and snap.nchunks == 1
    again = Snapshot.from_doc(json.loads(json.dumps(snap.doc())), "m")
    assert again.core() == snap.core() and again.mutable() == snap.mutable()


def test_manifest_of_a_newer_format_is_unsupported() -> None:
    with pytest.raises(UnsupportedFormat):
        Snapshot.from_doc(manifest_doc(format=2), "m")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@given(
    st.sampled_from(sorted(manifest_doc()["core"])),
    json_values,
    st.one_of(st.none(), json_values),
)
@settings(max_examples=300)
def test_manifest_fuzzed_raises_only_dingyuan_errors(key: str, value: object, mutable: object) -> None:
    doc = manifest_doc(**{key: value})
    if mutable is not None:
        doc["mutable"] = mutable
    with contextlib.suppress(DingyuanError):
        Snapshot.from_doc(doc, "m")
    for whole in (value, [doc], None):
        with contextlib.suppress(DingyuanError):
            Snapshot.from_doc(whole, "m")  # type: ignore[arg-type]


def test_manifest_with_infinite_size_is_corrupt() -> None:
    with pytest.raises(CorruptObject):
        Snapshot.from_doc(manifest_doc(size=math.inf), "m")
