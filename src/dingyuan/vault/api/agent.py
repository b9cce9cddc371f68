"""What an agent asks of the vault besides uploads: its due work, progress, failures.

An agent polls ``POST /agent/work`` when it is idle, so any backup job of its host still
``running`` then was left by an agent that stopped (killed, rebooted): it is failed at once
rather than after the heartbeat timeout, and the volume is handed out again.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi import Path as FastApiPath
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from ...catalog.models import Host, Job, Policy, Volume
from ...errors import NotFound
from ..auth import AGENT, Principal, SessionDep, require
from ..jobs import JobKind, JobState, claim_backup_job, due_backups, finish_job, record_heartbeat
from ..schemas import MAX_INT32

router = APIRouter(tags=["agent"])
AgentDep = Annotated[Principal, require(AGENT)]
JobId = Annotated[int, FastApiPath(ge=1, le=MAX_INT32)]


class WorkItem(BaseModel):
    job: int
    volume: str
    source: str
    chunk_size: int
    bandwidth_limit: int | None
    consistency: str
    quiesce: str | None


class Work(BaseModel):
    jobs: list[WorkItem]


class ProgressBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    done: int = Field(ge=0, le=1 << 62)
    total: int = Field(ge=0, le=1 << 62)


class FailBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error: str = Field(min_length=1, max_length=4000)


class JobAck(BaseModel):
    running: bool


def _own_job(session: SessionDep, principal: Principal, job_id: int) -> Job:
    job = session.get(Job, job_id)
    vol = session.get(Volume, job.volume_id) if job and job.volume_id is not None else None
    if job is None or vol is None or vol.host_id != principal.host_id:
        raise NotFound(f"this host has no job {job_id}")
    return job


@router.post("/agent/work", response_model=Work)
def work(request: Request, principal: AgentDep, session: SessionDep) -> Work:
    """Claim the backups of the caller's host that are due now (the agent is idle)."""
    now = datetime.now(UTC)
    host = session.get(Host, principal.host_id)
    if host is not None:
        host.last_seen = now
    mine = select(Volume.id).where(Volume.host_id == principal.host_id)
    for job in session.scalars(
        select(Job).where(Job.state == JobState.RUNNING, Job.kind == JobKind.BACKUP, Job.volume_id.in_(mine))
    ):
        finish_job(session, job, now, error="the agent restarted while this backup ran; it runs again")
    items = []
    for vol in due_backups(session, now, host_id=principal.host_id):
        policy = session.get(Policy, vol.policy_id) if vol.policy_id is not None else None
        if policy is None or not vol.source:
            continue
        job = claim_backup_job(session, vol, now)
        items.append(
            WorkItem(
                job=job.id,
                volume=vol.name,
                source=vol.source,
                chunk_size=vol.chunk_size,
                bandwidth_limit=policy.bandwidth_limit,
                consistency=policy.consistency,
                quiesce=policy.quiesce,
            )
        )
    if not items:
        request.state.audited = True  # an idle poll every few seconds is not worth an audit row
    return Work(jobs=items)


@router.post("/agent/jobs/{job_id}/progress", response_model=JobAck)
def progress(
    job_id: int, body: ProgressBody, request: Request, principal: AgentDep, session: SessionDep
) -> JobAck:
    """The agent's heartbeat for a running job; ``running: false`` tells it the job ended."""
    job = _own_job(session, principal, job_id)
    host = session.get(Host, principal.host_id)
    now = datetime.now(UTC)
    if host is not None:
        host.last_seen = now
    request.state.audited = True  # heartbeats are not audited
    return JobAck(running=record_heartbeat(session, job, now, {"done": body.done, "total": body.total}))


@router.post("/agent/jobs/{job_id}/fail", response_model=JobAck)
def fail(job_id: JobId, body: FailBody, principal: AgentDep, session: SessionDep) -> JobAck:
    """The agent gave up on a job; the error is shown by ``dingyuan status`` and the job retried."""
    job = _own_job(session, principal, job_id)
    if job.state == JobState.RUNNING:
        finish_job(session, job, datetime.now(UTC), error=body.error)
    return JobAck(running=False)
