"""Delta restore: a damaged copy of a snapshot is made bit-exact again, fetching only what differs.

Every example backs up a random volume (data, zero runs, a short last chunk), restores it, damages
the copy (overwrites, zeroed or punched ranges, truncation, extension) and delta-restores it. The
repository's backend is wrapped to record every ranged read, so the test sees which chunk blobs
were fetched: exactly those whose chunks the damage changed.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import new_repo

import dingyuan.repository.backup as backup_mod
import dingyuan.repository.delta as delta_mod
from dingyuan.errors import RestoreTargetError, StorageIOError
from dingyuan.repository.backends.base import Backend, Data
from dingyuan.repository.backends.memory import MemoryBackend
from dingyuan.repository.backup import backup
from dingyuan.repository.format import BlobType
from dingyuan.repository.manifest import Snapshot
from dingyuan.repository.repo import Repository
from dingyuan.repository.restore import restore
from dingyuan.repository.restore_journal import journal_path, read_journal
from dingyuan.repository.restore_target import punch_hole

CS = 4096


class RecordingBackend(Backend):
    """Wrap ``inner``; record every ranged read ``(name, offset, length)``. After
    ``fail_after_reads`` ranged reads (if set), every later one fails as a dropped connection would."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.location = inner.location
        self.reads: list[tuple[str, int, int]] = []
        self.fail_after_reads: int | None = None
        self._lock = threading.Lock()

    def put(self, name: str, data: Data) -> None:
        self.inner.put(name, data)

    def create(self, name: str, data: Data) -> None:
        self.inner.create(name, data)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def get(self, name: str) -> bytes:
        return self.inner.get(name)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        with self._lock:
            if self.fail_after_reads is not None and len(self.reads) >= self.fail_after_reads:
                raise StorageIOError(name=name, detail="connection reset")
            self.reads.append((name, offset, length))
        return self.inner.get_range(name, offset, length)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        return self.inner.list(prefix)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)


def fetched_chunk_ids(repo: Repository, backend: RecordingBackend, snap_image: bytes) -> set[bytes]:
    """Ids of the image's chunks whose stored blob lies inside a recorded read."""
    ids = {repo.cipher.blob_id(snap_image[p : p + CS]) for p in range(0, len(snap_image), CS)}
    out = set()
    for bid, loc in repo.cache.lookup_many(ids).items():
        if loc.entry.type != BlobType.CHUNK:
            continue
        name = f"packs/{loc.pack.hex()[:2]}/{loc.pack.hex()}"
        lo, hi = loc.entry.offset, loc.entry.offset + loc.entry.length
        if any(n == name and o <= lo and hi <= o + ln for n, o, ln in backend.reads):
            out.add(bid)
    return out


@st.composite
def volumes(draw: st.DrawFn) -> bytes:
    """A volume of random data and zero runs, often with a short last chunk."""
    parts = draw(
        st.lists(
            st.tuples(st.booleans(), st.integers(1, 6 * CS)),
            min_size=1,
            max_size=8,
        )
    )
    rnd = draw(st.randoms(use_true_random=False))
    return b"".join(rnd.randbytes(n) if data else bytes(n) for data, n in parts)


Damage = tuple[str, float, float]  # kind, position and length as fractions of the size


damages = st.lists(
    st.tuples(
        st.sampled_from(["write", "zero", "punch", "truncate", "extend"]),
        st.floats(0, 1),
        st.floats(0, 1),
    ),
    min_size=0,
    max_size=6,
)


def damage(path: Path, size: int, ops: list[Damage], seed: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        for n, (kind, at, length) in enumerate(ops):
            cur = os.fstat(fd).st_size
            off = int(at * cur)
            span = max(1, int(length * min(cur - off, 3 * CS)))
            if kind == "write":
                os.pwrite(fd, (seed + n).to_bytes(8, "little") * (span // 8 + 1), off)
            elif kind == "zero":
                os.pwrite(fd, bytes(span), off)
            elif kind == "punch" and off < cur:
                assert punch_hole(fd, off, min(off + span, cur))
            elif kind == "truncate":
                os.ftruncate(fd, off)
            elif kind == "extend":
                os.ftruncate(fd, cur + span)
    finally:
        os.close(fd)


@given(volumes(), damages, st.sampled_from([1, 3, 1024]), st.sampled_from([4, 256]), st.integers(0, 1 << 30))
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_delta_restore_rewrites_exactly_the_damaged_chunks(
    image: bytes, ops: list[Damage], window_chunks: int, fanout: int, seed: int
) -> None:
    with tempfile.TemporaryDirectory(prefix="dy-delta-") as tmp_, pytest.MonkeyPatch.context() as mp:
        mp.setattr(delta_mod, "SCAN_BYTES", window_chunks * CS)
        mp.setattr(backup_mod, "DEFAULT_FANOUT", fanout)
        tmp = Path(tmp_)
        backend = RecordingBackend(MemoryBackend())
        repo = new_repo(backend, tmp / "cache")
        src, target = tmp / "src.img", tmp / "target.img"
        src.write_bytes(image)
        snap = backup(repo, str(src), "vol", chunk_size=CS).snapshot
        restore(repo, snap, str(target))
        damage(target, len(image), ops, seed)
        seen = target.read_bytes()[: len(image)].ljust(len(image), b"\0")  # as cut or extended
        damaged = {
            i for i in range(snap.nchunks) if seen[i * CS : (i + 1) * CS] != image[i * CS : (i + 1) * CS]
        }
        wanted = {repo.cipher.blob_id(image[i * CS : (i + 1) * CS]) for i in damaged}
        wanted -= {repo.cipher.blob_id(bytes(len(image[i * CS : (i + 1) * CS]))) for i in damaged}

        backend.reads.clear()
        stats = restore(repo, snap, str(target), delta=True)

        assert target.read_bytes() == image
        assert stats.chunks_compared == snap.nchunks
        assert stats.chunks_differing == len(damaged)
        assert fetched_chunk_ids(repo, backend, image) == wanted
        assert stats.chunks_fetched == len(wanted)
        assert not journal_path(str(target), tmp).exists()


def _volume(tmp: Path, repo: Repository, nchunks: int) -> tuple[Snapshot, bytes]:
    image = os.urandom(nchunks * CS - 100)
    (tmp / "src.img").write_bytes(image)
    return backup(repo, str(tmp / "src.img"), "vol", chunk_size=CS).snapshot, image


def _interrupted(repo: Repository, backend: RecordingBackend, snap: Snapshot, target: Path) -> None:
    """Restore ``snap`` to ``target`` until half its reads are done, then drop the connection."""
    scratch = target.with_suffix(".count")
    backend.reads.clear()
    restore(repo, snap, str(scratch), fsync=False)
    scratch.unlink()
    total = len(backend.reads)
    assert total >= 6
    backend.fail_after_reads = total // 2
    backend.reads.clear()
    with pytest.raises(StorageIOError):
        restore(repo, snap, str(target), checkpoint_bytes=64 * CS)
    backend.fail_after_reads = None


def test_resume_after_a_dropped_connection_fetches_only_what_the_journal_lacks(tmp_path: Path) -> None:
    backend = RecordingBackend(MemoryBackend())
    repo = new_repo(backend, tmp_path / "cache")
    snap, image = _volume(tmp_path, repo, 1000)
    target = tmp_path / "target.img"
    _interrupted(repo, backend, snap, target)
    state = read_journal(journal_path(str(target), tmp_path), str(target))
    assert state is not None and state.snapshot == snap.id and state.mode == "full"
    assert 0 < state.done < snap.nchunks
    assert target.read_bytes()[: state.done * CS] == image[: state.done * CS]

    backend.reads.clear()
    stats = restore(repo, snap, str(target), resume=True)

    assert target.read_bytes() == image
    assert stats.resumed_at == state.done * CS
    restored_before = {repo.cipher.blob_id(image[p : p + CS]) for p in range(0, state.done * CS, CS)}
    assert not fetched_chunk_ids(repo, backend, image) & restored_before
    assert stats.chunks_fetched == snap.nchunks - state.done
    assert read_journal(journal_path(str(target), tmp_path), str(target)) is None


def test_a_target_mid_way_through_another_snapshots_restore_is_refused_without_force(tmp_path: Path) -> None:
    backend = RecordingBackend(MemoryBackend())
    repo = new_repo(backend, tmp_path / "cache")
    first, _ = _volume(tmp_path, repo, 1000)
    second, image = _volume(tmp_path, repo, 300)
    target = tmp_path / "target.img"
    _interrupted(repo, backend, first, target)

    for resume in (False, True):
        with pytest.raises(RestoreTargetError, match=first.id[:12]):
            restore(repo, second, str(target), resume=resume)
    restore(repo, second, str(target), force=True)
    assert target.read_bytes() == image


def test_resume_without_a_journal_is_a_delta_restore(tmp_path: Path) -> None:
    repo = new_repo(MemoryBackend(), tmp_path / "cache")
    snap, image = _volume(tmp_path, repo, 50)
    target = tmp_path / "target.img"
    target.write_bytes(image[: 20 * CS] + bytes(CS))
    stats = restore(repo, snap, str(target), resume=True)
    assert target.read_bytes() == image
    assert (stats.mode, stats.chunks_compared, stats.chunks_fetched) == ("delta", 50, 30)


def test_delta_restore_needs_an_existing_target(tmp_path: Path) -> None:
    repo = new_repo(MemoryBackend(), tmp_path / "cache")
    snap, _ = _volume(tmp_path, repo, 3)
    with pytest.raises(RestoreTargetError, match="does not exist"):
        restore(repo, snap, str(tmp_path / "missing.img"), delta=True)


def test_delta_restore_leaves_a_hole_where_a_large_zero_range_was_overwritten(tmp_path: Path) -> None:
    repo = new_repo(MemoryBackend(), tmp_path / "cache")
    image = os.urandom(CS) + bytes(4 << 20) + os.urandom(CS)
    (tmp_path / "src.img").write_bytes(image)
    snap = backup(repo, str(tmp_path / "src.img"), "vol", chunk_size=CS).snapshot
    target = tmp_path / "target.img"
    target.write_bytes(image[:CS] + os.urandom(4 << 20) + image[-CS:])
    stats = restore(repo, snap, str(target), delta=True)
    assert target.read_bytes() == image
    assert stats.bytes_zeroed == 4 << 20 and stats.chunks_fetched == 0
    assert os.stat(target).st_blocks * 512 < 1 << 20  # the zeros are a hole, as a full restore leaves them
