"""The transfer protocol's HTTP side (docs/protocols.md): upload sessions of agents.

Only an agent may open a session, and only for a volume of its own host; every later call must
come from the same host. Session start, commit and abort are audited; the data calls ("missing"
queries and blob uploads, hundreds per run) are not, as they change no catalog state.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Request
from fastapi import Path as FastApiPath
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ...catalog.models import Job, Policy, Snapshot, Volume
from ...errors import DingyuanError, JobConflict, NotFound, SessionNotFound, UploadRejected
from ...protocol import MAX_IDS_PER_QUERY, MAX_UPLOAD_BYTES, parse_frames, split_ids
from ...repository.format import ID_LEN
from ...repository.manifest import Snapshot as RepoSnapshot
from ..auth import AGENT, ContextDep, Principal, SessionDep, audit, require
from ..boots import EXTRA as BOOTS
from ..boots import BootService
from ..context import VaultContext
from ..ingest import CommitInfo, Ingest, UploadSession
from ..jobs import JobKind, apply_retention, finish_job, lock_new_snapshot
from ..schemas import NAME_PATTERN

log = logging.getLogger(__name__)
router = APIRouter(tags=["transfer"])
AgentDep = Annotated[Principal, require(AGENT)]
SessionId = Annotated[str, FastApiPath(pattern=r"^[0-9a-f]{32}$")]
_PARSE_EVERY = 128 << 10  # parse and store what arrived every 128 KiB of a streamed upload


def ingest_of(ctx: VaultContext) -> Ingest:
    ingest = ctx.extras.get("ingest")
    if not isinstance(ingest, Ingest):
        raise NotFound("this vault does not accept uploads (no ingest configured)")
    return ingest


def _session(ctx: VaultContext, principal: Principal, sid: str) -> UploadSession:
    s = ingest_of(ctx).get(sid)
    if s.owner != principal.host_id:
        raise SessionNotFound(session=sid)  # another host's session does not exist for this one
    return s


class SessionStart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    volume: str = Field(pattern=NAME_PATTERN, max_length=128)
    size: int = Field(gt=0, le=1 << 50)
    chunk_size: int = Field(ge=4096, le=4 << 20)
    job: int | None = Field(default=None, ge=1)


class ParentRef(BaseModel):
    id: str
    time: datetime
    chunk_size: int


class SessionStarted(BaseModel):
    session: str
    parent: ParentRef | None


class CommitBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str = Field(pattern=r"^[0-9a-f]{64}$")
    height: int = Field(ge=1, le=16)
    time: datetime
    consistency: str = Field(default="crash", max_length=32)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    source: str = Field(default="", max_length=4096)
    stats: dict[str, int | float | str | list[str]] = Field(default_factory=dict, max_length=32)


class Committed(BaseModel):
    id: str
    volume: str
    host: str
    time: datetime
    parent: str | None


class Missing(BaseModel):
    missing: list[int]


class Received(BaseModel):
    received: int
    stored: int


@router.post("/sessions", status_code=201, response_model=SessionStarted)
def start_session(
    body: SessionStart, request: Request, principal: AgentDep, session: SessionDep, ctx: ContextDep
) -> SessionStarted:
    """Open an upload session for a volume of the caller's host (409 while gc runs)."""
    vol = session.scalars(
        select(Volume).where(Volume.host_id == principal.host_id, Volume.name == body.volume)
    ).first()
    if vol is None:
        raise NotFound(f"this host has no volume {body.volume!r}: an administrator protects it first")
    if body.job is not None:
        job = session.get(Job, body.job)
        if job is None or job.volume_id != vol.id or job.kind != JobKind.BACKUP:
            raise NotFound(f"no backup job {body.job} of volume {body.volume}")
    host = principal.actor.removeprefix("host:")
    s = ingest_of(ctx).start(host, vol.name, body.size, body.chunk_size, body.job, owner=principal.host_id)
    p = s.parent
    audit(session, request, principal, target=f"volume {host}:{vol.name}", detail={"session": s.id})
    return SessionStarted(
        session=s.id, parent=ParentRef(id=p.id, time=p.time, chunk_size=p.chunk_size) if p else None
    )


#: the binary bodies of the data plane, for the OpenAPI document (handlers read the raw body)
_BINARY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post("/sessions/{sid}/missing", response_model=Missing, openapi_extra=_BINARY)
async def missing(sid: SessionId, request: Request, principal: AgentDep, ctx: ContextDep) -> Missing:
    """Which of the ids in the body (32 bytes each, back to back) the vault lacks, by position."""
    request.state.audited = True  # data plane: not an audit event (nor a catalog write)
    s = _session(ctx, principal, sid)
    body = await request.body()
    if len(body) > MAX_IDS_PER_QUERY * ID_LEN:
        raise UploadRejected(detail=f"at most {MAX_IDS_PER_QUERY} ids per query")
    ids = split_ids(body)
    found = await run_in_threadpool(ingest_of(ctx).missing, ids)
    s.touch()
    return Missing(missing=found)


@router.post("/sessions/{sid}/blobs", response_model=Received, openapi_extra=_BINARY)
async def upload_blobs(sid: SessionId, request: Request, principal: AgentDep, ctx: ContextDep) -> Received:
    """Store the frames of the body. Whole frames that arrived are kept even if the connection
    drops mid-body; a malformed frame rejects the request (frames before it may be kept)."""
    request.state.audited = True  # data plane: not an audit event (nor a catalog write)
    s = _session(ctx, principal, sid)
    ingest = ingest_of(ctx)
    total = received = stored = 0

    async def store(data: bytes) -> bytes:
        nonlocal received, stored
        frames, used = parse_frames(memoryview(data))
        if frames:
            stored += await run_in_threadpool(ingest.receive, s, frames)
            received += len(frames)
        return data[used:]

    buf = bytearray()
    try:
        async for piece in request.stream():
            total += len(piece)
            if total > MAX_UPLOAD_BYTES:
                raise UploadRejected(detail=f"an upload is at most {MAX_UPLOAD_BYTES} bytes")
            buf += piece
            if len(buf) >= _PARSE_EVERY:
                buf = bytearray(await store(bytes(buf)))
    except ClientDisconnect:
        await store(bytes(buf))  # keep the whole frames; nobody reads the answer
        raise
    if left := await store(bytes(buf)):
        raise UploadRejected(detail=f"the body ends inside a frame ({len(left)} bytes left over)")
    return Received(received=received, stored=stored)


@router.post("/sessions/{sid}/commit", response_model=Committed)
def commit(
    sid: SessionId,
    body: CommitBody,
    request: Request,
    background: BackgroundTasks,
    principal: AgentDep,
    session: SessionDep,
    ctx: ContextDep,
) -> Committed:
    """Write the snapshot whose tree root the body names, once the vault holds all of it."""
    s = _session(ctx, principal, sid)
    info = CommitInfo(
        root=bytes.fromhex(body.root),
        height=body.height,
        time=body.time,
        consistency=body.consistency,
        labels=body.labels,
        source=body.source,
        stats=dict(body.stats),
    )
    snap = ingest_of(ctx).commit(s, info)
    volume_id = record_snapshot(session, snap, s)
    audit(session, request, principal, target=f"snapshot {snap.id}", detail={"session": sid})
    background.add_task(apply_policy_after_commit, ctx, volume_id, snap.id)
    return Committed(id=snap.id, volume=snap.volume, host=snap.host, time=snap.time, parent=snap.parent)


def record_snapshot(session: Session, snap: RepoSnapshot, s: UploadSession) -> int:
    """The catalog row of a committed snapshot, and its job's end (same transaction); returns the
    volume's id. Should the vault stop before this commits, the catalog's rebuild at start-up adds
    the row (the repository is the truth)."""
    vol = session.scalars(select(Volume).where(Volume.host_id == s.owner, Volume.name == snap.volume)).one()
    vol.chunk_size = snap.chunk_size
    session.add(
        Snapshot(
            id=snap.id,
            volume_id=vol.id,
            time=snap.time,
            size=snap.size,
            consistency=snap.consistency,
            labels=snap.labels,
            parent_id=snap.parent,
            retention_until=snap.retention_until,
            annotations=snap.annotations,
            stats=snap.stats,
        )
    )
    job = session.get(Job, s.job_id) if s.job_id is not None else None
    if job is not None:
        try:
            finish_job(session, job, datetime.now(UTC), snapshot_id=snap.id)
        except JobConflict as e:  # the snapshot is real whatever became of its job
            log.warning("snapshot %s: %s", snap.id, e)
    return vol.id


def apply_policy_after_commit(ctx: VaultContext, volume_id: int, snapshot_id: str) -> None:
    """After the answer went out: the policy's retention lock on the new snapshot, then its
    retention for the volume, then its drill (a job of its own). A failure is logged and recorded
    in a job; the snapshot stays."""
    with Session(ctx.engine) as session:
        vol = session.get(Volume, volume_id)
        policy = session.get(Policy, vol.policy_id) if vol and vol.policy_id is not None else None
    if vol is None or policy is None:
        return
    now = datetime.now(UTC)
    try:
        with ctx.repo_lock:  # the API's snapshot changes (delete, lock) take it too
            lock_new_snapshot(ctx.repo, ctx.engine, snapshot_id, policy, now)
            apply_retention(ctx.repo, ctx.engine, vol, policy, now)
    except DingyuanError as e:
        log.error("policy %s after snapshot %s: %s", policy.name, snapshot_id, e)
    boots = ctx.extras.get(BOOTS)
    if policy.drill and isinstance(boots, BootService):
        try:
            boots.start_drill(
                ctx.repo.read_snapshot(snapshot_id), volume_id, policy.drill, f"policy:{policy.name}"
            )
        except DingyuanError as e:  # forgotten meanwhile, or the drill cannot start
            log.error("policy %s: no drill of snapshot %s: %s", policy.name, snapshot_id, e)


@router.delete("/sessions/{sid}", status_code=204)
def abort_session(
    sid: SessionId, request: Request, principal: AgentDep, session: SessionDep, ctx: ContextDep
) -> None:
    """End a session without a snapshot; what it received stays for the next run."""
    ingest_of(ctx).abort(_session(ctx, principal, sid))
    audit(session, request, principal, target=f"session {sid}")
