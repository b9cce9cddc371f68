"""The vault's HTTP API: a FastAPI application over one :class:`VaultContext`.

Every route lives under ``/api/v1`` (:data:`API_PREFIX`); the OpenAPI document is at
``/api/v1/openapi.json`` and the interactive docs at ``/api/v1/docs``. Request bodies of the
built-in routes are limited to :data:`MAX_BODY` (413 beyond). Errors are JSON
``{"error": <kind>, "message": <what happened and what to do>}`` with a fitting status:

==========================================================  ======
unauthenticated (no, malformed, unknown, revoked, expired)   401
forbidden (role)                                             403
not_found, snapshot_not_found, clone_not_found               404
conflict, retention_locked, retention_lock_kept, locked,     409
clone_busy, export_error
invalid_request (validation), usage_error                    422
storage errors                                               503
==========================================================  ======

Bad input never reaches a handler unchecked, so it never makes a 500. Refusals are audited
here (:func:`dingyuan.vault.auth.record_refusal`): every 401 and 403, and every failed
mutating call.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import (
    AmbiguousSnapshot,
    ApiError,
    CloneBusy,
    CloneNotFound,
    DingyuanError,
    ExportError,
    IncompleteSnapshot,
    JobConflict,
    LockedError,
    ObjectExists,
    PolicyError,
    RepositoryNotFound,
    RetentionLocked,
    SessionNotFound,
    SnapshotNotFound,
    StorageError,
    UploadRejected,
    UsageError,
)
from ..protocol import MAX_UPLOAD_BYTES
from .api import (
    agent,
    audit,
    boots,
    clones,
    enroll,
    exports,
    hosts,
    jobs,
    policies,
    restore,
    snapshots,
    system,
    tokens,
    transfer,
    users,
    volumes,
)
from .auth import API_PREFIX, MUTATING, get_context, record_refusal
from .context import VaultContext

__all__ = ["API_PREFIX", "MAX_BODY", "ROUTERS", "create_app", "error_kind", "status_of"]

#: the largest request body the built-in routes accept (extra routers set their own limits)
MAX_BODY = 1 << 20
ROUTERS: tuple[APIRouter, ...] = (
    system.router,
    enroll.router,
    agent.router,
    hosts.router,
    volumes.router,
    policies.router,
    snapshots.router,
    restore.router,
    jobs.router,
    users.router,
    tokens.router,
    clones.router,
    exports.router,
    boots.router,
    audit.router,
)
log = logging.getLogger(__name__)

_STATUS: tuple[tuple[type[DingyuanError], int], ...] = (
    (SnapshotNotFound, 404),
    (RepositoryNotFound, 404),
    (RetentionLocked, 409),
    (LockedError, 409),
    (AmbiguousSnapshot, 409),
    (ObjectExists, 409),
    (UsageError, 422),
    (SessionNotFound, 404),
    (IncompleteSnapshot, 409),
    (JobConflict, 409),
    (UploadRejected, 422),
    (PolicyError, 422),
    (CloneNotFound, 404),
    (CloneBusy, 409),
    (ExportError, 409),
    (StorageError, 503),
)
_HTTP_KINDS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def status_of(e: DingyuanError) -> int:
    """The HTTP status of an error: its own for API errors, else by its kind (500 if unknown)."""
    if isinstance(e, ApiError):
        return e.status
    return next((status for cls, status in _STATUS if isinstance(e, cls)), 500)


def error_kind(e: BaseException) -> str:
    """``RetentionLocked`` -> ``retention_locked``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(e).__name__).lower()


async def _refused(request: Request, status: int, kind: str, message: str) -> None:
    """Audit a refusal: every 401 and 403, and any failed mutating call. A failing audit write is
    logged; the refusal stands."""
    if status not in (401, 403) and request.method not in MUTATING:
        return
    try:
        await run_in_threadpool(record_refusal, request, get_context(request).engine, status, kind, message)
    except Exception:
        log.exception("could not write the audit event of a refused %s %s", request.method, request.url.path)


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message}, status_code=status, headers=headers)


async def _on_dingyuan_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DingyuanError)
    status, kind, message = status_of(exc), error_kind(exc), str(exc)
    if status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, message)
    await _refused(request, status, kind, message)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return _error(status, kind, message, headers)


def _location(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc) or "request"


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()
    ]
    message = "invalid request: " + "; ".join(f"{_location(d['loc'])}: {d['msg']}" for d in details)
    await _refused(request, 422, "invalid_request", message)
    return JSONResponse({"error": "invalid_request", "message": message, "details": details}, status_code=422)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = _HTTP_KINDS.get(exc.status_code, "http_error")
    message = str(exc.detail)
    if exc.status_code == 404:
        message = f"no such route {request.url.path}; the API is described at {API_PREFIX}/docs"
    await _refused(request, exc.status_code, kind, message)
    return _error(exc.status_code, kind, message, dict(exc.headers or {}))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette's ServerErrorMiddleware calls this, then re-raises so the server logs the traceback
    await _refused(request, 500, "internal_error", f"{type(exc).__name__}: {exc}")
    return _error(500, "internal_error", "the vault failed unexpectedly; its log has the details")


def create_app(ctx: VaultContext, extra_routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The API over ``ctx``. ``extra_routers`` (other subsystems' routes, with paths relative to
    ``/api/v1``) are mounted next to the built-in ones and share their auth, errors and audit."""
    app = FastAPI(
        title="dingyuan vault",
        version=__version__,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.ctx = ctx
    app.add_exception_handler(DingyuanError, _on_dingyuan_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
    for router in ROUTERS:
        app.include_router(router, prefix=API_PREFIX, max_body_size=MAX_BODY)
    # uploads stream their frames and check their own limit
    app.include_router(transfer.router, prefix=API_PREFIX, max_body_size=MAX_UPLOAD_BYTES)
    for router in extra_routers:
        app.include_router(router, prefix=API_PREFIX)
    return app
