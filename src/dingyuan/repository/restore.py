"""Restore a snapshot to a file or block device: fully, as a delta, or resuming.

One pipeline serves the three (:class:`ChunkPipeline`): the blobs of the chunks wanted are looked
up, grouped by pack, coalesced into ranged reads of neighbouring blobs, and fetched by worker
threads that decrypt, decompress and verify each chunk against its id; the main thread
``pwrite`` s them, in volume order. A chunk that fails verification stops the restore with an
error; nothing unverified is ever written.

- **Full** (the default): the main thread hands the pipeline :class:`Batch` es, the tree's leaves
  (256 chunks), whose ranged reads go to the workers. A new or regular-file target is truncated
  and left sparse where the snapshot has holes; a block device gets zeros written there.
- **Delta** (``delta=True``, :mod:`.delta`): the target must exist; the workers read and hash it
  a window at a time, and the worker that finds a window's differing chunks fetches them at once
  (:meth:`ChunkPipeline.fetch_all`). Of a differing chunk only the pages that differ from the
  target are written, and of a hole of the snapshot only the pages that are not zero are zeroed.
- **Resume** (``resume=True``): the restore's journal (:mod:`.restore_journal`) names the chunks
  already on disk; the restore continues after them, in the journal's mode. Without a journal,
  resuming an existing target is a delta restore.

A target whose journal belongs to another snapshot is refused unless ``force``: it is in the
middle of a different restore, which is more likely a mistaken target than an intent.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import CorruptObject, MissingObject, ObjectNotFound, RestoreTargetError
from .cache import Location
from .delta import WindowDiff, changed_pages, differing_chunks
from .format import ZERO_ID, BlobEntry, pack_name
from .manifest import Snapshot
from .repo import Repository
from .restore_journal import Journal, JournalState, journal_path, read_journal, remove_journal
from .restore_target import open_existing, open_target, write_zeros, zero_file_range
from .threads import responsive_threads

MAX_RUN = 4 << 20  # bytes per ranged read
INFLIGHT = 4
CHECKPOINT_BYTES = 64 << 20  # journal checkpoints: a resume refetches at most this much

Progress = Callable[[int, int], None]


@dataclass
class RestoreStats:
    """What a restore did. ``chunks_compared`` and ``chunks_differing`` count the chunks a delta
    scan read and found different; ``bytes_fetched`` is stored bytes read from packs;
    ``resumed_at`` the first byte this run restored (0 unless it resumed from a journal)."""

    mode: str
    resumed_at: int = 0
    chunks_compared: int = 0
    chunks_differing: int = 0
    chunks_fetched: int = 0
    bytes_fetched: int = 0
    bytes_written: int = 0
    bytes_zeroed: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Batch:
    """Chunks to fetch (id to target offsets) and byte ranges to zero; once done, every chunk
    before index ``end`` holds the snapshot's bytes."""

    end: int
    wanted: dict[bytes, list[int]]
    zeros: list[tuple[int, int]]


Run = tuple[bytes, int, int, list[tuple[BlobEntry, list[int]]]]  # pack, start, length, blobs


def plan_runs(locs: dict[bytes, Location], wanted: dict[bytes, list[int]]) -> list[Run]:
    """Group blobs by pack and coalesce neighbours into ranged reads of at most MAX_RUN bytes."""
    by_pack: dict[bytes, list[BlobEntry]] = defaultdict(list)
    for bid in wanted:
        loc = locs[bid]
        by_pack[loc.pack].append(loc.entry)
    runs: list[Run] = []
    for pack, entries in by_pack.items():
        entries.sort(key=lambda e: e.offset)
        cur: list[tuple[BlobEntry, list[int]]] = []
        start = end = 0
        for e in entries:
            if cur and (e.offset != end or e.offset + e.length - start > MAX_RUN):
                runs.append((pack, start, end - start, cur))
                cur = []
            if not cur:
                start = e.offset
            cur.append((e, wanted[e.id]))
            end = e.offset + e.length
        if cur:
            runs.append((pack, start, end - start, cur))
    return runs


Fetched = tuple[list[tuple[int, bytes]], int, int]  # (target offset, data) pairs, bytes read, blobs


class ChunkPipeline:
    """Fetch, verify and write the batches' chunks; the main thread is the only writer."""

    def __init__(
        self,
        repo: Repository,
        snap: Snapshot,
        fd: int,
        target: str,
        pool: ThreadPoolExecutor,
        stats: RestoreStats,
        zero: Callable[[int, int, int], None],
        on_done: Callable[[int], None],
    ) -> None:
        self.repo, self.snap, self.fd, self.target, self.pool = repo, snap, fd, target, pool
        self.stats = stats
        self.zero = zero
        self.on_done = on_done
        self.inflight: deque[Future[Fetched] | int] = deque()  # fetches, and batch ends after them
        self.fetching = 0

    def put(self, batch: Batch) -> None:
        """Write a batch's zeros, and fetch its chunks in the workers (at most ``INFLIGHT``
        ranged reads at once) to be written as they come back, in order."""
        self._zero(batch.zeros)
        for run in self.plan(batch.wanted):
            self.inflight.append(self.pool.submit(self.fetch, run))
            self.fetching += 1
            while self.fetching >= INFLIGHT:
                self._pop()
        self.inflight.append(batch.end)

    def put_fetched(self, end: int, zeros: list[tuple[int, int]], fetched: Fetched) -> None:
        """Write what a worker has fetched already (:meth:`fetch_all`) and the zeros beside it:
        then every chunk before ``end`` is done. Not mixed with :meth:`put`."""
        self._zero(zeros)
        self._written(fetched)
        self.on_done(end)

    def plan(self, wanted: dict[bytes, list[int]]) -> list[Run]:
        """The ranged reads that fetch ``wanted``; a chunk no index lists stops the restore."""
        locs = self.repo.cache.lookup_many(wanted)
        missing = [b for b in wanted if b not in locs]
        if missing:
            raise MissingObject(name=f"chunk {missing[0].hex()}", detail="not in any index")
        return plan_runs(locs, wanted)

    def fetch_all(self, wanted: dict[bytes, list[int]]) -> Fetched:
        """Worker: look up, read and verify every chunk of ``wanted``, one ranged read after the
        other (a delta's window holds few chunks, fetched by the worker that found them)."""
        pieces: list[tuple[int, bytes]] = []
        nbytes = nblobs = 0
        for run in self.plan(wanted):
            got, n, b = self.fetch(run)
            pieces += got
            nbytes += n
            nblobs += b
        return pieces, nbytes, nblobs

    def _zero(self, zeros: list[tuple[int, int]]) -> None:
        for start, end in zeros:
            self.zero(self.fd, start, end)
            self.stats.bytes_zeroed += end - start

    def finish(self) -> None:
        while self.inflight:
            self._pop()

    def _pop(self) -> None:
        item = self.inflight.popleft()
        if isinstance(item, int):
            self.on_done(item)
            return
        self.fetching -= 1
        self._written(item.result())

    def _written(self, fetched: Fetched) -> None:
        pieces, nbytes, nblobs = fetched
        self.stats.bytes_fetched += nbytes
        self.stats.chunks_fetched += nblobs
        self.stats.bytes_written += self.write(pieces)

    def fetch(self, run: Run) -> Fetched:
        """Worker: read a run of blobs and verify each."""
        pack, start, length, blobs = run
        cs, size = self.snap.chunk_size, self.snap.size
        name = pack_name(pack)
        try:
            data = self.repo.backend.get_range(name, start, length)
        except ObjectNotFound:
            raise MissingObject(name=name, detail="pack listed by the index") from None
        mv = memoryview(data)
        out = []
        for entry, offsets in blobs:
            plain = self.repo.decode_blob(
                entry, mv[entry.offset - start : entry.offset - start + entry.length], name
            )
            for off in offsets:
                if len(plain) != min(cs, size - off):
                    raise CorruptObject(name=name, detail=f"chunk for offset {off} has the wrong length")
                out.append((off, plain))
        return out, length, len(blobs)

    def write(self, pieces: list[tuple[int, bytes]]) -> int:
        """Neighbouring chunks go out in one pwritev."""
        pieces.sort(key=lambda p: p[0])
        i = 0
        while i < len(pieces):
            start = end = pieces[i][0]
            group: list[bytes] = []
            while i < len(pieces) and pieces[i][0] == end and len(group) < 512:
                group.append(pieces[i][1])
                end += len(pieces[i][1])
                i += 1
            if os.pwritev(self.fd, group, start) != end - start:
                raise RestoreTargetError(target=self.target, detail=f"short write at offset {start}")
        return sum(len(p[1]) for p in pieces)


def full_batches(repo: Repository, snap: Snapshot, first: int, sparse: bool) -> Iterator[Batch]:
    """Leaf by leaf from chunk ``first``: every stored chunk, and (unless ``sparse``: the target
    reads as zeros there already) zeros for every other."""
    cs, size = snap.chunk_size, snap.size
    done_to = first * cs
    for base, ids in repo.tree(snap).leaves():
        if base + len(ids) <= first:
            continue
        wanted: dict[bytes, list[int]] = defaultdict(list)
        zeros: list[tuple[int, int]] = []
        if not sparse and done_to < base * cs:
            zeros.append((done_to, base * cs))
        for j in range(max(0, first - base), len(ids)):
            off = (base + j) * cs
            if ids[j] != ZERO_ID:
                wanted[ids[j]].append(off)
            elif not sparse:
                zeros.append((off, min(off + cs, size)))
        done_to = min((base + len(ids)) * cs, size)
        yield Batch(base + len(ids), wanted, zeros)
    nchunks = -(-size // cs)
    yield Batch(nchunks, {}, [] if sparse or done_to >= size else [(done_to, size)])


def restore_delta(
    pipe: ChunkPipeline,
    repo: Repository,
    snap: Snapshot,
    fd: int,
    target: str,
    first: int,
    pool: ThreadPoolExecutor,
    stats: RestoreStats,
) -> None:
    """From chunk ``first``: fetch and write the chunks of the target that differ from the
    snapshot's. The worker that compared a window fetches its differing chunks at once, so
    comparing, fetching and writing overlap, and a window costs the main thread one result."""
    cs = snap.chunk_size

    def fetch(diff: WindowDiff) -> Fetched:
        wanted: dict[bytes, list[int]] = defaultdict(list)
        for index, bid in diff.fetch:
            wanted[bid].append(index * cs)
        pieces, nbytes, nblobs = pipe.fetch_all(wanted)
        return changed_pages(fd, target, pieces), nbytes, nblobs

    for end, compared, diff, fetched in differing_chunks(repo, snap, fd, target, first, pool, fetch):
        stats.chunks_compared += compared
        stats.chunks_differing += diff.differing
        pipe.put_fetched(end, diff.zeros, fetched)


def restore(
    repo: Repository,
    snap: Snapshot,
    target: str,
    progress: Progress | None = None,
    workers: int = 2,
    fsync: bool = True,
    *,
    delta: bool = False,
    resume: bool = False,
    force: bool = False,
    checkpoint_bytes: int = CHECKPOINT_BYTES,
) -> RestoreStats:
    """Restore ``snap`` to ``target`` (see the module docstring for ``delta``, ``resume`` and
    ``force``). With ``fsync`` (the default) the target is flushed to stable storage before
    returning, and a journal every ``checkpoint_bytes`` lets an interrupted run resume."""
    t0 = time.monotonic()
    with repo.lock(exclusive=False, purpose=f"restore {snap.id[:12]}"):
        repo.sync_index()
        jpath = journal_path(target, repo.cache.path.parent)
        found = None if force else read_journal(jpath, target)
        if found is not None and found.snapshot != snap.id:
            raise RestoreTargetError(
                target=target,
                detail=f"it holds an interrupted restore of snapshot {found.snapshot[:12]}: "
                "resume that one, or start over with --force",
            )
        first = 0
        if resume and found is not None:
            first, delta = found.done, delta or found.mode == "delta"
        elif resume and os.path.exists(target):
            delta = True
        stats = RestoreStats("delta" if delta else "full", resumed_at=min(first * snap.chunk_size, snap.size))
        fd, regular = open_existing(target, snap.size) if delta or first else open_target(target, snap.size)
        try:
            journal: Journal | None = None
            if fsync:
                state = JournalState(snap.id, snap.chunk_size, snap.size, stats.mode, first)
                journal = Journal(jpath, state, fd, checkpoint_bytes)
            else:
                remove_journal(jpath)  # what this run writes is not known to be durable
            _run(repo, snap, target, fd, regular, first, stats, progress, workers, journal)
            if fsync:
                os.fsync(fd)
            if journal is not None:
                journal.remove()
        except OSError as e:
            raise RestoreTargetError(target=target, detail=e.strerror or str(e)) from None
        finally:
            os.close(fd)
    if progress:
        progress(snap.size, snap.size)
    stats.seconds = time.monotonic() - t0
    return stats


def _run(
    repo: Repository,
    snap: Snapshot,
    target: str,
    fd: int,
    regular: bool,
    first: int,
    stats: RestoreStats,
    progress: Progress | None,
    workers: int,
    journal: Journal | None,
) -> None:
    """Write chunks ``[first, n)`` of the snapshot to the open target."""
    cs, size = snap.chunk_size, snap.size

    def on_done(end: int) -> None:
        if progress:
            progress(min(end * cs, size), size)
        if journal is not None:
            journal.advance(end)

    zero = zero_file_range if regular else write_zeros
    with responsive_threads(), ThreadPoolExecutor(workers, thread_name_prefix="restore") as pool:
        pipe = ChunkPipeline(repo, snap, fd, target, pool, stats, zero, on_done)
        if stats.mode == "delta":
            restore_delta(pipe, repo, snap, fd, target, first, pool, stats)
        else:
            for batch in full_batches(repo, snap, first, sparse=regular):
                pipe.put(batch)
        pipe.finish()
