"""An asyncio protocol server (NBD, iSCSI) run in a background thread with its own event loop, for
synchronous callers (the vault, the CLI, tests). Subclasses add the server's own methods, each a
call into the loop; all of them are safe from any thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Generic, Protocol, Self, TypeVar

from dingyuan.errors import UsageError
from dingyuan.exports.blockdev import DeviceSource

_T = TypeVar("_T")


class AsyncServer(Protocol):
    """What the NBD and iSCSI servers have in common: a lifetime, a port, named exports."""

    @property
    def port(self) -> int: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    @property
    def add(self) -> Callable[..., None]:
        """add(name, device, **the server's own options)"""
        ...

    async def remove(self, name: str) -> None: ...


S = TypeVar("S", bound=AsyncServer)


class ThreadedServer(Generic[S]):
    """Runs the server ``factory`` makes (in the loop, at :meth:`start`) until :meth:`close`.
    A context manager."""

    def __init__(self, factory: Callable[[], S], *, name: str) -> None:
        self._factory = factory
        self._name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._server: S | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self._thread.start()

        async def start() -> S:
            server = self._factory()
            await server.start()
            return server

        try:
            self._server = self.run(start())
        except BaseException:
            self._stop_loop()
            raise

    def close(self) -> None:
        if self._server is not None:
            self.run(self._server.close())
            self._server = None
        self._stop_loop()

    @property
    def server(self) -> S:
        if self._server is None:
            raise UsageError(f"the {self._name} is not running")
        return self._server

    @property
    def port(self) -> int:
        return self.server.port

    def add(self, name: str, device: DeviceSource, **options: Any) -> None:
        """Export ``device`` (or what a factory returns) as ``name``; the server's own options."""
        self.call(lambda server: server.add(name, device, **options))

    def remove(self, name: str) -> None:
        """Stop exporting ``name``, once its clients are gone."""
        self.run(self.server.remove(name))

    def call(self, function: Callable[[S], _T]) -> _T:
        """``function(server)`` run in the server's loop (for its non-coroutine methods)."""

        async def call() -> _T:
            return function(self.server)

        return self.run(call())

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coroutine`` in the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _stop_loop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()
