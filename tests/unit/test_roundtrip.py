"""Acceptance: backup -> restore is bit-exact, for chunk sizes 4 KiB, 64 KiB and 4 MiB.

Each Hypothesis example builds a sparse image from a random write pattern, backs it up, changes
it with a second pattern (sometimes resizing it), backs it up again (incremental against the
first), then restores both snapshots and compares them byte for byte with what the image held.
A small fan-out is patched in for some examples so that multi-level trees are exercised.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import apply_writes, new_repo, write_sparse

import dingyuan.repository.backup as backup_mod
import dingyuan.repository.restore as restore_mod
from dingyuan.repository.backends.memory import MemoryBackend
from dingyuan.repository.backup import backup
from dingyuan.repository.format import ZERO_ID
from dingyuan.repository.manifest import Snapshot
from dingyuan.repository.repo import Repository
from dingyuan.repository.restore import restore
from dingyuan.repository.tree import tree_height

KiB, MiB = 1 << 10, 1 << 20
CHUNK_SIZES = [4 * KiB, 64 * KiB, 4 * MiB]
MAX_IMAGE = 20 * MiB  # sparse: only the written parts cost anything
MAX_WRITE = 1 * MiB

Write = tuple[int, bytes]


@dataclass
class WriteSpec:
    """A write, relative to the image size, so one spec list fits any size."""

    where: float  # 0..1 of the size; 1.0 means "ending exactly at the end"
    length_chunks: float  # in chunks
    kind: str  # random, repeat (a short pattern), blocks (one chunk-sized block again and again), zeros
    seed: int
    aligned: bool  # start on a chunk boundary

    def realize(self, size: int, cs: int) -> Write | None:
        if size == 0:
            return None
        length = max(1, min(int(self.length_chunks * cs), MAX_WRITE, size))
        off = size - length if self.where >= 1.0 else min(int(self.where * size), size - 1)
        if self.aligned:
            off = off // cs * cs
        length = min(length, size - off)
        rnd = random.Random(self.seed)
        if self.kind == "zeros":
            data = bytes(length)
        elif self.kind in ("repeat", "blocks"):
            pattern = rnd.randbytes(1 + self.seed % 7 if self.kind == "repeat" else min(cs, 64 * KiB))
            data = (pattern * (length // len(pattern) + 1))[:length]
        else:
            data = rnd.randbytes(length)
        return off, data


write_specs = st.builds(
    WriteSpec,
    where=st.one_of(st.floats(0, 1), st.sampled_from([0.0, 0.5, 1.0])),
    length_chunks=st.one_of(st.floats(0, 3), st.sampled_from([1 / 4096, 0.5, 1.0, 2.0, 3.0])),
    kind=st.sampled_from(["random", "repeat", "blocks", "zeros"]),
    seed=st.integers(0, 2**32),
    aligned=st.booleans(),
)


@dataclass
class Scenario:
    cs: int
    fanout: int | None  # None: the default fan-out
    size1: int
    writes1: list[WriteSpec]
    size2: int
    writes2: list[WriteSpec]
    block_device: bool  # restore snapshot 2 as onto a block device (holes written as zeros)


@st.composite
def sizes(draw: st.DrawFn, cs: int, fanout: int) -> int:
    max_chunks = max(1, min(fanout**3 + 2, MAX_IMAGE // cs))
    nchunks = draw(st.integers(0, max_chunks))
    delta = draw(st.sampled_from([0, 0, 1, -1, cs // 2, 4095, -4097, 17]))
    return max(0, min(MAX_IMAGE, nchunks * cs + delta))


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    cs = draw(st.sampled_from(CHUNK_SIZES))
    fanout = draw(st.sampled_from([None, 2, 3, 4]))
    size1 = draw(sizes(cs, fanout or 256))
    resize = draw(st.sampled_from(["same", "same", "same", "grow", "shrink", "other"]))
    if resize == "same":
        size2 = size1
    elif resize == "grow":
        size2 = min(MAX_IMAGE, size1 + draw(st.sampled_from([1, cs - 1, cs, 3 * cs + 5])))
    elif resize == "shrink":
        size2 = max(0, size1 - draw(st.sampled_from([1, cs - 1, cs, 3 * cs + 5])))
    else:
        size2 = draw(sizes(cs, fanout or 256))
    return Scenario(
        cs=cs,
        fanout=fanout,
        size1=size1,
        writes1=draw(st.lists(write_specs, max_size=6)),
        size2=size2,
        writes2=draw(st.lists(write_specs, max_size=6)),
        block_device=draw(st.booleans()),
    )


@contextmanager
def fanout_patched(fanout: int | None) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        if fanout is not None:
            mp.setattr(backup_mod, "DEFAULT_FANOUT", fanout)
        yield


@contextmanager
def as_block_device() -> Iterator[None]:
    """Make restore treat its (regular file) target like a block device: no truncation, holes
    written as zeros, the device may be larger than the snapshot."""

    def open_target(target: str, size: int) -> tuple[int, bool]:
        fd = os.open(target, os.O_WRONLY)
        assert os.lseek(fd, 0, os.SEEK_END) >= size
        return fd, False

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(restore_mod, "open_target", open_target)
        yield


def assert_restores(repo: Repository, snap: Snapshot, expected: bytes | bytearray, target: Path) -> None:
    assert snap.size == len(expected)
    restore(repo, snap, str(target))
    got = target.read_bytes()
    assert len(got) == len(expected)
    if got != expected:
        first = next(i for i in range(len(got)) if got[i] != expected[i])
        pytest.fail(f"restored image differs first at byte {first} (chunk {first // snap.chunk_size})")


def touched_chunks(writes: list[Write], cs: int) -> set[int]:
    out: set[int] = set()
    for off, data in writes:
        out.update(range(off // cs, (off + len(data) - 1) // cs + 1))
    return out


def realize(specs: list[WriteSpec], size: int, cs: int) -> list[Write]:
    return [w for w in (s.realize(size, cs) for s in specs) if w is not None]


@given(scenarios())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_backup_restore_is_bit_exact(sc: Scenario) -> None:
    cs = sc.cs
    with tempfile.TemporaryDirectory(prefix="dy-rt-") as tmp_, fanout_patched(sc.fanout):
        tmp = Path(tmp_)
        repo = new_repo(MemoryBackend(), tmp / "cache")
        img = tmp / "image"
        try:
            # first state
            w1 = realize(sc.writes1, sc.size1, cs)
            write_sparse(img, sc.size1, w1)
            image = bytearray(sc.size1)
            apply_writes(image, w1)
            expected1 = bytes(image)
            r1 = backup(repo, str(img), "vol", chunk_size=cs)
            s1 = r1.snapshot
            assert s1.parent is None and s1.chunk_size == cs and s1.size == sc.size1
            assert s1.fanout == (sc.fanout or 256)
            assert s1.height == tree_height(s1.nchunks, s1.fanout)
            if not any(expected1):
                assert s1.root == ZERO_ID and r1.chunks_new == 0

            # second state: resize, then more writes
            os.truncate(img, sc.size2)
            if sc.size2 < sc.size1:
                del image[sc.size2 :]
            else:
                image.extend(bytes(sc.size2 - sc.size1))
            w2 = realize(sc.writes2, sc.size2, cs)
            fd = os.open(img, os.O_WRONLY)
            try:
                for off, data in w2:
                    os.pwrite(fd, data, off)
            finally:
                os.close(fd)
            apply_writes(image, w2)
            expected2 = bytes(image)
            r2 = backup(repo, str(img), "vol", chunk_size=cs)
            s2 = r2.snapshot
            assert s2.parent == s1.id and s2.id != s1.id

            # incremental: only chunks the second pattern touched (or the resize changed) are new
            changed = touched_chunks(w2, cs)
            if sc.size2 != sc.size1:
                changed.update(range(min(sc.size1, sc.size2) // cs, s2.nchunks))
            assert r2.chunks_new <= len(changed)
            if expected2 == expected1:
                assert s2.root == s1.root and r2.chunks_new == 0

            # a full backup of the same image (no parent) builds the very same tree
            full = backup(repo, str(img), "vol-full", chunk_size=cs)
            assert full.snapshot.parent is None
            assert (full.snapshot.root, full.snapshot.height) == (s2.root, s2.height)
            assert full.chunks_new == 0

            # restore both; snapshot 2 onto the file snapshot 1 was restored to
            out = tmp / "restored"
            assert_restores(repo, repo.resolve(s1.id), expected1, out)
            if sc.block_device:
                device_size = max(sc.size2, sc.size1) + cs
                with open(out, "r+b") as f:
                    f.truncate(device_size)
                    f.seek(0)
                    f.write(random.Random(sc.size2).randbytes(device_size))
                with as_block_device():
                    restore(repo, repo.resolve(s2.id), str(out))
                got = out.read_bytes()
                assert len(got) == device_size
                assert got[: sc.size2] == expected2
                assert got[sc.size2 :] == random.Random(sc.size2).randbytes(device_size)[sc.size2 :]
            else:
                assert_restores(repo, repo.resolve(s2.id), expected2, out)
        finally:
            repo.close()


# --- restore targets -----------------------------------------------------------------------------


@pytest.fixture(params=["aes-256-gcm", "none"])
def any_repo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Repository]:
    r = new_repo(MemoryBackend(), tmp_path / "cache", encryption=request.param)
    yield r
    r.close()


def sample_image(path: Path, size: int, cs: int) -> bytes:
    """Data at the start, a hole, a repeated chunk, zeros over data, data in the partial tail."""
    rnd = random.Random(size)
    image = bytearray(size)
    writes: list[Write] = [
        (0, rnd.randbytes(min(size, cs + 100))),
        (min(size - 1, 3 * cs), b"\x5a" * min(cs, size - min(size - 1, 3 * cs))),
        (max(0, size - 10), rnd.randbytes(min(size, 10))),
        (min(size - 1, 50), bytes(min(size - 50, 20)) if size > 70 else b""),
    ]
    write_sparse(path, size, writes)
    apply_writes(image, writes)
    return bytes(image)


@pytest.mark.parametrize("cs", CHUNK_SIZES, ids=["4KiB", "64KiB", "4MiB"])
def test_restore_onto_existing_targets(any_repo: Repository, tmp_path: Path, cs: int) -> None:
    size = 5 * cs + 1234
    expected = sample_image(tmp_path / "img", size, cs)
    snap = backup(any_repo, str(tmp_path / "img"), "vol", chunk_size=cs).snapshot
    fresh = tmp_path / "fresh"
    assert_restores(any_repo, snap, expected, fresh)
    larger = tmp_path / "larger"
    larger.write_bytes(b"\xff" * (size + 3 * cs + 7))
    assert_restores(any_repo, snap, expected, larger)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(random.Random(1).randbytes(size))
    assert_restores(any_repo, snap, expected, garbage)
    smaller = tmp_path / "smaller"
    smaller.write_bytes(b"\x01" * 100)
    assert_restores(any_repo, snap, expected, smaller)
    # the holes of the snapshot stay holes in a regular-file target
    st = os.stat(fresh)
    assert st.st_blocks * 512 < size


def test_restore_into_a_block_device_writes_zeros_into_holes(any_repo: Repository, tmp_path: Path) -> None:
    cs = 4 * KiB
    size = 1000 * cs + 77  # several leaves with gaps between them at the default fan-out
    image = bytearray(size)
    writes: list[Write] = [(0, b"a" * 10), (300 * cs, b"b" * cs), (999 * cs + 5, b"c" * 72)]
    write_sparse(tmp_path / "img", size, writes)
    apply_writes(image, writes)
    snap = backup(any_repo, str(tmp_path / "img"), "vol", chunk_size=cs).snapshot
    dev = tmp_path / "dev"
    dev.write_bytes(b"\xee" * (size + 4096))
    with as_block_device():
        restore(any_repo, snap, str(dev))
    got = dev.read_bytes()
    assert got[:size] == image and got[size:] == b"\xee" * 4096


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097])
def test_tiny_images(any_repo: Repository, tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    write_sparse(tmp_path / "img", size, [(0, data)])
    snap = backup(any_repo, str(tmp_path / "img"), "vol", chunk_size=4096).snapshot
    assert snap.size == size and snap.nchunks == -(-size // 4096)
    out = tmp_path / "out"
    out.write_bytes(b"junk" * 5000)
    assert_restores(any_repo, snap, data, out)


def test_sparse_and_dense_zeros_give_the_same_snapshot(any_repo: Repository, tmp_path: Path) -> None:
    size = 3 * MiB + 5
    writes: list[Write] = [(MiB, b"x" * 100)]
    write_sparse(tmp_path / "sparse", size, writes)
    dense = bytearray(size)
    apply_writes(dense, writes)
    (tmp_path / "dense").write_bytes(dense)
    a = backup(any_repo, str(tmp_path / "sparse"), "a", chunk_size=64 * KiB).snapshot
    b = backup(any_repo, str(tmp_path / "dense"), "b", chunk_size=64 * KiB).snapshot
    assert (a.root, a.height, a.size) == (b.root, b.height, b.size)


def test_changing_chunk_size_or_fanout_between_backups(any_repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "img"
    size = 300 * KiB + 3
    expected = sample_image(img, size, 4 * KiB)
    s1 = backup(any_repo, str(img), "vol", chunk_size=4 * KiB).snapshot
    s2 = backup(any_repo, str(img), "vol", chunk_size=64 * KiB).snapshot
    assert s2.parent == s1.id and s2.chunk_size == 64 * KiB
    s3 = backup(any_repo, str(img), "vol").snapshot  # default: the parent's chunk size
    assert s3.chunk_size == 64 * KiB and s3.root == s2.root
    with fanout_patched(2):
        s4 = backup(any_repo, str(img), "vol").snapshot
    assert s4.fanout == 2 and s4.height == tree_height(s4.nchunks, 2)
    with open(img, "r+b") as f:
        f.seek(70 * KiB)
        f.write(b"changed")
    expected_after = bytearray(expected)
    expected_after[70 * KiB : 70 * KiB + 7] = b"changed"
    r5 = backup(any_repo, str(img), "vol")  # fan-out back to the default: the parent is not used
    assert r5.snapshot.fanout == 256 and r5.chunks_new == 1
    for snap, want in ((s1, expected), (s2, expected), (s4, expected), (r5.snapshot, bytes(expected_after))):
        assert_restores(any_repo, snap, want, tmp_path / f"out-{snap.id[:8]}")


def test_roundtrip_on_a_local_backend(repo_local: Repository, tmp_path: Path) -> None:
    img = tmp_path / "img"
    expected = sample_image(img, 2 * MiB + 100, 64 * KiB)
    with fanout_patched(3):
        snap = backup(repo_local, str(img), "vol", chunk_size=4 * KiB).snapshot
    assert snap.height == tree_height(snap.nchunks, 3) >= 3
    other = Repository.open(repo_local.backend, b"test", cache_dir=tmp_path / "other-cache")
    assert_restores(other, other.resolve("vol@latest"), expected, tmp_path / "out")
    other.close()
