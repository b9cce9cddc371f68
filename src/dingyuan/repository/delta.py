"""Compare a restore target with a snapshot, chunk by chunk, at the speed of reading it.

The target is read in windows of ``SCAN_BYTES`` (chunk-aligned), each with one ``preadv`` per run
of data, in worker threads that hash every chunk with the repository's keyed BLAKE3 (the chunk id;
BLAKE3 releases the GIL, so the workers hash in parallel) and compare it with the snapshot's id
at the same index. A few windows are in flight while the caller consumes the differences.

A chunk of a hole of a regular file (``SEEK_DATA``/``SEEK_HOLE``) is zeros and is not read; an
all-zero chunk has the id ``ZERO_ID`` in a snapshot, so the zero chunk's hash is mapped to it, as
the backup does. The tree is read with ``ids_range``, one leaf node at a time.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import blake3

from ..errors import RestoreTargetError
from .backup import chunk_runs
from .format import ZERO_ID
from .manifest import Snapshot
from .repo import Repository

SCAN_BYTES = 8 << 20  # bytes per window: one read per run of data, hashed by one worker
LOOKAHEAD = 3  # windows being read and hashed while the caller writes

Diff = list[tuple[int, bytes]]  # (chunk index, the snapshot's id) of chunks that differ
Span = tuple[int, int]  # (first chunk, count)


class _Hasher:
    """Worker: read a window's runs of data into a buffer, hash each chunk, compare."""

    def __init__(self, fd: int, target: str, cs: int, size: int, key: bytes) -> None:
        self.fd, self.target, self.cs, self.size, self.key = fd, target, cs, size, key
        self.zero_ids: dict[int, bytes] = {}
        for n in {cs, size % cs or cs}:
            self.zero_ids[n] = blake3.blake3(bytes(n), key=key).digest()

    def __call__(self, buf: memoryview, first: int, spans: list[Span], sids: list[bytes]) -> Diff:
        cs, size, key, hasher = self.cs, self.size, self.key, blake3.blake3
        found = [ZERO_ID] * len(sids)  # chunks outside the spans are holes
        for start, count in spans:
            offset = start * cs
            length = min(count * cs, size - offset)
            try:
                got = os.preadv(self.fd, [buf[:length]], offset)
            except OSError as e:
                raise RestoreTargetError(
                    target=self.target, detail=f"reading offset {offset}: {e.strerror}"
                ) from None
            if got != length:
                raise RestoreTargetError(target=self.target, detail=f"short read at offset {offset}")
            for k, p in enumerate(range(0, length, cs)):
                piece = buf[p : min(p + cs, length)]
                bid = hasher(piece, key=key).digest()
                found[start - first + k] = ZERO_ID if bid == self.zero_ids[len(piece)] else bid
        return [
            (first + j, sid) for j, (sid, have) in enumerate(zip(sids, found, strict=True)) if sid != have
        ]


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
    repo: Repository, snap: Snapshot, fd: int, target: str, first: int, pool: ThreadPoolExecutor
) -> Iterator[tuple[int, int, Diff]]:
    """Compare chunks ``[first, n)`` of the target open as ``fd`` with ``snap``; yield, window
    by window in order, ``(end, chunks compared, differing chunks)``: every chunk before ``end``
    has then been compared."""
    cs, size = snap.chunk_size, snap.size
    nchunks = -(-size // cs)
    per = max(1, SCAN_BYTES // cs)
    tree = repo.tree(snap)
    runs = [r for r in chunk_runs(fd, size, cs) if r[0] + r[1] > first]
    hasher = _Hasher(fd, target, cs, size, repo.cipher.id_key)
    buffers = [memoryview(bytearray(per * cs)) for _ in range(LOOKAHEAD + 1)]
    pending: deque[tuple[int, int, Future[Diff]]] = deque()
    pos = 0
    for n, start in enumerate(range(first, nchunks, per)):
        count = min(per, nchunks - start)
        spans, pos = _clip(runs, pos, start, start + count)
        sids = tree.ids_range(start, count)
        pending.append(
            (start + count, count, pool.submit(hasher, buffers[n % len(buffers)], start, spans, sids))
        )
        if len(pending) > LOOKAHEAD:
            end, compared, fut = pending.popleft()
            yield end, compared, fut.result()
    while pending:
        end, compared, fut = pending.popleft()
        yield end, compared, fut.result()
