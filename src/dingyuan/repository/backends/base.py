"""The storage backend interface: the handful of operations a repository needs.

Contract (every backend, checked by ``tests/unit/test_backend_conformance.py``):

* Names are ``/``-separated relative paths of ASCII letters, digits, ``-``, ``_`` and ``.``;
  no empty components, no ``..``. Backends may map them to files, keys or rows.
* ``put`` takes the bytes as one buffer or as a list of buffers (parts, written in order:
  packs are assembled without copying). It replaces an object atomically: a reader sees the
  old or the new bytes, never a mix, and when ``put`` returns the object is durable (a later
  crash does not lose it).
* ``create`` is ``put`` that fails with :class:`~dingyuan.errors.ObjectExists` if the name
  exists, atomically (two concurrent ``create`` calls: exactly one wins).
* ``get``/``get_range`` raise :class:`~dingyuan.errors.ObjectNotFound` for a missing object.
  ``get_range`` returns exactly ``length`` bytes or raises :class:`CorruptObject`-free
  :class:`~dingyuan.errors.StorageIOError` if the object is shorter.
* ``list`` yields ``(name, size)`` for every object whose name starts with ``prefix``, in no
  particular order; objects being written (temporary files) are never listed.
* ``delete`` removes an object; deleting a missing object is not an error (idempotent).
* Out-of-space conditions raise :class:`~dingyuan.errors.StorageFull`, other I/O failures
  :class:`~dingyuan.errors.StorageIOError`; a failed ``put``/``create`` leaves no object and no
  partial object behind.

Retry, rate limiting, fault injection and caching are wrappers around a backend, not code in it.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator

from ...errors import UsageError

Buffer = bytes | bytearray | memoryview
Data = Buffer | list[Buffer]


def joined(data: Data) -> bytes:
    """The object's bytes as one ``bytes`` (for backends that cannot write parts)."""
    return b"".join(data) if isinstance(data, list) else bytes(data)


def data_len(data: Data) -> int:
    return sum(len(p) for p in data) if isinstance(data, list) else len(data)


_NAME = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid object name, else raise UsageError."""
    if not _NAME.fullmatch(name) or any(part in (".", "..") for part in name.split("/")):
        raise UsageError(f"invalid object name {name!r}")
    return name


class Backend(ABC):
    """Abstract storage backend. See the module docstring for the contract."""

    #: A short human-readable description (path or URL) for messages.
    location: str = ""

    @abstractmethod
    def put(self, name: str, data: Data) -> None:
        """Store ``data`` under ``name`` atomically and durably, replacing any old object."""

    @abstractmethod
    def create(self, name: str, data: Data) -> None:
        """Like :meth:`put`, but raise ObjectExists if ``name`` already exists."""

    @abstractmethod
    def get(self, name: str) -> bytes:
        """Return the whole object."""

    @abstractmethod
    def get_range(self, name: str, offset: int, length: int) -> bytes:
        """Return ``length`` bytes of the object starting at ``offset``."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """Yield ``(name, size)`` of every object whose name starts with ``prefix``."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Delete the object; a missing object is not an error."""

    def exists(self, name: str) -> bool:
        """True if the object exists (default: a listing of the exact name)."""
        return any(n == name for n, _ in self.list(name))

    def remove_temporaries(self) -> int:
        """Remove half-written objects left by killed writers; call only while nothing writes.

        Returns how many were removed. Backends whose writes are atomic on the server need not
        override this.
        """
        return 0

    def close(self) -> None:  # noqa: B027 -- optional hook, a no-op for most backends
        """Release resources (connections, file handles)."""
