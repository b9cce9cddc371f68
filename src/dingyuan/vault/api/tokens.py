"""API tokens (admin only): list, create (the secret is in the response only), revoke."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from ...catalog.models import Host, Token, User
from ...errors import NotFound
from ..auth import ADMIN, Principal, SessionDep, audit, forget_principals, issue_token, require, utcnow
from ..schemas import MAX_INT32, TokenCreate, TokenCreated, TokenOut
from . import ERRORS

router = APIRouter(tags=["tokens"], responses=ERRORS)
Admin = Annotated[Principal, require(ADMIN)]


def token_out(session: Session, row: Token) -> TokenOut:
    user = session.get(User, row.user_id) if row.user_id is not None else None
    host = session.get(Host, row.host_id) if row.host_id is not None else None
    return TokenOut(
        id=row.id,
        role=row.role,
        user=user.name if user else None,
        host=host.name if host else None,
        created=row.created,
        expires=row.expires,
        revoked=row.revoked,
    )


@router.get("/tokens")
def list_tokens(session: SessionDep, principal: Admin) -> list[TokenOut]:
    return [token_out(session, t) for t in session.scalars(select(Token).order_by(Token.id))]


@router.post("/tokens", status_code=201)
def create_token(body: TokenCreate, request: Request, session: SessionDep, principal: Admin) -> TokenCreated:
    """A token for ``user`` (with the user's role) or a service token with ``role``."""
    user = None
    if body.user is not None:
        user = session.scalars(select(User).where(User.name == body.user)).first()
        if user is None:
            raise NotFound(f"no user named {body.user!r}; create one with POST /api/v1/users")
    role = user.role if user else body.role
    assert role is not None  # TokenCreate asks for a user or a role
    expires = utcnow() + timedelta(seconds=body.expires_in_seconds) if body.expires_in_seconds else None
    row, secret = issue_token(session, role, user=user, expires=expires)
    audit(session, request, principal, target=f"token:{row.id}", detail={"role": role, "user": body.user})
    return TokenCreated(**token_out(session, row).model_dump(), token=secret)


@router.delete("/tokens/{token_id}", status_code=204)
def revoke_token(
    token_id: Annotated[int, Path(ge=1, le=MAX_INT32)],
    request: Request,
    session: SessionDep,
    principal: Admin,
) -> None:
    """Revoke a token: it is refused from now on (the row stays, for the audit log's sake)."""
    row = session.get(Token, token_id)
    if row is None:
        raise NotFound(f"no token with id {token_id}; list them with GET /api/v1/tokens")
    row.revoked = True
    forget_principals()
    audit(session, request, principal, target=f"token:{token_id}")
