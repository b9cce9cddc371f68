"""Storage faults: ENOSPC and EIO at every backend write of backup, gc and snapshot locking.

In process, through the library: the repository's LocalBackend is wrapped in a FaultyBackend
that fails the Nth write (put, create, delete) and every later one, for every N from 1 until the
operation completes without reaching N. Each failure must surface as StorageFull (ENOSPC) or
StorageIOError (EIO), with a message that says what happened, never as a raw OSError or another
exception. Afterwards the repository, opened normally, must still restore every committed
snapshot bit-exact and pass ``verify --read-data``, and a normal re-run of the operation must
succeed.

Two ways of retrying:

* ``fresh``: each N starts from a pristine copy of the repository with an empty cache, so N hits
  exactly the Nth write of the operation; the normal re-run follows every failure.
* ``shared``: one repository and one cache (the one that built the repository) across every N,
  so each attempt starts from the leftovers of all earlier failures (unindexed packs, half-done
  gc, a cache that is out of date); the normal re-run follows the last failure.

A failed operation in this process leaves its lock behind (the release is a write too); a real
``dingyuan`` process exits and the next command removes that lock as stale. The tests simulate
that exit (``locks_of_exited_process``); ``test_failed_release_does_not_lock_out_own_process``
shows what happens in a long-lived process.

One more test fills a real (loop-mounted ext4) file system through the CLI, when run as root.

Expected failures (bugs): a failed lock release locks out its own process; every snapshot update
deletes all older note revisions again; a full disk under the local cache gives tracebacks.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import (
    CHUNK,
    cli_env,
    describe,
    first_difference,
    init_repo,
    locks_of_exited_process,
    make_image,
    open_repo,
    run_cli,
    sha256,
    sha256_file,
    snapshot_ids,
    write_file,
)

from dingyuan.errors import DingyuanError, StorageFull, StorageIOError
from dingyuan.repository.backends.faults import FaultyBackend
from dingyuan.repository.backends.local import LocalBackend
from dingyuan.repository.backup import backup
from dingyuan.repository.format import ZERO_ID, BlobType
from dingyuan.repository.gc import gc
from dingyuan.repository.repo import Repository
from dingyuan.repository.restore import restore
from dingyuan.repository.verify import verify

PACK_SIZE = 64 << 10
IMAGE_SIZE = 3 << 20
VOLUME = "vol"
UNTIL = datetime(2100, 1, 1, tzinfo=UTC)
MAX_ATTEMPTS = 400

# errno -> (exception, words its message must contain)
FAULTS: dict[str, tuple[int, type[DingyuanError], str]] = {
    "ENOSPC": (errno.ENOSPC, StorageFull, "is full"),
    "EIO": (errno.EIO, StorageIOError, "I/O error"),
}


# the starting states ---------------------------------------------------------------------------
@dataclass
class World:
    """A prepared repository and what the operation under test works on."""

    root: Path  # the pristine repository
    cache: Path  # the cache that built it
    expected: dict[str, str]  # committed snapshot id -> sha256 of its image
    source: Path | None = None  # the image the operation backs up
    images: dict[str, bytes] = field(default_factory=dict)  # sha256 -> image, for messages


def _overwrite(img: bytearray, rng: random.Random, regions: list[tuple[int, int, str]]) -> None:
    for off, n, kind in regions:
        if kind == "random":
            img[off : off + n] = rng.randbytes(n)
        elif kind == "text":
            word = rng.randbytes(rng.randint(5, 30))
            img[off : off + n] = (word * (n // len(word) + 1))[:n]
        else:
            img[off : off + n] = bytes(n)


def _prepare(tmp: Path, nsnaps: int) -> tuple[World, list[str]]:
    """A repository with ``nsnaps`` snapshots of one volume, each a mutation of the one before.

    Snapshot 2 rewrites regions that snapshot 3 overwrites again, so deleting snapshot 2 frees
    chunks, some of them packed together with chunks that stay live.
    """
    rng = random.Random(20260101)
    root, cache, image = tmp / "repo", tmp / "cache", tmp / "image"
    init_repo(LocalBackend(root), cache, PACK_SIZE).close()
    # 3 MiB: random chunks (a pack each), compressible ones (several per pack), zeros, and
    # chunk-aligned copies of earlier chunks (stored once)
    img = bytearray(IMAGE_SIZE)
    img[0 : 24 * CHUNK] = rng.randbytes(24 * CHUNK)
    _overwrite(img, rng, [(24 * CHUNK, 12 * CHUNK, "text")])
    img[40 * CHUNK : 48 * CHUNK] = img[0 : 8 * CHUNK]
    plans = [
        [],
        [
            (5 * CHUNK, 6 * CHUNK, "random"),
            (16 * CHUNK, 5 * CHUNK, "text"),
            (21 * CHUNK + 1000, 4 * CHUNK, "text"),
            (30 * CHUNK - 77, 3 * CHUNK, "random"),
            (40 * CHUNK, 2 * CHUNK, "zero"),
        ],
        [(5 * CHUNK, 6 * CHUNK, "random"), (16 * CHUNK, 5 * CHUNK, "text"), (44 * CHUNK, 3 * CHUNK, "text")],
        [(1 * CHUNK + 5, 7 * CHUNK, "random"), (26 * CHUNK, 9 * CHUNK, "text"), (36 * CHUNK, CHUNK, "zero")],
    ]
    world = World(root, cache, {}, image)
    ids: list[str] = []
    repo = open_repo(root, cache)
    try:
        for k in range(nsnaps + 1):
            _overwrite(img, rng, plans[k])
            write_file(image, img)
            world.images[sha256(img)] = bytes(img)
            if k == nsnaps:
                break  # the last state is the source of the backup under test
            snap = backup(repo, str(image), VOLUME).snapshot
            world.expected[snap.id] = sha256(img)
            ids.append(snap.id)
    finally:
        repo.close()
    return world, ids


# the operations --------------------------------------------------------------------------------
@dataclass
class Scenario:
    prepare: Callable[[Path], World]
    operation: Callable[[Repository, World], None]
    commits: bool = False  # the operation may commit a snapshot of world.source
    check_done: Callable[[Repository, World], None] = lambda repo, world: None


def _prepare_first(tmp: Path) -> World:
    return _prepare(tmp, 0)[0]


def _prepare_incremental(tmp: Path) -> World:
    return _prepare(tmp, 1)[0]


def _prepare_gc(tmp: Path) -> World:
    world, ids = _prepare(tmp, 3)
    repo = open_repo(world.root, world.cache)
    try:
        repo.delete_snapshot(repo.read_snapshot(ids[1]))
    finally:
        repo.close()
    del world.expected[ids[1]]
    world.source = None
    return world


def _prepare_lock(tmp: Path) -> World:
    world = _prepare(tmp, 3)[0]
    world.source = None
    return world


def _backup(repo: Repository, world: World) -> None:
    assert world.source is not None
    backup(repo, str(world.source), VOLUME)


def _lock_all(repo: Repository, world: World) -> None:
    """What ``dingyuan snapshot lock --until 2100-01-01 ALL`` does: a new note per snapshot not
    yet locked that long."""
    for sid in sorted(world.expected):
        snap = repo.read_snapshot(sid)
        if snap.retention_until is not None and snap.retention_until >= UNTIL:
            continue
        snap.retention_until = UNTIL
        repo.update_snapshot(snap)


def _backed_up(repo: Repository, world: World) -> None:
    assert world.source is not None
    digest = sha256_file(world.source)
    assert digest in world.expected.values(), "the re-run committed no snapshot of the image"


def _referenced_chunks(repo: Repository) -> set[bytes]:
    out: set[bytes] = set()
    for snap in repo.snapshots():
        for _, ids in repo.tree(snap).leaves():
            out.update(c for c in ids if c != ZERO_ID)
    return out


def _collected(repo: Repository, world: World) -> None:
    """After a complete gc, nothing but live data is left: no unindexed pack, no dead chunk."""
    report = verify(repo)
    assert report.ok and not report.warnings, f"after gc: {report.as_dict()}"
    indexed = {
        e.id
        for name, _ in repo.backend.list("index/")
        for ref in repo.read_index(name)
        for e in ref.entries
        if e.type == BlobType.CHUNK
    }
    live = _referenced_chunks(repo)
    assert indexed == live, (
        f"after gc the index lists {len(indexed - live)} chunk(s) no snapshot uses "
        f"(and lacks {len(live - indexed)} that one uses)"
    )


def _all_locked(repo: Repository, world: World) -> None:
    for sid in world.expected:
        assert repo.read_snapshot(sid).retention_until == UNTIL, f"snapshot {sid[:12]} not locked"


SCENARIOS = {
    "backup-first": Scenario(_prepare_first, _backup, commits=True, check_done=_backed_up),
    "backup-incremental": Scenario(_prepare_incremental, _backup, commits=True, check_done=_backed_up),
    "gc": Scenario(_prepare_gc, lambda repo, world: gc(repo), check_done=_collected),
    "snapshot-lock": Scenario(_prepare_lock, _lock_all, check_done=_all_locked),
}


# checks ----------------------------------------------------------------------------------------
def check_repository(root: Path, cache: Path, world: World, scenario: Scenario, where: str) -> None:
    """Open the repository normally: every committed snapshot restores bit-exact, verify passes.

    A snapshot the failed operation committed (only a backup can) is added to ``world.expected``.
    """
    repo = open_repo(root, cache)
    try:
        present = snapshot_ids(repo.backend)
        lost = set(world.expected) - present
        assert not lost, f"{where}: committed snapshots vanished: {sorted(lost)}"
        new = present - set(world.expected)
        if new:
            assert scenario.commits and len(new) == 1, f"{where}: unexpected snapshots {sorted(new)}"
            assert world.source is not None
            world.expected[new.pop()] = sha256_file(world.source)
        target = root.parent / "restored"
        for sid, digest in sorted(world.expected.items()):
            snap = repo.read_snapshot(sid)
            assert snap.retention_until in (None, UNTIL), f"{where}: {sid[:12]} has a mangled lock"
            restore(repo, snap, str(target))
            got = target.read_bytes()
            target.unlink()
            if sha256(got) != digest:
                where_diff = first_difference(got, world.images.get(digest, b""))
                pytest.fail(f"{where}: snapshot {sid[:12]} restored wrong: {where_diff}")
        report = verify(repo, read_data=True)
        assert report.ok, f"{where}: verify --read-data found problems: {report.problems}"
    finally:
        repo.close()


def attempt(
    root: Path, cache: Path, n: int, errno_: int, scenario: Scenario, world: World
) -> tuple[DingyuanError | None, int]:
    """Run the operation with the Nth write failing; returns (its error or None, writes tried)."""
    faulty = FaultyBackend(LocalBackend(root), fail_at_write=n, errno_=errno_)
    repo = open_repo(faulty, cache)
    try:
        scenario.operation(repo, world)
    except DingyuanError as e:
        return e, faulty.writes
    except Exception as e:  # a raw OSError, an assertion, anything else: the bug this test is for
        pytest.fail(f"{type(e).__name__} instead of a storage error: {e!r}")
    finally:
        repo.close()
    return None, faulty.writes


def normal_run(root: Path, cache: Path, scenario: Scenario, world: World, where: str) -> None:
    repo = open_repo(root, cache)
    try:
        scenario.operation(repo, world)
    except DingyuanError as e:
        pytest.fail(f"{where}: the normal re-run failed: {e!r}")
    finally:
        repo.close()
    check_repository(root, cache, world, scenario, f"{where}, after the normal re-run")
    repo = open_repo(root, cache)
    try:
        scenario.check_done(repo, world)
    finally:
        repo.close()


# the fault loops -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fresh", "shared"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_fault_at_every_write(tmp_path: Path, name: str, fault: str, mode: str) -> None:
    scenario = SCENARIOS[name]
    errno_, error, words = FAULTS[fault]
    pristine = scenario.prepare(tmp_path / "prep")
    committed = dict(pristine.expected)
    if mode == "shared":
        root, cache = pristine.root, pristine.cache
    failures = 0
    for n in range(1, MAX_ATTEMPTS + 1):
        where = f"{name}, {fault} at write {n} ({mode} cache)"
        if mode == "fresh":
            root, cache = tmp_path / f"repo-{n}", tmp_path / f"cache-{n}"
            shutil.copytree(pristine.root, root)
            pristine.expected = dict(committed)
        err, writes = attempt(root, cache, n, errno_, scenario, pristine)
        if err is None:
            if writes >= n:  # only the lock release may fail silently: its record is then left over
                leftover = [name for name, _ in LocalBackend(root).list("locks/")]
                assert leftover, f"{where}: a failed write was swallowed, the operation went on"
                locks_of_exited_process(LocalBackend(root))
            check_repository(root, cache, pristine, scenario, f"{where}: completed")
            break
        failures += 1
        assert type(err) is error, f"{where}: {type(err).__name__} instead of {error.__name__}: {err}"
        assert words in str(err), f"{where}: the message does not say what happened: {err}"
        assert writes >= n, f"{where}: failed before the Nth write: {err!r}"
        locks_of_exited_process(LocalBackend(root))  # the failed process has exited
        check_repository(root, cache, pristine, scenario, where)
        if mode == "fresh":
            normal_run(root, cache, scenario, pristine, where)
            shutil.rmtree(root)
            shutil.rmtree(cache, ignore_errors=True)
    else:
        pytest.fail(f"{name}: still failing after {MAX_ATTEMPTS} attempts")
    print(f"{name}, {fault}, {mode} cache: failed at writes 1..{failures}, then completed")
    assert failures >= (1 if name == "snapshot-lock" else 5), f"{name}: only {failures} write(s)"
    if mode == "shared":
        normal_run(root, cache, scenario, pristine, f"{name}, {fault}, shared cache, after {failures} faults")


def test_failed_release_does_not_lock_out_own_process(tmp_path: Path) -> None:
    """A long-lived process (an agent) whose backup failed with EIO, lock release included,
    must still be able to take the exclusive lock for gc: the lock left behind is its own."""
    world = _prepare_incremental(tmp_path)
    err, writes = attempt(world.root, world.cache, 2, errno.EIO, SCENARIOS["backup-incremental"], world)
    assert isinstance(err, StorageIOError) and writes > 2
    repo = open_repo(world.root, world.cache)
    try:
        with repo.lock(exclusive=True, purpose="gc", wait=0.5):
            pass
    finally:
        repo.close()


def test_snapshot_update_writes_do_not_grow_with_revisions(tmp_path: Path) -> None:
    world, ids = _prepare(tmp_path, 1)
    faulty = FaultyBackend(LocalBackend(world.root), fail_at_write=0, errno_=errno.EIO)
    repo = open_repo(faulty, world.cache)
    costs = []
    try:
        for day in range(1, 31):  # extend the retention lock by a day, 30 times
            snap = repo.read_snapshot(ids[0])
            snap.retention_until = UNTIL + timedelta(days=day)
            before = faulty.writes
            repo.update_snapshot(snap)
            costs.append(faulty.writes - before)
    finally:
        repo.close()
    assert max(costs) <= 2, f"writes per update (a new note, then old ones deleted): {costs}"


# a real full file system -----------------------------------------------------------------------
@contextmanager
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB ext4 file system, loop-mounted; skips the test where that cannot be done."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make and loop-mount an ext4 file system")
    if not shutil.which("mkfs.ext4"):
        pytest.skip("mkfs.ext4 is not installed")
    fs_image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(fs_image, "wb") as f:
        f.truncate(16 << 20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(fs_image)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
    mounted = subprocess.run(["mount", "-o", "loop", str(fs_image), str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 image here: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)


def fill(directory: Path) -> None:
    """Fill the file system of ``directory`` to the last byte (root's reserve included)."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for block in (1 << 16, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(block))
    finally:
        os.close(fd)


def test_real_full_filesystem(tmp_path: Path) -> None:
    """The repository on a 16 MiB ext4 file system; a backup bigger than the free space."""
    with small_ext4(tmp_path) as mnt:
        repo_dir = mnt / "repo"
        env = cli_env(repo_dir, tmp_path / "cache")  # the cache lives elsewhere, as usual
        proc = run_cli(["repo", "init", "--pack-size", "256K"], env)
        assert proc.returncode == 0, describe(proc)
        rng = random.Random(7)
        small, big = tmp_path / "small.img", tmp_path / "big.img"
        small_img = make_image(rng, 4 << 20)
        write_file(small, small_img)
        write_file(big, rng.randbytes(24 << 20))  # incompressible, more than the free space
        proc = run_cli(["backup", str(small), "--volume", "small", "--json"], env)
        assert proc.returncode == 0, describe(proc)

        proc = run_cli(["backup", str(big), "--volume", "big"], env)
        assert proc.returncode == 20, f"expected exit 20 (storage): {describe(proc)}"
        assert "is full" in proc.stderr and "free space" in proc.stderr, describe(proc)
        assert "Traceback" not in proc.stderr, describe(proc)

        restored = tmp_path / "restored.img"
        proc = run_cli(["restore", "small@latest", str(restored)], env)
        assert proc.returncode == 0, describe(proc)
        assert hashlib.sha256(restored.read_bytes()).hexdigest() == sha256(small_img)
        proc = run_cli(["verify", "--read-data"], env)
        assert proc.returncode == 0, describe(proc)

        # gc frees what the interrupted backup left, and backups work again
        proc = run_cli(["gc"], env)
        assert proc.returncode == 0, describe(proc)
        assert shutil.disk_usage(mnt).free > 8 << 20, "gc did not free the interrupted backup's packs"
        proc = run_cli(["verify", "--read-data"], env)
        assert proc.returncode == 0, describe(proc)
        small_img[: 1 << 20] = rng.randbytes(1 << 20)
        write_file(small, small_img)
        proc = run_cli(["backup", str(small), "--volume", "small"], env)
        assert proc.returncode == 0, describe(proc)
        proc = run_cli(["restore", "small@latest", str(restored)], env)
        assert proc.returncode == 0, describe(proc)
        assert hashlib.sha256(restored.read_bytes()).hexdigest() == sha256(small_img)


def test_full_cache_disk_is_a_clean_error(tmp_path: Path) -> None:
    """The cache on a full disk (the default ~/.cache is often on the repository's disk): every
    command either works or stops with dingyuan's own message, never a traceback."""
    with small_ext4(tmp_path) as mnt:
        env = cli_env(mnt / "repo", mnt / "cache")
        image = tmp_path / "image"
        write_file(image, random.Random(3).randbytes(2 << 20))
        for args in (["repo", "init", "--pack-size", "256K"], ["backup", str(image), "--volume", "v"]):
            proc = run_cli(args, env)
            assert proc.returncode == 0, describe(proc)
        (mnt / "new-cache").mkdir()
        fill(mnt)
        bad = []
        for cache in ("cache", "new-cache"):  # a warm cache, and a cache still to be built
            env["DINGYUAN_CACHE_DIR"] = str(mnt / cache)
            for args in (["snapshot", "list"], ["restore", "v@latest", str(tmp_path / "out")], ["verify"]):
                proc = run_cli(args, env)
                if proc.returncode != 0 and ("Traceback" in proc.stderr or proc.returncode == 1):
                    bad.append(f"{cache}: {' '.join(args[:2])}: {proc.stderr.strip().splitlines()[-1]}")
        assert not bad, "tracebacks instead of messages:\n" + "\n".join(bad)
