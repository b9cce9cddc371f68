"""The sending side of the transfer protocol: a :class:`BlobSink` that uploads to a vault.

Chunk lookups ask the vault which ids it lacks (one request per scan batch); new blobs are
framed (docs/protocols.md) into upload requests of about ``UPLOAD_BYTES``, sent by background
threads, at most ``INFLIGHT`` at a time and no faster than the policy's bandwidth limit. A request
is small so that a dropped connection or a killed process loses little: the vault keeps every
whole frame it received.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from ..protocol import frame_header
from ..repository.backends.base import Buffer
from ..repository.format import BlobType, Codec
from .client import VaultClient

log = logging.getLogger("dingyuan.agent")

UPLOAD_BYTES = 512 << 10
INFLIGHT = 2


class RateLimiter:
    """At most ``rate`` bytes per second on average (a request may burst)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self, nbytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + nbytes / self.rate
        if start > now:
            time.sleep(start - now)


class UploadSink:
    """New blobs of one session go to the vault; use as a context manager."""

    def __init__(
        self,
        client: VaultClient,
        session: str,
        id_key: bytes,
        limiter: RateLimiter | None = None,
        upload_bytes: int = UPLOAD_BYTES,
    ) -> None:
        self.client = client
        self.session = session
        self.id_key = id_key
        self.limiter = limiter
        self.upload_bytes = upload_bytes
        self.bytes_sent = 0
        self._stored = 0
        self._claimed: set[bytes] = set()
        self._claim_lock = threading.Lock()
        self._parts: list[Buffer] = []
        self._size = 0
        self._queue: queue.Queue[list[Buffer] | None] = queue.Queue(maxsize=INFLIGHT)
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._loop, name=f"upload-{i}", daemon=True) for i in range(INFLIGHT)
        ]
        for t in self._threads:
            t.start()

    @property
    def bytes_stored(self) -> int:
        return self._stored

    def present(self, ids: list[bytes]) -> set[bytes]:
        lacking = {ids[i] for i in self.client.missing(self.session, ids)}
        return {bid for bid in ids if bid not in lacking}

    def claim(self, bid: bytes) -> bool:
        with self._claim_lock:
            if bid in self._claimed:
                return False
            self._claimed.add(bid)
            return True

    def seal(self, bid: bytes, btype: BlobType, payload: Buffer) -> Buffer:
        return bytes(payload)  # the vault encrypts; the scan's buffer is reused

    def add(self, bid: bytes, btype: BlobType, codec: Codec, raw_length: int, stored: Buffer) -> None:
        if self._error is not None:
            raise self._error
        self._parts.append(frame_header(bid, btype, codec, raw_length, len(stored)))
        self._parts.append(stored)
        self._size += len(stored)
        self._stored += len(stored)
        if self._size >= self.upload_bytes:
            self._ship()

    def node_is_new(self, nid: bytes) -> bool:
        return self.claim(nid)

    def _ship(self) -> None:
        if self._parts:
            self._queue.put(self._parts)
            self._parts, self._size = [], 0

    def _loop(self) -> None:
        while True:
            parts = self._queue.get()
            try:
                if parts is None:
                    return
                if self._error is None:
                    nbytes = sum(len(p) for p in parts)
                    if self.limiter:
                        self.limiter.wait(nbytes)
                    log.debug("upload: sending %d bytes", nbytes)
                    self.bytes_sent += nbytes
                    self.client.upload(self.session, parts)
            except BaseException as e:  # handed to the scanning thread
                self._error = e
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        self._ship()
        self._queue.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()

    def __enter__(self) -> UploadSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
