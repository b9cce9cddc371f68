"""Clones: writable copy-on-write volumes born from a snapshot.

What a user relies on: a clone reads as its model says after any mix of writes, zeroing, trims,
flushes, reopens and crashes (after a crash, every chunk is as of the last flush or as written
since, nothing else); a snapshot of a clone restores to the clone's bytes while the base keeps
its bytes and id; the base cannot be deleted, is kept by retention and its data by gc; only one
opener at a time; a process killed while writing loses nothing it flushed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import PASSPHRASE, apply_writes, new_repo, write_sparse

import dingyuan.repository.backup as backup_mod
from dingyuan.errors import CloneBusy, CloneNotFound, UsageError
from dingyuan.repository.backends.local import LocalBackend
from dingyuan.repository.backends.memory import MemoryBackend
from dingyuan.repository.backup import backup
from dingyuan.repository.clone import CloneDevice, CloneStore
from dingyuan.repository.format import snapshot_name
from dingyuan.repository.gc import gc
from dingyuan.repository.manifest import Snapshot, utcnow
from dingyuan.repository.repo import Repository
from dingyuan.repository.restore import restore
from dingyuan.repository.retention import KeepPolicy, apply_policy

KiB, MiB = 1 << 10, 1 << 20
CS = 4 * KiB


@contextmanager
def fanout(n: int | None) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        if n is not None:
            mp.setattr(backup_mod, "DEFAULT_FANOUT", n)
        yield


def make_base(
    repo: Repository, tmp: Path, size: int, seed: int, fan: int | None = None
) -> tuple[Snapshot, bytes]:
    """A snapshot of a volume with random data, repeated chunks and holes; returns its bytes."""
    rnd = random.Random(seed)
    plan = []
    for _ in range(rnd.randint(0, 6)):
        off = rnd.randrange(size)
        n = min(size - off, rnd.randint(1, 5 * CS))
        plan.append((off, rnd.randbytes(n) if rnd.random() < 0.7 else b"\x07" * n))
    image = bytearray(size)
    apply_writes(image, plan)
    write_sparse(tmp / "base.img", size, plan)
    with fanout(fan):
        snap = backup(
            repo, str(tmp / "base.img"), "base", host="h1", chunk_size=CS, consistency="filesystem"
        ).snapshot
    return snap, bytes(image)


def restored(repo: Repository, snap: Snapshot, tmp: Path) -> bytes:
    restore(repo, snap, str(tmp / "restored.img"), fsync=False)
    return (tmp / "restored.img").read_bytes()


def crash(dev: CloneDevice) -> None:
    """Abandon a device as a killed process would: no flush, the files just closed."""
    dev._closed = True
    dev.base.close()
    dev.overlay.close()
    dev._store._closed(dev.info.id)


@dataclass
class Op:
    kind: str  # write, zero, trim, flush, reopen, crash, read
    where: float
    length: int
    seed: int


ops = st.lists(
    st.builds(
        Op,
        kind=st.sampled_from(["write", "write", "write", "zero", "trim", "flush", "reopen", "crash", "read"]),
        where=st.floats(0, 1),
        length=st.one_of(st.integers(1, 3 * CS), st.sampled_from([CS, 2 * CS])),
        seed=st.integers(0, 2**32),
    ),
    max_size=25,
)


@given(
    nchunks=st.integers(1, 40),
    tail=st.sampled_from([0, 0, 1, 1000]),
    fan=st.sampled_from([None, 2, 3]),
    base_seed=st.integers(0, 2**32),
    script=ops,
    aligned=st.booleans(),
)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_clone_follows_its_model_and_snapshots_to_it(
    tmp_path_factory: pytest.TempPathFactory,
    nchunks: int,
    tail: int,
    fan: int | None,
    base_seed: int,
    script: list[Op],
    aligned: bool,
) -> None:
    tmp = tmp_path_factory.mktemp("clone")
    size = nchunks * CS + tail
    repo = new_repo(MemoryBackend(), tmp / "cache")
    try:
        base, base_bytes = make_base(repo, tmp, size, base_seed, fan)
        store = CloneStore(repo, tmp / "clones")
        info = store.create(base, "c1", labels={"purpose": "test"})
        model, flushed = bytearray(base_bytes), bytes(base_bytes)
        dev = store.open(info, cache_bytes=4 * CS)
        try:
            for op in script:
                off = min(int(op.where * size), size - 1)
                if aligned:
                    off = off // CS * CS
                n = min(op.length, size - off)
                if op.kind == "write":
                    data = random.Random(op.seed).randbytes(n)
                    dev.write(off, data)
                    model[off : off + n] = data
                elif op.kind in ("zero", "trim"):
                    (dev.write_zeroes if op.kind == "zero" else dev.trim)(off, n)
                    model[off : off + n] = bytes(n)
                elif op.kind == "flush":
                    dev.flush()
                    flushed = bytes(model)
                elif op.kind == "reopen":
                    dev.close()  # closing flushes
                    flushed = bytes(model)
                    dev = store.open(info, cache_bytes=4 * CS)
                elif op.kind == "crash":
                    crash(dev)
                    dev = store.open(info, cache_bytes=4 * CS)
                    got = dev.read(0, size)
                    for c in range(0, size, CS):
                        assert got[c : c + CS] in (flushed[c : c + CS], model[c : c + CS]), f"chunk {c // CS}"
                    model = bytearray(got)
                    flushed = got  # what the map now holds is what a crash can come back to
                else:
                    assert dev.read(off, n) == model[off : off + n]
                    ext = dev.extents(off, n)
                    assert sum(x for x, _ in ext) == n
                    pos = off
                    for x, zero in ext:
                        if zero:
                            assert model[pos : pos + x] == bytes(x)
                        pos += x
            assert dev.read(0, size) == model
            snap = store.snapshot(info)
        finally:
            dev.close()
        assert (snap.volume, snap.host, snap.parent, snap.consistency) == ("c1", "h1", base.id, "filesystem")
        assert snap.labels == {"purpose": "test", "clone": info.id}
        assert restored(repo, snap, tmp) == model
        again = repo.read_snapshot(base.id)
        assert repo.snapshot_id(again) == base.id and again.root == base.root
        assert restored(repo, base, tmp) == base_bytes
    finally:
        repo.close()


def test_promote_makes_a_snapshot_of_the_volume_and_removes_the_clone(
    repo: Repository, tmp_path: Path
) -> None:
    base, base_bytes = make_base(repo, tmp_path, 64 * CS, 1)
    store = CloneStore(repo, tmp_path / "clones")
    info = store.create(base, "work")
    with store.open("work") as dev:
        dev.write(5 * CS + 10, b"promoted")
        dev.flush()
    snap = store.promote(info, "restored-vol", host="h2")
    expected = bytearray(base_bytes)
    expected[5 * CS + 10 : 5 * CS + 18] = b"promoted"
    assert (snap.volume, snap.host, snap.parent) == ("restored-vol", "h2", base.id)
    assert repo.latest("restored-vol", "h2") is not None
    assert restored(repo, snap, tmp_path) == expected
    assert store.list() == []
    assert not (tmp_path / "clones" / info.id).exists()
    with pytest.raises(CloneNotFound):
        store.get("work")
    repo.delete_snapshot(base)  # no clone holds it any more


def test_one_opener_at_a_time(repo: Repository, tmp_path: Path) -> None:
    base, _ = make_base(repo, tmp_path, 16 * CS, 2)
    store = CloneStore(repo, tmp_path / "clones")
    other = CloneStore(repo, tmp_path / "clones")  # as a second process would see it
    info = store.create(base, "busy")
    with store.open(info):
        with pytest.raises(CloneBusy):
            other.open(info)
        with pytest.raises(CloneBusy):
            store.open(info)
        with pytest.raises(CloneBusy):
            store.delete(info)
        with pytest.raises(CloneBusy):
            other.delete(info)
    with other.open(info):
        pass
    store.delete(info)
    assert store.list() == []


def test_concurrent_writers_to_the_same_chunks_lose_nothing(repo: Repository, tmp_path: Path) -> None:
    """Eight threads each own every eighth 512-byte piece, so every chunk is copied up while
    the others write into it: a copy-up that raced with another would lose a write."""
    base_bytes = random.Random(8).randbytes(200 * CS + 512)  # dense: copy-ups fetch and wait
    write_sparse(tmp_path / "dense.img", len(base_bytes), [(0, base_bytes)])
    base = backup(repo, str(tmp_path / "dense.img"), "dense", host="h1", chunk_size=CS).snapshot
    store = CloneStore(repo, tmp_path / "clones")
    info = store.create(base, "busy")
    model = bytearray(base_bytes)
    pieces = len(model) // 512
    errors: list[BaseException] = []
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
    with store.open(info, cache_bytes=4 * CS) as dev:

        def writer(t: int) -> None:
            rnd = random.Random(t)
            mine = list(range(t, pieces, 8))  # each once: a lost write stays lost
            rnd.shuffle(mine)
            try:
                for p in mine:
                    if rnd.random() < 0.2:
                        dev.write_zeroes(p * 512, 512)
                        model[p * 512 : p * 512 + 512] = bytes(512)
                    else:
                        data = rnd.randbytes(512)
                        dev.write(p * 512, data)
                        model[p * 512 : p * 512 + 512] = data
                    if rnd.random() < 0.05:
                        dev.flush()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(switch)
        assert not errors, errors[0]
        assert dev.read(0, base.size) == model
    with store.open(info) as dev:
        assert dev.read(0, base.size) == model


def test_names_ids_and_prefixes(repo: Repository, tmp_path: Path) -> None:
    base, _ = make_base(repo, tmp_path, 16 * CS, 3)
    store = CloneStore(repo, tmp_path / "clones")
    a = store.create(base, "alpha")
    with pytest.raises(UsageError):
        store.create(base, "alpha")
    with pytest.raises(UsageError):
        store.create(base, "-bad/name")
    assert store.get("alpha").id == a.id
    assert store.get(a.id).name == "alpha"
    assert store.get(a.id[:8]).name == "alpha"
    with pytest.raises(CloneNotFound):
        store.get("beta")
    assert [c.name for c in store.list()] == ["alpha"]


def test_a_clone_base_is_kept_by_delete_retention_and_gc(repo: Repository, tmp_path: Path) -> None:
    base, base_bytes = make_base(repo, tmp_path, 48 * CS, 4)
    store = CloneStore(repo, tmp_path / "clones")
    info = store.create(base, "keeper")
    with pytest.raises(UsageError, match="base of clone keeper"):
        repo.delete_snapshot(base)
    decisions = apply_policy(
        repo.snapshots(), KeepPolicy(), utcnow(), dict.fromkeys(repo.clone_bases(), "clone-base")
    )
    assert [(d.keep, d.reasons) for d in decisions] == [(True, ["clone-base"])]
    # Even if the manifest went (a delete racing with the clone's creation), gc keeps the data.
    repo.backend.delete(snapshot_name(base.id))
    report = gc(repo)
    assert report.blobs_freed == 0
    with store.open(info) as dev:
        assert dev.read(0, base.size) == base_bytes
    store.delete(info)
    gc(repo)
    assert not list(repo.backend.list("packs/")) or gc(repo).blobs_freed == 0


def test_gc_leaves_a_clone_readable(repo: Repository, tmp_path: Path) -> None:
    base, base_bytes = make_base(repo, tmp_path, 48 * CS, 5)
    other = backup(repo, str(tmp_path / "base.img"), "base", host="h1").snapshot  # shares chunks
    store = CloneStore(repo, tmp_path / "clones")
    info = store.create(base, "c")
    repo.delete_snapshot(other)
    gc(repo)
    with store.open(info) as dev:
        assert dev.read(0, base.size) == base_bytes


def test_sweep_removes_overlays_without_a_record(repo: Repository, tmp_path: Path) -> None:
    base, _ = make_base(repo, tmp_path, 8 * CS, 6)
    store = CloneStore(repo, tmp_path / "clones")
    kept = store.create(base, "kept")
    gone = store.create(base, "gone")
    repo.delete_clone(gone.id)  # a crash between the two steps of delete
    assert store.sweep() == [gone.id]
    assert sorted(p.name for p in (tmp_path / "clones").iterdir()) == [kept.id]


CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from dingyuan.repository.backends.local import LocalBackend
    from dingyuan.repository.clone import CloneStore
    from dingyuan.repository.repo import Repository

    tmp = Path(sys.argv[1])
    repo = Repository.open(LocalBackend(tmp / "repo"), sys.argv[2].encode(), tmp / "cache")
    dev = CloneStore(repo, tmp / "clones").open("victim")
    cs = dev.block_size
    for i in range(8):  # flushed: must survive
        dev.write(i * 3 * cs + 100, bytes([i + 1]) * cs)
    dev.flush()
    dev.write(2 * cs, b"late" * 1000)  # not flushed: may survive or not
    dev.trim(0, cs)
    print("ready", flush=True)
    while True:
        dev.write(5 * cs, os.urandom(cs))
    """
)


def test_a_killed_writer_loses_nothing_it_flushed(tmp_path: Path) -> None:
    repo = new_repo(LocalBackend(tmp_path / "repo"), tmp_path / "cache")
    try:
        base, base_bytes = make_base(repo, tmp_path, 32 * CS, 7)
        store = CloneStore(repo, tmp_path / "clones")
        info = store.create(base, "victim")
        src = Path(__file__).resolve().parents[2] / "src"
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), PASSPHRASE.decode()],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(src)},
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        expected = bytearray(base_bytes)
        for i in range(8):
            expected[i * 3 * CS + 100 : i * 3 * CS + 100 + CS] = bytes([i + 1]) * CS
        with store.open(info) as dev:  # the dead process's lock is gone with it
            got = dev.read(0, base.size)
        for c in range(0, base.size, CS):
            if c // CS in (0, 2, 3, 5):  # written after the flush
                continue
            assert got[c : c + CS] == expected[c : c + CS], f"chunk {c // CS}"
        assert got[CS : 2 * CS] == expected[CS : 2 * CS]
    finally:
        repo.close()
