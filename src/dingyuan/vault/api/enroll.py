"""Enrollment: an administrator makes a one-time token for a host (``POST /enrollments``); the
host's agent spends it once at ``POST /enroll`` for an agent API token."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Request
from sqlalchemy import select, update

from ...catalog.models import Host, Token
from ..auth import (
    ADMIN,
    AGENT,
    ContextDep,
    Principal,
    SessionDep,
    audit,
    forget_principals,
    issue_enrollment,
    issue_token,
    redeem_enrollment,
    require,
    utcnow,
)
from ..schemas import EnrollmentCreate, EnrollmentCreated, EnrollRequest, EnrollResponse
from . import ERRORS

router = APIRouter(tags=["enrollment"], responses=ERRORS)


@router.post("/enrollments", status_code=201)
def create_enrollment(
    body: EnrollmentCreate,
    request: Request,
    session: SessionDep,
    ctx: ContextDep,
    principal: Annotated[Principal, require(ADMIN)],
) -> EnrollmentCreated:
    """A one-time enrollment token for ``host`` (shown only in this response)."""
    row, token = issue_enrollment(session, ctx.cfg, body.host, timedelta(seconds=body.expires_in_seconds))
    audit(
        session,
        request,
        principal,
        target=f"host:{body.host}",
        detail={"enrollment": row.id, "expires": row.expires.isoformat()},
    )
    return EnrollmentCreated(host=body.host, token=token, expires=row.expires)


@router.post("/enroll")
def enroll(body: EnrollRequest, request: Request, session: SessionDep, ctx: ContextDep) -> EnrollResponse:
    """Spend an enrollment token (no bearer credential): the host is created if needed, its older
    agent tokens are revoked (one agent credential per host), and a new agent token returned with
    what the agent needs to address chunks (``id_key`` keys chunk ids; it encrypts nothing)."""
    enrollment = redeem_enrollment(session, ctx.cfg, body.token)
    host = session.scalars(select(Host).where(Host.name == enrollment.host_name)).first()
    if host is None:
        host = Host(name=enrollment.host_name)
        session.add(host)
        session.flush()
    host.last_seen = utcnow()
    host.agent_version = body.agent_version
    revoked = session.execute(
        update(Token)
        .where(Token.host_id == host.id, Token.role == AGENT, Token.revoked.is_(False))
        .values(revoked=True)
    )
    forget_principals()
    row, secret = issue_token(session, AGENT, host=host)
    agent = Principal(actor=f"host:{host.name}", role=AGENT, host_id=host.id, token_id=row.id)
    audit(
        session,
        request,
        agent,
        target=f"host:{host.name}",
        detail={
            "enrollment": enrollment.id,
            "hostname": body.hostname,
            "agent_version": body.agent_version,
            "token": row.id,
            "revoked_tokens": getattr(revoked, "rowcount", 0),
        },
    )
    return EnrollResponse(
        host=host.name, token=secret, repository_id=ctx.repo.id, id_key=ctx.repo.cipher.id_key.hex()
    )
