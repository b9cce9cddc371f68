"""FileDevice, the reference BlockDevice: the contract of exports/blockdev.py on a regular file."""

from __future__ import annotations

from pathlib import Path

import pytest

from dingyuan.errors import ReadOnlyDevice, UsageError
from dingyuan.exports.blockdev import FileDevice

MiB = 1 << 20


@pytest.fixture
def sparse(tmp_path: Path) -> Path:
    """8 MiB: data in [1 MiB, 2 MiB) and the last 64 KiB, holes elsewhere."""
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"\xab" * MiB)
        f.seek(8 * MiB - 65536)
        f.write(b"\xcd" * 65536)
    return path


def test_reads_writes_and_zeroes(sparse: Path) -> None:
    device = FileDevice(sparse)
    assert (device.size, device.read_only, device.block_size) == (8 * MiB, False, 65536)
    assert device.read(MiB - 2, 4) == b"\0\0\xab\xab"
    device.write(3 * MiB, b"hello")
    device.write_zeroes(MiB + 10, 3 * MiB)  # over the data and more than one zero piece
    device.flush()
    device.close()
    content = sparse.read_bytes()
    assert content[3 * MiB : 3 * MiB + 5] == bytes(5)  # zeroed after the write
    assert content[MiB : MiB + 10] == b"\xab" * 10
    assert content[MiB + 10 : 4 * MiB + 10] == bytes(3 * MiB)


def test_extents_report_holes_as_zero(sparse: Path) -> None:
    device = FileDevice(sparse, read_only=True)
    assert device.extents(0, 8 * MiB) == [(MiB, True), (MiB, False), (6 * MiB - 65536, True), (65536, False)]
    assert device.extents(MiB + 5, 10) == [(10, False)]
    assert device.extents(3 * MiB, MiB) == [(MiB, True)]
    device.close()


def test_read_only_refuses_changes(sparse: Path) -> None:
    before = sparse.read_bytes()
    device = FileDevice(sparse, read_only=True)
    for change in (
        lambda: device.write(0, b"x"),
        lambda: device.write_zeroes(MiB, 10),
        lambda: device.trim(MiB, 10),
    ):
        with pytest.raises(ReadOnlyDevice):
            change()
    device.flush()
    device.close()
    assert sparse.read_bytes() == before


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (0, 0), (8 * MiB - 1, 2), (8 * MiB, 1)])
def test_out_of_range_is_a_usage_error(sparse: Path, offset: int, length: int) -> None:
    device = FileDevice(sparse)
    with pytest.raises(UsageError):
        device.read(offset, length)
    with pytest.raises(UsageError):
        device.extents(offset, length)
    device.close()


def test_block_size_must_be_a_power_of_two(sparse: Path) -> None:
    with pytest.raises(UsageError):
        FileDevice(sparse, block_size=3000)
