"""The vault's REST API as the agent uses it (httpx over TLS, the vault CA pinned)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import httpx

from .. import __version__
from ..errors import (
    IncompleteSnapshot,
    SessionNotFound,
    TransferError,
    UploadRejected,
    VaultRefused,
    VaultUnreachable,
)
from ..protocol import API
from ..repository.backends.base import Buffer

_KINDS: dict[str, type[TransferError]] = {
    "incomplete_snapshot": IncompleteSnapshot,
    "session_not_found": SessionNotFound,
    "upload_rejected": UploadRejected,
}


def tls_context(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class VaultClient:
    """One vault, one credential. Thread-safe (httpx's connection pool)."""

    def __init__(
        self, url: str, token: str | None, ca: Path | None, timeout: float = 60.0, user_agent: str = "agent"
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"User-Agent": f"dingyuan-{user_agent}/{__version__}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(
            base_url=self.url + API,
            verify=tls_context(ca) if ca else True,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=8),
        )

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise VaultUnreachable(url=self.url, detail=str(e) or type(e).__name__) from None
        if r.status_code >= 400:
            try:
                doc = r.json()
                kind, message = str(doc.get("error", "")), str(doc.get("message", r.text))
            except ValueError:
                kind, message = "", r.text[:500]
            if kind in _KINDS:
                err = _KINDS[kind](detail=message)
                err.args = (message,)
                raise err
            raise VaultRefused(status=r.status_code, method=method, path=path, detail=message)
        return r

    # transfer -----------------------------------------------------------------------------------
    def start_session(self, volume: str, size: int, chunk_size: int, job_id: int | None) -> dict[str, Any]:
        body = {"volume": volume, "size": size, "chunk_size": chunk_size, "job": job_id}
        doc: dict[str, Any] = self.call("POST", "/sessions", json=body).json()
        return doc

    def missing(self, sid: str, ids: list[bytes]) -> list[int]:
        r = self.call(
            "POST",
            f"/sessions/{sid}/missing",
            content=b"".join(ids),
            headers={"Content-Type": "application/octet-stream"},
        )
        return [int(i) for i in r.json()["missing"]]

    def upload(self, sid: str, parts: list[Buffer]) -> dict[str, Any]:
        body = b"".join(parts)
        r = self.call(
            "POST",
            f"/sessions/{sid}/blobs",
            content=body,
            headers={"Content-Type": "application/octet-stream"},
        )
        doc: dict[str, Any] = r.json()
        return doc

    def commit(self, sid: str, info: dict[str, Any]) -> dict[str, Any]:
        doc: dict[str, Any] = self.call("POST", f"/sessions/{sid}/commit", json=info).json()
        return doc

    def abort(self, sid: str) -> None:
        self.call("DELETE", f"/sessions/{sid}")

    # work ---------------------------------------------------------------------------------------
    def work(self) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self.call("POST", "/agent/work").json()["jobs"]
        return jobs

    def progress(self, job_id: int, done: int, total: int) -> None:
        self.call("POST", f"/agent/jobs/{job_id}/progress", json={"done": done, "total": total})

    def fail(self, job_id: int, error: str) -> None:
        self.call("POST", f"/agent/jobs/{job_id}/fail", json={"error": error[:2000]})
