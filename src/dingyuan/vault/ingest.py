"""Receiving backups from agents: upload sessions, the spool, packs and atomic commits.

An agent backs a volume up in one *session*: it asks which chunk ids the vault lacks, uploads
those (and its new tree nodes) in frames, and commits the snapshot's root. The vault

- checks every frame (its payload decompresses to its raw length and hashes to its id under
  the repository's id key), seals it with the repository's key and appends it to the session's
  **spool** file at once, so whatever arrived survives a killed vault (``recover`` packs the
  spool files a previous process left) and counts as present for the next "missing" query;
- turns a spool into a pack when it reaches the pack size, and indexes packs in batches;
- on commit, packs and indexes the rest, then checks the new tree: every node that differs from
  the previous snapshot's at the same position is loaded, and every chunk id it adds must be an
  indexed chunk of the right length. Only then is the manifest written (DESIGN.md invariant:
  data is durable before anything refers to it).

A session holds a shared repository lock (gc waits); an idle session expires after
``SESSION_IDLE`` seconds and keeps what it received.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import blake3
import zstandard

from ..errors import (
    CorruptObject,
    IncompleteSnapshot,
    MissingObject,
    SessionNotFound,
    StorageFull,
    StorageIOError,
    UploadRejected,
    UsageError,
)
from ..protocol import Frame
from ..repository.backends.base import Buffer
from ..repository.backup import check_chunk_size
from ..repository.format import ZERO_ID, BlobType, Codec, PackRef, pack_name
from ..repository.locks import RepoLock
from ..repository.manifest import CONSISTENCY_LEVELS, Snapshot, utcnow
from ..repository.repo import DEFAULT_FANOUT, Repository
from ..repository.tree import TreeReader, tree_height
from ..repository.writer import INDEX_EVERY, PackBuilder

SESSION_IDLE = 600.0
CLOCK_SKEW = timedelta(minutes=5)
_RECORD = struct.Struct(">32sBBII")  # spool record: id, type, codec, raw length, stored length
_PRESENT_BATCH = 4096


class Spool:
    """An append-only file of sealed blobs on their way into a pack."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.size = 0
        self.ids: list[bytes] = []

    def append(self, bid: bytes, btype: BlobType, codec: Codec, raw_length: int, stored: Buffer) -> None:
        head = _RECORD.pack(bid, btype, codec, raw_length, len(stored))
        try:
            os.writev(self.fd, [head, stored])  # one write: a killed process leaves whole records
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise StorageFull(name=str(self.path)) from None
            raise StorageIOError(name=str(self.path), detail=e.strerror or str(e)) from None
        self.size += len(head) + len(stored)
        self.ids.append(bid)

    def close(self) -> None:
        os.close(self.fd)


def read_spool(path: Path) -> list[tuple[bytes, BlobType, Codec, int, bytes]]:
    """The whole records of a spool file (a torn last record is dropped)."""
    data = path.read_bytes()
    out = []
    pos = 0
    while len(data) - pos >= _RECORD.size:
        bid, btype, codec, raw, n = _RECORD.unpack_from(data, pos)
        start = pos + _RECORD.size
        if len(data) - start < n:
            break
        try:
            out.append((bid, BlobType(btype), Codec(codec), raw, data[start : start + n]))
        except ValueError:
            break  # not a record we wrote: stop at the damage, keep what came before
        pos = start + n
    return out


@dataclass
class CommitInfo:
    """What the agent tells about the snapshot it commits."""

    root: bytes
    height: int
    time: datetime
    consistency: str = "crash"
    labels: dict[str, str] = field(default_factory=dict)
    source: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class UploadSession:
    id: str
    host: str
    volume: str
    size: int
    chunk_size: int
    parent: Snapshot | None
    lock: RepoLock
    spool: Spool
    job_id: int | None = None
    owner: int | None = None  # the catalog id of the host whose agent opened it
    last_used: float = field(default_factory=time.monotonic)
    mutex: threading.Lock = field(default_factory=threading.Lock)
    refs: list[PackRef] = field(default_factory=list)  # durable packs not indexed yet
    received: int = 0  # frames
    stored: int = 0  # frames that were new
    bytes_received: int = 0  # payload bytes

    @property
    def nchunks(self) -> int:
        return -(-self.size // self.chunk_size)

    def touch(self) -> None:
        self.last_used = time.monotonic()


class Ingest:
    """The vault's receiving end of the transfer protocol, for one repository."""

    def __init__(self, repo: Repository, spool_dir: Path, idle: float = SESSION_IDLE) -> None:
        self.repo = repo
        self.spool_dir = spool_dir
        self.idle = idle
        spool_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._sessions: dict[str, UploadSession] = {}
        self._inflight: set[bytes] = set()  # spooled, or packed but not indexed yet
        self._local = threading.local()

    # start-up and shut-down --------------------------------------------------------------------
    def recover(self) -> int:
        """Pack and index what a previous process left in the spool, and index packs it wrote but
        did not index; returns the blobs and packs recovered. Call before serving."""
        with self.repo.lock(exclusive=False, purpose="vault recovery") as lk:
            self.repo.sync_index()
            refs: list[PackRef] = []
            files = sorted(self.spool_dir.glob("*.spool"))
            for path in files:
                records = read_spool(path)
                if records:
                    builder = PackBuilder()
                    for bid, btype, codec, raw, stored in records:
                        builder.add(bid, btype, codec, raw, stored)
                    refs.append(self._put_pack(builder))
            if refs:
                self.repo.write_index(refs)
            for path in files:
                path.unlink()
            count = sum(len(r.entries) for r in refs)
            if self.repo.lock_is_sole(lk.name):  # no other writer's packs are in flight
                count += self.repo.recover_packs()
        return count

    def close(self) -> None:
        """End every session, keeping what it received (packed and indexed)."""
        for session in list(self._sessions.values()):
            self._end(session)

    # sessions ----------------------------------------------------------------------------------
    def start(
        self,
        host: str,
        volume: str,
        size: int,
        chunk_size: int,
        job_id: int | None = None,
        owner: int | None = None,
    ) -> UploadSession:
        if size <= 0:
            raise UsageError(f"volume size {size} must be positive")
        check_chunk_size(chunk_size)
        lock = self.repo.lock(exclusive=False, purpose=f"upload {host}:{volume}")
        lock.acquire()
        try:
            self.repo.sync_index()
            parent = self.repo.latest(volume, host)
            sid = secrets.token_hex(16)
            session = UploadSession(
                id=sid,
                host=host,
                volume=volume,
                size=size,
                chunk_size=chunk_size,
                parent=parent,
                lock=lock,
                spool=Spool(self.spool_dir / f"{sid}.spool"),
                job_id=job_id,
                owner=owner,
            )
        except BaseException:
            lock.release()
            raise
        with self._lock:
            self._sessions[sid] = session
        return session

    def get(self, sid: str, host: str | None = None) -> UploadSession:
        """The open session ``sid`` (of ``host``, when given)."""
        with self._lock:
            session = self._sessions.get(sid)
        if session is None or (host is not None and session.host != host):
            raise SessionNotFound(session=sid)
        session.touch()
        return session

    def abort(self, session: UploadSession) -> None:
        self._end(session)

    def expire(self, now: float | None = None) -> list[str]:
        """End sessions idle for longer than ``idle``; returns their ids."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [s for s in self._sessions.values() if now - s.last_used > self.idle]
        for s in stale:
            self._end(s)
        return [s.id for s in stale]

    def sessions(self) -> list[UploadSession]:
        with self._lock:
            return list(self._sessions.values())

    def _end(self, session: UploadSession) -> None:
        with self._lock:
            if self._sessions.pop(session.id, None) is None:
                return
        try:
            with session.mutex:
                self._pack(session)
                self._index(session)
        finally:
            session.spool.close()
            with contextlib.suppress(FileNotFoundError):
                session.spool.path.unlink()
            session.lock.release()

    # what is missing -----------------------------------------------------------------------------
    def missing(self, ids: list[bytes]) -> list[int]:
        """Positions in ``ids`` of the blobs the vault lacks."""
        present = self.repo.cache.present(ids)
        with self._lock:
            inflight = self._inflight
            return [i for i, bid in enumerate(ids) if bid not in present and bid not in inflight]

    # receiving -----------------------------------------------------------------------------------
    def _check(self, frame: Frame) -> None:
        """The frame's payload is the blob it claims to be."""
        data: Buffer = frame.payload
        if frame.codec == Codec.ZSTD:
            dctx = getattr(self._local, "dctx", None)
            if dctx is None:
                dctx = self._local.dctx = zstandard.ZstdDecompressor()
            try:
                data = dctx.decompress(frame.payload, max_output_size=frame.raw_length)
            except zstandard.ZstdError as e:
                raise UploadRejected(detail=f"blob {frame.id.hex()[:16]}: cannot decompress: {e}") from None
            if len(data) != frame.raw_length:
                raise UploadRejected(detail=f"blob {frame.id.hex()[:16]}: decompressed length differs")
        if blake3.blake3(data, key=self.repo.cipher.id_key).digest() != frame.id:
            raise UploadRejected(detail=f"blob {frame.id.hex()[:16]}: content does not match its id")

    def receive(self, session: UploadSession, frames: list[Frame]) -> int:
        """Check, seal and spool ``frames``; returns how many were new. Every frame is checked
        before any is kept, so a bad upload changes nothing."""
        for f in frames:
            self._check(f)
        present = self.repo.cache.present([f.id for f in frames])
        new = 0
        with session.mutex:
            if self._sessions.get(session.id) is not session:
                raise SessionNotFound(session=session.id)
            for f in frames:
                session.received += 1
                session.bytes_received += len(f.payload)
                if f.id in present or f.id == ZERO_ID:
                    continue
                with self._lock:
                    if f.id in self._inflight:
                        continue
                    self._inflight.add(f.id)
                sealed = self.repo.cipher.seal_blob(f.payload, f.id + bytes([f.type]))
                try:
                    session.spool.append(f.id, f.type, f.codec, f.raw_length, sealed)
                except BaseException:
                    with self._lock:  # not stored: it must not count as present
                        self._inflight.discard(f.id)
                    raise
                new += 1
                if session.spool.size >= self.repo.pack_size:
                    self._pack(session)
                    if len(session.refs) >= INDEX_EVERY:
                        self._index(session)
            session.stored += new
            session.last_used = time.monotonic()
        return new

    def _put_pack(self, builder: PackBuilder) -> PackRef:
        pack, parts, entries = builder.finish(self.repo)
        size = sum(len(p) for p in parts)
        self.repo.backend.put(pack_name(pack), parts)
        return PackRef(pack, size, entries)

    def _pack(self, session: UploadSession) -> None:
        """Turn the session's spool into a durable pack and start a new spool (mutex held)."""
        spool = session.spool
        if not spool.ids:
            return
        builder = PackBuilder()
        for bid, btype, codec, raw, stored in read_spool(spool.path):
            builder.add(bid, btype, codec, raw, stored)
        session.refs.append(self._put_pack(builder))
        spool.close()
        spool.path.unlink()
        session.spool = Spool(spool.path)

    def _index(self, session: UploadSession) -> None:
        """Index the session's durable packs (mutex held); they are then found by the cache."""
        if not session.refs:
            return
        refs, session.refs = session.refs, []
        self.repo.write_index(refs)
        with self._lock:
            for ref in refs:
                self._inflight.difference_update(e.id for e in ref.entries)

    # committing ------------------------------------------------------------------------------------
    def commit(self, session: UploadSession, info: CommitInfo) -> Snapshot:
        """Make everything received durable, check the tree is complete, write the manifest."""
        if info.consistency not in CONSISTENCY_LEVELS:
            raise UploadRejected(detail=f"consistency must be one of {', '.join(CONSISTENCY_LEVELS)}")
        if info.time.tzinfo is None or info.time > utcnow() + CLOCK_SKEW:
            raise UploadRejected(detail="the snapshot time must be an aware UTC time, not in the future")
        nchunks = session.nchunks
        if info.height != tree_height(nchunks, DEFAULT_FANOUT):
            raise UploadRejected(detail=f"tree height {info.height} does not fit {nchunks} chunks")
        # A blob this session skipped because another session had received it may still be in
        # that one's spool: make every session's blobs durable and indexed first (one mutex at a
        # time, so two commits cannot wait for each other).
        for other in self.sessions():
            if other is not session:
                with other.mutex:
                    self._pack(other)
                    self._index(other)
        with session.mutex:
            if self._sessions.get(session.id) is not session:
                raise SessionNotFound(session=session.id)
            self._pack(session)
            self._index(session)
            self._check_tree(session, info)
            snap = Snapshot(
                volume=session.volume,
                host=session.host,
                time=info.time,
                size=session.size,
                chunk_size=session.chunk_size,
                fanout=DEFAULT_FANOUT,
                height=info.height,
                root=info.root,
                parent=session.parent.id if session.parent else None,
                labels=dict(info.labels),
                consistency=info.consistency,
                source=info.source,
                stats=dict(info.stats),
            )
            self.repo.save_snapshot(snap)
        self._end(session)
        return snap

    def _check_tree(self, session: UploadSession, info: CommitInfo) -> None:
        nchunks, cs = session.nchunks, session.chunk_size
        new = TreeReader(info.root, info.height, DEFAULT_FANOUT, nchunks, self.repo.load_tree_node)
        old: TreeReader | None = None
        p = session.parent
        if p is not None and p.chunk_size == cs and p.fanout == DEFAULT_FANOUT and p.height == info.height:
            old = self.repo.tree(p)
        batch: list[tuple[int, bytes]] = []
        try:
            for item in _added_chunks(new, old):
                batch.append(item)
                if len(batch) >= _PRESENT_BATCH:
                    self._check_chunks(batch, session.size, cs)
                    batch = []
            self._check_chunks(batch, session.size, cs)
        except MissingObject as e:
            raise IncompleteSnapshot(detail=str(e)) from None
        except CorruptObject as e:
            raise UploadRejected(detail=f"the tree is malformed: {e}") from None

    def _check_chunks(self, batch: list[tuple[int, bytes]], size: int, cs: int) -> None:
        if not batch:
            return
        found = self.repo.cache.lookup_many(bid for _, bid in batch)
        for index, bid in batch:
            loc = found.get(bid)
            if loc is None:
                raise IncompleteSnapshot(detail=f"chunk {index} ({bid.hex()[:16]}) is not on the vault")
            want = min(cs, size - index * cs)
            if loc.entry.type != BlobType.CHUNK or loc.entry.raw_length != want:
                raise UploadRejected(detail=f"chunk {index} ({bid.hex()[:16]}) is not a {want}-byte chunk")


def _added_chunks(new: TreeReader, old: TreeReader | None) -> Iterator[tuple[int, bytes]]:
    """``(index, id)`` of the chunks of ``new`` that differ from ``old`` at the same position,
    loading only the nodes that differ (a subtree equal to the old one's is complete: it was
    checked when the old snapshot was committed). Node shapes are checked on the way."""
    f, nchunks = new.fanout, new.nchunks

    def rec(x: bytes, y: bytes, level: int, base: int) -> Iterator[tuple[int, bytes]]:
        if x in (y, ZERO_ID):
            return
        xs = new.load(x, level)
        span = f**level
        if not xs or len(xs) > f or base + (len(xs) - 1) * span >= nchunks:
            raise CorruptObject(name=f"tree node {x.hex()[:16]}", detail="shape does not fit the volume")
        ys = old.load(y, level) if old is not None and y != ZERO_ID else []
        for j, cx in enumerate(xs):
            cy = ys[j] if j < len(ys) else ZERO_ID
            if level == 0:
                if cx != ZERO_ID and cx != cy:
                    yield base + j, cx
            else:
                yield from rec(cx, cy, level - 1, base + j * span)

    yield from rec(new.root, old.root if old is not None else ZERO_ID, new.height - 1, 0)
