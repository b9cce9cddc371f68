"""SnapshotImage: a snapshot served as a read-only block device.

What an export relies on: any range reads back the bytes that were backed up; extents never call
data a hole and do call chunk-sized holes holes; a huge sparse snapshot opens at once; concurrent
readers get correct bytes and share fetches; a damaged pack fails the read instead of returning
other bytes; reads keep working after gc moved the blobs.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import apply_writes, damage_blob, new_repo, write_sparse

import dingyuan.repository.backup as backup_mod
from dingyuan.errors import CorruptObject, ReadOnlyDevice
from dingyuan.repository.backends.memory import MemoryBackend
from dingyuan.repository.backup import backup
from dingyuan.repository.gc import gc
from dingyuan.repository.image import SnapshotImage
from dingyuan.repository.repo import Repository

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@contextmanager
def fanout(n: int | None) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        if n is not None:
            mp.setattr(backup_mod, "DEFAULT_FANOUT", n)
        yield


def chunk_flags(extents: list[tuple[int, bool]], offset: int) -> list[tuple[int, int, bool]]:
    """Extents as absolute (start, end, zero) ranges."""
    out, pos = [], offset
    for length, zero in extents:
        assert length > 0
        out.append((pos, pos + length, zero))
        pos += length
    return out


def check_extents(img: SnapshotImage, image: bytes, offset: int, length: int) -> None:
    """Lengths add up; a range called zero reads as zero; a range called data has no all-zero
    chunk (those are holes in the tree)."""
    ext = img.extents(offset, length)
    assert sum(n for n, _ in ext) == length
    assert all(a[1] != b[1] for a, b in itertools.pairwise(ext)), "neighbours not merged"
    cs = img.block_size
    for start, end, zero in chunk_flags(ext, offset):
        if zero:
            assert image[start:end] == bytes(end - start)
        else:  # a chunk that reads as zeros is a hole (ZERO_ID), and extents must say so
            for c in range(start // cs * cs, end, cs):
                assert image[c : c + cs] != bytes(min(cs, len(image) - c)), f"hole at {c} called data"


writes = st.lists(
    st.tuples(st.floats(0, 1), st.integers(1, 200 * KiB), st.sampled_from(["random", "zeros", "repeat"])),
    max_size=8,
)


@given(
    cs=st.sampled_from([4 * KiB, 64 * KiB]),
    fan=st.sampled_from([None, 2, 3]),
    nbytes=st.integers(1, 3 * MiB),
    spec=writes,
    seed=st.integers(0, 2**32),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_reads_and_extents_match_the_backed_up_bytes(
    tmp_path_factory: pytest.TempPathFactory, cs: int, fan: int | None, nbytes: int, spec: list, seed: int
) -> None:
    tmp = tmp_path_factory.mktemp("img")
    rnd = random.Random(seed)
    plan = []
    for where, n, kind in spec:
        off = min(int(where * nbytes), nbytes - 1)
        n = min(n, nbytes - off)
        data = bytes(n) if kind == "zeros" else rnd.randbytes(n) if kind == "random" else b"ab" * n
        plan.append((off, data[:n]))
    image = bytearray(nbytes)
    apply_writes(image, plan)
    write_sparse(tmp / "src", nbytes, plan)
    repo = new_repo(MemoryBackend(), tmp / "cache")
    try:
        with fanout(fan):
            snap = backup(repo, str(tmp / "src"), "vol", host="h", chunk_size=cs).snapshot
        with SnapshotImage(repo, snap, cache_bytes=8 * cs) as img:  # small cache: refetches too
            assert img.size == nbytes and img.read_only and img.block_size == cs
            assert img.read(0, nbytes) == image
            check_extents(img, bytes(image), 0, nbytes)
            for _ in range(30):
                off = rnd.randrange(nbytes)
                n = rnd.randint(1, min(nbytes - off, 3 * cs))
                assert img.read(off, n) == image[off : off + n], (off, n)
                check_extents(img, bytes(image), off, n)
    finally:
        repo.close()


def test_writes_are_refused(repo: Repository, tmp_path: Path) -> None:
    write_sparse(tmp_path / "src", 1 * MiB, [(0, b"x" * 100)])
    snap = backup(repo, str(tmp_path / "src"), "vol", host="h").snapshot
    with SnapshotImage(repo, snap) as img:
        for call in (lambda: img.write(0, b"y"), lambda: img.write_zeroes(0, 1), lambda: img.trim(0, 1)):
            with pytest.raises(ReadOnlyDevice):
                call()
        img.flush()
        assert img.read(0, 101) == b"x" * 100 + b"\0"


def test_a_one_tebibyte_sparse_snapshot_opens_and_reads_at_once(
    repo_local: Repository, tmp_path: Path
) -> None:
    places = [0, 3 * GiB + 5, 512 * GiB, TiB - 100]
    plan = [(off, random.Random(off).randbytes(100)) for off in places]
    write_sparse(tmp_path / "src", TiB, plan)
    snap = backup(repo_local, str(tmp_path / "src"), "big", host="h").snapshot
    assert snap.height == 3
    repo_local.cache.clear_index()  # as after a restart: nothing in memory, no index loaded
    t0 = time.monotonic()
    with SnapshotImage(repo_local, snap) as img:
        assert img.read(0, 100) == plan[0][1]
        first_byte = time.monotonic() - t0
        for off, data in plan:
            assert img.read(off, len(data)) == data
        assert img.read(TiB // 3, 4096) == bytes(4096)
        ext = img.extents(0, TiB)
        assert sum(n for n, _ in ext) == TiB
        assert len(ext) <= 2 * len(places) + 1
        assert sum(n for n, zero in ext if not zero) == len(places) * snap.chunk_size
    assert first_byte < 1.0
    assert time.monotonic() - t0 < 3.0


def test_concurrent_readers_get_the_right_bytes_and_share_fetches(repo: Repository, tmp_path: Path) -> None:
    size = 24 * MiB
    rnd = random.Random(7)
    plan = [(i * MiB, rnd.randbytes(MiB)) for i in range(0, 24, 2)]
    write_sparse(tmp_path / "src", size, plan)
    image = bytearray(size)
    apply_writes(image, plan)
    snap = backup(repo, str(tmp_path / "src"), "vol", host="h").snapshot
    ranges: list[tuple[str, int, int]] = []
    real_get_range = repo.backend.get_range

    def counting(name: str, offset: int, length: int) -> bytes:
        ranges.append((name, offset, length))
        return real_get_range(name, offset, length)

    repo.backend.get_range = counting  # type: ignore[method-assign]
    errors: list[BaseException] = []
    with SnapshotImage(repo, snap, cache_bytes=64 * MiB) as img:

        def reader(seed: int) -> None:
            r = random.Random(seed)
            try:
                for _ in range(60):
                    off = r.randrange(size)
                    n = r.randint(1, min(size - off, 512 * KiB))
                    assert img.read(off, n) == image[off : off + n]
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    chunk_reads = [(n, o, ln) for n, o, ln in ranges if n.startswith("packs/")]
    # the cache holds the whole volume: every stored byte was fetched at most once
    fetched: set[tuple[str, int]] = set()
    for name, off, length in chunk_reads:
        for b in range(off, off + length, 512):
            assert (name, b) not in fetched, "a blob was fetched twice"
            fetched.add((name, b))


def test_sequential_reads_read_ahead(repo: Repository, tmp_path: Path) -> None:
    """After a few sequential reads, the next ones are served without waiting for the storage."""
    size = 16 * MiB
    data = random.Random(3).randbytes(size)
    write_sparse(tmp_path / "src", size, [(0, data)])
    snap = backup(repo, str(tmp_path / "src"), "vol", host="h").snapshot
    fetched: list[int] = []
    real_get_range = repo.backend.get_range

    def counting(name: str, offset: int, length: int) -> bytes:
        fetched.append(length)
        return real_get_range(name, offset, length)

    repo.backend.get_range = counting  # type: ignore[method-assign]
    with SnapshotImage(repo, snap, max_readahead=4 * MiB) as img:
        for off in range(0, 2 * MiB, 256 * KiB):
            assert img.read(off, 256 * KiB) == data[off : off + 256 * KiB]
        deadline, seen = time.monotonic() + 5, -1
        while (sum(fetched) < 4 * MiB or len(fetched) != seen) and time.monotonic() < deadline:
            seen = len(fetched)  # wait until the background fetches have settled
            time.sleep(0.1)
        before = len(fetched)
        assert img.read(2 * MiB, MiB) == data[2 * MiB : 3 * MiB]
        assert len(fetched) == before, "read-ahead did not cover the next sequential read"


def test_random_reads_fetch_only_what_they_read(repo: Repository, tmp_path: Path) -> None:
    size = 32 * MiB
    data = random.Random(4).randbytes(size)
    write_sparse(tmp_path / "src", size, [(0, data)])
    snap = backup(repo, str(tmp_path / "src"), "vol", host="h").snapshot
    fetched: list[int] = []
    real_get_range = repo.backend.get_range

    def counting(name: str, offset: int, length: int) -> bytes:
        fetched.append(length)
        return real_get_range(name, offset, length)

    repo.backend.get_range = counting  # type: ignore[method-assign]
    rnd = random.Random(5)
    with SnapshotImage(repo, snap) as img:
        chunks = set()
        for _ in range(40):
            off = rnd.randrange(0, size - 4 * KiB)
            assert img.read(off, 4 * KiB) == data[off : off + 4 * KiB]
            chunks.update({off // snap.chunk_size, (off + 4 * KiB - 1) // snap.chunk_size})
        time.sleep(0.2)  # read-ahead, had there been any, would be under way
    tree_nodes = 4 * 8 * KiB
    assert sum(fetched) <= 2 * len(chunks) * (snap.chunk_size + 64) + tree_nodes  # chance neighbours


def test_a_flipped_bit_fails_the_read_and_never_returns_other_bytes(tmp_path: Path) -> None:
    backend = MemoryBackend()
    repo = new_repo(backend, tmp_path / "cache")
    try:
        data = random.Random(5).randbytes(4 * 64 * KiB)
        write_sparse(tmp_path / "src", len(data), [(0, data)])
        snap = backup(repo, str(tmp_path / "src"), "vol", host="h").snapshot
        # the chunk at offset 128 KiB: flip one bit in the middle of its stored blob
        with SnapshotImage(repo, snap) as img:
            bid = img.tree.ids_range(2, 1)[0]
        damage_blob(repo, backend, bid, 0x10)
        with SnapshotImage(repo, snap) as img:
            assert img.read(0, 64 * KiB) == data[: 64 * KiB]
            for off, n in [(2 * 64 * KiB, 1), (64 * KiB, 3 * 64 * KiB), (0, len(data))]:
                with pytest.raises(CorruptObject):
                    img.read(off, n)
            assert img.read(3 * 64 * KiB, 64 * KiB) == data[3 * 64 * KiB :]
    finally:
        repo.close()


def test_reads_continue_after_gc_repacked_the_blobs(repo: Repository, tmp_path: Path) -> None:
    size = 4 * MiB
    rnd = random.Random(11)
    old = rnd.randbytes(size)
    write_sparse(tmp_path / "src", size, [(0, old)])
    first = backup(repo, str(tmp_path / "src"), "vol", host="h").snapshot
    new = bytearray(old)
    for i in range(0, size, 128 * KiB):  # every other chunk changes: packs mix live and dead blobs
        new[i : i + 64 * KiB] = rnd.randbytes(64 * KiB)
    write_sparse(tmp_path / "src", size, [(0, bytes(new))])
    second = backup(repo, str(tmp_path / "src"), "vol", host="h").snapshot
    packs_before = {n for n, _ in repo.backend.list("packs/")}
    with SnapshotImage(repo, second, cache_bytes=256 * KiB) as img:
        assert img.read(0, MiB) == new[:MiB]
        repo.delete_snapshot(first)
        report = gc(repo)
        assert report.packs_rewritten > 0
        assert packs_before - {n for n, _ in repo.backend.list("packs/")}
        assert img.read(0, size) == new
