"""The repository: incremental backups, dedup, snapshot references, caches, retention, locks."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support import PASSPHRASE, write_sparse

from dingyuan.errors import (
    AmbiguousSnapshot,
    LockedError,
    MissingObject,
    RestoreTargetError,
    RetentionLocked,
    SnapshotNotFound,
    SourceError,
    UsageError,
)
from dingyuan.repository.backends.memory import MemoryBackend
from dingyuan.repository.backup import backup
from dingyuan.repository.format import ZERO_ID
from dingyuan.repository.locks import STALE_AFTER, RepoLock
from dingyuan.repository.manifest import Snapshot, utcnow
from dingyuan.repository.repo import Repository
from dingyuan.repository.restore import restore

KiB, MiB = 1 << 10, 1 << 20
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def random_file(path: Path, size: int, seed: int = 0) -> bytearray:
    data = bytearray(random.Random(seed).randbytes(size))
    path.write_bytes(data)
    return data


def second_view(repo: Repository, tmp_path: Path, name: str = "second-cache") -> Repository:
    """The same repository as another process would see it: its own cache."""
    return Repository.open(repo.backend, PASSPHRASE, cache_dir=tmp_path / name)


def empty_snapshot(volume: str, host: str, when: datetime) -> Snapshot:
    return Snapshot(volume, host, when, 0, 4096, 256, 1, ZERO_ID)


def restored(repo: Repository, snap: Snapshot, target: Path) -> bytes:
    restore(repo, snap, str(target))
    return target.read_bytes()


# --- incremental backups and dedup ---------------------------------------------------------------


def test_incremental_backup_stores_only_changed_chunks(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "img"
    data = random_file(img, 4 * MiB)
    r1 = backup(repo, str(img), "vol", chunk_size=64 * KiB)
    assert r1.chunks_new == 64 and r1.bytes_new == 4 * MiB and r1.bytes_scanned == 4 * MiB
    assert r1.snapshot.parent is None
    changed = [0, 17, 63]
    with open(img, "r+b") as f:
        for c in changed:
            f.seek(c * 64 * KiB + 100)
            f.write(b"new data")
            data[c * 64 * KiB + 100 : c * 64 * KiB + 108] = b"new data"
    r2 = backup(repo, str(img), "vol", chunk_size=64 * KiB)
    assert r2.chunks_new == 3 and r2.bytes_new == 3 * 64 * KiB
    assert r2.snapshot.parent == r1.snapshot.id
    assert r2.snapshot.stats["chunks_new"] == 3
    # unchanged image: nothing new, same tree
    r3 = backup(repo, str(img), "vol")
    assert r3.chunks_new == 0 and r3.snapshot.root == r2.snapshot.root
    assert r3.snapshot.parent == r2.snapshot.id and r3.snapshot.chunk_size == 64 * KiB
    assert restored(repo, r2.snapshot, tmp_path / "out") == data


def test_dedup_within_one_image_and_across_volumes(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "img"
    a, b = random.Random(1).randbytes(64 * KiB), random.Random(2).randbytes(64 * KiB)
    content = a * 8 + b * 7 + a + bytes(64 * KiB) * 4 + a[:1000]
    img.write_bytes(content)
    r1 = backup(repo, str(img), "vol", chunk_size=64 * KiB)
    assert r1.chunks_new == 3  # a, b and the short tail; zeros are never stored
    assert r1.bytes_new == 2 * 64 * KiB + 1000
    r2 = backup(repo, str(img), "other-volume", chunk_size=64 * KiB)
    assert r2.chunks_new == 0 and r2.snapshot.parent is None and r2.snapshot.root == r1.snapshot.root
    assert restored(repo, r1.snapshot, tmp_path / "out") == content


def test_compressible_data_is_stored_compressed(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.write_bytes(b"compressible " * 100_000)
    res = backup(repo, str(img), "vol", chunk_size=64 * KiB)
    assert res.bytes_stored < res.bytes_new // 10
    assert restored(repo, res.snapshot, tmp_path / "out") == img.read_bytes()


def test_snapshot_metadata(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "img"
    write_sparse(img, 1 * MiB + 3, [(5, b"x")])
    res = backup(
        repo, str(img), "vol", host="h1", labels={"k": "v"}, consistency="filesystem", at=T0, chunk_size=4096
    )
    snap = repo.resolve(res.snapshot.id)
    assert (snap.volume, snap.host, snap.time, snap.labels) == ("vol", "h1", T0, {"k": "v"})
    assert (snap.consistency, snap.size, snap.source) == ("filesystem", 1 * MiB + 3, str(img))
    assert snap.id == repo.snapshot_id(snap)
    with pytest.raises(UsageError):
        backup(repo, str(img), "vol", consistency="bogus")
    for bad in (1000, 3 * 4096, 8 * MiB):
        with pytest.raises(UsageError):
            backup(repo, str(img), "vol", chunk_size=bad)


def test_unreadable_sources(repo: Repository, tmp_path: Path) -> None:
    for source in (tmp_path / "missing", tmp_path):
        with pytest.raises(SourceError):
            backup(repo, str(source), "vol")
    assert repo.snapshots() == [] and list(repo.backend.list("locks/")) == []


def test_unwritable_restore_targets_and_missing_packs(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "img"
    data = random_file(img, 100_000)
    snap = backup(repo, str(img), "vol", chunk_size=4096).snapshot
    for target in (tmp_path / "no-such-dir" / "out", tmp_path):
        with pytest.raises(RestoreTargetError):
            restore(repo, snap, str(target))
    assert isinstance(repo.backend, MemoryBackend)
    packs = {n: v for n, v in repo.backend.objects.items() if n.startswith("packs/")}
    for name in packs:
        del repo.backend.objects[name]
    with pytest.raises(MissingObject):
        restore(repo, snap, str(tmp_path / "out"))
    repo.backend.objects.update(packs)
    assert restored(repo, snap, tmp_path / "out") == data


# --- snapshot references -------------------------------------------------------------------------


def test_resolve(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "img"
    random_file(img, 10_000)
    s1 = backup(repo, str(img), "vol", host="alpha", at=T0, chunk_size=4096).snapshot
    s2 = backup(repo, str(img), "vol", host="alpha", at=T0 + timedelta(hours=1)).snapshot
    s3 = backup(repo, str(img), "vol", host="beta", at=T0 + timedelta(hours=2)).snapshot
    s4 = backup(repo, str(img), "db", host="alpha", at=T0 + timedelta(hours=3)).snapshot
    assert len({s.id for s in (s1, s2, s3, s4)}) == 4
    for s in (s1, s2, s3, s4):
        assert repo.resolve(s.id).id == s.id
        assert repo.resolve(s.id.upper()).id == s.id
        others = [o.id for o in (s1, s2, s3, s4) if o is not s]
        n = next(n for n in range(4, 65) if not any(o.startswith(s.id[:n]) for o in others))
        assert repo.resolve(s.id[:n]).id == s.id
    assert repo.resolve("vol@latest").id == s3.id
    assert repo.resolve("alpha:vol@latest").id == s2.id
    assert repo.resolve("beta:vol@latest").id == s3.id
    assert repo.resolve("db@latest").id == s4.id
    assert repo.resolve("alpha:db@latest").id == s4.id
    for ref in ("nope@latest", "beta:db@latest", "gamma:vol@latest", "0000000000", "zzzz", "abc", "", "vol"):
        with pytest.raises(SnapshotNotFound):
            repo.resolve(ref)


def test_ambiguous_prefix(repo: Repository) -> None:
    # find two snapshots whose ids share their first 4 hex digits (birthday bound: a few hundred)
    seen: dict[str, Snapshot] = {}
    for i in range(100_000):
        snap = empty_snapshot("vol", "h", T0 + timedelta(seconds=i))
        sid = repo.snapshot_id(snap)
        if sid[:4] in seen:
            a, b = seen[sid[:4]], snap
            break
        seen[sid[:4]] = snap
    else:
        pytest.fail("no prefix collision found")
    a, b = repo.save_snapshot(a), repo.save_snapshot(b)
    common = a.id[: next(i for i in range(64) if a.id[i] != b.id[i])]
    assert len(common) >= 4
    with pytest.raises(AmbiguousSnapshot) as exc:
        repo.resolve(common)
    assert a.id[:12] in str(exc.value) and b.id[:12] in str(exc.value)
    assert repo.resolve(a.id[: len(common) + 1]).id == a.id
    assert repo.resolve(b.id[: len(common) + 1]).id == b.id
    assert repo.resolve("vol@latest").id == max(a, b, key=lambda s: s.time).id


# --- several processes, lost caches --------------------------------------------------------------


def test_a_second_process_sees_the_same_snapshots(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "img"
    data = random_file(img, 300_000)
    s1 = backup(repo, str(img), "vol", chunk_size=4096, at=T0).snapshot
    other = second_view(repo, tmp_path)
    assert [s.id for s in other.snapshots()] == [s.id for s in repo.snapshots()] == [s1.id]
    assert other.resolve("vol@latest").root == s1.root
    assert restored(other, other.resolve(s1.id[:10]), tmp_path / "out") == data
    # a backup through the first view appears in the second, and dedups against what it holds
    s2 = backup(repo, str(img), "vol", at=T0 + timedelta(minutes=1)).snapshot
    assert [s.id for s in other.snapshots()] == [s1.id, s2.id]
    r3 = backup(other, str(img), "vol", at=T0 + timedelta(minutes=2))
    assert r3.chunks_new == 0 and r3.snapshot.parent == s2.id
    assert [s.id for s in repo.snapshots()] == [s1.id, s2.id, r3.snapshot.id]
    # deletions too
    repo.delete_snapshot(s1)
    assert [s.id for s in other.snapshots()] == [s2.id, r3.snapshot.id]
    with pytest.raises(SnapshotNotFound):
        other.resolve(s1.id)
    other.close()


def test_a_second_process_sees_retention_changes(repo: Repository, tmp_path: Path) -> None:
    snap = repo.save_snapshot(empty_snapshot("vol", "h", T0))
    other = second_view(repo, tmp_path)
    assert [s.retention_until for s in other.snapshots()] == [None]
    until = utcnow() + timedelta(days=30)
    snap.retention_until = until
    snap.annotations = {"drill": "ok"}
    repo.update_snapshot(snap)
    assert other.resolve(snap.id).retention_until == until  # by id: read from the repository
    try:
        assert other.resolve("vol@latest").retention_until == until
        assert [(s.retention_until, s.annotations) for s in other.snapshots()] == [(until, {"drill": "ok"})]
    finally:
        other.close()


def test_a_lost_cache_is_rebuilt(repo_local: Repository, tmp_path: Path) -> None:
    img = tmp_path / "img"
    data = random_file(img, 500_000)
    s1 = backup(repo_local, str(img), "vol", chunk_size=4096).snapshot
    blobs = repo_local.cache.blob_count()
    assert blobs > 100
    cache_dir = tmp_path / "repo-cache"
    assert (cache_dir / repo_local.id / "cache.sqlite").exists()
    repo_local.close()
    shutil.rmtree(cache_dir)
    again = Repository.open(repo_local.backend, PASSPHRASE, cache_dir=cache_dir)
    assert again.cache.blob_count() == 0 and again.cache.snapshot_ids() == set()
    assert [s.id for s in again.snapshots()] == [s1.id]
    assert restored(again, again.resolve("vol@latest"), tmp_path / "out") == data  # restore syncs
    assert again.cache.blob_count() == blobs
    res = backup(again, str(img), "vol")
    assert res.chunks_new == 0 and res.snapshot.parent == s1.id
    again.close()


def test_index_objects_removed_elsewhere_are_dropped_from_the_cache(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "img"
    random_file(img, 50_000, seed=1)
    backup(repo, str(img), "a", chunk_size=4096)
    first_index = {n for n, _ in repo.backend.list("index/")}
    random_file(img, 50_000, seed=2)
    backup(repo, str(img), "b", chunk_size=4096)
    other = second_view(repo, tmp_path)
    other.sync_index()
    total = other.cache.blob_count()
    assert isinstance(repo.backend, MemoryBackend)
    for name in first_index:  # as a gc elsewhere would, after repacking
        del repo.backend.objects[name]
    other.sync_index()
    assert 0 < other.cache.blob_count() < total
    assert other.cache.index_files() == {n for n, _ in repo.backend.list("index/")}
    other.close()


# --- retention locks -----------------------------------------------------------------------------


def test_retention_lock_blocks_deletion(repo: Repository, tmp_path: Path) -> None:
    snap = repo.save_snapshot(empty_snapshot("vol", "h", T0))
    sid = snap.id
    until = utcnow() + timedelta(days=7)
    snap.retention_until = until
    repo.update_snapshot(snap)
    assert snap.id == sid and repo.read_snapshot(sid).retention_until == until
    with pytest.raises(RetentionLocked):
        repo.delete_snapshot(snap)
    # the repository's copy is authoritative: a stale in-memory copy does not help
    stale = repo.read_snapshot(sid)
    stale.retention_until = None
    with pytest.raises(RetentionLocked):
        repo.delete_snapshot(stale)
    other = second_view(repo, tmp_path)
    with pytest.raises(RetentionLocked):
        other.delete_snapshot(other.resolve(sid))
    other.close()
    assert repo.resolve(sid).id == sid
    # once the lock has expired the snapshot can go
    repo.delete_snapshot(snap, now=until + timedelta(seconds=1))
    with pytest.raises(SnapshotNotFound):
        repo.resolve(sid)
    assert repo.snapshots() == []


def test_retention_locks_only_extend(repo: Repository) -> None:
    snap = repo.save_snapshot(empty_snapshot("vol", "h", T0))
    until = utcnow() + timedelta(days=7)
    snap.retention_until = until
    repo.update_snapshot(snap)
    for shorter in (utcnow() + timedelta(days=1), utcnow() - timedelta(days=1)):
        snap.retention_until = shorter
        with pytest.raises(RetentionLocked):
            repo.update_snapshot(snap)
        assert repo.read_snapshot(snap.id).retention_until == until
    snap.retention_until = until + timedelta(days=1)
    snap.annotations = {"drill": "passed"}
    repo.update_snapshot(snap)
    stored = repo.read_snapshot(snap.id)
    assert stored.retention_until == until + timedelta(days=1) and stored.annotations == {"drill": "passed"}
    # annotations can change while the lock holds, as long as the lock is kept
    snap.annotations = {}
    repo.update_snapshot(snap)
    assert repo.read_snapshot(snap.id).annotations == {}


def test_retention_lock_cannot_be_cleared(repo: Repository) -> None:
    snap = repo.save_snapshot(empty_snapshot("vol", "h", T0))
    until = utcnow() + timedelta(days=7)
    snap.retention_until = until
    repo.update_snapshot(snap)
    snap.retention_until = None
    try:
        with pytest.raises(RetentionLocked):
            repo.update_snapshot(snap)
    finally:
        assert repo.read_snapshot(snap.id).retention_until == until
        with pytest.raises(RetentionLocked):
            repo.delete_snapshot(snap)


def test_update_snapshot_cannot_change_the_core(repo: Repository) -> None:
    snap = repo.save_snapshot(empty_snapshot("vol", "h", T0))
    snap.labels = {"sneaky": "change"}
    with pytest.raises(UsageError):
        repo.update_snapshot(snap)


# --- locks ---------------------------------------------------------------------------------------


def test_exclusive_and_shared_locks_conflict(repo: Repository) -> None:
    with repo.lock(exclusive=False, purpose="backup a", wait=0.5) as shared:
        with repo.lock(exclusive=False, purpose="backup b", wait=0.5) as shared2:
            assert not repo.lock_is_sole(shared.name)
            assert shared2.name != shared.name
        assert repo.lock_is_sole(shared.name)
        t0 = time.monotonic()
        with pytest.raises(LockedError) as exc:
            repo.lock(exclusive=True, purpose="gc", wait=0.5).acquire()
        assert 0.4 < time.monotonic() - t0 < 5
        assert "backup a" in str(exc.value)
    with repo.lock(exclusive=True, purpose="gc", wait=0.5) as excl:
        for exclusive in (False, True):
            with pytest.raises(LockedError):
                repo.lock(exclusive=exclusive, purpose="other", wait=0.3).acquire()
        assert repo.lock_is_sole(excl.name)
    assert list(repo.backend.list("locks/")) == []


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def lock_doc(**fields: object) -> bytes:
    doc: dict[str, object] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "exclusive": True,
        "time": time.time(),
        "purpose": "test",
    }
    doc.update(fields)
    return json.dumps(doc).encode()


def test_stale_locks_are_removed(repo: Repository) -> None:
    be = repo.backend
    be.create("locks/dead-process", lock_doc(pid=dead_pid()))
    be.create("locks/not-refreshed", lock_doc(host="elsewhere.invalid", time=time.time() - STALE_AFTER - 60))
    be.create("locks/garbage", b"\x00not json")
    with repo.lock(exclusive=True, purpose="gc", wait=0.5) as lk:
        assert [n for n, _ in be.list("locks/")] == [lk.name]
    assert list(be.list("locks/")) == []


def test_live_locks_are_kept(repo: Repository) -> None:
    be = repo.backend
    be.create("locks/alive-here", lock_doc(pid=os.getppid()))  # another live process on this host
    be.create("locks/alive-elsewhere", lock_doc(host="elsewhere.invalid", pid=1, exclusive=False))
    with pytest.raises(LockedError):
        repo.lock(exclusive=False, purpose="backup", wait=0.3).acquire()
    be.delete("locks/alive-here")
    with pytest.raises(LockedError):
        repo.lock(exclusive=True, purpose="gc", wait=0.3).acquire()
    with repo.lock(exclusive=False, purpose="backup", wait=0.3):
        pass
    assert sorted(n for n, _ in be.list("locks/")) == ["locks/alive-elsewhere"]


def test_backup_holds_a_shared_lock_only_while_running(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "img"
    random_file(img, 10_000)
    seen: list[list[dict[str, object]]] = []

    def progress(done: int, total: int) -> None:
        seen.append([json.loads(repo.backend.get(n)) for n, _ in repo.backend.list("locks/")])

    backup(repo, str(img), "vol", chunk_size=4096, progress=progress)
    assert seen and all(len(docs) == 1 for docs in seen)
    doc = seen[0][0]
    assert doc["exclusive"] is False and doc["pid"] == os.getpid() and doc["purpose"] == "backup vol"
    assert list(repo.backend.list("locks/")) == []
    # a gc holding the exclusive lock keeps a backup out
    with repo.lock(exclusive=True, purpose="gc", wait=0.5):
        lk = RepoLock(repo.backend, exclusive=False, purpose="backup", wait=0.2)
        with pytest.raises(LockedError):
            lk.acquire()


def test_an_exclusive_lock_keeps_backup_and_restore_out(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = tmp_path / "img"
    random_file(img, 20_000)
    snap = backup(repo, str(img), "vol", chunk_size=4096).snapshot

    def quick_lock(self: Repository, exclusive: bool, purpose: str, wait: float = 10.0) -> RepoLock:
        return RepoLock(self.backend, exclusive, purpose, min(wait, 0.3))

    monkeypatch.setattr(Repository, "lock", quick_lock)
    with repo.lock(exclusive=True, purpose="gc"):
        with pytest.raises(LockedError):
            backup(repo, str(img), "vol")
        with pytest.raises(LockedError):
            restore(repo, snap, str(tmp_path / "out"))
        assert not (tmp_path / "out").exists(), "the target must not be touched before the lock is held"
    assert [s.id for s in repo.snapshots()] == [snap.id]
    restore(repo, snap, str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == img.read_bytes()


@pytest.mark.parametrize("fields", [{"pid": "abc"}, {"time": None}], ids=["pid", "time"])
def test_a_malformed_lock_record_is_stale(repo: Repository, fields: dict[str, object]) -> None:
    repo.backend.create("locks/malformed", lock_doc(**fields))
    with repo.lock(exclusive=True, purpose="gc", wait=0.3) as lk:
        assert [n for n, _ in repo.backend.list("locks/")] == [lk.name]


def test_diff_names_exactly_the_changed_chunks(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "img"
    data = random_file(img, 4096 * 300 + 100)
    first = backup(repo, str(img), "vol", chunk_size=4096).snapshot
    for offset in (4096 * 7 + 5, 4096 * 250, len(data) - 1):  # two chunks and the short last one
        data[offset] ^= 0xFF
    data.extend(b"more")  # the volume grows: its new tail differs too
    img.write_bytes(data)
    second = backup(repo, str(img), "vol", chunk_size=4096).snapshot
    assert repo.diff(first, second) == [(4096 * 7, 4096), (4096 * 250, 4096), (4096 * 300, 104)]
    assert repo.diff(second, second) == []
    other = backup(repo, str(img), "other", chunk_size=8192).snapshot
    with pytest.raises(UsageError):
        repo.diff(first, other)
