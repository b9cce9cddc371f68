"""Live restore: a restore target served as a writable device while the copy runs.

What a user relies on: whatever mix of client reads, writes, zeroing, trims and flushes runs
alongside the copy, with restarts and crashes between, the finished target holds the snapshot
with exactly the client's writes on top (after a crash, each chunk as of the last flush or as
written since); no write is lost to the background copy; a restore resumes from its state and
finishes it; the state is gone once a complete restore is closed.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import apply_writes, new_repo, write_sparse

from dingyuan.errors import ExportError, UsageError
from dingyuan.repository.backends.memory import MemoryBackend
from dingyuan.repository.backup import backup
from dingyuan.repository.live import LiveRestore
from dingyuan.repository.manifest import Snapshot
from dingyuan.repository.repo import Repository

KiB = 1 << 10
CS = 4 * KiB


def make_snapshot(
    repo: Repository, tmp: Path, size: int, seed: int, name: str = "vol"
) -> tuple[Snapshot, bytes]:
    """A snapshot of a volume with random data, repeated chunks and holes; returns its bytes."""
    rnd = random.Random(seed)
    plan = []
    for _ in range(rnd.randint(0, 8)):
        off = rnd.randrange(size)
        n = min(size - off, rnd.randint(1, 6 * CS))
        plan.append((off, rnd.randbytes(n) if rnd.random() < 0.7 else b"\x07" * n))
    image = bytearray(size)
    apply_writes(image, plan)
    write_sparse(tmp / f"{name}.img", size, plan)
    snap = backup(
        repo, str(tmp / f"{name}.img"), name, host="h1", chunk_size=CS, consistency="crash"
    ).snapshot
    return snap, bytes(image)


def crash(dev: LiveRestore) -> None:
    """Abandon a device as a killed process would: nothing more recorded, the files just closed."""
    dev._release()


def state_files(state: Path) -> list[str]:
    return sorted(p.name for p in state.iterdir()) if state.exists() else []


@dataclass
class Op:
    kind: str  # write, zero, trim, flush, copy, reopen, crash, read
    where: float
    length: int
    seed: int


ops = st.lists(
    st.builds(
        Op,
        kind=st.sampled_from(
            ["write", "write", "write", "zero", "trim", "flush", "copy", "copy", "reopen", "crash", "read"]
        ),
        where=st.floats(0, 1),
        length=st.one_of(st.integers(1, 3 * CS), st.sampled_from([CS, 2 * CS])),
        seed=st.integers(0, 2**32),
    ),
    max_size=30,
)


@given(
    nchunks=st.integers(1, 40),
    tail=st.sampled_from([0, 0, 1, 1000]),
    snap_seed=st.integers(0, 2**32),
    script=ops,
    aligned=st.booleans(),
    restore_on_read=st.booleans(),
    batch=st.sampled_from([1, 3, 16]),
    old_target=st.booleans(),
)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_target_ends_as_the_snapshot_plus_the_clients_writes(
    tmp_path_factory: pytest.TempPathFactory,
    nchunks: int,
    tail: int,
    snap_seed: int,
    script: list[Op],
    aligned: bool,
    restore_on_read: bool,
    batch: int,
    old_target: bool,
) -> None:
    tmp = tmp_path_factory.mktemp("live")
    size = nchunks * CS + tail
    target, state = tmp / "target.img", tmp / "state"
    if old_target:  # a file with other contents (and size) is overwritten, holes included
        target.write_bytes(random.Random(snap_seed).randbytes(size + 3 * CS))
    repo = new_repo(MemoryBackend(), tmp / "cache")
    try:
        snap, snap_bytes = make_snapshot(repo, tmp, size, snap_seed)

        def open_live() -> LiveRestore:
            return LiveRestore(
                repo,
                snap,
                str(target),
                state,
                start=False,
                batch_bytes=batch * CS,
                restore_on_read=restore_on_read,
                cache_bytes=4 * CS,
            )

        model, flushed = bytearray(snap_bytes), snap_bytes
        dev = open_live()
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
                elif op.kind == "copy":
                    dev.restore_next()
                elif op.kind == "reopen":
                    dev.close()  # closing records what was written
                    flushed = bytes(model)
                    if dev.complete:  # the state is gone: opening again begins a new restore
                        assert state_files(state) == []
                        model, flushed = bytearray(snap_bytes), snap_bytes
                    dev = open_live()
                elif op.kind == "crash":
                    crash(dev)
                    dev = open_live()
                    got = dev.read(0, size)
                    for c in range(0, size, CS):
                        assert got[c : c + CS] in (flushed[c : c + CS], model[c : c + CS]), f"chunk {c // CS}"
                    model = bytearray(got)
                    flushed = got
                else:
                    assert dev.read(off, n) == model[off : off + n]
                    ext = dev.extents(off, n)
                    assert sum(x for x, _ in ext) == n
                    pos = off
                    for x, zero in ext:
                        if zero:
                            assert model[pos : pos + x] == bytes(x)
                        pos += x
            while dev.restore_next():
                pass
            assert dev.complete and dev.restored_bytes == size
            assert dev.read(0, size) == model  # served straight from the target now
        finally:
            dev.close()
        assert state_files(state) == []
        assert target.read_bytes()[:size] == model
    finally:
        repo.close()


@pytest.fixture
def snapshot(repo: Repository, tmp_path: Path) -> tuple[Snapshot, bytes]:
    """A volume mostly of data (holes cost the copier nothing, so they would not slow it)."""
    size = 300 * CS + 100
    data = bytearray(random.Random(5).randbytes(size))
    data[40 * CS : 50 * CS] = bytes(10 * CS)
    write_sparse(tmp_path / "dense.img", size, [(0, bytes(data))])
    return backup(repo, str(tmp_path / "dense.img"), "dense", host="h1", chunk_size=CS).snapshot, bytes(data)


def test_client_writes_during_the_copy_are_never_overwritten(
    repo: Repository, tmp_path: Path, snapshot: tuple[Snapshot, bytes]
) -> None:
    """Four threads write 512-byte pieces all over the volume while the copier runs in small
    batches: a copy that raced with a write would put the snapshot's bytes back."""
    snap, snap_bytes = snapshot
    size = snap.size
    model = bytearray(snap_bytes)
    target = tmp_path / "target.img"
    pieces = list(range(0, size - 512, 512))
    random.Random(3).shuffle(pieces)
    state = tmp_path / "state"
    with LiveRestore(repo, snap, str(target), state, batch_bytes=2 * CS, rate=256 << 10) as dev:

        def writer(mine: list[int], seed: int) -> None:
            rnd = random.Random(seed)
            for off in sorted(mine):  # in the copier's direction, so the two meet
                data = rnd.randbytes(512)
                dev.write(off, data)
                model[off : off + 512] = data
                time.sleep(0.002)

        threads = [threading.Thread(target=writer, args=(pieces[k::4][:40], k)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not dev.complete  # the writes really ran alongside the copy
        dev.rate = None
        assert dev.wait(60)
        assert dev.read(0, size) == model
    assert target.read_bytes() == model
    assert state_files(state) == []


def test_a_write_between_the_copiers_fetch_and_its_write_survives(
    repo: Repository, tmp_path: Path, snapshot: tuple[Snapshot, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the chunk locks exist for, made to happen: the copier has fetched a batch, a
    client writes into it, then the copier writes the batch."""
    snap, snap_bytes = snapshot
    target = tmp_path / "target.img"
    with LiveRestore(repo, snap, str(target), tmp_path / "state", start=False, batch_bytes=8 * CS) as dev:
        fetch = dev._copier.read

        def fetch_then_client_writes(offset: int, length: int) -> bytes:
            data = fetch(offset, length)
            dev.write(offset + 3 * CS + 5, b"client")
            return data

        monkeypatch.setattr(dev._copier, "read", fetch_then_client_writes)
        dev.restore_next()
        monkeypatch.undo()
        while dev.restore_next():
            pass
    expected = bytearray(snap_bytes)
    expected[3 * CS + 5 : 3 * CS + 11] = b"client"
    assert target.read_bytes() == expected


def test_a_closed_restore_resumes_without_fetching_restored_chunks_again(
    repo: Repository, tmp_path: Path, snapshot: tuple[Snapshot, bytes]
) -> None:
    snap, snap_bytes = snapshot
    target, state = tmp_path / "target.img", tmp_path / "state"
    seen: list[tuple[int, int]] = []
    with LiveRestore(
        repo,
        snap,
        str(target),
        state,
        start=False,
        batch_bytes=16 * CS,
        progress=lambda d, t: seen.append((d, t)),
    ) as dev:
        for _ in range(5):
            dev.restore_next()
        first = dev.fetched_chunks
        done = dev.restored_bytes
    assert seen[-1] == (done, snap.size) and 0 < done < snap.size
    assert state_files(state) == ["lock", "state"]
    with LiveRestore(repo, snap, str(target), state, start=False) as dev:
        assert dev.restored_bytes == done
        states = dev.chunk_states()
        dev.start()
        assert dev.wait(60)
        again = dev.fetched_chunks
    data_chunks = sum(1 for i in range(0, snap.size, CS) if any(snap_bytes[i : i + CS]))
    assert states[:80] == b"\x01" * 80  # five batches of 16
    assert first + again == data_chunks  # no chunk fetched twice
    assert target.read_bytes() == snap_bytes


def test_a_rate_limit_slows_the_copy_and_can_be_lifted(
    repo: Repository, tmp_path: Path, snapshot: tuple[Snapshot, bytes]
) -> None:
    snap, snap_bytes = snapshot
    with LiveRestore(repo, snap, str(tmp_path / "t.img"), tmp_path / "state", rate=8 * CS) as dev:
        assert not dev.wait(0.5)
        assert dev.restored_bytes < snap.size // 2
        dev.rate = None
        assert dev.wait(60)
        assert dev.read(0, snap.size) == snap_bytes
    with pytest.raises(UsageError, match="positive"):
        LiveRestore(repo, snap, str(tmp_path / "u.img"), tmp_path / "state2", rate=0)


def test_the_state_belongs_to_one_restore_and_one_opener(repo: Repository, tmp_path: Path) -> None:
    a, _ = make_snapshot(repo, tmp_path, 40 * CS, seed=1, name="a")
    b, _ = make_snapshot(repo, tmp_path, 40 * CS, seed=2, name="b")
    target, state = tmp_path / "target.img", tmp_path / "state"
    with LiveRestore(repo, a, str(target), state, start=False, batch_bytes=4 * CS) as dev:
        dev.restore_next()
        with pytest.raises(ExportError, match="another process has this restore open"):
            LiveRestore(repo, a, str(target), state, start=False)
    with pytest.raises(ExportError, match="another snapshot's restore"):
        LiveRestore(repo, b, str(target), state, start=False)
    target.unlink()
    with pytest.raises(Exception, match="Cannot write the restore target"):
        LiveRestore(repo, a, str(target), state, start=False)
