"""The vault's API in process: the role matrix, the audit rows of changes and refusals, token
formats and storage, input validation, retention locks, and the local CLI commands."""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session

from dingyuan.catalog.models import AuditEvent, Enrollment, Token, User
from dingyuan.catalog.rebuild import rebuild_catalog
from dingyuan.cli.main import cli
from dingyuan.errors import RetentionLocked, SnapshotNotFound, StorageFull, Unauthenticated
from dingyuan.vault.app import error_kind, status_of
from dingyuan.vault.auth import (
    API_TOKEN_RE,
    ENROLLMENT_TOKEN_RE,
    ca_fingerprint_hex,
    hash_password,
    hash_secret,
    redeem_enrollment,
    verify_password,
)
from dingyuan.vault.context import VaultContext, open_vault_context
from dingyuan.vault.local import create_enrollment
from vaultkit import PASSPHRASE, api_client, make_snapshot, make_vault, new_token


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[VaultContext]:
    cfg = make_vault(tmp_path)
    c = open_vault_context(cfg.dir, PASSPHRASE)
    yield c
    c.close()


@pytest.fixture
def world(ctx: VaultContext, tmp_path: Path) -> dict[str, Any]:
    """Two hosts with a snapshot each, a policy, a volume with a source, a job, a user."""
    ids = {
        "s1": make_snapshot(ctx, tmp_path, "web1", "data", 1),
        "s2": make_snapshot(ctx, tmp_path, "web2", "root", 2),
    }
    admin = new_token(ctx, "admin")
    with api_client(ctx, admin) as c:
        assert c.post(
            "policies", json={"name": "hourly", "schedule": "interval", "interval_seconds": 3600}
        ).is_success
        vol = c.post(
            "hosts/web1/volumes", json={"name": "disk", "source": "/dev/vdb", "policy": "hourly"}
        ).json()
        job = c.post(f"volumes/{vol['id']}/run").json()
        assert c.post("users", json={"name": "alice", "role": "viewer"}).is_success
        volumes = {(v["host"], v["name"]): v["id"] for v in c.get("volumes").json()}
    tokens = {
        "admin": admin,
        "operator": new_token(ctx, "operator"),
        "viewer": new_token(ctx, "viewer"),
        "agent": new_token(ctx, "agent", host="web1"),
    }
    return {"tokens": tokens, "job": job["id"], "volumes": volumes, **ids}


def _audit(ctx: VaultContext) -> list[AuditEvent]:
    with Session(ctx.engine) as s:
        return list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)))


# role matrix ----------------------------------------------------------------------------------
ALL = {"admin", "operator", "viewer", "agent"}
PEOPLE = {"admin", "operator", "viewer"}
MANAGERS = {"admin", "operator"}
ADMIN = {"admin"}

#: (method, path, body, roles allowed); paths name objects of ``world`` (web1 is the agent's)
MATRIX: list[tuple[str, str, Any, set[str]]] = [
    ("GET", "hosts", None, ALL),
    ("GET", "hosts/web1", None, ALL),
    ("GET", "hosts/web2", None, PEOPLE),
    ("GET", "volumes", None, ALL),
    ("GET", "volumes?host=web2", None, PEOPLE),
    ("GET", "volumes/{web1-disk}", None, ALL),
    ("GET", "volumes/{web2-root}", None, PEOPLE),
    ("PATCH", "volumes/{web1-disk}", {"enabled": False}, MANAGERS),
    ("POST", "hosts/web1/volumes", {"name": "new", "source": "/dev/vdc"}, MANAGERS),
    ("POST", "volumes/{web1-disk}/run", None, MANAGERS),
    ("GET", "policies", None, PEOPLE),
    ("GET", "policies/hourly", None, PEOPLE),
    ("POST", "policies", {"name": "p2", "schedule": "cron", "cron": "0 3 * * *"}, MANAGERS),
    ("PATCH", "policies/hourly", {"interval_seconds": 60}, MANAGERS),
    ("DELETE", "policies/hourly", None, MANAGERS),
    ("GET", "snapshots", None, ALL),
    ("GET", "snapshots/{s1}", None, ALL),
    ("GET", "snapshots/{s2}", None, PEOPLE),
    ("POST", "snapshots/{s1}/lock", {"for_seconds": 60}, MANAGERS),
    ("POST", "snapshots/{s1}/unlock", None, ADMIN),
    ("DELETE", "snapshots/{s1}", None, ADMIN),
    ("GET", "jobs", None, ALL),
    ("GET", "jobs/{job}", None, ALL),
    ("GET", "users", None, ADMIN),
    ("POST", "users", {"name": "bob", "role": "operator", "password": "correct horse battery"}, ADMIN),
    ("DELETE", "users/alice", None, ADMIN),
    ("GET", "tokens", None, ADMIN),
    ("POST", "tokens", {"role": "viewer"}, ADMIN),
    ("POST", "enrollments", {"host": "web9"}, ADMIN),
    ("GET", "audit", None, ADMIN),
]


def _path(template: str, world: dict[str, Any]) -> str:
    values = {
        "web1-disk": world["volumes"][("web1", "disk")],
        "web2-root": world["volumes"][("web2", "root")],
    }
    values |= {"s1": world["s1"], "s2": world["s2"], "job": world["job"]}
    return re.sub(r"\{([^}]+)\}", lambda m: str(values[m.group(1)]), template)


@pytest.mark.parametrize("role", sorted(ALL))
def test_role_matrix(ctx: VaultContext, world: dict[str, Any], role: str) -> None:
    refused = []
    with api_client(ctx, world["tokens"][role]) as c:
        for method, template, body, allowed in MATRIX:
            r = c.request(method, _path(template, world), json=body)
            if role in allowed:
                assert r.status_code < 400 or r.status_code == 409, (role, method, template, r.text)
            else:
                assert r.status_code == 403, (role, method, template, r.text)
                assert r.json()["error"] == "forbidden"
                refused.append(method)
    denied = [e for e in _audit(ctx) if e.outcome == "denied" and e.detail["status"] == 403]
    assert len(denied) == len(refused)
    assert {e.actor for e in denied} <= ({"host:web1"} if role == "agent" else {"token:2", "token:3"})


def test_agent_lists_only_its_own_host(ctx: VaultContext, world: dict[str, Any]) -> None:
    with api_client(ctx, world["tokens"]["agent"]) as c:
        assert [h["name"] for h in c.get("hosts").json()] == ["web1"]
        assert {v["host"] for v in c.get("volumes").json()} == {"web1"}
        assert {s["host"] for s in c.get("snapshots").json()} == {"web1"}
        assert [j["id"] for j in c.get("jobs").json()] == [world["job"]]
        assert c.get("hosts/nosuchhost").status_code == 403  # not even whether it exists


# audit ----------------------------------------------------------------------------------------
def test_a_change_and_its_audit_row_commit_together(ctx: VaultContext, world: dict[str, Any]) -> None:
    before = len(_audit(ctx))
    with api_client(ctx, world["tokens"]["operator"]) as c:
        r = c.post("policies", json={"name": "nightly", "schedule": "cron", "cron": "30 2 * * *"})
        assert r.status_code == 201
        conflict = c.post(
            "policies", json={"name": "nightly", "schedule": "interval", "interval_seconds": 99}
        )
        assert conflict.status_code == 409
        in_use = c.delete("policies/hourly")
        assert in_use.status_code == 409 and "used by 1 volume" in in_use.json()["message"]
    events = _audit(ctx)[before:]
    assert [(e.action, e.outcome, e.target) for e in events] == [
        ("POST /api/v1/policies", "ok", "policy:nightly"),
        ("POST /api/v1/policies", "denied", "/api/v1/policies"),
        ("DELETE /api/v1/policies/{name}", "denied", "/api/v1/policies/hourly"),
    ]
    assert all(e.actor == "token:2" and e.detail["client"] for e in events)  # the operator's
    with api_client(ctx, world["tokens"]["viewer"]) as c:
        assert c.get("policies/nightly").json()["interval_seconds"] is None
        assert c.get("policies/hourly").status_code == 200  # the refused delete changed nothing


def test_a_failed_change_leaves_no_trace_but_its_refusal(ctx: VaultContext, world: dict[str, Any]) -> None:
    with api_client(ctx, world["tokens"]["admin"]) as c:
        r = c.post("tokens", json={"user": "nobody"})
        assert r.status_code == 404
    with Session(ctx.engine) as s:
        assert s.scalar(select(Token).where(Token.user_id.is_not(None))) is None
    last = _audit(ctx)[-1]
    assert (last.action, last.outcome, last.detail["status"]) == ("POST /api/v1/tokens", "invalid", 404)


def test_validation_errors_name_the_field(ctx: VaultContext, world: dict[str, Any]) -> None:
    bad = [
        {"name": "p", "schedule": "interval", "interval_seconds": 5},
        {"name": "p", "schedule": "cron", "cron": "61 * * * *"},
        {"name": "p", "schedule": "cron", "cron": "0 3 * * *", "interval_seconds": 60},
        {"name": "p", "schedule": "interval", "interval_seconds": 60, "chunk_size": 3000},
        {"name": "p", "schedule": "interval", "interval_seconds": 60, "chunk_size": 8 << 20},
        {"name": "p", "schedule": "interval", "interval_seconds": 60, "retention": {"keep_daily": -1}},
        {"name": "p", "schedule": "interval", "interval_seconds": 60, "retention": {"keep_forever": 1}},
        {"name": "-p", "schedule": "interval", "interval_seconds": 60},
        {"name": "p", "schedule": "interval", "interval_seconds": 60, "colour": "blue"},
    ]
    with api_client(ctx, world["tokens"]["admin"]) as c:
        for body in bad:
            r = c.post("policies", json=body)
            assert r.status_code == 422, body
            assert r.json()["error"] == "invalid_request" and r.json()["message"].startswith(
                "invalid request: "
            )
        r = c.patch("policies/hourly", json={"schedule": "cron"})
        assert r.status_code == 422 and "cron" in r.json()["message"]
        r = c.patch("policies/hourly", json={"schedule": "cron", "cron": "0 4 * * 1-5"})
        assert r.status_code == 200 and r.json()["interval_seconds"] is None
        assert (
            c.post("policies", content=b"{not json", headers={"content-type": "application/json"}).status_code
            == 422
        )
        assert c.get("snapshots", params={"limit": 0}).status_code == 422
        assert c.get("snapshots/not-an-id").status_code == 422
        assert c.get("audit", params={"since": "2024-01-01T00:00:00"}).status_code == 422  # no zone
        assert c.post("policies", content=b"x" * (2 << 20)).status_code == 413


def test_locks_only_extend_and_unlock_needs_an_expired_lock(ctx: VaultContext, world: dict[str, Any]) -> None:
    sid = world["s1"]
    with api_client(ctx, world["tokens"]["admin"]) as c:
        first = c.post(f"snapshots/{sid}/lock", json={"for_seconds": 3600}).json()["retention_until"]
        assert c.post(f"snapshots/{sid}/lock", json={"for_seconds": 60}).status_code == 409
        longer = c.post(f"snapshots/{sid}/lock", json={"for_seconds": 7200})
        assert longer.status_code == 200 and longer.json()["retention_until"] > first
        assert c.post(f"snapshots/{sid}/lock", json={"for_seconds": 5, "until": first}).status_code == 422
        assert c.post(f"snapshots/{sid}/lock", json={"until": "2001-01-01T00:00:00Z"}).status_code == 422
        assert c.post(f"snapshots/{sid}/unlock").status_code == 409
        assert c.delete(f"snapshots/{sid}").status_code == 409
    assert ctx.repo.read_snapshot(sid).retention_until is not None
    # an expired lock can be cleared (a lock set in the past stands in for time passing)
    other = ctx.repo.read_snapshot(world["s2"])
    other.retention_until = other.time - timedelta(days=1)
    ctx.repo.update_snapshot(other)
    rebuild_catalog(ctx.repo, ctx.engine)
    with api_client(ctx, world["tokens"]["admin"]) as c:
        assert c.get(f"snapshots/{other.id}").json()["retention_until"] is not None
        r = c.post(f"snapshots/{other.id}/unlock")
        assert r.status_code == 200 and r.json()["retention_until"] is None
        assert c.delete(f"snapshots/{other.id}").status_code == 204
    assert ctx.repo.read_snapshot(sid).retention_until is not None
    with pytest.raises(SnapshotNotFound):
        ctx.repo.read_snapshot(other.id)


# tokens ---------------------------------------------------------------------------------------
def test_tokens_are_random_and_stored_only_as_hashes(ctx: VaultContext, world: dict[str, Any]) -> None:
    with api_client(ctx, world["tokens"]["admin"]) as c:
        made = c.post("tokens", json={"user": "alice", "expires_in_seconds": 3600}).json()
        listed = c.get("tokens").json()
    assert API_TOKEN_RE.fullmatch(made["token"]) and len(made["token"]) == 47
    assert made["role"] == "viewer" and made["user"] == "alice" and made["expires"]
    assert all("token" not in t for t in listed)
    with Session(ctx.engine) as s:
        row = s.get(Token, made["id"])
        assert row is not None and row.secret_hash == hash_secret(made["token"])
    dump = b"".join(p.read_bytes() for p in ctx.cfg.dir.glob("catalog.sqlite*"))
    assert made["token"].encode() not in dump
    with api_client(ctx, made["token"]) as c:
        assert c.get("hosts").status_code == 200
        assert c.get("users").status_code == 403
    last = _audit(ctx)[-1]
    assert last.actor == "user:alice" and last.outcome == "denied"


def test_expired_tokens_are_refused(ctx: VaultContext, world: dict[str, Any]) -> None:
    token = world["tokens"]["viewer"]
    with Session(ctx.engine) as s, s.begin():
        row = s.scalars(select(Token).where(Token.secret_hash == hash_secret(token))).one()
        row.expires = row.created - timedelta(seconds=1)
    with api_client(ctx, token) as c:
        r = c.get("hosts")
    assert r.status_code == 401 and "expired" in r.json()["message"]


def test_enrollment_tokens(ctx: VaultContext) -> None:
    issued = create_enrollment(ctx.cfg, "db1", timedelta(hours=1))
    m = ENROLLMENT_TOKEN_RE.fullmatch(issued.secret)
    assert m is not None and m.group(1) == ca_fingerprint_hex(ctx.cfg)
    with Session(ctx.engine) as s:
        row = s.scalars(select(Enrollment)).one()
        assert row.secret_hash == hash_secret(m.group(2)) and row.host_name == "db1"
    foreign = f"dye1.{'0' * 64}.{m.group(2)}"
    expired = create_enrollment(ctx.cfg, "db2", timedelta(seconds=1))
    with Session(ctx.engine) as s, s.begin():
        s.scalars(select(Enrollment).where(Enrollment.host_name == "db2")).one().expires -= timedelta(hours=1)
    for token, words in ((foreign, "another vault"), (expired.secret, "expired"), ("dye1.x.y", "malformed")):
        with Session(ctx.engine) as s, pytest.raises(Unauthenticated, match=words):
            redeem_enrollment(s, ctx.cfg, token)
    with api_client(ctx) as c:
        r = c.post(
            "enroll", json={"token": issued.secret, "hostname": "db1.example.com", "agent_version": "0.1"}
        )
        again = c.post("enroll", json={"token": issued.secret, "hostname": "db1", "agent_version": "0.1"})
    assert r.status_code == 200 and r.json()["host"] == "db1"
    assert again.status_code == 401


def test_re_enrolling_revokes_the_hosts_older_agent_token(ctx: VaultContext) -> None:
    tokens = []
    for _ in range(2):
        issued = create_enrollment(ctx.cfg, "db1", timedelta(hours=1))
        with api_client(ctx) as c:
            tokens.append(
                c.post("enroll", json={"token": issued.secret, "hostname": "db1", "agent_version": "1"})
            )
    old, new = (t.json()["token"] for t in tokens)
    with api_client(ctx, old) as c:
        assert c.get("hosts").status_code == 401
    with api_client(ctx, new) as c:
        assert c.get("hosts/db1").json()["agent_version"] == "1"


def test_passwords_are_argon2id_hashes(ctx: VaultContext, world: dict[str, Any]) -> None:
    stored = hash_password("correct horse battery")
    assert stored.startswith("$argon2id$") and verify_password("correct horse battery", stored)
    assert not verify_password("wrong horse battery", stored) and not verify_password("x", "!")
    with api_client(ctx, world["tokens"]["admin"]) as c:
        assert (
            c.post("users", json={"name": "carol", "role": "admin", "password": "short"}).status_code == 422
        )
        r = c.post("users", json={"name": "carol", "role": "admin", "password": "a long passphrase"})
        assert r.status_code == 201 and r.json()["has_password"]
    with Session(ctx.engine) as s:
        user = s.scalars(select(User).where(User.name == "carol")).one()
        assert "a long passphrase" not in user.password_hash
        assert verify_password("a long passphrase", user.password_hash)


def test_public_routes_and_openapi(ctx: VaultContext) -> None:
    with api_client(ctx) as c:
        assert c.get("health").json()["status"] == "ok"
        assert c.get("ca").content == ctx.cfg.tls_ca_cert.read_bytes()
        doc = c.get("openapi.json").json()
        assert c.get("docs").status_code == 200
        missing = c.get("nothing-here")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert "/api/v1/snapshots/{snapshot_id}" in doc["paths"]
    assert "HTTPBearer" in doc["components"]["securitySchemes"]


def test_error_statuses() -> None:
    assert status_of(RetentionLocked(snapshot="x", until="y")) == 409
    assert status_of(SnapshotNotFound(ref="x")) == 404
    assert status_of(StorageFull(name="x")) == 503
    assert error_kind(RetentionLocked(snapshot="x", until="y")) == "retention_locked"


# CLI --------------------------------------------------------------------------------------------
def test_cli_init_writes_an_admin_token_and_makes_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DINGYUAN_PASSPHRASE", PASSPHRASE.decode())
    vault_dir = tmp_path / "v"
    runner = CliRunner()
    r = runner.invoke(cli, ["vault", "init", "--dir", str(vault_dir), "--json"])
    assert r.exit_code == 0, r.output
    token_file = Path(json.loads(r.output)["admin_token_file"])
    assert token_file == vault_dir.resolve() / "admin.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    admin = token_file.read_text().strip()
    r = runner.invoke(
        cli, ["vault", "token", "create", "--dir", str(vault_dir), "--role", "operator", "--json"]
    )
    assert r.exit_code == 0, r.output
    operator = json.loads(r.output)["token"]
    r = runner.invoke(
        cli, ["vault", "enroll-token", "web1", "--dir", str(vault_dir), "--expires", "2h", "--json"]
    )
    assert r.exit_code == 0, r.output
    enrollment = json.loads(r.output)["token"]
    assert runner.invoke(cli, ["vault", "enroll-token", "-bad", "--dir", str(vault_dir)]).exit_code == 2

    ctx = open_vault_context(vault_dir, PASSPHRASE)
    try:
        with api_client(ctx, admin) as c:
            assert c.get("users").json()[0]["name"] == "admin"
            actors = {e["actor"] for e in c.get("audit").json()}
        assert any(a.startswith("local:") for a in actors)
        with api_client(ctx, operator) as c:
            assert c.get("users").status_code == 403 and c.get("hosts").status_code == 200
        with api_client(ctx) as c:
            r2 = c.post("enroll", json={"token": enrollment, "hostname": "web1", "agent_version": "0.1"})
            assert r2.status_code == 200
    finally:
        ctx.close()


def test_a_policys_quiesce_setting_is_checked_and_handed_to_the_agent(
    ctx: VaultContext, world: dict[str, Any]
) -> None:
    bad = {
        "db2": "unknown quiesce plugin",
        "mysql:password=x": "mysql",
        "postgresql:password=x": "postgresql",
        "sqlite:relative.db": "absolute path",
        "script:/bin/freeze": "FREEZE,THAW",
        "postgresql;on_failure=maybe": "on_failure",
        "postgresql;;sqlite:/a.db": "empty entry",
        "on_failure=skip": "names no plugin",
        "postgresql;timeout=0": "timeout",
        "sqlite:/" + "a" * 300: "invalid request",
    }
    with api_client(ctx, world["tokens"]["admin"]) as c:
        for setting, reason in bad.items():
            r = c.patch("policies/hourly", json={"quiesce": setting})
            assert r.status_code == 422, setting
            assert reason in r.json()["message"], r.json()["message"]
        good = "postgresql:host=/run/postgresql port=5432 user=postgres;on_failure=skip"
        r = c.patch("policies/hourly", json={"quiesce": good})
        assert r.status_code == 200 and r.json()["quiesce"] == good
    with api_client(ctx, world["tokens"]["agent"]) as c:
        jobs = c.post("agent/work").json()["jobs"]
    assert [j["quiesce"] for j in jobs] == [good]
