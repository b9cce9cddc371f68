"""MODE SENSE and MODE SELECT (SPC-4 6.11-6.14, 7.5; SBC-3 6.4): the caching (08h), control (0Ah)
and informational exceptions control (1Ch) pages.

Two bits are changeable, both with real effect: WCE (write cache enabled; clearing it makes every
write flushed before it completes, as FUA does) and D_SENSE (descriptor-format sense data). No
page is savable: PC=11b (saved values) and SP=1 are refused, as SPC-4 asks of a logical unit
without saved pages. A read-only device reports WP in the device-specific parameter, which is
how Windows and Linux learn to mount it read-only.
"""

from __future__ import annotations

import struct
import threading
from typing import TYPE_CHECKING

from dingyuan.exports.scsi.command import Access, Command, Request, be
from dingyuan.exports.scsi.sbc import BLOCK
from dingyuan.exports.scsi.sense import (
    MODE_PARAMETERS_CHANGED,
    SAVING_PARAMETERS_NOT_SUPPORTED,
    CheckCondition,
    FieldPointer,
    SenseKey,
    invalid_cdb,
    invalid_parameter,
    parameter_list_length_error,
)

if TYPE_CHECKING:
    from dingyuan.exports.scsi.target import LogicalUnit

CACHING = 0x08
CONTROL = 0x0A
INFORMATIONAL_EXCEPTIONS = 0x1C
ALL_PAGES = 0x3F

_WCE = 0x04  # caching page byte 2
_D_SENSE = 0x04  # control page byte 2

#: page code -> (default values, changeable mask), both with the 2-byte page header
_PAGES: dict[int, tuple[bytes, bytes]] = {
    CACHING: (
        bytes((CACHING, 0x12, _WCE)) + bytes(17),
        bytes((0, 0, _WCE)) + bytes(17),
    ),
    # GLTSD (no log parameters saved); queue algorithm modifier 1: unrestricted reordering
    CONTROL: (
        bytes((CONTROL, 0x0A, 0x02, 0x10)) + bytes(8),
        bytes((0, 0, _D_SENSE)) + bytes(9),
    ),
    # DEXCPT: no informational exceptions are reported
    INFORMATIONAL_EXCEPTIONS: (
        bytes((INFORMATIONAL_EXCEPTIONS, 0x0A, 0x08)) + bytes(9),
        bytes(12),
    ),
}


class ModeState:
    """The current values of one logical unit's pages."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current = {code: bytearray(default) for code, (default, _) in _PAGES.items()}
        self.write_cache = True
        self.d_sense = False

    def reset(self) -> None:
        """Back to the default values (a logical unit reset: there are no saved values)."""
        self.select({code: default for code, (default, _) in _PAGES.items()})

    def page(self, code: int, control: int) -> bytes:
        """One page as MODE SENSE reports it for page control ``control`` (0 current, 1
        changeable, 2 default)."""
        if control == 1:
            default, mask = _PAGES[code]
            return default[:2] + mask[2:]
        if control == 2:
            return _PAGES[code][0]
        with self._lock:
            return bytes(self._current[code])

    def select(self, pages: dict[int, bytes]) -> bool:
        """Replace pages already checked against the changeable masks; True if any changed."""
        with self._lock:
            changed = any(self._current[code] != new for code, new in pages.items())
            for code, new in pages.items():
                self._current[code][:] = new
            self.write_cache = bool(self._current[CACHING][2] & _WCE)
            self.d_sense = bool(self._current[CONTROL][2] & _D_SENSE)
        return changed


def _pages_for(lu: LogicalUnit, cdb: bytes) -> bytes:
    control, code, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    if control == 3:
        raise CheckCondition(
            SenseKey.ILLEGAL_REQUEST, SAVING_PARAMETERS_NOT_SUPPORTED, field=FieldPointer(2, 7)
        )
    if code == ALL_PAGES:
        if subpage not in (0x00, 0xFF):
            raise invalid_cdb(3)
        return b"".join(lu.modes.page(page, control) for page in sorted(_PAGES))
    if code not in _PAGES:
        raise invalid_cdb(2, 5)
    if subpage:
        raise invalid_cdb(3)
    return lu.modes.page(code, control)


def _device_specific(lu: LogicalUnit) -> int:
    return (0x80 if lu.disk.read_only else 0) | 0x10  # WP, DPOFUA


def _block_descriptor(lu: LogicalUnit, control: int, long: bool) -> bytes:
    if control == 1:
        return bytes(16 if long else 8)
    blocks = lu.disk.blocks
    if long:
        return struct.pack(">Q4xI", blocks, BLOCK)
    return struct.pack(">I", min(blocks, 0xFFFFFFFF)) + struct.pack(">I", BLOCK)


def mode_sense6(lu: LogicalUnit, req: Request) -> bytes:
    cdb = req.cdb
    pages = _pages_for(lu, cdb)
    descriptor = b"" if cdb[1] & 0x08 else _block_descriptor(lu, cdb[2] >> 6, False)
    data = bytes((0, _device_specific(lu), len(descriptor))) + descriptor + pages
    return bytes((min(len(data), 0xFF),)) + data


def mode_sense10(lu: LogicalUnit, req: Request) -> bytes:
    cdb = req.cdb
    pages = _pages_for(lu, cdb)
    long = bool(cdb[1] & 0x10)
    descriptor = b"" if cdb[1] & 0x08 else _block_descriptor(lu, cdb[2] >> 6, long)
    data = struct.pack(">BBBxH", 0, _device_specific(lu), 0x01 if long and descriptor else 0, len(descriptor))
    return struct.pack(">H", len(data) + len(descriptor) + len(pages)) + data + descriptor + pages


def _select(lu: LogicalUnit, req: Request, header: int) -> bytes:
    """MODE SELECT: the whole parameter list is checked before any page changes."""
    if req.cdb[1] & 0x01:
        raise invalid_cdb(1, 0)
    data = req.data_out
    if not data:
        return b""
    if len(data) < header:
        raise parameter_list_length_error()
    if header == 4:
        descriptor_length, long = data[3], False
    else:
        descriptor_length, long = be(data, 6, 2), bool(data[4] & 0x01)
    size = 16 if long else 8
    if descriptor_length not in (0, size):
        raise invalid_parameter(header - 1)
    offset = header
    if descriptor_length:
        if len(data) < offset + size:
            raise parameter_list_length_error()
        length_at = offset + (12 if long else 4)
        if be(data, length_at, 4) & 0xFFFFFF != BLOCK:
            raise invalid_parameter(length_at)
        offset += size
    pages: dict[int, bytes] = {}
    while offset < len(data):
        code = data[offset] & 0x3F
        if data[offset] & 0x40 or code not in _PAGES:
            raise invalid_parameter(offset, 5)
        if offset + 2 > len(data):
            raise parameter_list_length_error()
        current = lu.modes.page(code, 0)
        mask = _PAGES[code][1]
        if data[offset + 1] != current[1]:
            raise invalid_parameter(offset + 1)
        if offset + len(current) > len(data):
            raise parameter_list_length_error()
        new = bytes((code,)) + data[offset + 1 : offset + len(current)]
        for i in range(2, len(current)):
            bad = (new[i] ^ current[i]) & ~mask[i]
            if bad:
                raise invalid_parameter(offset + i, bad.bit_length() - 1)
        pages[code] = new
        offset += len(current)
    if lu.modes.select(pages):
        lu.unit_attention_others(req.nexus, MODE_PARAMETERS_CHANGED)
    return b""


def mode_select6(lu: LogicalUnit, req: Request) -> bytes:
    return _select(lu, req, 4)


def mode_select10(lu: LogicalUnit, req: Request) -> bytes:
    return _select(lu, req, 8)


def _select6_out(cdb: bytes) -> int:
    return cdb[4]


def _select10_out(cdb: bytes) -> int:
    return be(cdb, 7, 2)


COMMANDS = (
    Command(
        0x1A,
        "MODE SENSE(6)",
        bytes((0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0x00)),
        mode_sense6,
        Access.READ,
        allocation=(4, 1),
    ),
    Command(
        0x5A,
        "MODE SENSE(10)",
        bytes((0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0x00)),
        mode_sense10,
        Access.READ,
        allocation=(7, 2),
    ),
    Command(
        0x15,
        "MODE SELECT(6)",
        bytes((0x15, 0x11, 0, 0, 0xFF, 0x00)),
        mode_select6,
        Access.WRITE,
        data_out=_select6_out,
    ),
    Command(
        0x55,
        "MODE SELECT(10)",
        bytes((0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x00)),
        mode_select10,
        Access.WRITE,
        data_out=_select10_out,
    ),
)
