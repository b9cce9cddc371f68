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

import errno
import os
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

from dingyuan.errors import ReadOnlyDevice, StorageError, StorageFull, StorageIOError, UsageError

_T = TypeVar("_T")


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


Buffer = bytes | memoryview


class PendingRead(Protocol):
    """A read a device started without blocking (see :class:`SoonReadable`)."""

    def when_ready(self, callback: Callable[[], None]) -> bool:
        """Call ``callback`` from any thread once the data is at hand; False if it already is."""
        ...

    def parts(self) -> list[Buffer]:
        """The bytes read, as consecutive buffers; raises the read's error."""
        ...


@runtime_checkable
class SoonReadable(Protocol):
    """What a device may offer beyond :class:`BlockDevice` so that reads are served on the event
    loop: ``read_soon`` returns at once, either a :class:`PendingRead` or None when the read
    would block in ways it cannot wait for (then ``read`` runs in the thread pool). A snapshot
    image offers it: its sequential reads are mostly cached, or being fetched by read-ahead, and
    a thread hop per request costs more than the read itself."""

    def read_soon(self, offset: int, length: int) -> PendingRead | None: ...


#: what a server is given to export: a device, or a factory that opens one at first use
DeviceSource = BlockDevice | Callable[[], BlockDevice]

#: write_zeroes writes at most this much at once, so zeroing a large range needs no large buffer
_ZERO_PIECE = 1 << 20
_ZEROES = bytes(_ZERO_PIECE)


class FileDevice:
    """A :class:`BlockDevice` over a regular file: the reference implementation the tests and the
    benchmark serve, and the model the other devices follow.

    ``write_zeroes`` writes zeros (the standard library has no call that punches a hole), so it
    leaves the range allocated; ``trim`` is a hint and does nothing. ``extents`` asks the file
    system with ``SEEK_DATA``/``SEEK_HOLE``, so holes of a sparse image are reported as zero.
    """

    def __init__(
        self, path: str | os.PathLike[str], read_only: bool = False, block_size: int = 65536
    ) -> None:
        if block_size <= 0 or block_size & (block_size - 1):
            raise UsageError(f"block size {block_size} is not a power of two")
        self._path = os.fspath(path)
        self._read_only = read_only
        self._block_size = block_size
        try:
            self._fd = os.open(self._path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise _storage_error(self._path, e) from e
        self._size = os.fstat(self._fd).st_size
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def block_size(self) -> int:
        return self._block_size

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        parts = []
        done = 0
        while done < length:
            part = self._io(os.pread, self._fd, length - done, offset + done)
            if not part:
                raise StorageIOError(name=self._path, detail=f"short read at {offset + done}")
            parts.append(part)
            done += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        self._check_writable("write")
        self._check(offset, len(data))
        view = memoryview(data)
        while view:
            written = self._io(os.pwrite, self._fd, view, offset)
            view = view[written:]
            offset += written

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_writable("write zeroes to")
        self._check(offset, length)
        end = offset + length
        while offset < end:
            piece = min(_ZERO_PIECE, end - offset)
            self.write(offset, _ZEROES[:piece] if piece < _ZERO_PIECE else _ZEROES)
            offset += piece

    def trim(self, offset: int, length: int) -> None:
        self._check_writable("trim")
        self._check(offset, length)

    def flush(self) -> None:
        if not self._read_only:
            self._io(os.fdatasync, self._fd)

    def cache(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self._io(os.posix_fadvise, self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        self._check(offset, length)
        end = offset + length
        result: list[tuple[int, bool]] = []
        pos = offset
        while pos < end:
            data = min(self._seek(pos, os.SEEK_DATA), end)
            if data > pos:
                _append_extent(result, data - pos, True)
                pos = data
            if pos < end:
                hole = min(self._seek(pos, os.SEEK_HOLE), end)
                _append_extent(result, hole - pos, False)
                pos = hole
        return result

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def _seek(self, pos: int, whence: int) -> int:
        """The next data or hole at or after ``pos``; past the last data there is only hole."""
        try:
            return os.lseek(self._fd, pos, whence)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return self._size
            raise _storage_error(self._path, e) from e

    def _io(self, call: Callable[..., _T], *args: Any) -> _T:
        try:
            return call(*args)
        except OSError as e:
            raise _storage_error(self._path, e) from e

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length <= 0 or offset + length > self._size:
            raise UsageError(f"range {offset}+{length} is outside the {self._size}-byte device")

    def _check_writable(self, action: str) -> None:
        if self._read_only:
            raise ReadOnlyDevice(name=self._path, detail=f"cannot {action} it")


def _append_extent(extents: list[tuple[int, bool]], length: int, zero: bool) -> None:
    if extents and extents[-1][1] == zero:
        extents[-1] = (extents[-1][0] + length, zero)
    else:
        extents.append((length, zero))


def _storage_error(path: str, e: OSError) -> StorageError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StorageFull(name=path)
    return StorageIOError(name=path, detail=e.strerror or str(e))
