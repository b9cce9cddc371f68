"""Bad input to every endpoint of the vault's API: schemathesis (v4) generates requests from the
served OpenAPI document (valid ones and invalid ones) against an in-process app, once with an
admin's token and once with an agent's (whose upload sessions are live); hypothesis drives each
operation. No response may be a 5xx, and the repository must be
unchanged afterwards (the same snapshots with the same notes)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from sqlalchemy import select
from sqlalchemy.orm import Session

from dingyuan.catalog.models import Host, Token
from dingyuan.vault.app import create_app
from dingyuan.vault.auth import hash_secret, new_api_token
from dingyuan.vault.context import VaultContext, open_vault_context
from dingyuan.vault.exports import EXTRA as EXPORTS
from dingyuan.vault.exports import ExportService
from dingyuan.vault.ingest import Ingest
from vaultkit import PASSPHRASE, make_snapshot, make_vault

#: the fuzzing admin token's id: far from the small ids a generated DELETE /tokens/{id} may
#: revoke (which would only leave the rest of the run testing the 401 path)
FUZZ_TOKEN_ID = 1_987_654_321
EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 25}


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[VaultContext]:
    cfg = make_vault(tmp_path)
    c = open_vault_context(cfg.dir, PASSPHRASE)
    ingest = c.extras["ingest"] = Ingest(c.repo, tmp_path / "spool")  # upload sessions are live
    exports = c.extras[EXPORTS] = ExportService(c, nbd_listen=("127.0.0.1", 0))  # so are exports and clones
    exports.start()
    yield c
    exports.stop()
    ingest.close()
    c.close()


def _repository_state(ctx: VaultContext) -> dict[str, Any]:
    snaps = {s.id: s for s in ctx.repo.snapshots()}
    return {
        "snapshots": {sid: (s.retention_until, s.annotations) for sid, s in snaps.items()},
        "notes": sorted(ctx.repo.note_names()),
    }


@pytest.mark.parametrize("role", ["admin", "agent"])
def test_no_input_makes_a_server_error_or_changes_the_repository(
    ctx: VaultContext, tmp_path: Path, role: str
) -> None:
    make_snapshot(ctx, tmp_path, "web1", "data", 1)
    make_snapshot(ctx, tmp_path, "web2", "root", 2)
    locked = ctx.repo.snapshots()[0]
    locked.retention_until = locked.time.replace(year=locked.time.year + 1)
    ctx.repo.update_snapshot(locked)
    before = _repository_state(ctx)

    token = new_api_token()
    with Session(ctx.engine) as session, session.begin():
        # an agent's token is that of web1, which has a volume: its upload sessions can open
        host = session.scalars(select(Host).where(Host.name == "web1")).one() if role == "agent" else None
        session.add(
            Token(
                id=FUZZ_TOKEN_ID,
                role=role,
                host_id=host.id if host else None,
                secret_hash=hash_secret(token),
                revoked=False,
            )
        )
    headers = {"Authorization": f"Bearer {token}"}

    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", create_app(ctx))
    started = time.monotonic()
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode, examples in EXAMPLES.items():

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def call(case: Any) -> None:
                response = case.call(headers=headers)
                assert response.status_code < 500, (
                    f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text}"
                )
                if response.status_code >= 400:  # every error is {"error": kind, "message": text}
                    body = json.loads(response.text)
                    assert {"error", "message"} <= body.keys(), body

            try:
                call()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # an operation without inputs to break
    assert operations >= 25  # every route was exercised
    assert _repository_state(ctx) == before
    assert time.monotonic() - started < 120
