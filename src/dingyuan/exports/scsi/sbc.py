"""The block commands of SBC-3: READ, WRITE, VERIFY, WRITE AND VERIFY, WRITE SAME, UNMAP,
COMPARE AND WRITE, PRE-FETCH, SYNCHRONIZE CACHE, READ CAPACITY and GET LBA STATUS.

Logical blocks are always 512 bytes, whatever the device's chunk size: Windows and ESXi expect
512-byte (or 4096-byte) sectors, and 512 lets every initiator address every byte. The device's
``block_size`` becomes the optimal transfer and unmap granularity (VPD B0), and the physical block
exponent up to 4096 bytes: ESXi and Windows accept only 512- or 4096-byte physical sectors.

READ and WRITE 10/16 are the hot path: one ``struct`` unpack, one range check, one device call,
and the device's bytes are returned as they are.

Thin provisioning is reported as far as it is true: UNMAP goes to ``device.trim``, which may keep
the old data (LBPRZ stays 0); WRITE SAME with UNMAP writes zeros with ``device.write_zeroes``
when the block is all zero, so it always reads back as written. GET LBA STATUS reports what
``device.extents`` knows to be holes as deallocated.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from dingyuan.exports.blockdev import BlockDevice
from dingyuan.exports.scsi.command import Access, Command, DataOut, Handler, Request, be
from dingyuan.exports.scsi.gate import WriteGate
from dingyuan.exports.scsi.sense import (
    MISCOMPARE_DURING_VERIFY,
    WRITE_PROTECTED,
    CheckCondition,
    SenseKey,
    invalid_cdb,
    invalid_parameter,
    lba_out_of_range,
    parameter_list_length_error,
)

if TYPE_CHECKING:
    from dingyuan.exports.scsi.target import LogicalUnit

BLOCK_SHIFT = 9
BLOCK = 1 << BLOCK_SHIFT

#: Block limits (VPD B0), in logical blocks; the commands enforce what the page says.
MAX_TRANSFER = 1 << 16  # 32 MiB per READ or WRITE
MAX_WRITE_SAME = 1 << 16
MAX_UNMAP_BLOCKS = 1 << 20  # per UNMAP command (libiscsi finds more than 1M "insanely big")
MAX_UNMAP_DESCRIPTORS = 256
MAX_COMPARE_AND_WRITE = 255
#: physical blocks of at most 4096 bytes: 2**3 logical blocks
MAX_PHYSICAL_EXPONENT = 3

#: GET LBA STATUS looks this far ahead of its starting LBA (the answer may stop short of the end)
LBA_STATUS_WINDOW = 1 << 30

_FUA = 0x08
_PROTECT = 0xE0
_ZERO_PIECE = 1 << 20

_RW10 = struct.Struct(">xBIxH")
_RW12 = struct.Struct(">xBII")
_RW16 = struct.Struct(">xBQI")


class Disk:
    """The device seen in 512-byte logical blocks, with the checks every block command makes."""

    def __init__(self, device: BlockDevice) -> None:
        self.device = device
        self.blocks = device.size >> BLOCK_SHIFT
        chunk = max(device.block_size >> BLOCK_SHIFT, 1)
        #: logical blocks per optimal transfer / unmap granularity (the device's chunk)
        self.granularity = chunk
        self.physical_exponent = min(chunk.bit_length() - 1, MAX_PHYSICAL_EXPONENT)
        self.read_only = device.read_only
        self.gate = WriteGate()

    def check(self, lba: int, count: int, length_byte: int, limit: int = MAX_TRANSFER) -> None:
        if lba + count > self.blocks:
            raise lba_out_of_range()
        if count > limit:
            raise invalid_cdb(length_byte)

    def check_writable(self) -> None:
        if self.read_only:
            raise CheckCondition(SenseKey.DATA_PROTECT, WRITE_PROTECTED)

    def write(self, lba: int, data: bytes, flush: bool) -> None:
        with self.gate.shared():
            self.device.write(lba << BLOCK_SHIFT, data)
        if flush:
            self.device.flush()


def _protect(flags: int) -> None:
    """No protection information: a non-zero RDPROTECT/WRPROTECT/VRPROTECT is refused."""
    if flags & _PROTECT:
        raise invalid_cdb(1, 7)


def _read(lu: LogicalUnit, lba: int, count: int, flags: int, length_byte: int) -> bytes:
    _protect(flags)
    disk = lu.disk
    disk.check(lba, count, length_byte)
    if not count:
        return b""
    return disk.device.read(lba << BLOCK_SHIFT, count << BLOCK_SHIFT)


def _write(lu: LogicalUnit, lba: int, count: int, flags: int, length_byte: int, data: bytes) -> bytes:
    _protect(flags)
    disk = lu.disk
    disk.check(lba, count, length_byte)
    if data:  # fewer blocks than ``count`` when the initiator sent fewer (DataOut.BLOCKS)
        disk.write(lba, data, bool(flags & _FUA) or not lu.modes.write_cache)
    return b""


def _six(cdb: bytes) -> tuple[int, int]:
    """READ(6)/WRITE(6): a 21-bit LBA and a length where 0 means 256."""
    return be(cdb, 1, 3) & 0x1FFFFF, cdb[4] or 256


def plan_read(lu: LogicalUnit, cdb: bytes) -> tuple[int, int] | None:
    """The byte range a READ(10) or READ(16) reads, if it would succeed (no protection bits, in
    range, within the transfer limit, not empty); else None. Reads nothing."""
    if cdb[0] == 0x28 and len(cdb) >= 10:
        flags, lba, count = _RW10.unpack_from(cdb)
    elif cdb[0] == 0x88 and len(cdb) >= 16:
        flags, lba, count = _RW16.unpack_from(cdb)
    else:
        return None
    if flags & _PROTECT or not 0 < count <= MAX_TRANSFER or lba + count > lu.disk.blocks:
        return None
    return lba << BLOCK_SHIFT, count << BLOCK_SHIFT


def read6(lu: LogicalUnit, req: Request) -> bytes:
    lba, count = _six(req.cdb)
    return _read(lu, lba, count, 0, 4)


def read10(lu: LogicalUnit, req: Request) -> bytes:
    flags, lba, count = _RW10.unpack_from(req.cdb)
    return _read(lu, lba, count, flags, 7)


def read12(lu: LogicalUnit, req: Request) -> bytes:
    flags, lba, count = _RW12.unpack_from(req.cdb)
    return _read(lu, lba, count, flags, 6)


def read16(lu: LogicalUnit, req: Request) -> bytes:
    flags, lba, count = _RW16.unpack_from(req.cdb)
    return _read(lu, lba, count, flags, 10)


def write6(lu: LogicalUnit, req: Request) -> bytes:
    lba, count = _six(req.cdb)
    return _write(lu, lba, count, 0, 4, req.data_out)


def write10(lu: LogicalUnit, req: Request) -> bytes:
    flags, lba, count = _RW10.unpack_from(req.cdb)
    return _write(lu, lba, count, flags, 7, req.data_out)


def write12(lu: LogicalUnit, req: Request) -> bytes:
    flags, lba, count = _RW12.unpack_from(req.cdb)
    return _write(lu, lba, count, flags, 6, req.data_out)


def write16(lu: LogicalUnit, req: Request) -> bytes:
    flags, lba, count = _RW16.unpack_from(req.cdb)
    return _write(lu, lba, count, flags, 10, req.data_out)


# -- VERIFY and WRITE AND VERIFY -----------------------------------------------------------------


def _compare(expected: bytes, actual: bytes) -> None:
    """MISCOMPARE with the offset of the first differing byte in the INFORMATION field."""
    if expected != actual:
        offset = next(i for i, (a, b) in enumerate(zip(expected, actual, strict=True)) if a != b)
        raise CheckCondition(SenseKey.MISCOMPARE, MISCOMPARE_DURING_VERIFY, information=offset)


def _bytchk(flags: int) -> int:
    mode = (flags >> 1) & 0x03
    if mode == 0b10:
        raise invalid_cdb(1, 2)
    return mode


def _verify_length(cdb: bytes, count: int) -> int:
    """Data-Out of VERIFY: none (BYTCHK 00), every block (01) or one block for all (11)."""
    mode = (cdb[1] >> 1) & 0x03
    if mode == 0b01:
        return count << BLOCK_SHIFT
    if mode == 0b11 and count:
        return BLOCK
    return 0


def _verify(lu: LogicalUnit, lba: int, count: int, flags: int, length_byte: int, data: bytes) -> bytes:
    _protect(flags)
    mode = _bytchk(flags)
    disk = lu.disk
    disk.check(lba, count, length_byte)
    if not count:
        return b""
    stored = disk.device.read(lba << BLOCK_SHIFT, count << BLOCK_SHIFT)
    if mode == 0b01:
        _compare(data, stored)
    elif mode == 0b11:
        _compare(data * count, stored)
    return b""


def verify10(lu: LogicalUnit, req: Request) -> bytes:
    flags, lba, count = _RW10.unpack_from(req.cdb)
    return _verify(lu, lba, count, flags, 7, req.data_out)


def verify12(lu: LogicalUnit, req: Request) -> bytes:
    flags, lba, count = _RW12.unpack_from(req.cdb)
    return _verify(lu, lba, count, flags, 6, req.data_out)


def verify16(lu: LogicalUnit, req: Request) -> bytes:
    flags, lba, count = _RW16.unpack_from(req.cdb)
    return _verify(lu, lba, count, flags, 10, req.data_out)


def _write_verify(lu: LogicalUnit, lba: int, count: int, flags: int, length_byte: int, data: bytes) -> bytes:
    """WRITE AND VERIFY: the write is always flushed before it is read back (the point of the
    command is that the medium holds it), and BYTCHK=1 compares what was read."""
    _protect(flags)
    if _bytchk(flags) == 0b11:
        raise invalid_cdb(1, 2)
    disk = lu.disk
    disk.check(lba, count, length_byte)
    if not data:  # fewer blocks than ``count`` when the initiator sent fewer (DataOut.BLOCKS)
        return b""
    disk.write(lba, data, True)
    stored = disk.device.read(lba << BLOCK_SHIFT, len(data))
    if flags & 0x02:
        _compare(data, stored)
    return b""


def write_verify10(lu: LogicalUnit, req: Request) -> bytes:
    flags, lba, count = _RW10.unpack_from(req.cdb)
    return _write_verify(lu, lba, count, flags, 7, req.data_out)


def write_verify12(lu: LogicalUnit, req: Request) -> bytes:
    flags, lba, count = _RW12.unpack_from(req.cdb)
    return _write_verify(lu, lba, count, flags, 6, req.data_out)


def write_verify16(lu: LogicalUnit, req: Request) -> bytes:
    flags, lba, count = _RW16.unpack_from(req.cdb)
    return _write_verify(lu, lba, count, flags, 10, req.data_out)


# -- WRITE SAME, UNMAP, COMPARE AND WRITE --------------------------------------------------------


def _write_same(lu: LogicalUnit, lba: int, count: int, flags: int, length_byte: int, block: bytes) -> bytes:
    """WRITE SAME: an all-zero block (or NDOB) becomes ``write_zeroes``, whether or not UNMAP is
    set (zeros are what a deallocated block must read as, and what the device can do cheaply);
    any other block is written out in pieces of at most 1 MiB. A count of 0 would mean "to the
    end of the medium": the block limits page sets WSNZ, so it is refused."""
    _protect(flags)
    if flags & 0x10:  # ANCHOR: no anchored state (ANC_SUP=0)
        raise invalid_cdb(1, 4)
    disk = lu.disk
    disk.check(lba, count, length_byte, MAX_WRITE_SAME)
    if not count:
        raise invalid_cdb(length_byte)
    offset, length = lba << BLOCK_SHIFT, count << BLOCK_SHIFT
    with disk.gate.shared():
        if not any(block):
            disk.device.write_zeroes(offset, length)
        else:
            piece = block * min(count, _ZERO_PIECE >> BLOCK_SHIFT)
            end = offset + length
            while offset < end:
                part = piece if end - offset >= len(piece) else piece[: end - offset]
                disk.device.write(offset, part)
                offset += len(part)
    if not lu.modes.write_cache:
        disk.device.flush()
    return b""


def write_same10(lu: LogicalUnit, req: Request) -> bytes:
    flags, lba, count = _RW10.unpack_from(req.cdb)
    return _write_same(lu, lba, count, flags, 7, req.data_out)


def write_same16(lu: LogicalUnit, req: Request) -> bytes:
    flags, lba, count = _RW16.unpack_from(req.cdb)
    block = bytes(BLOCK) if flags & 0x01 else req.data_out
    return _write_same(lu, lba, count, flags, 10, block)


def _write_same16_out(cdb: bytes) -> int:
    return 0 if cdb[1] & 0x01 else BLOCK


def unmap(lu: LogicalUnit, req: Request) -> bytes:
    """UNMAP: the whole parameter list is checked before anything is trimmed."""
    if req.cdb[1] & 0x01:
        raise invalid_cdb(1, 0)
    data = req.data_out
    if not data:
        return b""
    if len(data) < 8:
        raise parameter_list_length_error()
    disk = lu.disk
    described = min(be(data, 2, 2), len(data) - 8) // 16
    if described > MAX_UNMAP_DESCRIPTORS:
        raise invalid_parameter(2)
    ranges = []
    total = 0
    for i in range(described):
        lba, count = struct.unpack_from(">QI", data, 8 + 16 * i)
        if lba + count > disk.blocks:
            raise lba_out_of_range()
        total += count
        if total > MAX_UNMAP_BLOCKS:
            raise invalid_parameter(8 + 16 * i + 8)
        if count:
            ranges.append((lba, count))
    with disk.gate.shared():
        for lba, count in ranges:
            disk.device.trim(lba << BLOCK_SHIFT, count << BLOCK_SHIFT)
    return b""


def compare_and_write(lu: LogicalUnit, req: Request) -> bytes:
    """COMPARE AND WRITE: compare the first half of the Data-Out with the medium and, only if it
    matches, write the second half, with no other write in between (VMware's ATS locking rests
    on this)."""
    cdb = req.cdb
    flags = cdb[1]
    _protect(flags)
    lba, count = be(cdb, 2, 8), cdb[13]
    disk = lu.disk
    disk.check(lba, count, 13, MAX_COMPARE_AND_WRITE)
    if not count:
        return b""
    length = count << BLOCK_SHIFT
    verify, data = req.data_out[:length], req.data_out[length:]
    with disk.gate.exclusive():
        _compare(verify, disk.device.read(lba << BLOCK_SHIFT, length))
        disk.device.write(lba << BLOCK_SHIFT, data)
    if flags & _FUA or not lu.modes.write_cache:
        disk.device.flush()
    return b""


# -- PRE-FETCH, SYNCHRONIZE CACHE ----------------------------------------------------------------


def _range_or_rest(lu: LogicalUnit, lba: int, count: int) -> int:
    """PRE-FETCH and SYNCHRONIZE CACHE: a count of 0 means through the last block."""
    disk = lu.disk
    if lba + count > disk.blocks:
        raise lba_out_of_range()
    return count or disk.blocks - lba


def prefetch10(lu: LogicalUnit, req: Request) -> bytes:
    lba, count = be(req.cdb, 2, 4), be(req.cdb, 7, 2)
    return _prefetch(lu, lba, count)


def prefetch16(lu: LogicalUnit, req: Request) -> bytes:
    lba, count = be(req.cdb, 2, 8), be(req.cdb, 10, 4)
    return _prefetch(lu, lba, count)


def _prefetch(lu: LogicalUnit, lba: int, count: int) -> bytes:
    count = _range_or_rest(lu, lba, count)
    if count:
        lu.disk.device.cache(lba << BLOCK_SHIFT, count << BLOCK_SHIFT)
    return b""


def synchronize_cache10(lu: LogicalUnit, req: Request) -> bytes:
    _range_or_rest(lu, be(req.cdb, 2, 4), be(req.cdb, 7, 2))
    lu.disk.device.flush()
    return b""


def synchronize_cache16(lu: LogicalUnit, req: Request) -> bytes:
    _range_or_rest(lu, be(req.cdb, 2, 8), be(req.cdb, 10, 4))
    lu.disk.device.flush()
    return b""


# -- READ CAPACITY, GET LBA STATUS ---------------------------------------------------------------


def read_capacity10(lu: LogicalUnit, req: Request) -> bytes:
    cdb = req.cdb
    if not cdb[8] & 0x01 and be(cdb, 2, 4):
        raise invalid_cdb(2)
    return struct.pack(">II", min(lu.disk.blocks - 1, 0xFFFFFFFF), BLOCK)


def read_capacity16(lu: LogicalUnit, req: Request) -> bytes:
    cdb = req.cdb
    if not cdb[14] & 0x01 and be(cdb, 2, 8):
        raise invalid_cdb(2)
    disk = lu.disk
    # LBPME: UNMAP and GET LBA STATUS work; LBPRZ stays 0 (a trim may keep old data)
    return struct.pack(">QIBBH16x", disk.blocks - 1, BLOCK, 0, disk.physical_exponent, 0x8000)


def get_lba_status(lu: LogicalUnit, req: Request) -> bytes:
    """GET LBA STATUS: descriptors from the starting LBA on, holes as deallocated (1), the rest
    as mapped (0); a block only partly inside a hole is mapped."""
    disk = lu.disk
    start = be(req.cdb, 2, 8)
    if start >= disk.blocks:
        raise lba_out_of_range()
    offset = start << BLOCK_SHIFT
    length = min((disk.blocks - start) << BLOCK_SHIFT, LBA_STATUS_WINDOW)
    runs: list[list[int]] = []  # [first block, end block, status]
    pos = offset
    for size, zero in disk.device.extents(offset, length):
        end = pos + size
        if zero:
            first, last = -(-pos // BLOCK), end // BLOCK
            if last > first:
                _add_run(runs, pos // BLOCK, first, 0)
                _add_run(runs, first, last, 1)
                _add_run(runs, last, -(-end // BLOCK), 0)
            else:
                _add_run(runs, pos // BLOCK, -(-end // BLOCK), 0)
        else:
            _add_run(runs, pos // BLOCK, -(-end // BLOCK), 0)
        pos = end
    descriptors = b"".join(
        struct.pack(">QIB3x", first, min(end - first, 0xFFFFFFFF), status) for first, end, status in runs
    )
    return struct.pack(">I4x", len(descriptors) + 4) + descriptors


def _add_run(runs: list[list[int]], first: int, end: int, status: int) -> None:
    if runs and runs[-1][1] > first:
        first = runs[-1][1]  # a block shared by two extents is counted once (as mapped)
    if end <= first:
        return
    if runs and runs[-1][2] == status and runs[-1][1] - runs[-1][0] + end - first <= 0xFFFFFFFF:
        runs[-1][1] = end
    else:
        runs.append([first, end, status])


# -- the table -----------------------------------------------------------------------------------


class _Length:
    """Data-Out of a write: the TRANSFER LENGTH field times the block size."""

    def __init__(self, offset: int, width: int) -> None:
        self.offset, self.width = offset, width

    def __call__(self, cdb: bytes) -> int:
        return be(cdb, self.offset, self.width) << BLOCK_SHIFT


def _write6_out(cdb: bytes) -> int:
    return (cdb[4] or 256) << BLOCK_SHIFT


def _verify10_out(cdb: bytes) -> int:
    return _verify_length(cdb, be(cdb, 7, 2))


def _verify12_out(cdb: bytes) -> int:
    return _verify_length(cdb, be(cdb, 6, 4))


def _verify16_out(cdb: bytes) -> int:
    return _verify_length(cdb, be(cdb, 10, 4))


def _unmap_out(cdb: bytes) -> int:
    return be(cdb, 7, 2)


def _compare_and_write_out(cdb: bytes) -> int:
    return cdb[13] << (BLOCK_SHIFT + 1)


def _write_same10_out(cdb: bytes) -> int:
    return BLOCK


_U6 = bytes((0x1F, 0xFF, 0xFF, 0xFF, 0x00))
_U10 = bytes((0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x00))
_U12 = bytes((0xFF,) * 8) + bytes((0x1F, 0x00))
_U16 = bytes((0xFF,) * 12) + bytes((0x1F, 0x00))


def _u(opcode: int, flags: int, rest: bytes) -> bytes:
    return bytes((opcode, flags)) + rest


R = Access.READ
_BLOCKS, _EXACT = DataOut.BLOCKS, DataOut.EXACT
_SLOW = (5, 300)  # timeouts of the commands that may touch the whole device


def _writer(
    opcode: int,
    name: str,
    usage: bytes,
    run: Handler,
    data_out: Callable[[bytes], int] | None,
    policy: DataOut = DataOut.CUT,
    timeouts: tuple[int, int] = (1, 30),
) -> Command:
    return Command(
        opcode,
        name,
        usage,
        run,
        Access.WRITE,
        data_out=data_out,
        data_out_policy=policy,
        writes=True,
        timeouts=timeouts,
    )


COMMANDS = (
    Command(0x08, "READ(6)", bytes((0x08,)) + _U6, read6, R),
    Command(0x28, "READ(10)", _u(0x28, 0xFC, _U10), read10, R),
    Command(0xA8, "READ(12)", _u(0xA8, 0xFC, _U12), read12, R),
    Command(0x88, "READ(16)", _u(0x88, 0xFC, _U16), read16, R),
    _writer(0x0A, "WRITE(6)", bytes((0x0A,)) + _U6, write6, _write6_out, _BLOCKS),
    _writer(0x2A, "WRITE(10)", _u(0x2A, 0xF8, _U10), write10, _Length(7, 2), _BLOCKS),
    _writer(0xAA, "WRITE(12)", _u(0xAA, 0xF8, _U12), write12, _Length(6, 4), _BLOCKS),
    _writer(0x8A, "WRITE(16)", _u(0x8A, 0xF8, _U16), write16, _Length(10, 4), _BLOCKS),
    Command(0x2F, "VERIFY(10)", _u(0x2F, 0xF6, _U10), verify10, R, data_out=_verify10_out),
    Command(0xAF, "VERIFY(12)", _u(0xAF, 0xF6, _U12), verify12, R, data_out=_verify12_out),
    Command(0x8F, "VERIFY(16)", _u(0x8F, 0xF6, _U16), verify16, R, data_out=_verify16_out),
    _writer(0x2E, "WRITE AND VERIFY(10)", _u(0x2E, 0xF6, _U10), write_verify10, _Length(7, 2), _BLOCKS),
    _writer(0xAE, "WRITE AND VERIFY(12)", _u(0xAE, 0xF6, _U12), write_verify12, _Length(6, 4), _BLOCKS),
    _writer(0x8E, "WRITE AND VERIFY(16)", _u(0x8E, 0xF6, _U16), write_verify16, _Length(10, 4), _BLOCKS),
    _writer(0x41, "WRITE SAME(10)", _u(0x41, 0xF8, _U10), write_same10, _write_same10_out, _EXACT, _SLOW),
    _writer(0x93, "WRITE SAME(16)", _u(0x93, 0xF9, _U16), write_same16, _write_same16_out, _EXACT, _SLOW),
    _writer(
        0x42,
        "UNMAP",
        bytes((0x42, 0x01, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0x00)),
        unmap,
        _unmap_out,
        timeouts=_SLOW,
    ),
    _writer(
        0x89,
        "COMPARE AND WRITE",
        bytes((0x89, 0xF8, *(0xFF,) * 8, 0, 0, 0, 0xFF, 0x1F, 0x00)),
        compare_and_write,
        _compare_and_write_out,
        _EXACT,
    ),
    Command(0x34, "PRE-FETCH(10)", _u(0x34, 0x02, _U10), prefetch10, R, timeouts=_SLOW),
    Command(0x90, "PRE-FETCH(16)", _u(0x90, 0x02, _U16), prefetch16, R, timeouts=_SLOW),
    _writer(0x35, "SYNCHRONIZE CACHE(10)", _u(0x35, 0x06, _U10), synchronize_cache10, None, timeouts=_SLOW),
    _writer(0x91, "SYNCHRONIZE CACHE(16)", _u(0x91, 0x06, _U16), synchronize_cache16, None, timeouts=_SLOW),
    Command(
        0x25,
        "READ CAPACITY(10)",
        bytes((0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0)),
        read_capacity10,
        Access.STATUS,
    ),
    Command(
        0x9E,
        "READ CAPACITY(16)",
        bytes((0x9E, 0x1F, *(0xFF,) * 12, 0x01, 0x00)),
        read_capacity16,
        Access.STATUS,
        service_action=0x10,
        allocation=(10, 4),
    ),
    Command(
        0x9E,
        "GET LBA STATUS",
        bytes((0x9E, 0x1F, *(0xFF,) * 12, 0x00, 0x00)),
        get_lba_status,
        R,
        service_action=0x12,
        allocation=(10, 4),
    ),
)
