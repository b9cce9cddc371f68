"""One flipped byte anywhere in a repository: found, attributed to the right snapshots, never restored.

A module fixture builds, through the CLI, a repository of five snapshots of two volumes (random,
compressible and zero regions; 4 KiB chunks, 64 KiB packs so there are many packs; chunks and tree
nodes shared between snapshots and between volumes). Each case copies it, flips one byte of one
object of a kind (pack data, pack header/table of contents/trailer, index object, tree node,
manifest), and checks with a fresh cache every time:

* ``dingyuan verify`` (and ``--read-data``) exits 40 and names exactly the snapshots whose trees
  reach the damaged blobs or manifest -- computed independently, from the undamaged repository;
* restoring an affected snapshot fails with a clear error naming the damaged object, and every
  chunk of the partial output is either the right bytes or still zero: wrong data is never written;
* restoring an unaffected snapshot still succeeds bit-exact.

Damage to ``config`` or a key object must give a clear error on open.

The seed of each case picks the object by its position in the repository's structure (snapshot
order, tree order), so a failing case is reproducible up to the repository's random keys.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from dingyuan.repository.backends.local import LocalBackend
from dingyuan.repository.format import (
    PACK_HEADER,
    PACK_TRAILER,
    ZERO_ID,
    BlobEntry,
    BlobType,
    PackRef,
    pack_name,
    snapshot_name,
)
from dingyuan.repository.repo import Repository

MiB = 1 << 20
CS = 4096  # chunk size of the test volumes: 1 MiB per leaf node, several leaves per volume
PASSPHRASE = "corruption-test"
SEEDS = (1, 2, 3, 4, 5, 6)

# -------------------------------------------------------------------------------------------------
# running the CLI


def _cli() -> list[str]:
    """The ``dingyuan`` script of the interpreter running the tests (or the module, without one)."""
    exe = Path(sys.executable).with_name("dingyuan")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dingyuan.cli.main"]


@dataclass
class Run:
    rc: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


class Cli:
    """``dingyuan`` on one repository, every call with a fresh cache directory (unless given)."""

    def __init__(self, repo: Path, scratch: Path) -> None:
        self.repo = repo
        self.scratch = scratch
        self._n = itertools.count()

    def fresh_cache(self) -> Path:
        return self.scratch / f"cache-{next(self._n)}"

    def __call__(self, *args: str, cache: Path | None = None) -> Run:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DINGYUAN_")}
        env.update(
            DINGYUAN_REPO=str(self.repo),
            DINGYUAN_PASSPHRASE=PASSPHRASE,
            DINGYUAN_CACHE_DIR=str(cache or self.fresh_cache()),
            DINGYUAN_KDF="1024,1,1",
        )
        p = subprocess.run(
            [*_cli(), *args], env=env, capture_output=True, text=True, timeout=300, check=False
        )
        return Run(p.returncode, p.stdout, p.stderr)


def ok(run: Run) -> Run:
    assert run.rc == 0, f"exit {run.rc}: {run.err}"
    return run


# -------------------------------------------------------------------------------------------------
# the undamaged repository and what it holds


def _text(n: int, tag: bytes) -> bytes:
    line = b"%s line %%08d: the quick brown fox jumps over the lazy dog\n" % tag
    return b"".join(line % i for i in range(n // len(line) + 1))[:n]


def _images(rng: random.Random) -> list[tuple[str, bytes]]:
    """(volume, image) in backup order: A1, B1, A2, A3, B2."""
    a = bytearray(6 * MiB)
    a[0 : 2 * MiB] = rng.randbytes(2 * MiB)  # random
    a[2 * MiB : 3 * MiB] = _text(MiB, b"A")  # compressible; [3, 4) MiB stays zero
    a[4 * MiB : 6 * MiB] = rng.randbytes(2 * MiB)
    b = bytearray(3 * MiB + 1000)  # the last chunk is short
    b[0:MiB] = a[0:MiB]  # same chunks and the same leaf node as volume A
    b[MiB : 2 * MiB] = rng.randbytes(MiB)
    b[2 * MiB + MiB // 2 :] = _text(len(b) - 2 * MiB - MiB // 2, b"B")
    out = [("A", bytes(a)), ("B", bytes(b))]
    for k in (3, 77, 300, 1100, 1400):  # A2: a few scattered chunks and a 64 KiB run change
        a[k * CS : k * CS + CS] = rng.randbytes(CS)
    a[5 * MiB : 5 * MiB + 65536] = rng.randbytes(65536)
    out.append(("A", bytes(a)))
    a[3 * MiB + 8192 : 3 * MiB + 3 * CS] = rng.randbytes(CS)  # A3: data in the zero region,
    a[10 * CS : 10 * CS + 100] = bytes(100)  # a partial chunk change in the leaf B shares
    out.append(("A", bytes(a)))
    b[MiB + 5 * CS : MiB + 9 * CS] = bytes(4 * CS)  # B2: data becomes a hole, a new tail
    b[-500:] = rng.randbytes(500)
    out.append(("B", bytes(b)))
    return out


@dataclass
class Base:
    root: Path
    repo: Path
    snaps: list[str]  # snapshot ids in backup order
    images: dict[str, Path]
    nodes: dict[str, list[bytes]]  # tree node ids of each snapshot, depth first
    refs: dict[str, set[bytes]]  # every blob (nodes and chunks) each snapshot reaches
    rank: dict[bytes, int]  # a blob's first position in (snapshot order, tree order)
    packs: dict[bytes, tuple[int, list[BlobEntry]]]  # pack -> (size, its own table of contents)
    indexes: dict[str, list[PackRef]]
    node_loc: dict[bytes, tuple[bytes, BlobEntry]]  # tree node -> (pack, entry), from the cache

    def affected_by_blobs(self, blobs: set[bytes]) -> set[str]:
        return {s for s in self.snaps if self.refs[s] & blobs}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    root = tmp_path_factory.mktemp("corruption")
    repo_dir = root / "repo"
    cli = Cli(repo_dir, root)
    ok(cli("repo", "init", "--pack-size", "64K"))
    build_cache = cli.fresh_cache()
    snaps: list[str] = []
    images: dict[str, Path] = {}
    for n, (volume, image) in enumerate(_images(random.Random(20240611))):
        path = root / f"image-{n}-{volume}.img"
        path.write_bytes(image)
        summary = ok(
            cli("backup", str(path), "--volume", volume, "--chunk-size", "4K", "--json", cache=build_cache)
        ).json()
        assert isinstance(summary, dict)
        snaps.append(summary["id"])
        images[summary["id"]] = path

    repo = Repository.open(LocalBackend(repo_dir), PASSPHRASE.encode(), root / "reference-cache")
    try:
        repo.sync_index()
        by_id = {s.id: s for s in repo.snapshots()}
        assert sorted(by_id) == sorted(snaps)
        nodes: dict[str, list[bytes]] = {}
        refs: dict[str, set[bytes]] = {}
        rank: dict[bytes, int] = {}
        for sid in snaps:
            tree = repo.tree(by_id[sid])
            order: list[bytes] = []
            sid_nodes: list[bytes] = []
            for level, nid, children in tree.nodes():
                sid_nodes.append(nid)
                order.append(nid)
                if level == 0:
                    order.extend(c for c in children if c != ZERO_ID)
            nodes[sid] = sid_nodes
            refs[sid] = set(order)
            for bid in order:
                rank.setdefault(bid, len(rank))
        indexes = {name: repo.read_index(name) for name, _ in repo.backend.list("index/")}
        packs = {pid: (size, repo.read_pack_toc(pid, size)) for pid, size in repo.iter_packs()}
        node_loc: dict[bytes, tuple[bytes, BlobEntry]] = {}
        for sid in snaps:
            for nid in nodes[sid]:
                loc = repo.cache.lookup(nid)
                assert loc is not None
                node_loc[nid] = (loc.pack, loc.entry)
    finally:
        repo.close()

    # the premises the expected sets rely on
    where: dict[bytes, list[bytes]] = {}
    for pid, (_, entries) in packs.items():
        for e in entries:
            where.setdefault(e.id, []).append(pid)
    assert all(len(p) == 1 for p in where.values()), "a blob is stored twice"
    assert set(rank) == set(where), "every stored blob is referenced, every referenced blob stored"
    assert len(packs) >= 40 and len(indexes) >= 3, (len(packs), len(indexes))
    shared = [b for b in rank if sum(b in refs[s] for s in snaps) > 1]
    assert any(b in refs[snaps[0]] and b in refs[snaps[1]] for b in shared), "A and B share nothing"
    assert any(len([s for s in snaps if n in nodes[s]]) > 1 for n in node_loc), "no shared tree node"
    print(f"\nbase repository: {len(snaps)} snapshots, {len(packs)} packs, {len(indexes)} index objects")
    return Base(root, repo_dir, snaps, images, nodes, refs, rank, packs, indexes, node_loc)


# -------------------------------------------------------------------------------------------------
# damage


@dataclass
class Damage:
    kind: str
    seed: int
    repo: Path
    obj: str  # object name, relative to the repository
    offset: int
    region: str
    affected: set[str]
    names: list[str]  # a restore error must contain one of these
    plain: bool  # plain verify must find it (else it may)

    def __str__(self) -> str:
        return (
            f"seed {self.seed}: {self.kind} damage at byte {self.offset} ({self.region}) of {self.obj}; "
            f"affected {sorted(s[:12] for s in self.affected)}"
        )


def _flip(path: Path, offset: int, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))


def _by_rank(base: Base, items: dict[bytes, list[bytes]]) -> list[bytes]:
    """Keys sorted by the earliest rank of the blobs they hold (stable across runs)."""
    return sorted(items, key=lambda k: min(base.rank[b] for b in items[k]))


def _damage_pack_data(base: Base, rng: random.Random) -> tuple[str, int, str, set[bytes], bool]:
    packs = _by_rank(base, {p: [e.id for e in toc] for p, (_, toc) in base.packs.items()})
    pack = rng.choice(packs)
    _, toc = base.packs[pack]
    end = max(e.offset + e.length for e in toc)
    off = rng.randrange(PACK_HEADER.size, end)
    hit = next(e for e in toc if e.offset <= off < e.offset + e.length)
    region = f"{'tree node' if hit.type == BlobType.TREE else 'chunk'} blob {hit.id.hex()[:16]}"
    # plain verify reads every tree node; it need not read chunks
    return pack_name(pack), off, region, {hit.id}, hit.type == BlobType.TREE


def _damage_pack_meta(base: Base, rng: random.Random) -> tuple[str, int, str, set[bytes], bool]:
    packs = _by_rank(base, {p: [e.id for e in toc] for p, (_, toc) in base.packs.items()})
    pack = rng.choice(packs)
    size, toc = base.packs[pack]
    end = max(e.offset + e.length for e in toc)
    part = rng.choice(["header", "table of contents", "trailer"])
    if part == "header":
        off, plain = rng.randrange(PACK_HEADER.size), False  # plain verify need not read headers
    elif part == "table of contents":
        off, plain = rng.randrange(end, size - PACK_TRAILER.size), True
    else:
        off = rng.randrange(size - PACK_TRAILER.size, size)
        reserved = size - PACK_TRAILER.size + 4 <= off < size - PACK_TRAILER.size + 8
        plain = not reserved
    return pack_name(pack), off, part, set(), plain


def _damage_index(base: Base, rng: random.Random) -> tuple[str, int, str, set[bytes], bool]:
    listed: dict[bytes, set[str]] = {}
    for name, refs in base.indexes.items():
        for ref in refs:
            for e in ref.entries:
                listed.setdefault(e.id, set()).add(name)
    blobs = {name: [e.id for r in refs for e in r.entries] for name, refs in base.indexes.items()}
    names = sorted(base.indexes, key=lambda n: min(base.rank[b] for b in blobs[n]))
    name = rng.choice(names)
    only = {b for b in blobs[name] if listed[b] == {name}}
    size = (base.repo / name).stat().st_size
    return name, rng.randrange(size), f"index listing {len(only)} blob(s) alone", only, True


def _damage_tree(base: Base, rng: random.Random) -> tuple[str, int, str, set[bytes], bool]:
    sid = rng.choice(base.snaps)
    node = rng.choice(base.nodes[sid])
    pack, entry = base.node_loc[node]
    off = entry.offset + rng.randrange(entry.length)
    return pack_name(pack), off, f"tree node {node.hex()[:16]} of {sid[:12]}", {node}, True


def _damage_manifest(base: Base, rng: random.Random) -> tuple[str, int, str, set[bytes], bool]:
    sid = rng.choice(base.snaps)
    name = snapshot_name(sid)
    return name, rng.randrange((base.repo / name).stat().st_size), "manifest", set(), True


KINDS: dict[str, Callable[[Base, random.Random], tuple[str, int, str, set[bytes], bool]]] = {
    "pack-data": _damage_pack_data,
    "pack-meta": _damage_pack_meta,
    "index": _damage_index,
    "tree-node": _damage_tree,
    "manifest": _damage_manifest,
}


@pytest.fixture(scope="module")
def damaged(base: Base) -> Callable[[str, int], Damage]:
    made: dict[tuple[str, int], Damage] = {}

    def make(kind: str, seed: int) -> Damage:
        if (kind, seed) not in made:
            rng = random.Random(f"{kind}/{seed}")
            obj, off, region, blobs, plain = KINDS[kind](base, rng)
            copy = base.root / f"damaged-{kind}-{seed}"
            shutil.copytree(base.repo, copy)
            _flip(copy / obj, off, rng)
            if kind == "manifest":
                sid = obj.rsplit("/", 1)[-1]
                affected, names = {sid}, [obj]
            else:
                affected = base.affected_by_blobs(blobs)
                names = [b.hex()[:16] for b in blobs]
            made[kind, seed] = Damage(kind, seed, copy, obj, off, region, affected, names, plain)
        return made[kind, seed]

    return make


CASES = [(kind, seed) for kind in KINDS for seed in SEEDS]


def _verify(cli: Cli, *extra: str) -> tuple[Run, dict[str, object]]:
    run = cli("verify", "--json", *extra)
    assert run.rc in (0, 40), f"verify crashed (exit {run.rc}): {run.err}"
    assert "Traceback" not in run.err
    doc = run.json()
    assert isinstance(doc, dict)
    return run, doc


def _check_partial(out: Path, expected: Path) -> int:
    """Every chunk of ``out`` is the expected bytes or all zero; returns how many are right."""
    if not out.exists():
        return 0
    got, want = out.read_bytes(), expected.read_bytes()
    right = 0
    for pos in range(0, max(len(got), len(want)), CS):
        g, w = got[pos : pos + CS], want[pos : pos + CS]
        if g == w:
            right += any(w)
            continue
        assert not any(g), f"restore wrote wrong data into bytes [{pos}, {pos + CS})"
    return right


@pytest.mark.parametrize(("kind", "seed"), CASES)
def test_verify_names_exactly_the_affected_snapshots(
    base: Base, damaged: Callable[[str, int], Damage], kind: str, seed: int, tmp_path: Path
) -> None:
    dmg = damaged(kind, seed)
    print(dmg)
    cli = Cli(dmg.repo, tmp_path)

    run, doc = _verify(cli, "--read-data")
    assert run.rc == 40, f"verify --read-data missed {dmg}: {doc}"
    assert doc["ok"] is False
    assert set(doc["affected_snapshots"]) == dmg.affected, dmg  # type: ignore[arg-type]
    problems = "\n".join(doc["problems"])  # type: ignore[arg-type]
    assert dmg.obj in problems, problems
    assert "error:" in run.err and "Traceback" not in run.err

    run, doc = _verify(cli)
    if dmg.plain:
        assert run.rc == 40, f"plain verify missed {dmg}: {doc}"
        assert set(doc["affected_snapshots"]) == dmg.affected, dmg  # type: ignore[arg-type]
    elif run.rc == 40:  # need not see it (chunk data, pack header), but if it does: exactly
        assert set(doc["affected_snapshots"]) == dmg.affected, dmg  # type: ignore[arg-type]


AFFECTED_CASES = [
    (kind, seed)
    for kind, seed in CASES
    if kind != "pack-meta"  # blobs intact: nothing is affected (every restore is checked below)
]


@pytest.mark.parametrize(("kind", "seed"), AFFECTED_CASES)
def test_restore_of_an_affected_snapshot_fails_and_writes_no_wrong_data(
    base: Base, damaged: Callable[[str, int], Damage], kind: str, seed: int, tmp_path: Path
) -> None:
    dmg = damaged(kind, seed)
    print(dmg)
    if not dmg.affected:
        pytest.skip(f"the damage affects no snapshot: {dmg}")
    cli = Cli(dmg.repo, tmp_path)
    for sid in sorted(dmg.affected):
        out = tmp_path / f"restore-{sid[:12]}.img"
        run = cli("restore", sid, str(out))
        assert run.rc == 10, f"restore of affected {sid[:12]} gave exit {run.rc}: {run.err}"
        assert "Traceback" not in run.err and "error:" in run.err, run.err
        assert any(n in run.err for n in dmg.names), f"{run.err!r} names none of {dmg.names}"
        right = _check_partial(out, base.images[sid])
        print(f"  restore {sid[:12]}: failed as expected, {right} chunk(s) written before it stopped")


@pytest.mark.parametrize(("kind", "seed"), CASES)
def test_restore_of_an_unaffected_snapshot_is_bit_exact(
    base: Base, damaged: Callable[[str, int], Damage], kind: str, seed: int, tmp_path: Path
) -> None:
    dmg = damaged(kind, seed)
    print(dmg)
    unaffected = [s for s in base.snaps if s not in dmg.affected]
    if not unaffected:
        pytest.skip(f"every snapshot is affected: {dmg}")
    cli = Cli(dmg.repo, tmp_path)
    for sid in unaffected:
        out = tmp_path / f"restore-{sid[:12]}.img"
        ok(cli("restore", sid, str(out)))
        assert out.read_bytes() == base.images[sid].read_bytes(), f"restore of {sid[:12]} differs"


# -------------------------------------------------------------------------------------------------
# config and key objects


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("obj", ["config", "key"])
def test_damaged_config_or_key_gives_a_clear_error_on_open(
    base: Base, obj: str, seed: int, tmp_path: Path
) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(base.repo, copy)
    keys = sorted((copy / "keys").iterdir())
    assert len(keys) == 1
    path = copy / "config" if obj == "config" else keys[0]
    name = path.relative_to(copy).as_posix()
    before = path.read_bytes()
    rng = random.Random(f"{obj}/{seed}")
    off = rng.randrange(len(before))
    _flip(path, off, rng)
    after = path.read_bytes()
    print(f"seed {seed}: {name} byte {off}: {before[off : off + 1]!r} -> {after[off : off + 1]!r}")
    print(f"  context: {before[max(0, off - 20) : off + 20]!r}")
    cli = Cli(copy, tmp_path)
    run = cli("snapshot", "list", "--json")
    try:
        same = json.loads(after) == json.loads(before)
    except ValueError:
        same = False
    if same:  # whitespace for whitespace: the same document
        ok(run)
        return
    print(f"  exit {run.rc}: {run.err.strip()}")
    assert run.rc == 10, f"exit {run.rc}: {run.err}"
    assert "Traceback" not in run.err and run.err.startswith("error:"), run.err
    wrong_passphrase = "passphrase does not open any key" in run.err
    assert name in run.err or (obj == "key" and wrong_passphrase), run.err


def test_damaged_wrapped_key_is_reported_as_corrupt_not_as_a_wrong_passphrase(
    base: Base, tmp_path: Path
) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(base.repo, copy)
    (key,) = sorted((copy / "keys").iterdir())
    doc = json.loads(key.read_bytes())
    wrapped = doc["key"]
    mid = len(wrapped) // 2
    doc["key"] = wrapped[:mid] + ("A" if wrapped[mid] != "A" else "B") + wrapped[mid + 1 :]
    key.write_text(json.dumps(doc))
    run = Cli(copy, tmp_path)("snapshot", "list", "--json")
    print(f"exit {run.rc}: {run.err.strip()}")
    assert run.rc == 10 and "Traceback" not in run.err
    assert f"keys/{key.name}" in run.err and "corrupt" in run.err, run.err
