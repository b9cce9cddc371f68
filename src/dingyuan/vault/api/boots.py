"""Boots and drills: snapshots and clones started as VMs on the vault's machine (admin,
operator; viewers list), and recovery drills whose verdict is recorded on the snapshot."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Request

from ...catalog.models import Job
from ...errors import ExportError
from ...recovery.vm import Vm
from ..auth import MANAGERS, READERS, ContextDep, Principal, SessionDep, audit, require
from ..boots import EXTRA, BootInfo, BootService, VmOptions
from ..context import VaultContext
from ..schemas import BootCreate, BootOut, BootPromote, DrillCreate, JobOut, SnapshotOut
from . import ERRORS
from .clones import indexed_snapshot
from .lookup import snapshot_by_id

router = APIRouter(tags=["boots"], responses=ERRORS)
Reader = Annotated[Principal, require(*READERS)]
Manager = Annotated[Principal, require(*MANAGERS)]
BootId = Annotated[str, Path(pattern=r"^[0-9a-f]{12}$")]


def boots(ctx: VaultContext) -> BootService:
    svc = ctx.extras.get(EXTRA)
    if not isinstance(svc, BootService):
        raise ExportError("this vault boots no VMs (it was started without an NBD listener)")
    return svc


def boot_out(info: BootInfo, vm: Vm | None) -> BootOut:
    spec = vm.spec if vm else None
    return BootOut(
        id=info.id,
        snapshot=info.snapshot_id,
        clone=info.clone_id,
        export=info.export_id,
        running=bool(vm and vm.alive()),
        accelerator=vm.accel if vm else None,
        memory_mib=spec.memory_mib if spec else None,
        cpus=spec.cpus if spec else None,
        network=spec.network if spec else None,
        firmware=spec.firmware if spec else None,
        serial_log=str(vm.serial_log) if vm else None,
        vnc_socket=str(vm.vnc_socket) if vm and vm.vnc_socket else None,
        created=datetime.fromisoformat(info.created),
        created_by=info.created_by,
    )


@router.get("/boots")
def list_boots(ctx: ContextDep, principal: Reader) -> list[BootOut]:
    return [boot_out(info, vm) for info, vm in boots(ctx).boots()]


@router.post("/boots", status_code=201)
def create_boot(
    body: BootCreate, request: Request, session: SessionDep, ctx: ContextDep, principal: Manager
) -> BootOut:
    svc = boots(ctx)
    options = VmOptions(
        memory_mib=body.memory_mib,
        cpus=body.cpus,
        network=body.network,
        bridge=body.bridge,
        firmware=body.firmware,
        vnc=body.vnc,
    )
    info, vm = svc.boot(
        session,
        snapshot=ctx.repo.resolve(body.snapshot) if body.snapshot else None,
        clone=svc.exports.clones.get(body.clone) if body.clone else None,
        options=options,
        actor=principal.actor,
    )
    audit(session, request, principal, target=f"boot:{info.id}", detail={"clone": info.clone_id})
    return boot_out(info, vm)


@router.delete("/boots/{boot_id}", status_code=204)
def stop_boot(
    boot_id: BootId, request: Request, session: SessionDep, ctx: ContextDep, principal: Manager
) -> None:
    """Stop the VM and its export; the clone keeps what the VM wrote."""
    boots(ctx).stop(session, boot_id)
    audit(session, request, principal, target=f"boot:{boot_id}")


@router.post("/boots/{boot_id}/promote", status_code=201)
def promote_boot(
    boot_id: BootId,
    body: BootPromote,
    request: Request,
    session: SessionDep,
    ctx: ContextDep,
    principal: Manager,
) -> SnapshotOut:
    """Stop the VM and make its clone a volume of its own (a snapshot under ``volume``)."""
    svc = boots(ctx)
    info = svc.stop(session, boot_id)
    session.flush()  # the export row is gone before the clone is checked for exports
    clone = svc.exports.clones.get(info.clone_id)
    with ctx.repo_lock:
        snap = svc.exports.clones.promote(clone, body.volume, body.host)
    audit(session, request, principal, target=f"boot:{boot_id}", detail={"snapshot": snap.id})
    return indexed_snapshot(session, snap)


@router.post("/drills", status_code=202)
def start_drill(
    body: DrillCreate,
    request: Request,
    session: SessionDep,
    ctx: ContextDep,
    principal: Manager,
) -> JobOut:
    """Start a recovery drill as a job; its verdict lands on the snapshot's ``drill`` annotation
    and in the job's details. Poll GET /jobs/{id}."""
    svc = boots(ctx)
    snap = ctx.repo.resolve(body.snapshot)
    _, vol = snapshot_by_id(session, principal, snap.id)
    job_id = svc.start_drill(snap, vol.id, body.model_dump(exclude={"snapshot"}), principal.actor)
    audit(
        session, request, principal, target=f"snapshot:{snap.id}", detail={"drill": body.kind, "job": job_id}
    )
    return JobOut.model_validate(session.get_one(Job, job_id))
