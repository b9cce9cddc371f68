"""The iSCSI target server: listens on a TCP portal, keeps the targets it exports, logs
connections in and runs their full feature phase.

:class:`IscsiServer` lives in a running event loop (``await start()``, ``await close()``); SCSI
commands run in its thread pool. :class:`ThreadedIscsiServer` runs one in a background thread for
synchronous callers and tests::

    with ThreadedIscsiServer(host="127.0.0.1", port=0) as server:
        server.add("iqn.2026-11.org.dingyuan:disk", FileDevice("disk.img", read_only=True))
        ... iscsi://127.0.0.1:{server.port}/iqn.2026-11.org.dingyuan:disk/0 ...

Sessions: a new session (TSIH 0) from an initiator port that already has one with the target
replaces it (session reinstatement, as after an initiator lost its connection); a connection may
join a session up to its negotiated MaxConnections, and one that reuses a CID replaces the old
connection. When a session's last connection ends, the session ends (error recovery level 0,
DefaultTime2Retain 0) and the SCSI target forgets its nexus.

A connection never takes the server down: a client that vanishes, stalls in the login longer than
``login_timeout``, leaves a ping (NOP-In, after ``ping_interval`` of silence) unanswered or breaks
the protocol loses its connection and the reason is logged (logger ``dingyuan.iscsi``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from dingyuan.errors import UsageError
from dingyuan.exports import access
from dingyuan.exports.blockdev import DeviceSource
from dingyuan.exports.iscsi import pdu as p
from dingyuan.exports.iscsi.chap import Credentials
from dingyuan.exports.iscsi.connection import PING_INTERVAL, WRITE_BUDGET, ByteBudget, Connection
from dingyuan.exports.iscsi.login import Login, LoginResult, refusal
from dingyuan.exports.iscsi.pdu import ProtocolViolation
from dingyuan.exports.iscsi.session import Session, Target
from dingyuan.exports.iscsi.text import LoginRefused, Pairs, TargetConfig
from dingyuan.exports.threaded import ThreadedServer

log = logging.getLogger("dingyuan.iscsi")


@dataclass(frozen=True)
class SessionInfo:
    """A logged-in session, as :meth:`IscsiServer.sessions` reports it."""

    target: str  # empty for a discovery session
    initiator: str
    peers: tuple[str, ...]
    commands: int
    bytes_read: int
    bytes_written: int


class IscsiServer:
    """An iSCSI target server inside the running event loop."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 3260,
        advertise: str | None = None,
        portal_group_tag: int = 1,
        config: TargetConfig | None = None,
        workers: int = 16,
        login_timeout: float = 30.0,
        ping_interval: float = PING_INTERVAL,
        max_connections: int = 256,
    ) -> None:
        self._host = host
        self._port = port
        self._advertise = advertise
        self.portal_group_tag = portal_group_tag
        self.config = config or TargetConfig()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="iscsi-io")
        self._login_timeout = login_timeout
        self._ping_interval = ping_interval
        self._max_connections = max_connections
        self._targets: dict[str, Target] = {}
        self._sessions: dict[int, Session] = {}
        self.write_budget = ByteBudget(WRITE_BUDGET)
        self._handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._server: asyncio.Server | None = None
        self._bound_port: int | None = None

    @property
    def port(self) -> int:
        if self._bound_port is None:
            raise UsageError("the iSCSI server is not listening")
        return self._bound_port

    def add(
        self,
        name: str,
        device: DeviceSource,
        *,
        identity: str | None = None,
        chap: Credentials | None = None,
        mutual_chap: Credentials | None = None,
        allowed_clients: Iterable[access.IpNetwork | str] | None = None,
    ) -> None:
        """Export ``device`` (or what a factory returns, opened at the first login) as target
        ``name`` (an IQN), LUN 0. ``identity`` (default: the name) fixes the disk's serial and
        NAA id; ``chap``: the initiator must authenticate with these credentials;
        ``mutual_chap``: the target's own, for initiators that check the target."""
        if name in self._targets:
            raise UsageError(f"target {name} is already exported")
        self._targets[name] = Target(
            name,
            device,
            identity=identity,
            chap=chap,
            mutual_chap=mutual_chap,
            allowed_clients=allowed_clients,
        )
        log.info("exporting target %s", name)

    async def remove(self, name: str) -> None:
        """Stop exporting ``name``: its sessions are ended, the call returns once their running
        commands finished, and a factory's device is closed."""
        target = self._targets.pop(name, None)
        if target is None:
            raise UsageError(f"no target {name}")
        target.removed = True
        await self._end_sessions(list(target.sessions))
        await asyncio.get_running_loop().run_in_executor(self._executor, target.close)
        log.info("no longer exporting target %s", name)

    def names(self) -> list[str]:
        return sorted(self._targets)

    def sessions(self) -> list[SessionInfo]:
        return [
            SessionInfo(
                target="" if s.target is None else s.target.name,
                initiator=s.initiator_name,
                peers=tuple(c.peer_text for c in s.connections.values()),
                commands=sum(c.commands for c in s.connections.values()),
                bytes_read=sum(c.bytes_read for c in s.connections.values()),
                bytes_written=sum(c.bytes_written for c in s.connections.values()),
            )
            for s in self._sessions.values()
        ]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port, limit=1 << 20)
        self._bound_port = self._server.sockets[0].getsockname()[1]
        log.info("iSCSI target listening on %s port %d", self._host, self._bound_port)

    async def close(self) -> None:
        """Stop listening, end every session, wait for running commands, close the devices."""
        if self._server is not None:
            self._server.close()
        for writer in self._handlers.values():
            writer.transport.abort()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        for target in self._targets.values():
            target.close()
        self._targets.clear()
        self._executor.shutdown(wait=True)

    # -- discovery ----------------------------------------------------------------------------

    def send_targets(self, value: str, session: Session, writer: asyncio.StreamWriter) -> Pairs:
        """The answer to ``SendTargets=value``: every target this initiator may log in to (All,
        in a discovery session), or the named one, or the session's own (empty value)."""
        peer = access.peer_address(writer)
        if value == "All" and session.target is None:
            targets = [t for t in self._targets.values() if t.admits(peer)]
        elif value == "":
            targets = [] if session.target is None else [session.target]
        else:
            target = self._targets.get(value)
            targets = [target] if target is not None and target.admits(peer) else []
        address = self._portal_address(writer)
        pairs: Pairs = []
        for target in sorted(targets, key=lambda t: t.name):
            pairs.append(("TargetName", target.name))
            pairs.append(("TargetAddress", f"{address},{self.portal_group_tag}"))
        return pairs

    def _portal_address(self, writer: asyncio.StreamWriter) -> str:
        """host:port to give initiators: the advertised name, or the address they reached."""
        host = self._advertise or str(writer.get_extra_info("sockname")[0])
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    # -- connections --------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task: asyncio.Task[None] = asyncio.current_task()  # type: ignore[assignment]
        peer = access.peer_address(writer)
        peer_text = str(peer)
        if len(self._handlers) >= self._max_connections:
            log.warning("refused initiator %s: already %d connections", peer_text, len(self._handlers))
            writer.transport.abort()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._handlers[task] = writer
        try:
            await self._serve(reader, writer, peer, peer_text)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            log.debug("initiator %s went away: %s", peer_text, e)
        except LoginRefused as e:
            log.info("initiator %s: login refused: %s", peer_text, e)
        except (ProtocolViolation, TimeoutError) as e:
            log.info("initiator %s dropped: %s", peer_text, e or "login timed out")
        except Exception:
            log.exception("initiator %s: unexpected error; connection dropped", peer_text)
        finally:
            writer.transport.abort()
            del self._handlers[task]

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: access.IpAddress | None,
        peer_text: str,
    ) -> None:
        login = Login(
            self._find_target,
            peer=peer,
            config=self.config,
            stat_sn=secrets.randbits(32),
            portal_group_tag=self.portal_group_tag,
        )
        bound: list[Session] = []
        try:
            result = await asyncio.wait_for(self._login(login, reader, writer, bound), self._login_timeout)
        except BaseException:
            # bound, but the final response never went out: the session has no connection to end it
            if bound and not bound[0].connections:
                await self._forget(bound[0])
            raise
        session = bound[0]
        connection = Connection(
            self,
            session,
            reader,
            writer,
            cid=result.cid,
            stat_sn=login.stat_sn,
            executor=self._executor,
            peer_text=peer_text,
            params=result.params,
            ping_interval=self._ping_interval,
        )
        old = session.connections.get(result.cid)
        if old is not None:
            old.hang_up()  # connection reinstatement: the new one takes the CID
        session.connections[result.cid] = connection
        log.info(
            "initiator %s (%s) logged in to %s",
            peer_text,
            session.initiator_name,
            "discovery" if session.target is None else session.target.name,
        )
        try:
            await connection.run()
        finally:
            if session.connections.get(result.cid) is connection:
                del session.connections[result.cid]
            session.forget_waiting(connection)
            if not session.connections:
                await self._forget(session)

    async def _login(
        self,
        login: Login,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        bound: list[Session],
    ) -> LoginResult:
        max_recv = self.config.max_recv_data_segment_length
        while True:
            header = await reader.readexactly(p.BHS_SIZE)
            bhs = p.parse_bhs(header, max_data_segment_length=max_recv)
            rest = await reader.readexactly(p.remaining_length(bhs, header_digest=False, data_digest=False))
            request = p.parse_pdu(header + rest, max_data_segment_length=max_recv)

            def bind(result: LoginResult) -> int:
                session = self._bind(result)
                bound.append(session)
                return session.tsih

            try:
                response, result = login.receive(request, tsih_for=bind)
            except LoginRefused as refused:
                writer.write(p.build_pdu(refusal(request.bhs, refused, stat_sn=login.stat_sn)))
                await writer.drain()
                raise
            writer.write(p.build_pdu(response))
            await writer.drain()
            if result is not None:
                return result

    def _find_target(self, name: str, peer: access.IpAddress | None) -> Target:
        target = self._targets.get(name)
        if target is None:
            raise LoginRefused(
                f"no target named {name}",
                status_class=p.STATUS_INITIATOR_ERROR,
                status_detail=p.DETAIL_NOT_FOUND,
            )
        if not target.admits(peer):
            raise LoginRefused(
                f"initiator at {peer} may not log in to {name}",
                status_class=p.STATUS_INITIATOR_ERROR,
                status_detail=p.DETAIL_AUTHORIZATION_FAILURE,
            )
        return target

    def _bind(self, result: LoginResult) -> Session:
        """The session a completed login joins or starts."""
        target = result.target
        assert target is None or isinstance(target, Target)
        if result.tsih != 0:
            session = self._sessions.get(result.tsih)
            if (
                session is None
                or session.isid != result.isid
                or session.initiator_name != result.params.initiator_name
                or session.target is not target
            ):
                raise LoginRefused(
                    f"no session with TSIH {result.tsih} for this initiator",
                    status_class=p.STATUS_INITIATOR_ERROR,
                    status_detail=p.DETAIL_SESSION_DOES_NOT_EXIST,
                )
            if (
                result.cid not in session.connections
                and len(session.connections) >= session.params.max_connections
            ):
                raise LoginRefused(
                    f"the session already has its {session.params.max_connections} connection(s)",
                    status_class=p.STATUS_INITIATOR_ERROR,
                    status_detail=p.DETAIL_TOO_MANY_CONNECTIONS,
                )
            return session
        if target is not None and target.removed:
            raise LoginRefused(
                f"target {target.name} is being removed",
                status_class=p.STATUS_INITIATOR_ERROR,
                status_detail=p.DETAIL_TARGET_REMOVED,
            )
        for old in list(self._sessions.values()):
            if (
                old.target is target
                and old.isid == result.isid
                and old.initiator_name == result.params.initiator_name
            ):
                log.info(
                    "initiator %s reinstates its session with %s", old.initiator_name, old.nexus.target_port
                )
                for connection in list(old.connections.values()):
                    connection.hang_up()
                self._sessions.pop(old.tsih, None)
                if target is not None:
                    target.sessions.discard(old)
                self._nexus_lost(old)
        tsih = self._new_tsih()
        session = Session(
            tsih=tsih,
            isid=result.isid,
            params=result.params,
            target=target,
            exp_cmd_sn=result.cmd_sn,
            portal_group_tag=self.portal_group_tag,
        )
        self._sessions[tsih] = session
        if target is not None:
            target.sessions.add(session)
        return session

    def _new_tsih(self) -> int:
        while True:
            tsih = secrets.randbelow(0xFFFF) + 1
            if tsih not in self._sessions:
                return tsih

    async def _forget(self, session: Session) -> None:
        if self._sessions.get(session.tsih) is session:
            del self._sessions[session.tsih]
        if session.target is not None and session in session.target.sessions:
            session.target.sessions.discard(session)
            self._nexus_lost(session)

    def _nexus_lost(self, session: Session) -> None:
        target = session.target
        if target is not None and target.opened is not None:
            target.opened.nexus_lost(session.nexus)

    async def _end_sessions(self, sessions: list[Session]) -> None:
        connections = [c for s in sessions for c in s.connections.values()]
        handlers = [t for t, w in self._handlers.items() if any(c.writer is w for c in connections)]
        for connection in connections:
            connection.hang_up()
        await asyncio.gather(*handlers, return_exceptions=True)


class ThreadedIscsiServer(ThreadedServer[IscsiServer]):
    """An :class:`IscsiServer` running in a background thread with its own event loop, for
    synchronous callers and tests. A context manager; the methods are safe from any thread."""

    def __init__(self, **options: Any) -> None:
        super().__init__(lambda: IscsiServer(**options), name="iscsi-server")

    def sessions(self) -> list[SessionInfo]:
        return self.call(IscsiServer.sessions)
