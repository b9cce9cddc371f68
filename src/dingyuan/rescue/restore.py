"""Full and delta restores of a snapshot onto a target, a few requests in flight.

**Full**: the snapshot's chunks are fetched as chunk streams of ``max_chunks`` chunks, ``workers``
requests at a time, each in its own thread, and written with ``os.pwrite`` as they arrive (every
chunk's SHA-256 checked first, by :func:`frames.decode_stream`). Holes are skipped on a file this
run created (it is sparse and reads as zeros) and written as zeros elsewhere.

**Delta**: the target's chunks are read and hashed (SHA-256) in threads, ``max_compare`` chunks a
request; the vault answers which differ (``/compare``), and only those are fetched and written,
as runs of neighbouring chunks. A chunk that is equal never travels; the vault reads it once to
hash it, then keeps its digest.

A request whose connection fails, or whose chunks arrive damaged, is sent again (up to
:data:`ATTEMPTS` times); a refusal by the vault is final. The target is ``fsync``-ed at the end:
the result is bit-exact or an error, never a silently partial restore (an error does leave the
target half written: run again).
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import RestoreTargetError, TransferError, VaultRefused
from . import frames
from .client import Vault
from .progress import Progress
from .target import Target

WORKERS = 4  # requests in flight: enough to overlap the vault's reads, the network and our writes
ATTEMPTS = 3  # tries of one request when the connection fails or a chunk arrives damaged

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Layout:
    """A snapshot as ``GET /snapshots/{id}/layout`` describes it."""

    id: str
    volume: str
    size: int
    chunk_size: int
    chunks: int
    max_chunks: int
    max_compare: int

    @classmethod
    def fetch(cls, vault: Vault, snapshot_id: str) -> Layout:
        doc = vault.get_json(f"/snapshots/{snapshot_id}/layout")
        try:
            return cls(**{k: doc[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            raise TransferError(f"the vault described snapshot {snapshot_id[:12]} incompletely") from None

    def length(self, i: int) -> int:
        return min(self.chunk_size, self.size - i * self.chunk_size)


@dataclass
class Stats:
    """What a restore did: chunks fetched (holes among them), left as they were, bytes received
    from the vault and written, and how long it took."""

    fetched: int = 0
    holes: int = 0
    unchanged: int = 0
    received: int = 0
    written: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def line(self) -> str:
        """The one-line summary, ``key=value`` pairs (stable: scripts parse it)."""
        return (
            f"fetched={self.fetched} holes={self.holes} unchanged={self.unchanged} "
            f"received={self.received} written={self.written} seconds={self.seconds:.2f}"
        )


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``fn`` over ``items`` in ``workers`` threads, at most ``2 * workers`` submitted at once;
    results in completion order. The first failure cancels what has not started and is raised."""
    with ThreadPoolExecutor(workers, thread_name_prefix="rescue") as pool:
        pending: set[Future[R]] = set()
        try:
            for item in items:
                pending.add(pool.submit(fn, item))
                while len(pending) >= 2 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        yield fut.result()
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        finally:
            for fut in pending:
                fut.cancel()


def retried(fn: Callable[[tuple[int, int]], R], what: str) -> Callable[[tuple[int, int]], R]:
    """``fn`` over a (start, count) run, tried up to :data:`ATTEMPTS` times while the connection
    fails or a chunk arrives damaged; the vault's refusals and the target's errors are final."""

    def attempt(run: tuple[int, int]) -> R:
        for n in range(1, ATTEMPTS + 1):
            try:
                return fn(run)
            except VaultRefused:
                raise
            except TransferError as e:
                if n == ATTEMPTS:
                    raise
                print(f"{what} from {run[0]}: {e}; trying again", file=sys.stderr, flush=True)
                time.sleep(n)
        raise AssertionError("unreachable")

    return attempt


def split_runs(indexes: Iterable[int], limit: int) -> Iterator[tuple[int, int]]:
    """(start, count) runs of consecutive indexes (sorted), each of at most ``limit``."""
    start = count = 0
    for i in indexes:
        if count and i == start + count and count < limit:
            count += 1
            continue
        if count:
            yield start, count
        start, count = i, 1
    if count:
        yield start, count


class Restorer:
    """Restores one snapshot onto one open target."""

    def __init__(self, vault: Vault, layout: Layout, target: Target, workers: int = WORKERS) -> None:
        self.vault = vault
        self.layout = layout
        self.target = target
        self.workers = workers
        self.stats = Stats()
        self._zeros = bytes(layout.chunk_size)

    # fetching --------------------------------------------------------------------------------
    def _fetch(self, run: tuple[int, int], progress: Progress) -> None:
        """Fetch and write one run; its counts reach the statistics and the progress only once it
        is complete, so a retried run is counted once."""
        start, count = run
        lay = self.layout
        received = written = holes = done = 0
        try:
            with self.vault.stream(f"/snapshots/{lay.id}/chunks", start=start, count=count) as read:

                def counted(n: int) -> bytes:
                    nonlocal received
                    got = read(n)
                    received += len(got)
                    return got

                lengths = [lay.length(i) for i in range(start, start + count)]
                for chunk in frames.decode_stream(counted, start, lengths):
                    written += self._write(chunk)
                    holes += chunk.hole
                    done += chunk.length
                    progress.add(chunk.length)
        except BaseException:
            progress.add(-done)
            raise
        self.stats.add(fetched=count, holes=holes, received=received, written=written)

    def _write(self, chunk: frames.Chunk) -> int:
        offset = chunk.index * self.layout.chunk_size
        if chunk.data is None:
            if self.target.created:
                return 0  # a new sparse file reads zeros there already
            data: bytes | memoryview = memoryview(self._zeros)[: chunk.length]
        else:
            data = chunk.data
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(self.target.fd, data[done:], offset + done)
        except OSError as e:
            raise RestoreTargetError(
                target=self.target.path, detail=f"at byte {offset + done}: {e.strerror or e}"
            ) from None
        return len(data)

    def _fetch_all(self, runs: Iterable[tuple[int, int]], label: str, total: int) -> None:
        with Progress(label, total) as progress:
            fetch = retried(lambda run: self._fetch(run, progress), "fetching chunks")
            for _ in bounded_map(fetch, runs, self.workers):
                pass

    # the two restores ------------------------------------------------------------------------
    def full(self) -> Stats:
        t0 = time.monotonic()
        lay = self.layout
        runs = ((s, min(lay.max_chunks, lay.chunks - s)) for s in range(0, lay.chunks, lay.max_chunks))
        self._fetch_all(runs, "restore", lay.size)
        self._finish(t0)
        return self.stats

    def delta(self) -> Stats:
        t0 = time.monotonic()
        lay = self.layout
        batches = [(s, min(lay.max_compare, lay.chunks - s)) for s in range(0, lay.chunks, lay.max_compare)]
        differ: list[int] = []
        with Progress("compare", lay.size) as progress:
            compare = retried(lambda b: self._compare(b, progress), "comparing chunks")
            for found in bounded_map(compare, batches, self.workers):
                differ.extend(found)
        differ.sort()
        self.stats.add(unchanged=lay.chunks - len(differ))
        total = sum(lay.length(i) for i in differ)
        self._fetch_all(split_runs(differ, lay.max_chunks), "fetch", total)
        self._finish(t0)
        return self.stats

    def _compare(self, batch: tuple[int, int], progress: Progress) -> list[int]:
        """Hash the target's chunks of ``batch`` and ask the vault which differ."""
        start, count = batch
        cs = self.layout.chunk_size
        digests = []
        for i in range(start, start + count):
            length = self.layout.length(i)
            try:
                data = os.pread(self.target.fd, length, i * cs)
            except OSError as e:
                raise RestoreTargetError(
                    target=self.target.path, detail=f"reading chunk {i}: {e.strerror or e}"
                ) from None
            if len(data) != length:
                raise RestoreTargetError(target=self.target.path, detail=f"it ends inside chunk {i}")
            digests.append(hashlib.sha256(data).digest())
            progress.add(length)
        doc: Any = self.vault.post_bytes(
            f"/snapshots/{self.layout.id}/compare?start={start}", b"".join(digests)
        )
        found = doc.get("differ") if isinstance(doc, dict) else None
        if not isinstance(found, list) or not all(
            isinstance(i, int) and start <= i < start + count for i in found
        ):
            raise TransferError(f"the vault's compare answer for chunks from {start} is malformed")
        return found

    def _finish(self, t0: float) -> None:
        try:
            os.fsync(self.target.fd)
        except OSError as e:
            raise RestoreTargetError(target=self.target.path, detail=f"fsync: {e.strerror or e}") from None
        self.stats.seconds = time.monotonic() - t0
