"""Writing a connection's replies with ``sendmsg`` straight from the buffers they are in.

asyncio's socket transport (Python 3.11) copies whatever a send does not take at once into one
bytearray, and after each later send moves what is left to its front: with megabytes of Data-In
queued behind a slow reader, that is several copies of every byte, with the GIL held. This writer
keeps the buffers themselves, in order, and hands the socket up to 512 of them per ``sendmsg``.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import deque

from dingyuan.exports.blockdev import Buffer

_MAX_PARTS = 512  # below every system's IOV_MAX (1024 on Linux)
HIGH_WATER = 1 << 20


class SocketOut:
    """The output side of a TCP connection whose input an asyncio transport still reads."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._loop = asyncio.get_running_loop()
        raw = transport.get_extra_info("socket")
        # a socket object of our own on the same connection (the transport's is a wrapper that
        # does not send); non-blocking like it, closed with it
        self._sock = socket.socket(fileno=os.dup(raw.fileno()))
        self._sock.setblocking(False)
        self._queue: deque[memoryview] = deque()
        self.queued = 0
        self._progress = asyncio.Event()  # set whenever bytes went out, or on close
        self._watching = False
        self.closed = False

    def write(self, *parts: Buffer) -> None:
        if self.closed:
            return
        for part in parts:
            if len(part):
                view = memoryview(part).cast("B")
                self._queue.append(view)
                self.queued += len(view)
        if not self._watching:
            self._send()

    async def drain(self, limit: int = HIGH_WATER) -> None:
        """Wait while more than ``limit`` bytes wait to be sent (0: until all are sent)."""
        while self.queued > limit and not self.closed:
            self._progress.clear()
            await self._progress.wait()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._watching:
            self._loop.remove_writer(self._sock.fileno())
        self._queue.clear()
        self.queued = 0
        self._sock.close()
        self._progress.set()

    def _send(self) -> None:
        while self._queue:
            parts = [self._queue[i] for i in range(min(len(self._queue), _MAX_PARTS))]
            try:
                sent = self._sock.sendmsg(parts)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            self.queued -= sent
            self._progress.set()
            while sent:
                head = self._queue[0]
                if len(head) <= sent:
                    sent -= len(head)
                    self._queue.popleft()
                else:
                    self._queue[0] = head[sent:]
                    sent = 0
        if self._queue and not self._watching:
            self._watching = True
            self._loop.add_writer(self._sock.fileno(), self._send)
        elif not self._queue and self._watching:
            self._watching = False
            self._loop.remove_writer(self._sock.fileno())
