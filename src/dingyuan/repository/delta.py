"""Compare a restore target with a snapshot, chunk by chunk, at the speed of reading it.

The target is compared in windows of ``SCAN_BYTES`` (chunk-aligned) by worker threads, a few
windows in flight; the worker that compared a window hands what differs straight to the caller's
``then`` (a restore fetches the window's chunks there), and the caller takes the results in
order. So comparing, fetching and writing overlap without a round trip through the main thread
per window. A worker reads a
window's runs of data in pieces of ``READ_BYTES`` into one small buffer of its own, so that the
bytes are still in the core's cache when they are hashed: reading a whole window at once and then
hashing it costs a third more CPU, as every byte travels to memory and back. Each chunk is
compared with the snapshot's id at the same index:

- where the snapshot has a chunk, the chunk is hashed with the repository's keyed BLAKE3 (its id;
  BLAKE3 releases the GIL, so the workers hash in parallel) and differs if the ids differ;
- where the snapshot has a hole (``ZERO_ID``), nothing is hashed: the chunk's pages are compared
  with zeros, and only the pages that are not zero need zeroing. A 4 KiB write into a hole of the
  snapshot then costs one 4 KiB write of zeros, not one of the whole chunk.

A chunk of a hole of a regular file (``SEEK_DATA``/``SEEK_HOLE``) is zeros and is not read. The
tree is read with ``ids_range``, one leaf node at a time.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import blake3

from ..errors import RestoreTargetError
from .backup import chunk_runs
from .format import ZERO_ID
from .manifest import Snapshot
from .repo import Repository

SCAN_BYTES = 8 << 20  # bytes per window, compared by one worker
READ_BYTES = 1 << 20  # bytes per read: small enough to stay in the core's cache until hashed
LOOKAHEAD = 3  # windows being compared while the caller writes
PAGE = 4096  # unit in which a differing chunk is zeroed or written
_ZERO_PAGE = bytes(PAGE)

Span = tuple[int, int]  # (first chunk, count)
T = TypeVar("T")


@dataclass
class WindowDiff:
    """What differs in one window: chunks to fetch (index, the snapshot's id), byte ranges to
    zero (in order, neighbours merged), and how many chunks differ in all."""

    fetch: list[tuple[int, bytes]] = field(default_factory=list)
    zeros: list[tuple[int, int]] = field(default_factory=list)
    differing: int = 0

    def zero(self, start: int, end: int) -> None:
        if self.zeros and self.zeros[-1][1] == start:
            self.zeros[-1] = (self.zeros[-1][0], end)
        else:
            self.zeros.append((start, end))


class _Comparer:
    """Worker: read a window's runs of data, compare each chunk with the snapshot's."""

    def __init__(self, fd: int, target: str, cs: int, size: int, key: bytes) -> None:
        self.fd, self.target, self.cs, self.size, self.key = fd, target, cs, size, key
        self.read_bytes = max(cs, READ_BYTES // cs * cs)
        self._local = threading.local()

    def _buffer(self) -> memoryview:
        buf: memoryview | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(self.read_bytes))
        return buf

    def __call__(self, first: int, spans: list[Span], sids: list[bytes]) -> WindowDiff:
        diff = WindowDiff()
        pos = first
        for start, count in spans:
            self._holes(first, pos, start, sids, diff)
            self._compare_run(first, start, count, sids, diff)
            pos = start + count
        self._holes(first, pos, first + len(sids), sids, diff)
        return diff

    @staticmethod
    def _holes(first: int, start: int, end: int, sids: list[bytes], diff: WindowDiff) -> None:
        """Chunks ``[start, end)`` lie in a hole of the target: zeros, which differ where the
        snapshot has data."""
        for index in range(start, end):
            if sids[index - first] != ZERO_ID:
                diff.fetch.append((index, sids[index - first]))
                diff.differing += 1

    def _compare_run(self, first: int, start: int, count: int, sids: list[bytes], diff: WindowDiff) -> None:
        cs, size, key, hasher = self.cs, self.size, self.key, blake3.blake3
        buf = self._buffer()
        offset, end = start * cs, min((start + count) * cs, size)
        while offset < end:
            length = min(len(buf), end - offset)
            try:
                got = os.preadv(self.fd, [buf[:length]], offset)
            except OSError as e:
                raise RestoreTargetError(
                    target=self.target, detail=f"reading offset {offset}: {e.strerror}"
                ) from None
            if got != length:
                raise RestoreTargetError(target=self.target, detail=f"short read at offset {offset}")
            for p in range(0, length, cs):
                index = (offset + p) // cs
                sid = sids[index - first]
                piece = buf[p : min(p + cs, length)]
                if sid != ZERO_ID:
                    if hasher(piece, key=key).digest() != sid:
                        diff.fetch.append((index, sid))
                        diff.differing += 1
                    continue
                dirty = False
                for q in range(0, len(piece), PAGE):
                    page = piece[q : q + PAGE].tobytes()
                    if page != _ZERO_PAGE[: len(page)]:
                        diff.zero(offset + p + q, offset + p + q + len(page))
                        dirty = True
                diff.differing += dirty
            offset += length


def _clip(runs: list[Span], pos: int, first: int, end: int) -> tuple[list[Span], int]:
    """The parts of ``runs`` (from index ``pos``) inside chunks ``[first, end)``, and the index
    of the first run that reaches past ``end``."""
    spans: list[Span] = []
    while pos < len(runs):
        start, count = runs[pos]
        lo, hi = max(start, first), min(start + count, end)
        if hi > lo:
            spans.append((lo, hi - lo))
        if start + count > end:
            break
        pos += 1
    return spans, pos


def differing_chunks(
    repo: Repository,
    snap: Snapshot,
    fd: int,
    target: str,
    first: int,
    pool: ThreadPoolExecutor,
    then: Callable[[WindowDiff], T],
) -> Iterator[tuple[int, int, WindowDiff, T]]:
    """Compare chunks ``[first, n)`` of the target open as ``fd`` with ``snap``; the worker that
    compared a window then calls ``then`` with what differs. Yield, window by window in order,
    ``(end, chunks compared, what differs, what then returned)``: every chunk before ``end`` has
    then been compared."""
    cs, size = snap.chunk_size, snap.size
    nchunks = -(-size // cs)
    per = max(1, SCAN_BYTES // cs)
    tree = repo.tree(snap)
    runs = [r for r in chunk_runs(fd, size, cs) if r[0] + r[1] > first]
    compare = _Comparer(fd, target, cs, size, repo.cipher.id_key)

    def window(start: int, spans: list[Span], sids: list[bytes]) -> tuple[WindowDiff, T]:
        diff = compare(start, spans, sids)
        return diff, then(diff)

    pending: deque[tuple[int, int, Future[tuple[WindowDiff, T]]]] = deque()
    pos = 0
    for start in range(first, nchunks, per):
        count = min(per, nchunks - start)
        spans, pos = _clip(runs, pos, start, start + count)
        sids = tree.ids_range(start, count)
        pending.append((start + count, count, pool.submit(window, start, spans, sids)))
        if len(pending) > LOOKAHEAD:
            end, compared, fut = pending.popleft()
            yield end, compared, *fut.result()
    while pending:
        end, compared, fut = pending.popleft()
        yield end, compared, *fut.result()


def changed_pages(fd: int, target: str, pieces: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """The parts of the snapshot's chunks ``pieces`` (target offset, bytes) whose pages differ
    from what the target holds there: what a delta restore must write. Damage is mostly a few
    pages of a chunk, and every page written costs a copy into the page cache now and a disk
    write at the flush; reading the chunk back from the page cache costs less."""
    out: list[tuple[int, bytes]] = []
    for off, data in pieces:
        try:
            have = os.pread(fd, len(data), off)
        except OSError as e:
            raise RestoreTargetError(target=target, detail=f"reading offset {off}: {e.strerror}") from None
        if len(have) != len(data):
            raise RestoreTargetError(target=target, detail=f"short read at offset {off}")
        start: int | None = None  # of the current run of differing pages
        for q in range(0, len(data), PAGE):
            if data[q : q + PAGE] != have[q : q + PAGE]:
                start = q if start is None else start
            elif start is not None:
                out.append((off + start, data[start:q]))
                start = None
        if start is not None:
            out.append((off + start, data[start:]))
    return out
