"""The NBD server: listens on TCP and/or a Unix socket, keeps the export registry, and runs each
connection through the handshake and then the transmission phase.

:class:`NbdServer` lives in a running event loop (``await start()``, ``await close()``); device
calls run in its own thread pool. :class:`ThreadedNbdServer` runs one in a background thread for
synchronous callers and tests::

    with ThreadedNbdServer(host="127.0.0.1", port=0) as server:
        server.add("a-long-random-name", FileDevice("disk.img", read_only=True))
        ... nbd://127.0.0.1:{server.port}/a-long-random-name ...

A connection never takes the server down: a client that vanishes, stalls in the handshake longer
than ``handshake_timeout``, or breaks the protocol loses its connection, and the error is logged
(logger ``dingyuan.nbd``). On :meth:`NbdServer.close` or :meth:`NbdServer.remove`, connections are
hung up; requests already running finish on the device before it is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dingyuan.errors import ExportError, UsageError
from dingyuan.exports.access import IpAddress, IpNetwork, peer_address
from dingyuan.exports.blockdev import DeviceSource
from dingyuan.exports.nbd import wire
from dingyuan.exports.nbd.handshake import Policy, negotiate
from dingyuan.exports.nbd.registry import Export, Registry
from dingyuan.exports.nbd.transmission import Session, Transmission
from dingyuan.exports.threaded import ThreadedServer

log = logging.getLogger("dingyuan.nbd")


@dataclass(frozen=True)
class ConnectionInfo:
    """A connection in transmission, as :meth:`NbdServer.connections` reports it."""

    peer: str
    export: str  # the export's label, not its name
    requests: int
    bytes_read: int
    bytes_written: int


class NbdServer:
    """An NBD server inside the running event loop."""

    def __init__(
        self,
        *,
        host: str | None = "127.0.0.1",
        port: int = 10809,
        unix_path: str | os.PathLike[str] | None = None,
        tls: ssl.SSLContext | None = None,
        force_tls: bool = False,
        listable: bool = False,
        workers: int = 16,
        max_in_flight: int = 16,
        byte_budget: int = 64 << 20,
        handshake_timeout: float = 30.0,
        max_connections: int = 256,
    ) -> None:
        if host is None and unix_path is None:
            raise UsageError("an NBD server needs a TCP host or a Unix socket path")
        if force_tls and tls is None:
            raise UsageError("force_tls needs a TLS context")
        self._host = host
        self._port = port
        self._unix_path = None if unix_path is None else Path(unix_path)
        self._policy = Policy(tls=tls, force_tls=force_tls, listable=listable)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbd-io")
        self._max_in_flight = max_in_flight
        self._byte_budget = byte_budget
        self._handshake_timeout = handshake_timeout
        self._max_connections = max_connections
        self._registry = Registry()
        self._servers: list[asyncio.Server] = []
        self._handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._sessions: dict[asyncio.Task[None], tuple[str, Export, Session]] = {}
        self._bound_port: int | None = None

    @property
    def port(self) -> int:
        """The TCP port bound (the one chosen when ``port`` was 0)."""
        if self._bound_port is None:
            raise UsageError("the NBD server is not listening on TCP")
        return self._bound_port

    def add(
        self,
        name: str,
        device: DeviceSource,
        *,
        description: str = "",
        allowed_clients: Iterable[IpNetwork | str] | None = None,
        tls_required: bool = False,
    ) -> None:
        """Export ``device`` (or what a factory returns, opened on first use) as ``name``.

        ``allowed_clients``: IP networks whose TCP clients may open it (None: any client).
        ``tls_required``: only over TLS (the server needs a TLS context)."""
        if tls_required and self._policy.tls is None:
            raise UsageError("a TLS-only export needs a server with a TLS context")
        self._registry.add(
            Export(
                name,
                device,
                description=description,
                allowed_clients=allowed_clients,
                tls_required=tls_required,
            )
        )
        log.info("exporting %s", self._registry.get(name).label)  # type: ignore[union-attr]

    async def remove(self, name: str) -> None:
        """Stop exporting ``name``: new clients are refused, connected ones hung up, and the
        call returns once their running requests finished."""
        export = self._registry.remove(name)
        log.info("no longer exporting %s", export.label)
        tasks = list(export.sessions)
        for hang_up in list(export.sessions.values()):
            hang_up()
        await asyncio.gather(*tasks, return_exceptions=True)

    def names(self) -> list[str]:
        return self._registry.names()

    @property
    def open_connections(self) -> int:
        """Connections open now, in the handshake or in transmission."""
        return len(self._handlers)

    def connections(self) -> list[ConnectionInfo]:
        """The connections in transmission, with their counters."""
        return [
            ConnectionInfo(peer, export.label, s.requests, s.bytes_read, s.bytes_written)
            for peer, export, s in self._sessions.values()
        ]

    async def start(self) -> None:
        limit = 1 << 20
        if self._host is not None:
            server = await asyncio.start_server(self._handle, self._host, self._port, limit=limit)
            self._servers.append(server)
            self._bound_port = server.sockets[0].getsockname()[1]
            log.info("NBD server listening on %s port %d", self._host, self._bound_port)
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                if self._unix_path.is_socket():
                    self._unix_path.unlink()
            server = await asyncio.start_unix_server(self._handle, self._unix_path, limit=limit)
            os.chmod(self._unix_path, 0o600)
            self._servers.append(server)
            log.info("NBD server listening on %s", self._unix_path)

    async def close(self) -> None:
        """Stop listening, hang up every connection, wait for running requests, close the
        devices the server opened."""
        for server in self._servers:
            server.close()
        for writer in self._handlers.values():
            writer.transport.abort()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._unix_path.unlink()
        self._executor.shutdown(wait=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task: asyncio.Task[None] = asyncio.current_task()  # type: ignore[assignment]
        peer = peer_address(writer)
        peer_text = "local socket" if peer is None else str(peer)
        if len(self._handlers) >= self._max_connections:
            log.warning("refused client %s: already %d connections", peer_text, len(self._handlers))
            writer.transport.abort()
            return
        self._handlers[task] = writer
        try:
            await self._serve(task, reader, writer, peer, peer_text)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as e:
            log.debug("client %s went away: %s", peer_text, e)
        except (wire.ProtocolViolation, TimeoutError) as e:
            log.info("client %s dropped: %s", peer_text, e or "handshake timed out")
        except Exception:
            log.exception("client %s: unexpected error; connection dropped", peer_text)
        finally:
            writer.transport.abort()
            del self._handlers[task]

    async def _serve(
        self,
        task: asyncio.Task[None],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: IpAddress | None,
        peer_text: str,
    ) -> None:
        opened = await asyncio.wait_for(
            negotiate(
                reader,
                writer,
                registry=self._registry,
                peer=peer,
                policy=self._policy,
                executor=self._executor,
            ),
            self._handshake_timeout,
        )
        if opened is None:
            return
        export, session = opened.export, opened.session
        try:
            if export.removed:
                raise ExportError(f"{export.label} was removed during the handshake")
            export.sessions[task] = writer.transport.abort
            self._sessions[task] = (peer_text, export, session)
            log.info("client %s opened %s", peer_text, export.label)
            await Transmission(
                reader,
                writer,
                session,
                self._executor,
                label=export.label,
                max_in_flight=self._max_in_flight,
                byte_budget=self._byte_budget,
            ).run()
            log.info(
                "client %s closed %s: %d requests, %d bytes read, %d written",
                peer_text,
                export.label,
                session.requests,
                session.bytes_read,
                session.bytes_written,
            )
        finally:
            export.sessions.pop(task, None)
            self._sessions.pop(task, None)
            await export.release(self._executor)


class ThreadedNbdServer(ThreadedServer[NbdServer]):
    """An :class:`NbdServer` running in a background thread with its own event loop, for
    synchronous callers and tests. A context manager; the methods are safe from any thread."""

    def __init__(self, **options: Any) -> None:
        super().__init__(lambda: NbdServer(**options), name="nbd-server")

    def names(self) -> list[str]:
        return self.call(NbdServer.names)

    @property
    def open_connections(self) -> int:
        return self.call(lambda server: server.open_connections)

    def connections(self) -> list[ConnectionInfo]:
        return self.call(NbdServer.connections)
