"""The full feature phase of one iSCSI connection (RFC 7143 sections 4-11): SCSI commands with
their Data-Out (immediate, unsolicited and solicited by R2T) and Data-In, NOP, Text (SendTargets),
task management and logout, at error recovery level 0.

One reader loop takes PDUs off the socket; non-immediate ones run in the session's CmdSN order.
SCSI commands run in the server's thread pool, several at once; their responses are written as
they finish, each with the connection's next StatSN. A command's Data-Out is buffered in full
before it runs, within a per-server byte budget, so a stalled initiator cannot make us hold more.

A PDU that breaks the protocol in a way the connection survives (an unknown opcode, a bad field)
is answered with a Reject; one after which PDU boundaries are lost (a header digest error, a
malformed header) or the session's state is undefined ends the connection, which at error
recovery level 0 ends the session: the initiator logs in again.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeGuard

from dingyuan.errors import DingyuanError
from dingyuan.exports.blockdev import Buffer, SoonReadable
from dingyuan.exports.iscsi import pdu as p
from dingyuan.exports.iscsi.pdu import Bhs, Pdu, ProtocolViolation
from dingyuan.exports.iscsi.session import SN_MASK, Session
from dingyuan.exports.iscsi.text import NOT_UNDERSTOOD, Pairs, SessionParams, build_text, parse_text
from dingyuan.exports.scsi import Response, ScsiTarget
from dingyuan.exports.scsi.sbc import BLOCK, MAX_TRANSFER
from dingyuan.exports.scsi.sense import CHECK_CONDITION, GOOD, INVALID_FIELD_IN_CDB, SenseKey, encode_sense
from dingyuan.exports.sockout import SocketOut
from dingyuan.exports.wake import LoopWaker

if TYPE_CHECKING:
    from dingyuan.exports.iscsi.server import IscsiServer

log = logging.getLogger("dingyuan.iscsi")

#: the largest Expected Data Transfer Length of one write we buffer: what the block limits VPD
#: page tells initiators (MAXIMUM TRANSFER LENGTH), in bytes
MAX_WRITE = MAX_TRANSFER * BLOCK
#: Data-In a connection holds at once (read results waiting to be written to a slow initiator)
READ_BUDGET = 2 * MAX_WRITE
#: a connection silent this long gets a ping (NOP-In); silent twice as long, it is closed
PING_INTERVAL = 30.0
#: Data-Out buffered at once by all connections of a server beyond the unsolicited first bursts;
#: a write over it waits for its R2Ts until running writes give their buffers back
WRITE_BUDGET = 2 * MAX_WRITE

TMF_ABORT_TASK = 1
TMF_ABORT_TASK_SET = 2
TMF_CLEAR_TASK_SET = 4
TMF_LUN_RESET = 5
TMF_TARGET_WARM_RESET = 6
TMF_TARGET_COLD_RESET = 7
TMF_TASK_REASSIGN = 8

TMF_COMPLETE = 0
TMF_NO_TASK = 1
TMF_NO_LUN = 2
TMF_REASSIGN_UNSUPPORTED = 4
TMF_UNSUPPORTED = 5

LOGOUT_CLOSE_SESSION = 0
LOGOUT_CLOSE_CONNECTION = 1
LOGOUT_RECOVERY = 2

#: what a write too large to buffer gets (the SCSI layer builds all other sense data)
_TOO_LARGE = Response(
    CHECK_CONDITION, sense=encode_sense(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, False)
)


def decode_lun(lun_field: int) -> int:
    """The LUN number of an 8-byte LUN field (peripheral or flat space addressing, SAM-5 4.7);
    another addressing method yields a number no target has."""
    first = lun_field >> 48
    method = first >> 14
    if method in (0, 1):  # peripheral device (bus 0) or flat space
        return first & 0x3FFF if method == 1 else (first & 0xFF if first >> 8 == 0 else 1 << 20)
    return 1 << 20


class ByteBudget:
    """Bytes of buffers (a server's Data-Out, a connection's Data-In) that may be held at once;
    a request that does not fit waits its turn, in order, without blocking a reader loop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: deque[tuple[int, Callable[[], None]]] = deque()

    def take(self, n: int, granted: Callable[[], None]) -> None:
        """Call ``granted`` once ``n`` bytes are ours (now, or when enough are released)."""
        if not self._waiting and self.used + n <= self.limit:
            self.used += n
            granted()
        else:
            self._waiting.append((n, granted))

    def release(self, n: int) -> None:
        self.used -= n
        while self._waiting and self.used + self._waiting[0][0] <= self.limit:
            n, granted = self._waiting.popleft()
            self.used += n
            granted()

    def cancel(self, granted: Callable[[], None]) -> None:
        self._waiting = deque(w for w in self._waiting if w[1] is not granted)

    async def acquire(self, n: int) -> None:
        """Wait until ``n`` bytes are ours (:meth:`release` them afterwards)."""
        done = asyncio.get_running_loop().create_future()

        def granted() -> None:
            done.set_result(None)

        self.take(n, granted)
        try:
            await done
        except asyncio.CancelledError:
            if done.done():
                self.release(n)
            else:
                self.cancel(granted)
            raise


@dataclass(eq=False)
class Task:
    """A SCSI command from its arrival until its response is written."""

    itt: int
    lun: int
    lun_field: int
    cdb: bytes
    expected_length: int
    reads: bool
    writes: bool
    buffer: bytearray = field(default_factory=bytearray)
    received: int = 0
    unsolicited_end: int = 0  # Data-Out up to here comes without an R2T
    next_offset: int = 0  # where the next R2T starts
    r2t_sn: int = 0
    #: open R2Ts by TTT: (offset, length, bytes received, next DataSN)
    r2ts: dict[int, list[int]] = field(default_factory=dict)
    unsolicited_data_sn: int = 0
    aborted: bool = False
    running: asyncio.Task[None] | None = None
    budget: int = 0  # bytes of the server's write budget this task holds
    waiting_for_budget: Callable[[], None] | None = None
    counted: bool = False  # holds a place in the session's command window

    @property
    def complete(self) -> bool:
        return self.received >= self.expected_length


class Connection:
    """One connection in the full feature phase."""

    def __init__(
        self,
        server: IscsiServer,
        session: Session,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        cid: int,
        stat_sn: int,
        executor: Executor,
        peer_text: str,
        params: SessionParams,
        ping_interval: float = PING_INTERVAL,
    ) -> None:
        self.server = server
        self.session = session
        self.cid = cid
        self._reader = reader
        self._writer = writer
        self._out = SocketOut(writer.transport)
        self._unsent: list[Buffer] = []  # PDUs written during this turn of the loop, sent at its end
        self._loop = asyncio.get_running_loop()
        self._waker = LoopWaker(self._loop)
        self._stat_sn = stat_sn
        self._executor = executor
        self.peer_text = peer_text
        # digests and MaxRecvDataSegmentLength are each connection's own (its login negotiated them)
        self._header_digest = params.header_digest == "CRC32C"
        self._data_digest = params.data_digest == "CRC32C"
        self._max_send = params.max_recv_data_segment_length
        self._max_recv = server.config.max_recv_data_segment_length
        self.tasks: dict[int, Task] = {}
        self._next_ttt = 1
        self._closing = False
        self._pending_text: dict[int, bytes] = {}  # ITT -> the rest of a long Text Response
        self.commands = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self._ping_interval = ping_interval
        self._read_budget = ByteBudget(READ_BUDGET)
        self._heard = asyncio.get_running_loop().time()  # when the initiator last sent a PDU

    # -- the reader loop ----------------------------------------------------------------------

    async def run(self) -> None:
        while self._writer.transport.get_write_buffer_size():  # the login's last response first
            await asyncio.sleep(0.001)
        pinger = asyncio.get_running_loop().create_task(self._ping())
        try:
            while not self._closing:
                await self._drain()  # an initiator that does not read makes us stop reading
                pdu = await self._read_pdu()
                self._heard = asyncio.get_running_loop().time()
                if pdu is None:
                    continue
                await self._dispatch(pdu)
        finally:
            self._closing = True
            pinger.cancel()
            await self._abort_all(self.tasks.values(), wait=True)
            self._out.close()

    async def _ping(self) -> None:
        """Ping an initiator that has been silent for ``ping_interval`` (a NOP-In that asks for a
        NOP-Out), and hang up on one still silent an interval later: an initiator that vanished
        without closing its connection must not hold its session, its reservations and its
        buffers for ever."""
        loop = asyncio.get_running_loop()
        pinged = False
        while not self._closing:
            await asyncio.sleep(self._ping_interval / 4)
            silent = loop.time() - self._heard
            if silent < self._ping_interval:
                pinged = False
            elif not pinged:
                pinged = True
                ping = Bhs(
                    opcode=p.OP_NOP_IN,
                    final=True,
                    itt=p.RESERVED_TAG,
                    tail=p.build_tail({p.OFF_TTT: self._new_ttt()}),
                )
                self._send(ping, status=False)
            elif silent >= 2 * self._ping_interval:
                log.info("%s: no answer to a ping in %.0f s; connection closed", self.peer_text, silent)
                self.hang_up()

    @property
    def writer(self) -> asyncio.StreamWriter:
        return self._writer

    def hang_up(self) -> None:
        """Close the connection at once (the reader loop ends, running commands finish)."""
        self._closing = True
        self._out.close()
        self._writer.transport.abort()

    async def _read_pdu(self) -> Pdu | None:
        header = await self._reader.readexactly(p.BHS_SIZE)
        bhs = p.parse_bhs(header, max_data_segment_length=self._max_recv)
        rest = await self._reader.readexactly(
            p.remaining_length(bhs, header_digest=self._header_digest, data_digest=self._data_digest)
        )
        try:
            return p.parse_pdu(
                header + rest,
                header_digest=self._header_digest,
                data_digest=self._data_digest,
                max_data_segment_length=self._max_recv,
            )
        except p.DataDigestError as e:
            log.info("%s: %s; PDU rejected", self.peer_text, e)
            self._reject(header, p.REJECT_DATA_DIGEST_ERROR)
            return None

    async def _dispatch(self, pdu: Pdu) -> None:
        bhs = pdu.bhs
        op = bhs.opcode
        if op == p.OP_DATA_OUT:
            self._data_out(pdu)
            return
        if op == p.OP_SNACK_REQUEST:
            self._reject(pdu, p.REJECT_COMMAND_NOT_SUPPORTED)  # error recovery level 0
            return
        if op not in (
            p.OP_SCSI_COMMAND,
            p.OP_NOP_OUT,
            p.OP_TEXT_REQUEST,
            p.OP_TASK_MGMT_REQUEST,
            p.OP_LOGOUT_REQUEST,
        ):
            if op == p.OP_LOGIN_REQUEST:
                raise ProtocolViolation("login request in the full feature phase")
            self._reject(pdu, p.REJECT_COMMAND_NOT_SUPPORTED)
            return
        if op == p.OP_NOP_OUT and bhs.itt == p.RESERVED_TAG:
            return  # the answer to our ping, or a ping that wants none
        if bhs.immediate:
            await self._execute(pdu)
            return
        for connection, ready in self.session.admit(self, pdu):
            await connection._execute(ready)

    async def _execute(self, pdu: Pdu) -> None:
        """Run one PDU whose turn in CmdSN order has come (or an immediate one)."""
        op = pdu.bhs.opcode
        if op == p.OP_SCSI_COMMAND:
            self._scsi_command(pdu)
        elif op == p.OP_NOP_OUT:
            self._nop_out(pdu)
        elif op == p.OP_TEXT_REQUEST:
            self._text(pdu)
        elif op == p.OP_TASK_MGMT_REQUEST:
            await self._task_management(pdu)
        elif op == p.OP_LOGOUT_REQUEST:
            await self._logout(pdu)

    # -- writing ------------------------------------------------------------------------------

    def _send(self, bhs: Bhs, *parts: Buffer, status: bool) -> None:
        """Write one PDU whose data segment is ``parts`` (written as they are, not joined);
        ``status`` PDUs take the next StatSN, the others carry it unchanged.

        The PDUs written in one turn of the event loop go out together at its end, in one
        ``sendmsg``: reads finished together (a snapshot's decoding threads wake the loop once
        for many) answer with one system call, and each call lets the decoding threads take the
        GIL, which the loop then waits to get back."""
        tail = bytearray(bhs.tail)
        struct.pack_into(
            ">III",
            tail,
            p.OFF_CMD_SN - 20,
            self._stat_sn,
            self.session.exp_cmd_sn,
            self.session.max_cmd_sn,
        )
        if status:
            self._stat_sn = (self._stat_sn + 1) & SN_MASK
        length = sum(len(part) for part in parts)
        header = p.build_header(
            replace(bhs, tail=bytes(tail)), data_length=length, header_digest=self._header_digest
        )
        if self._out.closed:
            return
        pad = p.padding(length) if length else b""
        digest = p.digest_of([*parts, pad]) if self._data_digest and length else b""
        if not self._unsent:
            self._loop.call_soon(self._flush)
        self._unsent += (header, *parts, pad, digest)

    def _flush(self) -> None:
        """Hand the PDUs written so far to the socket."""
        if self._unsent:
            unsent, self._unsent = self._unsent, []
            self._out.write(*unsent)

    def _reject(self, rejected: Pdu | bytes, reason: int) -> None:
        header = rejected if isinstance(rejected, bytes) else p.build_pdu(rejected)[: p.BHS_SIZE]
        bhs = Bhs(
            opcode=p.OP_REJECT,
            final=True,
            specific=bytes([reason, 0]),
            itt=p.RESERVED_TAG,
            tail=p.build_tail({p.OFF_TTT: p.RESERVED_TAG}),
        )
        self._send(bhs, header[: p.BHS_SIZE], status=True)

    async def _drain(self) -> None:
        self._flush()
        await self._out.drain()
        if self._out.closed:
            self.hang_up()

    # -- SCSI commands ------------------------------------------------------------------------

    def _scsi_command(self, pdu: Pdu) -> None:
        bhs = pdu.bhs
        target = self.session.target
        if target is None:
            raise ProtocolViolation("SCSI command in a discovery session")
        if bhs.itt in self.tasks or bhs.itt == p.RESERVED_TAG:
            self._reject(
                pdu, p.REJECT_TASK_IN_PROGRESS if bhs.itt in self.tasks else p.REJECT_INVALID_PDU_FIELD
            )
            return
        cdb = bhs.cdb
        for ahs_type, content in p.parse_ahs(pdu.ahs):
            if ahs_type == p.AHS_EXTENDED_CDB:
                cdb += content[1:]  # first byte reserved
        reads, writes = bool(bhs.flags & p.CMD_READ), bool(bhs.flags & p.CMD_WRITE)
        task = Task(
            itt=bhs.itt,
            lun=decode_lun(bhs.lun),
            lun_field=bhs.lun,
            cdb=cdb,
            expected_length=bhs.expected_data_transfer_length if writes else 0,
            reads=reads,
            writes=writes,
        )
        if not bhs.immediate:
            task.counted = True
            self.session.outstanding += 1
        self.tasks[task.itt] = task
        self.commands += 1
        read_length = bhs.expected_data_transfer_length if reads else 0
        if not writes:
            if pdu.data:
                self._reject(pdu, p.REJECT_PROTOCOL_ERROR)
                self._forget(task)
                return
            self._start(task, read_length)
            return
        if task.expected_length > MAX_WRITE:
            # too large to buffer: refuse without taking its data (Data-Out for it is dropped)
            self._forget(task)
            self._respond(task, _TOO_LARGE, 0)
            return
        params = self.session.params
        if len(pdu.data) > min(task.expected_length, params.first_burst_length) or (
            pdu.data and not params.immediate_data
        ):
            self._forget(task)
            raise ProtocolViolation(f"immediate data of {len(pdu.data)} bytes breaks the negotiated limits")
        task.received = len(pdu.data)
        task.unsolicited_end = (
            len(pdu.data) if params.initial_r2t else min(task.expected_length, params.first_burst_length)
        )
        if bhs.final:
            # F on the command: no unsolicited Data-Out follows
            task.unsolicited_end = len(pdu.data)
        task.next_offset = task.unsolicited_end
        task.buffer = bytearray(task.unsolicited_end)
        task.buffer[: len(pdu.data)] = pdu.data
        if task.unsolicited_end == task.expected_length:
            self._advance_write(task, read_length)
            return

        def granted() -> None:
            task.waiting_for_budget = None
            task.budget = task.expected_length
            task.buffer.extend(bytes(task.expected_length - len(task.buffer)))
            self._advance_write(task, read_length)

        task.waiting_for_budget = granted
        self.server.write_budget.take(task.expected_length, granted)

    def _advance_write(self, task: Task, read_length: int = 0) -> None:
        """Ask for more Data-Out, or run the command once it has all of it."""
        if task.complete:
            self._start(task, read_length)
            return
        if task.received < task.unsolicited_end or task.waiting_for_budget is not None:
            return  # unsolicited Data-Out still to come, or no buffer yet for the rest
        max_r2t = self.session.params.max_outstanding_r2t
        while len(task.r2ts) < max_r2t and task.next_offset < task.expected_length:
            length = min(self.session.params.max_burst_length, task.expected_length - task.next_offset)
            ttt = self._new_ttt()
            task.r2ts[ttt] = [task.next_offset, length, 0, 0]
            bhs = Bhs(
                opcode=p.OP_R2T,
                final=True,
                lun=task.lun_field,
                itt=task.itt,
                tail=p.build_tail(
                    {
                        p.OFF_TTT: ttt,
                        p.OFF_DATA_SN: task.r2t_sn,
                        p.OFF_BUFFER_OFFSET: task.next_offset,
                        p.OFF_RESIDUAL_COUNT: length,
                    }
                ),
            )
            task.r2t_sn += 1
            task.next_offset += length
            self._send(bhs, status=False)

    def _new_ttt(self) -> int:
        ttt = self._next_ttt
        self._next_ttt = self._next_ttt % 0xFFFFFFFE + 1
        return ttt

    def _data_out(self, pdu: Pdu) -> None:
        bhs = pdu.bhs
        task = self.tasks.get(bhs.itt)
        if task is None or not task.writes or task.running is not None:
            log.debug("%s: Data-Out for no open write (ITT %#x) dropped", self.peer_text, bhs.itt)
            return
        offset, length = bhs.buffer_offset, len(pdu.data)
        if bhs.ttt == p.RESERVED_TAG:
            if bhs.data_sn != task.unsolicited_data_sn or offset + length > task.unsolicited_end:
                raise ProtocolViolation(
                    f"unsolicited Data-Out (DataSN {bhs.data_sn}, offset {offset}, {length} bytes) "
                    "out of sequence or past FirstBurstLength"
                )
            task.unsolicited_data_sn += 1
        else:
            r2t = task.r2ts.get(bhs.ttt)
            if r2t is None:
                raise ProtocolViolation(f"Data-Out for an unknown target transfer tag {bhs.ttt:#x}")
            start, r2t_length, _received, data_sn = r2t
            if bhs.data_sn != data_sn or not (start <= offset and offset + length <= start + r2t_length):
                raise ProtocolViolation(
                    f"Data-Out (DataSN {bhs.data_sn}, offset {offset}, {length} bytes) does not fit its R2T"
                )
            r2t[2] += length
            r2t[3] += 1
            if r2t[2] >= r2t_length or bhs.final:
                if r2t[2] != r2t_length:
                    raise ProtocolViolation("a solicited burst ended short of what its R2T asked for")
                del task.r2ts[bhs.ttt]
        task.buffer[offset : offset + length] = pdu.data
        task.received += length
        if bhs.ttt == p.RESERVED_TAG and bhs.final and task.received < task.unsolicited_end:
            task.unsolicited_end = task.next_offset = task.received
        self._advance_write(task)

    def _start(self, task: Task, read_length: int) -> None:
        task.running = asyncio.get_running_loop().create_task(self._run_command(task, read_length))

    async def _run_command(self, task: Task, read_length: int) -> None:
        target = self.session.target
        assert target is not None
        loop = asyncio.get_running_loop()
        held = min(read_length, MAX_WRITE)  # what the command may read; the SCSI layer caps it so
        await self._read_budget.acquire(held)
        try:
            scsi = target.opened
            if scsi is None:
                scsi = await loop.run_in_executor(self._executor, target.scsi)
            parts = await self._read_soon(scsi, task) if task.reads and not task.writes else None
            if parts is not None:  # a plain READ, read from the device's cache on the loop
                response = Response(status=GOOD)
            else:
                response = await self._execute_in_thread(scsi, task)
            self._free(task)
            if task.aborted or self._closing:
                return
            self._forget(task)
            self._respond(task, response, read_length, parts)
            await self._drain()
        except Exception:
            log.exception("%s: command %s failed in the target", self.peer_text, task.cdb[:1].hex())
            self.hang_up()
        finally:
            self._free(task)
            self._read_budget.release(held)

    async def _execute_in_thread(self, scsi: ScsiTarget, task: Task) -> Response:
        """Run the command in the executor, where the device may block. The loop hears of its
        end through the connection's waker, with the other commands that ended meanwhile, not
        through the asyncio future that ``run_in_executor`` chains to the executor's: on a busy
        loop that chaining cost more than the command. A command aborted before it started is
        not run."""
        job = self._executor.submit(scsi.execute, task.lun, task.cdb, bytes(task.buffer), self.session.nexus)
        woken = self._waker.future()
        job.add_done_callback(lambda _: self._waker.wake(woken))
        try:
            await woken
        except asyncio.CancelledError:
            job.cancel()
            raise
        return job.result()

    async def _read_soon(self, scsi: ScsiTarget, task: Task) -> list[Buffer] | None:
        """The data of a plain, valid READ from a device that reads without blocking (a snapshot
        image: its decoding threads fetch, the event loop waits without a thread of its own);
        None when the command is anything else, the device declines or the read fails (then
        :meth:`ScsiTarget.execute` runs it in a thread, and reports an error as sense data)."""
        planned = scsi.plan_read(task.lun, task.cdb, self.session.nexus)
        if planned is None:
            return None
        device, offset, length = planned
        if not _soon_readable(device):
            return None
        pending = device.read_soon(offset, length)
        if pending is None:
            return None
        woken = self._waker.future()
        if pending.when_ready(lambda: self._waker.wake(woken)):  # from a decoding thread
            await woken
        try:
            return pending.parts()
        except DingyuanError:
            return None

    def _respond(
        self, task: Task, response: Response, read_length: int, parts: list[Buffer] | None = None
    ) -> None:
        """Data-In (``parts``, else the response's data, cut to the expected length) and the
        status, with residual counts."""
        if parts is None:
            parts = [response.data] if response.data else []
        produced = sum(len(part) for part in parts)
        if task.reads:
            residual = produced - read_length
        elif task.writes:
            residual = response.data_out_length - task.expected_length
        else:
            residual = 0
        flags = 0
        if residual > 0:
            flags = p.RSP_OVERFLOW
        elif residual < 0:
            flags = p.RSP_UNDERFLOW
        residual = min(abs(residual), 0xFFFFFFFF)  # a hostile CDB can ask for more than 4 GiB
        if task.writes and response.data_out_length == 0 and task.expected_length == 0:
            flags, residual = 0, 0
        data_sn = self._data_in(task, _cut(parts, read_length), response, flags, residual)
        if data_sn is None:
            return  # the status went with the last Data-In
        sense = response.sense
        payload = struct.pack(">H", len(sense)) + sense if sense else b""
        bhs = Bhs(
            opcode=p.OP_SCSI_RESPONSE,
            final=True,
            flags=flags,
            specific=bytes([0, response.status]),
            itt=task.itt,
            tail=p.build_tail({p.OFF_DATA_SN: data_sn, p.OFF_RESIDUAL_COUNT: residual}),
        )
        self._send(bhs, payload, status=True)
        self.bytes_written += task.expected_length

    def _data_in(
        self, task: Task, parts: list[Buffer], response: Response, flags: int, residual: int
    ) -> int | None:
        """Send ``parts`` as Data-In PDUs; return the next DataSN, or None when the status went
        with the last PDU (only GOOD without sense may)."""
        data_sn = 0
        total = sum(len(part) for part in parts)
        cursor = _Cursor(parts)
        if total == 0:
            return task.r2t_sn
        collapse = response.status == GOOD and not response.sense
        burst = self.session.params.max_burst_length
        offset = 0
        while offset < total:
            length = min(self._max_send, total - offset, burst - offset % burst)
            end = offset + length
            last = end == total
            final = last or end % burst == 0
            pdu_flags = 0
            words = {
                p.OFF_TTT: p.RESERVED_TAG,
                p.OFF_DATA_SN: data_sn,
                p.OFF_BUFFER_OFFSET: offset,
            }
            status = last and collapse
            if status:
                pdu_flags = flags | p.DATA_IN_STATUS
                words[p.OFF_RESIDUAL_COUNT] = residual
            bhs = Bhs(
                opcode=p.OP_DATA_IN,
                final=final,
                flags=pdu_flags,
                specific=bytes([0, response.status if status else 0]),
                lun=task.lun_field,
                itt=task.itt,
                tail=p.build_tail(words),
            )
            self._send(bhs, *cursor.take(length), status=status)
            offset = end
            data_sn += 1
        self.bytes_read += total
        return None if collapse else data_sn

    # -- NOP, Text ----------------------------------------------------------------------------

    def _nop_out(self, pdu: Pdu) -> None:
        bhs = Bhs(
            opcode=p.OP_NOP_IN,
            final=True,
            lun=pdu.bhs.lun,
            itt=pdu.bhs.itt,
            tail=p.build_tail({p.OFF_TTT: p.RESERVED_TAG}),
        )
        self._send(bhs, pdu.data[: self._max_send], status=True)

    def _text(self, pdu: Pdu) -> None:
        bhs = pdu.bhs
        if bhs.continue_:
            raise ProtocolViolation("Text Requests split over several PDUs are not supported")
        if bhs.ttt != p.RESERVED_TAG and bhs.itt in self._pending_text:
            body = self._pending_text.pop(bhs.itt)
        else:
            self._pending_text.pop(bhs.itt, None)
            answers: Pairs = []
            for key, value in parse_text(pdu.data):
                if key == "SendTargets":
                    answers += self.server.send_targets(value, self.session, self._writer)
                else:
                    answers.append((key, NOT_UNDERSTOOD))
            body = build_text(answers)
        more = len(body) > self._max_send
        if more:
            self._pending_text[bhs.itt] = body[self._max_send :]
            body = body[: self._max_send]
        reply = Bhs(
            opcode=p.OP_TEXT_RESPONSE,
            final=not more,
            flags=p.CONTINUE if more else 0,
            lun=bhs.lun,
            itt=bhs.itt,
            tail=p.build_tail({p.OFF_TTT: 1 if more else p.RESERVED_TAG}),
        )
        self._send(reply, body, status=True)

    # -- task management ----------------------------------------------------------------------

    async def _task_management(self, pdu: Pdu) -> None:
        bhs = pdu.bhs
        function = bhs.flags & 0x7F
        lun = decode_lun(bhs.lun)
        target = self.session.target
        response = TMF_COMPLETE
        if target is None:
            response = TMF_UNSUPPORTED
        elif function in (TMF_ABORT_TASK, TMF_ABORT_TASK_SET, TMF_CLEAR_TASK_SET, TMF_LUN_RESET) and lun != 0:
            response = TMF_NO_LUN
        elif function == TMF_ABORT_TASK:
            referenced = bhs.ttt  # the Referenced Task Tag sits where other PDUs have their TTT
            owner = next((c for c in self._own() if referenced in c.tasks), None)
            if owner is not None:
                await owner._abort_all([owner.tasks[referenced]], wait=True)
            elif not self.session.consider_received(bhs.word(p.OFF_MAX_CMD_SN), bhs.cmd_sn):
                response = TMF_NO_TASK
        elif function in (TMF_ABORT_TASK_SET, TMF_CLEAR_TASK_SET):
            connections = self._target_connections() if function == TMF_CLEAR_TASK_SET else self._own()
            for connection in connections:
                await connection._abort_all(list(connection.tasks.values()), wait=True)
        elif function in (TMF_LUN_RESET, TMF_TARGET_WARM_RESET, TMF_TARGET_COLD_RESET):
            for connection in self._target_connections():
                await connection._abort_all(list(connection.tasks.values()), wait=True)
            scsi = await asyncio.get_running_loop().run_in_executor(self._executor, target.scsi)
            scsi.reset(lun=lun if function == TMF_LUN_RESET else None)
        elif function == TMF_TASK_REASSIGN:
            response = TMF_REASSIGN_UNSUPPORTED
        else:
            response = TMF_UNSUPPORTED
        reply = Bhs(opcode=p.OP_TASK_MGMT_RESPONSE, final=True, specific=bytes([response, 0]), itt=bhs.itt)
        self._send(reply, status=True)
        await self._drain()
        if function == TMF_TARGET_COLD_RESET and response == TMF_COMPLETE:
            for connection in self._target_connections():
                connection.hang_up()

    def _own(self) -> list[Connection]:
        return list(self.session.connections.values())

    def _target_connections(self) -> list[Connection]:
        target = self.session.target
        if target is None:
            return self._own()
        return [c for s in list(target.sessions) for c in s.connections.values()]

    def _forget(self, task: Task) -> None:
        """The task is done (answered, refused or aborted): it leaves the table and, if it took a
        place in the session's command window, gives it back (MaxCmdSN moves on)."""
        if self.tasks.get(task.itt) is task:
            del self.tasks[task.itt]
        if task.counted:
            task.counted = False
            self.session.outstanding -= 1

    def _free(self, task: Task) -> None:
        """Give back a task's Data-Out buffer and its share of the write budget."""
        task.buffer = bytearray()
        if task.waiting_for_budget is not None:
            self.server.write_budget.cancel(task.waiting_for_budget)
            task.waiting_for_budget = None
        if task.budget:
            self.server.write_budget.release(task.budget)
            task.budget = 0

    async def _abort_all(self, tasks: Iterable[Task], *, wait: bool) -> None:
        """Abort ``tasks``: none sends a response; running ones finish on the device first."""
        running = []
        for task in list(tasks):
            task.aborted = True
            self._forget(task)
            if task.running is not None and not task.running.done():
                running.append(task.running)
            elif task.running is None:
                self._free(task)
        if wait and running:
            await asyncio.gather(*running, return_exceptions=True)

    # -- logout -------------------------------------------------------------------------------

    async def _logout(self, pdu: Pdu) -> None:
        bhs = pdu.bhs
        reason = bhs.flags & 0x7F
        cid = bhs.cid
        closing: list[Connection] = []
        response = 0
        if reason == LOGOUT_CLOSE_SESSION:
            closing = self._own()
        elif reason == LOGOUT_CLOSE_CONNECTION:
            other = self.session.connections.get(cid)
            if other is None:
                response = 1  # CID not found
            else:
                closing = [other]
        elif reason == LOGOUT_RECOVERY:
            response = 2  # connection recovery is not supported
        else:
            self._reject(pdu, p.REJECT_INVALID_PDU_FIELD)
            return
        for connection in closing:
            running = [t.running for t in connection.tasks.values() if t.running is not None]
            await asyncio.gather(*running, return_exceptions=True)
        reply = Bhs(
            opcode=p.OP_LOGOUT_RESPONSE,
            final=True,
            specific=bytes([response, 0]),
            itt=bhs.itt,
        )
        self._send(reply, status=True)
        await self._drain()
        await self._out.drain(0)  # the response reaches the initiator before the connection ends
        for connection in closing:
            if connection is self:
                self._closing = True
                self._out.close()
                self._writer.close()
            else:
                connection.hang_up()


_SOON_READABLE: dict[type, bool] = {}  # device class -> whether it is SoonReadable


def _soon_readable(device: object) -> TypeGuard[SoonReadable]:
    """Whether ``device`` is :class:`SoonReadable`, asked once per class, not per command: the
    structural check of ``isinstance`` costs several microseconds of the event loop."""
    kind = type(device)
    known = _SOON_READABLE.get(kind)
    if known is None:
        known = _SOON_READABLE[kind] = issubclass(kind, SoonReadable)
    return known


def _cut(parts: list[Buffer], limit: int) -> list[Buffer]:
    """The first ``limit`` bytes of ``parts`` (views, not copies)."""
    out: list[Buffer] = []
    for part in parts:
        if limit <= 0:
            break
        out.append(part if len(part) <= limit else memoryview(part)[:limit])
        limit -= len(part)
    return out


class _Cursor:
    """Takes consecutive runs of bytes from a list of buffers, as views."""

    def __init__(self, parts: list[Buffer]) -> None:
        self._parts = parts
        self._index = 0
        self._offset = 0  # into the current part

    def take(self, n: int) -> list[Buffer]:
        out: list[Buffer] = []
        while n > 0:
            part = self._parts[self._index]
            available = len(part) - self._offset
            if self._offset == 0 and available <= n:
                out.append(part)
            else:
                out.append(memoryview(part)[self._offset : self._offset + min(n, available)])
            used = min(n, available)
            n -= used
            self._offset += used
            if self._offset == len(part):
                self._index += 1
                self._offset = 0
        return out
