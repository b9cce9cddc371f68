"""Volumes: list and read (an agent: its own host's), protect one (``POST /hosts/{host}/volumes``),
change it (``PATCH``), and run a backup now (a pending job the agent picks up)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from ...catalog.models import Host, Job, Policy, Volume
from ...errors import Conflict
from ..auth import AGENT, MANAGERS, OWN_HOST_READERS, Principal, SessionDep, audit, require
from ..schemas import MAX_INT32, NAME_PATTERN, JobOut, VolumeCreate, VolumeOut, VolumePatch
from . import ERRORS
from .lookup import host_by_name, policy_by_name, volume_by_id

router = APIRouter(tags=["volumes"], responses=ERRORS)
Reader = Annotated[Principal, require(*OWN_HOST_READERS)]
Manager = Annotated[Principal, require(*MANAGERS)]
VolumeId = Annotated[int, Path(ge=1, le=MAX_INT32)]
#: job states in which a backup is still to finish
ACTIVE_STATES = ("pending", "running")


def volume_out(session: Session, vol: Volume) -> VolumeOut:
    host = session.get(Host, vol.host_id)
    policy = session.get(Policy, vol.policy_id) if vol.policy_id is not None else None
    assert host is not None  # a foreign key
    return VolumeOut(
        id=vol.id,
        host=host.name,
        name=vol.name,
        chunk_size=vol.chunk_size,
        source=vol.source,
        policy=policy.name if policy else None,
        enabled=vol.enabled,
    )


@router.get("/volumes")
def list_volumes(
    session: SessionDep,
    principal: Reader,
    host: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
) -> list[VolumeOut]:
    q = select(Volume).join(Host, Volume.host_id == Host.id).order_by(Host.name, Volume.name)
    if host is not None:
        q = q.where(Volume.host_id == host_by_name(session, principal, host).id)
    elif principal.role == AGENT:
        q = q.where(Volume.host_id == principal.host_id)
    return [volume_out(session, v) for v in session.scalars(q)]


@router.get("/volumes/{volume_id}")
def get_volume(volume_id: VolumeId, session: SessionDep, principal: Reader) -> VolumeOut:
    return volume_out(session, volume_by_id(session, principal, volume_id))


@router.post("/hosts/{host}/volumes", status_code=201)
def create_volume(
    host: Annotated[str, Path(pattern=NAME_PATTERN)],
    body: VolumeCreate,
    request: Request,
    session: SessionDep,
    principal: Manager,
) -> VolumeOut:
    """Protect a volume of ``host``: where the agent reads it and which policy applies. The chunk
    size comes from the policy (64 KiB without one) and stays the volume's."""
    h = host_by_name(session, principal, host)
    existing = session.scalars(select(Volume).where(Volume.host_id == h.id, Volume.name == body.name)).first()
    if existing is not None:
        raise Conflict(
            f"host {host} already has a volume {body.name!r} (id {existing.id}); change it with "
            f"PATCH /api/v1/volumes/{existing.id}"
        )
    policy = policy_by_name(session, body.policy) if body.policy else None
    vol = Volume(
        host_id=h.id,
        name=body.name,
        chunk_size=policy.chunk_size if policy else 64 << 10,
        source=body.source,
        policy_id=policy.id if policy else None,
        enabled=body.enabled,
    )
    session.add(vol)
    session.flush()
    audit(session, request, principal, target=f"volume:{vol.id}", detail={"host": host, "name": body.name})
    return volume_out(session, vol)


@router.patch("/volumes/{volume_id}")
def patch_volume(
    volume_id: VolumeId, body: VolumePatch, request: Request, session: SessionDep, principal: Manager
) -> VolumeOut:
    vol = volume_by_id(session, principal, volume_id)
    changes = body.model_dump(exclude_unset=True)
    if "source" in changes:
        vol.source = body.source
    if "policy" in changes:
        vol.policy_id = policy_by_name(session, body.policy).id if body.policy else None
    if body.enabled is not None:
        vol.enabled = body.enabled
    audit(session, request, principal, target=f"volume:{vol.id}", detail={"changes": changes})
    return volume_out(session, vol)


@router.post("/volumes/{volume_id}/run", status_code=202)
def run_volume(volume_id: VolumeId, request: Request, session: SessionDep, principal: Manager) -> JobOut:
    """Back the volume up now: a pending backup job its agent picks up."""
    vol = volume_by_id(session, principal, volume_id)
    if not vol.source:
        raise Conflict(
            f"volume {vol.id} has no source (it came from the repository only): set one with "
            f"PATCH /api/v1/volumes/{vol.id}"
        )
    if not vol.enabled:
        raise Conflict(f"volume {vol.id} is disabled: enable it with PATCH /api/v1/volumes/{vol.id}")
    active = session.scalars(
        select(Job).where(Job.volume_id == vol.id, Job.kind == "backup", Job.state.in_(ACTIVE_STATES))
    ).first()
    if active is not None:
        raise Conflict(f"a backup of volume {vol.id} is already {active.state} (job {active.id})")
    job = Job(kind="backup", state="pending", volume_id=vol.id, details={"trigger": "run-now"}, progress={})
    session.add(job)
    session.flush()
    audit(session, request, principal, target=f"volume:{vol.id}", detail={"job": job.id})
    return JobOut.model_validate(job)
