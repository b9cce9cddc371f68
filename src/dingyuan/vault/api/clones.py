"""Clones: writable copy-on-write volumes born from a snapshot (admin, operator; viewers list).

A clone lives in the repository (its record) and beside it (its overlay); it can be exported
writable, snapshotted, promoted to a volume of its own, and deleted once no export serves it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from sqlalchemy.orm import Session

from ...catalog.models import Volume
from ...catalog.rebuild import index_snapshot
from ...repository.manifest import CloneInfo, Snapshot
from ..auth import MANAGERS, READERS, ContextDep, Principal, SessionDep, audit, require
from ..exports import ExportService, service
from ..schemas import NAME_PATTERN, CloneCreate, CloneOut, ClonePromote, SnapshotOut
from . import ERRORS
from .snapshots import snapshot_out

router = APIRouter(tags=["clones"], responses=ERRORS)
Reader = Annotated[Principal, require(*READERS)]
Manager = Annotated[Principal, require(*MANAGERS)]
CloneRef = Annotated[
    str, Path(pattern=NAME_PATTERN, description="The clone's name or id (or a unique id prefix)")
]


def clone_out(svc: ExportService, session: Session, clone: CloneInfo) -> CloneOut:
    base = clone.base
    return CloneOut(
        id=clone.id,
        name=clone.name,
        snapshot=base.id,
        host=base.host,
        volume=base.volume,
        size=base.size,
        chunk_size=base.chunk_size,
        created=clone.created,
        exports=[e.id for e in svc.exports_of(session, "clone", clone.id)],
    )


def indexed_snapshot(session: Session, snap: Snapshot) -> SnapshotOut:
    row = index_snapshot(session, snap)
    vol = session.get(Volume, row.volume_id)
    assert vol is not None  # index_snapshot made it
    return snapshot_out(row, vol, snap.host)


@router.get("/clones")
def list_clones(session: SessionDep, ctx: ContextDep, principal: Reader) -> list[CloneOut]:
    svc = service(ctx)
    return [clone_out(svc, session, c) for c in svc.clones.list()]


@router.get("/clones/{ref}")
def get_clone(ref: CloneRef, session: SessionDep, ctx: ContextDep, principal: Reader) -> CloneOut:
    svc = service(ctx)
    return clone_out(svc, session, svc.clones.get(ref))


@router.post("/clones", status_code=201)
def create_clone(
    body: CloneCreate, request: Request, session: SessionDep, ctx: ContextDep, principal: Manager
) -> CloneOut:
    svc = service(ctx)
    clone = svc.new_clone(ctx.repo.resolve(body.snapshot), body.name)
    audit(
        session,
        request,
        principal,
        target=f"clone:{clone.id}",
        detail={"name": clone.name, "snapshot": clone.base.id},
    )
    return clone_out(svc, session, clone)


@router.post("/clones/{ref}/snapshot", status_code=201)
def snapshot_clone(
    ref: CloneRef, request: Request, session: SessionDep, ctx: ContextDep, principal: Manager
) -> SnapshotOut:
    """A new snapshot of the clone's current contents (volume: the clone's name)."""
    svc = service(ctx)
    clone = svc.clones.get(ref)
    with ctx.repo_lock:
        snap = svc.clones.snapshot(clone)
    audit(session, request, principal, target=f"clone:{clone.id}", detail={"snapshot": snap.id})
    return indexed_snapshot(session, snap)


@router.post("/clones/{ref}/promote", status_code=201)
def promote_clone(
    ref: CloneRef,
    body: ClonePromote,
    request: Request,
    session: SessionDep,
    ctx: ContextDep,
    principal: Manager,
) -> SnapshotOut:
    """Make the clone a volume of its own: a snapshot of it under ``volume``, then the clone goes."""
    svc = service(ctx)
    clone = svc.clones.get(ref)
    svc.check_unexported(session, "clone", clone.id, "promote")
    with ctx.repo_lock:
        snap = svc.clones.promote(clone, body.volume, body.host)
    audit(
        session,
        request,
        principal,
        target=f"clone:{clone.id}",
        detail={"snapshot": snap.id, "volume": body.volume},
    )
    return indexed_snapshot(session, snap)


@router.delete("/clones/{ref}", status_code=204)
def delete_clone(
    ref: CloneRef, request: Request, session: SessionDep, ctx: ContextDep, principal: Manager
) -> None:
    svc = service(ctx)
    clone = svc.clones.get(ref)
    svc.delete_clone(session, clone)
    audit(session, request, principal, target=f"clone:{clone.id}", detail={"name": clone.name})
