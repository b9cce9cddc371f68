"""Restore over the API, for the rescue tool (docs/protocols.md, "Restore (rescue)").

A server whose disk was replaced is restored from a live system that has nothing but ``python3``:
the rescue tool (:mod:`dingyuan.rescue`) cannot compute BLAKE3 chunk ids, decrypt or decompress
zstd, so the vault does all of that and speaks SHA-256 and zlib instead:

- ``GET /snapshots/{id}/layout``: size, chunk size, chunk count and the request limits;
- ``GET /snapshots/{id}/chunks?start&count``: a chunk stream (:mod:`dingyuan.rescue.frames`), read
  through :class:`SnapshotImage` (every byte verified against its chunk id first); holes cost
  nothing but a frame header;
- ``POST /snapshots/{id}/compare?start``: which of the client's SHA-256 digests differ from the
  snapshot's chunks, for a delta restore. A chunk's SHA-256 is kept by chunk id in a bounded LRU
  (:class:`DigestCache`), so the chunks a restore compares again, or that dedup repeats, are read
  once; holes compare with the digest of zeros without reading anything;
- ``GET /rescue.pyz``: the rescue tool itself (no credential: it holds no secret).

An agent token may use these for its own host's snapshots (a rescue tool enrolls as the host),
administrators and operators for any; viewers may not read disk contents. They change nothing, so
they are not audited (refusals are, as everywhere).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from ...errors import InvalidRequest
from ...repository.format import ZERO_ID
from ...repository.image import SnapshotImage
from ...repository.manifest import Snapshot as RepoSnapshot
from ...rescue import frames
from ...rescue.build import build_bytes
from ..auth import ADMIN, AGENT, OPERATOR, ContextDep, Principal, SessionDep, require
from ..context import VaultContext
from ..schemas import SNAPSHOT_ID_PATTERN
from . import ERRORS
from .lookup import snapshot_by_id

router = APIRouter(tags=["restore"], responses=ERRORS)
Restorer = Annotated[Principal, require(ADMIN, OPERATOR, AGENT)]
SnapshotId = Annotated[str, Path(pattern=SNAPSHOT_ID_PATTERN, description="The full snapshot id (64 hex)")]

EXTRA = "rescue.digests"  # the DigestCache in VaultContext.extras
DIGEST_CACHE_ENTRIES = 1 << 17  # SHA-256 of 131072 chunks (8 GiB of data at 64 KiB), about 30 MiB


class DigestCache:
    """SHA-256 digests of chunks by chunk id, least recently used dropped first; thread-safe.

    A chunk id names its plaintext, so a digest cached under it holds for every snapshot."""

    def __init__(self, capacity: int = DIGEST_CACHE_ENTRIES) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, bid: bytes) -> bytes | None:
        with self._lock:
            digest = self._items.get(bid)
            if digest is not None:
                self._items.move_to_end(bid)
            return digest

    def put(self, bid: bytes, digest: bytes) -> None:
        with self._lock:
            self._items[bid] = digest
            self._items.move_to_end(bid)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


def digest_cache(ctx: VaultContext) -> DigestCache:
    found = ctx.extras.get(EXTRA)
    if isinstance(found, DigestCache):
        return found
    made: DigestCache = ctx.extras.setdefault(EXTRA, DigestCache())
    return made


class Layout(BaseModel):
    id: str
    volume: str
    size: int
    chunk_size: int
    chunks: int
    max_chunks: int  # per chunk stream request
    max_compare: int  # digests per compare request


@contextmanager
def _image(ctx: VaultContext, snapshot_id: str) -> Iterator[SnapshotImage]:
    with SnapshotImage(ctx.repo, ctx.repo.read_snapshot(snapshot_id)) as image:
        yield image


def _check_range(snap: RepoSnapshot, start: int, count: int, limit: int) -> None:
    if count > limit:
        raise InvalidRequest(f"at most {limit} chunks per request at chunk size {snap.chunk_size}")
    if start + count > snap.nchunks:
        raise InvalidRequest(f"chunks {start}..{start + count - 1} are past the end ({snap.nchunks} chunks)")


def _length(snap: RepoSnapshot, i: int) -> int:
    return min(snap.chunk_size, snap.size - i * snap.chunk_size)


def _data_span(ids: list[bytes]) -> tuple[int, int] | None:
    """First and one-past-last position of ``ids`` that is not a hole, or None if all are."""
    data = [n for n, bid in enumerate(ids) if bid != ZERO_ID]
    return (data[0], data[-1] + 1) if data else None


def _chunk_stream(image: SnapshotImage, digests: DigestCache, start: int, count: int) -> list[bytes]:
    """The parts of a chunk stream for chunks ``[start, start + count)``: one verified read of the
    span between the first and the last data chunk; holes are headers alone."""
    snap, cs = image.snap, image.snap.chunk_size
    ids = image.tree.ids_range(start, count)
    span = _data_span(ids)
    data = b""
    if span is not None:
        lo, hi = start + span[0], start + span[1]
        data = image.read(lo * cs, min(hi * cs, snap.size) - lo * cs)
    view = memoryview(data)
    parts = [frames.MAGIC]
    for n, bid in enumerate(ids):
        i = start + n
        if bid == ZERO_ID:
            parts.append(frames.encode_hole(i, _length(snap, i)))
            continue
        assert span is not None
        off = (n - span[0]) * cs
        chunk = view[off : off + _length(snap, i)]
        digest = digests.get(bid)
        if digest is None:
            digest = hashlib.sha256(chunk).digest()
            digests.put(bid, digest)
        parts.extend(frames.encode_data(i, chunk, digest))
    return parts


def _differing(image: SnapshotImage, digests: DigestCache, start: int, theirs: list[bytes]) -> list[int]:
    """Indexes in ``[start, start + len(theirs))`` whose chunk's SHA-256 is not the client's.
    Digests not cached are computed from verified reads of runs of neighbouring chunks."""
    snap, cs = image.snap, image.snap.chunk_size
    ids = image.tree.ids_range(start, len(theirs))
    ours: list[bytes | None] = [
        frames.zero_digest(_length(snap, start + n)) if bid == ZERO_ID else digests.get(bid)
        for n, bid in enumerate(ids)
    ]
    limit = frames.max_stream_chunks(cs)
    n = 0
    while n < len(ours):
        if ours[n] is not None:
            n += 1
            continue
        end = n
        while end < len(ours) and ours[end] is None and end - n < limit:
            end += 1
        lo = start + n
        data = memoryview(image.read(lo * cs, min((start + end) * cs, snap.size) - lo * cs))
        for k in range(n, end):
            digest = hashlib.sha256(data[(k - n) * cs : (k - n) * cs + _length(snap, start + k)]).digest()
            digests.put(ids[k], digest)
            ours[k] = digest
        n = end
    return [start + k for k, (mine, their) in enumerate(zip(ours, theirs, strict=True)) if mine != their]


@router.get("/snapshots/{snapshot_id}/layout")
def layout(snapshot_id: SnapshotId, session: SessionDep, ctx: ContextDep, principal: Restorer) -> Layout:
    """What a restore needs to plan its requests: size, chunk size and count, request limits."""
    _, vol = snapshot_by_id(session, principal, snapshot_id)
    snap = ctx.repo.read_snapshot(snapshot_id)
    return Layout(
        id=snap.id,
        volume=vol.name,
        size=snap.size,
        chunk_size=snap.chunk_size,
        chunks=snap.nchunks,
        max_chunks=frames.max_stream_chunks(snap.chunk_size),
        max_compare=frames.MAX_COMPARE,
    )


@router.get(
    "/snapshots/{snapshot_id}/chunks",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "A chunk stream"}},
)
def chunks(
    snapshot_id: SnapshotId,
    session: SessionDep,
    ctx: ContextDep,
    principal: Restorer,
    start: Annotated[int, Query(ge=0)],
    count: Annotated[int, Query(ge=1, le=frames.MAX_STREAM_CHUNKS)],
) -> Response:
    """Chunks ``[start, start + count)`` as a chunk stream: verified plaintext, zlib where it
    saves, with each chunk's SHA-256; holes as headers alone."""
    snapshot_by_id(session, principal, snapshot_id)
    with _image(ctx, snapshot_id) as image:
        _check_range(image.snap, start, count, frames.max_stream_chunks(image.snap.chunk_size))
        parts = _chunk_stream(image, digest_cache(ctx), start, count)
    return Response(b"".join(parts), media_type="application/octet-stream")


class Differ(BaseModel):
    differ: list[int]


@router.post(
    "/snapshots/{snapshot_id}/compare",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def compare(
    snapshot_id: SnapshotId,
    request: Request,
    session: SessionDep,
    ctx: ContextDep,
    principal: Restorer,
    start: Annotated[int, Query(ge=0)],
) -> Differ:
    """Which chunks from ``start`` on differ from the SHA-256 digests of the body (32 bytes each,
    back to back, at most ``max_compare``): the ones a delta restore fetches."""
    request.state.audited = True  # reads only: not an audit event
    await run_in_threadpool(snapshot_by_id, session, principal, snapshot_id)
    body = await request.body()
    try:
        theirs = frames.unpack_digests(body)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None
    if not theirs:
        raise InvalidRequest("a compare body holds at least one SHA-256 digest")

    def work() -> list[int]:
        with _image(ctx, snapshot_id) as image:
            _check_range(image.snap, start, len(theirs), frames.MAX_COMPARE)
            return _differing(image, digest_cache(ctx), start, theirs)

    return Differ(differ=await run_in_threadpool(work))


@cache
def _rescue_pyz() -> bytes:
    return build_bytes()


@router.get(
    "/rescue.pyz",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}, "description": "dingyuan-rescue.pyz"}},
)
def rescue_pyz() -> Response:
    """The rescue tool as one file for ``python3`` (no credential: it holds no secret)."""
    return Response(
        _rescue_pyz(),
        media_type="application/zip",
        headers={"Content-Disposition": 'attachment; filename="dingyuan-rescue.pyz"'},
    )
