"""An in-memory backend (a dict behind a lock) for fast unit tests. Nothing is durable."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from ...errors import ObjectExists, ObjectNotFound, StorageIOError, UsageError
from .base import Backend, Data, check_name, joined
from .local import check_prefix


class MemoryBackend(Backend):
    """Objects in a dict; thread-safe. ``objects`` is exposed for tests that inspect or damage them."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.location = f"memory:{id(self):x}"

    def put(self, name: str, data: Data) -> None:
        check_name(name)
        value = joined(data)
        with self._lock:
            self.objects[name] = value

    def create(self, name: str, data: Data) -> None:
        check_name(name)
        value = joined(data)
        with self._lock:
            if name in self.objects:
                raise ObjectExists(name=name)
            self.objects[name] = value

    def get(self, name: str) -> bytes:
        check_name(name)
        with self._lock:
            try:
                return self.objects[name]
            except KeyError:
                raise ObjectNotFound(name=name) from None

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise UsageError(f"invalid range offset={offset} length={length} of {name}")
        data = self.get(name)[offset : offset + length]
        if len(data) != length:
            raise StorageIOError(
                name=name, detail=f"short read: {len(data)} of {length} bytes at offset {offset}"
            )
        return data

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        check_prefix(prefix)
        with self._lock:
            found = [(name, len(data)) for name, data in self.objects.items() if name.startswith(prefix)]
        yield from found

    def delete(self, name: str) -> None:
        check_name(name)
        with self._lock:
            self.objects.pop(name, None)

    def exists(self, name: str) -> bool:
        check_name(name)
        with self._lock:
            return name in self.objects
