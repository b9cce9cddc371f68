"""Clones: writable copy-on-write volumes born from a snapshot, durable across restarts.

A clone is a record in the repository (``clones/<id>``, format.md section 17), which names its
base snapshot and keeps that snapshot live (delete refuses, retention keeps it, gc counts it),
and an **overlay** on local disk, in one directory per clone under the store's root::

    <root>/<clone id>/lock    empty; whoever has the clone open holds an flock on it
    <root>/<clone id>/data    sparse, the clone's size: chunk i at offset i * chunk size
    <root>/<clone id>/map     a header, then an append-only log of fixed-size records
                              (chunk index, state, CRC-32): the chunks the overlay holds

A chunk is *absent* (read from the base snapshot), *data* (read from ``data``) or *zero*. Writes
copy up at chunk granularity: a chunk becomes *data* by writing the whole chunk (the base's
bytes, or zeros, with the write applied), so bytes left in ``data`` by an unflushed write before
a crash never show through. ``flush`` makes the data durable, then the map records that refer to
it. Writes never touch the base snapshot: its bytes and id stay what they were.

A snapshot of a clone reuses the base's tree wherever the overlay holds nothing: whole subtrees
are taken by id, and only the overlay's chunks are read, hashed and stored.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import secrets
import shutil
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from struct import Struct
from typing import Any

import blake3

from ..errors import CloneBusy, CloneNotFound, ExportError, SnapshotNotFound, UsageError
from .backup import BATCH_BYTES, INFLIGHT, BatchResult, BatchWorker, RepoSink
from .format import CLONE_MAP_MAGIC, ZERO_ID, BlobType, Codec, clone_name, encode_tree_node
from .image import SnapshotImage
from .manifest import CloneInfo, Snapshot, utcnow
from .ranges import check_range, chunk_parts, state_runs
from .repo import Repository
from .tree import TreeBuilder
from .writer import BlobWriter

#: The rule for volume names: letters, digits, '.', '_' and '-', at most 128, starting with a
#: letter or digit.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# DO NOT MODIFY: overlays on disk depend on these layouts (format.md section 17).
MAP_HEADER = Struct("<8sI4xQ8x")  # CLONE_MAP_MAGIC, chunk size, reserved, volume size, reserved
MAP_RECORD = Struct("<QB3xI")  # chunk index, state, reserved, CRC-32 of the record's first 12 bytes
assert MAP_HEADER.size == 32 and MAP_RECORD.size == 16

ABSENT, DATA, ZERO = 0, 1, 2
STRIPES = 64  # locks that serialise copy-up (chunk i takes lock i % STRIPES)
COMPACT_SLACK = 4096  # records beyond twice the live ones before opening rewrites the map


def _record(index: int, state: int) -> bytes:
    head = MAP_RECORD.pack(index, state, 0)[:12]
    return head + zlib.crc32(head).to_bytes(4, "little")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_FALLOC_PUNCH = 0x03  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
_libc = ctypes.CDLL(None, use_errno=True)


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the disk space of a range of ``data``, best effort: the bytes of a chunk that is not
    *data* are never read, so where punching is unsupported they are merely kept."""
    fallocate = getattr(_libc, "fallocate", None)
    if fallocate is not None:
        fallocate(
            ctypes.c_int(fd), ctypes.c_int(_FALLOC_PUNCH), ctypes.c_int64(offset), ctypes.c_int64(length)
        )


def _take_lock(path: Path, name: str) -> int:
    """Open and flock ``path`` (an open file description of its own: a second opener in this
    process is refused too); CloneBusy if someone holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CloneBusy(name=name, detail="another process or export has it open") from None
    return fd


class Overlay:
    """The local part of one clone: chunk states (one byte per chunk), the data file and the map
    log. Holds the clone's lock while open. Thread-safe."""

    def __init__(self, path: Path, info: CloneInfo) -> None:
        self.path = path
        self.size = info.size
        self.cs = info.chunk_size
        self.nchunks = info.base.nchunks
        if not (path / "map").is_file():
            raise ExportError(
                f"the overlay of clone {info.name} is missing from {path}: it lives with the process "
                "that created the clone; delete the clone if its writes are lost"
            )
        self._lock_fd = _take_lock(path / "lock", info.name)
        try:
            self.data_fd = os.open(path / "data", os.O_RDWR | os.O_CLOEXEC)
            self._map_fd = os.open(path / "map", os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except OSError as e:
            os.close(self._lock_fd)
            raise ExportError(f"cannot open the overlay of clone {info.name}: {e}") from None
        self.state = bytearray(self.nchunks)
        self._pending: dict[int, int] = {}
        self._meta = threading.Lock()  # state and pending
        self._commit = threading.Lock()  # one flush at a time
        self._replay(info.name)

    @staticmethod
    def create(path: Path, info: CloneInfo) -> int:
        """Make the overlay's files, durably (the record is created after them); returns the fd
        of the clone's lock, held, so that :meth:`CloneStore.sweep` leaves the overlay alone until
        the record exists."""
        path.mkdir(mode=0o700)
        lock_fd = _take_lock(path / "lock", info.name)
        try:
            with open(path / "data", "wb") as f:
                f.truncate(info.size)
                os.fsync(f.fileno())
            with open(path / "map", "wb") as f:
                f.write(MAP_HEADER.pack(CLONE_MAP_MAGIC, info.chunk_size, info.size))
                os.fsync(f.fileno())
            _fsync_dir(path)
            _fsync_dir(path.parent)
        except BaseException:
            os.close(lock_fd)
            raise
        return lock_fd

    def _replay(self, name: str) -> None:
        """Rebuild the states from the map; a torn or damaged tail (an append a crash cut short,
        never acknowledged by a flush) is cut off."""
        raw = os.pread(self._map_fd, os.fstat(self._map_fd).st_size, 0)
        if len(raw) < MAP_HEADER.size:
            raise ExportError(f"the overlay map of clone {name} is truncated")
        magic, cs, size = MAP_HEADER.unpack_from(raw, 0)
        if magic != CLONE_MAP_MAGIC or cs != self.cs or size != self.size:
            raise ExportError(f"the overlay map of clone {name} is not this clone's (or a newer format)")
        pos, records = MAP_HEADER.size, 0
        while pos + MAP_RECORD.size <= len(raw):
            index, state, crc = MAP_RECORD.unpack_from(raw, pos)
            if crc != zlib.crc32(raw[pos : pos + 12]) or state not in (DATA, ZERO) or index >= self.nchunks:
                break
            self.state[index] = state
            pos += MAP_RECORD.size
            records += 1
        live = self.nchunks - self.state.count(ABSENT)
        if records > 2 * live + COMPACT_SLACK:
            self._rewrite_map()
        elif pos != len(raw):
            os.ftruncate(self._map_fd, pos)
            os.fsync(self._map_fd)

    def _rewrite_map(self) -> None:
        """Replace the map by one record per chunk the overlay holds (temp file, fsync, rename)."""
        tmp = self.path / "map.tmp"
        with open(tmp, "wb") as f:
            f.write(MAP_HEADER.pack(CLONE_MAP_MAGIC, self.cs, self.size))
            f.write(b"".join(_record(i, s) for i, s in enumerate(self.state) if s))
            os.fsync(f.fileno())
        os.replace(tmp, self.path / "map")
        _fsync_dir(self.path)
        os.close(self._map_fd)
        self._map_fd = os.open(self.path / "map", os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)

    def set(self, index: int, state: int) -> None:
        with self._meta:
            self.state[index] = state
            self._pending[index] = state

    def commit(self) -> None:
        """Make every completed write durable: the data first, then the map records naming it."""
        with self._commit:
            with self._meta:  # records of writes completed so far; their data is synced next
                pending, self._pending = self._pending, {}
            try:
                os.fdatasync(self.data_fd)
                if pending:
                    records = b"".join(_record(i, s) for i, s in sorted(pending.items()))
                    os.write(self._map_fd, records)
                    os.fdatasync(self._map_fd)
            except OSError as e:
                with self._meta:  # not durable: keep them for the next flush (newer states win)
                    for i, s in pending.items():
                        self._pending.setdefault(i, s)
                raise ExportError(f"cannot flush the overlay in {self.path}: {e}") from None

    def close(self) -> None:
        for fd in (self.data_fd, self._map_fd, self._lock_fd):
            os.close(fd)


class _Gate:
    """Writes pass while the gate is open; ``closed()`` waits for those running and holds new
    ones back (a snapshot of the clone is one point in time)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._writers = 0
        self._shut = False

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            while self._shut:
                self._cond.wait()
            self._writers += 1
        try:
            yield
        finally:
            with self._cond:
                self._writers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def closed(self) -> Iterator[None]:
        with self._cond:
            while self._shut:
                self._cond.wait()
            self._shut = True
            while self._writers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._shut = False
                self._cond.notify_all()


class CloneDevice:
    """A clone as a writable :class:`~dingyuan.exports.blockdev.BlockDevice` (structurally): the
    base snapshot's image under the overlay. Thread-safe; open through :meth:`CloneStore.open`."""

    def __init__(self, info: CloneInfo, base: SnapshotImage, overlay: Overlay, store: CloneStore) -> None:
        self.info = info
        self.base = base
        self.overlay = overlay
        self.name = f"clone {info.name}"
        self.gate = _Gate()
        self._store = store
        self._cs = info.chunk_size
        self._stripes = [threading.Lock() for _ in range(STRIPES)]
        self._closed = False

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def read_only(self) -> bool:
        return False

    @property
    def block_size(self) -> int:
        return self._cs

    def _check(self, offset: int, length: int) -> None:
        check_range(self.name, self._closed, self.size, offset, length)

    def _runs(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        return state_runs(self.overlay.state, self._cs, offset, length)

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        parts = []
        for state, start, end in self._runs(offset, length):
            if state == ABSENT:
                parts.append(self.base.read(start, end - start))
            elif state == ZERO:
                parts.append(bytes(end - start))
            else:
                data = os.pread(self.overlay.data_fd, end - start, start)
                if len(data) != end - start:
                    raise ExportError(f"{self.name}: short read of its overlay at {start}")
                parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _chunk_parts(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        return chunk_parts(self._cs, offset, length)

    def _chunk_len(self, i: int) -> int:
        return min(self._cs, self.size - i * self._cs)

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        mv = memoryview(data)
        with self.gate.writing():
            for i, lo, hi in self._chunk_parts(offset, len(data)):
                start = i * self._cs + lo - offset
                self._put(i, lo, hi, mv[start : start + hi - lo])

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length)
        with self.gate.writing():
            for i, lo, hi in self._chunk_parts(offset, length):
                if lo == 0 and hi == self._chunk_len(i):
                    with self._stripes[i % STRIPES]:
                        if self.overlay.state[i] != ZERO:
                            self.overlay.set(i, ZERO)
                            _punch_hole(self.overlay.data_fd, i * self._cs, hi)
                else:
                    self._put(i, lo, hi, None)

    def trim(self, offset: int, length: int) -> None:
        """Discard the range: it reads as zeros afterwards."""
        self.write_zeroes(offset, length)

    def _put(self, i: int, lo: int, hi: int, piece: memoryview | None) -> None:
        """Write ``piece`` (None: zeros) at ``[lo, hi)`` of chunk ``i``. A chunk that the overlay
        does not hold as data is first made whole from the base (or zeros), then written as one."""
        cs, fd = self._cs, self.overlay.data_fd
        with self._stripes[i % STRIPES]:
            state = self.overlay.state[i]
            if state == ZERO and piece is None:
                return
            if state == DATA:
                data = piece if piece is not None else bytes(hi - lo)
                os.pwrite(fd, data, i * cs + lo)
                return
            n = self._chunk_len(i)
            whole = bytearray(n) if state == ZERO else bytearray(self.base.read(i * cs, n))
            whole[lo:hi] = piece if piece is not None else bytes(hi - lo)
            if os.pwrite(fd, whole, i * cs) != n:
                raise ExportError(f"{self.name}: short write to its overlay at chunk {i}")
            self.overlay.set(i, DATA)

    def flush(self) -> None:
        if self._closed:
            raise ExportError(f"{self.name} is closed")
        self.overlay.commit()

    def cache(self, offset: int, length: int) -> None:
        self._check(offset, length)
        for state, start, end in self._runs(offset, length):
            if state == ABSENT:
                self.base.cache(start, end - start)

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        self._check(offset, length)
        out: list[tuple[int, bool]] = []
        for state, start, end in self._runs(offset, length):
            found = (
                self.base.extents(start, end - start) if state == ABSENT else [(end - start, state == ZERO)]
            )
            for n, zero in found:
                if out and out[-1][1] == zero:
                    out[-1] = (out[-1][0] + n, zero)
                else:
                    out.append((n, zero))
        return out

    def close(self) -> None:
        """Flush, then release the clone (another opener may take it)."""
        if self._closed:
            return
        try:
            self.overlay.commit()
        finally:
            self._closed = True
            self.base.close()
            self.overlay.close()
            self._store._closed(self.info.id)

    def __enter__(self) -> CloneDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CloneStore:
    """The clones of a repository whose overlays live under ``root``."""

    def __init__(self, repo: Repository, root: Path) -> None:
        self.repo = repo
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._open: dict[str, CloneDevice] = {}
        self._lock = threading.Lock()

    # records -----------------------------------------------------------------------------------
    def create(self, snapshot: Snapshot, name: str, labels: dict[str, str] | None = None) -> CloneInfo:
        """A new clone of ``snapshot``, reading as the snapshot does until written to.

        Order (format.md section 17): the overlay's files are made durable, then the record is
        created; the base's manifest is read again afterwards, so a delete of the base that
        raced with this (and missed the record) makes the clone fail instead of dangle.
        """
        if NAME_RE.fullmatch(name) is None:
            raise UsageError(
                f"clone name {name!r} is not allowed: use letters, digits, '.', '_' and '-' (at most "
                "128, starting with a letter or digit)"
            )
        if any(c.name == name for c in self.repo.clones()):
            raise UsageError(f"a clone named {name!r} exists already: choose another name or delete it")
        base = self.repo.read_snapshot(snapshot.id)
        info = CloneInfo(secrets.token_hex(16), name, base, utcnow(), dict(labels or {}))
        path = self.root / info.id
        try:
            lock_fd = Overlay.create(path, info)
        except OSError as e:
            shutil.rmtree(path, ignore_errors=True)
            raise ExportError(f"cannot create the overlay of clone {name} in {path}: {e}") from None
        try:
            self.repo.save_clone(info)
            try:
                self.repo.read_snapshot(base.id)
            except SnapshotNotFound:
                self.repo.delete_clone(info.id)
                raise
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        finally:
            os.close(lock_fd)
        return info

    def get(self, ref: str) -> CloneInfo:
        """A clone by id, name or unique id prefix (at least 4 hex digits)."""
        clones = self.repo.clones()
        for c in clones:
            if ref in (c.id, c.name):
                return c
        hits = [c for c in clones if len(ref) >= 4 and c.id.startswith(ref.lower())]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise UsageError(f"'{ref}' matches several clones ({', '.join(c.name for c in hits)})")
        raise CloneNotFound(name=ref)

    # devices -----------------------------------------------------------------------------------
    def open(self, ref: str | CloneInfo, **image_options: Any) -> CloneDevice:
        """Open a clone for reading and writing (CloneBusy if open anywhere else);
        ``image_options`` go to the base's :class:`SnapshotImage`."""
        info = ref if isinstance(ref, CloneInfo) else self.get(ref)
        overlay = Overlay(self.root / info.id, info)
        base = SnapshotImage(self.repo, info.base, name=f"clone {info.name}", **image_options)
        dev = CloneDevice(info, base, overlay, self)
        with self._lock:
            self._open[info.id] = dev
        return dev

    def _closed(self, cid: str) -> None:
        with self._lock:
            self._open.pop(cid, None)

    @contextlib.contextmanager
    def _device(self, info: CloneInfo) -> Iterator[CloneDevice]:
        """The clone's device: the one open in this store, or opened for the call."""
        with self._lock:
            dev = self._open.get(info.id)
        if dev is not None:
            yield dev
            return
        with self.open(info) as dev:
            yield dev

    # snapshots ---------------------------------------------------------------------------------
    def snapshot(
        self,
        ref: str | CloneInfo,
        *,
        volume: str | None = None,
        host: str | None = None,
        labels: dict[str, str] | None = None,
        workers: int = 2,
    ) -> Snapshot:
        """A new snapshot of the clone's current contents: volume = the clone's name (or
        ``volume``), host and consistency the base's, parent the base, label ``clone=<id>``.

        Writes wait while it is taken (one point in time); the clone stays as it is.
        """
        info = ref if isinstance(ref, CloneInfo) else self.get(ref)
        with self._device(info) as dev, dev.gate.closed():
            dev.overlay.commit()
            return _snapshot(self.repo, dev, volume or info.name, host or info.base.host, labels, workers)

    def promote(self, ref: str | CloneInfo, volume: str, host: str | None = None) -> Snapshot:
        """Snapshot the clone into ``volume`` (its newest snapshot from now on), then delete the
        clone. The clone must not be open (CloneBusy); it stays held from the snapshot to the
        deletion of its record, so nobody writes to it in between."""
        info = ref if isinstance(ref, CloneInfo) else self.get(ref)
        if NAME_RE.fullmatch(volume) is None:
            raise UsageError(f"volume name {volume!r} is not allowed")
        with self.open(info):
            snap = self.snapshot(info, volume=volume, host=host)
            self.repo.delete_clone(info.id)  # record first (see delete)
        shutil.rmtree(self.root / info.id, ignore_errors=True)
        return snap

    def delete(self, ref: str | CloneInfo) -> None:
        """Delete a clone and its overlay; refused (CloneBusy) while it is open anywhere.

        Order: the record goes first (the clone no longer exists and its base is free), then the
        overlay. A crash between leaves an overlay without a record, which :meth:`sweep` removes.
        """
        info = ref if isinstance(ref, CloneInfo) else self.get(ref)
        with self._lock:
            if info.id in self._open:
                raise CloneBusy(name=info.name, detail="it is open (exported or mounted): close it first")
        path = self.root / info.id
        lock_fd = _take_lock(path / "lock", info.name) if path.is_dir() else None
        try:
            self.repo.delete_clone(info.id)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)

    def sweep(self) -> list[str]:
        """Remove overlays left without a record (a crash during create or delete); returns
        their ids. Overlays in use (locked) are left alone."""
        records = {c.id for c in self.repo.clones()}
        removed = []
        for path in sorted(p for p in self.root.iterdir() if p.is_dir() and p.name not in records):
            try:
                fd = _take_lock(path / "lock", path.name)
            except (CloneBusy, OSError):
                continue
            try:
                if not self.repo.backend.exists(clone_name(path.name)):  # not created meanwhile
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path.name)
            finally:
                os.close(fd)
        return removed

    def list(self) -> list[CloneInfo]:
        """Every clone of the repository, oldest first (also those whose overlay is elsewhere)."""
        return self.repo.clones()


def _snapshot(
    repo: Repository, dev: CloneDevice, volume: str, host: str, labels: dict[str, str] | None, workers: int
) -> Snapshot:
    """Build and commit the snapshot of a quiet, flushed clone (see :meth:`CloneStore.snapshot`)."""
    t0 = time.monotonic()
    taken = utcnow()
    base, info = dev.info.base, dev.info
    with repo.lock(exclusive=False, purpose=f"snapshot of clone {info.name}"):
        repo.sync_index()
        with BlobWriter(repo) as writer:
            sink = RepoSink(repo, writer)
            root, stats = _build_tree(sink, dev, workers)
            sink.flush()
        stats["bytes_stored"] = sink.bytes_stored
        stats["milliseconds"] = int((time.monotonic() - t0) * 1000)
        snap = Snapshot(
            volume=volume,
            host=host,
            time=taken,
            size=base.size,
            chunk_size=base.chunk_size,
            fanout=base.fanout,
            height=base.height,
            root=root,
            consistency=base.consistency,
            labels={**(labels or info.labels), "clone": info.id},
            parent=base.id,
            source=f"clone {info.id}",
            stats=stats,
        )
        return repo.save_snapshot(snap)


def _build_tree(sink: RepoSink, dev: CloneDevice, workers: int) -> tuple[bytes, dict[str, int]]:
    """The root of the clone's tree: the overlay's chunks hashed and stored, the rest taken from
    the base's tree by id, as whole subtrees where the overlay holds nothing below them."""
    base, tree = dev.info.base, dev.base.tree
    n, f = base.nchunks, base.fanout
    state = bytes(dev.overlay.state)
    runs = [(m.start(), m.end() - m.start()) for m in re.finditer(rb"[^\x00]+", state)]
    if not runs:
        return base.root, {"chunks_new": 0, "bytes_new": 0}
    ids, chunks_new, bytes_new = _hash_overlay(sink, dev, state, workers)

    def store_node(level: int, children: list[bytes]) -> bytes:
        data = encode_tree_node(level, children)
        nid = blake3.blake3(data, key=sink.id_key).digest()
        if sink.node_is_new(nid):
            sink.add(nid, BlobType.TREE, Codec.RAW, len(data), sink.seal(nid, BlobType.TREE, data))
        return nid

    builder = TreeBuilder(f, n, store_node)

    def fill(end: int) -> None:
        """Chunks ``[builder.next, end)`` come from the base: the largest whole subtrees first."""
        while builder.next < end:
            p, level, span = builder.next, 0, 1
            while level + 1 < base.height and p % (span * f) == 0 and (p + span * f <= end or end == n):
                level, span = level + 1, span * f
            eid = tree.entry(level, p // span)
            if level == 0:
                builder.add(eid)
            elif eid == ZERO_ID:
                builder.skip_to(min(p + span, n))
            else:
                builder.add_subtree(level - 1, eid)

    for first, count in runs:
        fill(first)
        builder.add_many([ids.get(i, ZERO_ID) for i in range(first, first + count)])
    fill(n)
    return builder.finish(), {"chunks_new": chunks_new, "bytes_new": bytes_new}


def _hash_overlay(
    sink: RepoSink, dev: CloneDevice, state: bytes, workers: int
) -> tuple[dict[int, bytes], int, int]:
    """Ids of the overlay's data chunks (zero ones are ``ZERO_ID``, left out), storing the new
    ones through ``sink``: the backup's batch worker, reading the data file at the same offsets."""
    cs, size = dev.info.chunk_size, dev.info.size
    per_batch = max(1, BATCH_BYTES // cs)
    batches: list[list[tuple[int, int]]] = [[]]
    room = per_batch
    for m in re.finditer(rb"\x01+", state):
        first, count = m.start(), m.end() - m.start()
        while count:
            take = min(count, room)
            batches[-1].append((first, take))
            first, count, room = first + take, count - take, room - take
            if not room:
                batches.append([])
                room = per_batch
    work = BatchWorker(sink, dev.overlay.data_fd, dev.name, cs)
    ids: dict[int, bytes] = {}
    chunks_new = bytes_new = 0
    inflight: deque[tuple[list[tuple[int, int]], Future[BatchResult]]] = deque()

    def consume() -> None:
        nonlocal chunks_new, bytes_new
        batch, fut = inflight.popleft()
        got, new = fut.result()
        for k, (codec, raw, stored) in new.items():
            sink.add(got[k], BlobType.CHUNK, codec, raw, stored)
            chunks_new += 1
            bytes_new += raw
        k = 0
        for first, count in batch:
            for i in range(first, first + count):
                ids[i] = got[k]
                k += 1

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clone-snapshot") as pool:
        buffers = [memoryview(bytearray(per_batch * cs)) for _ in range(INFLIGHT + 1)]
        for b, batch in enumerate(x for x in batches if x):
            base_ids = [i for first, count in batch for i in dev.base.tree.ids_range(first, count)]
            inflight.append((batch, pool.submit(work, buffers[b % len(buffers)], batch, size, base_ids)))
            if len(inflight) >= INFLIGHT:
                consume()
        while inflight:
            consume()
    return ids, chunks_new, bytes_new
