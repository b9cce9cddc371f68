"""Security acceptance of the vault's API over real HTTPS (a server on 127.0.0.1 in a thread):
credentials, one-time enrollment, an agent confined to its host, retention locks that refuse even
an admin, plaintext HTTP refused; and every refusal is in the audit log."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from dingyuan.repository.manifest import utcnow
from dingyuan.vault.context import VaultContext, open_vault_context
from dingyuan.vault.local import create_first_admin
from dingyuan.vault.server import GRACEFUL_SECONDS, VaultServer
from vaultkit import PASSPHRASE, make_snapshot, make_vault, new_token, serving


@dataclass
class Served:
    ctx: VaultContext
    server: VaultServer
    url: str
    verify: ssl.SSLContext
    admin: str
    snapshots: dict[str, str]  # name -> id

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, verify=self.verify, headers=headers, timeout=30)

    def audit(self) -> list[dict[str, Any]]:
        with self.client(self.admin) as c:
            r = c.get("audit", params={"limit": 1000})
        assert r.status_code == 200, r.text
        events: list[dict[str, Any]] = r.json()
        return events


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    cfg = make_vault(tmp_path)
    ctx = open_vault_context(cfg.dir, PASSPHRASE)
    snaps = {
        "web1-data": make_snapshot(ctx, tmp_path, "web1", "data", 1),
        "web1-locked": make_snapshot(ctx, tmp_path, "web1", "logs", 2),
        "web2-root": make_snapshot(ctx, tmp_path, "web2", "root", 3),
    }
    locked = ctx.repo.read_snapshot(snaps["web1-locked"])
    locked.retention_until = utcnow() + timedelta(days=30)
    ctx.repo.update_snapshot(locked)
    from dingyuan.catalog.rebuild import rebuild_catalog

    rebuild_catalog(ctx.repo, ctx.engine)
    admin = new_token(ctx, "admin")
    try:
        with serving(ctx) as server:
            verify = ssl.create_default_context(cafile=str(cfg.tls_ca_cert))
            yield Served(ctx, server, server.url, verify, admin, snaps)
    finally:
        ctx.close()


def _refusals(events: list[dict[str, Any]], action: str, status: int) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e["action"] == action and e["outcome"] == "denied" and e["detail"]["status"] == status
    ]


def _enroll(s: Served, host: str) -> str:
    with s.client(s.admin) as c:
        r = c.post("enrollments", json={"host": host})
    assert r.status_code == 201, r.text
    token: str = r.json()["token"]
    with s.client() as c:
        # the agent pins the CA by the fingerprint inside its token before trusting the vault
        pem = httpx.get(s.url + "ca", verify=False).content
        assert token.split(".")[1] == x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()
        r = c.post("enroll", json={"token": token, "hostname": host, "agent_version": "0.1.0"})
    assert r.status_code == 200, r.text
    agent: str = r.json()["token"]
    return agent


def test_requests_without_a_valid_token_are_refused_and_audited(served: Served) -> None:
    revoked = new_token(served.ctx, "viewer")
    with served.client(served.admin) as c:
        token_id = next(t["id"] for t in c.get("tokens").json() if t["role"] == "viewer")
        assert c.delete(f"tokens/{token_id}").status_code == 204
    cases = {
        "no token": {},
        "unknown token": {"Authorization": "Bearer dyt_" + secrets.token_urlsafe(32)},
        "malformed token": {"Authorization": "Bearer hunter2"},
        "not bearer": {"Authorization": "Basic YWRtaW46YWRtaW4="},
        "revoked token": {"Authorization": f"Bearer {revoked}"},
    }
    with served.client() as c:
        for name, headers in cases.items():
            r = c.get("hosts", headers=headers)
            assert r.status_code == 401, name
            assert r.headers["www-authenticate"].startswith("Bearer"), name
            assert r.json()["error"] == "unauthenticated", name
    refused = _refusals(served.audit(), "GET /api/v1/hosts", 401)
    assert len(refused) == len(cases)
    assert all(e["actor"] == "anonymous" and e["target"] == "/api/v1/hosts" for e in refused)
    reasons = " | ".join(e["detail"]["reason"] for e in refused)
    for words in ("no credentials", "unknown API token", "malformed", "revoked"):
        assert words in reasons


def test_an_enrollment_token_works_once(served: Served) -> None:
    with served.client(served.admin) as c:
        token = c.post("enrollments", json={"host": "web3"}).json()["token"]
    body = {"token": token, "hostname": "web3", "agent_version": "0.1.0"}
    with served.client() as c:
        first = c.post("enroll", json=body)
        again = c.post("enroll", json=body)
    assert first.status_code == 200
    assert again.status_code == 401 and "already used" in again.json()["message"]
    assert first.json()["repository_id"] == served.ctx.repo.id
    assert bytes.fromhex(first.json()["id_key"]) == served.ctx.repo.cipher.id_key
    with served.client(first.json()["token"]) as agent:
        assert [h["name"] for h in agent.get("hosts").json()] == ["web3"]
    refused = _refusals(served.audit(), "POST /api/v1/enroll", 401)
    assert len(refused) == 1 and "already used" in refused[0]["detail"]["reason"]


def test_an_agent_cannot_delete_unlock_or_read_another_host(served: Served) -> None:
    agent = _enroll(served, "web1")
    with served.client(served.admin) as c:
        volumes = {(v["host"], v["name"]): v["id"] for v in c.get("volumes").json()}
    own, other = served.snapshots["web1-data"], served.snapshots["web2-root"]
    with served.client(agent) as c:
        # its own host's data is readable
        assert c.get(f"snapshots/{own}").status_code == 200
        assert {s["host"] for s in c.get("snapshots").json()} == {"web1"}
        assert c.get(f"volumes/{volumes[('web1', 'data')]}").status_code == 200
        # everything else is refused
        assert c.delete(f"snapshots/{own}").status_code == 403
        assert c.post(f"snapshots/{served.snapshots['web1-locked']}/unlock").status_code == 403
        assert c.get(f"volumes/{volumes[('web2', 'root')]}").status_code == 403
        assert c.get(f"snapshots/{other}").status_code == 403
        assert c.get("volumes", params={"host": "web2"}).status_code == 403
        assert c.get("hosts/web2").status_code == 403
        assert (
            c.post("policies", json={"name": "p", "schedule": "interval", "interval_seconds": 60}).status_code
            == 403
        )
        assert c.get("audit").status_code == 403
    assert own in served.ctx.repo.snapshot_names()

    events = served.audit()
    for action in (
        "DELETE /api/v1/snapshots/{snapshot_id}",
        "POST /api/v1/snapshots/{snapshot_id}/unlock",
        "GET /api/v1/volumes/{volume_id}",
        "GET /api/v1/snapshots/{snapshot_id}",
        "GET /api/v1/hosts/{name}",
        "POST /api/v1/policies",
        "GET /api/v1/audit",
    ):
        refused = _refusals(events, action, 403)
        assert refused and all(e["actor"] == "host:web1" for e in refused), action
    delete = _refusals(events, "DELETE /api/v1/snapshots/{snapshot_id}", 403)[0]
    assert delete["target"] == f"/api/v1/snapshots/{own}"


def test_a_retention_locked_snapshot_is_not_deleted_even_by_an_admin(served: Served) -> None:
    locked, free = served.snapshots["web1-locked"], served.snapshots["web1-data"]
    with served.client(served.admin) as c:
        r = c.delete(f"snapshots/{locked}")
        assert r.status_code == 409 and r.json()["error"] == "retention_locked"
        assert c.post(f"snapshots/{locked}/unlock").status_code == 409
        assert c.post(f"snapshots/{locked}/lock", json={"for_seconds": 60}).status_code == 409  # shorter
        assert c.get(f"snapshots/{locked}").json()["retention_until"] is not None
        assert c.delete(f"snapshots/{free}").status_code == 204
        assert c.get(f"snapshots/{free}").status_code == 404
    names = served.ctx.repo.snapshot_names()
    assert locked in names and free not in names

    events = served.audit()
    refused = _refusals(events, "DELETE /api/v1/snapshots/{snapshot_id}", 409)
    assert len(refused) == 1 and refused[0]["detail"]["error"] == "retention_locked"
    assert refused[0]["actor"].startswith("token:") and locked[:12] in refused[0]["detail"]["reason"]
    assert _refusals(events, "POST /api/v1/snapshots/{snapshot_id}/unlock", 409)
    deleted = [e for e in events if e["target"] == f"snapshot:{free}" and e["outcome"] == "ok"]
    assert [e["action"] for e in deleted] == ["DELETE /api/v1/snapshots/{snapshot_id}"]


def test_plaintext_http_is_refused_with_a_clear_message_and_audited(served: Served) -> None:
    plain = served.url.replace("https://", "http://")
    r = httpx.get(plain + "health", timeout=10)
    assert r.status_code == 400
    assert f"this vault only speaks HTTPS: use https://127.0.0.1:{served.server.port}/" in r.text
    with socket.create_connection(("127.0.0.1", served.server.port), timeout=10) as sock:
        sock.sendall(b"DELETE /api/v1/snapshots/x HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ") and b"only speaks HTTPS" in answer
    # TLS still works after refusals
    with served.client() as c:
        assert c.get("health").json()["status"] == "ok"
    deadline = time.monotonic() + 10
    while True:  # the audit write runs in a worker thread after the answer
        events = [e for e in served.audit() if e["action"] == "plaintext-http"]
        if len(events) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(events) == 2
    assert all(e["actor"] == "anonymous" and e["outcome"] == "denied" for e in events)
    assert {e["detail"]["request"] for e in events} == {
        "GET /api/v1/health HTTP/1.1",
        "DELETE /api/v1/snapshots/x HTTP/1.0",
    }


def test_tls_1_2_is_the_minimum(served: Served) -> None:
    assert served.server.ssl_ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    tls12 = ssl.create_default_context(cafile=str(served.ctx.cfg.tls_ca_cert))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with httpx.Client(verify=tls12) as c:
        assert c.get(served.url + "health").status_code == 200


def test_vault_serve_prints_its_url_and_stops_on_sigterm_without_waiting_for_agents(tmp_path: Path) -> None:
    cfg = make_vault(tmp_path)
    token = create_first_admin(cfg).read_text().strip()
    env = {**os.environ, "DINGYUAN_PASSPHRASE": PASSPHRASE.decode(), "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "dingyuan.cli.main", "vault", "serve", "--dir", str(cfg.dir)]
    command += ["--listen", "127.0.0.1:0", "--log-level", "warning"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert first.startswith("vault API at https://127.0.0.1:"), first
            url = first.split()[3]
            assert cfg.ca_fingerprint() in proc.stdout.readline()
            verify = ssl.create_default_context(cafile=str(cfg.tls_ca_cert))
            # an agent keeps its connection open between requests: the stop must not wait for it
            with httpx.Client(verify=verify, headers={"Authorization": f"Bearer {token}"}) as agent:
                assert agent.get(url + "hosts").status_code == 200
                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                out, err = proc.communicate(timeout=30)
                took = time.monotonic() - started
            assert proc.returncode == 0, err
            assert "vault stopped" in out
            assert took < GRACEFUL_SECONDS / 2, f"the vault took {took:.1f} s to stop"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
