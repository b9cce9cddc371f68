"""Protection status of every volume: its newest snapshot, RPO, next run and last job.

A query of the catalog plus the schedule's rules (:mod:`dingyuan.vault.schedule`,
:mod:`dingyuan.vault.jobs`); no repository access, so it is cheap enough for every page of the
console and every ``dingyuan status``.

``rpo`` is one of:

- ``met``: the newest snapshot is recent enough for the policy;
- ``breached``: it is not, or the volume never got a snapshot and its first deadline passed, or
  its policy cannot be scheduled (``last_error`` then says why);
- ``pending``: no snapshot yet and its first deadline has not passed;
- ``unprotected``: no policy, or the volume, its policy or its source is disabled or missing;
  nothing is scheduled, so nothing is promised.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..catalog.models import Host, Job, Policy, Volume
from ..errors import PolicyError
from ..repository.manifest import fmt_time
from .jobs import BackupFacts, JobState, backup_facts, next_backup
from .schedule import rpo_state

RpoName = Literal["met", "breached", "pending", "unprotected"]


@dataclass(frozen=True)
class VolumeStatus:
    """One volume's protection status at ``now`` (see the module docstring for ``rpo``).

    ``next_run`` is None while a backup runs (``running``) or when nothing is scheduled;
    ``last_job_*`` describe the volume's newest job of any kind; ``last_error`` is that job's
    error when it failed (or the policy's problem when it cannot be scheduled).
    """

    host: str
    volume: str
    volume_id: int
    policy: str | None
    last_snapshot: datetime | None
    age_seconds: float | None
    rpo: RpoName
    allowed_seconds: float | None
    next_run: datetime | None
    running: bool
    last_job_id: int | None
    last_job_kind: str | None
    last_job_state: str | None
    last_error: str | None

    @property
    def breached(self) -> bool:
        return self.rpo == "breached"

    def as_json(self) -> dict[str, Any]:
        """The stable ``--json`` shape: times as ISO 8601 UTC (``...Z``), ages in seconds."""
        return {
            "host": self.host,
            "volume": self.volume,
            "volume_id": self.volume_id,
            "policy": self.policy,
            "last_snapshot": fmt_time(self.last_snapshot) if self.last_snapshot else None,
            "age_seconds": self.age_seconds,
            "rpo": self.rpo,
            "allowed_seconds": self.allowed_seconds,
            "next_run": fmt_time(self.next_run) if self.next_run else None,
            "running": self.running,
            "last_job": None
            if self.last_job_id is None
            else {"id": self.last_job_id, "kind": self.last_job_kind, "state": self.last_job_state},
            "last_error": self.last_error,
        }


def volume_status(session: Session, now: datetime) -> list[VolumeStatus]:
    """The status of every volume of the catalog at ``now``, by host and volume name."""
    facts = backup_facts(session)
    newest_job_ids = select(func.max(Job.id)).where(Job.volume_id.is_not(None)).group_by(Job.volume_id)
    last_jobs = {j.volume_id: j for j in session.scalars(select(Job).where(Job.id.in_(newest_job_ids)))}
    rows = session.execute(
        select(Volume, Host.name, Policy)
        .join(Host, Volume.host_id == Host.id)
        .outerjoin(Policy, Volume.policy_id == Policy.id)
        .order_by(Host.name, Volume.name)
    )
    out = []
    for volume, host_name, policy in rows:
        f = facts.get(volume.id, BackupFacts())
        job = last_jobs.get(volume.id)
        last_error = job.error if job is not None and job.state == JobState.FAILED else None
        rpo: RpoName = "unprotected"
        allowed = next_run = None
        age = None if f.last_snapshot is None else (now - f.last_snapshot).total_seconds()
        protected = volume.enabled and bool(volume.source) and policy is not None and policy.enabled
        if protected:
            assert policy is not None
            try:
                state = rpo_state(policy, f.last_snapshot, now, since=f.since)
                rpo, allowed = state.state, state.allowed_seconds
                next_run = next_backup(policy, f, now)
            except PolicyError as e:
                rpo, last_error = "breached", str(e)
        out.append(
            VolumeStatus(
                host=host_name,
                volume=volume.name,
                volume_id=volume.id,
                policy=None if policy is None else policy.name,
                last_snapshot=f.last_snapshot,
                age_seconds=age,
                rpo=rpo,
                allowed_seconds=allowed,
                next_run=next_run,
                running=f.active == JobState.RUNNING,
                last_job_id=None if job is None else job.id,
                last_job_kind=None if job is None else job.kind,
                last_job_state=None if job is None else job.state,
                last_error=last_error,
            )
        )
    return out
