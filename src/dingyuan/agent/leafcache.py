"""The chunk ids of a volume's last committed snapshot, kept by the agent between runs.

A chunk whose id equals the cached one at its position is unchanged: it is neither looked up
on the vault nor sent. The file is written while a run scans (holes stay all-zero, which is
``ZERO_ID``) and renamed into place only after the vault committed the snapshot, so it always
describes a committed snapshot. Layout::

    magic "DYLEAF01" | chunk size (u32 BE) | chunk count (u64 BE) | snapshot id (64 bytes, ASCII,
    NUL-padded) | chunk ids (32 bytes each)
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from pathlib import Path

from ..repository.format import ID_LEN, ZERO_ID

MAGIC = b"DYLEAF01"
HEADER = struct.Struct(">8sIQ64s")


class LeafCache:
    """A committed snapshot's chunk ids, memory-mapped."""

    def __init__(self, snapshot_id: str, chunk_size: int, nchunks: int, ids: mmap.mmap | bytes) -> None:
        self.snapshot_id = snapshot_id
        self.chunk_size = chunk_size
        self.nchunks = nchunks
        self._ids = ids

    @classmethod
    def load(cls, path: Path) -> LeafCache | None:
        """The cache at ``path``, or None when it is missing or unreadable (then every chunk is
        looked up on the vault: slower, never wrong)."""
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER.size)
                if len(head) != HEADER.size:
                    return None
                magic, cs, n, sid = HEADER.unpack(head)
                if magic != MAGIC or os.fstat(f.fileno()).st_size != HEADER.size + n * ID_LEN:
                    return None
                ids: mmap.mmap | bytes = b""
                if n:
                    ids = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError:
            return None
        return cls(sid.rstrip(b"\0").decode("ascii", "replace"), cs, n, ids)

    def ids_range(self, start: int, count: int) -> list[bytes]:
        out = []
        for i in range(start, start + count):
            if i < self.nchunks:
                pos = HEADER.size + i * ID_LEN
                out.append(bytes(self._ids[pos : pos + ID_LEN]))
            else:
                out.append(ZERO_ID)
        return out

    def close(self) -> None:
        if isinstance(self._ids, mmap.mmap):
            self._ids.close()


class LeafWriter:
    """Writes the chunk ids of a run as they are found; ``commit`` puts the file in place."""

    def __init__(self, path: Path, chunk_size: int, nchunks: int) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.chunk_size = chunk_size
        self.nchunks = nchunks
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, HEADER.size + nchunks * ID_LEN)  # a sparse file of ZERO_IDs
        self._pending = bytearray()
        self._start = self._end = 0

    def write(self, first: int, ids: list[bytes]) -> None:
        """Record the ids of chunks ``first ...``; runs arrive in volume order and are written in
        pieces of up to a MiB (a fragmented source gives many small runs)."""
        if first != self._end or len(self._pending) >= 1 << 20:
            self._flush()
            self._start = first
        self._pending += b"".join(ids)
        self._end = first + len(ids)

    def _flush(self) -> None:
        if self._pending:
            os.pwrite(self.fd, self._pending, HEADER.size + self._start * ID_LEN)
            self._pending = bytearray()

    def commit(self, snapshot_id: str) -> None:
        self._flush()
        os.pwrite(self.fd, HEADER.pack(MAGIC, self.chunk_size, self.nchunks, snapshot_id.encode()), 0)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()
