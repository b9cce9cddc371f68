"""The catalog: migrations, the models/migrations match, and rebuilding it from the repository."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.orm import Session
from support import write_sparse

from dingyuan.catalog.db import (
    create_catalog_engine,
    current_revision,
    head_revision,
    migrate,
    open_catalog,
    sqlite_url,
)
from dingyuan.catalog.models import AuditEvent, Base, Host, Job, Policy, Snapshot, Token, User, Volume
from dingyuan.catalog.rebuild import RebuildReport, rebuild_catalog
from dingyuan.errors import CatalogUnavailable
from dingyuan.repository.backup import backup
from dingyuan.repository.repo import Repository

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
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    e = open_catalog(sqlite_url(tmp_path / "catalog.sqlite"))
    yield e
    e.dispose()


def test_migrations_create_the_schema_and_are_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    first = open_catalog(sqlite_url(path))
    assert current_revision(first) == head_revision() == "0005"
    assert set(sa.inspect(first).get_table_names()) == TABLES | {"alembic_version"}
    with Session(first) as s, s.begin():
        s.add(Host(name="h1"))
    first.dispose()
    again = open_catalog(sqlite_url(path))  # already at head: nothing to do, data kept
    assert current_revision(again) == "0005"
    with Session(again) as s:
        assert s.scalars(sa.select(Host.name)).all() == ["h1"]
    with again.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    again.dispose()


def test_upgrading_from_the_first_schema_keeps_rows(tmp_path: Path) -> None:
    engine = create_catalog_engine(sqlite_url(tmp_path / "catalog.sqlite"))
    migrate(engine, "0001")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO hosts (id, name, created) VALUES (1, 'h1', '2026-01-01')")
        conn.exec_driver_sql(
            "INSERT INTO volumes (id, host_id, name, chunk_size) VALUES (1, 1, 'sda', 65536)"
        )
    migrate(engine)
    with Session(engine) as s:
        vol = s.scalars(sa.select(Volume)).one()
        assert (vol.name, vol.enabled, vol.source, vol.policy_id) == ("sda", True, None, None)
    engine.dispose()


def test_models_and_migrations_agree(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        assert compare_metadata(ctx, Base.metadata) == []


def test_aware_datetimes_round_trip(engine: sa.Engine) -> None:
    plus8 = timezone(timedelta(hours=8))
    local = T0.astimezone(plus8)
    with Session(engine) as s, s.begin():
        s.add(Job(kind="verify", state="done", created=local, started=T0, finished=None))
    with Session(engine) as s:
        job = s.scalars(sa.select(Job)).one()
        assert job.created == T0 and job.created.tzinfo == UTC and job.created.utcoffset() == timedelta(0)
        assert job.started == T0 and job.started.tzinfo == UTC and job.finished is None
        assert job.details == {}
        # stored as the UTC wall time, whatever zone the value came in
        stored = s.execute(sa.text("SELECT created FROM jobs")).scalar_one()
        assert str(stored).startswith("2026-01-02 03:04:05.678901")
    with pytest.raises(sa.exc.StatementError, match="naive datetime"), Session(engine) as s, s.begin():
        s.add(AuditEvent(time=datetime(2026, 1, 1), actor="a", action="x", target="t", outcome="ok"))


def test_foreign_keys_and_constraints_are_enforced(engine: sa.Engine) -> None:
    with pytest.raises(sa.exc.IntegrityError), Session(engine) as s, s.begin():
        s.add(Volume(host_id=999, name="vda", chunk_size=65536))
    with pytest.raises(sa.exc.IntegrityError), Session(engine) as s, s.begin():
        s.add(Token(user_id=999, role="viewer", secret_hash="x"))
    with pytest.raises(sa.exc.IntegrityError), Session(engine) as s, s.begin():
        s.add(User(name="u", role="root", password_hash="x"))
    with pytest.raises(sa.exc.IntegrityError), Session(engine) as s, s.begin():
        s.add(Policy(name="p", schedule="cron", retention={}, chunk_size=65536))
    with Session(engine) as s, s.begin():
        host = Host(name="h")
        s.add(host)
        s.flush()
        s.add(Volume(host_id=host.id, name="vda", chunk_size=65536))
        host_id = host.id
    with pytest.raises(sa.exc.IntegrityError), Session(engine) as s, s.begin():
        s.execute(sa.delete(Host))  # a volume still refers to it
    with pytest.raises(sa.exc.IntegrityError), Session(engine) as s, s.begin():
        s.add(Volume(host_id=host_id, name="vda", chunk_size=65536))  # unique per host


# rebuild ------------------------------------------------------------------------------------


def _image(path: Path, seed: int, size: int = 300_000) -> str:
    write_sparse(path, size, [(0, bytes([seed]) * 5000), (size // 2, bytes([seed + 1]) * 7000)])
    return str(path)


def _populate(repo: Repository, tmp_path: Path) -> list[str]:
    """Two hosts, three volumes, five snapshots; the second one retention-locked and annotated."""
    ids = []
    for i, (host, volume) in enumerate(
        [("alpha", "vda"), ("alpha", "vda"), ("alpha", "vdb"), ("beta", "vda"), ("beta", "vda")]
    ):
        src = _image(tmp_path / f"img{i}", seed=i + 1)
        res = backup(repo, src, volume, host=host, chunk_size=16384, at=T0 + timedelta(minutes=i))
        ids.append(res.snapshot.id)
    locked = repo.read_snapshot(ids[1])
    locked.retention_until = datetime.now(UTC).replace(microsecond=123456) + timedelta(days=30)
    locked.annotations = {"drill": {"ok": True, "seconds": 12}}
    repo.update_snapshot(locked)
    return ids


def _catalog_view(engine: sa.Engine) -> list[dict[str, Any]]:
    with Session(engine) as s:
        rows = s.execute(
            sa.select(Snapshot, Volume.name, Host.name)
            .join(Volume, Snapshot.volume_id == Volume.id)
            .join(Host, Volume.host_id == Host.id)
            .order_by(Snapshot.time, Snapshot.id)
        ).all()
        return [
            {
                "id": snap.id,
                "host": host,
                "volume": volume,
                "time": snap.time,
                "size": snap.size,
                "consistency": snap.consistency,
                "labels": snap.labels,
                "parent": snap.parent_id,
                "retention_until": snap.retention_until,
                "annotations": snap.annotations,
                "stats": snap.stats,
            }
            for snap, volume, host in rows
        ]


def _repo_view(repo: Repository) -> list[dict[str, Any]]:
    return [
        {
            "id": s.id,
            "host": s.host,
            "volume": s.volume,
            "time": s.time,
            "size": s.size,
            "consistency": s.consistency,
            "labels": s.labels,
            "parent": s.parent,
            "retention_until": s.retention_until,
            "annotations": s.annotations,
            "stats": s.stats,
        }
        for s in sorted(repo.snapshots(), key=lambda s: (s.time, s.id))
    ]


def _dump(db: Path) -> list[tuple[Any, ...]]:
    """Every row of every table, straight from SQLite: to show that nothing changed."""
    conn = sqlite3.connect(db)
    try:
        out: list[tuple[Any, ...]] = []
        for table in sorted(TABLES):
            out += [(table, *row) for row in conn.execute(f"SELECT * FROM {table} ORDER BY 1")]
        return out
    finally:
        conn.close()


def test_rebuild_indexes_exactly_the_repository(repo: Repository, tmp_path: Path, engine: sa.Engine) -> None:
    ids = _populate(repo, tmp_path)
    report = rebuild_catalog(repo, engine)
    assert report == RebuildReport(hosts_added=2, volumes_added=3, snapshots_added=5, snapshots_total=5)
    view = _catalog_view(engine)
    assert view == _repo_view(repo)
    assert sorted(v["id"] for v in view) == sorted(ids)
    locked = next(v for v in view if v["id"] == ids[1])
    assert locked["retention_until"] is not None and locked["retention_until"].tzinfo == UTC
    assert locked["annotations"] == {"drill": {"ok": True, "seconds": 12}}
    assert locked["parent"] == ids[0]
    with Session(engine) as s:
        assert sorted(
            s.execute(
                sa.select(Host.name, Volume.name, Volume.chunk_size).join(Volume, Volume.host_id == Host.id)
            ).all()
        ) == [
            ("alpha", "vda", 16384),
            ("alpha", "vdb", 16384),
            ("beta", "vda", 16384),
        ]


def test_rebuild_twice_changes_nothing(repo: Repository, tmp_path: Path) -> None:
    db = tmp_path / "catalog.sqlite"
    engine = open_catalog(sqlite_url(db))
    _populate(repo, tmp_path)
    assert rebuild_catalog(repo, engine).changed
    before = _dump(db)
    again = rebuild_catalog(repo, engine)
    assert not again.changed and again.snapshots_total == 5
    assert _dump(db) == before
    engine.dispose()


def test_rebuild_follows_deletions_and_notes_and_keeps_vault_state(
    repo_local: Repository, tmp_path: Path, engine: sa.Engine
) -> None:
    repo = repo_local
    ids = _populate(repo, tmp_path)
    with Session(engine) as s, s.begin():  # state that lives only in the catalog
        s.add(
            Policy(
                name="nightly", schedule="cron", cron="0 2 * * *", retention={"daily": 7}, chunk_size=65536
            )
        )
        s.add(User(name="ops", role="operator", password_hash="h"))
        s.add(Job(kind="backup", state="done"))
        s.add(AuditEvent(actor="ops", action="login", target="console", outcome="ok"))
        s.add(Host(name="enrolled-no-backup-yet"))
    rebuild_catalog(repo, engine)

    repo.delete_snapshot(repo.read_snapshot(ids[3]))
    annotated = repo.read_snapshot(ids[0])
    annotated.annotations = {"verified": "2026-01-03"}
    repo.update_snapshot(annotated)
    report = rebuild_catalog(repo, engine)
    assert (report.snapshots_removed, report.snapshots_updated, report.snapshots_added) == (1, 1, 0)
    view = _catalog_view(engine)
    assert view == _repo_view(repo)
    assert ids[3] not in {v["id"] for v in view}
    assert next(v for v in view if v["id"] == ids[0])["annotations"] == {"verified": "2026-01-03"}
    with Session(engine) as s:
        assert s.scalars(sa.select(Policy.name)).all() == ["nightly"]
        assert s.scalars(sa.select(User.name)).all() == ["ops"]
        assert len(s.scalars(sa.select(Job)).all()) == 1
        assert len(s.scalars(sa.select(AuditEvent)).all()) == 1
        assert "enrolled-no-backup-yet" in s.scalars(sa.select(Host.name)).all()

    # a fresh catalog rebuilt from the repository alone holds the same index
    fresh = open_catalog(sqlite_url(tmp_path / "fresh.sqlite"))
    rebuild_catalog(repo, fresh)
    assert _catalog_view(fresh) == view
    fresh.dispose()


def test_an_unreachable_or_malformed_catalog_is_a_clear_error_without_the_password() -> None:
    with pytest.raises(CatalogUnavailable) as e:
        open_catalog("postgresql+psycopg://dy:s3cret@127.0.0.1:1/dingyuan")  # nothing listens on port 1
    assert "s3cret" not in str(e.value) and "127.0.0.1" in str(e.value)
    with pytest.raises(CatalogUnavailable):
        open_catalog("no-such-dialect://x")
