"""Scale: 10,000 snapshots list fast, gc costs what it frees, a 1 TiB sparse volume costs what it holds.

(a) A repository of 10,000 snapshots of one volume (one backup of a small image, 49 more real
    backups with distinct roots, and 9,950 manifests saved through the library as copies with
    other times and labels): ``dingyuan snapshot list --json`` in a fresh process with a warm cache
    takes under 1 s. The cold-cache time is measured and printed, not asserted.
(b) Deleting one snapshot and running gc reads the same number of tree nodes, moves about the same
    bytes and takes about the same time in a repository of 10,000 snapshots as in one of 100; gc
    frees exactly the deleted snapshot's own blobs, the repository shrinks, verify is clean and
    the other snapshots restore bit-exact.
(c) A 1 TiB sparse image holding 1 GiB of random data in 64 places backs up with peak RSS (of the
    CLI process, from ``wait4``) <= 150 MiB and no more than the same data in a 2 GiB image needs;
    its restore has the right size, data and holes.

Every figure is printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dingyuan.repository.backends.local import LocalBackend
from dingyuan.repository.backup import backup
from dingyuan.repository.crypto import KdfParams
from dingyuan.repository.format import ZERO_ID
from dingyuan.repository.gc import GcReport, gc
from dingyuan.repository.manifest import Snapshot
from dingyuan.repository.repo import Repository

pytestmark = pytest.mark.slow

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
PASSPHRASE = "scale-test"
VOLUME, HOST = "vol", "scale-host"
CS = 4096  # small chunks: a 4 MiB image has a two-level tree (a root and four leaves)
REAL = 50  # snapshots made by real backups (distinct roots); the rest are manifest copies
DELETED = 25  # the real snapshot deleted in (b)


def _cli() -> list[str]:
    """The ``dingyuan`` script of the interpreter running the tests (or the module, without one)."""
    exe = Path(sys.executable).with_name("dingyuan")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dingyuan.cli.main"]


def _env(repo: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINGYUAN_")}
    env.update(
        DINGYUAN_REPO=str(repo),
        DINGYUAN_PASSPHRASE=PASSPHRASE,
        DINGYUAN_CACHE_DIR=str(cache),
        DINGYUAN_KDF="1024,1,1",
    )
    return env


@dataclass
class Run:
    rc: int
    out: str
    err: str
    seconds: float
    maxrss_mib: float

    def json(self) -> Any:
        return json.loads(self.out)


# Runs the CLI in a grandchild and reports its wait4 figures. The CLI is not started by the test
# process itself because a child created by (v)fork + exec inherits its parent's peak RSS in
# ru_maxrss: a test process that grew to 150 MiB would make every child look at least that big.
_MEASURE = r"""
import json, os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execv(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - t0
with open(out, "w") as f:
    json.dump({"seconds": seconds, "maxrss_kib": usage.ru_maxrss}, f)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def dy(repo: Path, cache: Path, *args: str, scratch: Path) -> Run:
    """Run ``dingyuan``: wall time of the command and peak RSS of its process (``wait4``)."""
    figures = scratch / ".cli-figures"
    p = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(figures), *_cli(), *args],
        env=_env(repo, cache),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    got = json.loads(figures.read_text())
    run = Run(p.returncode, p.stdout, p.stderr, got["seconds"], got["maxrss_kib"] / KiB)
    assert run.rc == 0, f"dingyuan {' '.join(args)}: exit {run.rc}: {run.err}"
    return run


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def no_fsync() -> Iterator[None]:
    """Only while building test repositories: thousands of durable writes would take minutes."""
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


# -------------------------------------------------------------------------------------------------
# (a) and (b): many snapshots


def image(i: int) -> bytes:
    """Real backup ``i``: a 4 MiB image, 2 MiB random and 2 MiB zero, where ``i > 0`` has

    * 64 KiB of data of its own across the end of leaf 0 and the start of leaf 1, and
    * one more 4 KiB chunk in the zero half (leaf 2) than backup ``i - 1``: added by backup ``i``,
      kept by every later one.

    So snapshot ``i`` alone holds a root, three leaves and 16 chunks, and its pack also holds a
    chunk that stays alive when it is deleted (gc must rewrite that pack, not just delete it).
    """
    data = bytearray(random.Random(0).randbytes(2 * MiB) + bytes(2 * MiB))
    if i:
        data[MiB - 32 * KiB : MiB + 32 * KiB] = random.Random(f"own {i}").randbytes(64 * KiB)
    for j in range(1, i + 1):
        data[2 * MiB + j * CS : 2 * MiB + (j + 1) * CS] = random.Random(f"kept {j}").randbytes(CS)
    return bytes(data)


@dataclass
class Many:
    root: Path
    repo: Repository
    cache: Path
    snaps: list[Snapshot]  # real backups first (index = backup number), then the copies
    build_seconds: float

    @property
    def path(self) -> Path:
        return self.root / "repo"


def build_many(root: Path, total: int) -> Many:
    root.mkdir(parents=True, exist_ok=True)
    cache = root / "cache"
    repo = Repository.init(
        LocalBackend(root / "repo"),
        PASSPHRASE.encode(),
        cache_dir=cache,
        pack_size=256 * KiB,
        kdf=KdfParams(1024, 1, 1),
    )
    t0 = time.perf_counter()
    snaps: list[Snapshot] = []
    img = root / "image"
    start = datetime(2030, 1, 1, tzinfo=UTC)
    with no_fsync():
        for i in range(REAL):
            img.write_bytes(image(i))
            res = backup(repo, str(img), VOLUME, host=HOST, chunk_size=CS, at=start + timedelta(seconds=i))
            snaps.append(res.snapshot)
        first = snaps[0]
        for j in range(total - REAL):
            copy = dataclasses.replace(
                first, time=first.time + timedelta(hours=1, seconds=j), labels={"copy": str(j)}, id=""
            )
            snaps.append(repo.save_snapshot(copy))
    img.unlink()
    assert len({s.id for s in snaps}) == total
    assert len({s.root for s in snaps}) == REAL
    return Many(root, repo, cache, snaps, time.perf_counter() - t0)


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Many]]:
    root = tmp_path_factory.mktemp("many")
    built = {}
    for total in (100, 10_000):
        built[total] = build_many(root / str(total), total)
        print(f"\nbuilt {total} snapshots in {built[total].build_seconds:.1f} s")
    yield built
    for m in built.values():
        m.repo.close()
    shutil.rmtree(root, ignore_errors=True)


def test_list_10000_snapshots_under_a_second(many: dict[int, Many], tmp_path: Path) -> None:
    m = many[10_000]
    ids = {s.id for s in m.snaps}
    listed = dy(m.path, m.cache, "snapshot", "list", "--json", scratch=tmp_path)  # warms the page cache
    assert {s["id"] for s in listed.json()} == ids
    warm = [dy(m.path, m.cache, "snapshot", "list", "--json", scratch=tmp_path).seconds for _ in range(3)]
    cold_run = dy(m.path, tmp_path / "cold-cache", "snapshot", "list", "--json", scratch=tmp_path)
    assert len(cold_run.json()) == 10_000
    again = dy(m.path, tmp_path / "cold-cache", "snapshot", "list", "--json", scratch=tmp_path)
    print(
        f"\nsnapshot list --json, 10,000 snapshots: warm cache {', '.join(f'{s:.3f}' for s in warm)} s "
        f"(median {statistics.median(warm):.3f} s); cold cache {cold_run.seconds:.3f} s "
        f"(then warm: {again.seconds:.3f} s)"
    )
    assert statistics.median(warm) < 1.0, warm


@dataclass
class GcCost:
    report: GcReport
    seconds: float
    node_reads: int
    bytes_read: int
    bytes_written: int


def measured_gc(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> GcCost:
    """Run gc in process, counting tree node loads and bytes through the backend."""
    counts = {"nodes": 0, "read": 0, "written": 0}
    load = repo.load_tree_node
    backend = repo.backend
    get, get_range, put, create = backend.get, backend.get_range, backend.put, backend.create

    def load_tree_node(bid: bytes, level: int) -> list[bytes]:
        counts["nodes"] += 1
        return load(bid, level)

    def counted(fn: Callable[..., Any], key: str, arg: int) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            result = fn(*args)
            data = result if key == "read" else args[arg]
            counts[key] += sum(map(len, data)) if isinstance(data, list) else len(data)
            return result

        return wrapper

    with monkeypatch.context() as mp:
        mp.setattr(repo, "load_tree_node", load_tree_node)
        mp.setattr(backend, "get", counted(get, "read", 0))
        mp.setattr(backend, "get_range", counted(get_range, "read", 0))
        mp.setattr(backend, "put", counted(put, "written", 1))
        mp.setattr(backend, "create", counted(create, "written", 1))
        t0 = time.perf_counter()
        report = gc(repo)
        seconds = time.perf_counter() - t0
    return GcCost(report, seconds, counts["nodes"], counts["read"], counts["written"])


def reachable(repo: Repository, snap: Snapshot) -> tuple[set[bytes], set[bytes]]:
    """(tree nodes, chunks) of a snapshot."""
    nodes, chunks = set(), set()
    for level, nid, children in repo.tree(snap).nodes():
        nodes.add(nid)
        if level == 0:
            chunks.update(c for c in children if c != ZERO_ID)
    return nodes, chunks


def test_delete_one_and_gc_costs_what_it_frees(
    many: dict[int, Many], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    costs: dict[int, GcCost] = {}
    for total, m in sorted(many.items()):
        repo = m.repo
        t0 = time.perf_counter()
        first = gc(repo)  # a new cache counts every snapshot once; nothing is garbage yet
        first_seconds = time.perf_counter() - t0
        assert first.blobs_freed == 0 and first.snapshots_added == total, first
        victim = m.snaps[DELETED]
        nodes, chunks = reachable(repo, victim)
        for s in m.snaps[:REAL]:  # the copies share the first backup's tree
            if s is not victim:
                n, c = reachable(repo, s)
                nodes -= n
                chunks -= c
        assert len(nodes) == 4 and len(chunks) == 16, (len(nodes), len(chunks))  # root, 3 leaves
        before = tree_size(m.path)
        repo.delete_snapshot(victim)
        cost = costs[total] = measured_gc(repo, monkeypatch)
        after = tree_size(m.path)
        print(
            f"\n{total:>6} snapshots: first gc (counts all) {first_seconds:.3f} s; after deleting one: "
            f"gc {cost.seconds:.3f} s, {cost.node_reads} tree node reads, {cost.bytes_read} B read, "
            f"{cost.bytes_written} B written, report {cost.report.as_dict()}; "
            f"repository {before} -> {after} B"
        )
        assert cost.report.snapshots_removed == 1 and cost.report.snapshots_added == 0
        assert cost.report.packs_rewritten >= 1, cost.report  # the kept chunk moved to a new pack
        assert cost.report.blobs_freed == len(nodes) + len(chunks), cost.report
        assert cost.node_reads <= len(nodes) + 2, cost.node_reads
        assert after < before - 64 * KiB, (before, after)  # 64 KiB of random data are gone
        repo.sync_index()
        assert not any(repo.cache.has(b) for b in nodes | chunks), "gc left a freed blob indexed"

        # verify is clean; a real snapshot and a copy restore bit-exact (fresh processes, caches)
        fresh = tmp_path / f"cache-{total}"
        report = dy(m.path, fresh, "verify", "--json", scratch=tmp_path)
        doc = report.json()
        assert doc["ok"] is True and doc["snapshots"] == total - 1, doc
        print(f"{total:>6} snapshots: verify after gc {report.seconds:.3f} s")
        for k in (DELETED - 1, DELETED + 1, REAL + 7):
            out = tmp_path / f"restore-{total}-{k}.img"
            dy(m.path, fresh, "restore", m.snaps[k].id, str(out), scratch=tmp_path)
            assert out.read_bytes() == image(k if k < REAL else 0), f"snapshot {k} restored wrong"
            out.unlink()

    small, big = costs[100], costs[10_000]
    assert abs(big.node_reads - small.node_reads) <= 2, (small.node_reads, big.node_reads)
    assert big.bytes_read <= 1.5 * small.bytes_read + 256 * KiB, (small.bytes_read, big.bytes_read)
    assert big.bytes_written <= 1.5 * small.bytes_written + 256 * KiB, (
        small.bytes_written,
        big.bytes_written,
    )
    assert big.seconds <= 3 * small.seconds + 0.5, (small.seconds, big.seconds)


# -------------------------------------------------------------------------------------------------
# (c): a 1 TiB sparse volume

PIECES = 64
PIECE = 16 * MiB  # 64 x 16 MiB = 1 GiB of random data


def _write_images(tib: Path, gib: Path) -> tuple[list[int], list[int]]:
    """The same 1 GiB of random data in 64 places of a 1 TiB and of a 2 GiB sparse image."""
    rng = random.Random(1099511627776)
    at_tib, at_gib = [], []
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) for p in (tib, gib)]
    try:
        os.ftruncate(fds[0], TiB)
        os.ftruncate(fds[1], 2 * GiB)
        for k in range(PIECES):
            data = rng.randbytes(PIECE)
            # 4 KiB aligned, not chunk aligned: the edges share chunks with the holes around them
            at_tib.append(k * (TiB // PIECES) + (rng.randrange(TiB // PIECES - PIECE) & ~4095))
            at_gib.append(k * (2 * GiB // PIECES) + (rng.randrange(2 * GiB // PIECES - PIECE) & ~4095))
            os.pwrite(fds[0], data, at_tib[-1])
            os.pwrite(fds[1], data, at_gib[-1])
    finally:
        for fd in fds:
            os.close(fd)
    return at_tib, at_gib


def _same(a: Path, b: Path, offset: int, length: int) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        pos, end = offset, offset + length
        while pos < end:
            n = min(4 * MiB, end - pos)
            if os.pread(fa.fileno(), n, pos) != os.pread(fb.fileno(), n, pos):
                return False
            pos += n
    return True


def _zero(path: Path, offset: int, length: int) -> bool:
    with path.open("rb") as f:
        return not any(os.pread(f.fileno(), length, offset))


def test_one_tib_sparse_volume_costs_what_it_holds(tmp_path: Path) -> None:
    tib, gib = tmp_path / "tib.img", tmp_path / "gib.img"
    restored = tmp_path / "restored.img"
    try:
        t0 = time.perf_counter()
        at_tib, _ = _write_images(tib, gib)
        print(f"\nwrote 2 x 1 GiB of random data into the sparse images in {time.perf_counter() - t0:.1f} s")
        runs: dict[str, Run] = {}
        for name, img in (("2 GiB", gib), ("1 TiB", tib)):
            repo, cache = tmp_path / f"repo-{img.stem}", tmp_path / f"cache-{img.stem}"
            dy(repo, cache, "repo", "init", scratch=tmp_path)
            run = runs[name] = dy(
                repo, cache, "backup", str(img), "--volume", img.stem, "--json", scratch=tmp_path
            )
            stats = run.json()["stats"]
            print(
                f"backup of the {name} image: {run.seconds:.1f} s, peak RSS {run.maxrss_mib:.1f} MiB, "
                f"{stats['bytes_new']} B new, {stats['bytes_stored']} B stored, "
                f"repository {tree_size(repo)} B"
            )
            assert stats["bytes_new"] >= GiB, stats
            assert tree_size(repo) < GiB + 64 * MiB
        if gib.exists():
            gib.unlink()
            shutil.rmtree(tmp_path / "repo-gib")
        assert runs["1 TiB"].maxrss_mib <= 150, runs["1 TiB"].maxrss_mib
        assert runs["1 TiB"].maxrss_mib <= runs["2 GiB"].maxrss_mib + 20, (
            runs["2 GiB"].maxrss_mib,
            runs["1 TiB"].maxrss_mib,
        )

        sid = runs["1 TiB"].json()["id"]
        repo, cache = tmp_path / "repo-tib", tmp_path / "cache-tib"
        run = dy(repo, cache, "restore", sid, str(restored), scratch=tmp_path)
        st = restored.stat()
        print(
            f"restore of the 1 TiB snapshot: {run.seconds:.1f} s, peak RSS {run.maxrss_mib:.1f} MiB, "
            f"{st.st_blocks * 512} B allocated"
        )
        assert st.st_size == TiB
        assert st.st_blocks * 512 <= GiB + 2 * PIECES * 64 * KiB, "the holes were filled"
        for k, off in enumerate(at_tib):
            assert _same(tib, restored, off, PIECE), f"piece {k} at {off} differs"
        spans = sorted((off, off + PIECE) for off in at_tib)
        gaps = [(0, spans[0][0])] + [(a[1], b[0]) for a, b in itertools.pairwise(spans)]
        gaps.append((spans[-1][1], TiB))
        holes = 0
        for lo, hi in random.Random(7).sample(gaps, 12):  # holes next to pieces and between them
            for at in (lo, (lo + hi) // 2 & ~4095, hi - MiB):
                if lo <= at and at + MiB <= hi:
                    assert _zero(restored, at, MiB), f"hole at {at} is not zero"
                    holes += 1
        assert holes >= 30, holes
        assert _zero(restored, TiB - MiB, MiB)
    finally:
        for p in (tib, gib, restored):
            p.unlink(missing_ok=True)
        for d in tmp_path.glob("repo-*"):
            shutil.rmtree(d, ignore_errors=True)
