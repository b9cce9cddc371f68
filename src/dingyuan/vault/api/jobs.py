"""``GET /jobs`` and ``GET /jobs/{id}``; an agent sees the jobs of its own host's volumes only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from sqlalchemy import select

from ...catalog.models import Job, Volume
from ...errors import NotFound
from ..auth import AGENT, OWN_HOST_READERS, Principal, SessionDep, require
from ..schemas import MAX_INT32, JobOut
from . import ERRORS
from .lookup import volume_by_id

router = APIRouter(tags=["jobs"], responses=ERRORS)
Reader = Annotated[Principal, require(*OWN_HOST_READERS)]


@router.get("/jobs")
def list_jobs(
    session: SessionDep,
    principal: Reader,
    state: Annotated[str | None, Query(pattern=r"^[a-z_]{1,16}$")] = None,
    volume: Annotated[int | None, Query(ge=1, le=MAX_INT32, description="a volume id")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[JobOut]:
    """Newest first."""
    q = select(Job).order_by(Job.id.desc()).limit(limit)
    if state is not None:
        q = q.where(Job.state == state)
    if volume is not None:
        q = q.where(Job.volume_id == volume_by_id(session, principal, volume).id)
    elif principal.role == AGENT:
        q = q.join(Volume, Job.volume_id == Volume.id).where(Volume.host_id == principal.host_id)
    return [JobOut.model_validate(j) for j in session.scalars(q)]


@router.get("/jobs/{job_id}")
def get_job(
    job_id: Annotated[int, Path(ge=1, le=MAX_INT32)], session: SessionDep, principal: Reader
) -> JobOut:
    job = session.get(Job, job_id)
    if job is not None and principal.role == AGENT:
        vol = session.get(Volume, job.volume_id) if job.volume_id is not None else None
        principal.check_host(vol.host_id if vol else None, f"job {job_id}")
    if job is None:
        principal.check_host(None, f"job {job_id}")
        raise NotFound(f"no job with id {job_id}; list them with GET /api/v1/jobs")
    return JobOut.model_validate(job)
