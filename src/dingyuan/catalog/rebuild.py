"""Rebuild the catalog's hosts, volumes and snapshots from the repository alone.

DESIGN.md, invariant 1: the repository is the truth and the catalog a rebuildable index of it.
:func:`rebuild_catalog` makes the catalog's snapshot rows equal to the repository's snapshots
(manifest core plus newest note: retention lock, annotations), adding hosts and volumes as
needed. It is an upsert: running it again changes nothing, and snapshots gone from the
repository leave the catalog. Policies, users, tokens, jobs and audit events are never touched.
Hosts and volumes without snapshots stay (an enrolled agent has a host before its first backup).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from ..repository.manifest import Snapshot as RepoSnapshot
from ..repository.repo import Repository
from .models import Host, Snapshot, Volume

_DELETE_BATCH = 500  # ids per DELETE statement (bound-parameter limits)


@dataclass
class RebuildReport:
    """What a rebuild changed. All zero when the catalog was already up to date."""

    hosts_added: int = 0
    volumes_added: int = 0
    volumes_updated: int = 0
    snapshots_added: int = 0
    snapshots_updated: int = 0
    snapshots_removed: int = 0
    snapshots_total: int = 0

    @property
    def changed(self) -> bool:
        return any(
            (
                self.hosts_added,
                self.volumes_added,
                self.volumes_updated,
                self.snapshots_added,
                self.snapshots_updated,
                self.snapshots_removed,
            )
        )


def _apply(row: Snapshot, snap: RepoSnapshot, volume_id: int) -> bool:
    """Set the row's fields from a repository snapshot; True if any of them differed."""
    wanted = {
        "volume_id": volume_id,
        "time": snap.time,
        "size": snap.size,
        "consistency": snap.consistency,
        "labels": snap.labels,
        "parent_id": snap.parent,
        "retention_until": snap.retention_until,
        "annotations": snap.annotations,
        "stats": snap.stats,
    }
    changed = False
    for name, value in wanted.items():
        if getattr(row, name) != value:
            setattr(row, name, value)
            changed = True
    return changed


def rebuild_catalog(repo: Repository, engine: Engine) -> RebuildReport:
    """Bring the catalog's hosts, volumes and snapshots in line with ``repo``, in one transaction."""
    snaps = repo.snapshots()  # oldest first, so the last one seen of a volume is its newest
    report = RebuildReport(snapshots_total=len(snaps))
    with Session(engine) as session, session.begin():
        hosts = {h.name: h for h in session.scalars(select(Host))}
        volumes = {(v.host_id, v.name): v for v in session.scalars(select(Volume))}
        rows = {s.id: s for s in session.scalars(select(Snapshot))}

        newest_chunk_size: dict[tuple[str, str], int] = {}
        for snap in snaps:
            newest_chunk_size[(snap.host, snap.volume)] = snap.chunk_size
        for host_name, _ in sorted(newest_chunk_size):
            if host_name not in hosts:
                hosts[host_name] = Host(name=host_name)
                session.add(hosts[host_name])
                report.hosts_added += 1
        session.flush()  # host ids

        volume_ids: dict[tuple[str, str], int] = {}
        for (host_name, volume_name), chunk_size in sorted(newest_chunk_size.items()):
            key = (hosts[host_name].id, volume_name)
            vol = volumes.get(key)
            if vol is None:
                vol = volumes[key] = Volume(host_id=key[0], name=volume_name, chunk_size=chunk_size)
                session.add(vol)
                report.volumes_added += 1
            elif vol.chunk_size != chunk_size:
                vol.chunk_size = chunk_size
                report.volumes_updated += 1
        session.flush()  # volume ids
        for host_name, volume_name in newest_chunk_size:
            volume_ids[(host_name, volume_name)] = volumes[(hosts[host_name].id, volume_name)].id

        for snap in snaps:
            volume_id = volume_ids[(snap.host, snap.volume)]
            row = rows.pop(snap.id, None)
            if row is None:
                row = Snapshot(id=snap.id)
                _apply(row, snap, volume_id)
                session.add(row)
                report.snapshots_added += 1
            elif _apply(row, snap, volume_id):
                report.snapshots_updated += 1

        gone = sorted(rows)  # left over: deleted from the repository
        for i in range(0, len(gone), _DELETE_BATCH):
            session.execute(delete(Snapshot).where(Snapshot.id.in_(gone[i : i + _DELETE_BATCH])))
        report.snapshots_removed = len(gone)
    return report


def index_snapshot(session: Session, snap: RepoSnapshot) -> Snapshot:
    """Add one new repository snapshot to the catalog (with its host and volume when they are
    new), in ``session``; returns its row."""
    host = session.scalars(select(Host).where(Host.name == snap.host)).first()
    if host is None:
        host = Host(name=snap.host)
        session.add(host)
        session.flush()
    vol = session.scalars(select(Volume).where(Volume.host_id == host.id, Volume.name == snap.volume)).first()
    if vol is None:
        vol = Volume(host_id=host.id, name=snap.volume, chunk_size=snap.chunk_size)
        session.add(vol)
        session.flush()
    vol.chunk_size = snap.chunk_size
    row = session.get(Snapshot, snap.id) or Snapshot(id=snap.id)
    _apply(row, snap, vol.id)
    session.add(row)
    return row
