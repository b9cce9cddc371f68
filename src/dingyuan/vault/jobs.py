"""The vault's jobs: which backups are due, claiming and expiring them, and the jobs the vault
runs itself (retention, gc).

A job is a row of the catalog's ``jobs`` table. Its ``state`` moves one way::

    pending ──claim──► running ──► succeeded | failed
       (an operator's "run now")      │
                                      └── no heartbeat for the timeout ──► failed (retried later)
    running ──► skipped       (a vault job that could not run now, e.g. gc while a backup runs)

**Backups** are run by agents. :func:`due_backups` answers "which volumes should back up now?"
from the policies (:mod:`dingyuan.vault.schedule`), the newest snapshots and the backup jobs:
a volume with a running backup job is never due (one job per volume at a time); a pending job
(an operator's "run now", :func:`request_backup`) makes it due at once; otherwise the schedule's
next attempt decides, counted from the newest successful backup (the start of its job, or the
time of the newest snapshot, whichever is later) and, after a failure, not sooner than the retry
delay. :func:`claim_backup_job` turns the volume's pending job, or a new one, into a running job;
the agent then reports :func:`record_heartbeat` and :func:`finish_job`. :func:`expire_stale_jobs`
fails running backup jobs whose agent stopped reporting, so the volume is retried at its next
attempt: every scheduled run eventually completes on some attempt.

Functions that take a ``Session`` change rows in it and flush, but never commit: the caller owns
the transaction. Functions that take an ``Engine`` (:func:`apply_retention`,
:func:`lock_new_snapshot`, :func:`run_gc`) commit their own short transactions, so the job row
is visible while the work runs.

**Retention** (:func:`apply_retention`) forgets a volume's snapshots that its policy does not
keep, using :mod:`dingyuan.repository.retention`; retention-locked snapshots are always kept (the
repository re-checks the lock before every delete). **lock-for** (:func:`lock_new_snapshot`)
extends a new snapshot's retention lock to ``now + lock_for_seconds``. **gc**
(:func:`run_gc`) wraps :func:`dingyuan.repository.gc.gc`; it needs the repository to itself, so
while a backup holds its lock the job ends ``skipped`` and gc runs at its next turn.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Engine, delete, func, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import InstanceState, Session

from ..catalog.models import Export, Host, Job, Policy, Snapshot, Volume, utcnow
from ..errors import JobConflict, LockedError, PolicyError, RetentionLocked
from ..repository.gc import gc
from ..repository.repo import Repository
from ..repository.retention import Decision, apply_policy
from .schedule import keep_policy, next_attempt


class JobState(StrEnum):
    """The states of a job (the catalog's ``jobs.state``). The one place that names them."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


ACTIVE_STATES = (JobState.PENDING, JobState.RUNNING)
FINISHED_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.SKIPPED)


class JobKind(StrEnum):
    """Kinds of jobs (``jobs.kind``). Backups are run by agents; the others by the vault."""

    BACKUP = "backup"
    RETENTION = "retention"
    GC = "gc"
    DRILL = "drill"


#: Jobs an agent runs (they send heartbeats and expire without them) and jobs the vault runs itself.
AGENT_KINDS = (JobKind.BACKUP,)
VAULT_KINDS = (JobKind.RETENTION, JobKind.GC, JobKind.DRILL)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: The default time without a heartbeat after which a running backup job counts as abandoned.
HEARTBEAT_TIMEOUT = timedelta(minutes=10)


# ---------------------------------------------------------------------------------------------
# What the schedule needs to know about each volume's backups


@dataclass(frozen=True)
class BackupFacts:
    """One volume's backup history, as the schedule reads it.

    ``last_start``: start of the newest successful backup (its job's start, or the newest
    snapshot's time, whichever is later); ``last_snapshot``: the newest snapshot's time;
    ``last_failure``: end of the newest failed backup job; ``active``: state of an unfinished
    backup job (``pending`` or ``running``) and ``active_since`` its creation; ``since``: when the
    volume was first protected (its first backup job, else when its host was added).
    """

    last_start: datetime | None = None
    last_snapshot: datetime | None = None
    last_failure: datetime | None = None
    active: JobState | None = None
    active_since: datetime | None = None
    since: datetime | None = None


def backup_facts(session: Session, host_id: int | None = None) -> dict[int, BackupFacts]:
    """:class:`BackupFacts` of every volume (of one host, if given), by volume id."""
    vol_filter = [] if host_id is None else [Volume.host_id == host_id]
    backups = [Job.kind == JobKind.BACKUP, *vol_filter]

    def per_volume(column: Any, *where: Any) -> dict[int, Any]:
        q = select(Volume.id, column).join_from(Volume, Job, Job.volume_id == Volume.id)
        rows = session.execute(q.where(*backups, *where).group_by(Volume.id))
        return {vid: value for vid, value in rows}

    snap_q = select(Snapshot.volume_id, func.max(Snapshot.time)).join(Volume, Snapshot.volume_id == Volume.id)
    snaps = dict(session.execute(snap_q.where(*vol_filter).group_by(Snapshot.volume_id)).all())
    succeeded = per_volume(func.max(Job.started), Job.state == JobState.SUCCEEDED)
    failed = per_volume(func.max(Job.finished), Job.state == JobState.FAILED)
    first = per_volume(func.min(Job.created))
    active: dict[int, tuple[JobState, datetime]] = {}
    active_q = select(Volume.id, Job.state, Job.created).join_from(Volume, Job, Job.volume_id == Volume.id)
    for vid, state, created in session.execute(
        active_q.where(*backups, Job.state.in_(ACTIVE_STATES)).order_by(Job.id)
    ):
        # running wins over pending; otherwise the oldest
        if vid not in active or (state == JobState.RUNNING and active[vid][0] != JobState.RUNNING):
            active[vid] = (JobState(state), created)
    out: dict[int, BackupFacts] = {}
    vol_q = select(Volume.id, Host.created).join(Host, Volume.host_id == Host.id).where(*vol_filter)
    for vid, host_created in session.execute(vol_q):
        starts = [t for t in (snaps.get(vid), succeeded.get(vid)) if t is not None]
        active_state, active_since = active.get(vid, (None, None))
        out[vid] = BackupFacts(
            last_start=max(starts) if starts else None,
            last_snapshot=snaps.get(vid),
            last_failure=failed.get(vid),
            active=active_state,
            active_since=active_since,
            since=first.get(vid, host_created),
        )
    return out


def next_backup(policy: Policy, facts: BackupFacts, now: datetime) -> datetime | None:
    """When the volume's next backup should start: None while one runs, ``now`` when due
    (a pending "run now" job is due at once). Raises :class:`PolicyError` for a bad policy."""
    if facts.active == JobState.RUNNING:
        return None
    if facts.active == JobState.PENDING:
        return now
    return next_attempt(policy, facts.last_start, facts.last_failure, now)


# ---------------------------------------------------------------------------------------------
# Backups (run by agents)


def due_backups(session: Session, now: datetime, host_id: int | None = None) -> list[Volume]:
    """Enabled volumes (with a source) under an enabled policy whose backup should start now,
    of one host if ``host_id`` is given: those with a pending job first, then the most overdue.

    A volume whose policy cannot be scheduled (:class:`PolicyError`) is left out; ``dingyuan
    status`` reports it as breached with the policy's problem.
    """
    q = (
        select(Volume, Policy)
        .join(Policy, Volume.policy_id == Policy.id)
        .where(Volume.enabled, Policy.enabled, Volume.source.is_not(None), Volume.source != "")
    )
    if host_id is not None:
        q = q.where(Volume.host_id == host_id)
    facts = backup_facts(session, host_id)
    due: list[tuple[tuple[int, datetime, int], Volume]] = []
    for volume, policy in session.execute(q):
        f = facts.get(volume.id, BackupFacts())
        try:
            when = next_backup(policy, f, now)
        except PolicyError:
            continue
        if when is None or when > now:
            continue
        if f.active == JobState.PENDING and f.active_since is not None:
            due.append(((0, f.active_since, volume.id), volume))
        else:  # never run first, then the longest since a successful start
            due.append(((1, f.last_start or _EPOCH, volume.id), volume))
    return [v for _, v in sorted(due, key=lambda d: d[0])]


def _lock_volume(session: Session, volume_id: int) -> None:
    """Hold the volume's row until the caller's transaction ends (``SELECT ... FOR UPDATE`` on
    PostgreSQL), so two transactions that check for an active backup and then add or start one
    take turns: the second sees the first's job. SQLite has no row locks (SQLAlchemy leaves the
    clause out); there the second writer fails to commit instead (the database is locked)."""
    session.execute(select(Volume.id).where(Volume.id == volume_id).with_for_update())


def _active_backups(session: Session, volume_id: int) -> list[Job]:
    q = select(Job).where(
        Job.volume_id == volume_id, Job.kind == JobKind.BACKUP, Job.state.in_(ACTIVE_STATES)
    )
    return list(session.scalars(q.order_by(Job.id)))


def request_backup(session: Session, volume: Volume, now: datetime, requested_by: str) -> Job:
    """An operator's "run now": a pending backup job for ``volume``, due at once. If the volume
    already has a pending or running backup job, that job is returned instead of a second one.
    Like any backup, it is listed by :func:`due_backups` only while the volume is enabled, has a
    source and an enabled policy."""
    _lock_volume(session, volume.id)
    active = _active_backups(session, volume.id)
    if active:
        return active[0]
    job = Job(
        kind=JobKind.BACKUP,
        state=JobState.PENDING,
        created=now,
        volume_id=volume.id,
        details={"trigger": "operator", "requested_by": requested_by},
    )
    session.add(job)
    session.flush()
    return job


def claim_backup_job(session: Session, volume: Volume, now: datetime) -> Job:
    """Start a backup of ``volume``: its oldest pending job, or a new scheduled one, becomes
    ``running`` with ``started`` and ``heartbeat`` at ``now``. Raises :class:`JobConflict` if a
    backup of the volume is running already (one job per volume at a time).

    The check and the claim are one transaction of the caller, holding the volume's row: of two
    claims at once (not expected: only the volume's own agent claims it) the second waits for the
    first and then gets :class:`JobConflict` on PostgreSQL, or fails to commit on SQLite (the
    database is locked).
    """
    _lock_volume(session, volume.id)
    active = _active_backups(session, volume.id)
    running = [j for j in active if j.state == JobState.RUNNING]
    if running:
        raise JobConflict(
            job=running[0].id,
            state=JobState.RUNNING,
            detail=f"volume {volume.name} is already being backed up; wait for that job to finish "
            "or to expire",
        )
    policy = session.get(Policy, volume.policy_id) if volume.policy_id is not None else None
    if active:
        job = active[0]
    else:
        job = Job(kind=JobKind.BACKUP, created=now, volume_id=volume.id, details={"trigger": "schedule"})
        session.add(job)
    job.state = JobState.RUNNING
    job.started = now
    job.heartbeat = now
    if policy is not None:
        job.details = {**job.details, "policy": policy.name}
    session.flush()
    return job


def record_heartbeat(
    session: Session, job: Job, now: datetime, progress: dict[str, Any] | None = None
) -> bool:
    """An agent's sign of life for a running job (and its progress). False if the job is no
    longer running (it expired, or was finished): the caller should tell the agent so."""
    if job.state != JobState.RUNNING:
        return False
    job.heartbeat = now
    if progress is not None:
        job.progress = progress
    session.flush()
    return True


def finish_job(
    session: Session,
    job: Job,
    now: datetime,
    *,
    error: str | None = None,
    snapshot_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> Job:
    """End a running job: ``succeeded``, or ``failed`` with ``error``.

    A success reported after the job expired (the agent was silent, then committed its
    snapshot) still counts: the snapshot is real. Anything else on a finished job raises
    :class:`JobConflict`.
    """
    late_success = job.state == JobState.FAILED and error is None
    if job.state != JobState.RUNNING and not late_success:
        raise JobConflict(job=job.id, state=job.state, detail="it has ended and cannot end again")
    job.state = JobState.FAILED if error is not None else JobState.SUCCEEDED
    job.error = error
    job.finished = now
    if snapshot_id is not None:
        job.snapshot_id = snapshot_id
    if details:
        job.details = {**job.details, **details}
    session.flush()
    return job


def expire_stale_jobs(session: Session, now: datetime, timeout: timedelta = HEARTBEAT_TIMEOUT) -> list[Job]:
    """Fail every running backup job whose agent has not reported (heartbeat, else start) for
    longer than ``timeout``. The volume is then retried at its next attempt."""
    q = select(Job).where(Job.state == JobState.RUNNING, Job.kind.in_(AGENT_KINDS))
    expired = []
    for job in session.scalars(q.order_by(Job.id)):
        seen = job.heartbeat or job.started or job.created
        if now - seen <= timeout:
            continue
        job.state = JobState.FAILED
        job.finished = now
        job.error = (
            f"the agent stopped reporting: no heartbeat since {seen.isoformat()} (timeout "
            f"{int(timeout.total_seconds())} s); the backup will retry at the volume's next attempt"
        )
        expired.append(job)
    session.flush()
    return expired


def abandon_vault_jobs(session: Session, now: datetime) -> list[Job]:
    """Fail the vault's own jobs (retention, gc) left ``running`` by a vault that stopped; call it
    when the vault starts, before it runs any."""
    q = select(Job).where(Job.state == JobState.RUNNING, Job.kind.in_(VAULT_KINDS))
    jobs = list(session.scalars(q.order_by(Job.id)))
    for job in jobs:
        job.state = JobState.FAILED
        job.finished = now
        job.error = "the vault stopped while this job ran; it runs again at its next turn"
    session.flush()
    return jobs


# ---------------------------------------------------------------------------------------------
# Jobs the vault runs itself


def _pk(obj: Volume | Policy) -> int:
    """The primary key of a catalog row, even if it is detached and expired."""
    state: InstanceState[Any] = sa_inspect(obj)
    identity = state.identity
    if identity is None:
        raise ValueError(f"{obj!r} has not been saved to the catalog")
    return int(identity[0])


class VaultJob:
    """A job row for work the vault does in this call: committed ``running`` at the start, so
    status shows it, then ended with the outcome. ``finished`` is ``now`` plus the time taken."""

    def __init__(
        self, engine: Engine, kind: JobKind, now: datetime, volume_id: int | None, details: dict[str, Any]
    ):
        self.engine = engine
        self.now = now
        self.t0 = time.monotonic()
        with Session(engine) as s, s.begin():
            job = Job(
                kind=kind,
                state=JobState.RUNNING,
                created=now,
                started=now,
                heartbeat=now,
                volume_id=volume_id,
                details=details,
            )
            s.add(job)
            s.flush()
            self.id = job.id

    def end(self, state: JobState, details: dict[str, Any], error: str | None = None) -> None:
        with Session(self.engine) as s, s.begin():
            job = s.get_one(Job, self.id)
            job.state = state
            job.error = error
            job.finished = self.now + timedelta(seconds=time.monotonic() - self.t0)
            job.details = {**job.details, **details}


@dataclass
class RetentionResult:
    """What :func:`apply_retention` did: snapshot ids ``forgotten``, ``kept`` (newest first), and
    of those kept the ones ``locked`` (kept only because of their retention lock)."""

    job_id: int
    forgotten: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)


def apply_retention(
    repo: Repository, engine: Engine, volume: Volume, policy: Policy, now: datetime
) -> RetentionResult:
    """Forget the snapshots of ``volume`` that ``policy``'s retention does not keep.

    Decides with :func:`dingyuan.repository.retention.apply_policy` on the repository's
    snapshots of the volume (the truth, not the catalog), deletes the others from the repository
    (a snapshot whose lock the repository finds in force is kept and listed in ``locked``),
    removes their catalog rows and records a ``retention`` job. An empty retention keeps every
    snapshot. On an error the job ends ``failed`` (what was forgotten until then is recorded
    and gone from the catalog) and the error is raised. The space is freed by :func:`run_gc`.
    """
    volume_id, policy_id = _pk(volume), _pk(policy)
    with Session(engine) as s:
        vol = s.get_one(Volume, volume_id)
        pol = s.get_one(Policy, policy_id)
        host_name, volume_name = s.get_one(Host, vol.host_id).name, vol.name
        policy_name, retention = pol.name, dict(pol.retention)
    job = VaultJob(engine, JobKind.RETENTION, now, volume_id, {"policy": policy_name})
    result = RetentionResult(job.id)
    try:
        keep = keep_policy(policy_name, retention)
        snaps = [s for s in repo.snapshots() if s.host == host_name and s.volume == volume_name]
        if keep.empty():  # no rule: keep everything
            decisions = [Decision(s, True, ["no retention rule"]) for s in snaps[::-1]]
        else:
            decisions = apply_policy(snaps, keep, now, pinned_snapshots(repo, engine))
        for d in decisions:
            if d.keep:
                result.kept.append(d.snapshot.id)
                if d.reasons == ["retention-locked"]:
                    result.locked.append(d.snapshot.id)
                continue
            try:
                repo.delete_snapshot(d.snapshot)  # re-reads the lock: the repository has the last word
            except RetentionLocked:
                result.kept.append(d.snapshot.id)
                result.locked.append(d.snapshot.id)
                continue
            result.forgotten.append(d.snapshot.id)
    except Exception as e:
        _drop_snapshot_rows(engine, result.forgotten)
        job.end(JobState.FAILED, _retention_details(result), error=str(e))
        raise
    _drop_snapshot_rows(engine, result.forgotten)
    job.end(JobState.SUCCEEDED, _retention_details(result))
    return result


def _retention_details(result: RetentionResult) -> dict[str, Any]:
    return {"forgotten": result.forgotten, "kept": len(result.kept), "locked": result.locked}


def pinned_snapshots(repo: Repository, engine: Engine) -> dict[str, str]:
    """Snapshots retention must keep while they are in use: clone bases and exported ones."""
    pinned = dict.fromkeys(repo.clone_bases(), "clone-base")
    with Session(engine) as session:
        for sid in session.scalars(select(Export.target).where(Export.kind == "snapshot")):
            pinned.setdefault(sid, "exported")
    return pinned


def _drop_snapshot_rows(engine: Engine, ids: Sequence[str]) -> None:
    with Session(engine) as s, s.begin():
        for i in range(0, len(ids), 500):
            s.execute(delete(Snapshot).where(Snapshot.id.in_(ids[i : i + 500])))


def lock_new_snapshot(
    repo: Repository, engine: Engine, snapshot_id: str, policy: Policy, now: datetime
) -> datetime | None:
    """Make a new snapshot immutable for the policy's ``lock_for_seconds`` from ``now``.

    Extends the snapshot's retention lock in the repository (never shortens it) and updates its
    catalog row. Returns the lock's end, or None when the policy locks nothing.
    """
    with Session(engine) as s:
        lock_for = s.get_one(Policy, _pk(policy)).lock_for_seconds
    if not lock_for:
        return None
    until = now + timedelta(seconds=lock_for)
    snap = repo.read_snapshot(snapshot_id)
    if snap.retention_until is None or snap.retention_until < until:
        snap.retention_until = until
        repo.update_snapshot(snap)
    with Session(engine) as s, s.begin():
        row = s.get(Snapshot, snapshot_id)
        if row is not None:
            row.retention_until = snap.retention_until
    return snap.retention_until


@dataclass
class GcResult:
    """How a :func:`run_gc` went: ``state`` is succeeded, skipped (the repository was busy;
    ``error`` says why and gc can run later) or failed; ``report`` is gc's own report."""

    job_id: int
    state: JobState
    report: dict[str, int] = field(default_factory=dict)
    error: str | None = None


def run_gc(repo: Repository, engine: Engine, now: datetime | None = None) -> GcResult:
    """Garbage-collect the repository as a ``gc`` job.

    gc takes the repository's exclusive lock; while a backup (or restore, verify) holds a shared
    one, the job ends ``skipped`` with the reason and this returns normally: run it again later.
    Other errors end the job ``failed`` and are raised.
    """
    job = VaultJob(engine, JobKind.GC, now or utcnow(), None, {})
    try:
        report = gc(repo).as_dict()
    except LockedError as e:
        error = f"gc was skipped because the repository is in use ({e}); it can run again later"
        job.end(JobState.SKIPPED, {}, error=error)
        return GcResult(job.id, JobState.SKIPPED, error=error)
    except Exception as e:
        job.end(JobState.FAILED, {}, error=str(e))
        raise
    job.end(JobState.SUCCEEDED, {"report": report})
    return GcResult(job.id, JobState.SUCCEEDED, report=report)
