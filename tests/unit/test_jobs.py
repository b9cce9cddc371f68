"""The vault's jobs (dingyuan.vault.jobs): due backups, claims, expiry, retention, lock-for, gc."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from vault_support import add_job, add_policy, catalog, image, protect

from dingyuan.catalog.models import Export, Job, Policy, Snapshot, Volume
from dingyuan.catalog.rebuild import rebuild_catalog
from dingyuan.errors import JobConflict, MissingObject
from dingyuan.repository.backup import backup
from dingyuan.repository.clone import CloneStore
from dingyuan.repository.repo import Repository
from dingyuan.vault.jobs import (
    JobKind,
    JobState,
    abandon_vault_jobs,
    apply_retention,
    backup_facts,
    claim_backup_job,
    due_backups,
    expire_stale_jobs,
    finish_job,
    lock_new_snapshot,
    record_heartbeat,
    request_backup,
    run_gc,
)
from dingyuan.vault.schedule import RETRY_DELAY

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    e = catalog(tmp_path)
    yield e
    e.dispose()


def due_names(engine: sa.Engine, now: datetime, host_id: int | None = None) -> list[str]:
    with Session(engine) as s:
        return [v.name for v in due_backups(s, now, host_id)]


def jobs(engine: sa.Engine) -> list[Job]:
    with Session(engine, expire_on_commit=False) as s:
        return list(s.scalars(sa.select(Job).order_by(Job.id)))


def claim(engine: sa.Engine, volume_id: int, now: datetime) -> Job:
    with Session(engine, expire_on_commit=False) as s, s.begin():
        return claim_backup_job(s, s.get_one(Volume, volume_id), now)


def finish(engine: sa.Engine, job_id: int, now: datetime, **kwargs: str | None) -> Job:
    with Session(engine, expire_on_commit=False) as s, s.begin():
        return finish_job(s, s.get_one(Job, job_id), now, **kwargs)


# --- due backups ----------------------------------------------------------------------------


def test_only_enabled_volumes_with_a_source_under_an_enabled_policy_are_due(engine: sa.Engine) -> None:
    hourly = add_policy(engine, "hourly")
    off = add_policy(engine, "off", enabled=False)
    protect(engine, "h1", "ok", hourly)
    protect(engine, "h1", "no-policy", None)
    protect(engine, "h1", "no-source", hourly, source=None)
    protect(engine, "h1", "empty-source", hourly, source="")
    protect(engine, "h1", "policy-off", off)
    disabled = protect(engine, "h1", "disabled", hourly)
    with Session(engine) as s, s.begin():
        s.get_one(Volume, disabled).enabled = False
    assert due_names(engine, T0) == ["ok"]


def test_an_interval_volume_is_due_again_one_interval_after_its_last_successful_start(
    engine: sa.Engine,
) -> None:
    vid = protect(engine, "h1", "sda", add_policy(engine, "hourly", interval_seconds=3600))
    assert due_names(engine, T0) == ["sda"]  # never ran: at once
    job = claim(engine, vid, T0)
    assert (job.state, job.kind, job.started, job.heartbeat, job.volume_id) == (
        JobState.RUNNING,
        JobKind.BACKUP,
        T0,
        T0,
        vid,
    )
    assert job.details == {"trigger": "schedule", "policy": "hourly"}
    assert due_names(engine, T0 + 2 * HOUR) == []  # running: never a second job
    with pytest.raises(JobConflict, match="already being backed up"):
        claim(engine, vid, T0 + 2 * HOUR)
    finish(engine, job.id, T0 + timedelta(minutes=5), snapshot_id="ab" * 32)
    assert due_names(engine, T0 + HOUR - timedelta(seconds=1)) == []
    assert due_names(engine, T0 + HOUR) == ["sda"]
    with Session(engine) as s:
        facts = backup_facts(s)[vid]
    assert facts.last_start == T0 and facts.active is None and facts.since == T0


def test_a_snapshot_without_a_job_counts_as_a_successful_run(engine: sa.Engine) -> None:
    vid = protect(engine, "h1", "sda", add_policy(engine, "hourly"))
    with Session(engine) as s, s.begin():
        s.add(
            Snapshot(
                id="cd" * 32,
                volume_id=vid,
                time=T0,
                size=1,
                consistency="crash",
                labels={},
                annotations={},
                stats={},
            )
        )
    assert due_names(engine, T0 + timedelta(minutes=59)) == []
    assert due_names(engine, T0 + HOUR) == ["sda"]


def test_run_now_makes_a_volume_due_at_once_and_is_the_job_claimed(engine: sa.Engine) -> None:
    vid = protect(engine, "h1", "sda", add_policy(engine, "nightly", cron="0 2 * * *"))
    first = claim(engine, vid, T0)
    finish(engine, first.id, T0 + timedelta(minutes=1))
    assert due_names(engine, T0 + HOUR) == []
    with Session(engine, expire_on_commit=False) as s, s.begin():
        vol = s.get_one(Volume, vid)
        pending = request_backup(s, vol, T0 + HOUR, requested_by="alice")
        again = request_backup(s, vol, T0 + HOUR, requested_by="bob")  # no second job
    assert again.id == pending.id and pending.state == JobState.PENDING
    assert due_names(engine, T0 + HOUR) == ["sda"]
    claimed = claim(engine, vid, T0 + HOUR + timedelta(seconds=5))
    assert claimed.id == pending.id and claimed.state == JobState.RUNNING
    assert claimed.details == {"trigger": "operator", "requested_by": "alice", "policy": "nightly"}
    assert claimed.started == T0 + HOUR + timedelta(seconds=5)
    with Session(engine) as s, s.begin():
        assert request_backup(s, s.get_one(Volume, vid), T0 + HOUR, "carol").id == claimed.id


def test_a_failed_backup_is_retried_after_the_retry_delay(engine: sa.Engine) -> None:
    vid = protect(engine, "h1", "sda", add_policy(engine, "nightly", cron="0 2 * * *"))
    night = datetime(2026, 3, 3, 2, 0, tzinfo=UTC)
    assert due_names(engine, night - timedelta(seconds=1)) == []
    assert due_names(engine, night) == ["sda"]
    job = claim(engine, vid, night)
    finish(engine, job.id, night + timedelta(minutes=3), error="source vanished")
    assert due_names(engine, night + timedelta(minutes=3) + RETRY_DELAY - timedelta(seconds=1)) == []
    assert due_names(engine, night + timedelta(minutes=3) + RETRY_DELAY) == ["sda"]
    retry = claim(engine, vid, night + timedelta(minutes=9))
    finish(engine, retry.id, night + timedelta(minutes=20))
    assert due_names(engine, night + 23 * HOUR) == []
    assert due_names(engine, night + 24 * HOUR) == ["sda"]


def test_due_volumes_by_host_and_in_order(engine: sa.Engine) -> None:
    hourly = add_policy(engine, "hourly")
    a = protect(engine, "h1", "a", hourly)
    b = protect(engine, "h1", "b", hourly)
    protect(engine, "h1", "c", hourly)  # never ran
    other = protect(engine, "h2", "x", hourly)
    for vid, start in ((a, T0 - 2 * HOUR), (b, T0 - 3 * HOUR), (other, T0 - 5 * HOUR)):
        add_job(engine, vid, "succeeded", start, started=start, finished=start)
    add_job(engine, a, "pending", T0 - timedelta(minutes=1))
    assert due_names(engine, T0) == ["a", "c", "x", "b"]  # run-now first, never run, most overdue
    with Session(engine) as s:
        h1 = s.get_one(Volume, a).host_id
    assert due_names(engine, T0, host_id=h1) == ["a", "c", "b"]


def test_a_policy_that_cannot_be_scheduled_is_skipped(engine: sa.Engine) -> None:
    protect(engine, "h1", "bad", add_policy(engine, "too-fast", interval_seconds=1))
    protect(engine, "h1", "good", add_policy(engine, "hourly"))
    assert due_names(engine, T0) == ["good"]


# --- heartbeats, expiry, finishing ----------------------------------------------------------


def test_stale_running_jobs_fail_and_are_retried(engine: sa.Engine) -> None:
    vid = protect(engine, "h1", "sda", add_policy(engine, "cdp", interval_seconds=60))
    quiet = protect(engine, "h1", "sdb", add_policy(engine, "hourly"))
    job = claim(engine, vid, T0)
    fresh = claim(engine, quiet, T0)
    with Session(engine) as s, s.begin():
        assert record_heartbeat(s, s.get_one(Job, fresh.id), T0 + timedelta(minutes=9), {"done": 5})
    timeout = timedelta(minutes=10)
    with Session(engine) as s, s.begin():
        assert expire_stale_jobs(s, T0 + timeout, timeout) == []  # not older than the timeout
    with Session(engine, expire_on_commit=False) as s, s.begin():
        expired = expire_stale_jobs(s, T0 + timeout + timedelta(seconds=1), timeout)
    assert [j.id for j in expired] == [job.id]
    failed = jobs(engine)[0]
    assert failed.state == JobState.FAILED and failed.finished == T0 + timeout + timedelta(seconds=1)
    assert failed.error is not None
    assert "agent stopped reporting" in failed.error and "will retry" in failed.error
    assert jobs(engine)[1].state == JobState.RUNNING and jobs(engine)[1].progress == {"done": 5}
    # retried after min(period, RETRY_DELAY) = one minute
    assert due_names(engine, T0 + timeout + timedelta(seconds=60)) == []
    assert due_names(engine, T0 + timeout + timedelta(seconds=61)) == ["sda"]
    with Session(engine) as s, s.begin():
        assert not record_heartbeat(s, s.get_one(Job, job.id), T0 + timeout * 2)
    # the agent was only slow: its snapshot is real, a late success counts
    late = finish(engine, job.id, T0 + timeout * 2, snapshot_id="ef" * 32)
    assert late.state == JobState.SUCCEEDED and late.error is None and late.snapshot_id == "ef" * 32
    with pytest.raises(JobConflict, match="cannot end again"):
        finish(engine, job.id, T0 + timeout * 2)


def test_vault_jobs_left_running_are_failed_at_start(engine: sa.Engine) -> None:
    vid = protect(engine, "h1", "sda", add_policy(engine, "hourly"))
    gc_job = add_job(engine, None, "running", T0, kind="gc", started=T0)
    backup_job = add_job(engine, vid, "running", T0, started=T0, heartbeat=T0)
    with Session(engine, expire_on_commit=False) as s, s.begin():
        assert [j.id for j in abandon_vault_jobs(s, T0 + HOUR)] == [gc_job]
    states = {j.id: (j.state, j.error) for j in jobs(engine)}
    assert states[gc_job][0] == JobState.FAILED and "vault stopped" in str(states[gc_job][1])
    assert states[backup_job] == (JobState.RUNNING, None)  # agents' jobs expire by heartbeat


# --- retention and lock-for -----------------------------------------------------------------


def _backups(repo: Repository, tmp_path: Path, host: str, volume: str, times: list[datetime]) -> list[str]:
    ids = []
    for i, t in enumerate(times):
        src = image(tmp_path / f"{host}-{volume}-{i}", seed=i + 1)
        ids.append(backup(repo, src, volume, host=host, chunk_size=16384, at=t).snapshot.id)
    return ids


def _catalog_ids(engine: sa.Engine) -> set[str]:
    with Session(engine) as s:
        return set(s.scalars(sa.select(Snapshot.id)))


def _rows(engine: sa.Engine, volume_id: int, policy_id: int) -> tuple[Volume, Policy]:
    with Session(engine) as s:
        return s.get_one(Volume, volume_id), s.get_one(Policy, policy_id)


def test_retention_forgets_what_the_policy_does_not_keep_but_never_a_locked_snapshot(
    repo: Repository, engine: sa.Engine, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    days = [now - timedelta(days=d) for d in (6, 5, 4, 3, 2, 1)]
    ids = _backups(repo, tmp_path, "h1", "sda", days)
    other = _backups(repo, tmp_path, "h2", "sda", days[:2])
    locked = repo.read_snapshot(ids[0])  # the oldest
    locked.retention_until = now + timedelta(days=30)
    repo.update_snapshot(locked)
    # in force by the repository's clock, expired by the caller's: the repository has the last word
    clock_skewed = repo.read_snapshot(ids[1])
    clock_skewed.retention_until = now + timedelta(hours=1)
    repo.update_snapshot(clock_skewed)
    rebuild_catalog(repo, engine)
    policy_id = add_policy(engine, "keep2", retention={"last": 2})
    vid = protect(engine, "h1", "sda", policy_id)
    vol, pol = _rows(engine, vid, policy_id)  # detached rows are fine

    result = apply_retention(repo, engine, vol, pol, now + timedelta(hours=2))

    assert result.forgotten == [ids[3], ids[2]]  # newest first
    assert result.kept == [ids[5], ids[4], ids[1], ids[0]]
    assert result.locked == [ids[1], ids[0]]
    assert {s.id for s in repo.snapshots()} == {ids[0], ids[1], ids[4], ids[5], *other}
    assert _catalog_ids(engine) == {ids[0], ids[1], ids[4], ids[5], *other}
    job = jobs(engine)[-1]
    assert (job.id, job.kind, job.state, job.volume_id, job.error) == (
        result.job_id,
        JobKind.RETENTION,
        JobState.SUCCEEDED,
        vid,
        None,
    )
    assert job.started == now + timedelta(hours=2)
    assert job.finished is not None and job.finished >= job.started
    forgotten, locked_ids = [ids[3], ids[2]], [ids[1], ids[0]]
    assert job.details == {"policy": "keep2", "forgotten": forgotten, "kept": 4, "locked": locked_ids}

    # nothing more to forget; an empty retention keeps everything
    assert apply_retention(repo, engine, vol, pol, now + timedelta(hours=2)).forgotten == []
    keep_all = add_policy(engine, "keep-all")
    _, pol_all = _rows(engine, vid, keep_all)
    assert apply_retention(repo, engine, vol, pol_all, now).kept == [ids[5], ids[4], ids[1], ids[0]]


def test_retention_keeps_exported_snapshots_and_clone_bases(
    repo: Repository, engine: sa.Engine, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    ids = _backups(repo, tmp_path, "h1", "sda", [now - timedelta(days=d) for d in (3, 2, 1)])
    rebuild_catalog(repo, engine)
    CloneStore(repo, tmp_path / "clones").create(repo.read_snapshot(ids[0]), "keeper")
    with Session(engine) as session, session.begin():
        session.add(
            Export(
                name="x" * 32, protocol="nbd", kind="snapshot", target=ids[1], writable=False, created_by="t"
            )
        )
    policy_id = add_policy(engine, "keep1", retention={"keep_last": 1})
    vol, pol = _rows(engine, protect(engine, "h1", "sda", policy_id), policy_id)

    result = apply_retention(repo, engine, vol, pol, now)

    assert result.forgotten == []
    assert {s.id for s in repo.snapshots()} == set(ids)


def test_retention_failure_is_recorded(
    repo: Repository, engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = datetime.now(UTC)
    ids = _backups(repo, tmp_path, "h1", "sda", [now - timedelta(days=2), now - timedelta(days=1)])
    rebuild_catalog(repo, engine)
    policy_id = add_policy(engine, "keep1", retention={"keep_last": 1})
    vol, pol = _rows(engine, protect(engine, "h1", "sda", policy_id), policy_id)

    def broken(*_: object, **__: object) -> None:
        raise MissingObject(name="snapshots/x", detail="gone")

    monkeypatch.setattr(repo, "delete_snapshot", broken)
    with pytest.raises(MissingObject):
        apply_retention(repo, engine, vol, pol, now)
    job = jobs(engine)[-1]
    assert job.state == JobState.FAILED and job.error is not None and "snapshots/x" in job.error
    assert _catalog_ids(engine) == set(ids)


def test_lock_for_extends_the_lock_of_a_new_snapshot(
    repo: Repository, engine: sa.Engine, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    (sid,) = _backups(repo, tmp_path, "h1", "sda", [now])
    rebuild_catalog(repo, engine)
    locking = add_policy(engine, "immutable", lock_for_seconds=7 * 86400)
    plain = add_policy(engine, "plain")
    vid = protect(engine, "h1", "sda", locking)
    _, pol = _rows(engine, vid, locking)
    _, pol_plain = _rows(engine, vid, plain)

    assert lock_new_snapshot(repo, engine, sid, pol_plain, now) is None
    assert repo.read_snapshot(sid).retention_until is None

    until = lock_new_snapshot(repo, engine, sid, pol, now)
    assert until == now + timedelta(days=7)
    assert repo.read_snapshot(sid).retention_until == until
    with Session(engine) as s:
        assert s.get_one(Snapshot, sid).retention_until == until
    # never shortened: a later call with an earlier end keeps the longer lock
    assert lock_new_snapshot(repo, engine, sid, pol, now - timedelta(days=1)) == until
    assert repo.read_snapshot(sid).retention_until == until


# --- gc -------------------------------------------------------------------------------------


def test_gc_runs_as_a_job_and_is_skipped_while_a_backup_holds_the_repository(
    repo: Repository, engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = _backups(repo, tmp_path, "h1", "sda", [T0, T0 + HOUR])
    repo.delete_snapshot(repo.read_snapshot(ids[0]))
    monkeypatch.setattr(repo, "lock", functools.partial(Repository.lock, repo, wait=0.2))

    with repo.lock(exclusive=False, purpose="backup sda"):
        busy = run_gc(repo, engine, now=T0)
    assert busy.state == JobState.SKIPPED and busy.report == {}
    assert busy.error is not None and "repository is in use" in busy.error and "again later" in busy.error
    job = jobs(engine)[-1]
    assert (job.id, job.kind, job.state, job.error) == (busy.job_id, JobKind.GC, JobState.SKIPPED, busy.error)

    done = run_gc(repo, engine, now=T0 + HOUR)
    assert done.state == JobState.SUCCEEDED and done.error is None
    assert done.report["snapshots_removed"] == 0 and done.report["blobs_freed"] > 0
    job = jobs(engine)[-1]
    assert job.state == JobState.SUCCEEDED and job.details == {"report": done.report}
    assert job.started == T0 + HOUR and job.volume_id is None
