"""``GET /hosts`` and ``GET /hosts/{name}``; an agent sees its own host only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from sqlalchemy import select

from ...catalog.models import Host
from ..auth import AGENT, OWN_HOST_READERS, Principal, SessionDep, require
from ..schemas import NAME_PATTERN, HostOut
from . import ERRORS
from .lookup import host_by_name

router = APIRouter(tags=["hosts"], responses=ERRORS)
Reader = Annotated[Principal, require(*OWN_HOST_READERS)]


@router.get("/hosts")
def list_hosts(session: SessionDep, principal: Reader) -> list[HostOut]:
    q = select(Host).order_by(Host.name)
    if principal.role == AGENT:
        q = q.where(Host.id == principal.host_id)
    return [HostOut.model_validate(h) for h in session.scalars(q)]


@router.get("/hosts/{name}")
def get_host(
    name: Annotated[str, Path(pattern=NAME_PATTERN)], session: SessionDep, principal: Reader
) -> HostOut:
    return HostOut.model_validate(host_by_name(session, principal, name))
