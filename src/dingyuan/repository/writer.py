"""Writing blobs: pack them, upload packs in the background, index them once durable.

``BlobWriter`` keeps the write-ordering rules: a pack is put (durably) before its blobs are
listed by an index object, and ``flush`` returns only when every blob added so far is in a
durable pack listed by a durable index object -- then a manifest may refer to them.
"""

from __future__ import annotations

import queue
import threading
from types import TracebackType

import blake3

from .backends.base import Buffer, data_len
from .format import (
    PACK_END_MAGIC,
    PACK_HEADER,
    PACK_MAGIC,
    PACK_TRAILER,
    TOC_MAGIC,
    BlobEntry,
    BlobType,
    Codec,
    PackRef,
    encode_toc,
    pack_name,
)
from .repo import Repository

INDEX_EVERY = 32  # packs per index object while a long backup runs
PACKS_IN_MEMORY = 4  # one being filled, the others being sealed, written and fsynced
UPLOADERS = 2  # one pack's fsync wait overlaps the next one's hashing and writing


class PackBuilder:
    """Assemble one pack, header | blobs | sealed TOC | trailer, as a list of parts (no copies)."""

    def __init__(self) -> None:
        self.parts: list[Buffer] = [PACK_HEADER.pack(PACK_MAGIC)]
        self.size = PACK_HEADER.size
        self.entries: list[BlobEntry] = []

    def add(self, bid: bytes, btype: BlobType, codec: Codec, raw_length: int, stored: Buffer) -> None:
        self.entries.append(BlobEntry(bid, btype, codec, raw_length, self.size, len(stored)))
        self.parts.append(stored)
        self.size += len(stored)

    def finish(self, repo: Repository) -> tuple[bytes, list[Buffer], list[BlobEntry]]:
        """Seal the TOC; returns (pack id, the pack's parts, entries)."""
        toc = repo.cipher.seal(TOC_MAGIC, encode_toc(self.entries))
        self.parts.append(toc)
        self.parts.append(PACK_TRAILER.pack(len(toc), PACK_END_MAGIC))
        self.size += len(toc) + PACK_TRAILER.size
        hasher = blake3.blake3()
        for part in self.parts:
            hasher.update(part)
        return hasher.digest(), self.parts, self.entries


class BlobWriter:
    """Add blobs; ``flush`` makes them durable and indexed. Use as a context manager."""

    def __init__(
        self, repo: Repository, pack_size: int | None = None, index_every: int = INDEX_EVERY
    ) -> None:
        self.repo = repo
        self.pack_size = pack_size or repo.pack_size
        self.index_every = index_every
        self._claimed: set[bytes] = set()
        self._claim_lock = threading.Lock()
        self._builder: PackBuilder | None = None
        self._slots = threading.Semaphore(PACKS_IN_MEMORY)
        self._queue: queue.Queue[PackBuilder | None] = queue.Queue()
        self._durable: list[PackRef] = []
        self._durable_lock = threading.Lock()
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._upload_loop, name=f"pack-upload-{i}", daemon=True)
            for i in range(UPLOADERS)
        ]
        for t in self._threads:
            t.start()
        self.bytes_stored = 0

    # dedup -----------------------------------------------------------------------------------
    def claim(self, bid: bytes) -> bool:
        """True if ``bid`` is new to this writer (the caller must then add it)."""
        with self._claim_lock:
            if bid in self._claimed:
                return False
            self._claimed.add(bid)
            return True

    def is_new(self, bid: bytes) -> bool:
        """True if the repository lacks ``bid`` and nobody in this session claimed it yet."""
        return not self.repo.cache.has(bid) and self.claim(bid)

    # writing ---------------------------------------------------------------------------------
    def add(self, bid: bytes, btype: BlobType, codec: Codec, raw_length: int, stored: Buffer) -> None:
        self._raise_error()
        if self._builder is None:
            self._slots.acquire()
            self._builder = PackBuilder()
        self._builder.add(bid, btype, codec, raw_length, stored)
        self.bytes_stored += len(stored)
        if self._builder.size >= self.pack_size:
            self._ship()
        if len(self._durable) >= self.index_every:
            self._write_index()

    def _ship(self) -> None:
        if self._builder is None:
            return
        self._queue.put(self._builder)
        self._builder = None

    def _upload_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    pack, parts, entries = item.finish(self.repo)  # sealing and hashing happen here
                    self.repo.backend.put(pack_name(pack), parts)
                    with self._durable_lock:
                        self._durable.append(PackRef(pack, data_len(parts), entries))
            except BaseException as e:  # handed to the caller's thread
                self._error = e
            finally:
                if item is not None:
                    self._slots.release()
                self._queue.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _write_index(self) -> None:
        with self._durable_lock:
            refs, self._durable = self._durable, []
        if not refs:
            return
        self.repo.write_index(refs)
        with self._claim_lock:  # now findable through the cache; keeps the claim set bounded
            for ref in refs:
                self._claimed.difference_update(e.id for e in ref.entries)

    def flush(self) -> None:
        """Return once every added blob is in a durable pack named by a durable index object."""
        self._ship()
        self._queue.join()
        self._raise_error()
        self._write_index()

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
