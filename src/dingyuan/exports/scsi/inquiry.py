"""INQUIRY: the standard data and the vital product data pages an initiator reads to identify and
size a disk (SPC-4 6.6, 7.8; SBC-3 6.6).

The pages are what Windows, ESXi and Linux look for: 80h (serial), 83h (a NAA-6 designator,
which is what multipath software keys devices by, plus the T10 vendor id, the relative target
port and the SCSI names of the target port and target device), B0h (block limits: the limits
:mod:`~dingyuan.exports.scsi.sbc` enforces), B1h (non-rotating medium) and B2h (logical block
provisioning, as far as it is true: see ``sbc``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dingyuan.errors import UsageError
from dingyuan.exports.scsi.command import Access, Command, Request
from dingyuan.exports.scsi.sbc import (
    MAX_COMPARE_AND_WRITE,
    MAX_TRANSFER,
    MAX_UNMAP_BLOCKS,
    MAX_UNMAP_DESCRIPTORS,
    MAX_WRITE_SAME,
)
from dingyuan.exports.scsi.sense import invalid_cdb

if TYPE_CHECKING:
    from dingyuan.exports.scsi.target import LogicalUnit, Nexus

#: peripheral qualifier 011b, device type 1Fh: no logical unit at this LUN
NO_UNIT = 0x7F
DIRECT_ACCESS = 0x00

#: SAM-5, iSCSI, SPC-4, SBC-3
VERSION_DESCRIPTORS = (0x00A0, 0x0960, 0x0460, 0x04C0)

_PROTOCOL_ISCSI = 0x5


@dataclass(frozen=True)
class Identity:
    """What INQUIRY says the logical unit is; the text fields are checked once, here."""

    serial: str
    device_id: bytes
    vendor: str
    product: str
    revision: str

    def __post_init__(self) -> None:
        if len(self.device_id) != 16:
            raise UsageError(f"a NAA-6 device id is 16 bytes, not {len(self.device_id)}")
        for name, value, width in (
            ("vendor", self.vendor, 8),
            ("product", self.product, 16),
            ("revision", self.revision, 4),
            ("serial", self.serial, 252),
        ):
            if len(value) > width or not value.isascii() or not value.isprintable():
                raise UsageError(f"INQUIRY {name} {value!r} is not printable ASCII of at most {width}")

    @property
    def naa(self) -> bytes:
        """The device id as a NAA-6 (IEEE registered extended) designator."""
        return bytes((0x60 | (self.device_id[0] & 0x0F),)) + self.device_id[1:]


def standard(identity: Identity | None) -> bytes:
    """Standard INQUIRY data: SPC-4, HISUP, command queuing; ``None`` answers for a LUN that does
    not exist (qualifier 011b)."""
    if identity is None:
        header = bytes((NO_UNIT, 0, 0x06, 0x12, 31, 0, 0, 0))
        return header + bytes(28)
    text = (identity.vendor.ljust(8) + identity.product.ljust(16) + identity.revision.ljust(4)).encode(
        "ascii"
    )
    body = text + bytes(22) + struct.pack(">8H", *VERSION_DESCRIPTORS, 0, 0, 0, 0) + bytes(22)
    return bytes((DIRECT_ACCESS, 0, 0x06, 0x12, 4 + len(body) - 1, 0, 0, 0x02)) + body


def _page(code: int, body: bytes, peripheral: int = DIRECT_ACCESS) -> bytes:
    return struct.pack(">BBH", peripheral, code, len(body)) + body


def _designator(protocol: int, code_set: int, association: int, kind: int, value: bytes) -> bytes:
    piv = 0x80 if protocol else 0
    return bytes(((protocol << 4) | code_set, piv | (association << 4) | kind, 0, len(value))) + value


def _scsi_name(name: str) -> bytes:
    """A SCSI name string: UTF-8, NUL-terminated, padded with NULs to a multiple of 4 bytes."""
    raw = name.encode("utf-8") + b"\x00"
    return raw + bytes(-len(raw) % 4)


def device_identification(identity: Identity, nexus: Nexus) -> bytes:
    target_name = nexus.target_port.split(",t,", 1)[0]
    return b"".join(
        (
            _designator(0, 1, 0, 0x3, identity.naa),
            _designator(0, 2, 0, 0x1, (identity.vendor.ljust(8) + identity.serial).encode("ascii")),
            _designator(_PROTOCOL_ISCSI, 1, 1, 0x4, struct.pack(">2xH", nexus.relative_port)),
            _designator(_PROTOCOL_ISCSI, 3, 1, 0x8, _scsi_name(nexus.target_port)),
            _designator(_PROTOCOL_ISCSI, 3, 2, 0x8, _scsi_name(target_name)),
        )
    )


def block_limits(lu: LogicalUnit) -> bytes:
    disk = lu.disk
    granularity = min(disk.granularity, 0xFFFF)
    return struct.pack(
        ">BBHIIIIIIIQ20x",
        0x01,  # WSNZ: WRITE SAME with 0 blocks ("to the end") is refused
        MAX_COMPARE_AND_WRITE,
        granularity,
        MAX_TRANSFER,
        min(disk.granularity, MAX_TRANSFER),
        0,  # maximum prefetch length: not reported
        MAX_UNMAP_BLOCKS,
        MAX_UNMAP_DESCRIPTORS,
        disk.granularity,
        0x80000000,  # UGAVALID, unmap granularity alignment 0
        MAX_WRITE_SAME,
    )


def block_characteristics() -> bytes:
    return struct.pack(">HBB56x", 0x0001, 0, 0)  # non-rotating medium


def logical_block_provisioning() -> bytes:
    # LBPU, LBPWS, LBPWS10; LBPRZ 0, no anchored state; provisioning type 010b (thin)
    return bytes((0, 0xE0, 0x02, 0))


def inquiry(lu: LogicalUnit, req: Request) -> bytes:
    return answer(lu, req.cdb, req.nexus)


def answer(lu: LogicalUnit | None, cdb: bytes, nexus: Nexus) -> bytes:
    """INQUIRY for a logical unit, or for a LUN with none (``lu`` None)."""
    evpd, code = cdb[1] & 0x01, cdb[2]
    if not evpd:
        if code:
            raise invalid_cdb(2)
        return standard(lu.identity if lu is not None else None)
    if lu is None:
        if code:
            raise invalid_cdb(2)
        return _page(0x00, b"\x00", NO_UNIT)
    if code == 0x00:
        return _page(0x00, bytes((0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)))
    if code == 0x80:
        return _page(0x80, lu.identity.serial.encode("ascii"))
    if code == 0x83:
        return _page(0x83, device_identification(lu.identity, nexus))
    if code == 0xB0:
        return _page(0xB0, block_limits(lu))
    if code == 0xB1:
        return _page(0xB1, block_characteristics())
    if code == 0xB2:
        return _page(0xB2, logical_block_provisioning())
    raise invalid_cdb(2)


COMMANDS = (
    Command(
        0x12,
        "INQUIRY",
        bytes((0x12, 0x01, 0xFF, 0xFF, 0xFF, 0x00)),
        inquiry,
        Access.FREE,
        allocation=(3, 2),
    ),
)
