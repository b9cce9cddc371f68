"""A small, strict iSCSI initiator for tests: it speaks the protocol byte by byte, so tests can
drive the target where libiscsi's tools cannot (wrong sequence numbers, several connections in one
session, malformed PDUs) and check each answer field by field."""

from __future__ import annotations

import secrets
import socket
import struct
from dataclasses import dataclass, field

from dingyuan.exports.iscsi import chap
from dingyuan.exports.iscsi import pdu as p
from dingyuan.exports.iscsi.pdu import Bhs, Pdu
from dingyuan.exports.iscsi.text import build_text, parse_text

INITIATOR = "iqn.2026-11.org.dingyuan.test:initiator"


_STATUS_OPCODES = {
    p.OP_SCSI_RESPONSE,
    p.OP_NOP_IN,
    p.OP_TEXT_RESPONSE,
    p.OP_LOGIN_RESPONSE,
    p.OP_LOGOUT_RESPONSE,
    p.OP_TASK_MGMT_RESPONSE,
    p.OP_REJECT,
}


def carries_status(bhs: Bhs) -> bool:
    """Whether a target PDU carries a new StatSN (the initiator's ExpStatSN moves past it)."""
    return bhs.opcode in _STATUS_OPCODES or (
        bhs.opcode == p.OP_DATA_IN and bool(bhs.flags & p.DATA_IN_STATUS)
    )


class LoginFailed(Exception):
    def __init__(self, status_class: int, status_detail: int) -> None:
        super().__init__(f"login failed: class {status_class}, detail {status_detail}")
        self.status_class = status_class
        self.status_detail = status_detail


@dataclass
class Result:
    """The outcome of one SCSI command."""

    status: int
    data: bytes = b""
    sense: bytes = b""
    residual_flags: int = 0
    residual: int = 0
    pdus: list[Bhs] = field(default_factory=list)

    @property
    def sense_key(self) -> int:
        return self.sense[2] & 0x0F if len(self.sense) > 2 else 0

    @property
    def asc(self) -> tuple[int, int]:
        return (self.sense[12], self.sense[13]) if len(self.sense) > 13 else (0, 0)


class Initiator:
    """One connection, logged in at construction (a discovery session when ``target`` is None)."""

    def __init__(
        self,
        port: int,
        target: str | None,
        *,
        name: str = INITIATOR,
        isid: bytes | None = None,
        tsih: int = 0,
        cid: int = 0,
        credentials: tuple[str, str] | None = None,
        keys: list[tuple[str, str]] | None = None,
        timeout: float = 10.0,
        answer_pings: bool = True,
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.isid = isid or bytes([0x80]) + secrets.token_bytes(5)
        self.tsih = tsih
        self.cid = cid
        self.cmd_sn = 1
        self.exp_stat_sn = 0
        self.max_recv = 262144
        self.header_digest = self.data_digest = False  # until the login says otherwise
        self._itt = 0
        self.answer_pings = answer_pings
        self.negotiated: dict[str, str] = {}
        try:
            self.login(target, name=name, credentials=credentials, keys=keys or [])
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Initiator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- wire -----------------------------------------------------------------------------------

    def next_itt(self) -> int:
        self._itt += 1
        return self._itt

    def send(self, pdu: Pdu) -> None:
        self.sock.sendall(p.build_pdu(pdu, header_digest=self.header_digest, data_digest=self.data_digest))

    def recv(self) -> Pdu:
        """The next PDU; the target's pings (NOP-In asking for a NOP-Out) are answered on the way
        unless ``answer_pings`` is off."""
        while True:
            pdu = self._recv()
            if not (self.answer_pings and pdu.bhs.opcode == p.OP_NOP_IN and pdu.bhs.itt == p.RESERVED_TAG):
                return pdu
            reply = Bhs(
                opcode=p.OP_NOP_OUT,
                immediate=True,
                final=True,
                itt=p.RESERVED_TAG,
                tail=p.build_tail({p.OFF_TTT: pdu.bhs.ttt, **self.words()}),
            )
            self.send(Pdu(bhs=reply))

    def _recv(self) -> Pdu:
        header = self._exact(p.BHS_SIZE)
        bhs = p.parse_bhs(header)
        digests = {"header_digest": self.header_digest, "data_digest": self.data_digest}
        rest = self._exact(p.remaining_length(bhs, **digests))
        pdu = p.parse_pdu(header + rest, **digests)  # digests checked
        if carries_status(pdu.bhs):
            self.exp_stat_sn = (pdu.bhs.stat_sn + 1) & 0xFFFFFFFF
        return pdu

    def _exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            part = self.sock.recv(n - len(data))
            if not part:
                raise ConnectionResetError("the target closed the connection")
            data += part
        return bytes(data)

    def words(self) -> dict[int, int]:
        """CmdSN and ExpStatSN, the words every initiator PDU carries."""
        return {p.OFF_CMD_SN: self.cmd_sn, p.OFF_EXP_STAT_SN: self.exp_stat_sn}

    # -- login ----------------------------------------------------------------------------------

    def login(
        self,
        target: str | None,
        *,
        name: str,
        credentials: tuple[str, str] | None,
        keys: list[tuple[str, str]],
    ) -> None:
        first: list[tuple[str, str]] = [("InitiatorName", name)]
        if target is None:
            first.append(("SessionType", "Discovery"))
        else:
            first += [("SessionType", "Normal"), ("TargetName", target)]
        if credentials is not None:
            first.append(("AuthMethod", "CHAP,None"))
            answer = self._login_step(first, csg=0, nsg=1, transit=False)
            assert answer.get("AuthMethod") == "CHAP", answer
            answer = self._login_step([("CHAP_A", "5")], csg=0, nsg=1, transit=False)
            identifier, challenge = int(answer["CHAP_I"]), chap.decode_binary(answer["CHAP_C"])
            proof = chap.response(identifier, credentials[1], challenge)
            self._login_step(
                [("CHAP_N", credentials[0]), ("CHAP_R", "0x" + proof.hex())], csg=0, nsg=1, transit=True
            )
            first = []
        else:
            first.append(("AuthMethod", "None"))
            self._login_step(first, csg=0, nsg=1, transit=True)
            first = []
        ops = {"HeaderDigest": "None", "DataDigest": "None", "MaxRecvDataSegmentLength": str(self.max_recv)}
        if target is not None:
            ops.update(InitialR2T="No", ImmediateData="Yes", MaxConnections="4")
        ops.update(keys)  # the caller's offers replace these
        self.max_recv = int(ops["MaxRecvDataSegmentLength"])
        self.negotiated.update(self._login_step(first + list(ops.items()), csg=1, nsg=3, transit=True))
        self.header_digest = self.negotiated.get("HeaderDigest") == "CRC32C"
        self.data_digest = self.negotiated.get("DataDigest") == "CRC32C"

    def _login_step(
        self, pairs: list[tuple[str, str]], *, csg: int, nsg: int, transit: bool
    ) -> dict[str, str]:
        bhs = Bhs(
            opcode=p.OP_LOGIN_REQUEST,
            immediate=True,
            final=transit,
            flags=p.login_flags(csg=csg, nsg=nsg),
            lun=p.isid_tsih(self.isid, self.tsih),
            itt=0,
            tail=p.build_tail({p.OFF_TTT: self.cid << 16, **self.words()}),
        )
        self.send(Pdu(bhs=bhs, data=build_text(pairs)))
        reply = self.recv()
        if reply.bhs.status_class != 0:
            raise LoginFailed(reply.bhs.status_class, reply.bhs.status_detail)
        if reply.bhs.transit and reply.bhs.nsg == 3:
            self.tsih = reply.bhs.tsih
        return dict(parse_text(reply.data))

    # -- full feature phase -------------------------------------------------------------------

    def text(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        itt = self.next_itt()
        bhs = Bhs(
            opcode=p.OP_TEXT_REQUEST,
            final=True,
            itt=itt,
            tail=p.build_tail({p.OFF_TTT: p.RESERVED_TAG, **self.words()}),
        )
        self.send(Pdu(bhs=bhs, data=build_text(pairs)))
        self.cmd_sn += 1
        reply = self.recv()
        assert reply.bhs.opcode == p.OP_TEXT_RESPONSE and reply.bhs.itt == itt
        # a SendTargets answer repeats its keys, which negotiation text may not: split by hand
        items = reply.data.rstrip(b"\0").split(b"\0") if reply.data else []
        return [tuple(i.decode().split("=", 1)) for i in items]  # type: ignore[misc]

    def command(
        self,
        cdb: bytes,
        *,
        read_length: int = 0,
        data_out: bytes = b"",
        lun: int = 0,
        immediate_length: int | None = None,
    ) -> Result:
        """One SCSI command; Data-Out goes as immediate data, then as R2Ts ask for it."""
        itt = self.next_itt()
        first = data_out[: immediate_length if immediate_length is not None else 65536]
        flags = (p.CMD_READ if read_length else 0) | (p.CMD_WRITE if data_out else 0) | p.ATTR_SIMPLE
        bhs = Bhs(
            opcode=p.OP_SCSI_COMMAND,
            final=True,
            flags=flags,
            lun=lun << 48,
            itt=itt,
            tail=p.build_tail({p.OFF_TTT: max(read_length, len(data_out)), **self.words()}, cdb=cdb),
        )
        self.send(Pdu(bhs=bhs, data=first))
        self.cmd_sn += 1
        data = bytearray()
        seen: list[Bhs] = []
        while True:
            reply = self.recv()
            seen.append(reply.bhs)
            if reply.bhs.opcode == p.OP_R2T:
                self._answer_r2t(reply.bhs, data_out)
                continue
            if reply.bhs.opcode == p.OP_DATA_IN:
                data[reply.bhs.buffer_offset : reply.bhs.buffer_offset + len(reply.data)] = reply.data
                if reply.bhs.flags & p.DATA_IN_STATUS:
                    return Result(
                        reply.bhs.specific[1],
                        bytes(data),
                        b"",
                        reply.bhs.flags & 0x06,
                        reply.bhs.residual_count,
                        seen,
                    )
                continue
            assert reply.bhs.opcode == p.OP_SCSI_RESPONSE, f"unexpected opcode {reply.bhs.opcode:#x}"
            sense = b""
            if len(reply.data) >= 2:
                (n,) = struct.unpack(">H", reply.data[:2])
                sense = reply.data[2 : 2 + n]
            return Result(
                reply.bhs.specific[1],
                bytes(data),
                sense,
                reply.bhs.flags & 0x06,
                reply.bhs.residual_count,
                seen,
            )

    def _answer_r2t(self, r2t: Bhs, data_out: bytes) -> None:
        offset, length = r2t.buffer_offset, r2t.desired_data_transfer_length
        step = 65536
        for n, start in enumerate(range(offset, offset + length, step)):
            end = min(start + step, offset + length)
            bhs = Bhs(
                opcode=p.OP_DATA_OUT,
                final=end == offset + length,
                itt=r2t.itt,
                tail=p.build_tail(
                    {
                        p.OFF_TTT: r2t.ttt,
                        p.OFF_EXP_STAT_SN: self.exp_stat_sn,
                        p.OFF_DATA_SN: n,
                        p.OFF_BUFFER_OFFSET: start,
                    }
                ),
            )
            self.send(Pdu(bhs=bhs, data=data_out[start:end]))

    def read(self, lba: int, blocks: int) -> Result:
        return self.command(struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0), read_length=blocks * 512)

    def write(self, lba: int, data: bytes) -> Result:
        return self.command(struct.pack(">BBQIBB", 0x8A, 0, lba, len(data) // 512, 0, 0), data_out=data)

    def nop(self, payload: bytes = b"") -> Pdu:
        itt = self.next_itt()
        bhs = Bhs(
            opcode=p.OP_NOP_OUT,
            final=True,
            itt=itt,
            tail=p.build_tail({p.OFF_TTT: p.RESERVED_TAG, **self.words()}),
        )
        self.send(Pdu(bhs=bhs, data=payload))
        self.cmd_sn += 1
        return self.recv()

    def logout(self, reason: int = 0, cid: int | None = None) -> Pdu:
        bhs = Bhs(
            opcode=p.OP_LOGOUT_REQUEST,
            immediate=True,
            final=True,
            flags=reason,
            itt=self.next_itt(),
            tail=p.build_tail({p.OFF_TTT: (self.cid if cid is None else cid) << 16, **self.words()}),
        )
        self.send(Pdu(bhs=bhs))
        return self.recv()
