"""Exports: snapshots (read-only) and clones served over NBD or iSCSI by the running vault.

Creating one (admin, operator) answers with its ``nbd://`` or ``iscsi://`` URI; an NBD export
name works as an access token, so viewers see exports without their names (nor IQNs). CHAP
secrets are never answered. Stopping one closes its connections.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from sqlalchemy import select

from ...catalog.models import Export
from ...errors import NotFound
from ...exports.iscsi.chap import Credentials
from ..auth import MANAGERS, READERS, VIEWER, ContextDep, Principal, SessionDep, audit, require
from ..exports import ExportService, service
from ..schemas import MAX_INT32, ChapCredentials, ExportCreate, ExportOut
from . import ERRORS

router = APIRouter(tags=["exports"], responses=ERRORS)
Reader = Annotated[Principal, require(*READERS)]
Manager = Annotated[Principal, require(*MANAGERS)]
HIDDEN = "(hidden)"


def export_out(svc: ExportService, row: Export, principal: Principal) -> ExportOut:
    hide = principal.role == VIEWER
    return ExportOut(
        id=row.id,
        name=HIDDEN if hide else row.name,
        protocol=row.protocol,
        kind=row.kind,  # type: ignore[arg-type]  # the catalog's check constraint
        target=row.target,
        writable=row.writable,
        allowed_clients=row.allowed_clients,
        uri=HIDDEN if hide else svc.uri(row),
        portal=svc.portal(row),
        chap_user=row.chap_user,
        created=row.created,
        created_by=row.created_by,
    )


def _credentials(body: ChapCredentials | None) -> Credentials | None:
    return None if body is None else Credentials(body.user, body.secret)


@router.get("/exports")
def list_exports(session: SessionDep, ctx: ContextDep, principal: Reader) -> list[ExportOut]:
    svc = service(ctx)
    return [export_out(svc, r, principal) for r in session.scalars(select(Export).order_by(Export.id))]


@router.post("/exports", status_code=201)
def create_export(
    body: ExportCreate, request: Request, session: SessionDep, ctx: ContextDep, principal: Manager
) -> ExportOut:
    """Serve a snapshot read-only, a clone writable, or (``writable`` with a snapshot) a new
    clone of the snapshot."""
    svc = service(ctx)
    row = svc.create(
        session,
        snapshot=ctx.repo.resolve(body.snapshot) if body.snapshot else None,
        clone=svc.clones.get(body.clone) if body.clone else None,
        writable=body.writable,
        allowed_clients=body.allowed_clients,
        actor=principal.actor,
        protocol=body.protocol,
        chap=_credentials(body.chap),
        mutual_chap=_credentials(body.mutual_chap),
    )
    audit(
        session,
        request,
        principal,
        target=f"export:{row.id}",
        detail={"kind": row.kind, "target": row.target, "writable": row.writable, "protocol": row.protocol},
    )
    return export_out(svc, row, principal)


@router.delete("/exports/{export_id}", status_code=204)
def stop_export(
    export_id: Annotated[int, Path(ge=1, le=MAX_INT32)],
    request: Request,
    session: SessionDep,
    ctx: ContextDep,
    principal: Manager,
) -> None:
    row = session.get(Export, export_id)
    if row is None:
        raise NotFound(f"no export with id {export_id}; list them with GET /api/v1/exports")
    service(ctx).remove(session, row)
    audit(session, request, principal, target=f"export:{export_id}")
