"""The block commands of the SCSI layer against a FileDevice: the file's bytes change exactly as
the initiator asked, and every refusal carries the sense data SBC-3 prescribes."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scsi_support import (
    BLOCK,
    DEVICE_ID,
    DPO,
    FUA,
    PREFETCH10,
    PREFETCH16,
    READ6,
    READ10,
    READ12,
    READ16,
    SYNC10,
    SYNC16,
    VERIFY10,
    VERIFY12,
    VERIFY16,
    WRITE6,
    WRITE10,
    WRITE12,
    WRITE16,
    WRITE_SAME10,
    WRITE_SAME16,
    WRITE_VERIFY10,
    WRITE_VERIFY16,
    A,
    Harness,
    compare_and_write,
    get_lba_status,
    make_disk,
    pad,
    parse_sense,
    read_capacity10,
    read_capacity16,
    rw6,
    rw10,
    rw12,
    rw16,
    unmap,
    unmap_list,
)

from dingyuan.errors import StorageFull, StorageIOError
from dingyuan.exports.blockdev import FileDevice
from dingyuan.exports.scsi import LogicalUnit, ScsiTarget

BLOCKS = 2048  # 1 MiB


class Recording:
    """A FileDevice that records the calls the SCSI layer makes, and can fail on purpose."""

    def __init__(self, device: FileDevice, fail: dict[str, Exception] | None = None) -> None:
        self._device = device
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail or {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._device, name)
        if not callable(attr):
            return attr

        def call(*args: Any) -> Any:
            self.calls.append((name, *args))
            if name in self.fail:
                raise self.fail[name]
            return attr(*args)

        return call

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[tuple[Harness, bytearray]]:
    path = tmp_path / "disk.img"
    content = make_disk(path, BLOCKS)
    harness = Harness(path)
    yield harness, content
    harness.target.close()


def recording(
    tmp_path: Path, read_only: bool = False, **fail: Exception
) -> tuple[ScsiTarget, Recording, bytearray]:
    path = tmp_path / "rec.img"
    content = make_disk(path, BLOCKS)
    device = Recording(FileDevice(path, read_only=read_only), fail)
    unit = LogicalUnit(device, serial="R1", device_id=DEVICE_ID)  # type: ignore[arg-type]
    return ScsiTarget({0: unit}), device, content


def run(target: ScsiTarget, cdb: bytes, data_out: bytes = b"") -> Any:
    return target.execute(0, pad(cdb), data_out, A)


@pytest.mark.parametrize(
    ("write", "read"),
    [
        (lambda lba, n, f: rw10(WRITE10, lba, n, f), lambda lba, n, f: rw10(READ10, lba, n, f)),
        (lambda lba, n, f: rw12(WRITE12, lba, n, f), lambda lba, n, f: rw12(READ12, lba, n, f)),
        (lambda lba, n, f: rw16(WRITE16, lba, n, f), lambda lba, n, f: rw16(READ16, lba, n, f)),
        (lambda lba, n, f: rw6(WRITE6, lba, n), lambda lba, n, f: rw6(READ6, lba, n)),
    ],
)
def test_write_then_read_changes_exactly_those_blocks(
    disk: tuple[Harness, bytearray], write: Any, read: Any
) -> None:
    h, content = disk
    data = bytes(range(256)) * 2 * 3
    h.ok(write(BLOCKS - 3, 3, DPO), data)
    content[(BLOCKS - 3) * BLOCK :] = data
    assert h.path.read_bytes() == content
    assert h.ok(read(BLOCKS - 4, 4, 0)) == content[(BLOCKS - 4) * BLOCK :]


def test_read6_length_zero_means_256_blocks(disk: tuple[Harness, bytearray]) -> None:
    h, content = disk
    assert h.ok(rw6(READ6, 10, 0)) == content[10 * BLOCK : 266 * BLOCK]


def test_transfer_length_zero_is_a_no_op(disk: tuple[Harness, bytearray]) -> None:
    h, content = disk
    assert h.ok(rw10(READ10, BLOCKS, 0)) == b""  # even at the end of the medium
    response = h.run(rw16(WRITE16, 0, 0), b"ignored")
    assert (response.status, response.data_out_length) == (0, 0)
    assert h.path.read_bytes() == content


@pytest.mark.parametrize(
    ("cdb", "data"),
    [
        (rw10(READ10, BLOCKS, 1), b""),
        (rw10(READ10, BLOCKS - 1, 2), b""),
        (rw16(READ16, 2**64 - 1, 1), b""),
        (rw12(READ12, 0xFFFFFFFF, 1), b""),
        (rw6(READ6, BLOCKS - 10, 0), b""),
        (rw10(WRITE10, BLOCKS - 1, 2), bytes(2 * BLOCK)),
        (rw16(WRITE16, 2**63, 1), bytes(BLOCK)),
        (rw10(VERIFY10, BLOCKS, 1), b""),
        (rw16(WRITE_SAME16, BLOCKS - 1, 2), bytes(BLOCK)),
        (compare_and_write(BLOCKS, 1), bytes(2 * BLOCK)),
        (rw10(SYNC10, BLOCKS, 1), b""),
        (rw16(PREFETCH16, BLOCKS + 5, 1), b""),
    ],
)
def test_lba_out_of_range(disk: tuple[Harness, bytearray], cdb: bytes, data: bytes) -> None:
    h, content = disk
    sense = h.fails(cdb, data)
    assert (sense.key, sense.asc, sense.ascq) == (0x05, 0x21, 0x00)
    assert h.path.read_bytes() == content


@pytest.mark.parametrize("op", [READ10, WRITE10, VERIFY10, WRITE_VERIFY10, WRITE_SAME10])
def test_protection_information_is_refused(disk: tuple[Harness, bytearray], op: int) -> None:
    h, content = disk
    sense = h.fails(rw10(op, 0, 1, 0x20), bytes(BLOCK))
    assert (sense.key, sense.asc, sense.field) == (0x05, 0x24, bytes((0xCF, 0, 1)))
    assert h.path.read_bytes() == content


def test_reserved_bits_point_at_the_field(disk: tuple[Harness, bytearray]) -> None:
    h, _ = disk
    cdb = bytearray(rw10(READ10, 0, 1))
    cdb[6] = 0x80  # reserved bit above GROUP NUMBER
    sense = h.fails(bytes(cdb))
    assert (sense.key, sense.asc, sense.field) == (0x05, 0x24, bytes((0xCF, 0, 6)))
    cdb = bytearray(rw10(READ10, 0, 1))
    cdb[9] = 0x04  # NACA: not supported
    assert h.fails(bytes(cdb)).field == bytes((0xCA, 0, 9))


def test_data_out_of_another_length(disk: tuple[Harness, bytearray]) -> None:
    """What libiscsi's iSCSIResiduals and InvalidDataOutSize tests expect: a WRITE with fewer
    whole blocks than its CDB writes those blocks, a partial block writes nothing, more Data-Out
    than needed is cut; WRITE SAME and COMPARE AND WRITE take exactly their length only."""
    h, content = disk
    response = h.run(rw10(WRITE10, 5, 2), b"x" * (BLOCK + 200))
    assert (response.status, response.data_out_length) == (0x02, 2 * BLOCK)
    sense = parse_sense(response.sense)
    assert (sense.key, sense.asc, sense.ascq) == (0x05, 0x0E, 0x03)
    assert h.path.read_bytes() == content
    response = h.run(rw10(WRITE10, 5, 2), b"w" * BLOCK)
    assert (response.status, response.data_out_length) == (0, 2 * BLOCK)
    content[5 * BLOCK : 6 * BLOCK] = b"w" * BLOCK
    assert h.path.read_bytes() == content
    assert h.run(rw16(WRITE_VERIFY16, 9, 1), b"").status == 0  # nothing sent, nothing written
    response = h.run(rw10(WRITE10, 5, 1), b"y" * (3 * BLOCK))
    assert (response.status, response.data_out_length) == (0, BLOCK)
    content[5 * BLOCK : 6 * BLOCK] = b"y" * BLOCK
    assert h.path.read_bytes() == content
    for cdb, data in [
        (rw10(WRITE_SAME10, 0, 4), bytes(BLOCK // 2)),
        (rw10(WRITE_SAME10, 0, 4), bytes(2 * BLOCK)),
        (compare_and_write(0, 1), bytes(4 * BLOCK)),
        (compare_and_write(0, 2), bytes(2 * BLOCK)),
    ]:
        assert (h.fails(cdb, data).asc, h.fails(cdb, data).ascq) == (0x0E, 0x03)
    assert h.path.read_bytes() == content


def test_fua_flushes_after_the_write(tmp_path: Path) -> None:
    target, device, _ = recording(tmp_path)
    assert run(target, rw10(WRITE10, 1, 1), bytes(BLOCK)).status == 0
    assert "flush" not in device.names()
    assert run(target, rw16(WRITE16, 1, 1, FUA), bytes(BLOCK)).status == 0
    assert device.names()[-2:] == ["write", "flush"]


def test_read_only_device_refuses_every_write(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    content = make_disk(path, BLOCKS)
    h = Harness(path, read_only=True)
    for cdb, data in [
        (rw10(WRITE10, 0, 1), bytes(BLOCK)),
        (rw16(WRITE16, 0, 0), b""),
        (rw10(WRITE_SAME10, 0, 1, 0x08), bytes(BLOCK)),
        (rw10(WRITE_SAME10, 0, 1, 0x08), b""),  # WRITE PROTECTED before the missing block
        (unmap(24), unmap_list([(0, 8)])),
        (compare_and_write(0, 1), content[:BLOCK] + bytes(BLOCK)),
        (rw16(WRITE_VERIFY16, 0, 1), bytes(BLOCK)),
    ]:
        sense = h.fails(cdb, data)
        assert (sense.key, sense.asc, sense.ascq) == (0x07, 0x27, 0x00), cdb.hex()
    assert h.ok(rw10(READ10, 0, 2)) == content[: 2 * BLOCK]
    assert h.path.read_bytes() == content


@pytest.mark.parametrize(
    ("method", "error", "cdb", "expected"),
    [
        ("read", StorageIOError(name="x", detail="EIO"), rw10(READ10, 0, 1), (0x03, 0x11, 0x00)),
        ("write", StorageIOError(name="x", detail="EIO"), rw10(WRITE10, 0, 1), (0x03, 0x0C, 0x00)),
        ("write", StorageFull(name="x"), rw10(WRITE10, 0, 1), (0x07, 0x27, 0x07)),
        ("flush", StorageIOError(name="x", detail="EIO"), rw10(SYNC10, 0, 0), (0x03, 0x0C, 0x00)),
    ],
)
def test_device_errors_become_sense_data(
    tmp_path: Path, method: str, error: Exception, cdb: bytes, expected: tuple[int, int, int]
) -> None:
    target, _, _ = recording(tmp_path, **{method: error})
    response = run(target, cdb, bytes(BLOCK))
    sense = parse_sense(response.sense)
    assert (response.status, (sense.key, sense.asc, sense.ascq)) == (0x02, expected)


@pytest.mark.parametrize("op", [VERIFY10, VERIFY12, VERIFY16])
def test_verify_compares_and_reports_the_first_difference(disk: tuple[Harness, bytearray], op: int) -> None:
    h, content = disk
    build = {VERIFY10: rw10, VERIFY12: rw12, VERIFY16: rw16}[op]
    assert h.ok(build(op, 3, 2, 0)) == b""  # BYTCHK 0: a medium check only
    assert h.ok(build(op, 3, 2, 0x02), bytes(content[3 * BLOCK : 5 * BLOCK])) == b""
    wrong = bytearray(content[3 * BLOCK : 5 * BLOCK])
    wrong[700] ^= 0xFF
    sense = h.fails(build(op, 3, 2, 0x02), bytes(wrong))
    assert (sense.key, sense.asc, sense.ascq, sense.information) == (0x0E, 0x1D, 0x00, 700)
    # BYTCHK 11b: one block compared with every block of the range
    h.ok(rw10(WRITE10, 8, 3), b"\x5a" * 3 * BLOCK)
    assert h.ok(build(op, 8, 3, 0x06), b"\x5a" * BLOCK) == b""
    assert h.fails(build(op, 7, 3, 0x06), b"\x5a" * BLOCK).key == 0x0E
    assert h.fails(build(op, 7, 3, 0x04)).asc == 0x24  # BYTCHK 10b is reserved


def test_write_and_verify_writes_flushes_and_compares(tmp_path: Path) -> None:
    target, device, content = recording(tmp_path)
    data = b"\x11" * BLOCK * 2
    assert run(target, rw10(WRITE_VERIFY10, 4, 2, 0x02), data).status == 0
    assert device.names() == ["write", "flush", "read"]
    content[4 * BLOCK : 6 * BLOCK] = data
    assert (tmp_path / "rec.img").read_bytes() == content


def test_write_same_repeats_the_block(tmp_path: Path) -> None:
    target, device, content = recording(tmp_path)
    block = bytes(range(256)) * 2
    assert run(target, rw10(WRITE_SAME10, 10, 5000 // 2), block).status == 0x02  # past the end
    assert run(target, rw10(WRITE_SAME10, 10, 600), block).status == 0
    content[10 * BLOCK : 610 * BLOCK] = block * 600
    # an all-zero block, with or without UNMAP, and NDOB become write_zeroes
    assert run(target, rw10(WRITE_SAME10, 700, 3, 0x08), bytes(BLOCK)).status == 0
    assert run(target, rw16(WRITE_SAME16, 800, 2, 0x09)).status == 0
    assert [c for c in device.calls if c[0] == "write_zeroes"] == [
        ("write_zeroes", 700 * BLOCK, 3 * BLOCK),
        ("write_zeroes", 800 * BLOCK, 2 * BLOCK),
    ]
    content[700 * BLOCK : 703 * BLOCK] = bytes(3 * BLOCK)
    content[800 * BLOCK : 802 * BLOCK] = bytes(2 * BLOCK)
    assert (tmp_path / "rec.img").read_bytes() == content


def test_write_same_refuses_zero_blocks_and_anchor(disk: tuple[Harness, bytearray]) -> None:
    h, content = disk
    assert h.fails(rw10(WRITE_SAME10, 0, 0), bytes(BLOCK)).field == bytes((0xC0, 0, 7))  # WSNZ
    assert h.fails(rw16(WRITE_SAME16, 0, 1, 0x18), bytes(BLOCK)).asc == 0x24  # ANCHOR
    sense = h.fails(rw10(WRITE_SAME10, 0, 1), b"")  # no Data-Out block
    assert (sense.asc, sense.ascq) == (0x0E, 0x03)
    assert h.path.read_bytes() == content


def test_unmap_checks_the_whole_list_before_trimming(tmp_path: Path) -> None:
    target, device, _ = recording(tmp_path)
    good = unmap_list([(0, 128), (1024, 1), (2047, 1)])
    assert run(target, unmap(len(good)), good).status == 0
    assert [c for c in device.calls if c[0] == "trim"] == [
        ("trim", 0, 128 * BLOCK),
        ("trim", 1024 * BLOCK, BLOCK),
        ("trim", 2047 * BLOCK, BLOCK),
    ]
    device.calls.clear()
    bad = unmap_list([(0, 8), (2047, 2)])
    sense = parse_sense(run(target, unmap(len(bad)), bad).sense)
    assert (sense.key, sense.asc) == (0x05, 0x21)
    assert "trim" not in device.names()
    assert run(target, unmap(0)).status == 0  # an empty list is no error
    assert parse_sense(run(target, unmap(4), b"\0" * 4).sense).asc == 0x1A
    assert parse_sense(run(target, unmap(len(good), anchor=True), good).sense).asc == 0x24


def test_compare_and_write_writes_only_on_a_match(disk: tuple[Harness, bytearray]) -> None:
    h, content = disk
    old, new = bytes(content[7 * BLOCK : 8 * BLOCK]), b"\xee" * BLOCK
    wrong = bytearray(old)
    wrong[42] ^= 1
    sense = h.fails(compare_and_write(7, 1), bytes(wrong) + new)
    assert (sense.key, sense.asc, sense.ascq, sense.information) == (0x0E, 0x1D, 0x00, 42)
    assert h.path.read_bytes() == content
    h.ok(compare_and_write(7, 1), old + new)
    content[7 * BLOCK : 8 * BLOCK] = new
    assert h.path.read_bytes() == content
    assert h.run(compare_and_write(7, 1), old).data_out_length == 2 * BLOCK


def test_compare_and_write_is_atomic_across_threads(disk: tuple[Harness, bytearray]) -> None:
    """Eight threads increment a counter in block 0 with COMPARE AND WRITE, as ATS locking
    does, while others write block 1: no increment is lost."""
    h, _ = disk
    h.ok(rw10(WRITE10, 0, 1), bytes(BLOCK))

    def counter(value: int) -> bytes:
        return value.to_bytes(8, "big") + bytes(BLOCK - 8)

    def increment(times: int) -> None:
        done = 0
        while done < times:
            current = int.from_bytes(h.ok(rw10(READ10, 0, 1))[:8], "big")
            response = h.run(compare_and_write(0, 1), counter(current) + counter(current + 1))
            if response.status == 0:
                done += 1
            else:
                assert parse_sense(response.sense).key == 0x0E

    def scribble() -> None:
        for i in range(200):
            h.ok(rw10(WRITE10, 1, 1), bytes((i % 256,)) * BLOCK)

    threads = [threading.Thread(target=increment, args=(50,)) for _ in range(8)]
    threads += [threading.Thread(target=scribble) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert h.ok(rw10(READ10, 0, 1)) == counter(400)


def test_synchronize_cache_and_prefetch_reach_the_device(tmp_path: Path) -> None:
    target, device, _ = recording(tmp_path)
    assert run(target, rw10(SYNC10, 0, 0)).status == 0
    assert run(target, rw16(SYNC16, 100, 10)).status == 0
    assert run(target, rw10(PREFETCH10, 2000, 0)).status == 0  # 0: through the last block
    assert run(target, rw16(PREFETCH16, 10, 4)).status == 0
    assert device.calls == [
        ("flush",),
        ("flush",),
        ("cache", 2000 * BLOCK, 48 * BLOCK),
        ("cache", 10 * BLOCK, 4 * BLOCK),
    ]


def test_read_capacity(tmp_path: Path) -> None:
    path = tmp_path / "cap.img"
    make_disk(path, BLOCKS)
    h = Harness(path, block_size=65536)
    assert h.ok(read_capacity10()) == struct.pack(">II", BLOCKS - 1, BLOCK)
    data = h.ok(read_capacity16())
    last, size, prot, exponent, lbp = struct.unpack_from(">QIBBH", data)
    assert (last, size, prot) == (BLOCKS - 1, BLOCK, 0)
    assert exponent & 0x0F == 3  # 4096-byte physical blocks at most, for ESXi and Windows
    assert lbp >> 14 == 0b10  # LBPME, and LBPRZ clear: a trim may keep old data
    assert len(h.ok(read_capacity16(alloc=12))) == 12
    cdb = bytearray(read_capacity10())
    cdb[5] = 1  # an LBA without PMI
    assert h.fails(bytes(cdb)).field == bytes((0xC0, 0, 2))


def test_get_lba_status_reports_holes_as_deallocated(tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(BLOCKS * BLOCK)
        f.seek(64 * 1024)
        f.write(b"\xab" * 64 * 1024)
    h = Harness(path)
    data = h.ok(get_lba_status(0))
    length = struct.unpack_from(">I", data)[0]
    descriptors = [struct.unpack_from(">QIB", data, 8 + 16 * i) for i in range((length - 4) // 16)]
    assert descriptors == [(0, 128, 1), (128, 128, 0), (256, BLOCKS - 256, 1)]
    first = struct.unpack_from(">QIB", h.ok(get_lba_status(200)), 8)
    assert first == (200, 56, 0)
    assert (h.fails(get_lba_status(BLOCKS)).asc) == 0x21
