"""Fault injection for tests: make the Nth write to a backend, and every later one, fail."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

from .base import Backend, Data, check_name
from .local import storage_error


class FaultyBackend(Backend):
    """Wrap ``inner``; count writes (put, create, delete) in ``writes``.

    The write numbered ``fail_at_write`` (1-based) and every later one raise, without being
    performed, the error a backend raises for an OSError with ``errno_`` (ENOSPC: StorageFull,
    EIO: StorageIOError). ``fail_at_write=0`` never fails, to count an operation's writes first.
    Reads pass through. A write rejected for an invalid name is not counted.
    """

    def __init__(self, inner: Backend, fail_at_write: int, errno_: int) -> None:
        self.inner = inner
        self.fail_at_write = fail_at_write
        self.errno = errno_
        self.writes = 0
        self.location = inner.location
        self._lock = threading.Lock()

    def _count(self, name: str) -> None:
        check_name(name)
        with self._lock:
            self.writes += 1
            failing = 0 < self.fail_at_write <= self.writes
        if failing:
            raise storage_error(name, OSError(self.errno, os.strerror(self.errno), name))

    def put(self, name: str, data: Data) -> None:
        self._count(name)
        self.inner.put(name, data)

    def create(self, name: str, data: Data) -> None:
        self._count(name)
        self.inner.create(name, data)

    def delete(self, name: str) -> None:
        self._count(name)
        self.inner.delete(name)

    def get(self, name: str) -> bytes:
        return self.inner.get(name)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        return self.inner.get_range(name, offset, length)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        return self.inner.list(prefix)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def remove_temporaries(self) -> int:
        return self.inner.remove_temporaries()

    def close(self) -> None:
        self.inner.close()
