"""The NBD transmission phase: the request loop of one connection.

One coroutine reads requests; each request then runs as its own task, its device call in the
server's thread pool, so several requests are in flight and replies may go out in any order (the
protocol allows it; a per-connection lock keeps each reply's bytes together). Reads of a device
that can start them without blocking (:class:`SoonReadable`: a snapshot image) skip the thread
pool: the task starts the read on the event loop and is woken once its data is at hand, and the
reply is written as the device's buffers, without joining them. On a few cores, a thread switch
per request cost more than serving it; a sequential stream's reads are mostly cached already.

What a client can make the server hold is bounded: at most ``max_in_flight`` requests and
``byte_budget`` bytes of read and write data per connection, and no request payload over
:data:`wire.MAX_PAYLOAD` (the reader stops reading, so the client's own socket buffer absorbs the
rest).

Errors a client causes get the protocol's errno and the connection goes on: a bad range or flag
EINVAL, a write to a read-only export EPERM, a write past the end ENOSPC. A header with a bad
magic, or a WRITE announcing more than MAX_PAYLOAD, ends the connection (the stream can no longer
be trusted, or would cost too much to skip). Device errors are mapped: ReadOnlyDevice EPERM,
StorageFull ENOSPC, UsageError EINVAL, anything else EIO and logged.

WRITE_ZEROES calls the device's ``write_zeroes`` (which may leave a hole), or with NO_HOLE writes
zeros as data, so the range ends up allocated whatever the device. With FAST_ZERO it succeeds
only where the device already reports the range as zero (nothing to do); otherwise it fails at
once with ENOTSUP, as the protocol asks of a server that cannot zero faster than it writes: a
BlockDevice does not say whether its zeroing is cheap.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

from dingyuan.errors import DingyuanError, ReadOnlyDevice, StorageFull, UsageError
from dingyuan.exports.blockdev import BlockDevice, Buffer, SoonReadable
from dingyuan.exports.nbd import wire
from dingyuan.exports.wake import LoopWaker

log = logging.getLogger("dingyuan.nbd")

_T = TypeVar("_T")

#: a structured read is sent in pieces of this size, each as soon as it is read, and a piece of
#: zeros is sent as a hole
READ_PIECE = 1 << 20
#: replies up to this size are joined (copied: cheaper than a system call) and sent together with
#: the others of the same turn of the event loop
SMALL_REPLY = 32 << 10
#: at most this many descriptors answer one BLOCK_STATUS (the protocol lets a server say less)
MAX_DESCRIPTORS = 4096
_ZERO_PIECE = bytes(READ_PIECE)


def transmission_flags(read_only: bool, structured: bool) -> int:
    """What an export offers. Every connection to an export shares its device, whose flush
    covers all writes, so a flush or FUA on one connection is visible on all: CAN_MULTI_CONN
    holds for writable exports too."""
    flags = wire.FLAG_HAS_FLAGS | wire.FLAG_SEND_CACHE | wire.FLAG_CAN_MULTI_CONN
    if structured:
        flags |= wire.FLAG_SEND_DF
    if read_only:
        return flags | wire.FLAG_READ_ONLY
    return (
        flags
        | wire.FLAG_SEND_FLUSH
        | wire.FLAG_SEND_FUA
        | wire.FLAG_SEND_TRIM
        | wire.FLAG_SEND_WRITE_ZEROES
        | wire.FLAG_SEND_FAST_ZERO
    )


@dataclass
class Session:
    """What the handshake agreed on, and the counters of the connection."""

    device: BlockDevice
    flags: int
    structured: bool
    #: the id of base:allocation if the client selected it for this export, else None
    meta_context: int | None
    bytes_read: int = 0
    bytes_written: int = 0
    requests: int = 0


class _Refusal(Exception):
    """A request answered with an errno before or instead of touching the device."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


class _Gone(Exception):
    """The client is gone: a reply could not be sent."""


class _Budget:
    """Bytes of request and reply data a connection may hold at once. A single request larger
    than the whole budget waits until nothing else is held, then goes alone. Requests are let in
    in the order they asked; one that fits goes on at once, without a wait or a lock."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, amount: int) -> int:
        amount = min(amount, self._capacity)
        if not self._waiting and self._used + amount <= self._capacity:
            self._used += amount
            return amount
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((amount, granted))
        try:
            await granted  # release() counted it before granting
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release(amount)
            raise
        return amount

    def release(self, amount: int) -> None:
        self._used -= amount
        while self._waiting and self._used + self._waiting[0][0] <= self._capacity:
            amount, granted = self._waiting.popleft()
            if not granted.done():  # else cancelled: nobody waits for it
                self._used += amount
                granted.set_result(None)


_ALLOWED_FLAGS = {
    wire.CMD_READ: wire.CMD_FLAG_DF,
    wire.CMD_WRITE: 0,
    wire.CMD_FLUSH: 0,
    wire.CMD_TRIM: 0,
    wire.CMD_CACHE: 0,
    wire.CMD_WRITE_ZEROES: wire.CMD_FLAG_NO_HOLE | wire.CMD_FLAG_FAST_ZERO,
    wire.CMD_BLOCK_STATUS: wire.CMD_FLAG_REQ_ONE,
}
_WRITES = frozenset({wire.CMD_WRITE, wire.CMD_TRIM, wire.CMD_WRITE_ZEROES})
_COMMAND_NAMES = {
    wire.CMD_READ: "read",
    wire.CMD_WRITE: "write",
    wire.CMD_FLUSH: "flush",
    wire.CMD_TRIM: "trim",
    wire.CMD_CACHE: "cache",
    wire.CMD_WRITE_ZEROES: "write zeroes",
    wire.CMD_BLOCK_STATUS: "block status",
}


class Transmission:
    """Serves one connection's requests until the client disconnects."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: Session,
        executor: Executor,
        *,
        label: str,
        max_in_flight: int = 16,
        byte_budget: int = 64 << 20,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._session = session
        self._device = session.device
        self._read_soon = session.device.read_soon if isinstance(session.device, SoonReadable) else None
        self._executor = executor
        self._waker = LoopWaker(asyncio.get_running_loop())
        self._label = label
        self._slots = asyncio.Semaphore(max_in_flight)
        self._budget = _Budget(byte_budget)
        self._send_lock = asyncio.Lock()
        self._unsent: list[Buffer] = []  # small replies of this turn of the loop, written at its end
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Read and dispatch requests until NBD_CMD_DISC, end of stream or a violation; return
        only once every request already read has been answered (or its reply could not be sent)."""
        try:
            await self._loop()
        finally:
            while self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self._flush()

    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                header = await self._reader.readexactly(wire.REQUEST.size)
                request = wire.parse_request(header)
                if request.type == wire.CMD_DISC:
                    return
                held = 0
                payload = b""
                if request.type == wire.CMD_WRITE:
                    if request.length > wire.MAX_PAYLOAD:
                        raise wire.ProtocolViolation(
                            f"a write of {request.length} bytes is over the {wire.MAX_PAYLOAD}-byte limit"
                        )
                    held = await self._budget.acquire(request.length)
                    payload = await self._reader.readexactly(request.length)
                elif request.type == wire.CMD_READ and request.length <= wire.MAX_PAYLOAD:
                    held = await self._budget.acquire(request.length)
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(self._serve(request, payload, held))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, request: wire.Request, payload: bytes, held: int) -> None:
        self._session.requests += 1
        try:
            try:
                self._check(request)
                await self._dispatch(request, payload)
            except _Refusal as refusal:
                await self._send_error(request, refusal.error, refusal.message)
            except DingyuanError as e:
                error, message = _errno_of(e)
                if error == wire.EIO:
                    log.error("%s: %s failed: %s", self._label, _name(request.type), e)
                await self._send_error(request, error, message)
            except _Gone:
                raise
            except Exception:
                log.exception("%s: %s failed unexpectedly", self._label, _name(request.type))
                await self._send_error(request, wire.EIO, "I/O error on the server")
        except _Gone as e:
            log.debug("%s: the client is gone: %s", self._label, e.__cause__ or e)
            self._writer.transport.abort()
        finally:
            if held:
                self._budget.release(held)
            self._slots.release()

    def _check(self, request: wire.Request) -> None:
        """Refuse what the request itself gets wrong, before any device call."""
        kind, flags = request.type, request.flags
        if kind not in _ALLOWED_FLAGS:
            raise _Refusal(wire.EINVAL, f"unknown command {kind}")
        allowed = _ALLOWED_FLAGS[kind]
        if self._session.flags & wire.FLAG_SEND_FUA:
            allowed |= wire.CMD_FLAG_FUA
        if not self._session.structured:
            allowed &= ~wire.CMD_FLAG_DF
        if self._session.flags & wire.FLAG_READ_ONLY:
            allowed &= ~wire.CMD_FLAG_FAST_ZERO
        if flags & ~allowed:
            raise _Refusal(wire.EINVAL, f"flags {flags:#x} are not valid for {_name(kind)}")
        if kind == wire.CMD_FLUSH:
            if request.offset or request.length:
                raise _Refusal(wire.EINVAL, "a flush has zero offset and length")
            return
        if kind in _WRITES and self._session.flags & wire.FLAG_READ_ONLY:
            raise _Refusal(wire.EPERM, "the export is read-only")
        if request.length == 0:
            raise _Refusal(wire.EINVAL, f"a {_name(kind)} of zero bytes")
        if request.type == wire.CMD_READ and request.length > wire.MAX_PAYLOAD:
            raise _Refusal(wire.EINVAL, f"a read is at most {wire.MAX_PAYLOAD} bytes")
        if request.offset + request.length > self._device.size:
            error = wire.ENOSPC if kind in (wire.CMD_WRITE, wire.CMD_WRITE_ZEROES) else wire.EINVAL
            raise _Refusal(error, f"the range ends past the end of the {self._device.size}-byte export")
        if kind == wire.CMD_BLOCK_STATUS and self._session.meta_context is None:
            raise _Refusal(wire.EINVAL, "no metadata context was selected")

    async def _dispatch(self, request: wire.Request, payload: bytes) -> None:
        device, offset, length = self._device, request.offset, request.length
        fua = bool(request.flags & wire.CMD_FLAG_FUA) and not self._session.flags & wire.FLAG_READ_ONLY
        kind = request.type
        if kind == wire.CMD_READ:
            await self._read(request)
            return
        if kind == wire.CMD_WRITE:
            await self._call(device.write, offset, payload)
            self._session.bytes_written += len(payload)
        elif kind == wire.CMD_FLUSH:
            if not self._session.flags & wire.FLAG_READ_ONLY:
                await self._call(device.flush)
        elif kind == wire.CMD_TRIM:
            await self._call(device.trim, offset, length)
        elif kind == wire.CMD_CACHE:
            await self._call(device.cache, offset, length)
        elif kind == wire.CMD_WRITE_ZEROES:
            if request.flags & wire.CMD_FLAG_FAST_ZERO:
                await self._fast_zero(request)
                return
            if request.flags & wire.CMD_FLAG_NO_HOLE:
                await self._call(_write_zero_data, device, offset, length)
            else:
                await self._call(device.write_zeroes, offset, length)
        else:
            await self._block_status(request)
            return
        if fua:
            await self._call(device.flush)
        await self._send(wire.build_simple_reply(0, request.cookie))

    async def _fast_zero(self, request: wire.Request) -> None:
        if request.flags & wire.CMD_FLAG_NO_HOLE:
            raise _Refusal(wire.ENOTSUP, "zeroing with allocation is not faster than writing")
        extents = await self._call(self._device.extents, request.offset, request.length)
        if not all(zero for _, zero in extents):
            raise _Refusal(wire.ENOTSUP, "zeroing data is not faster than writing")
        await self._send(wire.build_simple_reply(0, request.cookie))

    async def _read(self, request: wire.Request) -> None:
        cookie, offset, length = request.cookie, request.offset, request.length
        if not self._session.structured:
            # the header says success or failure before the data, so read it all first
            parts = await self._read_parts(offset, length)
            await self._send(wire.build_simple_reply(0, cookie), *parts)
            self._session.bytes_read += length
            return
        if request.flags & wire.CMD_FLAG_DF or length <= READ_PIECE:
            parts = await self._read_parts(offset, length)
            await self._send(wire.build_offset_data_header(cookie, offset, length, done=True), *parts)
            self._session.bytes_read += length
            return
        end = offset + length
        while offset < end:
            # pieces aligned to READ_PIECE, so a client's aligned reads give aligned chunks
            piece = min(end, (offset // READ_PIECE + 1) * READ_PIECE) - offset
            parts = await self._read_parts(offset, piece)
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            if data == (_ZERO_PIECE if piece == READ_PIECE else bytes(piece)):
                await self._send(wire.build_offset_hole(cookie, offset, piece))
            else:
                await self._send(wire.build_offset_data_header(cookie, offset, piece), data)
            self._session.bytes_read += piece
            offset += piece
        await self._send(wire.build_none(cookie))

    async def _read_parts(self, offset: int, length: int) -> list[Buffer]:
        """The range's bytes: on the event loop if the device can start the read without
        blocking (one wake-up when its data is at hand), else its ``read`` in the thread pool."""
        if self._read_soon is not None:
            pending = self._read_soon(offset, length)
            if pending is not None:
                woken = self._waker.future()
                if pending.when_ready(lambda: self._waker.wake(woken)):
                    await woken
                return pending.parts()
        return [await self._call(self._device.read, offset, length)]

    async def _block_status(self, request: wire.Request) -> None:
        extents = await self._call(self._device.extents, request.offset, request.length)
        limit = 1 if request.flags & wire.CMD_FLAG_REQ_ONE else MAX_DESCRIPTORS
        descriptors = [(n, wire.STATE_HOLE | wire.STATE_ZERO if zero else 0) for n, zero in extents[:limit]]
        context = self._session.meta_context
        assert context is not None  # checked in _check
        await self._send(wire.build_block_status(request.cookie, context, descriptors))

    async def _send_error(self, request: wire.Request, error: int, message: str) -> None:
        if self._session.structured:
            await self._send(wire.build_error(request.cookie, error, message))
        else:
            await self._send(wire.build_simple_reply(error, request.cookie))

    async def _send(self, *parts: Buffer) -> None:
        """Write one reply. A small one (up to ``SMALL_REPLY`` bytes) is joined and goes with the
        other small replies of this turn of the event loop, at its end, in one ``send``: each
        system call lets the decoding threads take the GIL, which the loop then waits to get
        back, and the reads a snapshot finishes together resume in the same turn."""
        async with self._send_lock:
            if self._writer.is_closing():
                raise _Gone("the connection is closed")
            try:
                if sum(len(part) for part in parts) <= SMALL_REPLY:
                    if not self._unsent:
                        asyncio.get_running_loop().call_soon(self._flush)
                    self._unsent += parts
                else:
                    self._flush()
                    for part in parts:  # not writelines: before Python 3.12 it joins (copies) the data
                        self._writer.write(part)
                await self._writer.drain()
            except (ConnectionError, OSError) as e:
                raise _Gone(str(e)) from e

    def _flush(self) -> None:
        """Write the small replies not written yet, as one buffer."""
        if self._unsent:
            data = b"".join(self._unsent)
            self._unsent.clear()
            if not self._writer.is_closing():
                self._writer.write(data)

    async def _call(self, function: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)


def _write_zero_data(device: BlockDevice, offset: int, length: int) -> None:
    """Zeros written as data: NBD_CMD_FLAG_NO_HOLE wants the range allocated, and a device's
    ``write_zeroes`` is free to leave a hole."""
    end = offset + length
    while offset < end:
        piece = min(READ_PIECE, end - offset)
        device.write(offset, _ZERO_PIECE if piece == READ_PIECE else bytes(piece))
        offset += piece


def _errno_of(error: DingyuanError) -> tuple[int, str]:
    if isinstance(error, ReadOnlyDevice):
        return wire.EPERM, "the export is read-only"
    if isinstance(error, StorageFull):
        return wire.ENOSPC, "no space left for the export"
    if isinstance(error, UsageError):
        return wire.EINVAL, "invalid request"
    return wire.EIO, "I/O error on the server"


def _name(kind: int) -> str:
    return _COMMAND_NAMES.get(kind, f"command {kind}")
