"""Shared by the vault's API tests: a vault in a temporary directory, credentials, snapshots, an
in-process HTTP client and a real HTTPS server in a thread."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from dingyuan.catalog.models import Host
from dingyuan.catalog.rebuild import rebuild_catalog
from dingyuan.repository.backup import backup
from dingyuan.vault.app import create_app
from dingyuan.vault.auth import issue_token
from dingyuan.vault.config import VaultConfig, init_vault
from dingyuan.vault.context import VaultContext
from dingyuan.vault.server import VaultServer

PASSPHRASE = b"vault-api-test"


def make_vault(tmp_path: Path) -> VaultConfig:
    return init_vault(tmp_path / "vault", PASSPHRASE)


def new_token(ctx: VaultContext, role: str, host: str | None = None) -> str:
    """A service token with ``role``, or an agent token of ``host`` (created if needed)."""
    with Session(ctx.engine) as session, session.begin():
        h = None
        if host is not None:
            h = session.scalars(select(Host).where(Host.name == host)).first()
            if h is None:
                h = Host(name=host)
                session.add(h)
                session.flush()
        _, secret = issue_token(session, role, host=h)
    return secret


def make_snapshot(ctx: VaultContext, tmp_path: Path, host: str, volume: str, seed: int = 0) -> str:
    """A snapshot of a small file as ``host:volume``, indexed in the catalog; returns its id."""
    src = tmp_path / f"{host}-{volume}-{seed}.img"
    src.write_bytes(os.urandom(16 << 10) + bytes([seed]) * (48 << 10))
    result = backup(ctx.repo, str(src), volume, host=host, chunk_size=16 << 10)
    rebuild_catalog(ctx.repo, ctx.engine)
    return str(result.snapshot.id)


class _PortalTransport(httpx.BaseTransport):
    """Runs an ASGI app for a synchronous httpx client, in an anyio blocking portal."""

    def __init__(self, app: Any, portal: anyio.from_thread.BlockingPortal) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def go() -> httpx.Response:
            response = await self.inner.handle_async_request(request)
            body = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=body)

        return self.portal.call(go)


@contextmanager
def api_client(ctx: VaultContext, token: str | None = None) -> Iterator[httpx.Client]:
    """An httpx client of an in-process app over ``ctx`` (base URL http://testserver/api/v1/)."""
    app = create_app(ctx)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        httpx.Client(
            transport=_PortalTransport(app, portal), base_url="http://testserver/api/v1/", headers=headers
        ) as client,
    ):
        yield client


def serving(ctx: VaultContext) -> AbstractContextManager[VaultServer]:
    """A real HTTPS server over ``ctx`` on 127.0.0.1 and a free port, in a thread."""
    return _serving(ctx)


@contextmanager
def _serving(ctx: VaultContext) -> Iterator[VaultServer]:
    server = VaultServer(ctx, "127.0.0.1", 0, log_level="warning")
    thread = threading.Thread(target=server.run, name="vault-server", daemon=True)
    thread.start()
    try:
        assert server.started.wait(15), "the vault server did not start"
        yield server
    finally:
        server.stop()
        thread.join(15)
        assert not thread.is_alive(), "the vault server did not stop"
