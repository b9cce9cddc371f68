"""SIGKILL ``dingyuan backup`` at random instants: nothing committed may ever be lost.

One image (32 MiB of random, compressible and zero regions with duplicate chunks) in a repository
with 256 KiB packs, so every backup writes dozens of packs and index objects. Each iteration
mutates a few regions of the image, starts ``dingyuan backup`` and kills it with SIGKILL at a
random instant: a quarter of the kills anywhere in the measured run time of an uncut backup
(Python start-up included), the rest spread over the measured time from taking the lock to
committing, counted from the moment the lock appears (so start-up jitter on a loaded machine does
not push them out of the interesting part). Then every snapshot committed so far must
still restore bit-exact (a random one or two per iteration, all of them at the end), ``verify``
must pass (``--read-data`` every tenth iteration and at the end), and a killed backup that
managed to commit must restore bit-exact too. Every fifth iteration, and the last, the backup is
re-run to completion: it must upload no chunk that was already durable in some pack (crash
recovery re-indexes the chunks of packs an interrupted backup left unindexed), and it must not
be blocked by the locks of killed processes.

The seed comes from ``DINGYUAN_TEST_SEED`` (or is random) and is printed; every assertion
message names it, so ``DINGYUAN_TEST_SEED=<seed> pytest tests/integration/test_crash.py`` replays
the same images, mutations and kill delays (where a delay lands still depends on the machine's
speed). ``DINGYUAN_CRASH_KILLS`` changes the number of kills that must land (default 100).

``test_gc_removes_partial_packs_of_killed_backups`` shows that partial objects of killed writes
are never cleaned up.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import (
    CHUNK,
    CLI,
    cli_env,
    cli_json,
    describe,
    first_difference,
    image_chunk_ids,
    init_repo,
    lock_names,
    make_image,
    open_repo,
    run_cli,
    sha256,
    sha256_file,
    snapshot_ids,
)

from dingyuan.errors import DingyuanError
from dingyuan.repository.backends.local import LocalBackend
from dingyuan.repository.format import BlobType
from dingyuan.repository.restore import restore

IMAGE_SIZE = 32 << 20
PACK_SIZE = 256 << 10
VOLUME = "disk0"
KILLS = int(os.environ.get("DINGYUAN_CRASH_KILLS", "100"))  # SIGKILLs that must land
RERUN_EVERY = 5
READ_DATA_EVERY = 10


def mutate(img: bytearray, base: bytes, rng: random.Random) -> None:
    """Change two to six regions: new random or compressible data, zeros, a copy of another
    region (duplicate chunks when aligned), or the base image's bytes (chunks stored long ago)."""
    size = len(img)
    for _ in range(rng.randint(2, 6)):
        n = rng.randint(1, 32) * CHUNK - (rng.randrange(CHUNK) if rng.random() < 0.3 else 0)
        off = rng.randrange(0, size - n)
        if rng.random() < 0.5:
            off -= off % CHUNK
        kind = rng.random()
        if kind < 0.4:
            img[off : off + n] = rng.randbytes(n)
        elif kind < 0.65:
            word = rng.randbytes(rng.randint(4, 40))
            img[off : off + n] = (word * (n // len(word) + 1))[:n]
        elif kind < 0.75:
            img[off : off + n] = bytes(n)
        elif kind < 0.9:
            src = rng.randrange(0, size - n)
            img[off : off + n] = bytes(img[src : src + n])
        else:
            img[off : off + n] = base[off : off + n]


@dataclass
class Summary:
    seed: int
    outcomes: Counter[str] = field(default_factory=Counter)
    tmp_leftovers: int = 0
    reruns: list[tuple[int, int, int]] = field(default_factory=list)  # iteration, chunks_new, bound
    restores: int = 0
    verifies: int = 0

    def kills(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k.startswith("killed"))

    def text(self) -> str:
        o = self.outcomes
        kills = self.kills()
        return (
            f"seed={self.seed}: {kills} kills (before any pack: {o['killed before any pack']}, "
            f"mid-upload: {o['killed mid-upload']}, after the commit: {o['killed after commit']}), "
            f"{o['completed']} backups completed before their kill; {self.tmp_leftovers} half-written "
            f"temporary files left by kills; {self.restores} restores, {self.verifies} verifies; "
            f"re-runs (iteration, chunks_new, bound): {self.reruns}"
        )


@pytest.mark.slow
def test_sigkill_backup_never_loses_committed_snapshots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = int(os.environ.get("DINGYUAN_TEST_SEED") or random.randrange(1 << 32))
    with capsys.disabled():
        print(f"\n[test_crash] DINGYUAN_TEST_SEED={seed} (set it to replay this run)", flush=True)
    summary = Summary(seed)
    delays = random.Random(f"{seed}:delays")  # kill delays replay even if outcomes differ
    rng = random.Random(f"{seed}:samples")
    t_start = time.monotonic()

    repo_dir, cache, probe_cache = tmp_path / "repo", tmp_path / "cache", tmp_path / "probe-cache"
    image_path, target = tmp_path / "disk0.img", tmp_path / "restored.img"
    env = cli_env(repo_dir, cache)
    backend = LocalBackend(repo_dir)
    init_repo(backend, cache, PACK_SIZE).close()

    base = bytes(make_image(random.Random(f"{seed}:image"), IMAGE_SIZE))
    img = bytearray(base)

    def image_at(state: int) -> bytearray:
        """The image after ``state`` mutations (regenerated from the seed, for diagnostics)."""
        out = bytearray(base)
        for k in range(1, state + 1):
            mutate(out, base, random.Random(f"{seed}:mutate:{k}"))
        return out

    def save_image() -> None:
        with open(image_path, "r+b" if image_path.exists() else "wb") as f:
            f.write(img)

    expected: dict[str, tuple[int, str]] = {}  # snapshot id -> (image state, sha256)

    def ctx(i: int) -> str:
        return f"[DINGYUAN_TEST_SEED={seed} iteration {i}] "

    reader = open_repo(repo_dir, tmp_path / "reader-cache")  # a long-lived in-process reader

    def check_restore(sid: str, i: int, cli: bool = False) -> None:
        """Restore through the CLI, or (faster, for the samples) through the long-lived reader."""
        state, digest = expected[sid]
        if cli:
            proc = run_cli(["restore", sid, str(target)], env)
            assert proc.returncode == 0, f"{ctx(i)}restore of snapshot {sid[:12]} failed: {describe(proc)}"
        else:
            try:
                restore(reader, reader.read_snapshot(sid), str(target))
            except DingyuanError as e:
                pytest.fail(f"{ctx(i)}restore of snapshot {sid[:12]} failed: {e!r}")
        got = sha256_file(target)
        if got != digest:
            where = first_difference(target.read_bytes(), image_at(state))
            pytest.fail(f"{ctx(i)}snapshot {sid[:12]} (image state {state}) restored wrong: {where}")
        target.unlink()
        summary.restores += 1

    def check_verify(i: int, read_data: bool) -> None:
        proc = run_cli(["verify", "--json", *(["--read-data"] if read_data else [])], env)
        assert proc.returncode == 0, f"{ctx(i)}verify failed: {describe(proc)}"
        summary.verifies += 1

    backup_args = ["backup", str(image_path), "--volume", VOLUME, "--json"]

    def complete_backup(i: int, state: int) -> tuple[str, int]:
        """Run a backup to the end; returns (snapshot id, stats.chunks_new)."""
        t0 = time.monotonic()
        doc = cli_json(backup_args[:-1], env, ctx(i))
        took = time.monotonic() - t0
        assert took < 60, f"{ctx(i)}backup took {took:.1f} s: waiting for a lock of a killed process?"
        expected[doc["id"]] = (state, sha256(img))
        leftover = lock_names(backend)
        assert not leftover, f"{ctx(i)}a completed backup left locks (stale ones not removed): {leftover}"
        return doc["id"], int(doc["stats"]["chunks_new"])

    def measured_backup(state: int) -> tuple[float, float, float]:
        """An uncut backup, watched: when its lock appears, its manifest appears, it exits."""
        before = snapshot_ids(backend)
        t0 = time.monotonic()
        proc = subprocess.Popen([*CLI, *backup_args], env=env, stdout=subprocess.PIPE, text=True)
        t_lock = t_commit = 0.0
        while proc.poll() is None:
            now = time.monotonic() - t0
            if not t_lock and lock_names(backend):
                t_lock = now
            if not t_commit and snapshot_ids(backend) - before:
                t_commit = now
            time.sleep(0.001)
        t_end = time.monotonic() - t0
        out, _ = proc.communicate()
        assert proc.returncode == 0, f"{ctx(state)}backup failed: {out}"
        expected[json.loads(out)["id"]] = (state, sha256(img))
        return t_lock or t_end, t_commit or t_end, t_end

    # One committed snapshot, then watch uncut incremental backups to place the kills: a quarter
    # anywhere in the whole run (Python start-up included), the rest after the backup has taken
    # its lock, spread over the time it then needs to commit (reading, packing, uploading,
    # indexing): counting from the lock keeps the kills there however long start-up takes.
    save_image()
    complete_backup(0, 0)
    phases = []
    for state in (1, 2, 3):
        mutate(img, base, random.Random(f"{seed}:mutate:{state}"))
        save_image()
        phases.append(measured_backup(state))
    t_end = max(p[2] for p in phases)
    window = max(p[1] - p[0] for p in phases)
    with capsys.disabled():
        print(
            f"[test_crash] uncut incremental backups: lock to commit {window:.3f} s, "
            f"exit after {t_end:.3f} s",
            flush=True,
        )

    def start_and_kill() -> tuple[int, str, str]:
        """Start a backup and SIGKILL it at a random instant (unless it ends first)."""
        anchored = delays.random() >= 0.25
        delay = delays.uniform(0, window * 1.2) if anchored else delays.uniform(0, t_end)
        locks_before = set(lock_names(backend))  # a killed predecessor's lock may be there
        proc = subprocess.Popen(
            [*CLI, *backup_args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        while anchored and proc.poll() is None and not set(lock_names(backend)) - locks_before:
            time.sleep(0.001)
        try:
            out, err = proc.communicate(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()  # SIGKILL
            out, err = proc.communicate()  # reaped: a zombie would look alive to the lock check
        return proc.returncode, out, err

    def rerun(i: int) -> None:
        """Back up to completion; it may upload only chunks that no pack holds yet."""
        probe = open_repo(repo_dir, probe_cache)
        try:
            durable = {
                e.id
                for pack, size in probe.iter_packs()
                for e in probe.read_pack_toc(pack, size)
                if e.type == BlobType.CHUNK
            }
            bound = len(image_chunk_ids(probe, img) - durable)
        finally:
            probe.close()
        sid, chunks_new = complete_backup(i, i)
        summary.reruns.append((i, chunks_new, bound))
        assert chunks_new <= bound, (
            f"{ctx(i)}the re-run uploaded {chunks_new} chunks, but only {bound} of the image's "
            f"chunks were not durable in some pack yet: it re-sent chunks a killed backup had stored"
        )
        check_restore(sid, i)

    first = i = 4
    tmp_seen: set[str] = set()
    reran = False
    while summary.kills() < KILLS:
        assert i < first + 3 * KILLS, f"{ctx(i)}too few kills landed: {summary.text()}"
        mutate(img, base, random.Random(f"{seed}:mutate:{i}"))
        save_image()
        digest = sha256(img)
        snaps_before = snapshot_ids(backend)
        packs_before = {name for name, _ in backend.list("packs/")}

        returncode, out, err = start_and_kill()
        assert returncode in (0, -9), (
            f"{ctx(i)}backup failed by itself (exit {returncode}) instead of being killed:\n{err}"
        )
        new_snaps = snapshot_ids(backend) - snaps_before
        assert len(new_snaps) <= 1, f"{ctx(i)}one backup committed several snapshots: {new_snaps}"
        if returncode == 0:
            outcome = "completed"
            assert len(new_snaps) == 1, f"{ctx(i)}a backup that exited 0 committed nothing:\n{out}"
        elif new_snaps:
            outcome = "killed after commit"
        elif {name for name, _ in backend.list("packs/")} - packs_before:
            outcome = "killed mid-upload"
        else:
            outcome = "killed before any pack"
        summary.outcomes[outcome] += 1
        tmp_files = {
            os.path.join(d, name)
            for d, _, files in os.walk(repo_dir)
            for name in files
            if name.startswith(".tmp-")
        }
        summary.tmp_leftovers += len(tmp_files - tmp_seen)
        tmp_seen.update(tmp_files)
        for sid in new_snaps:
            expected[sid] = (i, digest)
            check_restore(sid, i)  # a backup that committed before it died restores bit-exact

        # every snapshot committed before this iteration still restores (a sample each time)
        older = sorted(set(expected) - new_snaps)
        for sid in rng.sample(older, k=min(len(older), rng.randint(1, 2))):
            check_restore(sid, i)
        check_verify(i, read_data=(i - first) % READ_DATA_EVERY == READ_DATA_EVERY - 1)

        reran = (i - first) % RERUN_EVERY == RERUN_EVERY - 1
        if reran:
            rerun(i)
        i += 1
    last = i - 1
    if not reran:
        rerun(last)

    # The end: all snapshots restore, the listing is exact, verify --read-data passes, and gc
    # (exclusive lock: no lock of a killed process may block it) keeps everything restorable.
    listed = {s["id"] for s in cli_json(["snapshot", "list"], env, ctx(last))}
    assert listed == set(expected), (
        f"{ctx(last)}snapshot list differs from the committed snapshots: "
        f"missing {sorted(set(expected) - listed)}, unexpected {sorted(listed - set(expected))}"
    )
    for sid in sorted(expected):
        check_restore(sid, last)
    for sid in rng.sample(sorted(expected), k=3):
        check_restore(sid, last, cli=True)
    check_verify(last, read_data=True)
    proc = run_cli(["gc"], env)
    assert proc.returncode == 0, f"{ctx(last)}gc after the kills failed: {describe(proc)}"
    check_verify(last, read_data=True)
    for sid in sorted(expected):  # the reader's cache still names packs gc has rewritten
        check_restore(sid, last)
    reader.close()

    with capsys.disabled():
        print(f"[test_crash] {summary.text()}; {time.monotonic() - t_start:.0f} s", flush=True)


def _temporaries(root: Path) -> list[str]:
    return sorted(
        os.path.join(d, name) for d, _, files in os.walk(root) for name in files if name.startswith(".tmp-")
    )


def test_gc_removes_partial_packs_of_killed_backups(tmp_path: Path) -> None:
    repo_dir, cache = tmp_path / "repo", tmp_path / "cache"
    env = cli_env(repo_dir, cache)
    init_repo(LocalBackend(repo_dir), cache, 16 << 20).close()  # the default pack size: slow writes
    image = tmp_path / "disk.img"
    rng = random.Random(11)
    for _ in range(5):  # SIGKILL the backup the moment a pack is being written
        with open(image, "wb") as f:
            f.write(rng.randbytes(48 << 20))
        proc = subprocess.Popen([*CLI, "backup", str(image), "--volume", "v"], env=env)
        while proc.poll() is None and not _temporaries(repo_dir / "packs"):
            time.sleep(0.0005)
        proc.kill()
        proc.wait()
        if _temporaries(repo_dir / "packs"):
            break
    else:
        pytest.skip("no kill landed while a pack was being written")
    proc = run_cli(["gc"], env)
    assert proc.returncode == 0, describe(proc)
    left = {path: os.path.getsize(path) for path in _temporaries(repo_dir)}
    assert not left, f"after gc, partial objects of killed backups remain (path: bytes): {left}"
