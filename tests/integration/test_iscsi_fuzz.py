"""Fuzzing the iSCSI target over the network while well-behaved initiators use it.

For FUZZ_SECONDS, several threads throw random and mutated traffic at a running target: garbage;
login PDUs with mutated headers (version, stages, T and C bits, ISID, TSIH and CID changing during
the login) and mutated text (not UTF-8, no final NUL, keys twice, huge values, unknown keys, values
out of range); CHAP with garbage values; and logged-in sessions that send random opcodes, SCSI
commands with random CDBs, flags, expected lengths and LUNs (writes too, to a read-only export and
to a scratch export nobody checks), Data-Out with wrong tags, DataSNs, offsets and lengths, data
segments over the limit, malformed AHS, CmdSNs far out of the window, task management with random
functions and tags, logouts with random reasons, NOP-Outs, Text requests, digests negotiated then
broken, second connections to their session, half-sent PDUs and hang-ups at random points.

Meanwhile test initiators read a read-only export of the same image (and check every byte) and
write and re-read a writable one no fuzzer touches, and qemu-img (libiscsi) copies the read-only
export whole. Every PDU the target sends a fuzzer must be well formed. Afterwards the target must
still answer fresh initiators (``iscsi-inq``, the test initiator), every fuzz connection and
session must be gone within seconds, threads must not have grown past the pool, nothing may have
been logged as an error, and the read-only image must be byte for byte what it was.

The seed is DINGYUAN_TEST_SEED if set, else random, and printed: a failure replays with it (as far
as threads racing each other allow).

What the fuzzing turned up is kept as small tests at the end: a CHAP target named only after the
security stage, writes announced without their data, an initiator that never reads, and a second
connection's own digests.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from iscsikit import Initiator, carries_status

from dingyuan.exports.blockdev import FileDevice
from dingyuan.exports.iscsi import chap
from dingyuan.exports.iscsi import pdu as p
from dingyuan.exports.iscsi.chap import Credentials
from dingyuan.exports.iscsi.pdu import Bhs, Pdu
from dingyuan.exports.iscsi.server import ThreadedIscsiServer
from dingyuan.exports.iscsi.text import build_text

# read at import: the hermetic fixture clears DINGYUAN_* variables before a test runs
SEED = int(os.environ.get("DINGYUAN_TEST_SEED") or random.SystemRandom().randrange(1 << 32))
FUZZ_SECONDS = 120
FUZZERS = 4
WORKERS = 8
MiB = 1 << 20
SIZE = 8 * MiB
BLOCKS = SIZE // 512
#: the target's MaxRecvDataSegmentLength (TargetConfig's default)
TARGET_MRDSL = 262144
MAX_WRITE = 8 * MiB

PREFIX = "iqn.2026-11.org.dingyuan.fuzz"
RO = f"{PREFIX}:ro"  # the read-only image, fuzzed
SCRATCH = f"{PREFIX}:scratch"  # writable, fuzzed, never checked
SECRET = f"{PREFIX}:chap"  # the read-only image behind CHAP
GOOD_RO = f"{PREFIX}:good-ro"  # the read-only image again, for the well-behaved initiators only
GOOD_RW = f"{PREFIX}:good-rw"
USER = Credentials("fuzz-user", "fuzz-secret-0123")
GOOD_NAME = f"{PREFIX}:good-initiator"
FUZZ_NAMES = [f"{PREFIX}:fuzzer", f"{PREFIX}:fuzzer", "iqn.x", "", "x" * 300, "iqn.\u00e9t\u00e9"]
TARGET_NAMES = [RO, RO, SCRATCH, SCRATCH, SECRET, f"{PREFIX}:nope", "", "x" * 300]
#: the login keys each connection of a session negotiates for itself
CONNECTION_KEYS = ("HeaderDigest", "DataDigest", "MaxRecvDataSegmentLength")
#: ISIDs fuzzers share now and then, so their sessions reinstate each other
SHARED_ISIDS = [bytes([0x80, 0, 0, 0, 0, n]) for n in range(3)]


def _image(path: Path, rnd: random.Random) -> None:
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset in range(0, SIZE, 3 * MiB):
            f.seek(offset)
            f.write(rnd.randbytes(MiB))


class Broken(Exception):
    """The target sent something that is not a well-formed iSCSI PDU."""


class Wire:
    """One fuzz connection: sends PDUs (digests as negotiated, or broken on purpose) and reads
    what the target sends, checking that every PDU of it is well formed."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.header_digest = False
        self.data_digest = False
        self.buffer = bytearray()
        self.cmd_sn = 1
        self.exp_stat_sn = 0
        self.itt = 0
        self.isid = b""
        self.tsih = 0
        self.max_send = 8192  # what the target declared it takes in one data segment
        self.params: dict[str, str] = {}
        self.connection_keys: list[tuple[str, str]] = []
        self.pdus_from_target = 0

    def number(self, key: str, default: int) -> int:
        """A negotiated number (the default where the target answered Irrelevant or nothing)."""
        value = self.params.get(key, "")
        return int(value) if value.isdigit() else default

    def next_itt(self) -> int:
        self.itt = (self.itt + 1) & 0xFFFFFFFF
        return self.itt

    def words(self) -> dict[int, int]:
        return {p.OFF_CMD_SN: self.cmd_sn, p.OFF_EXP_STAT_SN: self.exp_stat_sn}

    def encode(
        self,
        bhs: Bhs,
        data: bytes = b"",
        ahs: bytes = b"",
        *,
        break_header: bool = False,
        break_data: bool = False,
    ) -> bytes:
        """``bhs`` with its segments on the wire; AHS bytes are sent as given (even malformed)."""
        header = p.build_header(bhs, data_length=len(data))
        if ahs:
            header = header[:4] + bytes([len(ahs) // 4 & 0xFF]) + header[5:] + ahs
        if self.header_digest:
            d = p.digest(header)
            header += bytes(b ^ 0x5A for b in d) if break_header else d
        out = header
        if data:
            padded = data + p.padding(len(data))
            out += padded
            if self.data_digest:
                d = p.digest(padded)
                out += bytes(b ^ 0xA5 for b in d) if break_data else d
        return out

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def poll(self, wait: float, *, login: bool = False) -> list[Pdu]:
        """The PDUs the target sent within ``wait`` seconds (or until its first one, in a login)."""
        self.sock.settimeout(wait)
        try:
            while len(self.buffer) < 4 * MiB:
                part = self.sock.recv(262144)
                if not part:
                    break
                self.buffer += part
                if login and self._complete():
                    break
        except TimeoutError:
            pass
        return self._parse(login)

    def _complete(self) -> bool:
        """Whether the buffer holds a whole login PDU (login answers come one at a time)."""
        header = bytes(self.buffer[: p.BHS_SIZE])
        return len(header) == p.BHS_SIZE and len(self.buffer) >= p.BHS_SIZE + self._rest(header, True)

    def _rest(self, header: bytes, login: bool) -> int:
        bhs = p.parse_bhs(header)
        digests = not login
        return p.remaining_length(
            bhs, header_digest=digests and self.header_digest, data_digest=digests and self.data_digest
        )

    def _parse(self, login: bool) -> list[Pdu]:
        pdus = []
        while len(self.buffer) >= p.BHS_SIZE:
            header = bytes(self.buffer[: p.BHS_SIZE])
            try:
                n = p.BHS_SIZE + self._rest(header, login)
            except p.ProtocolViolation as e:
                raise Broken(f"malformed header from the target: {header.hex()}: {e}") from e
            if len(self.buffer) < n:
                break
            raw = bytes(self.buffer[:n])
            del self.buffer[:n]
            digests = not login
            try:
                pdu = p.parse_pdu(
                    raw,
                    header_digest=digests and self.header_digest,
                    data_digest=digests and self.data_digest,
                )
            except p.ProtocolViolation as e:
                raise Broken(f"malformed PDU from the target: {raw[:64].hex()}: {e}") from e
            if pdu.bhs.opcode not in p.TARGET_OPCODES:
                raise Broken(f"opcode {pdu.bhs.opcode:#x} from the target: {raw[:48].hex()}")
            if carries_status(pdu.bhs):
                self.exp_stat_sn = (pdu.bhs.stat_sn + 1) & 0xFFFFFFFF
            self.pdus_from_target += 1
            pdus.append(pdu)
        return pdus


class Fuzzer:
    """One thread's random sessions against the target."""

    def __init__(self, port: int, rnd: random.Random) -> None:
        self.port = port
        self.rnd = rnd
        self.sessions = 0
        self.kinds: dict[str, int] = {}
        #: sessions that reached the full feature phase, so its PDU handling was fuzzed
        self.logged_in = 0
        self.pdus_from_target = 0
        self.broken: list[str] = []

    def run(self, deadline: float) -> None:
        kinds: list[Callable[[Wire], None]] = [
            self.garbage,
            self.silent,
            self.login,
            self.login,
            self.chap,
            self.full_feature,
            self.full_feature,
            self.full_feature,
            self.full_feature,
            self.discovery,
        ]
        while time.monotonic() < deadline:
            kind = self.rnd.choice(kinds)
            wire: Wire | None = None
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                    wire = Wire(sock)
                    kind(wire)
            except Broken as e:
                self.broken.append(str(e))
            except OSError:
                pass  # the target hung up on us: expected for most of what we send
            if wire is not None:
                self.pdus_from_target += wire.pdus_from_target
            self.sessions += 1
            self.kinds[kind.__name__] = self.kinds.get(kind.__name__, 0) + 1

    # -- building blocks -----------------------------------------------------------------------

    def mutate(self, data: bytes, *, header_only: bool = False) -> bytes:
        rnd = self.rnd
        out = bytearray(data)
        for _ in range(rnd.randint(1, 4)):
            end = min(len(out), p.BHS_SIZE) if header_only else len(out)
            choice = rnd.random()
            if choice < 0.5 and end:
                i = rnd.randrange(end)
                out[i] ^= 1 << rnd.randrange(8)
            elif choice < 0.65 and end:
                out[rnd.randrange(end)] = rnd.randrange(256)
            elif choice < 0.8 and not header_only and out:
                del out[rnd.randrange(len(out)) :]
            elif choice < 0.9 and not header_only:
                at = rnd.randint(0, len(out))
                out[at:at] = rnd.randbytes(rnd.randint(1, 24))
            elif len(out) >= 8:  # DataSegmentLength set to anything
                out[5:8] = rnd.choice([0, 1, 4096, TARGET_MRDSL, TARGET_MRDSL + 1, (1 << 24) - 1]).to_bytes(
                    3, "big"
                )
        return bytes(out)

    def login_bhs(
        self,
        wire: Wire,
        *,
        isid: bytes,
        tsih: int,
        cid: int,
        csg: int,
        nsg: int,
        transit: bool,
        continue_: bool = False,
        versions: bytes = b"\0\0",
    ) -> Bhs:
        return Bhs(
            opcode=p.OP_LOGIN_REQUEST,
            immediate=True,
            final=transit,
            flags=p.login_flags(csg=csg, nsg=nsg, continue_=continue_),
            specific=versions,
            lun=p.isid_tsih(isid, tsih),
            itt=wire.next_itt(),
            tail=p.build_tail({p.OFF_TTT: cid << 16, **wire.words()}),
        )

    def isid(self) -> bytes:
        if self.rnd.random() < 0.1:
            return self.rnd.choice(SHARED_ISIDS)
        return bytes([0x80]) + self.rnd.randbytes(5)

    def operational_keys(self) -> list[tuple[str, str]]:
        rnd = self.rnd
        keys = [
            ("HeaderDigest", rnd.choice(["None", "CRC32C", "CRC32C,None", "None,CRC32C"])),
            ("DataDigest", rnd.choice(["None", "CRC32C", "CRC32C,None", "None,CRC32C"])),
            ("MaxRecvDataSegmentLength", str(rnd.choice([512, 4096, 8192, 65536, 262144, (1 << 24) - 1]))),
            ("InitialR2T", rnd.choice(["Yes", "No"])),
            ("ImmediateData", rnd.choice(["Yes", "No"])),
            ("FirstBurstLength", str(rnd.choice([512, 4096, 65536, 262144]))),
            ("MaxBurstLength", str(rnd.choice([512, 8192, 262144, 1048576]))),
            ("MaxOutstandingR2T", str(rnd.choice([1, 2, 4]))),
            ("MaxConnections", str(rnd.choice([1, 2, 4]))),
            ("ErrorRecoveryLevel", rnd.choice(["0", "0", "2"])),
        ]
        rnd.shuffle(keys)
        return keys[: rnd.randint(3, len(keys))]

    def login_exchange(self, wire: Wire, bhs: Bhs, data: bytes) -> Pdu | None:
        """Send one login PDU, return the answer (None when the target said nothing in time)."""
        wire.send(p.build_pdu(Pdu(bhs=bhs, data=data)))
        pdus = wire.poll(2.0, login=True)
        return pdus[0] if pdus else None

    def log_in(
        self, wire: Wire, target: str | None, *, isid: bytes | None = None, joins: Wire | None = None
    ) -> bool:
        """A proper login (with random operational keys) into ``target`` (None: discovery), or as
        a second connection of ``joins``'s session; whether the full feature phase was reached.
        Digests and limits follow the answers.

        A second connection offers the first one's connection-only keys (digests, receive
        limit): the target applies the session's to every connection (see the reproduction
        below), which is not what this fuzzer is after."""
        tsih, cid = (0, 0) if joins is None else (joins.tsih, self.rnd.choice([0, 1, 2, 9]))
        isid = wire.isid = isid or self.isid()
        first = [("InitiatorName", self.rnd.choice(FUZZ_NAMES[:2]))]
        if target is None:
            first.append(("SessionType", "Discovery"))
        else:
            first += [("SessionType", "Normal"), ("TargetName", target)]
        first.append(("AuthMethod", "None"))
        bhs = self.login_bhs(wire, isid=isid, tsih=tsih, cid=cid, csg=0, nsg=1, transit=True)
        answer = self.login_exchange(wire, bhs, build_text(first))
        if answer is None or answer.bhs.status_class != 0 or not answer.bhs.transit:
            return False
        keys = self.operational_keys()
        if joins is not None:
            keys = [k for k in keys if k[0] not in CONNECTION_KEYS] + joins.connection_keys
        wire.connection_keys = [k for k in keys if k[0] in CONNECTION_KEYS]
        bhs = self.login_bhs(wire, isid=isid, tsih=tsih, cid=cid, csg=1, nsg=3, transit=True)
        answer = self.login_exchange(wire, bhs, build_text(keys))
        if answer is None or answer.bhs.status_class != 0 or not answer.bhs.transit:
            return False
        items = answer.data.rstrip(b"\0").split(b"\0") if answer.data else []
        wire.params = dict(i.decode().split("=", 1) for i in items)
        wire.tsih = answer.bhs.tsih
        wire.header_digest = wire.params.get("HeaderDigest") == "CRC32C"
        wire.data_digest = wire.params.get("DataDigest") == "CRC32C"
        wire.max_send = wire.number("MaxRecvDataSegmentLength", 8192)
        wire.cmd_sn = answer.bhs.exp_cmd_sn
        return True

    # -- session kinds -------------------------------------------------------------------------

    def garbage(self, wire: Wire) -> None:
        rnd = self.rnd
        if rnd.random() < 0.5:
            raw = rnd.randbytes(rnd.randint(1, 600))
        else:  # something that looks like a login header, then anything
            bhs = self.login_bhs(wire, isid=self.isid(), tsih=0, cid=0, csg=0, nsg=1, transit=True)
            raw = self.mutate(p.build_pdu(Pdu(bhs=bhs, data=rnd.randbytes(rnd.randint(0, 200)))))
        wire.send(raw)
        wire.poll(0.02)

    def silent(self, wire: Wire) -> None:
        """Connect and say nothing (or half a header), then leave."""
        if self.rnd.random() < 0.5:
            wire.send(bytes([p.OP_LOGIN_REQUEST | p.IMMEDIATE, 0x87]) + bytes(self.rnd.randint(0, 40)))
        time.sleep(self.rnd.uniform(0, 0.5))

    def text(self) -> bytes:
        """Login text, mostly plausible, often broken."""
        rnd = self.rnd
        pairs = [
            ("InitiatorName", rnd.choice(FUZZ_NAMES)),
            ("SessionType", rnd.choice(["Normal", "Normal", "Discovery", "Other", ""])),
            ("TargetName", rnd.choice(TARGET_NAMES)),
            ("AuthMethod", rnd.choice(["None", "CHAP", "CHAP,None", "SRP", "", "None," * 40])),
            *self.operational_keys(),
        ]
        pairs = [pair for pair in pairs if rnd.random() < 0.8]
        raw = [f"{k}={v}".encode() for k, v in pairs]
        for _ in range(rnd.randint(0, 3)):
            choice = rnd.random()
            if choice < 0.15 and raw:
                raw.append(rnd.choice(raw))  # a key twice
            elif choice < 0.3:
                raw.append(
                    b"X-Unknown-" + str(rnd.randrange(1000)).encode() + b"=" + rnd.randbytes(8).hex().encode()
                )
            elif choice < 0.4:
                raw.append(b"InitiatorAlias=" + rnd.randbytes(rnd.randint(1, 40)))  # not UTF-8
            elif choice < 0.5:
                raw.append(b"MaxBurstLength=" + b"9" * rnd.choice([1, 11, 9000]))
            elif choice < 0.6:
                raw.append(rnd.choice([b"NoEquals", b"=novalue", b"lower=case", b"K" * 64 + b"=1"]))
            elif choice < 0.7:
                raw.append(b"TargetAlias=" + b"a" * rnd.choice([255, 8192, 8193, 70000]))
            elif choice < 0.8:
                raw.append(
                    rnd.choice(
                        [b"IFMarker=Yes", b"OFMarkInt=1~65535", b"MaxConnections=0", b"FirstBurstLength=0x"]
                    )
                )
            elif choice < 0.9:
                raw.append(
                    rnd.choice([b"ErrorRecoveryLevel=Reject", b"HeaderDigest=NotUnderstood", b"DataDigest=,"])
                )
            else:
                raw.append(b"\0")
        body = b"\0".join(raw) + b"\0"
        if rnd.random() < 0.1:
            body = body[:-1]  # no NUL at the end
        return body

    def login(self, wire: Wire) -> None:
        """A login whose PDUs are mutated: headers, stages, T/C bits, ISID/TSIH/CID, text."""
        rnd = self.rnd
        isid, tsih, cid = (
            self.isid(),
            rnd.choice([0, 0, 0, 1, rnd.randrange(1 << 16)]),
            rnd.choice([0, 0, 1, 0xFFFF]),
        )
        stage = rnd.choice([0, 0, 1, 1, 2, 3])
        for _ in range(rnd.randint(1, 6)):
            if rnd.random() < 0.15:
                isid = self.isid()
            if rnd.random() < 0.1:
                tsih = rnd.randrange(1 << 16)
            if rnd.random() < 0.1:
                cid = rnd.randrange(1 << 16)
            nsg = rnd.choice([stage + 1, 1, 3, 3, 2, 0])
            bhs = self.login_bhs(
                wire,
                isid=isid,
                tsih=tsih,
                cid=cid,
                csg=stage & 3,
                nsg=nsg & 3,
                transit=rnd.random() < 0.6,
                continue_=rnd.random() < 0.15,
                versions=rnd.choice([b"\0\0", b"\0\0", b"\0\0", b"\1\1", b"\xff\0", b"\0\x02"]),
            )
            if rnd.random() < 0.1:
                bhs = Bhs(
                    opcode=rnd.randrange(64),
                    immediate=bhs.immediate,
                    final=bhs.final,
                    flags=bhs.flags,
                    lun=bhs.lun,
                    itt=bhs.itt,
                    tail=bhs.tail,
                )
            raw = p.build_pdu(Pdu(bhs=bhs, data=self.text()))
            if rnd.random() < 0.3:
                raw = self.mutate(raw, header_only=rnd.random() < 0.5)
            if rnd.random() < 0.05:  # a data segment over the limit, announced and partly sent
                raw = raw[:5] + (TARGET_MRDSL + rnd.randint(1, 1 << 20)).to_bytes(3, "big") + raw[8:]
            if rnd.random() < 0.05:  # half a PDU, then hang up
                wire.send(raw[: rnd.randrange(len(raw))])
                return
            wire.send(raw)
            answers = wire.poll(0.05, login=True)
            if not answers or answers[-1].bhs.status_class != 0:
                return
            if answers[-1].bhs.transit:
                stage = answers[-1].bhs.nsg
                if stage == p.STAGE_FULL_FEATURE:
                    return

    def chap(self, wire: Wire) -> None:
        """Log in to the CHAP target with garbage CHAP values (and the right ones now and then)."""
        rnd = self.rnd
        isid = self.isid()
        first = [("InitiatorName", FUZZ_NAMES[0]), ("SessionType", "Normal"), ("TargetName", SECRET)]
        first.append(("AuthMethod", rnd.choice(["CHAP", "CHAP,None", "None"])))
        bhs = self.login_bhs(wire, isid=isid, tsih=0, cid=0, csg=0, nsg=1, transit=False)
        answer = self.login_exchange(wire, bhs, build_text(first))
        if answer is None or answer.bhs.status_class != 0:
            return
        algorithms = rnd.choice(["5", "5", "7,5", "7", "", "5" * 300, "0x5"])
        bhs = self.login_bhs(wire, isid=isid, tsih=0, cid=0, csg=0, nsg=1, transit=False)
        answer = self.login_exchange(wire, bhs, f"CHAP_A={algorithms}\0".encode())
        if answer is None or answer.bhs.status_class != 0:
            return
        items = answer.data.rstrip(b"\0").split(b"\0") if answer.data else []
        offered = dict(i.decode().split("=", 1) for i in items)
        identifier, challenge = (
            int(offered.get("CHAP_I", "0")),
            chap.decode_binary(offered.get("CHAP_C", "0x00")),
        )
        right = "0x" + chap.response(identifier, USER.secret, challenge).hex()
        keys = {
            "CHAP_N": rnd.choice([USER.user, USER.user, "", "someone", "\u00e9" * 200]),
            "CHAP_R": rnd.choice(
                [
                    right,
                    right,
                    "0x",
                    "0xzz",
                    "0b!!!",
                    "0b" + "A" * 7,
                    "12345",
                    "0x" + "ab" * 5000,
                    right[:-2],
                    "0B" + "QUJD",
                ]
            ),
        }
        if rnd.random() < 0.4:
            keys["CHAP_I"] = rnd.choice(["7", "-1", "256", "x", "99999999999999999999"])
        if rnd.random() < 0.4:
            keys["CHAP_C"] = rnd.choice(
                ["0x" + challenge.hex(), "0x", "0x" + "00" * 2000, "0b", "0xabc", "nothex"]
            )
        raw = b"".join(f"{k}={v}".encode() + b"\0" for k, v in keys.items() if rnd.random() < 0.9)
        bhs = self.login_bhs(wire, isid=isid, tsih=0, cid=0, csg=0, nsg=rnd.choice([1, 3]), transit=True)
        wire.send(p.build_pdu(Pdu(bhs=bhs, data=raw)))
        wire.poll(0.05)

    def discovery(self, wire: Wire) -> None:
        if not self.log_in(wire, None):
            return
        self.logged_in += 1
        for _ in range(self.rnd.randint(1, 8)):
            wire.send(self.ffp_pdu(wire, {}))
            wire.poll(0.01)

    def full_feature(self, wire: Wire) -> None:
        rnd = self.rnd
        target = rnd.choice([RO, RO, SCRATCH])
        if not self.log_in(wire, target):
            return
        self.logged_in += 1
        second: Wire | None = None
        sock2: socket.socket | None = None
        writes: dict[int, int] = {}  # ITT -> expected data transfer length of our open writes
        try:
            if rnd.random() < 0.15:
                sock2 = socket.create_connection(("127.0.0.1", self.port), timeout=2)
                second = Wire(sock2)
                second.itt = 1 << 24
                if not self.log_in(second, target, isid=wire.isid, joins=wire):
                    second = None
                else:
                    second.cmd_sn = wire.cmd_sn
            for _ in range(rnd.randint(1, 40)):
                w = second if second is not None and rnd.random() < 0.4 else wire
                if second is not None:
                    # one session, one CmdSN sequence: keep the two connections' numbers together
                    w.cmd_sn = max(wire.cmd_sn, second.cmd_sn, key=lambda sn: (sn - wire.cmd_sn) & 0xFFFFFFFF)
                raw = self.ffp_pdu(w, writes)
                if rnd.random() < 0.03:  # half a PDU, then hang up
                    w.send(raw[: rnd.randrange(max(1, len(raw)))])
                    return
                w.send(raw)
                if rnd.random() < 0.5:
                    for pdu in w.poll(0.005):
                        if pdu.bhs.opcode == p.OP_R2T and rnd.random() < 0.8:
                            w.send(self.answer_r2t(w, pdu.bhs))
            if rnd.random() < 0.5:
                bhs = Bhs(
                    opcode=p.OP_LOGOUT_REQUEST,
                    immediate=True,
                    final=True,
                    flags=0,
                    itt=wire.next_itt(),
                    tail=p.build_tail({p.OFF_TTT: 0, **wire.words()}),
                )
                wire.send(wire.encode(bhs))
            wire.poll(0.05)
        finally:
            if sock2 is not None:
                sock2.close()

    # -- the full feature phase ----------------------------------------------------------------

    def ffp_pdu(self, wire: Wire, writes: dict[int, int]) -> bytes:
        """One random PDU for a logged-in connection."""
        rnd = self.rnd
        choice = rnd.random()
        if choice < 0.35:
            raw = self.scsi_command(wire, writes)
        elif choice < 0.5:
            raw = self.data_out(wire, writes)
        elif choice < 0.58:
            raw = self.nop_out(wire)
        elif choice < 0.64:
            raw = self.text_request(wire)
        elif choice < 0.7:
            raw = self.task_management(wire, writes)
        elif choice < 0.73:
            raw = self.logout(wire)
        elif choice < 0.78:  # an opcode no target knows, a SNACK, a login, a target opcode
            opcode = rnd.choice(
                [0x07, 0x1C, 0x1F, p.OP_SNACK_REQUEST, p.OP_LOGIN_REQUEST, p.OP_NOP_IN, rnd.randrange(64)]
            )
            bhs = Bhs(opcode=opcode, final=True, itt=wire.next_itt(), tail=p.build_tail(wire.words()))
            raw = wire.encode(bhs, rnd.randbytes(rnd.choice([0, 0, 5, 600])))
        elif choice < 0.82:  # a data segment over the limit: announced, partly sent
            bhs = Bhs(opcode=p.OP_NOP_OUT, final=True, itt=wire.next_itt(), tail=p.build_tail(wire.words()))
            encoded = wire.encode(bhs, b"x" * 8)
            over = rnd.choice([TARGET_MRDSL + 1, TARGET_MRDSL + 4, (1 << 24) - 1])
            raw = encoded[:5] + over.to_bytes(3, "big") + encoded[8:]
        elif choice < 0.86:  # AHS whose lengths do not add up
            bhs = Bhs(
                opcode=p.OP_SCSI_COMMAND,
                final=True,
                itt=wire.next_itt(),
                tail=p.build_tail({p.OFF_TTT: 512, **wire.words()}, cdb=bytes([0x28]) + bytes(15)),
            )
            ahs = rnd.choice(
                [b"\0\x20\x01\0", b"\xff\xff\x01\0" + bytes(4), b"\0\x01", b"\0\0\x01\0\0\x05\x02\0"]
            )
            ahs += bytes(-len(ahs) % 4)
            raw = wire.encode(bhs, b"", ahs)
            wire.cmd_sn += 1
        elif choice < 0.9:  # CmdSN far out of the window
            bhs = Bhs(
                opcode=p.OP_NOP_OUT,
                final=True,
                itt=wire.next_itt(),
                tail=p.build_tail(
                    {
                        p.OFF_TTT: p.RESERVED_TAG,
                        p.OFF_CMD_SN: (
                            wire.cmd_sn + rnd.choice([64, 65, 1000, 1 << 31, (1 << 32) - 1, -1 & 0xFFFFFFFF])
                        )
                        & 0xFFFFFFFF,
                    }
                ),
            )
            raw = wire.encode(bhs, b"lost")
        elif choice < 0.95:  # a digest broken on purpose (or garbage where there is none)
            bhs = Bhs(
                opcode=p.OP_NOP_OUT,
                final=True,
                itt=wire.next_itt(),
                tail=p.build_tail({p.OFF_TTT: p.RESERVED_TAG, **wire.words()}),
            )
            header = rnd.random() < 0.5
            raw = wire.encode(bhs, b"ping" * 4, break_header=header, break_data=not header)
            wire.cmd_sn += 1
        else:
            raw = self.mutate(self.scsi_command(wire, writes), header_only=rnd.random() < 0.7)
        return raw

    def lun(self) -> int:
        return self.rnd.choice(
            [
                0,
                0,
                0,
                0,
                1 << 48,
                255 << 48,
                (0x4000 | 0) << 48,
                (0x4001) << 48,
                0xC000 << 48,
                self.rnd.randrange(1 << 64),
            ]
        )

    def cdb(self) -> bytes:
        rnd = self.rnd
        op = rnd.choice(
            [
                0x00,
                0x12,
                0x12,
                0x25,
                0x9E,
                0x28,
                0x28,
                0x88,
                0x88,
                0x2A,
                0x2A,
                0x8A,
                0x8A,
                0x35,
                0x91,
                0xA0,
                0x03,
                0x1A,
                0x5A,
                0x41,
                0x93,
                0x42,
                0xA3,
                0x7F,
                rnd.randrange(256),
            ]
        )
        lba = rnd.choice(
            [0, 1, BLOCKS - 1, BLOCKS, BLOCKS + 1, rnd.randrange(BLOCKS), (1 << 32) - 1, (1 << 64) - 1]
        )
        count = rnd.choice([0, 1, 8, 128, 2048, BLOCKS, 65535, (1 << 32) - 1, rnd.randrange(4096)])
        if op in (0x28, 0x2A):
            cdb = struct.pack(">BBIBHB", op, rnd.randrange(256), lba & 0xFFFFFFFF, 0, count & 0xFFFF, 0)
        elif op in (0x88, 0x8A, 0x91, 0x9E, 0x93):
            cdb = struct.pack(
                ">BBQIBB", op, rnd.choice([0, 0, 0x10, rnd.randrange(256)]), lba, count & 0xFFFFFFFF, 0, 0
            )
        elif op == 0x12:
            cdb = struct.pack(
                ">BBBHB",
                op,
                rnd.choice([0, 1, 1, 2]),
                rnd.choice([0, 0x80, 0x83, 0xB0, 0xB1, 0xFF]),
                rnd.choice([0, 5, 36, 255, 4096, 65535]),
                0,
            )
        elif op == 0xA0:
            cdb = struct.pack(
                ">BBBBBBIBB", op, 0, rnd.randrange(4), 0, 0, 0, rnd.choice([0, 8, 16, 1 << 20]), 0, 0
            )
        else:
            cdb = bytes([op]) + rnd.randbytes(15)
        cdb += bytes(16 - len(cdb))
        return cdb

    def scsi_command(self, wire: Wire, writes: dict[int, int]) -> bytes:
        rnd = self.rnd
        cdb = self.cdb()
        op = cdb[0]
        writing = op in (0x2A, 0x8A, 0x93, 0x41) or rnd.random() < 0.1
        reading = (not writing and rnd.random() < 0.9) or rnd.random() < 0.05
        flags = (
            (p.CMD_READ if reading else 0)
            | (p.CMD_WRITE if writing else 0)
            | rnd.choice([0, 1, 1, 2, 3, 4, 7])
        )
        if writing:
            blocks = (
                struct.unpack(">I", cdb[10:14])[0] if op in (0x8A, 0x93) else struct.unpack(">H", cdb[7:9])[0]
            )
            length = rnd.choice(
                [
                    blocks * 512 & 0xFFFFFFFF,
                    blocks * 512 & 0xFFFFFFFF,
                    512,
                    0,
                    4096,
                    1 << 20,
                    MAX_WRITE,
                    MAX_WRITE + 1,
                    (1 << 32) - 1,
                    rnd.randrange(1 << 20),
                ]
            )
            if length > 2 * MiB and rnd.random() < 0.8:
                length = rnd.choice([512, 4096, 65536])
        else:
            length = rnd.choice(
                [0, 36, 512, 4096, 65536, 1 << 20, SIZE, (1 << 32) - 1, rnd.randrange(1 << 20)]
            )
        first_burst = wire.number("FirstBurstLength", 65536)
        immediate = 0
        if writing and rnd.random() < 0.7:
            immediate = min(length, first_burst, wire.max_send if rnd.random() < 0.9 else TARGET_MRDSL)
            if rnd.random() < 0.1:
                immediate = min(TARGET_MRDSL, immediate + rnd.choice([1, 512, 4096]))
        elif not writing and rnd.random() < 0.03:
            immediate = 100  # data with a command that writes nothing
        ahs = b""
        if rnd.random() < 0.05:
            ahs = p.build_ahs(
                [
                    (
                        rnd.choice([p.AHS_EXTENDED_CDB, p.AHS_BIDI_READ_LENGTH, 9]),
                        rnd.randbytes(rnd.choice([1, 5, 16])),
                    )
                ]
            )
        itt = rnd.choice([wire.next_itt()] * 8 + [p.RESERVED_TAG, wire.itt])
        bhs = Bhs(
            opcode=p.OP_SCSI_COMMAND,
            immediate=rnd.random() < 0.05,
            final=rnd.random() < 0.8,
            flags=flags,
            lun=self.lun(),
            itt=itt,
            tail=p.build_tail({p.OFF_TTT: length, **wire.words()}, cdb=cdb),
        )
        if not bhs.immediate:
            wire.cmd_sn = (wire.cmd_sn + 1) & 0xFFFFFFFF
        if writing:
            writes[itt] = length
        return wire.encode(bhs, rnd.randbytes(immediate), ahs)

    def data_out(self, wire: Wire, writes: dict[int, int]) -> bytes:
        """Unsolicited Data-Out for one of our writes, or Data-Out with wrong fields."""
        rnd = self.rnd
        itt = (
            rnd.choice([*writes, rnd.randrange(1 << 32), p.RESERVED_TAG])
            if writes
            else rnd.randrange(1 << 32)
        )
        total = writes.get(itt, 4096)
        offset = (
            rnd.choice([0, 0, 512, total, total - 512, rnd.randrange(max(total, 1)), (1 << 32) - 512])
            & 0xFFFFFFFF
        )
        length = rnd.choice([512, 4096, wire.max_send, min(total, 65536), 1, 0])
        bhs = Bhs(
            opcode=p.OP_DATA_OUT,
            final=rnd.random() < 0.5,
            lun=self.lun(),
            itt=itt,
            tail=p.build_tail(
                {
                    p.OFF_TTT: rnd.choice([p.RESERVED_TAG, p.RESERVED_TAG, 1, 2, rnd.randrange(1 << 32)]),
                    p.OFF_EXP_STAT_SN: wire.exp_stat_sn,
                    p.OFF_DATA_SN: rnd.choice([0, 0, 1, 2, rnd.randrange(1 << 32)]),
                    p.OFF_BUFFER_OFFSET: offset,
                }
            ),
        )
        return wire.encode(bhs, rnd.randbytes(min(length, TARGET_MRDSL)))

    def answer_r2t(self, wire: Wire, r2t: Bhs) -> bytes:
        """The Data-Out an R2T asks for, sometimes with a field wrong."""
        rnd = self.rnd
        offset, length = r2t.buffer_offset, r2t.desired_data_transfer_length
        step = max(512, min(wire.max_send, 65536))
        out = bytearray()
        for n, start in enumerate(range(offset, offset + length, step)):
            end = min(start + step, offset + length)
            words = {
                p.OFF_TTT: r2t.ttt,
                p.OFF_EXP_STAT_SN: wire.exp_stat_sn,
                p.OFF_DATA_SN: n,
                p.OFF_BUFFER_OFFSET: start,
            }
            size = end - start
            if rnd.random() < 0.05:
                field = rnd.choice([p.OFF_TTT, p.OFF_DATA_SN, p.OFF_BUFFER_OFFSET])
                words[field] = (words[field] + rnd.choice([1, -1, 512, 1 << 31])) & 0xFFFFFFFF
            if rnd.random() < 0.03:
                size = max(0, size + rnd.choice([-512, 512, 1]))
            bhs = Bhs(
                opcode=p.OP_DATA_OUT,
                final=end == offset + length,
                lun=r2t.lun,
                itt=r2t.itt,
                tail=p.build_tail(words),
            )
            out += wire.encode(bhs, rnd.randbytes(min(size, TARGET_MRDSL)))
            if len(out) > 4 * MiB:
                break
        return bytes(out)

    def nop_out(self, wire: Wire) -> bytes:
        rnd = self.rnd
        bhs = Bhs(
            opcode=p.OP_NOP_OUT,
            immediate=rnd.random() < 0.3,
            final=rnd.random() < 0.9,
            lun=self.lun(),
            itt=rnd.choice([wire.next_itt(), wire.next_itt(), p.RESERVED_TAG]),
            tail=p.build_tail({p.OFF_TTT: rnd.choice([p.RESERVED_TAG, p.RESERVED_TAG, 5]), **wire.words()}),
        )
        if not bhs.immediate:
            wire.cmd_sn = (wire.cmd_sn + 1) & 0xFFFFFFFF
        return wire.encode(bhs, rnd.randbytes(rnd.choice([0, 0, 4, 512, 8193, TARGET_MRDSL])))

    def text_request(self, wire: Wire) -> bytes:
        rnd = self.rnd
        body = rnd.choice(
            [
                b"SendTargets=All\0",
                b"SendTargets=All\0",
                b"SendTargets=\0",
                f"SendTargets={RO}\0".encode(),
                b"SendTargets=" + b"x" * 9000 + b"\0",
                b"X-Vendor=1\0MaxBurstLength=512\0",
                b"SendTargets=All",
                b"SendTargets=All\0SendTargets=All\0",
                b"\xff\xfe=\0",
                b"",
            ]
        )
        bhs = Bhs(
            opcode=p.OP_TEXT_REQUEST,
            immediate=rnd.random() < 0.2,
            final=rnd.random() < 0.9,
            flags=p.CONTINUE if rnd.random() < 0.1 else 0,
            itt=rnd.choice([wire.next_itt(), wire.itt]),
            tail=p.build_tail({p.OFF_TTT: rnd.choice([p.RESERVED_TAG, p.RESERVED_TAG, 1]), **wire.words()}),
        )
        if not bhs.immediate:
            wire.cmd_sn = (wire.cmd_sn + 1) & 0xFFFFFFFF
        return wire.encode(bhs, body)

    def task_management(self, wire: Wire, writes: dict[int, int]) -> bytes:
        rnd = self.rnd
        function = rnd.choice([1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 15, 127])
        referenced = rnd.choice([*writes, wire.itt, p.RESERVED_TAG, rnd.randrange(1 << 32)])
        bhs = Bhs(
            opcode=p.OP_TASK_MGMT_REQUEST,
            immediate=rnd.random() < 0.7,
            final=rnd.random() < 0.95,
            flags=function,
            lun=self.lun(),
            itt=wire.next_itt(),
            tail=p.build_tail(
                {
                    p.OFF_TTT: referenced,
                    **wire.words(),
                    p.OFF_MAX_CMD_SN: (wire.cmd_sn + rnd.choice([-1, 0, 1, 100])) & 0xFFFFFFFF,
                }
            ),
        )
        if not bhs.immediate:
            wire.cmd_sn = (wire.cmd_sn + 1) & 0xFFFFFFFF
        return wire.encode(bhs)

    def logout(self, wire: Wire) -> bytes:
        rnd = self.rnd
        bhs = Bhs(
            opcode=p.OP_LOGOUT_REQUEST,
            immediate=rnd.random() < 0.7,
            final=rnd.random() < 0.9,
            flags=rnd.choice([0, 1, 1, 2, 3, 64, 127]),
            itt=wire.next_itt(),
            tail=p.build_tail({p.OFF_TTT: rnd.choice([0, 1, 2, 9, 0xFFFF]) << 16, **wire.words()}),
        )
        if not bhs.immediate:
            wire.cmd_sn = (wire.cmd_sn + 1) & 0xFFFFFFFF
        return wire.encode(bhs)


class GoodClient:
    """A test initiator that must keep getting correct data through the fuzzing."""

    def __init__(self, port: int, target: str, expected: bytes | None, rnd: random.Random) -> None:
        self.ini = Initiator(port, target, name=GOOD_NAME)
        self.expected = (
            bytearray(expected) if expected is not None else bytearray(self.ini.read(0, BLOCKS).data)
        )
        self.writes = expected is None
        self.rnd = rnd
        self.rounds = 0
        self.error: BaseException | None = None

    def run(self, deadline: float) -> None:
        rnd = self.rnd
        try:
            while time.monotonic() < deadline:
                lba = rnd.randrange(BLOCKS)
                blocks = rnd.randint(1, min(2048, BLOCKS - lba))
                start, end = lba * 512, (lba + blocks) * 512
                if self.writes and rnd.random() < 0.5:
                    data = rnd.randbytes(end - start)
                    result = self.ini.write(lba, data)
                    assert result.status == 0, f"write at block {lba} failed: {result}"
                    self.expected[start:end] = data
                result = self.ini.read(lba, blocks)
                assert result.status == 0, f"read at block {lba} failed: {result}"
                assert result.data == self.expected[start:end], f"wrong bytes at block {lba}+{blocks}"
                self.rounds += 1
            assert self.ini.logout().bhs.opcode == p.OP_LOGOUT_RESPONSE
        except BaseException as e:
            self.error = e
        finally:
            self.ini.close()


class QemuClient:
    """libiscsi (through qemu-img) copying the whole read-only export, again and again."""

    def __init__(self, port: int, expected: Path, out: Path) -> None:
        self.url = f"iscsi://127.0.0.1:{port}/{GOOD_RO}/0"
        self.expected = expected.read_bytes()
        self.out = out
        self.rounds = 0
        self.error: BaseException | None = None

    def run(self, deadline: float) -> None:
        try:
            while time.monotonic() < deadline:
                subprocess.run(
                    ["qemu-img", "convert", "-f", "raw", "-O", "raw", self.url, str(self.out)],
                    check=True,
                    capture_output=True,
                    timeout=60,
                )
                assert self.out.read_bytes() == self.expected, "qemu-img read wrong bytes"
                self.rounds += 1
        except BaseException as e:
            self.error = e


def held_connections(port: int) -> int:
    """TCP connections on ``port`` the target has not closed (established or half closed by the
    peer), from the kernel's table: fuzz connections must not linger on the target's side."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                held = state in ("01", "08")  # ESTABLISHED, CLOSE_WAIT
                if int(local.rsplit(":", 1)[1], 16) == port and held:
                    count += 1
    return count


@pytest.mark.slow
def test_fuzzing_leaves_the_target_serving_and_the_data_intact(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    print(f"\n[test_iscsi_fuzz] DINGYUAN_TEST_SEED={SEED} (set it to replay this run)")
    caplog.set_level(logging.INFO, logger="dingyuan.iscsi")
    rnd = random.Random(SEED)
    ro_path, scratch_path, good_path = tmp_path / "ro.img", tmp_path / "scratch.img", tmp_path / "good.img"
    for path in (ro_path, scratch_path, good_path):
        _image(path, rnd)
    ro_bytes = ro_path.read_bytes()
    ro_digest = hashlib.sha256(ro_bytes).hexdigest()
    devices = {
        RO: FileDevice(ro_path, read_only=True),
        SCRATCH: FileDevice(scratch_path),
        SECRET: FileDevice(ro_path, read_only=True),
        GOOD_RO: FileDevice(ro_path, read_only=True),
        GOOD_RW: FileDevice(good_path),
    }

    with ThreadedIscsiServer(host="127.0.0.1", port=0, workers=WORKERS, login_timeout=2.0) as server:
        for name, device in devices.items():
            server.add(name, device, chap=USER if name == SECRET else None)
        threads_before = threading.active_count()
        deadline = time.monotonic() + FUZZ_SECONDS
        fuzzers = [Fuzzer(server.port, random.Random(rnd.randrange(2**64))) for _ in range(FUZZERS)]
        good = [
            GoodClient(server.port, GOOD_RO, ro_bytes, random.Random(rnd.randrange(2**64))),
            GoodClient(server.port, GOOD_RW, None, random.Random(rnd.randrange(2**64))),
        ]
        qemu = QemuClient(server.port, ro_path, tmp_path / "copy.img")
        runners: list[Callable[[float], None]] = [f.run for f in fuzzers]
        runners += [g.run for g in good] + [qemu.run]
        threads = [threading.Thread(target=run, args=(deadline,)) for run in runners]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        context = f"(seed {SEED})"
        broken = [b for f in fuzzers for b in f.broken]
        assert not broken, f"the target sent malformed PDUs {context}: {broken[:3]}"
        clients: list[GoodClient | QemuClient] = [*good, qemu]
        for client in clients:
            assert client.error is None, f"a well-behaved initiator failed: {client.error!r} {context}"
            assert client.rounds >= 5, f"a well-behaved initiator was starved {context}"
        print(f"[test_iscsi_fuzz] sessions: {[f.kinds for f in fuzzers]}")
        print(
            f"[test_iscsi_fuzz] logged in: {[f.logged_in for f in fuzzers]}, "
            f"PDUs from the target: {sum(f.pdus_from_target for f in fuzzers)}, "
            f"good rounds: {[c.rounds for c in clients]}"
        )
        assert sum(f.sessions for f in fuzzers) > 5 * FUZZ_SECONDS, context
        assert sum(f.logged_in for f in fuzzers) > FUZZ_SECONDS, context

        # every fuzz connection ends: silent ones by the login timeout, the rest by hang-up
        settle = time.monotonic() + 10
        while (server.sessions() or held_connections(server.port)) and time.monotonic() < settle:
            time.sleep(0.1)
        assert server.sessions() == [], f"sessions left behind {context}: {server.sessions()}"
        assert held_connections(server.port) == 0, f"connections left hanging {context}"
        assert threading.active_count() <= threads_before + WORKERS, f"threads leaked {context}"

        inq = subprocess.run(
            ["iscsi-inq", f"iscsi://127.0.0.1:{server.port}/{RO}/0"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert inq.returncode == 0, f"iscsi-inq failed {context}: {inq.stderr}"
        with Initiator(server.port, RO) as fresh:
            result = fresh.read(0, BLOCKS)
            assert result.status == 0 and result.data == ro_bytes, context

    for device in devices.values():
        device.close()
    assert hashlib.sha256(ro_path.read_bytes()).hexdigest() == ro_digest, f"read-only image changed {context}"
    errors = [r for r in caplog.records if r.name.startswith("dingyuan.iscsi") and r.levelno >= logging.ERROR]
    assert not errors, f"errors logged {context}: {[(r.getMessage(), r.exc_info) for r in errors[:5]]}"


# -- reproductions of what the fuzzing (and reading the target while writing it) found -----------


def _rss_mib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20


def _login(
    wire: Wire, steps: list[tuple[list[tuple[str, str]], int, int]], *, isid: bytes, tsih: int = 0
) -> Pdu:
    """Log in with the given (keys, CSG, NSG) steps, each with the T bit; the last answer."""
    fuzzer = Fuzzer(0, random.Random(0))
    answer = None
    for pairs, csg, nsg in steps:
        bhs = fuzzer.login_bhs(wire, isid=isid, tsih=tsih, cid=len(steps), csg=csg, nsg=nsg, transit=True)
        answer = fuzzer.login_exchange(wire, bhs, build_text(pairs))
        assert answer is not None and answer.bhs.opcode == p.OP_LOGIN_RESPONSE
        if answer.bhs.status_class != 0:
            return answer
    assert answer is not None
    wire.cmd_sn = answer.bhs.exp_cmd_sn
    return answer


@pytest.fixture
def target(tmp_path: Path) -> Iterator[ThreadedIscsiServer]:
    path = tmp_path / "disk.img"
    _image(path, random.Random(1))
    with ThreadedIscsiServer(host="127.0.0.1", port=0) as server:
        server.add(RO, FileDevice(path, read_only=True))
        server.add(SCRATCH, FileDevice(path))
        server.add(SECRET, FileDevice(path, read_only=True), chap=USER)
        yield server


def test_the_target_must_be_named_in_the_first_login_request(target: ThreadedIscsiServer) -> None:
    """Naming a CHAP target only in the operational stage, after AuthMethod=None was agreed while
    no target was known, once logged in without authentication: the first request must name the
    target (RFC 7143 section 6.3), so whether CHAP applies is known from the start."""
    with socket.create_connection(("127.0.0.1", target.port), timeout=5) as sock:
        wire = Wire(sock)
        answer = _login(
            wire,
            [
                ([("InitiatorName", FUZZ_NAMES[0]), ("AuthMethod", "None")], 0, 1),
                ([("SessionType", "Normal"), ("TargetName", SECRET)], 1, 3),
            ],
            isid=SHARED_ISIDS[0],
        )
        assert (answer.bhs.status_class, answer.bhs.status_detail) == (
            p.STATUS_INITIATOR_ERROR,
            p.DETAIL_MISSING_PARAMETER,
        )


def _commands(wire: Wire, op: int, count: int, length: int) -> None:
    """``count`` READ(16) or WRITE(16) commands of ``length`` bytes at block 0, nothing else."""
    flags = (p.CMD_READ if op == 0x88 else p.CMD_WRITE) | p.ATTR_SIMPLE
    for _ in range(count):
        cdb = struct.pack(">BBQIBB", op, 0, 0, length // 512, 0, 0)
        bhs = Bhs(
            opcode=p.OP_SCSI_COMMAND,
            final=True,
            flags=flags,
            itt=wire.next_itt(),
            tail=p.build_tail({p.OFF_TTT: length, **wire.words()}, cdb=cdb),
        )
        wire.send(wire.encode(bhs))
        wire.cmd_sn += 1


def _logged_in(port: int, target_name: str) -> tuple[socket.socket, Wire]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    wire = Wire(sock)
    keys = [("InitiatorName", FUZZ_NAMES[0]), ("SessionType", "Normal"), ("TargetName", target_name)]
    answer = _login(wire, [(keys, 1, 3)], isid=bytes([0x80]) + os.urandom(5))
    assert answer.bhs.status_class == 0
    return sock, wire


def test_writes_waiting_for_their_data_stay_within_a_budget(target: ThreadedIscsiServer) -> None:
    """Write commands whose data never comes: each would pin its expected length (48 bytes on the
    wire for 8 MiB), so buffers for solicited data come from a server-wide budget, and MaxCmdSN
    only opens as commands finish."""
    sock, wire = _logged_in(target.port, SCRATCH)
    with sock:
        before = _rss_mib()
        _commands(wire, 0x8A, 32, MAX_WRITE)  # 256 MiB announced, no byte of it sent
        time.sleep(1)
        assert _rss_mib() - before < 96


def test_an_initiator_that_does_not_read_cannot_make_the_target_buffer_without_bound(
    target: ThreadedIscsiServer,
) -> None:
    """An initiator that sends reads and never reads the answers: the target stops reading its
    commands once its output backs up, and holds a bounded amount of Data-In per connection."""
    sock, wire = _logged_in(target.port, RO)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        before = _rss_mib()
        _commands(wire, 0x88, 32, SIZE)  # 256 MiB of Data-In asked for, none of it read
        time.sleep(2)
        assert _rss_mib() - before < 96


def test_each_connection_of_a_session_has_its_own_digests(target: ThreadedIscsiServer) -> None:
    """HeaderDigest, DataDigest and MaxRecvDataSegmentLength are connection-only keys (RFC 7143
    section 13): a second connection that negotiated header digests must get them, though the
    session's first connection did not."""
    with (
        Initiator(target.port, RO) as first,
        socket.create_connection(("127.0.0.1", target.port), timeout=5) as sock,
    ):
        wire = Wire(sock)
        keys = [("InitiatorName", "iqn.2026-11.org.dingyuan.test:initiator"), ("SessionType", "Normal")]
        keys += [("TargetName", RO), ("HeaderDigest", "CRC32C")]
        answer = _login(wire, [(keys, 1, 3)], isid=first.isid, tsih=first.tsih)
        assert answer.bhs.status_class == 0 and b"HeaderDigest=CRC32C" in answer.data
        wire.header_digest = True
        wire.cmd_sn = first.cmd_sn
        bhs = Bhs(
            opcode=p.OP_NOP_OUT,
            final=True,
            itt=wire.next_itt(),
            tail=p.build_tail({p.OFF_TTT: p.RESERVED_TAG, **wire.words()}),
        )
        wire.send(wire.encode(bhs))
        replies = wire.poll(2.0)
        assert [r.bhs.opcode for r in replies] == [p.OP_NOP_IN]
