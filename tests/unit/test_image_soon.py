"""SnapshotImage.read_soon: the non-blocking read an event loop (the NBD server) relies on.

What the server relies on: read_soon never blocks (it declines, with None, a read that would
need a tree node load, and leaves index lookups and fetches to the decoding threads); a read it
starts calls back once, when the last of its chunks arrives, and then gives exactly the
snapshot's bytes; a chunk that fails its check fails that read with CorruptObject, never
returns other bytes.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from support import damage_blob, new_repo, write_sparse

from dingyuan.errors import CorruptObject, ExportError
from dingyuan.repository.backends.memory import MemoryBackend
from dingyuan.repository.backup import backup
from dingyuan.repository.cache import Location
from dingyuan.repository.image import SnapshotImage
from dingyuan.repository.manifest import Snapshot
from dingyuan.repository.repo import Repository

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 64 * KiB


class GatedBackend(MemoryBackend):
    """Pack reads wait until ``gate`` is set: fetches stay in flight as long as a test wants."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Semaphore(0)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        if name.startswith("packs/") and not self.gate.is_set():
            self.waiting.release()
            assert self.gate.wait(10)
        return super().get_range(name, offset, length)


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[GatedBackend, Repository]]:
    """A repository on a :class:`GatedBackend`, and that backend."""
    backend = GatedBackend()
    repo = new_repo(backend, tmp_path / "cache")
    yield backend, repo
    repo.close()


def _snapshot(repo: Repository, tmp_path: Path, data: bytes) -> Snapshot:
    write_sparse(tmp_path / "src", len(data), [(0, data)])
    snap = backup(repo, str(tmp_path / "src"), "vol", host="h").snapshot
    assert snap.chunk_size == CHUNK
    return snap


def test_read_soon_declines_a_tree_load_and_serves_cached_and_new_chunks(
    repo: Repository, tmp_path: Path
) -> None:
    data = random.Random(1).randbytes(MiB) + bytes(MiB)  # a hole at the end
    snap = _snapshot(repo, tmp_path, data)
    with SnapshotImage(repo, snap) as img:
        assert img.read_soon(0, 4 * KiB) is None, "nothing cached yet: it would load the tree"
        assert img.read(0, 256 * KiB) == data[: 256 * KiB]
        pending = img.read_soon(1000, 200 * KiB)
        assert pending is not None and pending.done
        assert not pending.when_ready(lambda: pytest.fail("called back for a read that was done"))
        assert b"".join(pending.parts()) == data[1000 : 1000 + 200 * KiB]
        hole = img.read_soon(MiB + 5, 100 * KiB)  # chunks of a hole need no fetch
        assert hole is not None and b"".join(hole.parts()) == bytes(100 * KiB)
        fresh = img.read_soon(600 * KiB, 300 * KiB)  # neither cached nor being fetched
        assert fresh is not None
        arrived = threading.Event()
        if fresh.when_ready(arrived.set):
            assert arrived.wait(10)
        assert b"".join(fresh.parts()) == data[600 * KiB : 900 * KiB]


def test_a_read_of_chunks_in_flight_is_called_back_once_with_the_bytes(
    gated: tuple[GatedBackend, Repository], tmp_path: Path
) -> None:
    backend, repo = gated
    data = random.Random(2).randbytes(MiB)
    snap = _snapshot(repo, tmp_path, data)
    with SnapshotImage(repo, snap) as img:
        assert img.read(0, 1) == data[:1]  # loads the tree
        backend.gate.clear()
        img.cache(CHUNK, 8 * CHUNK)  # a prefetch, held in flight by the gate
        assert backend.waiting.acquire(timeout=10)
        pending = img.read_soon(CHUNK + 10, 5 * CHUNK)
        assert pending is not None and not pending.done
        calls: list[str] = []
        called = threading.Event()

        def ready() -> None:
            calls.append(threading.current_thread().name)
            called.set()

        assert pending.when_ready(ready)
        backend.gate.set()
        assert called.wait(10)
        assert pending.done
        assert len(calls) == 1 and calls[0] != threading.current_thread().name, "not called back once"
        assert b"".join(pending.parts()) == data[CHUNK + 10 : 6 * CHUNK + 10]


def test_a_corrupt_chunk_fails_the_read_it_belongs_to(
    gated: tuple[GatedBackend, Repository], tmp_path: Path
) -> None:
    backend, repo = gated
    data = random.Random(3).randbytes(8 * CHUNK)
    snap = _snapshot(repo, tmp_path, data)
    with SnapshotImage(repo, snap) as img:
        bid = img.tree.ids_range(3, 1)[0]
    damage_blob(repo, backend, bid, 0x01)
    with SnapshotImage(repo, snap) as img:
        assert img.read(0, CHUNK) == data[:CHUNK]
        backend.gate.clear()
        img.cache(CHUNK, 7 * CHUNK)
        assert backend.waiting.acquire(timeout=10)
        bad = img.read_soon(2 * CHUNK, 2 * CHUNK)  # chunks 2 and 3
        good = img.read_soon(5 * CHUNK, CHUNK)
        assert bad is not None and good is not None
        done = threading.Semaphore(0)
        for pending in (bad, good):
            assert pending.when_ready(done.release)
        backend.gate.set()
        assert done.acquire(timeout=10) and done.acquire(timeout=10)
        with pytest.raises(CorruptObject):
            bad.parts()
        assert b"".join(good.parts()) == data[5 * CHUNK : 6 * CHUNK]


def test_random_reads_in_a_loaded_leaf_need_no_index_lookup(repo: Repository, tmp_path: Path) -> None:
    data = random.Random(4).randbytes(2 * MiB)
    snap = _snapshot(repo, tmp_path, data)
    with SnapshotImage(repo, snap, cache_bytes=CHUNK) as img:
        assert img.read(0, 1) == data[:1]  # loads the leaf, and where its chunks are
        lookups: list[list[bytes]] = []
        real = repo.cache.lookup_many

        def counting(ids: Iterable[bytes]) -> dict[bytes, Location]:
            lookups.append(list(ids))
            return real(lookups[-1])

        repo.cache.lookup_many = counting  # type: ignore[method-assign]
        rnd = random.Random(5)
        for _ in range(20):
            off = rnd.randrange(len(data) - 4 * KiB)
            pending = img.read_soon(off, 4 * KiB)
            assert pending is not None
            arrived = threading.Event()
            if pending.when_ready(arrived.set):
                assert arrived.wait(10)
            assert b"".join(pending.parts()) == data[off : off + 4 * KiB]
        assert lookups == [], "a chunk of a loaded leaf was looked up in the index cache"


def test_closing_calls_back_every_waiting_read_and_stops_its_threads(
    gated: tuple[GatedBackend, Repository], tmp_path: Path
) -> None:
    backend, repo = gated
    data = random.Random(6).randbytes(MiB)
    snap = _snapshot(repo, tmp_path, data)
    before = set(threading.enumerate())
    img = SnapshotImage(repo, snap, workers=1)
    assert img.read(0, 1) == data[:1]
    backend.gate.clear()
    img.cache(CHUNK, CHUNK)  # the one decoding thread waits at the gate
    assert backend.waiting.acquire(timeout=10)
    pending = img.read_soon(4 * CHUNK, CHUNK)  # queued behind it
    assert pending is not None
    called = threading.Event()
    assert pending.when_ready(called.set)
    closing = threading.Thread(target=img.close)
    closing.start()
    backend.gate.set()
    closing.join(10)
    assert not closing.is_alive() and called.is_set()
    try:  # dropped by close (the usual case), or fetched before close got to it
        got = b"".join(pending.parts())
    except ExportError:
        pass
    else:
        assert got == data[4 * CHUNK : 5 * CHUNK]
    assert set(threading.enumerate()) <= before, "the image left threads running"
