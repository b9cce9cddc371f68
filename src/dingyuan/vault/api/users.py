"""Users (admin only): people with a role, and optionally a password (Argon2id) for the console."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from sqlalchemy import delete, select

from ...catalog.models import Token, User
from ...errors import Conflict, NotFound
from ..auth import ADMIN, NO_PASSWORD, Principal, SessionDep, audit, forget_principals, hash_password, require
from ..schemas import NAME_PATTERN, UserCreate, UserOut
from . import ERRORS

router = APIRouter(tags=["users"], responses=ERRORS)
Admin = Annotated[Principal, require(ADMIN)]


def user_out(user: User) -> UserOut:
    return UserOut(id=user.id, name=user.name, role=user.role, has_password=user.password_hash != NO_PASSWORD)


@router.get("/users")
def list_users(session: SessionDep, principal: Admin) -> list[UserOut]:
    return [user_out(u) for u in session.scalars(select(User).order_by(User.name))]


@router.post("/users", status_code=201)
def create_user(body: UserCreate, request: Request, session: SessionDep, principal: Admin) -> UserOut:
    if session.scalars(select(User.id).where(User.name == body.name)).first() is not None:
        raise Conflict(f"a user named {body.name!r} exists")
    user = User(
        name=body.name,
        role=body.role,
        password_hash=hash_password(body.password) if body.password else NO_PASSWORD,
    )
    session.add(user)
    session.flush()
    audit(session, request, principal, target=f"user:{body.name}", detail={"role": body.role})
    return user_out(user)


@router.delete("/users/{name}", status_code=204)
def delete_user(
    name: Annotated[str, Path(pattern=NAME_PATTERN)], request: Request, session: SessionDep, principal: Admin
) -> None:
    """Delete a user and their API tokens (the audit log keeps what they did)."""
    user = session.scalars(select(User).where(User.name == name)).first()
    if user is None:
        raise NotFound(f"no user named {name!r}; list them with GET /api/v1/users")
    tokens = session.scalars(select(Token.id).where(Token.user_id == user.id)).all()
    session.execute(delete(Token).where(Token.user_id == user.id))
    session.delete(user)
    forget_principals()
    audit(session, request, principal, target=f"user:{name}", detail={"tokens_deleted": list(tokens)})
