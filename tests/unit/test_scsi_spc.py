"""The primary commands: identification (INQUIRY, REPORT LUNS), mode pages, REPORT SUPPORTED
OPERATION CODES, unit attentions and resets, as initiators read and rely on them."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from scsi_support import (
    BLOCK,
    DEVICE_ID,
    READ10,
    TUR,
    WRITE10,
    A,
    B,
    Harness,
    inquiry,
    make_disk,
    mode_select6,
    mode_select10,
    mode_sense6,
    mode_sense10,
    pad,
    parse_sense,
    report_luns,
    request_sense,
    rsoc,
    rw10,
)

from dingyuan.exports.blockdev import FileDevice
from dingyuan.exports.scsi import LogicalUnit, ScsiTarget

BLOCKS = 2048


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    path = tmp_path / "disk.img"
    make_disk(path, BLOCKS)
    harness = Harness(path)
    yield harness
    harness.target.close()


def vpd(h: Harness, page: int) -> bytes:
    data = h.ok(inquiry(1, page, 1024))
    assert data[1] == page
    assert struct.unpack_from(">H", data, 2)[0] == len(data) - 4
    return data[4:]


def test_standard_inquiry(h: Harness) -> None:
    data = h.ok(inquiry(alloc=260))
    assert data[0] == 0x00  # connected direct-access block device
    assert data[1] & 0x80 == 0  # not removable
    assert data[2] == 0x06  # SPC-4
    assert data[3] & 0x0F == 2 and data[3] & 0xC0 == 0  # response format 2, no AERC/TRMTSK
    assert data[4] == len(data) - 5
    assert data[7] & 0x02  # CMDQUE: the transport queues commands
    assert data[8:16] == b"DINGYUAN"
    assert data[16:32] == b"VAULT DISK      "
    versions = struct.unpack_from(">8H", data, 58)
    assert 0x0460 in versions and 0x04C0 in versions  # SPC-4 and SBC-3
    assert h.ok(inquiry(alloc=8)) == data[:8]
    assert h.fails(inquiry(0, 0x80)).field == bytes((0xC0, 0, 2))  # a page without EVPD


def test_vital_product_data(h: Harness) -> None:
    assert vpd(h, 0x00) == bytes((0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2))
    assert vpd(h, 0x80) == b"DY0001"
    ids = vpd(h, 0x83)
    designators = []
    while ids:
        designators.append((ids[0], ids[1], ids[4 : 4 + ids[3]]))
        ids = ids[4 + ids[3] :]
    assert (0x01, 0x03, b"\x60" + DEVICE_ID[1:]) in designators  # NAA-6, binary, LU
    assert (0x02, 0x01, b"DINGYUANDY0001") in designators  # T10 vendor id
    assert (0x51, 0x94, b"\0\0\0\x01") in designators  # relative target port 1 (iSCSI)
    names = [d[2].rstrip(b"\0") for d in designators if d[1] & 0x0F == 0x8]
    assert names == [b"iqn.2026-01.dingyuan:vault,t,0x0001", b"iqn.2026-01.dingyuan:vault"]
    limits = vpd(h, 0xB0)
    assert len(limits) == 0x3C
    wsnz, caw, granularity, max_transfer = struct.unpack_from(">BBHI", limits)
    assert (wsnz & 1, caw, granularity, max_transfer) == (1, 255, 128, 65536)
    max_unmap, descriptors, unmap_granularity = struct.unpack_from(">III", limits, 16)
    assert (max_unmap, descriptors, unmap_granularity) == (1 << 20, 256, 128)
    assert struct.unpack_from(">H", vpd(h, 0xB1))[0] == 1  # non-rotating
    lbp = vpd(h, 0xB2)
    assert lbp[1] & 0xE0 == 0xE0 and lbp[1] & 0x1C == 0  # UNMAP and WRITE SAME; LBPRZ 0
    assert h.fails(inquiry(1, 0x86)).asc == 0x24


def test_missing_lun_answers_inquiry_and_report_luns_only(tmp_path: Path) -> None:
    paths = []
    for name in ("a.img", "b.img"):
        paths.append(tmp_path / name)
        make_disk(paths[-1], 16)
    target = ScsiTarget(
        {
            0: LogicalUnit(FileDevice(paths[0]), serial="A", device_id=DEVICE_ID),
            300: LogicalUnit(FileDevice(paths[1]), serial="B", device_id=DEVICE_ID),
        }
    )
    response = target.execute(5, pad(inquiry(alloc=36)), b"", A)
    assert (response.status, response.data[0], len(response.data)) == (0, 0x7F, 36)
    data = target.execute(5, pad(report_luns()), b"", A).data
    assert data == struct.pack(">I4x", 16) + bytes(8) + bytes((0x41, 0x2C)) + bytes(6)
    response = target.execute(5, pad(TUR), b"", A)
    sense = parse_sense(response.sense)
    assert (response.status, sense.key, sense.asc) == (0x02, 0x05, 0x25)
    sense = parse_sense(target.execute(5, pad(request_sense()), b"", A).data)
    assert (sense.key, sense.asc) == (0x05, 0x25)
    assert target.execute(300, pad(TUR), b"", A).status == 0
    assert parse_sense(target.execute(0, pad(report_luns(alloc=8)), b"", A).sense).asc == 0x24
    target.close()


def _pages(data: bytes, offset: int) -> dict[int, bytes]:
    pages = {}
    while offset < len(data):
        pages[data[offset] & 0x3F] = data[offset : offset + 2 + data[offset + 1]]
        offset += 2 + data[offset + 1]
    return pages


def test_mode_sense_reports_pages_and_block_descriptor(h: Harness) -> None:
    data = h.ok(mode_sense6(0x3F))
    assert data[0] == len(data) - 1
    assert data[2] == 0x10  # DPOFUA, not write protected
    assert data[3] == 8
    assert struct.unpack_from(">II", data, 4) == (BLOCKS, BLOCK)
    pages = _pages(data, 12)
    assert sorted(pages) == [0x08, 0x0A, 0x1C]
    assert pages[0x08][2] & 0x04  # WCE: a write is durable after SYNCHRONIZE CACHE
    changeable = _pages(h.ok(mode_sense6(0x3F, pc=1, dbd=True)), 4)
    assert changeable[0x08][2] == 0x04 and changeable[0x0A][2] == 0x04
    assert not any(changeable[0x1C][2:])
    sense = h.fails(mode_sense6(0x08, pc=3))
    assert (sense.asc, sense.ascq) == (0x39, 0x00)  # no saved values
    assert h.fails(mode_sense6(0x19)).field == bytes((0xCD, 0, 2))
    long = h.ok(mode_sense10(0x0A, llbaa=True))
    assert struct.unpack_from(">HBBBxH", long) == (len(long) - 2, 0, 0x10, 1, 16)
    assert struct.unpack_from(">Q4xI", long, 8) == (BLOCKS, BLOCK)
    assert long[24] == 0x0A
    assert len(h.ok(mode_sense6(0x3F, alloc=4))) == 4


def test_mode_sense_reports_write_protect_on_a_read_only_device(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    make_disk(path, 16)
    h = Harness(path, read_only=True)
    assert h.ok(mode_sense6(0x3F))[2] & 0x80
    assert h.ok(mode_sense10(0x3F))[3] & 0x80


def test_mode_select_changes_only_what_is_changeable(h: Harness) -> None:
    h.ok(TUR, nexus=B)
    current = h.ok(mode_sense6(0x0A, dbd=True))
    page = bytearray(current[4:])
    page[2] |= 0x04  # D_SENSE
    parameters = bytes(4) + bytes(page)
    h.ok(mode_select6(len(parameters)), parameters)
    sense = h.run(rw10(READ10, BLOCKS, 1)).sense
    assert sense[0] == 0x72  # descriptor format from now on
    # B, another I_T nexus, learns that the mode parameters changed
    sense = h.fails(TUR, nexus=B)
    assert (sense.key, sense.asc, sense.ascq) == (0x06, 0x2A, 0x01)
    page[3] ^= 0x20  # QERR: not changeable
    parameters = bytes(4) + bytes(page)
    sense = h.fails(mode_select6(len(parameters)), parameters)
    assert (sense.asc, sense.field) == (0x26, bytes((0x8D, 0, 7)))
    assert h.fails(mode_select6(len(parameters), save=True), parameters).asc == 0x24


def test_clearing_wce_makes_every_write_flush(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    make_disk(path, 16)
    flushes = []

    class Counting(FileDevice):
        def flush(self) -> None:
            flushes.append(1)
            super().flush()

    unit = LogicalUnit(Counting(path), serial="W", device_id=DEVICE_ID)
    target = ScsiTarget({0: unit})
    caching = target.execute(0, pad(mode_sense10(0x08, dbd=True)), b"", A).data[8:]
    parameters = bytes(8) + bytes((0x08, caching[1], caching[2] & ~0x04)) + caching[3:]
    assert target.execute(0, pad(mode_select10(len(parameters))), parameters, A).status == 0
    assert target.execute(0, pad(rw10(WRITE10, 0, 1)), bytes(BLOCK), A).status == 0
    assert flushes == [1]
    target.close()


def test_report_supported_operation_codes(h: Harness) -> None:
    data = h.ok(rsoc(rctd=True))
    length = struct.unpack_from(">I", data)[0]
    assert length == len(data) - 4
    descriptors = {}
    offset = 4
    while offset < len(data):
        opcode, action, flags, cdb_length = struct.unpack_from(">BxHxBH", data, offset)
        assert flags & 0x02  # CTDP: a timeouts descriptor follows
        assert struct.unpack_from(">H", data, offset + 8)[0] == 0x0A
        descriptors[(opcode, action if flags & 1 else None)] = cdb_length
        offset += 20
    for expected in [(0x28, None), (0x8A, None), (0x89, None), (0x42, None), (0x9E, 0x10), (0x5F, 0x06)]:
        assert expected in descriptors
    assert descriptors[(0x28, None)] == 10 and descriptors[(0x88, None)] == 16
    one = h.ok(rsoc(1, 0x28))
    assert one[:4] == bytes((0, 0x03, 0, 10))
    assert one[4:] == bytes((0x28, 0xFC, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x00))
    assert h.ok(rsoc(2, 0x9E, 0x10, rctd=True))[1] == 0x83
    assert h.ok(rsoc(1, 0xE7))[1] & 0x07 == 0x01  # not supported
    assert h.fails(rsoc(1, 0x9E)).asc == 0x24  # has service actions: option 2 only
    assert h.fails(rsoc(2, 0x28)).asc == 0x24
    # every reported command runs: none of them answers INVALID COMMAND OPERATION CODE
    for opcode, action in descriptors:
        cdb = bytearray(16)
        cdb[0] = opcode
        if action is not None:
            cdb[1] = action
        response = h.run(bytes(cdb))
        assert response.status in (0x00, 0x02, 0x18)
        if response.status == 0x02:
            assert parse_sense(response.sense).asc != 0x20


def test_unknown_commands(h: Harness) -> None:
    sense = h.fails(bytes((0xE7, 0, 0, 0, 0, 0)))
    assert (sense.key, sense.asc, sense.field) == (0x05, 0x20, bytes((0xCF, 0, 0)))
    assert h.fails(bytes((0x9E, 0x11)) + bytes(14)).field == bytes((0xCC, 0, 1))  # service action
    assert h.fails(bytes((0x5E, 0x07)) + bytes(8)).asc == 0x24


def test_report_luns(h: Harness) -> None:
    assert h.ok(report_luns()) == struct.pack(">I4x", 8) + bytes(8)
    assert h.ok(report_luns(select=1)) == bytes(8)
    assert h.fails(report_luns(select=0x7F)).asc == 0x24


def test_reset_sets_a_unit_attention_for_every_nexus(h: Harness) -> None:
    h.ok(TUR, nexus=A)
    h.ok(TUR, nexus=B)
    h.target.reset(lun=0)
    assert h.fails(TUR, nexus=A).asc == 0x29  # the nexus that asked too: each path must learn of it
    h.ok(TUR, nexus=A)
    assert h.ok(inquiry(), nexus=B)[0] == 0  # INQUIRY is not stopped by one
    sense = parse_sense(h.ok(request_sense(), nexus=B))
    assert (sense.key, sense.asc, sense.ascq) == (0x06, 0x29, 0x03)
    h.ok(TUR, nexus=B)  # REQUEST SENSE cleared it
    h.target.reset(lun=None)
    sense = h.fails(rw10(READ10, 0, 1), nexus=A)
    assert (sense.key, sense.asc, sense.ascq) == (0x06, 0x29, 0x00)
    assert h.ok(rw10(READ10, 0, 1), nexus=A)  # reported once
    h.ok(request_sense(), nexus=B)  # B's attention from the target reset
    assert parse_sense(h.ok(request_sense(desc=True))).key == 0x00


def test_request_sense_without_attention_is_no_sense(h: Harness) -> None:
    data = h.ok(request_sense())
    assert len(data) == 18 and data[0] == 0x70 and data[2] == 0 and data[12:14] == b"\0\0"
    assert h.ok(request_sense(desc=True))[0] == 0x72


def test_start_stop_unit_on_a_disk_that_cannot_be_removed(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    make_disk(path, 16)
    flushes = []

    class Counting(FileDevice):
        def flush(self) -> None:
            flushes.append(1)
            super().flush()

    target = ScsiTarget({0: LogicalUnit(Counting(path), serial="S", device_id=DEVICE_ID)})

    def start_stop(immed: int, flags: int) -> tuple[int, bytes]:
        response = target.execute(0, pad(bytes((0x1B, immed, 0, 0, flags, 0))), b"", A)
        return response.status, response.sense[12:14]

    assert start_stop(1, 0x02) == (0x02, b"\x24\x00")  # eject (LOEJ, START=0)
    assert start_stop(0, 0x03) == (0x02, b"\x24\x00")  # load
    assert start_stop(0, 0x01) == (0, b"")
    assert start_stop(1, 0x00) == (0, b"")  # stop: flushed
    assert start_stop(0, 0x04) == (0, b"")  # stop with NO_FLUSH
    assert start_stop(0, 0x32) == (0, b"")  # a power condition: LOEJ ignored
    assert flushes == [1]
    assert target.execute(0, pad(bytes((0x1E, 0, 0, 0, 1, 0))), b"", A).status == 0
    assert target.execute(0, pad(TUR), b"", A).status == 0
    target.close()
