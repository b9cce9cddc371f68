"""The catalog on a real PostgreSQL server (a private cluster, see ``pgkit``): the migrations, the
models/migrations match, upgrades with data, aware UTC times, constraints, a rebuild that gives
the same rows as on SQLite, concurrent backup claims, and the vault's API and CLI over it."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy.orm import Session

from dingyuan.catalog.db import (
    create_catalog_engine,
    current_revision,
    head_revision,
    migrate,
    open_catalog,
    safe_url,
)
from dingyuan.catalog.db import sqlite_url as sqlite_url_of
from dingyuan.catalog.models import AuditEvent, Base, Host, Job, Policy, Snapshot, Token, User, Volume
from dingyuan.catalog.rebuild import RebuildReport, rebuild_catalog
from dingyuan.cli.main import cli
from dingyuan.errors import JobConflict
from dingyuan.repository.backup import backup
from dingyuan.repository.repo import Repository
from dingyuan.vault.config import init_vault, load_vault
from dingyuan.vault.context import VaultContext, open_vault_context
from dingyuan.vault.jobs import claim_backup_job
from vaultkit import PASSPHRASE, api_client, make_snapshot, new_token

TABLES = {
    "hosts",
    "volumes",
    "snapshots",
    "policies",
    "jobs",
    "users",
    "tokens",
    "enrollments",
    "audit_events",
    "exports",
}
T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    e = open_catalog(pg_url)
    yield e
    e.dispose()


def test_migrations_create_the_schema_and_are_idempotent(pg_url: str) -> None:
    first = open_catalog(pg_url)
    assert first.dialect.name == "postgresql" and first.dialect.driver == "psycopg"
    assert current_revision(first) == head_revision() == "0005"
    inspector = sa.inspect(first)
    assert set(inspector.get_table_names()) == TABLES | {"alembic_version"}
    # the column types PostgreSQL got: zone-aware times, native booleans, JSON, 64-bit sizes
    columns = {c["name"]: c for c in inspector.get_columns("jobs")}
    assert isinstance(columns["created"]["type"], sa.DateTime) and columns["created"]["type"].timezone
    assert isinstance(columns["progress"]["type"], sa.JSON)
    assert columns["progress"]["default"] is None  # 0002's server default is gone again
    volumes = {c["name"]: c for c in inspector.get_columns("volumes")}
    assert isinstance(volumes["enabled"]["type"], sa.Boolean) and volumes["enabled"]["default"] is None
    snapshots = {c["name"]: c for c in inspector.get_columns("snapshots")}
    assert isinstance(snapshots["size"]["type"], sa.BigInteger)
    policies = {c["name"]: c for c in inspector.get_columns("policies")}
    assert policies["consistency"]["default"] is None
    assert {c["name"] for c in inspector.get_check_constraints("policies")} == {
        "ck_policies_schedule_kind",
        "ck_policies_schedule_complete",
    }
    with Session(first) as s, s.begin():
        s.add(Host(name="h1"))
    first.dispose()

    again = open_catalog(pg_url)  # already at head: nothing to do, data kept
    assert current_revision(again) == "0005"
    with Session(again) as s:
        assert s.scalars(sa.select(Host.name)).all() == ["h1"]
    again.dispose()


def test_models_and_migrations_agree(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        assert compare_metadata(ctx, Base.metadata) == []


def test_upgrading_from_the_first_schema_keeps_rows(pg_url: str) -> None:
    engine = create_catalog_engine(pg_url)
    migrate(engine, "0001")
    assert current_revision(engine) == "0001"
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO hosts (name, created) VALUES ('h1', '2026-01-01 00:00:00+00')")
        conn.exec_driver_sql("INSERT INTO volumes (host_id, name, chunk_size) VALUES (1, 'sda', 65536)")
        conn.exec_driver_sql(
            "INSERT INTO policies (name, schedule, interval_seconds, retention, chunk_size, enabled) "
            """VALUES ('hourly', 'interval', 3600, '{"keep_last": 3}', 65536, true)"""
        )
        conn.exec_driver_sql(
            "INSERT INTO jobs (kind, state, created, details) "
            """VALUES ('verify', 'succeeded', '2026-01-01 01:00:00+08', '{"ok": true}')"""
        )
    migrate(engine)
    assert current_revision(engine) == "0005"
    with Session(engine) as s:
        host = s.scalars(sa.select(Host)).one()
        assert (host.name, host.created, host.last_seen) == ("h1", datetime(2026, 1, 1, tzinfo=UTC), None)
        vol = s.scalars(sa.select(Volume)).one()
        assert (vol.name, vol.enabled, vol.source, vol.policy_id) == ("sda", True, None, None)
        policy = s.scalars(sa.select(Policy)).one()
        assert (policy.consistency, policy.retention, policy.bandwidth_limit) == (
            "crash",
            {"keep_last": 3},
            None,
        )
        job = s.scalars(sa.select(Job)).one()
        assert (job.progress, job.details, job.volume_id) == ({}, {"ok": True}, None)
        assert job.created == datetime(2025, 12, 31, 17, tzinfo=UTC)
        # the sequences go on after the rows inserted before the upgrade
        s.add(Host(name="h2"))
        s.flush()
        assert s.scalars(sa.select(Host.id).where(Host.name == "h2")).one() == 2
        s.rollback()
    engine.dispose()


def test_aware_datetimes_round_trip(engine: sa.Engine) -> None:
    plus8 = timezone(timedelta(hours=8))
    with Session(engine) as s, s.begin():
        s.add(Job(kind="verify", state="done", created=T0.astimezone(plus8), started=T0, finished=None))
    with Session(engine) as s:
        job = s.scalars(sa.select(Job)).one()
        assert job.created == T0 and job.created.tzinfo == UTC and job.created.utcoffset() == timedelta(0)
        assert job.started == T0 and job.started.tzinfo == UTC and job.finished is None
        assert job.details == {}
        # stored as a timestamptz: the same instant, whatever the session's zone
        stored = s.execute(sa.text("SELECT created AT TIME ZONE 'UTC' FROM jobs")).scalar_one()
        assert stored == T0.replace(tzinfo=None)
        s.execute(sa.text("SET TIME ZONE 'Asia/Shanghai'"))
        assert s.scalars(sa.select(Job.created)).one() == T0
        assert s.scalars(sa.select(Job.created)).one().tzinfo == UTC
        assert s.scalars(sa.select(Job).where(Job.created == T0)).one().id == job.id
    with pytest.raises(sa.exc.StatementError, match="naive datetime"), Session(engine) as s, s.begin():
        s.add(AuditEvent(time=datetime(2026, 1, 1), actor="a", action="x", target="t", outcome="ok"))


def test_foreign_keys_and_constraints_are_enforced(engine: sa.Engine) -> None:
    with pytest.raises(sa.exc.IntegrityError), Session(engine) as s, s.begin():
        s.add(Volume(host_id=999, name="vda", chunk_size=65536))
    with pytest.raises(sa.exc.IntegrityError), Session(engine) as s, s.begin():
        s.add(Token(user_id=999, role="viewer", secret_hash="x"))
    with pytest.raises(sa.exc.IntegrityError, match="ck_users_role"), Session(engine) as s, s.begin():
        s.add(User(name="u", role="root", password_hash="x"))
    with pytest.raises(sa.exc.IntegrityError, match="ck_policies_schedule_complete"), Session(engine) as s:
        s.add(Policy(name="p", schedule="cron", retention={}, chunk_size=65536))
        s.commit()
    with Session(engine) as s, s.begin():
        host = Host(name="h")
        s.add(host)
        s.flush()
        s.add(Volume(host_id=host.id, name="vda", chunk_size=65536))
        host_id = host.id
    with pytest.raises(sa.exc.IntegrityError), Session(engine) as s, s.begin():
        s.execute(sa.delete(Host))  # a volume still refers to it
    with pytest.raises(sa.exc.IntegrityError, match="uq_volumes_host_id_name"), Session(engine) as s:
        s.add(Volume(host_id=host_id, name="vda", chunk_size=65536))  # unique per host
        s.commit()


# rebuild ---------------------------------------------------------------------------------------


def _populate(repo: Repository, tmp_path: Path) -> list[str]:
    """Two hosts, three volumes, five snapshots; the second one retention-locked and annotated."""
    ids = []
    for i, (host, volume) in enumerate(
        [("alpha", "vda"), ("alpha", "vda"), ("alpha", "vdb"), ("beta", "vda"), ("beta", "vda")]
    ):
        src = tmp_path / f"img{i}"
        src.write_bytes(os.urandom(20_000) + bytes([i + 1]) * 30_000)
        labels = {"env": "prod", "note": "ünïcode ✓"} if i == 1 else None
        at = T0 + timedelta(minutes=i)
        res = backup(repo, str(src), volume, host=host, chunk_size=16384, labels=labels, at=at)
        ids.append(res.snapshot.id)
    locked = repo.read_snapshot(ids[1])
    locked.retention_until = datetime.now(UTC).replace(microsecond=123456) + timedelta(days=30)
    locked.annotations = {"drill": {"ok": True, "seconds": 12}, "by": "ünïcode ✓"}
    repo.update_snapshot(locked)
    return ids


def _rows(engine: sa.Engine) -> list[tuple[Any, ...]]:
    """The catalog's index of the repository, by names instead of generated ids."""
    with Session(engine) as s:
        snaps = s.execute(
            sa.select(Snapshot, Volume.name, Volume.chunk_size, Host.name)
            .join(Volume, Snapshot.volume_id == Volume.id)
            .join(Host, Volume.host_id == Host.id)
            .order_by(Snapshot.time, Snapshot.id)
        ).all()
        return [
            (
                host,
                volume,
                chunk_size,
                snap.id,
                snap.time,
                snap.size,
                snap.consistency,
                snap.labels,
                snap.parent_id,
                snap.retention_until,
                snap.annotations,
                snap.stats,
            )
            for snap, volume, chunk_size, host in snaps
        ]


def test_rebuild_gives_the_same_rows_as_on_sqlite(
    repo: Repository, tmp_path: Path, engine: sa.Engine
) -> None:
    ids = _populate(repo, tmp_path)
    lite = open_catalog(sqlite_url_of(tmp_path / "catalog.sqlite"))
    try:
        expected = RebuildReport(hosts_added=2, volumes_added=3, snapshots_added=5, snapshots_total=5)
        assert rebuild_catalog(repo, engine) == expected
        assert rebuild_catalog(repo, lite) == expected
        rows = _rows(engine)
        assert len(rows) == 5 and rows == _rows(lite)
        locked = next(r for r in rows if r[3] == ids[1])
        assert locked[9] is not None and locked[9].tzinfo == UTC and locked[9].microsecond == 123456
        assert locked[10] == {"drill": {"ok": True, "seconds": 12}, "by": "ünïcode ✓"}
        assert (locked[7], locked[8]) == ({"env": "prod", "note": "ünïcode ✓"}, ids[0])

        again = rebuild_catalog(repo, engine)  # nothing to do on PostgreSQL either
        assert not again.changed and again.snapshots_total == 5

        repo.delete_snapshot(repo.read_snapshot(ids[3]))
        noted = repo.read_snapshot(ids[0])
        noted.annotations = {"verified": "2026-01-03"}
        repo.update_snapshot(noted)
        for e in (engine, lite):
            report = rebuild_catalog(repo, e)
            assert (report.snapshots_removed, report.snapshots_updated, report.snapshots_added) == (1, 1, 0)
        assert _rows(engine) == _rows(lite)
        assert ids[3] not in {r[3] for r in _rows(engine)}
    finally:
        lite.dispose()


# jobs ------------------------------------------------------------------------------------------


def test_two_claims_of_one_volume_at_once_start_one_backup(engine: sa.Engine) -> None:
    """Read committed would let both claims see no running job; the claim locks the volume's row,
    so the second waits for the first and then finds its job running."""
    with Session(engine) as s, s.begin():
        host = Host(name="h")
        s.add(host)
        s.flush()
        s.add(Volume(host_id=host.id, name="vda", chunk_size=65536, source="/dev/vda"))
    now = datetime.now(UTC)
    outcome: list[object] = []

    def second_claim() -> None:
        try:
            with Session(engine) as s2, s2.begin():
                claim_backup_job(s2, s2.scalars(sa.select(Volume)).one(), now)
                outcome.append("claimed")
        except JobConflict as e:
            outcome.append(e)

    with Session(engine) as s1:
        with s1.begin():
            first = claim_backup_job(s1, s1.scalars(sa.select(Volume)).one(), now)
            thread = threading.Thread(target=second_claim)
            thread.start()
            thread.join(0.5)
            assert thread.is_alive(), "the second claim did not wait for the first"
        thread.join(10)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], JobConflict)
        assert s1.scalars(sa.select(Job.id)).all() == [first.id]


# the vault -------------------------------------------------------------------------------------


@pytest.fixture
def ctx(tmp_path: Path, pg_url: str) -> Iterator[VaultContext]:
    cfg = init_vault(tmp_path / "vault", PASSPHRASE, catalog_url=pg_url)
    assert not (cfg.dir / "catalog.sqlite").exists()
    assert load_vault(cfg.dir).catalog_url == pg_url
    c = open_vault_context(cfg.dir, PASSPHRASE)
    yield c
    c.close()


def test_vault_api_on_a_postgresql_catalog(ctx: VaultContext, tmp_path: Path) -> None:
    assert ctx.engine.dialect.name == "postgresql"
    snap = make_snapshot(ctx, tmp_path, "web1", "data", 1)
    admin = new_token(ctx, "admin")
    with api_client(ctx, admin) as c:
        r = c.post(
            "policies",
            json={
                "name": "hourly",
                "schedule": "interval",
                "interval_seconds": 3600,
                "retention": {"keep_last": 5, "keep_daily": 7},
                "bandwidth_limit": 2**40,
            },
        )
        assert r.status_code == 201, r.text
        assert r.json()["retention"]["keep_daily"] == 7 and r.json()["bandwidth_limit"] == 2**40
        r = c.post("hosts/web1/volumes", json={"name": "disk", "source": "/dev/vdb", "policy": "hourly"})
        assert r.status_code == 201, r.text
        vol = r.json()
        assert (vol["host"], vol["name"], vol["policy"], vol["enabled"]) == ("web1", "disk", "hourly", True)
        assert {(v["host"], v["name"]) for v in c.get("volumes").json()} == {
            ("web1", "data"),
            ("web1", "disk"),
        }
        job = c.post(f"volumes/{vol['id']}/run").json()
        assert (job["state"], job["volume_id"], job["progress"]) == ("pending", vol["id"], {})
        assert c.patch(f"volumes/{vol['id']}", json={"enabled": False}).json()["enabled"] is False
        assert [j["id"] for j in c.get("jobs").json()] == [job["id"]]
        snaps = c.get("snapshots").json()
        assert [s["id"] for s in snaps] == [snap]
        assert (snaps[0]["host"], snaps[0]["volume"]) == ("web1", "data")
        until = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
        r = c.post(f"snapshots/{snap}/lock", json={"until": until.isoformat()})
        assert r.is_success, r.text
        assert datetime.fromisoformat(c.get(f"snapshots/{snap}").json()["retention_until"]) == until
        assert (
            c.post("policies", json={"name": "hourly", "schedule": "cron", "cron": "0 * * * *"}).status_code
            == 409
        )
        audit = c.get("audit").json()
    events = {(e["action"], e["target"], e["outcome"]) for e in audit}
    assert {
        ("POST /api/v1/policies", "policy:hourly", "ok"),
        ("POST /api/v1/hosts/{host}/volumes", f"volume:{vol['id']}", "ok"),
        ("PATCH /api/v1/volumes/{volume_id}", f"volume:{vol['id']}", "ok"),
        ("POST /api/v1/volumes/{volume_id}/run", f"volume:{vol['id']}", "ok"),
        ("POST /api/v1/snapshots/{snapshot_id}/lock", f"snapshot:{snap}", "ok"),
        ("POST /api/v1/policies", "/api/v1/policies", "denied"),  # the duplicate name (409)
    } <= events, events
    assert all(e["time"].endswith(("Z", "+00:00")) for e in audit)
    # the rows are in PostgreSQL, where the vault wrote them
    with ctx.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT name FROM policies").scalars().all() == ["hourly"]
        assert conn.exec_driver_sql("SELECT count(*) FROM audit_events").scalar_one() == len(audit)


def test_cli_init_with_a_postgresql_catalog(tmp_path: Path, pg_url: str) -> None:
    d = tmp_path / "vault"
    (tmp_path / "pass").write_bytes(PASSPHRASE)
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "vault",
            "init",
            "--dir",
            str(d),
            "--passphrase-file",
            str(tmp_path / "pass"),
            "--catalog-url",
            pg_url,
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["catalog_url"] == pg_url
    assert "s3cret" not in safe_url("postgresql+psycopg://dy:s3cret@db.example/dingyuan")
    assert load_vault(d).catalog_url == pg_url and not (d / "catalog.sqlite").exists()
    res = runner.invoke(
        cli,
        ["vault", "rebuild-catalog", "--dir", str(d), "--passphrase-file", str(tmp_path / "pass"), "--json"],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["changed"] is False
    engine = open_catalog(pg_url)
    try:
        with Session(engine) as s:
            assert s.scalars(sa.select(User.name)).all() == ["admin"]  # the first admin
    finally:
        engine.dispose()
