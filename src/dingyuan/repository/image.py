"""A snapshot as a read-only block device: random access for exports (NBD, iSCSI) and clones.

An export lives for days and serves a volume of any size, so everything here is bounded and
lazy:

- **Opening costs nothing.** No tree walk and no index load: a read descends from the root to the
  leaf it needs through :class:`TreeIndex`, a thread-safe cache of decoded tree nodes bounded by
  count, and looks its chunks up in the local index cache (SQLite, on disk).
- **Random reads skip SQLite.** Loading a leaf also looks up where all its chunks are, in one
  query, and the image remembers those locations (an LRU of ``MAX_LOCATIONS``); a read of a
  chunk in a leaf already loaded finds it there. A query costs more than reading the chunk from
  the page cache, and the sqlite3 module hands the GIL over on every call.
- **Reads batch.** The chunks a read (or a read-ahead) needs are looked up at once, grouped by
  pack, coalesced into ranged reads of neighbouring blobs (:func:`restore.plan_runs`), and decoded
  -- decrypted, decompressed and checked against their id by ``Repository.decode_blob``, which
  drops the GIL -- by a few decoding threads (:class:`_Workers`). Every byte served has passed
  that check; a chunk that fails it fails the read with ``CorruptObject``, never returns other
  bytes.
- **Chunks are cached by id**, in an LRU bounded by bytes: a chunk that occurs at many offsets
  (dedup) is fetched once. A chunk being fetched lists the reads waiting for it, so concurrent
  readers (NBD multi-conn) never fetch it twice; a read (:class:`ChunkRead`) is woken once, when
  its last chunk arrives -- on two cores a thread switch per chunk cost more than the decode.
- **Reads need not block.** ``read`` waits in the caller's thread; ``read_soon`` (for an event
  loop: the NBD server, the iSCSI target) returns at once with a :class:`ChunkRead` that calls
  back when its data is at hand, leaving index lookups and decoding to the decoding threads. It
  declines (None) only a read whose tree node is not cached, the one load it would have to wait
  for. A random read that misses the cache is one job for one decoding thread, which looks the
  chunk up, reads and decodes it and calls back: two thread switches in all.
- **Sequential streams read ahead.** Each stream of reads that follow one another gets a window
  that doubles with every read up to ``max_readahead``; the next window is fetched in the
  background. Several streams are tracked at once (nbdcopy gives each connection its own region).
- **Holes are free.** A ``ZERO_ID`` chunk or subtree is never fetched; ``extents`` answers a
  hole by the highest tree level that is zero, so a 1 TiB hole costs a few node lookups.
- **No lock is held while open.** gc may rewrite packs under a long-lived image: when a blob's
  location turns out stale (its pack is gone), the index cache is synchronised once, the
  locations remembered are forgotten and the lookup retried.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..errors import (
    CorruptObject,
    ExportError,
    MissingObject,
    ObjectNotFound,
    ReadOnlyDevice,
    RepositoryError,
)
from .cache import Location
from .format import ZERO_ID, pack_name
from .manifest import Snapshot
from .ranges import check_range
from .repo import Repository
from .restore import Run, plan_runs

DEFAULT_CACHE_BYTES = 128 << 20  # decoded chunks kept per image
DEFAULT_WORKERS = min(4, os.cpu_count() or 2)  # decoding threads (more only contend for the GIL)
MAX_READAHEAD = 16 << 20  # largest read-ahead window of one stream
MAX_STREAMS = 8  # sequential streams tracked at once
NODE_CACHE = 1024  # decoded tree nodes (8 KiB each at the defaults): the leaves of 16 GiB
MAX_LOCATIONS = 1 << 16  # chunk locations remembered (~400 bytes each): 4 GiB of 64 KiB chunks

K = TypeVar("K")
V = TypeVar("V")

log = logging.getLogger("dingyuan.image")


class _Lru(Generic[K, V]):
    """A least-recently-used map bounded by the sum of ``cost(value)``; not thread-safe."""

    def __init__(self, capacity: int, cost: Callable[[V], int]) -> None:
        self.capacity = capacity
        self.cost = cost
        self.used = 0
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def put(self, key: K, value: V) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.used -= self.cost(old)
        self._items[key] = value
        self.used += self.cost(value)
        while self.used > self.capacity and len(self._items) > 1:
            _, evicted = self._items.popitem(last=False)
            self.used -= self.cost(evicted)


class _Workers:
    """Threads that run jobs from one queue, started at the first job; what a
    ``ThreadPoolExecutor`` does without a future per job. An event loop hands a job over for
    every random read that misses the cache, and the executor's ``submit`` (a future with its
    condition, a work item, a semaphore) cost the loop more than the rest of starting the read.

    A job must handle its own errors: one that raises is logged, nobody waits for its result.
    """

    def __init__(self, count: int, name: str) -> None:
        self._count = count
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job``; RuntimeError once closed."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name} workers are closed")
            if not self._threads:
                for n in range(self._count):
                    thread = threading.Thread(target=self._work, name=f"{self._name}_{n}", daemon=True)
                    thread.start()
                    self._threads.append(thread)
            self._jobs.put(job)

    def close(self) -> None:
        """Drop the jobs not started, let the running ones finish, and stop the threads."""
        with self._lock:
            self._closed = True
            threads = self._threads
        with contextlib.suppress(queue.Empty):
            while True:
                self._jobs.get_nowait()
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:
                log.exception("%s: a background job failed", self._name)


class TreeIndex:
    """Positional access to a snapshot's tree (format.md section 11), thread-safe.

    ``node(level, k)`` is node ``k`` of level ``level`` (None where the tree has a hole); it is
    loaded through its parent, so a lookup costs at most ``height`` node loads and usually none:
    decoded nodes stay in an LRU of ``max_nodes`` entries.
    """

    def __init__(self, snap: Snapshot, load: Callable[[bytes, int], list[bytes]], max_nodes: int) -> None:
        self.root = snap.root
        self.height = snap.height
        self.fanout = snap.fanout
        self.nchunks = snap.nchunks
        self._load = load
        self._nodes: _Lru[tuple[int, int], list[bytes] | None] = _Lru(max_nodes, lambda _: 1)
        self._lock = threading.Lock()
        self._loading = threading.RLock()  # re-entered: a node loads its parent first

    def node(self, level: int, k: int) -> list[bytes] | None:
        """Child ids of node ``k`` of level ``level``, or None if it is a hole (not stored)."""
        key = (level, k)
        with self._lock:
            if key in self._nodes:
                return self._nodes.get(key)
        with self._loading:  # one load at a time: readers that need the same node fetch it once
            with self._lock:
                if key in self._nodes:
                    return self._nodes.get(key)
            nid = self.entry(level + 1, k)
            ids = None if nid == ZERO_ID else self._load(nid, level)
            span = self.fanout**level
            first = k * self.fanout * span
            if ids is not None and (
                len(ids) > self.fanout or not ids or first + (len(ids) - 1) * span >= self.nchunks
            ):
                raise CorruptObject(
                    name=f"tree node {nid.hex()[:16]}", detail="shape does not fit the volume"
                )
            with self._lock:
                self._nodes.put(key, ids)
            return ids

    def entry(self, level: int, k: int) -> bytes:
        """The id covering chunks ``[k * F**level, (k+1) * F**level)``: a chunk id at level 0, the
        id of node ``k`` of level ``level - 1`` above, the root at ``level == height``."""
        if level >= self.height:
            return self.root if k == 0 else ZERO_ID
        parent = self.node(level, k // self.fanout)
        j = k % self.fanout
        return ZERO_ID if parent is None or j >= len(parent) else parent[j]

    def ids_range(self, start: int, count: int) -> list[bytes]:
        """Chunk ids of chunks ``[start, start + count)`` (``ZERO_ID`` in holes and past the end)."""
        return self._ids_range(start, count, self.node)

    def cached_ids_range(self, start: int, count: int) -> list[bytes] | None:
        """:meth:`ids_range` if every leaf it needs is cached, else None: never loads a node,
        so it never waits for storage."""
        try:
            return self._ids_range(start, count, self._cached_node)
        except _NotCached:
            return None

    def _cached_node(self, level: int, k: int) -> list[bytes] | None:
        with self._lock:
            if (level, k) not in self._nodes:
                raise _NotCached
            return self._nodes.get((level, k))

    def _ids_range(
        self, start: int, count: int, node: Callable[[int, int], list[bytes] | None]
    ) -> list[bytes]:
        out: list[bytes] = []
        f = self.fanout
        i, end = start, start + count
        while i < end:
            stop = min(end, (i // f + 1) * f)
            leaf = node(0, i // f) if i < self.nchunks else None
            if leaf is None:
                out.extend([ZERO_ID] * (stop - i))
            else:
                part = leaf[i % f : i % f + (stop - i)]
                out.extend(part)
                out.extend([ZERO_ID] * (stop - i - len(part)))
            i = stop
        return out

    def hole_end(self, i: int) -> int:
        """If chunk ``i`` lies in a hole of a whole leaf or more, the first chunk after the
        largest such hole (at most ``nchunks``); else ``i``."""
        span: int = self.fanout**self.height
        for level in range(self.height, 0, -1):
            k = i // span
            if self.entry(level, k) == ZERO_ID:
                return min((k + 1) * span, self.nchunks)
            span //= self.fanout
        return i


class _NotCached(Exception):
    """A tree node that is not in the cache (internal to :meth:`TreeIndex.cached_ids_range`)."""


Buffer = bytes | memoryview


class ChunkRead:
    """The chunks one read of a :class:`SnapshotImage` needs: those cached when it started, the
    others as their fetches finish. A read waits for its chunks with one wake-up, not one per
    chunk: every wake-up is a thread switch, and on a few cores those cost more than the waits.

    Its state is guarded by the image's lock; the image calls :meth:`_arrive` under it.
    """

    def __init__(self, image: SnapshotImage, offset: int, length: int, ids: list[bytes]) -> None:
        self._image = image
        self.offset = offset
        self.length = length
        self._ids = ids
        self._got: dict[bytes, bytes | BaseException] = {}
        self._left = 0  # chunks still being fetched
        self._ready: Callable[[], None] | None = None

    @property
    def done(self) -> bool:
        """Every chunk is at hand (or failed): :meth:`parts` will not wait."""
        with self._image._lock:
            return self._left == 0

    def when_ready(self, callback: Callable[[], None]) -> bool:
        """Have ``callback`` called, from a fetching thread, once every chunk is at hand; False
        (and no call) if they already are. The callback must be quick and must not raise."""
        with self._image._lock:
            if self._left == 0:
                return False
            self._ready = callback
            return True

    def wait(self) -> None:
        """Block until every chunk is at hand."""
        event = threading.Event()
        if self.when_ready(event.set):
            event.wait()

    def parts(self) -> list[Buffer]:
        """The range's bytes, as consecutive buffers (views of cached chunks: not copied), once
        :attr:`done`; raises the error of a chunk that could not be fetched or failed its check."""
        image, cs, offset, length = self._image, self._image._cs, self.offset, self.length
        first = offset // cs
        out: list[Buffer] = []
        for n, bid in enumerate(self._ids):
            i = first + n
            want = min(cs, image.size - i * cs)
            if bid == ZERO_ID:
                data = image._zero
            else:
                value = self._got[bid]
                if isinstance(value, BaseException):
                    raise value
                data = value
                if len(data) != want:
                    raise CorruptObject(
                        name=f"{image.name} chunk {bid.hex()[:16]}",
                        detail=f"{len(data)} bytes at chunk {i}, expected {want}",
                    )
            lo = offset - i * cs if n == 0 else 0
            hi = min(want, offset + length - i * cs)
            out.append(memoryview(data)[lo:hi] if lo or hi != len(data) else data)
        return out

    def _arrive(self, bid: bytes, value: bytes | BaseException) -> Callable[[], None] | None:
        """Under the image's lock: a chunk arrived; the callback to call (outside the lock) if
        it was the last."""
        self._got[bid] = value
        self._left -= 1
        if self._left == 0 and self._ready is not None:
            ready, self._ready = self._ready, None
            return ready
        return None


def _call_all(callbacks: Iterable[Callable[[], None] | None]) -> None:
    for callback in callbacks:
        if callback is not None:
            callback()


@dataclass
class _Stream:
    """A run of sequential reads: the chunk after the furthest read, its window, how far ahead
    has been fetched, and when it was last used."""

    next: int
    window: int
    ahead: int
    used: int


class SnapshotImage:
    """A snapshot as a read-only :class:`~dingyuan.exports.blockdev.BlockDevice` (structurally).

    Thread-safe. ``cache_bytes`` bounds the decoded chunks kept (read-ahead lands there too, so
    it should hold a window per stream), ``workers`` the decoding threads, ``max_readahead`` the
    read-ahead window of one sequential stream. Memory stays within about ``cache_bytes``, plus
    two runs (``restore.MAX_RUN``) per worker, ``NODE_CACHE`` tree nodes and ``MAX_LOCATIONS``
    chunk locations, whatever the volume's size. Holds no repository lock; call :meth:`close` when done.
    """

    def __init__(
        self,
        repo: Repository,
        snap: Snapshot,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        workers: int = DEFAULT_WORKERS,
        max_readahead: int = MAX_READAHEAD,
        name: str | None = None,
    ) -> None:
        self.repo = repo
        self.snap = snap
        self.name = name or f"snapshot {snap.id[:12]}"
        self.tree = TreeIndex(snap, self._load_node, NODE_CACHE)
        self._cs = snap.chunk_size
        self._zero = bytes(self._cs)
        self._max_window = max(1, max_readahead // self._cs)
        self._lock = threading.Lock()  # guards the chunk cache, in-flight chunks, reads and streams
        self._chunks: _Lru[bytes, bytes] = _Lru(cache_bytes, len)
        self._inflight: dict[bytes, list[ChunkRead]] = {}  # chunks being fetched: who waits
        self._streams: list[_Stream] = []
        self._tick = 0
        self._locations: _Lru[bytes, Location] = _Lru(MAX_LOCATIONS, lambda _: 1)
        self._sync_lock = threading.Lock()
        self._index_generation = 0
        self._pool = _Workers(workers, "image")
        self._planner = _Workers(1, "image-ahead")
        self._closed = False

    # the BlockDevice interface ---------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.snap.size

    @property
    def read_only(self) -> bool:
        return True

    @property
    def block_size(self) -> int:
        return self._cs

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        cs = self._cs
        first, last = offset // cs, (offset + length - 1) // cs + 1
        ids = self.tree.ids_range(first, last - first)
        self._read_ahead(first, last)
        pending = ChunkRead(self, offset, length, ids)
        self._request(ids, pending)
        pending.wait()
        parts = pending.parts()
        return parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)

    def read_soon(self, offset: int, length: int) -> ChunkRead | None:
        """Start a read without blocking, for callers on an event loop: the :class:`ChunkRead` of
        the range if every tree node it needs is cached (chunks not yet cached or being fetched
        are looked up and fetched by a decoding thread); else None, and the caller should
        :meth:`read` in a thread (a tree node load would block)."""
        self._check(offset, length)
        cs = self._cs
        first, last = offset // cs, (offset + length - 1) // cs + 1
        ids = self.tree.cached_ids_range(first, last - first)
        if ids is None:
            return None
        pending = ChunkRead(self, offset, length, ids)
        self._request(ids, pending, background=True)
        self._read_ahead(first, last)
        return pending

    def write(self, offset: int, data: bytes) -> None:
        self._refuse()

    def write_zeroes(self, offset: int, length: int) -> None:
        self._refuse()

    def trim(self, offset: int, length: int) -> None:
        self._refuse()

    def flush(self) -> None:
        """Nothing to make durable: a snapshot never changes."""

    def cache(self, offset: int, length: int) -> None:
        """Fetch the range in the background (at most half the chunk cache of it)."""
        self._check(offset, length)
        first = offset // self._cs
        count = min((offset + length - 1) // self._cs + 1 - first, self._chunks.capacity // 2 // self._cs)
        if count > 0:
            self._prefetch(first, first + count)

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        self._check(offset, length)
        cs, f, end = self._cs, self.tree.fanout, offset + length
        out: list[tuple[int, bool]] = []

        def add(n: int, zero: bool) -> None:
            if out and out[-1][1] == zero:
                out[-1] = (out[-1][0] + n, zero)
            else:
                out.append((n, zero))

        pos = offset
        while pos < end:
            i = pos // cs
            hole_end = self.tree.hole_end(i)
            if hole_end > i:
                stop = min(hole_end * cs, end)
                add(stop - pos, True)
                pos = stop
                continue
            leaf = self.tree.node(0, i // f) or []
            leaf_end = min((i // f + 1) * f, self.tree.nchunks)
            if ZERO_ID not in leaf and len(leaf) == leaf_end - i // f * f:  # all data: one step
                stop = min(leaf_end * cs, end)
                add(stop - pos, False)
                pos = stop
                continue
            while i < leaf_end and pos < end:
                stop = min((i + 1) * cs, end)
                j = i % f
                add(stop - pos, j >= len(leaf) or leaf[j] == ZERO_ID)
                pos, i = stop, i + 1
        return out

    def close(self) -> None:
        """Stop the background work; reads still waiting fail with ExportError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._planner.close()
        self._pool.close()
        with self._lock:
            stranded = list(self._inflight)
        self._publish([(bid, ExportError(f"{self.name} was closed")) for bid in stranded])

    def __enter__(self) -> SnapshotImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # checks ----------------------------------------------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        check_range(self.name, self._closed, self.size, offset, length)

    def _refuse(self) -> None:
        raise ReadOnlyDevice(name=self.name, detail="a snapshot never changes; write to a clone of it")

    # tree nodes and the index ----------------------------------------------------------------
    def _resync(self, seen: int) -> None:
        """Synchronise the index cache once for every reader that saw generation ``seen`` fail,
        and forget the locations remembered from the old one."""
        with self._sync_lock:
            if self._index_generation == seen:
                self.repo.sync_index()
                with self._lock:
                    self._index_generation += 1
                    self._locations = _Lru(MAX_LOCATIONS, lambda _: 1)

    def _load_node(self, bid: bytes, level: int) -> list[bytes]:
        seen = self._index_generation
        try:
            ids = self.repo.load_tree_node(bid, level)
        except MissingObject:  # gc may have moved it: look again in a fresh index
            self._resync(seen)
            seen = self._index_generation
            ids = self.repo.load_tree_node(bid, level)
        if level == 0:  # a leaf: where its chunks are, in one query, for the reads to come
            self._remember(self.repo.cache.lookup_many(b for b in ids if b != ZERO_ID), seen)
        return ids

    def _remember(self, locs: dict[bytes, Location], seen: int) -> None:
        """Keep locations looked up in index generation ``seen``, unless it has passed since."""
        with self._lock:
            if self._index_generation == seen:
                for bid, loc in locs.items():
                    self._locations.put(bid, loc)

    def _locate(self, ids: list[bytes], seen: int) -> dict[bytes, Location]:
        """Where ``ids`` are: from the locations remembered, else from the index cache."""
        locs: dict[bytes, Location] = {}
        with self._lock:
            for bid in ids:
                loc = self._locations.get(bid)
                if loc is not None:
                    locs[bid] = loc
        if len(locs) < len(ids):
            found = self.repo.cache.lookup_many([b for b in ids if b not in locs])
            self._remember(found, seen)
            locs.update(found)
        if len(locs) < len(ids):
            self._resync(seen)
            locs.update(self.repo.cache.lookup_many([b for b in ids if b not in locs]))
        return locs

    # fetching chunks -------------------------------------------------------------------------
    def _request(self, ids: Iterable[bytes], reader: ChunkRead | None, *, background: bool = False) -> None:
        """Give ``reader`` each chunk that is cached and register it with those being fetched;
        start fetching the others -- with ``background``, from their lookup on, in a decoding
        thread, so that the caller never waits (and a lone run is decoded by the thread that
        looked it up: one thread switch less for a random read)."""
        new: list[bytes] = []
        with self._lock:
            wanted = dict.fromkeys(b for b in ids if b != ZERO_ID)
            for bid in wanted:
                data = self._chunks.get(bid)
                if data is not None:
                    if reader is not None:
                        reader._got[bid] = data
                    continue
                waiting = self._inflight.get(bid)
                if waiting is None:
                    waiting = self._inflight[bid] = []
                    new.append(bid)
                if reader is not None:
                    waiting.append(reader)
                    reader._left += 1
            seen = self._index_generation
        if not new:
            return
        if not background:
            self._fetch(new, seen)
            return
        try:
            self._pool.submit(lambda: self._fetch(new, seen, inline=True))
        except RuntimeError:  # closed meanwhile
            self._publish([(bid, ExportError(f"{self.name} is closed")) for bid in new])

    def _fetch(self, ids: list[bytes], seen: int, *, inline: bool = False) -> None:
        """Fetch ``ids`` (registered in flight): one lookup, then runs of neighbouring blobs,
        each decoded by a worker -- the last one by this thread if ``inline`` (it is a worker)."""
        try:
            locs = self._locate(ids, seen)
            for bid in ids:
                if bid not in locs:
                    self._fail(bid, MissingObject(name=f"chunk {bid.hex()}", detail="not in any index"))
            runs = plan_runs(locs, {b: [] for b in locs})
            last = runs.pop() if inline and runs else None
            for run in runs:
                self._pool.submit(functools.partial(self._fetch_run, run, seen))
            if last is not None:
                self._fetch_run(last, seen)
        except BaseException as e:  # a closed pool, a failed lookup: every waiter gets it
            err = e if isinstance(e, RepositoryError) else ExportError(f"{self.name}: {e}")
            for bid in ids:
                self._fail(bid, err)

    def _fetch_run(self, run: Run, seen: int) -> None:
        """Worker: read one ranged run of a pack and decode its blobs into the cache."""
        pack, start, length, blobs = run
        name = pack_name(pack)
        try:
            stored = self.repo.backend.get_range(name, start, length)
        except ObjectNotFound:
            if seen == -1:
                for entry, _ in blobs:
                    self._fail(entry.id, MissingObject(name=name, detail="pack listed by the index"))
            else:  # gc repacked since we looked: once more from a fresh index
                self._resync(seen)
                ids = [entry.id for entry, _ in blobs]
                locs = self.repo.cache.lookup_many(ids)
                for bid in ids:
                    if bid not in locs:
                        self._fail(bid, MissingObject(name=f"chunk {bid.hex()}", detail="not in any index"))
                for again in plan_runs(locs, {b: [] for b in locs}):
                    self._fetch_run(again, -1)
            return
        except BaseException as e:
            for entry, _ in blobs:
                self._fail(entry.id, e)
            return
        mv = memoryview(stored)
        done: list[tuple[bytes, bytes | BaseException]] = []
        for entry, _ in blobs:
            plain: bytes | BaseException
            try:
                plain = self.repo.decode_blob(
                    entry, mv[entry.offset - start : entry.offset - start + entry.length], name
                )
            except BaseException as e:
                plain = e
            done.append((entry.id, plain))
        self._publish(done)

    def _publish(self, done: list[tuple[bytes, bytes | BaseException]]) -> None:
        """Cache the decoded chunks and hand them (or their errors) to the reads waiting for
        them, all under one hold of the lock; a read whose last chunk this was is woken after."""
        ready = []
        with self._lock:
            for bid, value in done:
                if isinstance(value, bytes):
                    self._chunks.put(bid, value)
                ready += [r._arrive(bid, value) for r in self._inflight.pop(bid, ())]
        _call_all(ready)

    def _fail(self, bid: bytes, err: BaseException) -> None:
        self._publish([(bid, err)])

    # read-ahead ------------------------------------------------------------------------------
    def _read_ahead(self, first: int, last: int) -> None:
        """Follow the stream this read belongs to and fetch its next window in the background."""
        n = self.tree.nchunks
        with self._lock:
            self._tick += 1
            # A read continues a stream if it starts near where the stream got to: within two
            # reads' length, or within its window once it has one (requests in flight on one
            # connection arrive out of order). Random reads stay apart and fetch nothing more.
            reach = 2 * (last - first)
            stream = next((s for s in self._streams if abs(first - s.next) <= max(s.window, reach)), None)
            if stream is None:
                if len(self._streams) >= MAX_STREAMS:
                    self._streams.remove(min(self._streams, key=lambda s: s.used))
                self._streams.append(_Stream(last, 0, last, self._tick))
                return
            stream.used = self._tick
            stream.next = max(stream.next, last)
            stream.window = min(self._max_window, max(2 * stream.window, 2 * (last - first)))
            target = min(stream.next + stream.window, n)
            if stream.ahead - stream.next >= stream.window // 2 or stream.ahead >= target:
                return
            lo, stream.ahead = max(stream.ahead, stream.next), target
        self._prefetch(lo, target)

    def _prefetch(self, first: int, last: int) -> None:
        def plan() -> None:
            self._request(self.tree.ids_range(first, last - first), None)

        with contextlib.suppress(RuntimeError):  # closed meanwhile: a hint, nothing lost
            self._planner.submit(plan)
