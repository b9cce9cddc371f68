"""The block device an export serves: the one interface between the protocol servers (NBD,
iSCSI) and what they serve (a snapshot image, a clone, a plain file in tests).

Contract every implementation keeps:

- ``size`` is fixed for the life of the device, in bytes.
- Every method may be called from several threads at once (the servers run requests in a thread
  pool); an implementation serialises what needs it.
- Offsets and lengths are checked by the server before the call: ``0 <= offset``,
  ``offset + length <= size``, ``length > 0``. A device may still raise ``UsageError`` for them.
- ``read`` returns exactly ``length`` bytes. Holes read as zeros.
- On a read-only device (``read_only``), ``write``, ``write_zeroes`` and ``trim`` raise
  :class:`~dingyuan.errors.ReadOnlyDevice` and change nothing.
- A write is durable only after ``flush`` returns (as on a disk with a volatile write cache); a
  crash before then may keep or lose it, never corrupt other data.
- ``trim`` may discard the range: afterwards it reads as zeros or as its old contents.
- ``extents`` describes ``[offset, offset + length)`` as consecutive ``(length, zero)`` pairs
  whose lengths add up to ``length``; ``zero`` is True where the range is known to read as zeros
  (a hole). Saying False for a hole is allowed, never True for data.
- Errors are :class:`~dingyuan.errors.DingyuanError` subclasses: the server turns them into the
  protocol's error (EIO, EPERM, ENOSPC, ...) and keeps serving.
"""

from __future__ import annotations

from typing import Protocol


class BlockDevice(Protocol):
    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    @property
    def block_size(self) -> int:
        """The preferred I/O size and alignment (the snapshot's chunk size), a power of two."""
        ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...

    def trim(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...

    def cache(self, offset: int, length: int) -> None:
        """A hint that the range will be read soon (prefetch); may do nothing."""
        ...

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]: ...

    def close(self) -> None: ...
