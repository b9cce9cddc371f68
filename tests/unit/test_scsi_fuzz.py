"""Arbitrary CDBs and Data-Out against the SCSI layer: it never raises, never calls the device
outside its size, never changes a read-only device, and always answers with a SAM status the
transport can send (with parseable sense data when it is CHECK CONDITION)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scsi_support import DEVICE_ID, A, B, make_disk, parse_sense

from dingyuan.exports.blockdev import FileDevice
from dingyuan.exports.scsi import LogicalUnit, ScsiTarget
from dingyuan.exports.scsi.target import COMMANDS

BLOCKS = 64
SIZE = BLOCKS * 512


class Checked:
    """A FileDevice that fails the test on any call outside ``[0, size)``."""

    def __init__(self, device: FileDevice) -> None:
        self._device = device
        self.violations: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._device, name)
        if name not in ("read", "write", "write_zeroes", "trim", "cache", "extents"):
            return attr

        def call(offset: int, arg: Any) -> Any:
            length = len(arg) if isinstance(arg, bytes | bytearray | memoryview) else arg
            if offset < 0 or length <= 0 or offset + length > SIZE:
                self.violations.append((name, offset, length))
            return attr(offset, arg)

        return call


OPCODES = sorted({c.opcode for c in COMMANDS})


@st.composite
def cdbs(draw: st.DrawFn) -> bytes:
    """Mostly CDBs of supported commands with their reserved bits clear and their fields small
    (so many succeed and reach the device), sometimes anything at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=20))
    command = draw(st.sampled_from(COMMANDS))
    cdb = bytearray(16)
    cdb[0] = command.opcode
    for i in range(1, 16):
        value = draw(st.one_of(st.just(0), st.just(0), st.integers(0, 3), st.integers(0, 255)))
        cdb[i] = value & command.usage[i] if i < len(command.usage) else 0
    if command.service_action is not None:
        cdb[1] = (cdb[1] & 0xE0) | command.service_action
    if draw(st.integers(0, 4)) == 0:
        cdb[draw(st.integers(0, 15))] ^= 1 << draw(st.integers(0, 7))  # one bit off
    return bytes(cdb)


def build(path: Path, read_only: bool) -> tuple[ScsiTarget, Checked]:
    device = Checked(FileDevice(path, read_only=read_only))
    unit = LogicalUnit(device, serial="FUZZ", device_id=DEVICE_ID)  # type: ignore[arg-type]
    return ScsiTarget({0: unit}), device


@pytest.fixture(scope="module")
def writable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ScsiTarget, Checked, Path]]:
    path = tmp_path_factory.mktemp("fuzz") / "rw.img"
    make_disk(path, BLOCKS)
    target, device = build(path, False)
    yield target, device, path
    target.close()


@pytest.fixture(scope="module")
def read_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ScsiTarget, Checked, Path]]:
    path = tmp_path_factory.mktemp("fuzz") / "ro.img"
    make_disk(path, BLOCKS)
    target, device = build(path, True)
    yield target, device, path
    target.close()


def check(target: ScsiTarget, device: Checked, lun: int, cdb: bytes, data_out: bytes, second: bool) -> None:
    response = target.execute(lun, cdb, data_out, B if second else A)
    assert response.status in (0x00, 0x02, 0x18)
    if response.status == 0x02:
        sense = parse_sense(response.sense)
        assert sense.key != 0x04, response  # HARDWARE ERROR: the layer let a bad range through
    else:
        assert response.sense == b""
    assert response.data_out_length >= 0
    assert device.violations == []


@settings(max_examples=500, deadline=None)
@given(cdb=cdbs(), data_out=st.binary(max_size=2048), lun=st.sampled_from([0, 0, 0, 1]), second=st.booleans())
def test_arbitrary_commands_never_raise_or_leave_the_device(
    writable: tuple[ScsiTarget, Checked, Path], cdb: bytes, data_out: bytes, lun: int, second: bool
) -> None:
    target, device, path = writable
    check(target, device, lun, cdb, data_out, second)
    assert path.stat().st_size == SIZE


@settings(max_examples=300, deadline=None)
@given(cdb=cdbs(), data_out=st.binary(max_size=2048), second=st.booleans())
def test_arbitrary_commands_never_change_a_read_only_device(
    read_only: tuple[ScsiTarget, Checked, Path], cdb: bytes, data_out: bytes, second: bool
) -> None:
    target, device, path = read_only
    before = path.read_bytes()
    check(target, device, 0, cdb, data_out, second)
    assert path.read_bytes() == before
