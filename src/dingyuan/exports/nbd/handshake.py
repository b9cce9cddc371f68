"""The NBD handshake: fixed newstyle negotiation and option haggling, up to the transmission phase.

Options served: EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO, STRUCTURED_REPLY,
LIST_META_CONTEXT and SET_META_CONTEXT (the one context is ``base:allocation``); any other option
is answered NBD_REP_ERR_UNSUP. Export names are access tokens: LIST lists nothing unless the
server is listable, and a name that is unknown, refused by the export's allowed networks
(NBD_REP_ERR_POLICY, logged) or TLS-only on a plaintext connection (NBD_REP_ERR_TLS_REQD) is
refused the same way by INFO, GO and the META_CONTEXT options; EXPORT_NAME, which cannot answer
an error, hangs up instead.

TLS: with an SSL context the server runs the protocol's SELECTIVETLS mode (TLS-only exports are
refused until STARTTLS), or FORCEDTLS when ``force_tls`` is set (everything but STARTTLS and ABORT
is refused with NBD_REP_ERR_TLS_REQD until STARTTLS). Without one, STARTTLS is NBD_REP_ERR_UNSUP.
After STARTTLS, earlier negotiation (structured replies, meta contexts) is forgotten, as required.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from concurrent.futures import Executor
from dataclasses import dataclass

from dingyuan.errors import DingyuanError
from dingyuan.exports.access import IpAddress
from dingyuan.exports.nbd import wire
from dingyuan.exports.nbd.registry import Export, Registry
from dingyuan.exports.nbd.transmission import Session, transmission_flags

log = logging.getLogger("dingyuan.nbd")

#: the id this server gives base:allocation in NBD_OPT_SET_META_CONTEXT
BASE_ALLOCATION_ID = 1


@dataclass(frozen=True)
class Policy:
    """How the server negotiates, the same for every connection."""

    tls: ssl.SSLContext | None = None
    force_tls: bool = False
    listable: bool = False


@dataclass
class Opened:
    """The handshake's outcome: the export chosen (its device acquired) and the session."""

    export: Export
    session: Session


class _Refused(Exception):
    def __init__(self, reply: int, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


async def negotiate(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    registry: Registry,
    peer: IpAddress | None,
    policy: Policy,
    executor: Executor,
) -> Opened | None:
    """Negotiate until the client enters transmission (the export returned, its device
    acquired: the caller releases it) or leaves (None). Raises ProtocolViolation,
    IncompleteReadError or ConnectionError when the client breaks the protocol or goes away."""
    return await _Haggler(reader, writer, registry, peer, policy, executor).run()


class _Haggler:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        registry: Registry,
        peer: IpAddress | None,
        policy: Policy,
        executor: Executor,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._registry = registry
        self._peer = peer
        self._policy = policy
        self._executor = executor
        self._tls = False
        self._structured = False
        self._no_zeroes = False
        #: (export name, context id) chosen by the last SET_META_CONTEXT
        self._meta: tuple[str, int] | None = None

    async def run(self) -> Opened | None:
        self._writer.write(wire.build_greeting(wire.FLAG_FIXED_NEWSTYLE | wire.FLAG_NO_ZEROES))
        await self._writer.drain()
        client_flags = wire.parse_client_flags(await self._reader.readexactly(wire.CLIENT_FLAGS.size))
        self._no_zeroes = bool(client_flags & wire.FLAG_C_NO_ZEROES)
        while True:
            option, length = wire.parse_option_header(await self._reader.readexactly(wire.OPTION_HEADER.size))
            data = await self._reader.readexactly(length)
            if option == wire.OPT_ABORT:
                await self._reply(option, wire.REP_ACK)
                return None
            if option == wire.OPT_EXPORT_NAME:
                return await self._export_name(data)
            try:
                if self._policy.force_tls and not self._tls and option != wire.OPT_STARTTLS:
                    raise _Refused(wire.REP_ERR_TLS_REQD, "this server requires TLS: use STARTTLS")
                opened = await self._option(option, data)
            except _Refused as refused:
                await self._reply(option, refused.reply, refused.message.encode())
                continue
            except wire.ProtocolViolation as e:
                await self._reply(option, wire.REP_ERR_INVALID, str(e).encode())
                continue
            if opened is not None:
                return opened

    async def _option(self, option: int, data: bytes) -> Opened | None:
        if option in (wire.OPT_INFO, wire.OPT_GO):
            return await self._info_or_go(option, wire.parse_info_request(data))
        if option == wire.OPT_LIST:
            await self._list(data)
        elif option == wire.OPT_STARTTLS:
            await self._starttls(data)
        elif option == wire.OPT_STRUCTURED_REPLY:
            if data:
                raise _Refused(wire.REP_ERR_INVALID, "STRUCTURED_REPLY carries no data")
            self._structured = True
            await self._reply(option, wire.REP_ACK)
        elif option in (wire.OPT_LIST_META_CONTEXT, wire.OPT_SET_META_CONTEXT):
            await self._meta_context(option, wire.parse_meta_context_request(data))
        else:
            raise _Refused(wire.REP_ERR_UNSUP, f"option {option} is not supported")
        return None

    async def _reply(self, option: int, reply_type: int, data: bytes = b"") -> None:
        self._writer.write(wire.build_option_reply(option, reply_type, data))
        await self._writer.drain()

    def _resolve(self, name: str) -> Export:
        """The export ``name`` if this client may use it now, else the refusal to answer."""
        export = self._registry.get(name)
        if export is None:
            log.info("client %s asked for an unknown export", self._peer_text)
            raise _Refused(wire.REP_ERR_UNKNOWN, "no such export")
        if export.tls_required and not self._tls:
            raise _Refused(wire.REP_ERR_TLS_REQD, "this export requires TLS: use STARTTLS")
        if not export.admits(self._peer):
            log.warning("refused client %s: not allowed to use %s", self._peer_text, export.label)
            raise _Refused(wire.REP_ERR_POLICY, "this client may not use this export")
        return export

    @property
    def _peer_text(self) -> str:
        return "on the local socket" if self._peer is None else str(self._peer)

    async def _list(self, data: bytes) -> None:
        if data:
            raise _Refused(wire.REP_ERR_INVALID, "LIST carries no data")
        if self._policy.listable:
            for export in self._registry.exports():
                if export.admits(self._peer) and (self._tls or not export.tls_required):
                    await self._reply(
                        wire.OPT_LIST, wire.REP_SERVER, wire.build_rep_server(export.name, export.description)
                    )
        await self._reply(wire.OPT_LIST, wire.REP_ACK)

    async def _starttls(self, data: bytes) -> None:
        if self._policy.tls is None:
            raise _Refused(wire.REP_ERR_UNSUP, "this server does not offer TLS")
        if data:
            raise _Refused(wire.REP_ERR_INVALID, "STARTTLS carries no data")
        if self._tls:
            raise _Refused(wire.REP_ERR_INVALID, "TLS is already on")
        await self._reply(wire.OPT_STARTTLS, wire.REP_ACK)
        await self._writer.start_tls(self._policy.tls)
        self._tls = True
        self._structured = False
        self._meta = None

    async def _meta_context(self, option: int, request: wire.MetaContextRequest) -> None:
        setting = option == wire.OPT_SET_META_CONTEXT
        if setting:
            self._meta = None  # a SET replaces the earlier choice even when it fails
            if not self._structured:
                raise _Refused(wire.REP_ERR_INVALID, "negotiate structured replies first")
        self._resolve(request.name)
        if setting:
            chosen = wire.META_BASE_ALLOCATION in request.queries
        else:
            chosen = not request.queries or any(
                q in (wire.META_BASE_ALLOCATION, "base:") for q in request.queries
            )
        if chosen:
            context_id = BASE_ALLOCATION_ID if setting else 0
            await self._reply(
                option,
                wire.REP_META_CONTEXT,
                wire.build_rep_meta_context(context_id, wire.META_BASE_ALLOCATION),
            )
            if setting:
                self._meta = (request.name, BASE_ALLOCATION_ID)
        await self._reply(option, wire.REP_ACK)

    async def _open(self, export: Export) -> Session:
        try:
            device = await export.acquire(self._executor)
        except DingyuanError as e:
            log.error("%s cannot be opened: %s", export.label, e)
            raise _Refused(wire.REP_ERR_UNKNOWN, "the export cannot be opened now") from e
        meta = self._meta[1] if self._meta is not None and self._meta[0] == export.name else None
        return Session(
            device=device,
            flags=transmission_flags(device.read_only, self._structured),
            structured=self._structured,
            meta_context=meta,
        )

    async def _info_or_go(self, option: int, request: wire.InfoRequest) -> Opened | None:
        export = self._resolve(request.name)
        session = await self._open(export)
        try:
            device = session.device
            infos: list[wire.Info] = [wire.InfoExport(device.size, session.flags)]
            if wire.INFO_NAME in request.requests:
                infos.append(wire.InfoName(export.name))
            if wire.INFO_DESCRIPTION in request.requests:
                infos.append(wire.InfoDescription(export.description))
            if wire.INFO_BLOCK_SIZE in request.requests:
                preferred = min(device.block_size, wire.MAX_PAYLOAD)
                infos.append(wire.InfoBlockSize(1, preferred, wire.MAX_PAYLOAD))
            for info in infos:
                await self._reply(option, wire.REP_INFO, wire.build_info(info))
            await self._reply(option, wire.REP_ACK)
        except BaseException:
            await export.release(self._executor)
            raise
        if option == wire.OPT_INFO:
            await export.release(self._executor)
            return None
        return Opened(export, session)

    async def _export_name(self, data: bytes) -> Opened | None:
        """EXPORT_NAME cannot be refused with an error: on any refusal, hang up."""
        try:
            if self._policy.force_tls and not self._tls:
                raise _Refused(wire.REP_ERR_TLS_REQD, "TLS required")
            export = self._resolve(wire.parse_export_name(data))
            session = await self._open(export)
        except (_Refused, wire.ProtocolViolation) as e:
            log.info("client %s: EXPORT_NAME refused (%s); hanging up", self._peer_text, e)
            return None
        try:
            self._writer.write(
                wire.build_export_name_reply(session.device.size, session.flags, self._no_zeroes)
            )
            await self._writer.drain()
        except BaseException:
            await export.release(self._executor)
            raise
        return Opened(export, session)
