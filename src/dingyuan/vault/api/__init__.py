"""The vault's API routers, one module per resource; :func:`dingyuan.vault.app.create_app` mounts
them under ``/api/v1``. Handlers stay small: they check input (schemas), the caller
(:func:`dingyuan.vault.auth.require`) and then call the catalog and the repository."""

from __future__ import annotations

from typing import Any

from ..schemas import ErrorOut

#: error responses every authenticated route may give, for the OpenAPI document
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "No, malformed, unknown, revoked or expired credential"},
    403: {"model": ErrorOut, "description": "The credential's role may not do this"},
    404: {"model": ErrorOut, "description": "No such object"},
    409: {"model": ErrorOut, "description": "Conflicts with the current state (e.g. retention-locked)"},
}
