"""What the dispatcher knows of each command: one :class:`Command` row per operation code (and
service action), kept in one table that drives dispatch, the CDB reserved-bit check, the Data-Out
length, the reservation check and REPORT SUPPORTED OPERATION CODES alike, so what the target
says it supports is exactly what it runs.

``usage`` is the CDB usage data of SPC-4 6.35.3: a bit mask of the CDB bits the command looks
at. A CDB bit set outside it is a reserved bit set, answered with INVALID FIELD IN CDB pointing at
that bit; the same bytes are what REPORT SUPPORTED OPERATION CODES reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from dingyuan.exports.scsi.sense import invalid_cdb

if TYPE_CHECKING:
    from dingyuan.exports.scsi.target import LogicalUnit, Nexus


class DataOut(Enum):
    """What a command does with Data-Out of another length than its CDB asks for. Longer is
    cut to the length asked for, shorter refused with INVALID FIELD IN INFORMATION UNIT, except:"""

    CUT = "cut"
    #: WRITE and WRITE AND VERIFY: a shorter Data-Out of whole blocks writes those blocks (the
    #: initiator's Expected Data Transfer Length limits the transfer; libiscsi's residual tests
    #: expect GOOD and exactly those blocks written)
    BLOCKS = "blocks"
    #: WRITE SAME and COMPARE AND WRITE: any other length is refused (libiscsi InvalidDataOutSize)
    EXACT = "exact"


class Access(Enum):
    """How a command meets a reservation held through another I_T nexus (SPC-4 table 66, SBC-3
    table 13)."""

    FREE = "free"  # never conflicts (INQUIRY, REPORT LUNS, REQUEST SENSE, ...)
    STATUS = "status"  # allowed under any persistent reservation, not under RESERVE(6)
    READ = "read"  # conflicts with exclusive-access reservations
    WRITE = "write"  # conflicts with every reservation type
    PERSISTENT = "persistent"  # PERSISTENT RESERVE IN/OUT: sorted out by the service action
    RESERVE6 = "reserve6"  # RESERVE(6)/RELEASE(6): sorted out by the command itself
    START_STOP = "start_stop"  # START=1 with no power condition is free, the rest a write
    PREVENT = "prevent"  # PREVENT=0 is free, the rest a write


@dataclass(slots=True)
class Request:
    """One command as a handler sees it: ``data_out`` is what the CDB asks for, or for
    :attr:`DataOut.BLOCKS` commands possibly fewer whole blocks."""

    cdb: bytes
    data_out: bytes
    nexus: Nexus
    luns: tuple[int, ...]


Handler = Callable[["LogicalUnit", Request], bytes]


@dataclass(frozen=True)
class Command:
    opcode: int
    name: str
    usage: bytes
    run: Handler
    access: Access
    #: the service action, for opcodes that have them (byte 1, bits 4-0)
    service_action: int | None = None
    #: bytes of Data-Out the CDB asks for, given the CDB (None: the command takes no Data-Out)
    data_out: Callable[[bytes], int] | None = None
    data_out_policy: DataOut = DataOut.CUT
    #: (offset, width) of the ALLOCATION LENGTH field the Data-In is cut to
    allocation: tuple[int, int] | None = None
    #: True for commands whose device errors are write errors (sense, and the write gate)
    #: True for commands that write or flush the medium: their device errors are write errors
    writes: bool = False
    #: nominal and recommended timeouts in seconds (REPORT SUPPORTED OPERATION CODES, RCTD)
    timeouts: tuple[int, int] = (1, 30)
    _reserved: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        inverse = ~int.from_bytes(self.usage, "big") & ((1 << (8 * len(self.usage))) - 1)
        object.__setattr__(self, "_reserved", inverse)

    @property
    def changes_medium(self) -> bool:
        """Writes data to the medium (every such command has Data-Out): on a read-only unit it
        fails with WRITE PROTECTED before anything else is checked, as libiscsi's ReadOnly test
        expects even of a WRITE SAME without its block."""
        return self.writes and self.data_out is not None

    def check_cdb(self, cdb: bytes) -> None:
        """Refuse a CDB shorter than the command or with a bit set outside ``usage``."""
        size = len(self.usage)
        if len(cdb) < size:
            raise invalid_cdb(0)
        if not int.from_bytes(cdb[:size], "big") & self._reserved:
            return
        for index, (value, mask) in enumerate(zip(cdb, self.usage, strict=False)):
            bad = value & ~mask
            if bad:
                raise invalid_cdb(index, bad.bit_length() - 1)


def be(cdb: bytes, offset: int, width: int) -> int:
    """A big-endian unsigned field of the CDB."""
    return int.from_bytes(cdb[offset : offset + width], "big")
