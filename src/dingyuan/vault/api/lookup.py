"""Finding catalog rows by the names and ids the API uses, with errors that say what to do."""

from __future__ import annotations

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from ...catalog.models import Host, Policy, Snapshot, Volume
from ...errors import InvalidRequest, NotFound
from ..auth import AGENT, Principal


def host_by_name(session: Session, principal: Principal, name: str) -> Host:
    """The host ``name``; an agent asking for another host gets 403 whether or not it exists."""
    host = session.scalars(select(Host).where(Host.name == name)).first()
    principal.check_host(host.id if host else None, f"host {name}")
    if host is None:
        raise NotFound(f"no host named {name!r}; list them with GET /api/v1/hosts (an agent enrolls first)")
    return host


def volume_by_id(session: Session, principal: Principal, volume_id: int) -> Volume:
    vol = session.get(Volume, volume_id)
    if vol is None:
        if principal.role == AGENT:
            principal.check_host(None, f"volume {volume_id}")
        raise NotFound(f"no volume with id {volume_id}; list them with GET /api/v1/volumes")
    principal.check_host(vol.host_id, f"volume {volume_id}")
    return vol


def policy_by_name(session: Session, name: str) -> Policy:
    policy = session.scalars(select(Policy).where(Policy.name == name)).first()
    if policy is None:
        raise NotFound(f"no policy named {name!r}; list them with GET /api/v1/policies")
    return policy


def snapshot_by_id(session: Session, principal: Principal, snapshot_id: str) -> tuple[Snapshot, Volume]:
    row = session.get(Snapshot, snapshot_id)
    if row is None:
        if principal.role == AGENT:
            principal.check_host(None, f"snapshot {snapshot_id[:12]}")
        raise NotFound(
            f"no snapshot {snapshot_id[:12]} in the catalog; list them with GET /api/v1/snapshots "
            "(if the repository has it, run 'dingyuan vault rebuild-catalog')"
        )
    vol = session.get(Volume, row.volume_id)
    assert vol is not None  # a foreign key
    principal.check_host(vol.host_id, f"snapshot {snapshot_id[:12]}")
    return row, vol


def validation_message(e: ValidationError) -> str:
    """A one-line summary of pydantic's errors: ``field: message; ...``."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
        for err in e.errors(include_url=False)
    )


def invalid(e: ValidationError) -> InvalidRequest:
    return InvalidRequest(validation_message(e))
