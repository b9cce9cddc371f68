"""``GET /health`` and ``GET /ca``: the two routes that need no credential."""

from __future__ import annotations

from fastapi import APIRouter, Response

from ... import __version__
from ..auth import ContextDep
from ..schemas import Health

router = APIRouter(tags=["system"])


@router.get("/health")
def health() -> Health:
    """The vault answers; no credential needed."""
    return Health(status="ok", version=__version__)


@router.get(
    "/ca",
    response_class=Response,
    responses={200: {"content": {"application/x-pem-file": {}}, "description": "The vault CA (PEM)"}},
)
def ca(ctx: ContextDep) -> Response:
    """The vault's CA certificate. An agent checks its SHA-256 against the fingerprint inside its
    enrollment token before it trusts it; no credential needed."""
    return Response(ctx.cfg.tls_ca_cert.read_bytes(), media_type="application/x-pem-file")
