"""Restore a snapshot to a file or block device.

Leaf by leaf (256 chunks), the blobs are looked up, grouped by pack, coalesced into ranged reads
of neighbouring blobs, and handed to worker threads that fetch, decrypt, decompress, verify
each chunk against its id and ``pwrite`` it. A chunk that fails verification stops the restore
with an error; nothing unverified is ever written. A new or regular-file target is truncated
and left sparse where the snapshot has holes; a block device gets zeros written there.
"""

from __future__ import annotations

import os
import stat
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from ..errors import CorruptObject, MissingObject, ObjectNotFound, RestoreTargetError
from .cache import Location
from .format import ZERO_ID, BlobEntry, pack_name
from .manifest import Snapshot
from .repo import Repository
from .threads import responsive_threads

MAX_RUN = 4 << 20  # bytes per ranged read
INFLIGHT = 4
ZERO_BLOCK = bytes(1 << 20)

Progress = Callable[[int, int], None]


def open_target(target: str, size: int) -> tuple[int, bool]:
    """Open the target; returns (fd, sparse) where sparse means holes already read as zero."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    try:
        if st is None or stat.S_ISREG(st.st_mode):
            fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
            return fd, True
        if stat.S_ISBLK(st.st_mode):
            fd = os.open(target, os.O_WRONLY)
            dev_size = os.lseek(fd, 0, os.SEEK_END)
            if dev_size < size:
                os.close(fd)
                raise RestoreTargetError(
                    target=target, detail=f"device holds {dev_size} bytes, snapshot needs {size}"
                )
            return fd, False
    except OSError as e:
        raise RestoreTargetError(target=target, detail=e.strerror or str(e)) from None
    raise RestoreTargetError(target=target, detail="not a regular file or block device")


def _write_zeros(fd: int, start: int, end: int) -> None:
    while start < end:
        n = min(len(ZERO_BLOCK), end - start)
        os.pwrite(fd, memoryview(ZERO_BLOCK)[:n], start)
        start += n


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


def restore(
    repo: Repository,
    snap: Snapshot,
    target: str,
    progress: Progress | None = None,
    workers: int = 2,
    fsync: bool = True,
) -> int:
    """Restore ``snap`` to ``target``; returns the number of bytes written.

    With ``fsync`` (the default) the target is flushed to stable storage before returning.
    """
    with repo.lock(exclusive=False, purpose=f"restore {snap.id[:12]}"):
        repo.sync_index()
        return _restore(repo, snap, target, progress, workers, fsync)


def _restore(
    repo: Repository, snap: Snapshot, target: str, progress: Progress | None, workers: int, fsync: bool
) -> int:
    fd, sparse = open_target(target, snap.size)
    cs = snap.chunk_size
    written = 0
    try:

        def fetch(run: Run) -> list[tuple[int, bytes]]:
            """Worker: read a run of blobs, verify each; returns (target offset, data) pairs."""
            pack, start, length, blobs = run
            name = pack_name(pack)
            try:
                data = repo.backend.get_range(name, start, length)
            except ObjectNotFound:
                raise MissingObject(name=name, detail="pack listed by the index") from None
            mv = memoryview(data)
            out = []
            for entry, offsets in blobs:
                plain = repo.decode_blob(
                    entry, mv[entry.offset - start : entry.offset - start + entry.length], name
                )
                for off in offsets:
                    if len(plain) != min(cs, snap.size - off):
                        raise CorruptObject(name=name, detail=f"chunk for offset {off} has the wrong length")
                    out.append((off, plain))
            return out

        def write(pieces: list[tuple[int, bytes]]) -> int:
            """Main thread, the only writer: neighbouring chunks go out in one pwritev."""
            pieces.sort(key=lambda p: p[0])
            i = 0
            while i < len(pieces):
                start = end = pieces[i][0]
                group: list[bytes] = []
                while i < len(pieces) and pieces[i][0] == end and len(group) < 512:
                    group.append(pieces[i][1])
                    end += len(pieces[i][1])
                    i += 1
                if os.pwritev(fd, group, start) != end - start:
                    raise RestoreTargetError(target=target, detail=f"short write at offset {start}")
            return sum(len(p[1]) for p in pieces)

        inflight: deque[Future[list[tuple[int, bytes]]]] = deque()
        done_to = 0
        with responsive_threads(), ThreadPoolExecutor(workers, thread_name_prefix="restore") as pool:
            for base, ids in repo.tree(snap).leaves():
                wanted: dict[bytes, list[int]] = defaultdict(list)
                for j, bid in enumerate(ids):
                    off = (base + j) * cs
                    if bid == ZERO_ID:
                        if not sparse:
                            _write_zeros(fd, off, min(off + cs, snap.size))
                    else:
                        wanted[bid].append(off)
                if not sparse:
                    _write_zeros(fd, done_to, base * cs)
                done_to = min((base + len(ids)) * cs, snap.size)
                locs = repo.cache.lookup_many(wanted)
                missing = [b for b in wanted if b not in locs]
                if missing:
                    raise MissingObject(name=f"chunk {missing[0].hex()}", detail="not in any index")
                for run in plan_runs(locs, wanted):
                    inflight.append(pool.submit(fetch, run))
                    while len(inflight) >= INFLIGHT:
                        written += write(inflight.popleft().result())
                        if progress:
                            progress(written, snap.size)
            while inflight:
                written += write(inflight.popleft().result())
                if progress:
                    progress(written, snap.size)
        if not sparse:
            _write_zeros(fd, done_to, snap.size)
        if fsync:
            os.fsync(fd)
    except OSError as e:
        raise RestoreTargetError(target=target, detail=e.strerror or str(e)) from None
    finally:
        os.close(fd)
    if progress:
        progress(snap.size, snap.size)
    return written
