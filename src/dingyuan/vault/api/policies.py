"""Policies: when to back up and how long to keep. Read by people; managed by admins and
operators; a policy that volumes use cannot be deleted (409)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import ValidationError
from sqlalchemy import func, select

from ...catalog.models import Policy, Volume
from ...errors import Conflict
from ..auth import MANAGERS, READERS, Principal, SessionDep, audit, require
from ..schemas import NAME_PATTERN, PolicyCreate, PolicyOut, PolicyPatch, PolicySettings
from . import ERRORS
from .lookup import invalid, policy_by_name

router = APIRouter(tags=["policies"], responses=ERRORS)
Reader = Annotated[Principal, require(*READERS)]
Manager = Annotated[Principal, require(*MANAGERS)]
PolicyName = Annotated[str, Path(pattern=NAME_PATTERN)]


def _settings(policy: Policy) -> dict[str, Any]:
    return {name: getattr(policy, name) for name in PolicySettings.model_fields}


def _apply(policy: Policy, settings: PolicySettings) -> None:
    for name in PolicySettings.model_fields:
        value = getattr(settings, name)
        if name in ("retention", "drill") and value is not None:
            value = value.model_dump(exclude_none=True)
        setattr(policy, name, value)


@router.get("/policies")
def list_policies(session: SessionDep, principal: Reader) -> list[PolicyOut]:
    return [PolicyOut.model_validate(p) for p in session.scalars(select(Policy).order_by(Policy.name))]


@router.get("/policies/{name}")
def get_policy(name: PolicyName, session: SessionDep, principal: Reader) -> PolicyOut:
    return PolicyOut.model_validate(policy_by_name(session, name))


@router.post("/policies", status_code=201)
def create_policy(body: PolicyCreate, request: Request, session: SessionDep, principal: Manager) -> PolicyOut:
    if session.scalars(select(Policy.id).where(Policy.name == body.name)).first() is not None:
        raise Conflict(
            f"a policy named {body.name!r} exists; change it with PATCH /api/v1/policies/{body.name}"
        )
    policy = Policy(name=body.name)
    _apply(policy, body)
    session.add(policy)
    session.flush()
    audit(session, request, principal, target=f"policy:{body.name}")
    return PolicyOut.model_validate(policy)


@router.patch("/policies/{name}")
def patch_policy(
    name: PolicyName, body: PolicyPatch, request: Request, session: SessionDep, principal: Manager
) -> PolicyOut:
    """Change some settings; the result is checked as a whole. Switching ``schedule`` drops the
    other kind's setting (``cron`` or ``interval_seconds``) unless the body gives it."""
    policy = policy_by_name(session, name)
    merged = _settings(policy)
    changes = body.model_dump(exclude_unset=True)
    if "schedule" in changes:
        other = "cron" if changes["schedule"] == "interval" else "interval_seconds"
        merged[other] = None
    merged.update(changes)
    try:
        settings = PolicySettings.model_validate(merged)
    except ValidationError as e:
        raise invalid(e) from None
    _apply(policy, settings)
    audit(session, request, principal, target=f"policy:{name}", detail={"changes": changes})
    return PolicyOut.model_validate(policy)


@router.delete("/policies/{name}", status_code=204)
def delete_policy(name: PolicyName, request: Request, session: SessionDep, principal: Manager) -> None:
    policy = policy_by_name(session, name)
    users = session.scalar(select(func.count()).select_from(Volume).where(Volume.policy_id == policy.id))
    if users:
        raise Conflict(
            f"policy {name!r} is used by {users} volume(s): give them another policy (PATCH "
            f"/api/v1/volumes/{{id}}) first; list them with GET /api/v1/volumes"
        )
    session.delete(policy)
    audit(session, request, principal, target=f"policy:{name}")
