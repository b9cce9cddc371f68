"""Snapshots: listed from the catalog; deleted, locked and unlocked in the repository first (the
truth, which enforces retention locks against everyone), then in the catalog row.

Deleting needs an admin and is refused (409) while the snapshot's retention lock is in force;
locking (admin, operator) only ever extends a lock; unlocking (admin) clears a lock that has
expired, and is refused (409) while it is in force: a lock is never shortened.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from ...catalog.models import Export, Host, Snapshot, Volume
from ...errors import Conflict, RetentionLockKept
from ..auth import (
    ADMIN,
    AGENT,
    MANAGERS,
    OWN_HOST_READERS,
    ContextDep,
    Principal,
    SessionDep,
    audit,
    require,
    utcnow,
)
from ..schemas import NAME_PATTERN, SNAPSHOT_ID_PATTERN, SnapshotLock, SnapshotOut
from . import ERRORS
from .lookup import host_by_name, snapshot_by_id

router = APIRouter(tags=["snapshots"], responses=ERRORS)
Reader = Annotated[Principal, require(*OWN_HOST_READERS)]
SnapshotId = Annotated[str, Path(pattern=SNAPSHOT_ID_PATTERN, description="The full snapshot id (64 hex)")]


def snapshot_out(row: Snapshot, vol: Volume, host: str) -> SnapshotOut:
    return SnapshotOut(
        id=row.id,
        host=host,
        volume=vol.name,
        time=row.time,
        size=row.size,
        consistency=row.consistency,
        labels=row.labels,
        parent=row.parent_id,
        retention_until=row.retention_until,
        annotations=row.annotations,
        stats=row.stats,
    )


def _host_name(session: Session, vol: Volume) -> str:
    host = session.get(Host, vol.host_id)
    assert host is not None  # a foreign key
    return host.name


@router.get("/snapshots")
def list_snapshots(
    session: SessionDep,
    principal: Reader,
    host: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    volume: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[SnapshotOut]:
    """Newest first, from the catalog."""
    q = (
        select(Snapshot, Volume, Host.name)
        .join(Volume, Snapshot.volume_id == Volume.id)
        .join(Host, Volume.host_id == Host.id)
        .order_by(Snapshot.time.desc(), Snapshot.id)
        .limit(limit)
    )
    if host is not None:
        q = q.where(Host.id == host_by_name(session, principal, host).id)
    elif principal.role == AGENT:
        q = q.where(Host.id == principal.host_id)
    if volume is not None:
        q = q.where(Volume.name == volume)
    return [snapshot_out(row, vol, name) for row, vol, name in session.execute(q)]


@router.get("/snapshots/{snapshot_id}")
def get_snapshot(snapshot_id: SnapshotId, session: SessionDep, principal: Reader) -> SnapshotOut:
    row, vol = snapshot_by_id(session, principal, snapshot_id)
    return snapshot_out(row, vol, _host_name(session, vol))


@router.delete("/snapshots/{snapshot_id}", status_code=204)
def delete_snapshot(
    snapshot_id: SnapshotId,
    request: Request,
    session: SessionDep,
    ctx: ContextDep,
    principal: Annotated[Principal, require(ADMIN)],
) -> None:
    """Delete a snapshot (its data goes at the next gc). 409 while it is retention-locked,
    exported, or the base of a clone."""
    row, _ = snapshot_by_id(session, principal, snapshot_id)
    exports = session.scalars(
        select(Export.id).where(Export.kind == "snapshot", Export.target == snapshot_id)
    )
    if ids := ", ".join(map(str, exports)):
        raise Conflict(f"snapshot {snapshot_id[:12]} is exported (export {ids}): stop the export first")
    if clones := ctx.repo.clone_bases().get(snapshot_id):
        raise Conflict(
            f"snapshot {snapshot_id[:12]} is the base of clone {', '.join(clones)}: delete or promote the "
            "clone first"
        )
    with ctx.repo_lock:
        ctx.repo.delete_snapshot(ctx.repo.read_snapshot(snapshot_id))  # refuses a lock in force
    session.delete(row)
    audit(session, request, principal, target=f"snapshot:{snapshot_id}")


@router.post("/snapshots/{snapshot_id}/lock")
def lock_snapshot(
    snapshot_id: SnapshotId,
    body: SnapshotLock,
    request: Request,
    session: SessionDep,
    ctx: ContextDep,
    principal: Annotated[Principal, require(*MANAGERS)],
) -> SnapshotOut:
    """Retention-lock a snapshot until a time (or for some seconds); a lock is only extended."""
    row, vol = snapshot_by_id(session, principal, snapshot_id)
    until = body.until or utcnow() + timedelta(seconds=body.for_seconds or 0)
    with ctx.repo_lock:
        snap = ctx.repo.read_snapshot(snapshot_id)
        previous = snap.retention_until
        if previous is not None and previous > until and snap.locked_at(utcnow()):
            raise RetentionLockKept(snapshot=snapshot_id[:12], until=previous.isoformat())
        snap.retention_until = until
        ctx.repo.update_snapshot(snap)
    row.retention_until = until
    audit(
        session,
        request,
        principal,
        target=f"snapshot:{snapshot_id}",
        detail={"until": until.isoformat(), "previous": previous.isoformat() if previous else None},
    )
    return snapshot_out(row, vol, _host_name(session, vol))


@router.post("/snapshots/{snapshot_id}/unlock")
def unlock_snapshot(
    snapshot_id: SnapshotId,
    request: Request,
    session: SessionDep,
    ctx: ContextDep,
    principal: Annotated[Principal, require(ADMIN)],
) -> SnapshotOut:
    """Clear an expired retention lock; 409 while it is in force (no one shortens a lock)."""
    row, vol = snapshot_by_id(session, principal, snapshot_id)
    with ctx.repo_lock:
        snap = ctx.repo.read_snapshot(snapshot_id)
        previous = snap.retention_until
        if previous is not None and snap.locked_at(utcnow()):
            raise RetentionLockKept(snapshot=snapshot_id[:12], until=previous.isoformat())
        if previous is not None:
            snap.retention_until = None
            ctx.repo.update_snapshot(snap)
    row.retention_until = None
    audit(
        session,
        request,
        principal,
        target=f"snapshot:{snapshot_id}",
        detail={"previous": previous.isoformat() if previous else None},
    )
    return snapshot_out(row, vol, _host_name(session, vol))
