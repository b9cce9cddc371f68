"""Live restore: a restore target usable at once, while the copy runs in the background.

:class:`LiveRestore` is a writable block device (structurally a
:class:`~dingyuan.exports.blockdev.BlockDevice`) over the file or block device being restored. A
VM can boot from it, an export can serve it, the moment it is opened; a background copier fills
the target in chunk order meanwhile. Each chunk is *restored* (its bytes are in the target) or
not (they are still only in the snapshot):

- **Reads** of restored chunks come from the target, of the others from the snapshot (through a
  :class:`~.image.SnapshotImage`, verified like every read of it). A read restores what it
  fetched on the way (``restore_on_read``): the next read of it is local, and the copier skips it.
- **Writes** (and ``write_zeroes``, ``trim``) into a chunk not yet restored first make it whole
  from the snapshot (copy-up), apply the write and write the chunk as one, then mark it restored.
  The copier never writes a restored chunk, and both take the chunk's lock: no client write is
  ever overwritten by the copy.
- **The copier** walks the chunks in order, skipping restored ones, a batch at a time: the
  batch's chunks are fetched together (one index lookup, ranged reads of neighbouring blobs,
  decoding threads: the image's fast path), then written chunk by chunk under their locks. A
  ``rate`` (bytes per second, changeable at any time) slows it down, so a restore can leave
  bandwidth to the users of the target.
- **Complete**: once every chunk is restored and recorded, reads and writes go straight to the
  target (the export has switched to it), the repository is no longer needed, and closing the
  device removes the state.

The state lives in ``state_dir`` and survives a crash, so a restore resumes where it was::

    state_dir/lock    empty; whoever has the restore open holds an flock on it
    state_dir/state   a 64-byte header, then one bit per chunk (bit i % 8 of byte i // 8): 1 when
                      chunk i is restored

Write ordering (the crash-consistency contract):

1. A new restore prepares the target (a regular file is truncated to the snapshot's size, so it
   is sparse and reads as zeros) and syncs it, *then* creates the state file (temporary file,
   fsync, rename, directory fsync). Without a state file, opening starts afresh.
2. A chunk's bit MUST be set on disk only after the chunk's bytes in the target were
   ``fdatasync``-ed: a commit takes the chunks restored so far, syncs the target, then writes
   their bits and syncs the state file. Bits only ever go from 0 to 1, so a torn write of the
   bitmap leaves a mix of old and new bits that are all true.
3. Commits happen on ``flush``, on ``close``, every :data:`COMMIT_EVERY` seconds of copying and
   when the copy finishes. A crash loses at most the chunks restored since the last commit: they
   read from the snapshot again and are copied again (a client write to them had not been
   flushed, so losing it is allowed).
4. After a resume, bytes in the target of a chunk not marked restored mean nothing (an unflushed
   write may have left them): such a chunk is always written whole, zeros included.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from struct import Struct
from typing import Any

from ..errors import ExportError, RestoreTargetError, UsageError
from .format import ZERO_ID
from .image import SnapshotImage
from .locks import RepoLock
from .manifest import Snapshot
from .ranges import check_range, chunk_parts, state_runs
from .repo import Repository

# DO NOT MODIFY: restores in progress depend on this layout (docs/live-restore.md).
STATE_MAGIC = hashlib.sha256(b"dingyuan live restore state v1").digest()[:8]
#: magic, chunk size, reserved, volume size, the snapshot's tree root, reserved
STATE_HEADER = Struct("<8sI4xQ32s8x")
assert STATE_HEADER.size == 64

STRIPES = 64  # locks that serialise the restore of a chunk (chunk i takes lock i % STRIPES)
BATCH_BYTES = 8 << 20  # the copier fetches this much of the volume at once
COMMIT_EVERY = 1.0  # seconds of copying between commits of the state
COPIER_CACHE = 32 << 20  # decoded chunks the copier's image keeps (a batch and its read-ahead)
_ZEROS = bytes(1 << 20)
#: a byte of the bitmap as the states of its eight chunks
_BITS = [bytes((b >> k) & 1 for k in range(8)) for b in range(256)]

Progress = Callable[[int, int], None]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LiveRestore:
    """Restore ``snap`` to ``target`` (a file, made if missing, or a block device) while serving
    it as a writable block device; the state lives in ``state_dir`` (one directory per target).

    If ``state_dir`` holds the state of an unfinished restore of the same snapshot, it resumes:
    restored chunks are neither fetched nor written again. Otherwise a new restore begins, and a
    regular-file target is truncated. The copier starts at once unless ``start`` is False (call
    :meth:`start`, or drive it with :meth:`restore_next`). ``rate`` limits the copier to that many
    bytes per second written to the target (None: as fast as it goes). ``progress`` is called
    with ``(restored bytes, size)`` after each batch. ``image_options`` go to the
    :class:`~.image.SnapshotImage` that serves reads of chunks not yet restored.

    Holds a shared repository lock until the restore is complete (gc must not remove what it
    still needs) and the state directory's lock while open. Thread-safe; call :meth:`close`.
    """

    def __init__(
        self,
        repo: Repository,
        snap: Snapshot,
        target: str,
        state_dir: str | os.PathLike[str],
        *,
        rate: float | None = None,
        batch_bytes: int = BATCH_BYTES,
        restore_on_read: bool = True,
        progress: Progress | None = None,
        start: bool = True,
        **image_options: Any,
    ) -> None:
        if rate is not None and rate <= 0:
            raise UsageError(f"copy rate {rate}: give a positive number of bytes per second")
        self.repo = repo
        self.snap = snap
        self.target = target
        self.name = f"live restore of {snap.id[:12]} to {target}"
        self.restore_on_read = restore_on_read
        self.fetched_chunks = 0  #: chunks with data this device fetched from the snapshot
        self._cs = snap.chunk_size
        self._n = snap.nchunks
        self._batch = max(1, batch_bytes // self._cs)
        self._progress = progress
        self._dir = Path(state_dir)
        self._state_path = self._dir / "state"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._take_lock()
        self._stripes = [threading.Lock() for _ in range(STRIPES)]
        self._meta = threading.Lock()  # the states, the counters, pending
        self._commit_lock = threading.Lock()  # one commit at a time
        self._copy_lock = threading.Lock()  # one copier step at a time
        self._stop = threading.Event()
        self._rate = rate
        self._paced_since = time.monotonic()
        self._paced_bytes = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._last_commit = time.monotonic()
        self._done = threading.Event()  # every chunk restored and recorded
        self._repo_lock: RepoLock | None = None
        opened: list[Callable[[], None]] = [lambda: os.close(self._lock_fd)]
        try:
            self._fd, self._state_fd, self._sparse = self._open()
            opened += [lambda: os.close(self._fd), lambda: os.close(self._state_fd)]
            self._load_state()
            if not self._all_restored:
                self._repo_lock = repo.lock(exclusive=False, purpose=f"live restore {snap.id[:12]}")
                self._repo_lock.acquire()
                opened.append(self._repo_lock.release)
                repo.sync_index()
            self.image = SnapshotImage(repo, snap, name=f"snapshot {snap.id[:12]}", **image_options)
            opened.append(self.image.close)
            self._copier = SnapshotImage(
                repo,
                snap,
                cache_bytes=max(COPIER_CACHE, 4 * self._batch * self._cs),
                max_readahead=self._batch * self._cs,
                name=f"snapshot {snap.id[:12]}",
            )
        except BaseException:
            for undo in reversed(opened):
                undo()
            raise
        if start:
            self.start()

    # opening ---------------------------------------------------------------------------------
    def _take_lock(self) -> int:
        fd = os.open(self._dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ExportError(f"{self.name}: another process has this restore open") from None
        return fd

    def _open(self) -> tuple[int, int, bool]:
        """Open (resume) or prepare (begin) the target and the state file; returns their fds and
        whether chunks not restored yet read as zeros in the target (a new sparse file)."""
        if self._state_path.exists():
            fd = self._open_target(create=False)
            return fd, os.open(self._state_path, os.O_RDWR | os.O_CLOEXEC), False
        fd = self._open_target(create=True)
        try:
            sparse = stat.S_ISREG(os.fstat(fd).st_mode)
            if sparse:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, self.snap.size)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise self._target_error(e) from None
        tmp = self._dir / "state.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(STATE_HEADER.pack(STATE_MAGIC, self._cs, self.snap.size, self.snap.root))
                f.truncate(STATE_HEADER.size + (self._n + 7) // 8)
                os.fsync(f.fileno())
            os.replace(tmp, self._state_path)
            _fsync_dir(self._dir)
            return fd, os.open(self._state_path, os.O_RDWR | os.O_CLOEXEC), sparse
        except OSError as e:
            os.close(fd)
            raise ExportError(f"{self.name}: cannot create its state in {self._dir}: {e}") from None

    def _open_target(self, create: bool) -> int:
        try:
            fd = os.open(self.target, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o600)
        except OSError as e:
            raise self._target_error(e) from None
        mode = os.fstat(fd).st_mode
        size = os.lseek(fd, 0, os.SEEK_END)
        problem = None
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            problem = "not a regular file or block device"
        elif stat.S_ISBLK(mode) and size < self.snap.size:
            problem = f"device holds {size} bytes, snapshot needs {self.snap.size}"
        elif not create and size < self.snap.size:
            problem = f"holds {size} bytes of a restore of {self.snap.size}: not this restore's target"
        if problem:
            os.close(fd)
            raise RestoreTargetError(target=self.target, detail=problem)
        return fd

    def _load_state(self) -> None:
        raw = os.pread(self._state_fd, STATE_HEADER.size + (self._n + 7) // 8, 0)
        if len(raw) != STATE_HEADER.size + (self._n + 7) // 8:
            raise ExportError(f"{self.name}: the state in {self._dir} is truncated")
        magic, cs, size, root = STATE_HEADER.unpack_from(raw)
        if magic != STATE_MAGIC:
            raise ExportError(f"{self.name}: {self._state_path} is not a live restore's state")
        if (cs, size, root) != (self._cs, self.snap.size, self.snap.root):
            raise ExportError(f"{self.name}: the state in {self._dir} is another snapshot's restore")
        self._durable = bytearray(raw[STATE_HEADER.size :])
        self._state = bytearray(b"".join(_BITS[b] for b in self._durable)[: self._n])
        self._restored = self._state.count(1)
        tail = self._cs - self._chunk_len(self._n - 1)  # the last chunk may be short
        self._restored_bytes = self._restored * self._cs - (tail if self._state[-1] else 0)
        self._pending: set[int] = set()
        self._cursor = 0
        self._all_restored = self._restored == self._n
        if self._all_restored:
            self._done.set()

    # progress and control --------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """Every chunk is restored, and the state on disk says so."""
        return self._done.is_set()

    @property
    def restored_bytes(self) -> int:
        return self._restored_bytes

    @property
    def rate(self) -> float | None:
        return self._rate

    @rate.setter
    def rate(self, value: float | None) -> None:
        """Limit the copier to ``value`` bytes per second from now on (None: no limit)."""
        if value is not None and value <= 0:
            raise UsageError(f"copy rate {value}: give a positive number of bytes per second")
        with self._meta:
            self._rate = value
            self._paced_since, self._paced_bytes = time.monotonic(), 0

    def chunk_states(self) -> bytes:
        """One byte per chunk: 1 where it is restored (in the target), 0 where not yet."""
        with self._meta:
            return bytes(self._state)

    def start(self) -> None:
        """Start the background copier (once; it ends when the restore is complete)."""
        if self._thread is None and not self._all_restored:
            self._thread = threading.Thread(target=self._run, name="live-restore", daemon=True)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the restore is complete; False if ``timeout`` passed first. Raises the
        error that stopped the copier."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self._error is not None:
            raise self._error
        return self.complete

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self.restore_next():
                pass
        except BaseException as e:
            self._error = e

    def restore_next(self) -> bool:
        """Restore the next batch of chunks not yet restored (the copier's step); returns False
        when every chunk is restored (and recorded), True while there is more to do."""
        with self._copy_lock:
            i = self._cursor
            while i < self._n and self._state[i]:
                i += 1
            if i == self._n:
                self._cursor = i
                self._commit()
                return False
            last = min(self._n, i + self._batch_for_rate())
            ids = self._copier.tree.ids_range(i, last - i)
            written = 0
            for first, end, zero in _runs(i, last, ids, self._state):
                if zero:
                    written += self._restore_zeros(first, end)
                else:
                    written += self._restore_data(first, self._read_snapshot(self._copier, first, end))
            self._cursor = last
        if self._progress is not None:
            self._progress(self._restored_bytes, self.snap.size)
        self._pace(written)
        if time.monotonic() - self._last_commit >= COMMIT_EVERY:
            self._commit()
        return True

    def _batch_for_rate(self) -> int:
        """Chunks per step: a quarter second's worth when rate-limited, so the pace is even."""
        rate = self._rate
        if rate is None:
            return self._batch
        return max(1, min(self._batch, int(rate / 4) // self._cs))

    def _pace(self, written: int) -> None:
        with self._meta:
            self._paced_bytes += written
            rate, due = self._rate, self._paced_since
            if rate is not None:
                due += self._paced_bytes / rate
        if rate is not None:
            self._stop.wait(max(0.0, due - time.monotonic()))

    # restoring chunks ------------------------------------------------------------------------
    def _chunk_len(self, i: int) -> int:
        return min(self._cs, self.snap.size - i * self._cs)

    def _read_snapshot(self, image: SnapshotImage, first: int, end: int) -> bytes:
        """The snapshot's bytes of chunks ``[first, end)``, fetched as one batch."""
        ids = image.tree.ids_range(first, end - first)
        with self._meta:
            self.fetched_chunks += sum(1 for b in ids if b != ZERO_ID)
        start = first * self._cs
        return image.read(start, min(end * self._cs, self.snap.size) - start)

    def _restore_data(self, first: int, data: bytes) -> int:
        """Write the chunks from ``first`` that ``data`` holds, those still not restored; returns
        the bytes written."""
        written = 0
        for k in range(len(data) // self._cs + (len(data) % self._cs > 0)):
            i = first + k
            with self._stripes[i % STRIPES]:
                if not self._state[i]:
                    piece = memoryview(data)[k * self._cs : k * self._cs + self._chunk_len(i)]
                    self._pwrite(piece, i * self._cs)
                    self._mark(i)
                    written += len(piece)
        return written

    def _restore_zeros(self, first: int, end: int) -> int:
        """Restore chunks of a hole: nothing to write in a new sparse target."""
        written = 0
        for i in range(first, end):
            with self._stripes[i % STRIPES]:
                if not self._state[i]:
                    if not self._sparse:
                        self._write_zeros(i * self._cs, self._chunk_len(i))
                        written += self._chunk_len(i)
                    self._mark(i)
        return written

    def _mark(self, i: int) -> None:
        """Chunk ``i`` is in the target (its stripe lock held); recorded at the next commit."""
        with self._meta:
            self._state[i] = 1
            self._pending.add(i)
            self._restored += 1
            self._restored_bytes += self._chunk_len(i)
            self._all_restored = self._restored == self._n

    def _commit(self) -> None:
        """Record the chunks restored so far: the target's data first, then their bits."""
        with self._commit_lock:
            self._last_commit = time.monotonic()
            with self._meta:
                pending, self._pending = self._pending, set()
                done = self._all_restored
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                with self._meta:
                    self._pending |= pending
                raise self._target_error(e) from None
            try:
                if pending:
                    for i in pending:
                        self._durable[i >> 3] |= 1 << (i & 7)
                    lo, hi = min(pending) >> 3, (max(pending) >> 3) + 1
                    os.pwrite(self._state_fd, self._durable[lo:hi], STATE_HEADER.size + lo)
                    os.fdatasync(self._state_fd)
            except OSError as e:
                with self._meta:
                    self._pending |= pending
                raise ExportError(f"{self.name}: cannot record progress in {self._dir}: {e}") from None
            if done:
                self._done.set()
                self._release_repo()  # nothing more to fetch: gc may run

    # the BlockDevice interface ---------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.snap.size

    @property
    def read_only(self) -> bool:
        return False

    @property
    def block_size(self) -> int:
        return self._cs

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if self._all_restored:
            return self._pread(offset, length)
        parts: list[bytes] = []
        for restored, start, end in self._state_runs(offset, length):
            if restored:
                parts.append(self._pread(start, end - start))
                continue
            first, last = start // self._cs, (end - 1) // self._cs + 1
            data = self._read_snapshot(self.image, first, last)
            if self.restore_on_read:
                self._restore_data(first, data)
            parts.append(data[start - first * self._cs : end - first * self._cs])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        if self._all_restored:
            self._pwrite(data, offset)
            return
        mv = memoryview(data)
        for i, lo, hi in self._chunk_parts(offset, len(data)):
            at = i * self._cs + lo - offset
            self._put(i, lo, hi, mv[at : at + hi - lo])

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if self._all_restored:
            self._write_zeros(offset, length)
            return
        for i, lo, hi in self._chunk_parts(offset, length):
            self._put(i, lo, hi, None)

    def trim(self, offset: int, length: int) -> None:
        """Discard the range: it reads as zeros afterwards (the copier will not bring it back)."""
        self.write_zeroes(offset, length)

    def _put(self, i: int, lo: int, hi: int, piece: memoryview | None) -> None:
        """Write ``piece`` (None: zeros) at ``[lo, hi)`` of chunk ``i``; a chunk not restored is
        first made whole from the snapshot and written as one (copy-up)."""
        base = i * self._cs
        with self._stripes[i % STRIPES]:
            if self._state[i]:
                if piece is None:
                    self._write_zeros(base + lo, hi - lo)
                else:
                    self._pwrite(piece, base + lo)
                return
            n = self._chunk_len(i)
            if lo == 0 and hi == n:
                whole = bytearray(n) if piece is None else piece
            else:
                whole = bytearray(self._read_snapshot(self.image, i, i + 1))
                whole[lo:hi] = piece if piece is not None else bytes(hi - lo)
            self._pwrite(whole, base)
            self._mark(i)

    def flush(self) -> None:
        if self._closed:
            raise ExportError(f"{self.name} is closed")
        self._commit()

    def cache(self, offset: int, length: int) -> None:
        self._check(offset, length)
        for restored, start, end in self._state_runs(offset, length):
            if restored:
                os.posix_fadvise(self._fd, start, end - start, os.POSIX_FADV_WILLNEED)
            else:
                self.image.cache(start, end - start)

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """Holes of the snapshot where not yet restored; a restored range is reported as data."""
        self._check(offset, length)
        out: list[tuple[int, bool]] = []
        for restored, start, end in self._state_runs(offset, length):
            for n, zero in self.image.extents(start, end - start) if not restored else [(end - start, False)]:
                if out and out[-1][1] == zero:
                    out[-1] = (out[-1][0] + n, zero)
                else:
                    out.append((n, zero))
        return out

    def close(self) -> None:
        """Stop the copier and record its progress; once complete, remove the state too (the
        target is then an ordinary restored volume). A later open of an unfinished restore
        resumes it."""
        if self._closed:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._commit()
            if self.complete:
                os.unlink(self._state_path)
                os.unlink(self._dir / "lock")
                _fsync_dir(self._dir)
        finally:
            self._release()

    def _release(self) -> None:
        """Let go of everything without recording anything more (what a crash leaves)."""
        self._closed = True
        self._stop.set()
        self.image.close()
        self._copier.close()
        self._release_repo()
        for fd in (self._fd, self._state_fd, self._lock_fd):
            os.close(fd)

    def _release_repo(self) -> None:
        with self._meta:
            held, self._repo_lock = self._repo_lock, None
        if held is not None:
            held.release()

    def __enter__(self) -> LiveRestore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # helpers ---------------------------------------------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        check_range(self.name, self._closed, self.snap.size, offset, length)

    def _state_runs(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        return state_runs(self._state, self._cs, offset, length)

    def _chunk_parts(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        return chunk_parts(self._cs, offset, length)

    def _pread(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as e:
            raise self._target_error(e) from None
        if len(data) != length:
            raise RestoreTargetError(target=self.target, detail=f"short read at offset {offset}")
        return data

    def _pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        try:
            done = os.pwrite(self._fd, data, offset)
        except OSError as e:
            raise self._target_error(e) from None
        if done != len(data):
            raise RestoreTargetError(target=self.target, detail=f"short write at offset {offset}")

    def _write_zeros(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(len(_ZEROS), end - offset)
            self._pwrite(memoryview(_ZEROS)[:n], offset)
            offset += n

    def _target_error(self, e: OSError) -> RestoreTargetError:
        return RestoreTargetError(target=self.target, detail=e.strerror or str(e))


def _runs(first: int, last: int, ids: list[bytes], state: bytearray) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, hole)`` runs of the chunks in ``[first, last)`` not restored yet, split
    where a hole begins or ends (``ids`` are the chunks' ids)."""
    i = first
    while i < last:
        if state[i]:
            i += 1
            continue
        hole = ids[i - first] == ZERO_ID
        j = i + 1
        while j < last and not state[j] and (ids[j - first] == ZERO_ID) == hole:
            j += 1
        yield i, j, hole
        i = j
