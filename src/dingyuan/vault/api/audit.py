"""``GET /audit`` (admin only): the audit log, newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from ...catalog.models import AuditEvent
from ..auth import ADMIN, Principal, SessionDep, require
from ..schemas import AuditOut, UtcTime
from . import ERRORS

router = APIRouter(tags=["audit"], responses=ERRORS)


@router.get("/audit")
def list_audit(
    session: SessionDep,
    principal: Annotated[Principal, require(ADMIN)],
    limit: Annotated[int, Query(ge=1, le=10000)] = 100,
    since: Annotated[UtcTime | None, Query(description="only events at or after this time")] = None,
) -> list[AuditOut]:
    q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if since is not None:
        q = q.where(AuditEvent.time >= since)
    return [AuditOut.model_validate(e) for e in session.scalars(q)]
