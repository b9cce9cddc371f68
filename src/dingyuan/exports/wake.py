"""Resolving an event loop's futures from other threads, one wake-up of the loop for many.

A snapshot image's decoding threads finish reads that requests on the event loop wait for. Each
``call_soon_threadsafe`` writes to the loop's self-pipe (a system call, and a thread switch when
the loop sleeps); a thread that finishes a run of chunks completes many reads at once, and on a
busy loop several threads finish reads before it gets round to them. This waker schedules one
wake-up for all the futures resolved before the loop runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class LoopWaker:
    """Resolves futures of one loop from any thread, with one wake-up of the loop for all the
    futures resolved before it runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._ready: list[asyncio.Future[None]] = []

    def future(self) -> asyncio.Future[None]:
        """A future of the loop for :meth:`wake` to resolve (call on the loop)."""
        return self._loop.create_future()

    def wake(self, future: asyncio.Future[None]) -> None:
        """From any thread: resolve ``future`` in its loop (unless it was cancelled meanwhile)."""
        with self._lock:
            self._ready.append(future)
            if len(self._ready) > 1:  # a wake-up is already scheduled and will see it
                return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for future in ready:
            if not future.done():
                future.set_result(None)
