"""Verify a repository: structure always, data on request.

Without ``read_data``: every index object decodes and matches its name; every indexed pack
exists and its own table of contents agrees with the index; every manifest decodes and matches
its id; every tree node of every snapshot decodes; every chunk a snapshot refers to is indexed.
With ``read_data``: additionally every (or a random ``subset`` percent of) pack is read whole,
its hash checked against its name, and every blob decrypted, decompressed and checked against
its id. Problems are collected, not raised, and mapped to the snapshots they affect.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import DingyuanError, ObjectNotFound
from .format import ZERO_ID, BlobEntry, pack_name
from .repo import Repository

Progress = Callable[[int, int], None]


@dataclass
class Problem:
    object: str
    detail: str

    def __str__(self) -> str:
        return f"{self.object}: {self.detail}"


@dataclass
class VerifyReport:
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    affected: set[str] = field(default_factory=set)
    snapshots: int = 0
    packs: int = 0
    packs_read: int = 0
    blobs_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "problems": [str(p) for p in self.problems],
            "warnings": self.warnings,
            "affected_snapshots": sorted(self.affected),
            "snapshots": self.snapshots,
            "packs": self.packs,
            "packs_read": self.packs_read,
            "blobs_read": self.blobs_read,
        }


def verify(
    repo: Repository, read_data: bool = False, subset: float = 100.0, progress: Progress | None = None
) -> VerifyReport:
    with repo.lock(exclusive=False, purpose="verify"):
        return _verify(repo, read_data, subset, progress)


def _verify(repo: Repository, read_data: bool, subset: float, progress: Progress | None) -> VerifyReport:
    report = VerifyReport()
    bad: set[bytes] = set()

    # index objects (the cache is rebuilt from the ones that read cleanly)
    names = sorted(n for n, _ in repo.backend.list("index/"))
    repo.cache.clear_index()
    for name in names:
        try:
            repo.cache.add_index(name, repo.read_index(name))
        except DingyuanError as e:
            report.problems.append(Problem(name, str(e)))

    # packs
    listed = dict(repo.iter_packs())
    indexed = repo.cache.pack_sizes()
    report.packs = len(indexed)
    for pack in listed.keys() - indexed.keys():
        report.warnings.append(f"{pack_name(pack)} is not indexed (interrupted backup); gc removes it")

    def check_pack(pack: bytes) -> list[tuple[Problem, list[bytes]]]:
        name = pack_name(pack)
        entries = repo.cache.blobs_in_pack(pack)
        ids = [e.id for e in entries]
        if pack not in listed:
            return [(Problem(name, "missing"), ids)]
        if listed[pack] != indexed[pack]:
            return [(Problem(name, f"size {listed[pack]}, index says {indexed[pack]}"), ids)]
        out: list[tuple[Problem, list[bytes]]] = []
        try:
            toc = {e.id: e for e in repo.read_pack_toc(pack, listed[pack])}
        except DingyuanError as e:
            toc = {}
            out.append((Problem(name, f"table of contents: {e}"), []))
        else:
            wrong = [e.id for e in entries if toc.get(e.id) != e]
            if wrong:
                out.append((Problem(name, f"{len(wrong)} index entries disagree with the pack"), wrong))
        if read_data and random.uniform(0, 100) < subset:
            out.extend(_read_pack(repo, pack, entries, report))
        return out

    with ThreadPoolExecutor(2, thread_name_prefix="verify") as pool:
        for i, results in enumerate(pool.map(check_pack, sorted(indexed))):
            for problem, blobs in results:
                report.problems.append(problem)
                bad.update(blobs)
            if progress:
                progress(i + 1, len(indexed))

    # snapshots and their trees
    memo: dict[bytes, str | None] = {}  # tree node -> first problem below it, or None

    def walk(node: bytes, level: int) -> str | None:
        if node in memo:
            return memo[node]
        err: str | None = None
        try:
            ids = repo.load_tree_node(node, level)
        except DingyuanError as e:
            err = f"tree node {node.hex()[:16]}: {e}"
        else:
            if level == 0:
                real = [c for c in ids if c != ZERO_ID]
                present = repo.cache.present(real)
                broken = next((c for c in real if c not in present or c in bad), None)
                if broken is not None:
                    state = "damaged" if broken in bad else "missing"
                    err = f"chunk {broken.hex()[:16]} {state}"
            else:
                for child in ids:
                    if child != ZERO_ID and (err := walk(child, level - 1)):
                        break
        memo[node] = err
        return err

    for sid in sorted(repo.snapshot_names()):
        report.snapshots += 1
        try:
            snap = repo.read_snapshot(sid)
            err = walk(snap.root, snap.height - 1) if snap.root != ZERO_ID else None
        except DingyuanError as e:
            err = str(e)
        if err:
            report.affected.add(sid)
            report.problems.append(Problem(f"snapshot {sid[:12]}", err))
    return report


def _read_pack(
    repo: Repository, pack: bytes, entries: list[BlobEntry], report: VerifyReport
) -> list[tuple[Problem, list[bytes]]]:
    name = pack_name(pack)
    try:
        data = repo.backend.get(name)
    except ObjectNotFound:
        return [(Problem(name, "missing"), [e.id for e in entries])]
    report.packs_read += 1
    out: list[tuple[Problem, list[bytes]]] = []
    try:
        repo.check_pack_bytes(pack, data)
    except DingyuanError as err:
        out.append((Problem(name, str(err)), []))
    damaged = []
    mv = memoryview(data)
    for e in entries:
        report.blobs_read += 1
        try:
            repo.decode_blob(e, mv[e.offset : e.offset + e.length], name)
        except DingyuanError:
            damaged.append(e.id)
    if damaged:
        out.append((Problem(name, f"{len(damaged)} damaged blob(s)"), damaged))
    return out
