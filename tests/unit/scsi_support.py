"""CDB builders and a sense-data reader for the SCSI layer's unit tests: the bytes an initiator
would send, built by hand so the tests do not share the code under test's idea of a layout."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from dingyuan.exports.blockdev import FileDevice
from dingyuan.exports.scsi import LogicalUnit, Nexus, Response, ScsiTarget

BLOCK = 512
DEVICE_ID = bytes.fromhex("6001405f00000000000000000000abcd")

A = Nexus("iqn.1994-05.com.redhat:alpha,i,0x400001370000", "iqn.2026-01.dingyuan:vault,t,0x0001")
B = Nexus("iqn.1991-05.com.microsoft:beta,i,0x400001370001", "iqn.2026-01.dingyuan:vault,t,0x0001")
C = Nexus("iqn.1998-01.com.vmware:gamma,i,0x400001370002", "iqn.2026-01.dingyuan:vault,t,0x0001")


def pad(cdb: bytes) -> bytes:
    """iSCSI carries CDBs in a 16-byte field: shorter ones are zero-padded."""
    return cdb + bytes(16 - len(cdb))


def rw6(op: int, lba: int, count: int) -> bytes:
    return struct.pack(">BBHBB", op, (lba >> 16) & 0x1F, lba & 0xFFFF, count, 0)


def rw10(op: int, lba: int, count: int, flags: int = 0, group: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, group, count, 0)


def rw12(op: int, lba: int, count: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", op, flags, lba, count, 0, 0)


def rw16(op: int, lba: int, count: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, count, 0, 0)


READ6, READ10, READ12, READ16 = 0x08, 0x28, 0xA8, 0x88
WRITE6, WRITE10, WRITE12, WRITE16 = 0x0A, 0x2A, 0xAA, 0x8A
VERIFY10, VERIFY12, VERIFY16 = 0x2F, 0xAF, 0x8F
WRITE_VERIFY10, WRITE_VERIFY12, WRITE_VERIFY16 = 0x2E, 0xAE, 0x8E
WRITE_SAME10, WRITE_SAME16 = 0x41, 0x93
SYNC10, SYNC16 = 0x35, 0x91
PREFETCH10, PREFETCH16 = 0x34, 0x90
FUA, DPO = 0x08, 0x10


def compare_and_write(lba: int, count: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, flags, lba, count, 0, 0)


def unmap(length: int, anchor: bool = False) -> bytes:
    return struct.pack(">BB4xBHB", 0x42, int(anchor), 0, length, 0)


def unmap_list(ranges: list[tuple[int, int]]) -> bytes:
    descriptors = b"".join(struct.pack(">QI4x", lba, count) for lba, count in ranges)
    return struct.pack(">HH4x", len(descriptors) + 6, len(descriptors)) + descriptors


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd, page, alloc, 0)


def read_capacity10() -> bytes:
    return bytes((0x25,)) + bytes(9)


def read_capacity16(alloc: int = 32) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x10, 0, alloc, 0, 0)


def get_lba_status(lba: int, alloc: int = 4096) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0)


def mode_sense6(page: int, pc: int = 0, dbd: bool = False, alloc: int = 255, subpage: int = 0) -> bytes:
    return bytes((0x1A, 0x08 if dbd else 0, (pc << 6) | page, subpage, alloc, 0))


def mode_sense10(page: int, pc: int = 0, dbd: bool = False, llbaa: bool = False, alloc: int = 1024) -> bytes:
    flags = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return struct.pack(">BBBB3xHB", 0x5A, flags, (pc << 6) | page, 0, alloc, 0)


def mode_select6(length: int, save: bool = False) -> bytes:
    return bytes((0x15, 0x10 | int(save), 0, 0, length, 0))


def mode_select10(length: int) -> bytes:
    return struct.pack(">BB5xHB", 0x55, 0x10, length, 0)


def report_luns(alloc: int = 1024, select: int = 0) -> bytes:
    return struct.pack(">BxB3xIxB", 0xA0, select, alloc, 0)


def rsoc(option: int = 0, opcode: int = 0, action: int = 0, rctd: bool = False, alloc: int = 8192) -> bytes:
    return struct.pack(">BBBBHIxB", 0xA3, 0x0C, (0x80 if rctd else 0) | option, opcode, action, alloc, 0)


def request_sense(alloc: int = 252, desc: bool = False) -> bytes:
    return bytes((0x03, int(desc), 0, 0, alloc, 0))


def prin(action: int, alloc: int = 1024) -> bytes:
    return struct.pack(">BB4xxHB", 0x5E, action, alloc, 0)


def prout(action: int, kind: int = 0, scope: int = 0, length: int = 24) -> bytes:
    return struct.pack(">BBBxxIB", 0x5F, action, (scope << 4) | kind, length, 0)


def prout_parameters(key: int, service_key: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">QQ4xBxxx", key, service_key, flags)


TUR = bytes(6)


@dataclass(frozen=True)
class Sense:
    key: int
    asc: int
    ascq: int
    information: int | None
    field: bytes | None  # the 3 sense-key specific bytes when SKSV is set


def parse_sense(sense: bytes) -> Sense:
    """Read fixed (70h) or descriptor (72h) sense data, independently of the encoder."""
    code = sense[0] & 0x7F
    if code == 0x70:
        info = struct.unpack_from(">I", sense, 3)[0] if sense[0] & 0x80 else None
        sks = sense[15:18] if sense[15] & 0x80 else None
        return Sense(sense[2] & 0x0F, sense[12], sense[13], info, sks)
    assert code == 0x72, sense.hex()
    info = None
    sks = None
    pos, end = 8, 8 + sense[7]
    while pos < end:
        kind, length = sense[pos], sense[pos + 1]
        if kind == 0x00:
            info = struct.unpack_from(">Q", sense, pos + 4)[0]
        elif kind == 0x02:
            sks = sense[pos + 4 : pos + 7]
        pos += 2 + length
    return Sense(sense[1] & 0x0F, sense[2], sense[3], info, sks)


class Harness:
    """A one-LUN target over a file, with the calls an initiator makes."""

    def __init__(self, path: Path, read_only: bool = False, block_size: int = 65536) -> None:
        self.path = path
        self.device = FileDevice(path, read_only=read_only, block_size=block_size)
        self.unit = LogicalUnit(self.device, serial="DY0001", device_id=DEVICE_ID)
        self.target = ScsiTarget({0: self.unit})

    def run(self, cdb: bytes, data_out: bytes = b"", nexus: Nexus = A, lun: int = 0) -> Response:
        return self.target.execute(lun, pad(cdb), data_out, nexus)

    def ok(self, cdb: bytes, data_out: bytes = b"", nexus: Nexus = A, lun: int = 0) -> bytes:
        response = self.run(cdb, data_out, nexus, lun)
        assert response.status == 0, (response.status, response.sense.hex())
        return response.data

    def fails(self, cdb: bytes, data_out: bytes = b"", nexus: Nexus = A, lun: int = 0) -> Sense:
        response = self.run(cdb, data_out, nexus, lun)
        assert response.status == 0x02, response
        return parse_sense(response.sense)


def make_disk(path: Path, blocks: int, fill: bytes | None = None) -> bytearray:
    """A disk image of ``blocks`` blocks, each block i filled with byte i % 251 + 1 (or zeros);
    returns its expected content."""
    if fill is None:
        content = bytearray(b"".join(bytes((i % 251 + 1,)) * BLOCK for i in range(blocks)))
    else:
        content = bytearray(fill * (blocks * BLOCK // len(fill)))
    path.write_bytes(content)
    return content
