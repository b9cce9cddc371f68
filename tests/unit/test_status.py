"""Volume status (dingyuan.vault.status) and ``dingyuan status``."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import Session
from vault_support import add_job, add_policy, catalog, image, protect

from dingyuan.catalog.db import open_catalog
from dingyuan.catalog.models import Snapshot, Volume
from dingyuan.catalog.rebuild import rebuild_catalog
from dingyuan.cli.main import cli, main
from dingyuan.cli.status_cmd import human_duration
from dingyuan.errors import RpoBreached
from dingyuan.repository.backends.local import LocalBackend
from dingyuan.repository.backup import backup
from dingyuan.repository.repo import Repository
from dingyuan.vault.config import VaultConfig, init_vault
from dingyuan.vault.status import VolumeStatus, volume_status

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
PASSPHRASE = b"status-test"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    e = catalog(tmp_path)
    yield e
    e.dispose()


def add_snapshot(engine: sa.Engine, volume_id: int, time: datetime) -> None:
    with Session(engine) as s, s.begin():
        s.add(
            Snapshot(
                id=f"{volume_id:02x}{int(time.timestamp()):x}".ljust(64, "0"),
                volume_id=volume_id,
                time=time,
                size=1 << 20,
                consistency="crash",
                labels={},
                annotations={},
                stats={},
            )
        )


def statuses(engine: sa.Engine, now: datetime) -> dict[str, VolumeStatus]:
    with Session(engine) as s:
        return {f"{v.host}:{v.volume}": v for v in volume_status(s, now)}


def test_volume_status_covers_every_state(engine: sa.Engine) -> None:
    hourly = add_policy(engine, "hourly", interval_seconds=3600)
    nightly = add_policy(engine, "nightly", cron="0 2 * * *")
    broken = add_policy(engine, "broken", interval_seconds=1)
    old_host = T0 - timedelta(days=10)
    fresh = protect(engine, "alpha", "fresh", hourly, host_created=old_host)
    add_snapshot(engine, fresh, T0 - timedelta(minutes=20))
    add_job(engine, fresh, "succeeded", T0 - timedelta(minutes=20), started=T0 - timedelta(minutes=20))
    stale = protect(engine, "alpha", "stale", hourly)
    add_snapshot(engine, stale, T0 - 2 * HOUR)
    add_job(engine, stale, "failed", T0 - HOUR, finished=T0 - HOUR, error="source vanished")
    running = protect(engine, "alpha", "busy", nightly)
    add_snapshot(engine, running, T0 - 10 * HOUR)
    add_job(engine, running, "running", T0 - timedelta(minutes=1), started=T0, heartbeat=T0)
    protect(engine, "gamma", "new", hourly, host_created=T0 - timedelta(minutes=30))
    protect(engine, "beta", "forgotten", hourly, host_created=old_host)
    protect(engine, "beta", "adhoc", None, host_created=old_host)
    protect(engine, "beta", "broken", broken, host_created=old_host)
    off = protect(engine, "beta", "off", hourly, host_created=old_host)
    with Session(engine) as s, s.begin():
        s.get_one(Volume, off).enabled = False
    add_job(engine, fresh, "succeeded", T0 - timedelta(minutes=19), kind="retention")

    st = statuses(engine, T0)
    assert list(st) == [
        "alpha:busy",
        "alpha:fresh",
        "alpha:stale",
        "beta:adhoc",
        "beta:broken",
        "beta:forgotten",
        "beta:off",
        "gamma:new",
    ]
    assert {k: v.rpo for k, v in st.items()} == {
        "alpha:busy": "met",
        "alpha:fresh": "met",
        "alpha:stale": "breached",
        "beta:adhoc": "unprotected",
        "beta:broken": "breached",
        "beta:forgotten": "breached",  # protected for days, never a snapshot
        "beta:off": "unprotected",
        "gamma:new": "pending",  # a host added half an hour ago
    }
    f = st["alpha:fresh"]
    assert (f.policy, f.last_snapshot, f.age_seconds, f.allowed_seconds) == (
        "hourly",
        T0 - timedelta(minutes=20),
        1200.0,
        5400.0,
    )
    assert f.next_run == T0 + timedelta(minutes=40) and not f.running and not f.breached
    assert (f.last_job_kind, f.last_job_state, f.last_error) == ("retention", "succeeded", None)

    s = st["alpha:stale"]
    assert s.breached and s.age_seconds == 7200.0 and s.next_run == T0  # due: the retry delay passed
    assert (s.last_job_kind, s.last_job_state, s.last_error) == ("backup", "failed", "source vanished")

    b = st["alpha:busy"]
    assert b.running and b.next_run is None and b.last_job_state == "running"

    assert st["gamma:new"].next_run == T0 and st["gamma:new"].last_snapshot is None
    assert st["beta:adhoc"].policy is None and st["beta:adhoc"].next_run is None
    assert "Policy broken cannot be used" in str(st["beta:broken"].last_error)
    assert st["beta:off"].next_run is None and st["beta:off"].policy == "hourly"

    doc = st["alpha:stale"].as_json()
    assert doc["last_snapshot"] == "2026-03-02T10:00:00.000000Z"
    assert doc["next_run"] == "2026-03-02T12:00:00.000000Z"
    assert doc["last_job"] == {"id": 2, "kind": "backup", "state": "failed"}
    json.dumps([v.as_json() for v in st.values()])  # all of it is JSON


def test_human_durations() -> None:
    assert [human_duration(s) for s in (-1, 0, 59, 60, 3599, 3600, 3660, 86399, 90000)] == [
        "0s",
        "0s",
        "59s",
        "1m",
        "59m",
        "1h00m",
        "1h01m",
        "23h59m",
        "1d01h",
    ]


# --- the CLI --------------------------------------------------------------------------------


@pytest.fixture
def vault(tmp_path: Path) -> VaultConfig:
    """A vault with two snapshots of h1:sda (one a day old, one 10 minutes old) and one of h1:sdb
    (a day old); both volumes hourly."""
    cfg = init_vault(tmp_path / "vault", PASSPHRASE)
    now = datetime.now(UTC)
    repo = Repository.open(LocalBackend(cfg.repository), PASSPHRASE, cfg.cache_dir)
    try:
        for i, (volume, age) in enumerate((("sda", timedelta(days=1)), ("sda", timedelta(minutes=10)))):
            backup(repo, image(tmp_path / f"img{i}", i + 1), volume, host="h1", at=now - age)
        backup(repo, image(tmp_path / "img-b", 9), "sdb", host="h1", at=now - timedelta(days=1))
        engine = open_catalog(cfg.catalog_url)
        try:
            rebuild_catalog(repo, engine)
            hourly = add_policy(engine, "hourly")
            protect(engine, "h1", "sda", hourly, source="/dev/sda")
            protect(engine, "h1", "sdb", hourly, source="/dev/sdb")
        finally:
            engine.dispose()
    finally:
        repo.close()
    return cfg


def _set_policy(cfg: VaultConfig, volume: str, policy_id: int | None) -> None:
    engine = open_catalog(cfg.catalog_url)
    try:
        with Session(engine) as s, s.begin():
            s.scalars(sa.select(Volume).where(Volume.name == volume)).one().policy_id = policy_id
    finally:
        engine.dispose()


def test_cli_status_json_and_exit_status(vault: VaultConfig) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["status", "--dir", str(vault.dir), "--json"])
    assert isinstance(res.exception, RpoBreached) and RpoBreached.exit_code == 3
    assert "RPO is breached for 1 volume(s): h1:sdb" in str(res.exception)
    doc = json.loads(res.stdout)
    assert [(d["host"], d["volume"], d["policy"], d["rpo"]) for d in doc] == [
        ("h1", "sda", "hourly", "met"),
        ("h1", "sdb", "hourly", "breached"),
    ]
    sda = doc[0]
    assert 600 <= sda["age_seconds"] < 700 and sda["allowed_seconds"] == 5400
    assert sda["last_snapshot"].endswith("Z") and sda["next_run"].endswith("Z")
    assert datetime.fromisoformat(sda["next_run"]) - datetime.fromisoformat(sda["last_snapshot"]) == HOUR
    assert sda["running"] is False and sda["last_job"] is None and sda["last_error"] is None

    _set_policy(vault, "sdb", None)  # unprotected: nothing promised, nothing breached
    res = runner.invoke(cli, ["status", "--dir", str(vault.dir), "--json"])
    assert res.exit_code == 0, res.output
    assert [d["rpo"] for d in json.loads(res.stdout)] == ["met", "unprotected"]

    res = runner.invoke(cli, ["status", "--dir", str(vault.dir)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split() == [
        "host",
        "volume",
        "policy",
        "last",
        "snapshot",
        "RPO",
        "next",
        "run",
        "last",
        "error",
    ]
    assert lines[1].split()[:6] == ["h1", "sda", "hourly", "10m", "ago", "met"]
    assert re.search(r"in (49|50)m \(\d{4}-\d\d-\d\d \d\d:\d\d UTC\)", lines[1])
    assert lines[2].split()[:6] == ["h1", "sdb", "-", "1d00h", "ago", "-"]


def test_cli_status_exits_3_when_an_rpo_is_breached(
    vault: VaultConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["dingyuan", "status", "--dir", str(vault.dir)])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 3
    out, err = capsys.readouterr()
    assert "BREACHED" in out and "h1:sdb" in err


def test_cli_status_without_a_vault(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["status", "--dir", str(tmp_path / "nowhere")])
    assert res.exception is not None and "No dingyuan vault" in str(res.exception)
