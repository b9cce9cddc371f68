"""Helpers for the vault's job and status tests: a catalog with protected volumes."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session
from support import write_sparse

from dingyuan.catalog.db import open_catalog, sqlite_url
from dingyuan.catalog.models import Host, Job, Policy, Volume


def catalog(tmp_path: Path) -> sa.Engine:
    return open_catalog(sqlite_url(tmp_path / "catalog.sqlite"))


def add_policy(engine: sa.Engine, name: str, **kwargs: Any) -> int:
    fields: dict[str, Any] = {"retention": {}, "chunk_size": 65536, **kwargs}
    if "cron" in fields:
        fields.setdefault("schedule", "cron")
    else:
        fields.setdefault("schedule", "interval")
        fields.setdefault("interval_seconds", 3600)
    with Session(engine) as s, s.begin():
        policy = Policy(name=name, **fields)
        s.add(policy)
        s.flush()
        return policy.id


def protect(
    engine: sa.Engine,
    host: str,
    volume: str,
    policy_id: int | None,
    source: str | None = "/dev/vda",
    host_created: datetime | None = None,
) -> int:
    """The id of volume ``host:volume`` (created if needed), set to ``source`` and ``policy_id``."""
    with Session(engine) as s, s.begin():
        h = s.scalars(sa.select(Host).where(Host.name == host)).one_or_none()
        if h is None:
            h = Host(name=host, **({"created": host_created} if host_created else {}))
            s.add(h)
            s.flush()
        v = s.scalars(sa.select(Volume).where(Volume.host_id == h.id, Volume.name == volume)).one_or_none()
        if v is None:
            v = Volume(host_id=h.id, name=volume, chunk_size=65536)
            s.add(v)
        v.source = source
        v.policy_id = policy_id
        s.flush()
        return v.id


def add_job(engine: sa.Engine, volume_id: int | None, state: str, created: datetime, **kwargs: Any) -> int:
    with Session(engine) as s, s.begin():
        kind = kwargs.pop("kind", "backup")
        job = Job(kind=kind, state=state, created=created, volume_id=volume_id, **kwargs)
        s.add(job)
        s.flush()
        return job.id


def image(path: Path, seed: int, size: int = 200_000) -> str:
    write_sparse(path, size, [(0, bytes([seed]) * 5000), (size // 2, bytes([seed + 1]) * 7000)])
    return str(path)
