"""The primary commands every logical unit answers besides INQUIRY and the mode and reservation
commands: TEST UNIT READY, REQUEST SENSE, REPORT LUNS, REPORT SUPPORTED OPERATION CODES, START
STOP UNIT and PREVENT ALLOW MEDIUM REMOVAL (SPC-4 chapter 6, SBC-3 5.25).

A disk here is never removable and never stopped: START STOP UNIT and PREVENT ALLOW MEDIUM
REMOVAL are accepted and change nothing (but a flush), so there is no PREVENT state to keep,
release on I_T nexus loss or reset; loading or ejecting (LOEJ) is refused.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from dingyuan.exports.scsi.command import Access, Command, Request, be
from dingyuan.exports.scsi.sense import NO_ADDITIONAL_SENSE, SenseKey, encode_sense, invalid_cdb

if TYPE_CHECKING:
    from dingyuan.exports.scsi.target import LogicalUnit

#: the largest LUN REPORT LUNS can tell with flat (01b) addressing
MAX_LUN = 0x3FFF


def test_unit_ready(lu: LogicalUnit, req: Request) -> bytes:
    return b""


def request_sense(lu: LogicalUnit, req: Request) -> bytes:
    """REQUEST SENSE: a pending unit attention (which this consumes), else NO SENSE."""
    descriptor = bool(req.cdb[1] & 0x01)
    asc = lu.take_attention(req.nexus)
    if asc is None:
        return encode_sense(SenseKey.NO_SENSE, NO_ADDITIONAL_SENSE, descriptor)
    return encode_sense(SenseKey.UNIT_ATTENTION, asc, descriptor)


def lun_field(lun: int) -> bytes:
    """The 8-byte LUN: peripheral device addressing below 256, flat space addressing above."""
    if lun < 256:
        return bytes((0, lun)) + bytes(6)
    return bytes((0x40 | (lun >> 8), lun & 0xFF)) + bytes(6)


def report_luns(cdb: bytes, luns: tuple[int, ...]) -> bytes:
    select = cdb[2]
    if be(cdb, 6, 4) < 16:
        raise invalid_cdb(6)
    if select == 0x01:  # well known logical units only: there are none
        listed: tuple[int, ...] = ()
    elif select in (0x00, 0x02):
        listed = luns
    else:
        raise invalid_cdb(2)
    body = b"".join(lun_field(lun) for lun in listed)
    return struct.pack(">I4x", len(body)) + body


def report_luns_command(lu: LogicalUnit, req: Request) -> bytes:
    return report_luns(req.cdb, req.luns)


def _timeouts(command: Command) -> bytes:
    nominal, recommended = command.timeouts
    return struct.pack(">HxxII", 0x0A, nominal, recommended)


def report_supported_operation_codes(lu: LogicalUnit, req: Request) -> bytes:
    """All commands (reporting options 000b), one by operation code (001b, only for commands
    without service actions) or by operation code and service action (010b, only for those
    with); RCTD adds each command's timeouts descriptor."""
    cdb = req.cdb
    rctd, option = bool(cdb[2] & 0x80), cdb[2] & 0x07
    if option == 0:
        descriptors = []
        for command in lu.commands:
            flags = (0x02 if rctd else 0) | (0x01 if command.service_action is not None else 0)
            descriptors.append(
                struct.pack(">BxHxBH", command.opcode, command.service_action or 0, flags, len(command.usage))
                + (_timeouts(command) if rctd else b"")
            )
        body = b"".join(descriptors)
        return struct.pack(">I", len(body)) + body
    opcode, action = cdb[3], be(cdb, 4, 2)
    entry = lu.table.get(opcode)
    found: Command | None
    if option == 1:
        if isinstance(entry, dict):
            raise invalid_cdb(2, 2)
        found = entry
    elif option == 2:
        if isinstance(entry, Command):
            raise invalid_cdb(2, 2)
        found = entry.get(action) if entry is not None else None
    else:
        raise invalid_cdb(2, 2)
    if found is None:
        return bytes((0, 0x01, 0, 0))  # not supported
    answer = bytes((0, (0x80 if rctd else 0) | 0x03)) + struct.pack(">H", len(found.usage)) + found.usage
    return answer + (_timeouts(found) if rctd else b"")


def start_stop_unit(lu: LogicalUnit, req: Request) -> bytes:
    """Stopping a disk flushes its cache (unless NO_FLUSH), as a drive's spin-down would; a
    medium that is not removable cannot be loaded or ejected (LOEJ)."""
    flags = req.cdb[4]
    if flags >> 4:  # a power condition: LOEJ and START are ignored
        return b""
    if flags & 0x02:
        raise invalid_cdb(4, 1)
    if not flags & 0x01 and not flags & 0x04:
        lu.disk.device.flush()
    return b""


def prevent_allow_medium_removal(lu: LogicalUnit, req: Request) -> bytes:
    """Accepted and forgotten: a medium that cannot be removed needs no preventing."""
    return b""


COMMANDS = (
    Command(0x00, "TEST UNIT READY", bytes(6), test_unit_ready, Access.STATUS),
    Command(
        0x03,
        "REQUEST SENSE",
        bytes((0x03, 0x01, 0, 0, 0xFF, 0)),
        request_sense,
        Access.FREE,
        allocation=(4, 1),
    ),
    Command(
        0xA0,
        "REPORT LUNS",
        bytes((0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0)),
        report_luns_command,
        Access.FREE,
        allocation=(6, 4),
    ),
    Command(
        0xA3,
        "REPORT SUPPORTED OPERATION CODES",
        bytes((0xA3, 0x1F, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0)),
        report_supported_operation_codes,
        Access.FREE,
        service_action=0x0C,
        allocation=(6, 4),
    ),
    Command(
        0x1B,
        "START STOP UNIT",
        bytes((0x1B, 0x01, 0, 0x0F, 0xF7, 0)),
        start_stop_unit,
        Access.START_STOP,
        timeouts=(5, 300),
    ),
    Command(
        0x1E,
        "PREVENT ALLOW MEDIUM REMOVAL",
        bytes((0x1E, 0, 0, 0, 0x03, 0)),
        prevent_allow_medium_removal,
        Access.PREVENT,
    ),
)
