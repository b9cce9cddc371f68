"""HTTPS to the vault with the standard library: the vault's CA pinned, one connection per thread.

Errors: the vault's JSON errors become :class:`VaultRefused` (its status and message); a
connection that cannot be made or breaks becomes :class:`TransferError` naming the vault. An
idempotent request (every one here but enrollment) is sent once more on a fresh connection when a
kept-alive connection turns out closed.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode, urlsplit

from .. import __version__
from ..errors import TransferError, UsageError, VaultRefused

API = "/api/v1"
TIMEOUT = 300.0  # a compare may read a few hundred MiB on the vault
USER_AGENT = f"dingyuan-rescue/{__version__}"


def split_url(url: str) -> tuple[str, int]:
    """(host, port) of an ``https://HOST[:PORT]`` vault URL."""
    parts = urlsplit(url.strip())
    if parts.scheme != "https" or not parts.hostname:
        raise UsageError(f"the vault's URL looks like https://HOST:PORT, not {url!r}")
    try:
        port = parts.port or 443
    except ValueError:
        raise UsageError(f"the port in {url!r} is not a number") from None
    return parts.hostname, port


def pinned_context(ca_pem: str) -> ssl.SSLContext:
    """A TLS context that trusts the vault's CA alone and checks the vault's name."""
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def unverified_context() -> ssl.SSLContext:
    """For fetching the CA only: the caller pins it by its fingerprint before trusting anything."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Vault:
    """One vault, one credential (or none, to enroll). Thread-safe: each thread has a connection."""

    def __init__(self, url: str, token: str | None, ctx: ssl.SSLContext, timeout: float = TIMEOUT) -> None:
        self.url = url.strip().rstrip("/")
        self.host, self.port = split_url(self.url)
        self.ctx = ctx
        self.timeout = timeout
        self.headers = {"User-Agent": USER_AGENT}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self._local = threading.local()

    def _connection(self, fresh: bool) -> http.client.HTTPSConnection:
        conn: http.client.HTTPSConnection | None = getattr(self._local, "conn", None)
        if conn is not None and fresh:
            conn.close()
            conn = None
        if conn is None:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.ctx)
            self._local.conn = conn
        return conn

    def _unreachable(self, e: BaseException) -> TransferError:
        if isinstance(e, ssl.SSLCertVerificationError):
            detail = f"its certificate is not the enrolled vault's ({e.verify_message})"
        else:
            detail = str(e) or type(e).__name__
        return TransferError(
            f"cannot talk to the vault at {self.url}: {detail}. Check the address, the network and "
            "that the vault runs"
        )

    @contextmanager
    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = "", retry: bool = True
    ) -> Iterator[http.client.HTTPResponse]:
        """The response to ``method API+path`` (status < 400), to read inside the ``with``."""
        headers = dict(self.headers)
        if content_type:
            headers["Content-Type"] = content_type
        for attempt in (0, 1):
            conn = self._connection(fresh=attempt > 0)
            try:
                conn.request(method, API + path, body=body, headers=headers)
                r = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                conn.close()
                if attempt == 0 and retry:
                    continue  # a kept-alive connection the vault had closed
                raise self._unreachable(e) from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise self._unreachable(e) from None
            break
        try:
            if r.status >= 400:
                raise self._refused(method, path, r)
            yield r
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise self._unreachable(e) from None
        finally:
            if not r.isclosed():  # not read to the end (an error above): the connection is unusable
                conn.close()

    def _refused(self, method: str, path: str, r: http.client.HTTPResponse) -> VaultRefused:
        text = r.read(64 << 10).decode("utf-8", "replace")
        try:
            message = str(json.loads(text).get("message", text))
        except (ValueError, AttributeError):
            message = text[:500] or r.reason
        if r.status == 401 and "Authorization" in self.headers:
            message += (
                ". Enroll again with a new token ('dingyuan vault enroll-token HOST' on the vault); "
                "any later enrollment of the host revokes this one"
            )
        return VaultRefused(status=r.status, method=method, path=API + path, detail=message)

    def get_json(self, path: str, **params: Any) -> Any:
        query = "?" + urlencode({k: v for k, v in params.items() if v is not None}) if params else ""
        with self.request("GET", path + query) as r:
            return _json(r.read(), path)

    def post_json(self, path: str, doc: Any, retry: bool = True) -> Any:
        with self.request("POST", path, json.dumps(doc).encode(), "application/json", retry) as r:
            return _json(r.read(), path)

    def post_bytes(self, path: str, body: bytes) -> Any:
        with self.request("POST", path, body, "application/octet-stream") as r:
            return _json(r.read(), path)

    def get_text(self, path: str) -> str:
        with self.request("GET", path) as r:
            return r.read().decode("utf-8", "replace")

    @contextmanager
    def stream(self, path: str, **params: Any) -> Iterator[Callable[[int], bytes]]:
        """``read(n)`` over the body of ``GET API+path?params``."""
        with self.request("GET", f"{path}?{urlencode(params)}") as r:
            yield r.read


def _json(raw: bytes, path: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise TransferError(f"the vault's answer to {API + path} is not JSON: {raw[:200]!r}") from None
