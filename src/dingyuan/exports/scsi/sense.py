"""SAM status codes, sense keys, additional sense codes, and the sense data a failed command
returns (SPC-4 section 4.5).

A command that fails raises :class:`CheckCondition` anywhere below the dispatcher; the dispatcher
turns it into CHECK CONDITION status with sense data in the format the initiator chose (the
D_SENSE bit of the control mode page): fixed format (response code 70h, 18 bytes, a 4-byte
INFORMATION field) or descriptor format (72h, an 8-byte information descriptor). The exception
never leaves the SCSI layer, so it is not a :class:`~dingyuan.errors.DingyuanError`: no user sees
it, the initiator does.

The sense-key specific field points at the offending byte (and bit) of the CDB or of the
parameter list, which is how an initiator learns *which* field it got wrong.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

# -- SAM status ----------------------------------------------------------------------------------

GOOD = 0x00
CHECK_CONDITION = 0x02
BUSY = 0x08
RESERVATION_CONFLICT = 0x18


class SenseKey(IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


#: An additional sense code and its qualifier (ASC, ASCQ).
Asc = tuple[int, int]

NO_ADDITIONAL_SENSE: Asc = (0x00, 0x00)
WRITE_ERROR: Asc = (0x0C, 0x00)
INVALID_FIELD_IN_INFORMATION_UNIT: Asc = (0x0E, 0x03)
UNRECOVERED_READ_ERROR: Asc = (0x11, 0x00)
PARAMETER_LIST_LENGTH_ERROR: Asc = (0x1A, 0x00)
MISCOMPARE_DURING_VERIFY: Asc = (0x1D, 0x00)
INVALID_COMMAND_OPERATION_CODE: Asc = (0x20, 0x00)
LBA_OUT_OF_RANGE: Asc = (0x21, 0x00)
INVALID_FIELD_IN_CDB: Asc = (0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED: Asc = (0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST: Asc = (0x26, 0x00)
INVALID_RELEASE_OF_PERSISTENT_RESERVATION: Asc = (0x26, 0x04)
WRITE_PROTECTED: Asc = (0x27, 0x00)
SPACE_ALLOCATION_FAILED_WRITE_PROTECT: Asc = (0x27, 0x07)
POWER_ON_RESET: Asc = (0x29, 0x00)
SCSI_BUS_RESET: Asc = (0x29, 0x02)
BUS_DEVICE_RESET: Asc = (0x29, 0x03)
MODE_PARAMETERS_CHANGED: Asc = (0x2A, 0x01)
RESERVATIONS_PREEMPTED: Asc = (0x2A, 0x03)
RESERVATIONS_RELEASED: Asc = (0x2A, 0x04)
REGISTRATIONS_PREEMPTED: Asc = (0x2A, 0x05)
SAVING_PARAMETERS_NOT_SUPPORTED: Asc = (0x39, 0x00)
INTERNAL_TARGET_FAILURE: Asc = (0x44, 0x00)

FIXED_LENGTH = 18


@dataclass(frozen=True)
class FieldPointer:
    """Where the error is: byte ``byte`` (and bit ``bit``, if known) of the CDB, or of the
    parameter list when ``in_cdb`` is False."""

    byte: int
    bit: int | None = None
    in_cdb: bool = True

    def encode(self) -> bytes:
        flags = 0x80 | (0x40 if self.in_cdb else 0)
        if self.bit is not None:
            flags |= 0x08 | self.bit
        return bytes((flags,)) + struct.pack(">H", self.byte & 0xFFFF)


class CheckCondition(Exception):
    """A command ends in CHECK CONDITION with this sense key, ASC/ASCQ, optional INFORMATION
    field and optional field pointer."""

    def __init__(
        self,
        key: SenseKey,
        asc: Asc,
        *,
        information: int | None = None,
        field: FieldPointer | None = None,
    ) -> None:
        super().__init__(f"{key.name} {asc[0]:02X}/{asc[1]:02X}")
        self.key = key
        self.asc = asc
        self.information = information
        self.field = field

    def sense(self, descriptor: bool) -> bytes:
        return encode_sense(self.key, self.asc, descriptor, self.information, self.field)


def invalid_cdb(byte: int, bit: int | None = None) -> CheckCondition:
    """INVALID FIELD IN CDB pointing at ``byte``/``bit``: the most common failure."""
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, field=FieldPointer(byte, bit))


def invalid_parameter(byte: int, bit: int | None = None) -> CheckCondition:
    """INVALID FIELD IN PARAMETER LIST pointing into the Data-Out buffer."""
    return CheckCondition(
        SenseKey.ILLEGAL_REQUEST,
        INVALID_FIELD_IN_PARAMETER_LIST,
        field=FieldPointer(byte, bit, in_cdb=False),
    )


def lba_out_of_range() -> CheckCondition:
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)


def parameter_list_length_error() -> CheckCondition:
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)


def encode_sense(
    key: SenseKey,
    asc: Asc,
    descriptor: bool,
    information: int | None = None,
    field: FieldPointer | None = None,
) -> bytes:
    """Sense data in fixed (70h) or descriptor (72h) format.

    In fixed format an INFORMATION value wider than 32 bits cannot be told, so VALID stays 0;
    descriptor format always has room for 64 bits.
    """
    if descriptor:
        descriptors = b""
        if information is not None:
            descriptors += struct.pack(">BBBBQ", 0x00, 0x0A, 0x80, 0, information)
        if field is not None:
            descriptors += bytes((0x02, 0x06, 0, 0)) + field.encode() + b"\x00"
        return bytes((0x72, key, asc[0], asc[1], 0, 0, 0, len(descriptors))) + descriptors
    valid = information is not None and information <= 0xFFFFFFFF
    return struct.pack(
        ">BBBIBIBBB3s",
        0xF0 if valid else 0x70,
        0,
        key,
        information if valid and information is not None else 0,
        FIXED_LENGTH - 8,
        0,
        asc[0],
        asc[1],
        0,
        field.encode() if field is not None else b"\x00\x00\x00",
    )


assert struct.calcsize(">BBBIBIBBB3s") == FIXED_LENGTH
