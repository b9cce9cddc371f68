"""The vault's HTTPS server: uvicorn serving :func:`dingyuan.vault.app.create_app`, behind a
listener that refuses plaintext HTTP.

Every connection is accepted here, not by uvicorn. Before anything reads from it, the listener
peeks at its first byte (``MSG_PEEK``, so nothing is consumed):

- ``0x16`` (a TLS handshake record): ``loop.connect_accepted_socket(..., ssl=...)`` runs the TLS
  handshake (TLS 1.2 or newer, the vault's ``tls/server.pem``) and hands the connection to
  uvicorn's HTTP protocol, exactly as uvicorn's own ``create_server(..., ssl=...)`` would.
- anything else (someone typed ``http://``): the client gets ``HTTP/1.1 400`` with
  "this vault only speaks HTTPS: use https://HOST:PORT/", the connection is closed, and an audit
  event records it (actor ``anonymous``, action ``plaintext-http``, outcome ``denied``).

Uvicorn itself runs unchanged but for one method: :class:`_UvicornServer` overrides
``Server.startup`` to start this listener instead of ``loop.create_server``; uvicorn's lifespan,
main loop, signal handling (SIGINT, SIGTERM) and graceful shutdown (stop accepting, let running
requests finish, at most :data:`GRACEFUL_SECONDS`) are its own. Idle keep-alive connections (an
agent between two polls) are closed at once; a TLS close waits at most :data:`TLS_CLOSE_SECONDS`
for the client's answering ``close_notify`` (asyncio's default is 30 s, which held every stop
with an agent connected for the whole graceful limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any, cast

import uvicorn
from fastapi import APIRouter

from ..errors import ListenError, UsageError, VaultError
from .app import API_PREFIX, create_app
from .auth import ANONYMOUS, record_event
from .boots import EXTRA as BOOTS
from .boots import BootService
from .config import VaultConfig
from .context import VaultContext
from .exports import EXTRA as EXPORTS
from .exports import ExportService
from .service import Housekeeper

TLS_HANDSHAKE = 0x16  # first byte of a TLS record carrying a handshake (ClientHello)
SNIFF_SECONDS = 10.0  # a client that sends nothing for this long is dropped
HANDSHAKE_SECONDS = 15.0
GRACEFUL_SECONDS = 10
TLS_CLOSE_SECONDS = 1.0
PLAINTEXT_READ_LIMIT = 16 << 10
log = logging.getLogger(__name__)

_HOST_HEADER = re.compile(
    rb"^host:[ \t]*([A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::(\d{1,5}))?[ \t]*$", re.I | re.M
)


def tls_context(cfg: VaultConfig) -> ssl.SSLContext:
    """The server side of the vault's TLS: its certificate, TLS 1.2 or newer, HTTP/1.1."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8443`` for IPv6) -> (host, port)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", text.strip())
    port = int((m.group(2) or m.group(4)) if m else -1)
    if m is None or not 0 <= port <= 65535:
        raise UsageError(
            f"cannot read listen address {text!r}: use HOST:PORT, e.g. 0.0.0.0:8443 or [::]:8443"
        )
    return m.group(1) or m.group(3), port


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.create_server(address, family=family, backlog=1024)
    except OSError as e:
        raise ListenError(address=f"{_url_host(host)}:{port}", detail=e.strerror or str(e)) from None
    sock.setblocking(False)
    return sock


class _SniffingListener:
    """Accepts connections on ``sock`` and routes each by its first byte: TLS to ``protocol_factory``
    (uvicorn's protocol) through ``ssl_ctx``, anything else to a refusal. Has the two methods
    uvicorn's shutdown calls on its servers: ``close`` and ``wait_closed``."""

    def __init__(
        self,
        sock: socket.socket,
        ssl_ctx: ssl.SSLContext,
        protocol_factory: Callable[[], asyncio.Protocol],
        on_plaintext: Callable[[socket.socket, bytes], None],
    ) -> None:
        self.sock = sock
        self.ssl_ctx = ssl_ctx
        self.protocol_factory = protocol_factory
        self.on_plaintext = on_plaintext
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as e:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed: %s", e)
                await asyncio.sleep(0.5)
                continue
            task = loop.create_task(self._route(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _route(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        # small answers must not wait for the client's delayed ACK (Nagle): 40 ms per request
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handed_over = False
        try:
            first = await asyncio.wait_for(_peek(conn), SNIFF_SECONDS)
            if first and first[0] == TLS_HANDSHAKE:
                await asyncio.get_running_loop().connect_accepted_socket(
                    self.protocol_factory,
                    conn,
                    ssl=self.ssl_ctx,
                    ssl_handshake_timeout=HANDSHAKE_SECONDS,
                    ssl_shutdown_timeout=TLS_CLOSE_SECONDS,
                )
                handed_over = True  # the transport owns the socket now
            elif first:
                await self._refuse(conn)
        except (OSError, ssl.SSLError, TimeoutError) as e:
            log.debug("connection dropped before HTTP: %s", e)
        finally:
            if not handed_over:
                conn.close()

    async def _refuse(self, conn: socket.socket) -> None:
        """Answer plaintext HTTP with a 400 that names the HTTPS URL, then close."""
        loop = asyncio.get_running_loop()
        head = await _read_some(conn, PLAINTEXT_READ_LIMIT, 2.0)
        here, port = conn.getsockname()[:2]
        m = _HOST_HEADER.search(head)
        host = f"{m.group(1).decode()}:{port}" if m else f"{_url_host(here)}:{port}"
        body = f"this vault only speaks HTTPS: use https://{host}/\n".encode()
        await loop.sock_sendall(
            conn,
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body,
        )
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
        self.on_plaintext(conn, head)
        # read on briefly: closing with unread input would reset the connection and could destroy
        # the answer before the client reads it
        await _read_some(conn, PLAINTEXT_READ_LIMIT, 0.5)

    def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        for task in self._tasks:
            task.cancel()
        self.sock.close()

    async def wait_closed(self) -> None:
        pending = [t for t in (self._accepting, *self._tasks) if t is not None]
        await asyncio.gather(*pending, return_exceptions=True)


async def _peek(conn: socket.socket) -> bytes:
    """The first byte the client sent, left in the socket for whoever reads next (b"" at EOF)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return conn.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            pass
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(conn.fileno(), _set_done, readable)
        try:
            await readable
        finally:
            loop.remove_reader(conn.fileno())


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _read_some(conn: socket.socket, limit: int, seconds: float) -> bytes:
    """What the client sends within ``seconds``, up to ``limit`` bytes or the end of its headers."""
    loop = asyncio.get_running_loop()
    data = b""
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(seconds):
            while len(data) < limit and b"\r\n\r\n" not in data:
                more = await loop.sock_recv(conn, limit - len(data))
                if not more:
                    break
                data += more
    return data


class _UvicornServer(uvicorn.Server):
    """uvicorn's server with its listener replaced by :class:`_SniffingListener`."""

    def __init__(self, config: uvicorn.Config, vault: VaultServer) -> None:
        super().__init__(config)
        self.vault = vault

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # Mirrors uvicorn.Server.startup for one listening socket; the protocol is built the way
        # uvicorn builds it (config.http_protocol_class with the server's state and the lifespan's).
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            self.should_exit = True  # uvicorn would sys.exit(); VaultServer.run reports it
            return
        config = self.config

        def create_protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        listener = _SniffingListener(self.vault.sock, self.vault.ssl_ctx, create_protocol, self.vault.refused)
        listener.start()
        # uvicorn's shutdown() calls close() and then wait_closed() on each of self.servers
        self.servers = [cast(asyncio.Server, listener)]
        self.started = True
        self.vault.started.set()
        if self.vault.on_started is not None:
            self.vault.on_started(self.vault)


class VaultServer:
    """The API of ``ctx`` over HTTPS on ``host:port`` (port 0: a free one, see :attr:`port`).

    :meth:`run` blocks until :meth:`stop` (from any thread) or SIGINT/SIGTERM (in the main thread),
    then shuts down gracefully and returns. :attr:`started` is set once connections are accepted.
    """

    def __init__(
        self,
        ctx: VaultContext,
        host: str,
        port: int,
        *,
        extra_routers: Sequence[APIRouter] = (),
        log_level: str = "info",
        on_started: Callable[[VaultServer], None] | None = None,
        nbd_listen: str | None = None,
        iscsi_listen: str | None = None,
    ) -> None:
        self.ctx = ctx
        self.nbd_listen = nbd_listen
        self.iscsi_listen = iscsi_listen
        self.on_started = on_started
        self.host = host
        self.port = port
        self.started = threading.Event()
        self.ssl_ctx = tls_context(ctx.cfg)
        self.sock: socket.socket
        self.config = uvicorn.Config(
            create_app(ctx, extra_routers),
            log_level=log_level,
            proxy_headers=False,  # the audit log names the peer, never a header it sent
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_SECONDS,
            ws="none",
        )
        self._server = _UvicornServer(self.config, self)

    @property
    def url(self) -> str:
        return f"https://{_url_host(self.host)}:{self.port}{API_PREFIX}/"

    def run(self) -> None:
        self.sock = bind(self.host, self.port)
        self.port = self.sock.getsockname()[1]
        in_main = threading.current_thread() is threading.main_thread()
        # uvicorn handles SIGINT/SIGTERM itself (a graceful shutdown) and afterwards re-raises the
        # signal to the handler it found; this no-op one lets run() return normally instead
        previous = (
            {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
        )
        keeper = Housekeeper(self.ctx) if "ingest" not in self.ctx.extras else None
        exports = None
        try:
            if keeper:
                keeper.start()  # recovery first: no request before the spool is packed
            if self.nbd_listen is not None or self.iscsi_listen is not None:
                exports = ExportService(
                    self.ctx,
                    nbd_listen=None if self.nbd_listen is None else parse_listen(self.nbd_listen),
                    iscsi_listen=None if self.iscsi_listen is None else parse_listen(self.iscsi_listen),
                )
                self.ctx.extras[EXPORTS] = exports
                exports.start()
                self.ctx.extras[BOOTS] = BootService(exports)
            self._server.run()
        finally:
            if exports:
                exports.stop()
                del self.ctx.extras[EXPORTS]
                self.ctx.extras.pop(BOOTS, None)
            if keeper:
                keeper.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.sock.close()
        if not self._server.started:
            raise VaultError("the vault's API failed to start; its log above says why")

    def stop(self) -> None:
        """Ask the server to shut down gracefully (thread-safe)."""
        self._server.should_exit = True

    def refused(self, conn: socket.socket, head: bytes) -> None:
        """Audit a plaintext connection (in a worker thread: it writes to the catalog)."""
        peer = ""
        with contextlib.suppress(OSError):
            peer = str(conn.getpeername()[0])
        first_line = head.split(b"\r\n", 1)[0][:200].decode("latin-1")
        record = functools.partial(
            record_event,
            self.ctx.engine,
            ANONYMOUS.actor,
            "plaintext-http",
            f"{_url_host(self.host)}:{self.port}",
            "denied",
            {"client": peer, "request": first_line, "reason": "plaintext HTTP sent to the HTTPS port"},
        )
        future = asyncio.get_running_loop().run_in_executor(None, record)
        future.add_done_callback(_log_failure)


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("could not audit a plaintext connection: %s", future.exception())


def serve(
    ctx: VaultContext,
    host: str,
    port: int,
    *,
    extra_routers: Sequence[APIRouter] = (),
    log_level: str = "info",
    on_started: Callable[[VaultServer], None] | None = None,
) -> None:
    """Serve the vault's API on ``host:port`` until SIGINT or SIGTERM; ``on_started`` is called
    once it accepts connections."""
    VaultServer(
        ctx, host, port, extra_routers=extra_routers, log_level=log_level, on_started=on_started
    ).run()
