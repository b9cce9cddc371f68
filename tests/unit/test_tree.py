"""TreeBuilder and TreeReader against a reference model, with an in-memory node store."""

from __future__ import annotations

import hashlib
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from dingyuan.repository.format import ZERO_ID, decode_tree_node, encode_tree_node
from dingyuan.repository.tree import TreeBuilder, TreeReader, tree_height


class NodeStore:
    """Tree nodes by id, as a repository would keep them; counts loads and stores."""

    def __init__(self) -> None:
        self.nodes: dict[bytes, bytes] = {}
        self.stores = 0
        self.loads = 0

    def store(self, level: int, ids: list[bytes]) -> bytes:
        assert ids and any(i != ZERO_ID for i in ids), "an all-zero node must never be stored"
        data = encode_tree_node(level, ids)
        nid = hashlib.blake2b(data, digest_size=32).digest()
        self.nodes[nid] = data
        self.stores += 1
        return nid

    def load(self, nid: bytes, level: int) -> list[bytes]:
        self.loads += 1
        got, ids = decode_tree_node(self.nodes[nid], "test node")
        assert got == level
        return ids


def chunk_id(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "little")).digest()


def chunk_ids(nchunks: int, zeros: set[int]) -> list[bytes]:
    return [ZERO_ID if i in zeros else chunk_id(i) for i in range(nchunks)]


def reference_tree(fanout: int, ids: list[bytes], store: NodeStore) -> tuple[bytes, int]:
    """The tree as the format describes it, built level by level: (root, height)."""
    height = tree_height(len(ids), fanout)
    level_ids = ids
    for level in range(height):
        groups = [level_ids[i : i + fanout] for i in range(0, len(level_ids), fanout)] or [[]]
        level_ids = [ZERO_ID if all(c == ZERO_ID for c in g) else store.store(level, g) for g in groups]
    assert len(level_ids) == 1
    return level_ids[0], height


def build_by_add(fanout: int, ids: list[bytes]) -> tuple[bytes, NodeStore, TreeBuilder]:
    store = NodeStore()
    builder = TreeBuilder(fanout, len(ids), store.store)
    for bid in ids:
        builder.add(bid)
    return builder.finish(), store, builder


def build_by_skip(fanout: int, ids: list[bytes], skip_tail: bool) -> tuple[bytes, NodeStore, TreeBuilder]:
    """Runs of zeros go through ``skip_to``; a trailing run is left to ``finish`` if skip_tail."""
    store = NodeStore()
    builder = TreeBuilder(fanout, len(ids), store.store)
    last = max((i for i, b in enumerate(ids) if b != ZERO_ID), default=-1)
    for i, bid in enumerate(ids):
        if i > last and skip_tail:
            break
        if bid != ZERO_ID:
            builder.skip_to(i)
            builder.add(bid)
    if not skip_tail:
        builder.skip_to(len(ids))
    return builder.finish(), store, builder


@st.composite
def volumes(draw: st.DrawFn) -> tuple[int, list[bytes]]:
    fanout = draw(st.integers(2, 8))
    nchunks = draw(st.one_of(st.integers(0, 600), st.sampled_from([0, 1, fanout, fanout**2, fanout**3 + 1])))
    nchunks = min(nchunks, 600)
    mode = draw(st.sampled_from(["random", "dense", "sparse", "all-zero", "no-zero"]))
    if mode == "all-zero":
        zeros = set(range(nchunks))
    elif mode == "no-zero" or nchunks == 0:
        zeros = set()
    else:
        p = {"random": 0.5, "dense": 0.1, "sparse": 0.97}[mode]
        rnd = draw(st.randoms(use_true_random=False))
        zeros = {i for i in range(nchunks) if rnd.random() < p}
        # runs of zeros aligned to whole subtrees, so skip_to jumps whole levels
        for _ in range(draw(st.integers(0, 3))):
            span = fanout ** draw(st.integers(1, 3))
            start = draw(st.integers(0, max(0, nchunks - 1))) // span * span
            zeros.update(range(start, min(nchunks, start + span)))
    return fanout, chunk_ids(nchunks, zeros)


@given(volumes(), st.booleans())
@settings(max_examples=300, deadline=None)
def test_add_and_skip_to_build_the_reference_tree(vol: tuple[int, list[bytes]], skip_tail: bool) -> None:
    fanout, ids = vol
    ref_store = NodeStore()
    ref_root, ref_height = reference_tree(fanout, ids, ref_store)
    root_a, store_a, builder_a = build_by_add(fanout, ids)
    root_s, store_s, builder_s = build_by_skip(fanout, ids, skip_tail)
    assert root_a == root_s == ref_root
    assert builder_a.height == builder_s.height == ref_height
    assert store_a.nodes == store_s.nodes == ref_store.nodes
    if all(b == ZERO_ID for b in ids):
        assert ref_root == ZERO_ID and not store_a.nodes and not store_s.nodes


@given(volumes())
@settings(max_examples=200, deadline=None)
def test_leaves_are_exactly_the_non_zero_leaf_nodes(vol: tuple[int, list[bytes]]) -> None:
    fanout, ids = vol
    root, store, builder = build_by_add(fanout, ids)
    reader = TreeReader(root, builder.height, fanout, len(ids), store.load)
    expected = [
        (base, ids[base : base + fanout])
        for base in range(0, len(ids), fanout)
        if any(b != ZERO_ID for b in ids[base : base + fanout])
    ]
    assert list(reader.leaves()) == expected
    # nodes() visits every stored node once (chunk ids are distinct, so no subtree repeats)
    visited = [nid for _, nid, _ in reader.nodes()]
    assert len(visited) == len(set(visited))
    assert set(visited) == set(store.nodes)


@given(volumes(), st.lists(st.tuples(st.integers(0, 700), st.integers(0, 300)), max_size=12))
@settings(max_examples=200, deadline=None)
def test_ids_range_returns_the_ids_of_any_range(
    vol: tuple[int, list[bytes]], ranges: list[tuple[int, int]]
) -> None:
    fanout, ids = vol
    root, store, builder = build_by_add(fanout, ids)
    reader = TreeReader(root, builder.height, fanout, len(ids), store.load)
    n = len(ids)
    # in order (as an incremental backup asks), then in arbitrary order
    for start in range(0, n + fanout, max(1, fanout * 3 - 1)):
        assert (
            reader.ids_range(start, fanout * 3 - 1)
            == (ids + [ZERO_ID] * (fanout * 4))[start : start + fanout * 3 - 1]
        )
    for start, count in ranges:
        want = [ids[i] if i < n else ZERO_ID for i in range(start, start + count)]
        assert reader.ids_range(start, count) == want


def test_all_zero_volume_stores_nothing() -> None:
    for fanout in (2, 3, 256):
        for n in (0, 1, fanout, fanout**2 + 1, 1000):
            root, store, builder = build_by_add(fanout, [ZERO_ID] * n)
            assert root == ZERO_ID and store.stores == 0
            skipper = TreeBuilder(fanout, n, store.store)
            assert skipper.finish() == ZERO_ID and store.stores == 0
            reader = TreeReader(root, builder.height, fanout, n, store.load)
            assert list(reader.leaves()) == [] and list(reader.nodes()) == []
            assert reader.ids_range(0, 5) == [ZERO_ID] * 5
            assert store.loads == 0


def test_tree_height() -> None:
    assert tree_height(0, 4) == 1
    assert tree_height(1, 4) == 1
    assert tree_height(4, 4) == 1
    assert tree_height(5, 4) == 2
    assert tree_height(16, 4) == 2
    assert tree_height(17, 4) == 3
    assert tree_height(1 << 24, 256) == 3
    assert tree_height((1 << 24) + 1, 256) == 4


def test_one_tib_sparse_volume_is_cheap() -> None:
    """2**40 bytes at 64 KiB chunks: 2**24 chunks, three of them data; skip_to must jump."""
    nchunks = (1 << 40) // (64 << 10)
    data_at = [0, (1 << 23) + 5, nchunks - 1]
    store = NodeStore()
    t0 = time.monotonic()
    builder = TreeBuilder(256, nchunks, store.store)
    for i in data_at:
        builder.skip_to(i)
        builder.add(chunk_id(i))
    root = builder.finish()
    assert time.monotonic() - t0 < 2.0
    assert builder.height == 3
    # one leaf and one level-1 node per data chunk, and the root
    assert len(store.nodes) == 7 and store.stores == 7
    reader = TreeReader(root, builder.height, 256, nchunks, store.load)
    leaves = list(reader.leaves())
    assert [base for base, _ in leaves] == [i // 256 * 256 for i in data_at]
    for (base, ids), i in zip(leaves, data_at, strict=True):
        assert ids[i - base] == chunk_id(i)
        assert sum(b != ZERO_ID for b in ids) == 1
    for i in data_at:
        lo = max(0, i - 1)
        want = [chunk_id(j) if j in data_at else ZERO_ID for j in range(lo, lo + 3)]
        assert reader.ids_range(lo, 3) == want
    assert reader.ids_range(12345, 1000) == [ZERO_ID] * 1000
