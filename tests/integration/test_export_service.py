"""The vault's export service with one of its two listeners off: what it serves, and what it
says for the other protocol."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from dingyuan.errors import ExportError
from dingyuan.vault.context import open_vault_context
from dingyuan.vault.exports import ExportService
from vaultkit import PASSPHRASE, make_snapshot, make_vault


def test_an_iscsi_only_vault_serves_iscsi_and_says_how_to_serve_nbd(tmp_path: Path) -> None:
    ctx = open_vault_context(make_vault(tmp_path).dir, PASSPHRASE)
    snapshot = ctx.repo.resolve(make_snapshot(ctx, tmp_path, "h1", "disk"))
    service = ExportService(ctx, nbd_listen=None, iscsi_listen=("127.0.0.1", 0))
    service.start()
    try:
        assert service.listening("nbd") is None and service.listening("iscsi") is not None
        with Session(ctx.engine) as session, session.begin():
            row = service.create(
                session,
                snapshot=snapshot,
                clone=None,
                writable=False,
                allowed_clients=None,
                actor="t",
                protocol="iscsi",
            )
            uri = service.uri(row)
            with pytest.raises(ExportError, match="--nbd-listen"):
                service.create(
                    session, snapshot=snapshot, clone=None, writable=False, allowed_clients=None, actor="t"
                )
        inq = subprocess.run(["iscsi-inq", uri], capture_output=True, text=True, timeout=30)
        assert inq.returncode == 0 and "DINGYUAN" in inq.stdout, inq.stderr
    finally:
        service.stop()
        ctx.close()
