"""The exports an NBD server offers: who may open each one, and the lifetime of its device.

An export's name is its access token (the vault hands out long random names), so names are never
listed unless the server is built listable, and never logged: logs carry :attr:`Export.label`, a
hash of the name.

Every connection to an export shares one device, so a flush on one connection covers the writes
of all of them (what NBD_FLAG_CAN_MULTI_CONN promises). A device given to :meth:`Registry.add`
belongs to the caller and is never closed here; a factory's device is opened when the first
client opens the export and closed when the last one leaves.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import Executor

from dingyuan.errors import UsageError
from dingyuan.exports import access
from dingyuan.exports.access import IpAddress, IpNetwork
from dingyuan.exports.blockdev import BlockDevice, DeviceSource
from dingyuan.exports.nbd import wire

log = logging.getLogger("dingyuan.nbd")


class Export:
    """One named export."""

    def __init__(
        self,
        name: str,
        source: DeviceSource,
        *,
        description: str = "",
        allowed_clients: Iterable[IpNetwork | str] | None = None,
        tls_required: bool = False,
    ) -> None:
        for text, what in ((name, "export name"), (description, "export description")):
            raw = text.encode("utf-8")
            if len(raw) > wire.MAX_STRING or b"\0" in raw:
                raise UsageError(f"the {what} must be at most {wire.MAX_STRING} bytes of UTF-8 without NUL")
        self.name = name
        self.description = description
        self.tls_required = tls_required
        self.allowed_clients = access.networks(allowed_clients)
        self.label = f"export #{hashlib.sha256(name.encode()).hexdigest()[:10]}"
        self.removed = False
        #: the handler task of each connection in transmission, and how to hang it up
        self.sessions: dict[asyncio.Task[None], Callable[[], None]] = {}
        self._source = source
        self._owned = callable(source)
        self._device: BlockDevice | None = None if self._owned else source  # type: ignore[assignment]
        self._users = 0
        self._lock = asyncio.Lock()

    def admits(self, peer: IpAddress | None) -> bool:
        """Whether a client at ``peer`` may open this export (see :func:`access.admits`)."""
        return access.admits(self.allowed_clients, peer)

    async def acquire(self, executor: Executor) -> BlockDevice:
        """The export's device, opened (in ``executor``: opening may read a repository) if this is
        its first user. Pair every call with :meth:`release`."""
        async with self._lock:
            if self._device is None:
                factory: Callable[[], BlockDevice] = self._source  # type: ignore[assignment]
                self._device = await asyncio.get_running_loop().run_in_executor(executor, factory)
            self._users += 1
            return self._device

    async def release(self, executor: Executor) -> None:
        async with self._lock:
            self._users -= 1
            if self._users == 0 and self._owned and self._device is not None:
                device, self._device = self._device, None
                try:
                    await asyncio.get_running_loop().run_in_executor(executor, device.close)
                except Exception:
                    log.exception("closing the device of %s failed", self.label)


class Registry:
    """The exports by name."""

    def __init__(self) -> None:
        self._exports: dict[str, Export] = {}

    def add(self, export: Export) -> None:
        if export.name in self._exports:
            raise UsageError(f"{export.label} is already exported")
        self._exports[export.name] = export

    def remove(self, name: str) -> Export:
        export = self._exports.pop(name, None)
        if export is None:
            raise UsageError("no such export")
        export.removed = True
        return export

    def get(self, name: str) -> Export | None:
        return self._exports.get(name)

    def names(self) -> list[str]:
        return sorted(self._exports)

    def exports(self) -> list[Export]:
        return [self._exports[n] for n in sorted(self._exports)]
