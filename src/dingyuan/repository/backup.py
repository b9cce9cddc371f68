"""Back up a volume (file or block device) into a new snapshot.

Pipeline, per batch of chunks (a few MiB, read with one ``pread``)::

    main thread: read batch ──► worker: zero check, keyed BLAKE3, compare with the parent's
                                id at the same offset, else ask the index; new chunks are
                                compressed (zstd, when that helps) and encrypted
    main thread: results in volume order ──► tree builder, blob writer (packs uploaded by a
                                background thread)

Holes of sparse files are skipped without reading (SEEK_DATA/SEEK_HOLE). Memory is bounded by
the number of batches in flight, one pack being built and two being uploaded.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import blake3
import zstandard

from ..errors import SourceError, UsageError
from .backends.base import Buffer
from .format import ZERO_ID, BlobType, Codec, encode_tree_node
from .manifest import CONSISTENCY_LEVELS, Snapshot, utcnow
from .repo import DEFAULT_CHUNK_SIZE, DEFAULT_FANOUT, Repository
from .threads import responsive_threads
from .tree import TreeBuilder, TreeReader
from .writer import BlobWriter

MIN_CHUNK = 4 << 10
MAX_CHUNK = 4 << 20
BATCH_BYTES = 4 << 20
INFLIGHT = 4
COMPRESS_LEVEL = 1

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def check_chunk_size(size: int) -> int:
    if size < MIN_CHUNK or size > MAX_CHUNK or size & (size - 1):
        raise UsageError(f"chunk size {size} must be a power of two from 4 KiB to 4 MiB")
    return size


@dataclass
class BackupResult:
    snapshot: Snapshot
    bytes_scanned: int
    chunks_new: int
    bytes_new: int
    bytes_stored: int
    seconds: float


def source_size(fd: int, path: str) -> int:
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    raise SourceError(source=path, detail="not a regular file or block device")


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield (start, end) byte ranges that may hold data; holes are skipped."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole remains
                return
            yield pos, size  # SEEK_DATA unsupported: everything may be data
            return
        if start >= size:
            return
        try:
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError:
            end = size
        yield start, end
        pos = end


Run = tuple[int, int]  # (first chunk, chunk count)
BatchResult = tuple[list[bytes], dict[int, tuple[Codec, int, "Buffer"]]]


def chunk_runs(fd: int, size: int, cs: int) -> Iterator[Run]:
    """Yield runs of chunks, in order, covering every chunk that may hold data."""
    nchunks = -(-size // cs)
    nxt = 0
    for start, end in data_extents(fd, size):
        first = max(start // cs, nxt)
        last = min(-(-end // cs), nchunks)
        if last > first:
            yield first, last - first
        nxt = max(nxt, last)


def chunk_batches(fd: int, size: int, cs: int, per_batch: int) -> Iterator[list[Run]]:
    """Group the runs into batches of at most ``per_batch`` chunks (a file with many small
    extents would otherwise make thousands of one-chunk batches)."""
    batch: list[Run] = []
    room = per_batch
    for first, count in chunk_runs(fd, size, cs):
        while count:
            take = min(count, room)
            batch.append((first, take))
            first, count, room = first + take, count - take, room - take
            if not room:
                yield batch
                batch, room = [], per_batch
    if batch:
        yield batch


class BlobSink(Protocol):
    """Where a scan's new blobs go: the local repository (:class:`RepoSink`) or, for an agent, an
    upload to the vault. ``present``, ``claim`` and ``seal`` are called from worker threads."""

    id_key: bytes

    @property
    def bytes_stored(self) -> int:
        """Bytes added so far, as stored."""
        ...

    def present(self, ids: list[bytes]) -> set[bytes]:
        """The ids among ``ids`` that need not be stored again."""
        ...

    def claim(self, bid: bytes) -> bool:
        """True if ``bid`` is new to this scan (the caller must then add it)."""
        ...

    def seal(self, bid: bytes, btype: BlobType, payload: Buffer) -> Buffer:
        """The bytes to store for ``payload``; must not refer to ``payload``'s memory."""
        ...

    def add(self, bid: bytes, btype: BlobType, codec: Codec, raw_length: int, stored: Buffer) -> None: ...

    def node_is_new(self, nid: bytes) -> bool:
        """True if tree node ``nid`` must be added (then it is claimed)."""
        ...

    def flush(self) -> None:
        """Return once everything added is durable."""
        ...


class RepoSink:
    """New blobs go into the local repository: sealed with its key, packed by a BlobWriter."""

    def __init__(self, repo: Repository, writer: BlobWriter) -> None:
        self.repo = repo
        self.writer = writer
        self.id_key = repo.cipher.id_key

    @property
    def bytes_stored(self) -> int:
        return self.writer.bytes_stored

    def present(self, ids: list[bytes]) -> set[bytes]:
        return self.repo.cache.present(ids)

    def claim(self, bid: bytes) -> bool:
        return self.writer.claim(bid)

    def seal(self, bid: bytes, btype: BlobType, payload: Buffer) -> Buffer:
        return self.repo.cipher.seal_blob(payload, bid + bytes([btype]))

    def add(self, bid: bytes, btype: BlobType, codec: Codec, raw_length: int, stored: Buffer) -> None:
        self.writer.add(bid, btype, codec, raw_length, stored)

    def node_is_new(self, nid: bytes) -> bool:
        return self.writer.is_new(nid)

    def flush(self) -> None:
        self.writer.flush()


class BatchWorker:
    """Per-batch work, run in a thread pool (BLAKE3, zstd and AES release the GIL)."""

    def __init__(self, sink: BlobSink, fd: int, source: str, cs: int) -> None:
        self.sink = sink
        self.fd = fd
        self.source = source
        self.cs = cs
        self.zero_ids: dict[int, bytes] = {}
        self.local = threading.local()

    def zero_id(self, n: int) -> bytes:
        """Id of an all-zero chunk of ``n`` bytes: comparing ids spares a copy per chunk."""
        zid = self.zero_ids.get(n)
        if zid is None:
            zid = self.zero_ids[n] = blake3.blake3(bytes(n), key=self.sink.id_key).digest()
        return zid

    def _read(self, buf: memoryview, runs: list[Run], size: int) -> memoryview:
        """Read the runs back to back into ``buf`` (in the worker: the copy out of the page
        cache is spread over the cores)."""
        cs, pos = self.cs, 0
        for first, count in runs:
            offset = first * cs
            length = min(count * cs, size - offset)
            try:
                got = os.preadv(self.fd, [buf[pos : pos + length]], offset)
            except OSError as e:
                raise SourceError(source=self.source, detail=f"at offset {offset}: {e.strerror}") from None
            if got != length:
                raise SourceError(
                    source=self.source, detail=f"short read at offset {offset}: did its size change?"
                )
            pos += length
        return buf[:pos]

    def __call__(
        self, buf: memoryview, runs: list[Run], size: int, parent_ids: list[bytes] | None
    ) -> BatchResult:
        """Ids of the batch's chunks in order, and the sealed blobs of the new ones by position."""
        buf = self._read(buf, runs, size)
        zc: zstandard.ZstdCompressor | None = getattr(self.local, "zc", None)
        if zc is None:
            zc = self.local.zc = zstandard.ZstdCompressor(level=COMPRESS_LEVEL, write_content_size=False)
        sink, cs, key, hasher = self.sink, self.cs, self.sink.id_key, blake3.blake3
        ids = [hasher(buf[p : p + cs], key=key).digest() for p in range(0, len(buf), cs)]
        zero = self.zero_id(cs)
        if len(buf) % cs and ids[-1] == self.zero_id(len(buf) % cs):
            ids[-1] = ZERO_ID
        ids = [ZERO_ID if bid == zero else bid for bid in ids]
        if parent_ids is None:
            candidates = [k for k, bid in enumerate(ids) if bid != ZERO_ID]
        else:
            candidates = [k for k, bid in enumerate(ids) if bid != ZERO_ID and bid != parent_ids[k]]
        new: dict[int, tuple[Codec, int, Buffer]] = {}
        if not candidates:
            return ids, new
        present = sink.present([ids[k] for k in candidates])
        for k in candidates:
            bid = ids[k]
            if bid in present or not sink.claim(bid):
                continue
            piece = buf[k * cs : (k + 1) * cs]
            n = len(piece)
            packed: bytes = zc.compress(piece)
            codec = Codec.ZSTD if len(packed) < n - n // 32 else Codec.RAW
            payload = packed if codec == Codec.ZSTD else piece
            new[k] = (codec, n, sink.seal(bid, BlobType.CHUNK, payload))
        return ids, new


def backup(
    repo: Repository,
    source: str,
    volume: str,
    *,
    host: str | None = None,
    chunk_size: int | None = None,
    labels: dict[str, str] | None = None,
    consistency: str = "crash",
    at: datetime | None = None,
    progress: Progress | None = None,
    workers: int = 2,
) -> BackupResult:
    """Back up ``source`` as a new snapshot of ``volume``; incremental against its latest."""
    if consistency not in CONSISTENCY_LEVELS:
        raise UsageError(f"consistency must be one of {', '.join(CONSISTENCY_LEVELS)}")
    host = host or socket.gethostname()
    t0 = time.monotonic()
    taken = at or utcnow()
    try:
        fd = os.open(source, os.O_RDONLY)
    except OSError as e:
        raise SourceError(source=source, detail=e.strerror or str(e)) from None
    try:
        with responsive_threads(), repo.lock(exclusive=False, purpose=f"backup {volume}") as lk:
            repo.sync_index()
            if repo.lock_is_sole(lk.name):
                repo.recover_packs()
            parent = repo.latest(volume, host)
            cs = check_chunk_size(chunk_size or (parent.chunk_size if parent else DEFAULT_CHUNK_SIZE))
            size = source_size(fd, source)
            preader: TreeReader | None = None
            if parent is not None and parent.chunk_size == cs and parent.fanout == DEFAULT_FANOUT:
                preader = repo.tree(parent)
            with BlobWriter(repo) as writer:
                res = scan(
                    RepoSink(repo, writer),
                    fd,
                    source,
                    size,
                    cs,
                    preader.ids_range if preader else None,
                    workers=workers,
                    progress=progress,
                )
            snap = Snapshot(
                volume=volume,
                host=host,
                time=taken,
                size=size,
                chunk_size=cs,
                fanout=DEFAULT_FANOUT,
                height=res.height,
                root=res.root,
                parent=parent.id if parent else None,
                labels=dict(labels or {}),
                consistency=consistency,
                source=source,
                stats=scan_stats(res, time.monotonic() - t0),
            )
            repo.save_snapshot(snap)
    finally:
        os.close(fd)
    return BackupResult(snap, size, res.chunks_new, res.bytes_new, res.bytes_stored, time.monotonic() - t0)


def scan_stats(res: ScanResult, seconds: float) -> dict[str, int]:
    """The ``stats`` a snapshot's manifest records about the backup that made it."""
    return {
        "chunks_new": res.chunks_new,
        "bytes_new": res.bytes_new,
        "bytes_stored": res.bytes_stored,
        "milliseconds": int(seconds * 1000),
    }


@dataclass
class ScanResult:
    """What :func:`scan` built: the tree's root and height, and what was new."""

    root: bytes
    height: int
    chunks_new: int
    bytes_new: int
    bytes_stored: int


def scan(
    sink: BlobSink,
    fd: int,
    source: str,
    size: int,
    cs: int,
    parent_ids: Callable[[int, int], list[bytes]] | None,
    *,
    workers: int = 2,
    progress: Progress | None = None,
    on_leaves: Callable[[int, list[bytes]], None] | None = None,
    batch_bytes: int = BATCH_BYTES,
) -> ScanResult:
    """Read the volume, store its new chunks and tree nodes through ``sink``, and return the root.

    ``parent_ids(first, count)`` gives the previous snapshot's chunk ids of a range; chunks equal
    to them are neither looked up nor stored; ``on_leaves(first, ids)`` sees every chunk id found
    (chunks not reported are holes: ``ZERO_ID``). A batch of ``batch_bytes`` is read, hashed and
    looked up at once (an agent asks the vault once per batch: larger ones mean fewer round trips).
    Returns once the sink has flushed.
    """
    fanout = DEFAULT_FANOUT
    nchunks = -(-size // cs)
    chunks_new = bytes_new = 0

    def store_node(level: int, ids: list[bytes]) -> bytes:
        data = encode_tree_node(level, ids)
        nid = blake3.blake3(data, key=sink.id_key).digest()
        if sink.node_is_new(nid):
            sink.add(nid, BlobType.TREE, Codec.RAW, len(data), sink.seal(nid, BlobType.TREE, data))
        return nid

    builder = TreeBuilder(fanout, nchunks, store_node)
    work = BatchWorker(sink, fd, source, cs)
    per_batch = max(1, batch_bytes // cs)
    inflight: deque[tuple[list[Run], Future[BatchResult]]] = deque()

    def consume() -> None:
        nonlocal chunks_new, bytes_new
        runs, fut = inflight.popleft()
        ids, new = fut.result()
        for k, (codec, raw, stored) in new.items():
            sink.add(ids[k], BlobType.CHUNK, codec, raw, stored)
            chunks_new += 1
            bytes_new += raw
        pos = 0
        for first, count in runs:
            builder.skip_to(first)
            builder.add_many(ids[pos : pos + count])
            if on_leaves:
                on_leaves(first, ids[pos : pos + count])
            pos += count
        if progress:
            progress(min(builder.next * cs, size), size)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="backup") as pool:
        buffers = [memoryview(bytearray(per_batch * cs)) for _ in range(INFLIGHT + 1)]
        for n, runs in enumerate(chunk_batches(fd, size, cs, per_batch)):
            buf = buffers[n % len(buffers)]  # free again: at most INFLIGHT in use
            pids = [i for f, c in runs for i in parent_ids(f, c)] if parent_ids else None
            inflight.append((runs, pool.submit(work, buf, runs, size, pids)))
            if len(inflight) >= INFLIGHT:
                consume()
        while inflight:
            consume()
    root = builder.finish()
    if progress:
        progress(size, size)
    sink.flush()
    return ScanResult(root, builder.height, chunks_new, bytes_new, sink.bytes_stored)
