"""The Merkle tree over a volume's chunk ids.

A volume of ``n`` chunks has a tree of fixed fan-out ``F`` and height ``h`` (the smallest with
``F**h >= n``). Level-0 nodes hold chunk ids; a level-``l`` node holds the ids of level-``l-1``
nodes; the root is the single level-``h-1`` node. Entry ``j`` of a level-``l`` node covers
chunks ``[base + j*F**l, base + (j+1)*F**l)``. Nodes are positional: the last node of a level may
be short. An all-zero chunk and an all-zero subtree have the id ``ZERO_ID`` and are never
stored, so a sparse volume costs what it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator

from ..errors import CorruptObject
from .format import ZERO_ID

StoreNode = Callable[[int, list[bytes]], bytes]
LoadNode = Callable[[bytes, int], list[bytes]]


def tree_height(nchunks: int, fanout: int) -> int:
    height, cap = 1, fanout
    while cap < nchunks:
        height += 1
        cap *= fanout
    return height


class TreeBuilder:
    """Build a tree from chunk ids given in volume order; ``skip_to`` fills holes cheaply."""

    def __init__(self, fanout: int, nchunks: int, store: StoreNode) -> None:
        self.fanout = fanout
        self.nchunks = nchunks
        self.height = tree_height(nchunks, fanout)
        self.store = store
        self.pending: list[list[bytes]] = [[] for _ in range(self.height)]
        self.next = 0

    def _node(self, level: int, ids: list[bytes]) -> bytes:
        if all(i == ZERO_ID for i in ids):
            return ZERO_ID
        return self.store(level, ids)

    def _push(self, level: int, entry: bytes) -> None:
        pend = self.pending[level]
        pend.append(entry)
        if len(pend) == self.fanout and level < self.height - 1:
            self.pending[level] = []
            self._push(level + 1, self._node(level, pend))

    def add(self, chunk_id: bytes) -> None:
        self._push(0, chunk_id)
        self.next += 1

    def add_many(self, chunk_ids: list[bytes]) -> None:
        """``add`` for each id, filling level 0 a node's worth at a time."""
        i, n = 0, len(chunk_ids)
        while i < n:
            pend = self.pending[0]
            take = min(n - i, self.fanout - len(pend)) if self.height > 1 else n - i
            if take == 1:
                self._push(0, chunk_ids[i])
            else:
                pend.extend(chunk_ids[i : i + take - 1])
                self._push(0, chunk_ids[i + take - 1])  # the last one may complete the node
            i += take
        self.next += n

    def add_subtree(self, level: int, node_id: bytes) -> None:
        """The next ``F**(level+1)`` chunks (fewer at the end of the volume) are those of the
        level-``level`` node ``node_id`` of a tree of the same geometry: it is reused as it is,
        without reading it. ``next`` must be a multiple of ``F**(level+1)``."""
        span = self.fanout ** (level + 1)
        if self.next % span or level + 1 >= self.height:
            raise ValueError(f"a level-{level} node cannot start at chunk {self.next}")
        self._push(level + 1, node_id)
        self.next = min(self.next + span, self.nchunks)

    def skip_to(self, index: int) -> None:
        """Chunks ``[next, index)`` are all zero."""
        f = self.fanout
        while self.next < index:
            level, span = 0, 1
            while level < self.height - 1 and self.next % (span * f) == 0 and self.next + span * f <= index:
                level += 1
                span *= f
            self._push(level, ZERO_ID)
            self.next += span

    def finish(self) -> bytes:
        """Return the root id (``ZERO_ID`` for an all-zero volume)."""
        self.skip_to(self.nchunks)
        for level in range(self.height - 1):
            if self.pending[level]:
                ids, self.pending[level] = self.pending[level], []
                self._push(level + 1, self._node(level, ids))
        return self._node(self.height - 1, self.pending[self.height - 1])


class TreeReader:
    """Read a tree: leaf nodes in order, or the chunk ids of any range (for incremental scans)."""

    def __init__(self, root: bytes, height: int, fanout: int, nchunks: int, load: LoadNode) -> None:
        self.root = root
        self.height = height
        self.fanout = fanout
        self.nchunks = nchunks
        self.load = load
        self._path: dict[int, tuple[int, list[bytes] | None]] = {}

    def leaves(self) -> Iterator[tuple[int, list[bytes]]]:
        """Yield ``(first chunk index, chunk ids)`` for every non-zero leaf node, in order."""
        if self.root == ZERO_ID:
            return
        yield from self._walk(self.root, self.height - 1, 0)

    def _walk(self, node: bytes, level: int, base: int) -> Iterator[tuple[int, list[bytes]]]:
        ids = self.load(node, level)
        span = self.fanout**level
        if len(ids) > self.fanout or (ids and base + (len(ids) - 1) * span >= self.nchunks):
            raise CorruptObject(name=f"tree node {node.hex()[:16]}", detail="shape does not fit the volume")
        if level == 0:
            yield base, ids
            return
        for j, child in enumerate(ids):
            if child != ZERO_ID:
                yield from self._walk(child, level - 1, base + j * span)

    def nodes(self, skip: Container[bytes] = ()) -> Iterator[tuple[int, bytes, list[bytes]]]:
        """Yield ``(level, node id, child ids)`` for every stored node, depth first; a node in
        ``skip`` is not loaded and nor is anything below it. Raise CorruptObject for a node whose
        shape does not fit the volume."""

        def walk(node: bytes, level: int, base: int) -> Iterator[tuple[int, bytes, list[bytes]]]:
            ids = self.load(node, level)
            span = self.fanout**level
            if len(ids) > self.fanout or not ids or base + (len(ids) - 1) * span >= self.nchunks:
                raise CorruptObject(
                    name=f"tree node {node.hex()[:16]}", detail="shape does not fit the volume"
                )
            yield level, node, ids
            if level:
                for j, child in enumerate(ids):
                    if child != ZERO_ID and child not in skip:
                        yield from walk(child, level - 1, base + j * span)

        if self.root != ZERO_ID and self.root not in skip:
            yield from walk(self.root, self.height - 1, 0)

    def _node_at(self, level: int, index: int) -> list[bytes] | None:
        """Child ids of the level-``level`` node number ``index`` (None if a hole)."""
        cached = self._path.get(level)
        if cached is not None and cached[0] == index:
            return cached[1]
        if level == self.height - 1:
            ids = None if self.root == ZERO_ID or index != 0 else self.load(self.root, level)
        else:
            parent = self._node_at(level + 1, index // self.fanout)
            j = index % self.fanout
            if parent is None or j >= len(parent) or parent[j] == ZERO_ID:
                ids = None
            else:
                ids = self.load(parent[j], level)
        self._path[level] = (index, ids)
        return ids

    def ids_range(self, start: int, count: int) -> list[bytes]:
        """Chunk ids of chunks ``[start, start+count)`` (``ZERO_ID`` beyond the end or in holes)."""
        out: list[bytes] = []
        f = self.fanout
        i, end = start, start + count
        while i < end:
            leaf = self._node_at(0, i // f)
            stop = min(end, (i // f + 1) * f)
            if leaf is None:
                out.extend([ZERO_ID] * (stop - i))
            else:
                lo = i % f
                part = leaf[lo : lo + (stop - i)]
                out.extend(part)
                out.extend([ZERO_ID] * (stop - i - len(part)))
            i = stop
        return out


def changed_chunks(a: TreeReader, b: TreeReader) -> Iterator[int]:
    """Indexes of chunks whose ids differ between two trees, skipping equal subtrees."""
    total = max(a.nchunks, b.nchunks)
    if a.height != b.height or a.fanout != b.fanout:
        step = a.fanout
        for start in range(0, total, step):
            n = min(step, total - start)
            for j, (x, y) in enumerate(zip(a.ids_range(start, n), b.ids_range(start, n), strict=True)):
                if x != y:
                    yield start + j
        return

    def rec(x: bytes, y: bytes, level: int, base: int) -> Iterator[int]:
        if x == y:
            return
        xs = a.load(x, level) if x != ZERO_ID else []
        ys = b.load(y, level) if y != ZERO_ID else []
        span = a.fanout**level
        for j in range(max(len(xs), len(ys))):
            cx = xs[j] if j < len(xs) else ZERO_ID
            cy = ys[j] if j < len(ys) else ZERO_ID
            if level == 0:
                if cx != cy:
                    yield base + j
            else:
                yield from rec(cx, cy, level - 1, base + j * span)

    yield from (i for i in rec(a.root, b.root, a.height - 1, 0) if i < total)


def runs(indexes: Iterator[int]) -> Iterator[tuple[int, int]]:
    """Coalesce increasing indexes into (first, count) runs."""
    first = prev = -2
    for i in indexes:
        if i != prev + 1:
            if first >= 0:
                yield first, prev - first + 1
            first = i
        prev = i
    if first >= 0:
        yield first, prev - first + 1
