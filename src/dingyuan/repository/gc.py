"""Garbage collection: free what no snapshot refers to, at a cost in proportion to what is freed.

The cache keeps reference counts (table ``refs``: blob id, tree level, count) for every tree node
and chunk reachable from the snapshots listed in ``gc_roots``. A run:

1. takes the exclusive lock (no backup runs meanwhile);
2. counts new snapshots in (increment the root; a node referenced for the first time increments
   its children) and deleted snapshots out (decrement; a node that drops to zero decrements its
   children). Rows at zero are *pending dead* and persist until swept, so a crash mid-run loses
   nothing and a later reference revives them consistently;
3. marks blobs of index objects not seen by gc before and referenced by nothing (left by an
   interrupted backup) as pending dead;
4. sweeps: packs holding dead blobs are deleted, or rewritten with their live blobs (stored bytes
   are copied verbatim: blob encryption does not depend on the pack); new packs are made
   durable, then new index objects, then the old index objects are deleted, then the old packs.

Clones count as snapshots here: each clone record keeps its base's tree live (``gc_roots`` row
``clone/<clone id>``). The counts live in the local cache; without them (a new cache) the first
run counts every snapshot, which costs a walk of the whole repository once.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CorruptObject
from .format import ZERO_ID, BlobType, PackRef, note_name, pack_name
from .repo import Repository
from .writer import PackBuilder


@dataclass
class GcReport:
    snapshots_added: int = 0
    snapshots_removed: int = 0
    blobs_freed: int = 0
    packs_deleted: int = 0
    packs_rewritten: int = 0
    bytes_freed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class _Refs:
    """Reference counting over the cache's ``refs`` table (one transaction per gc run)."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.db = repo.cache.db

    def _get(self, bid: bytes) -> int | None:
        row = self.db.execute("SELECT count FROM refs WHERE id=?", (bid,)).fetchone()
        return None if row is None else int(row[0])

    def incref(self, bid: bytes, level: int) -> None:
        stack = [(bid, level)]
        while stack:
            node, lvl = stack.pop()
            count = self._get(node) or 0
            self.db.execute("INSERT OR REPLACE INTO refs VALUES (?,?,?)", (node, lvl, count + 1))
            if count == 0 and lvl >= 0:
                stack.extend((c, lvl - 1) for c in self.repo.load_tree_node(node, lvl) if c != ZERO_ID)

    def decref(self, bid: bytes, level: int) -> None:
        stack = [(bid, level)]
        while stack:
            node, lvl = stack.pop()
            count = self._get(node)
            if not count:
                continue  # already dead (or never counted): nothing below it holds a count from it
            self.db.execute("UPDATE refs SET count=? WHERE id=?", (count - 1, node))
            if count == 1 and lvl >= 0:
                stack.extend((c, lvl - 1) for c in self.repo.load_tree_node(node, lvl) if c != ZERO_ID)


def gc(repo: Repository) -> GcReport:
    report = GcReport()
    with repo.lock(exclusive=True, purpose="gc"):
        unreadable = repo.sync_index()
        if unreadable:
            raise CorruptObject(
                name=unreadable[0],
                detail=f"{len(unreadable)} index object(s) unreadable; gc refuses to run, since it could "
                "delete data only they describe",
            )
        repo.backend.remove_temporaries()  # no writer runs: half-written objects of killed ones
        repo.recover_packs(delete_useless=True)
        repo.sync_snapshots()
        snaps = repo.cache.snapshot_roots()
        listed = repo.snapshot_names()
        if listed - snaps.keys():
            raise CorruptObject(
                name=f"snapshots/{sorted(listed - snaps.keys())[0]}",
                detail=f"{len(listed - snaps.keys())} snapshot(s) unreadable (manifest or note); gc refuses "
                "to run, since it would free their data. Run 'dingyuan verify'",
            )
        for clone in repo.clones():  # a clone's base stays live, even if its manifest went
            snaps[f"clone/{clone.id}"] = (clone.base.root, clone.base.height)
        cache = repo.cache
        refs = _Refs(repo)
        with cache.transaction() as db:
            accounted = {
                r[0]: (r[1], r[2]) for r in db.execute("SELECT snapshot, root, height FROM gc_roots")
            }
            for sid in sorted(snaps.keys() - accounted.keys()):
                root, height = snaps[sid]
                if root != ZERO_ID:
                    refs.incref(root, height - 1)
                db.execute("INSERT INTO gc_roots VALUES (?,?,?)", (sid, root, height))
                report.snapshots_added += 1
            for sid in sorted(accounted.keys() - snaps.keys()):
                root, height = accounted[sid]
                if root != ZERO_ID:
                    refs.decref(root, height - 1)
                db.execute("DELETE FROM gc_roots WHERE snapshot=?", (sid,))
                report.snapshots_removed += 1
            for (name,) in db.execute("SELECT name FROM index_files WHERE gc_seen=0").fetchall():
                db.execute(
                    "INSERT OR IGNORE INTO refs SELECT b.id, -1, 0 FROM packs p "
                    "JOIN blobs b ON b.pack = p.id WHERE p.index_name = ?",
                    (name,),
                )
                db.execute("UPDATE index_files SET gc_seen=1 WHERE name=?", (name,))
        _sweep(repo, report)
        notes = repo.note_names()
        newest = repo.note_revisions(notes)
        for sid, rev in notes:  # notes of deleted snapshots, superseded revisions
            if sid not in snaps or rev < newest[sid]:
                repo.backend.delete(note_name(sid, rev))
    return report


def _sweep(repo: Repository, report: GcReport) -> None:
    db = repo.cache.db
    dead = {r[0] for r in db.execute("SELECT id FROM refs WHERE count=0")}
    if not dead:
        return
    dead_list = list(dead)
    affected = repo.cache.packs_holding(dead_list)
    # 1. live blobs of affected packs move to new, durable packs
    new_refs: list[PackRef] = []
    builder = PackBuilder()

    def ship() -> None:
        nonlocal builder
        if builder.entries:
            pack, parts, entries = builder.finish(repo)
            repo.backend.put(pack_name(pack), parts)
            new_refs.append(PackRef(pack, builder.size, entries))
        builder = PackBuilder()

    sizes = repo.cache.pack_sizes()
    for pack in sorted(affected):
        entries = repo.cache.blobs_in_pack(pack)
        live = [e for e in entries if e.id not in dead]
        if live:
            report.packs_rewritten += 1
            data = repo.backend.get(pack_name(pack))
            for e in live:
                builder.add(
                    e.id, BlobType(e.type), e.codec, e.raw_length, data[e.offset : e.offset + e.length]
                )
                if builder.size >= repo.pack_size:
                    ship()
        else:
            report.packs_deleted += 1
        report.bytes_freed += sizes.get(pack, 0)
    ship()
    report.bytes_freed -= sum(r.size for r in new_refs)
    # 2. index objects: rewrite those listing affected packs, plus one for the new packs
    old_names = {
        r[0] for p in affected for r in db.execute("SELECT index_name FROM packs WHERE id=?", (p,)).fetchall()
    }
    added: list[tuple[str, list[PackRef]]] = []
    for name in sorted(old_names):
        kept = [p for p in repo.read_index(name) if p.id not in affected]
        if kept:
            added.append((repo.write_index_object(kept), kept))
    if new_refs:
        added.append((repo.write_index_object(new_refs), new_refs))
    repo.cache.replace_index(old_names, added)
    with repo.cache.transaction() as tx:
        tx.executemany("UPDATE index_files SET gc_seen=1 WHERE name=?", ((n,) for n, _ in added))
    # 3. delete the old index objects, then the old packs, then forget the dead
    for name in sorted(old_names):
        repo.backend.delete(name)
    for pack in sorted(affected):
        repo.backend.delete(pack_name(pack))
    with repo.cache.transaction() as tx:
        tx.executemany("DELETE FROM refs WHERE id=? AND count=0", ((d,) for d in dead_list))
    report.blobs_freed = len(dead)
