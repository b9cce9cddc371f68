"""The SCSI target the iSCSI transport calls: a LUN map of logical units, each dispatching CDBs
through one command table, with the state SPC-4 keeps per logical unit (unit attentions,
reservations, mode pages).

Order of the checks on every command: a pending unit attention (except for INQUIRY, REPORT LUNS
and REQUEST SENSE, SAM-5 5.14), an unknown operation code or service action, a reserved CDB bit,
a write to a read-only unit, Data-Out of the wrong length (see
:class:`~dingyuan.exports.scsi.command.DataOut`), a reservation conflict, then the command's own
checks. Nothing raises out of :meth:`ScsiTarget.execute` but a bug: every failure is a
:class:`Response` with CHECK CONDITION (or RESERVATION CONFLICT) and its sense data.

Unit attentions go to the I_T nexuses a unit has seen (a nexus that never sent a command has
nothing to be told); none is set for a new nexus, as most targets do.

``execute`` runs in many threads at once. The hot path (READ/WRITE with no unit attention and no
reservation) takes no lock of this module: it reads two container sizes, which the interpreter
reads atomically, and only then locks what it must.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dingyuan.errors import DingyuanError, ReadOnlyDevice, StorageFull, UsageError
from dingyuan.exports.blockdev import BlockDevice
from dingyuan.exports.scsi import inquiry, modes, reservations, sbc, spc
from dingyuan.exports.scsi.command import Command, DataOut, Request, be
from dingyuan.exports.scsi.inquiry import Identity
from dingyuan.exports.scsi.modes import ModeState
from dingyuan.exports.scsi.reservations import ReservationConflict, Reservations
from dingyuan.exports.scsi.sbc import BLOCK, Disk
from dingyuan.exports.scsi.sense import (
    BUS_DEVICE_RESET,
    CHECK_CONDITION,
    GOOD,
    INTERNAL_TARGET_FAILURE,
    INVALID_COMMAND_OPERATION_CODE,
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_INFORMATION_UNIT,
    LOGICAL_UNIT_NOT_SUPPORTED,
    POWER_ON_RESET,
    RESERVATION_CONFLICT,
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
    UNRECOVERED_READ_ERROR,
    WRITE_ERROR,
    WRITE_PROTECTED,
    Asc,
    CheckCondition,
    FieldPointer,
    SenseKey,
    encode_sense,
    invalid_cdb,
)


@dataclass(frozen=True)
class Nexus:
    """One I_T nexus: iSCSI names its ports "<InitiatorName>,i,0x<ISID>" and
    "<TargetName>,t,0x<TPGT>"."""

    initiator_port: str
    target_port: str
    relative_port: int = 1


@dataclass(frozen=True)
class Response:
    """What a command ends with. ``data`` is already cut to the CDB's allocation length;
    ``data_out_length`` is the Data-Out the CDB asked for, for the transport's residuals."""

    status: int
    data: bytes = b""
    sense: bytes = b""
    data_out_length: int = 0


COMMANDS: tuple[Command, ...] = tuple(
    sorted(
        sbc.COMMANDS + inquiry.COMMANDS + modes.COMMANDS + reservations.COMMANDS + spc.COMMANDS,
        key=lambda c: (c.opcode, c.service_action or 0),
    )
)

#: operation code -> its command, or for opcodes with service actions, service action -> command
Table = dict[int, "Command | dict[int, Command]"]


def _table(commands: Iterable[Command]) -> Table:
    table: Table = {}
    for command in commands:
        if command.service_action is None:
            table[command.opcode] = command
        else:
            actions = table.setdefault(command.opcode, {})
            assert isinstance(actions, dict)
            actions[command.service_action] = command
    return table


TABLE = _table(COMMANDS)

_INQUIRY, _REQUEST_SENSE, _REPORT_LUNS = 0x12, 0x03, 0xA0
#: commands a pending unit attention does not stop (SAM-5 5.14)
_NO_ATTENTION = frozenset({_INQUIRY, _REQUEST_SENSE, _REPORT_LUNS})
#: unit attentions kept per I_T nexus; older ones are dropped past this
_MAX_ATTENTIONS = 16


class LogicalUnit:
    """One block device as a SCSI direct-access logical unit with 512-byte logical blocks.

    ``serial`` is the unit serial number (VPD 80h) and ``device_id`` the 16 bytes of its NAA-6
    designator (VPD 83h; the first nibble is forced to 6): both must stay the same for the same
    snapshot or clone across exports, since multipath software and clusters key disks by them.
    The vendor, product and revision strings are printable ASCII of at most 8, 16 and 4
    characters. The unit owns nothing but its state; :meth:`ScsiTarget.close` closes the device.
    """

    commands: tuple[Command, ...] = COMMANDS
    table: Table = TABLE

    def __init__(
        self,
        device: BlockDevice,
        *,
        serial: str,
        device_id: bytes,
        vendor: str = "DINGYUAN",
        product: str = "VAULT DISK",
        revision: str = "0001",
    ) -> None:
        self.device = device
        self.disk = Disk(device)
        self.identity = Identity(serial, device_id, vendor, product, revision)
        self.modes = ModeState()
        self._lock = threading.Lock()
        self._nexuses: set[Nexus] = set()
        self._attentions: dict[Nexus, list[Asc]] = {}
        self.reservations = Reservations(self._post)

    # -- unit attentions --------------------------------------------------------------------------

    def _post(self, nexuses: Iterable[Nexus], asc: Asc) -> None:
        with self._lock:
            for nexus in nexuses:
                pending = self._attentions.setdefault(nexus, [])
                if asc not in pending:
                    pending.append(asc)
                    del pending[:-_MAX_ATTENTIONS]

    def unit_attention_others(self, nexus: Nexus, asc: Asc) -> None:
        """Post ``asc`` to every I_T nexus this unit has seen but ``nexus``."""
        with self._lock:
            others = [n for n in self._nexuses if n != nexus]
        self._post(others, asc)

    def take_attention(self, nexus: Nexus) -> Asc | None:
        """The oldest unit attention pending for ``nexus``, now cleared."""
        with self._lock:
            pending = self._attentions.get(nexus)
            if not pending:
                return None
            asc = pending.pop(0)
            if not pending:
                del self._attentions[nexus]
            return asc

    # -- I_T nexus loss, reset -----------------------------------------------------

    def nexus_lost(self, nexus: Nexus) -> None:
        self.reservations.release_reserve6(nexus)

    def reset(self, asc: Asc) -> None:
        """A LOGICAL UNIT or TARGET RESET: every I_T nexus, the one that asked too, gets the
        unit attention (SAM-5 6.3), so each path of a multipath initiator learns of it."""
        self.reservations.release_reserve6(None)
        self.modes.reset()
        with self._lock:
            everyone = list(self._nexuses)
        self._post(everyone, asc)

    # -- dispatch ---------------------------------------------------------------------------------

    def plan_read(self, cdb: bytes, nexus: Nexus) -> tuple[int, int] | None:
        """For a READ(10) or READ(16) that :meth:`execute` would answer GOOD with the device's
        bytes and nothing else (no unit attention pending, no reservation in force, a valid CDB):
        the byte range to read, so that a transport can read it its own way (without a thread,
        from a device's cache). None for anything else: run :meth:`execute`."""
        if self._attentions or self.reservations.active or nexus not in self._nexuses:
            return None
        command = _lookup(cdb)
        if command is None or len(cdb) < len(command.usage):
            return None
        try:
            command.check_cdb(cdb)
        except CheckCondition:
            return None
        return sbc.plan_read(self, cdb)

    def execute(self, cdb: bytes, data_out: bytes, nexus: Nexus, luns: tuple[int, ...]) -> Response:
        if nexus not in self._nexuses:
            with self._lock:
                self._nexuses.add(nexus)
        command = _lookup(cdb)
        need = 0
        try:
            if command is not None and command.data_out is not None and len(cdb) >= len(command.usage):
                need = command.data_out(cdb)
            if self._attentions and cdb[0] not in _NO_ATTENTION:
                asc = self.take_attention(nexus)
                if asc is not None:
                    raise CheckCondition(SenseKey.UNIT_ATTENTION, asc)
            if command is None:
                raise _unsupported(cdb)
            command.check_cdb(cdb)
            if command.changes_medium:
                self.disk.check_writable()
            if command.data_out is None:
                data_out = b""
            elif len(data_out) != need:
                data_out = _fit(command.data_out_policy, data_out, need)
            if self.reservations.active:
                self.reservations.check(nexus, command.access, cdb)
            data = command.run(self, Request(cdb, data_out, nexus, luns))
            if command.allocation is not None:
                limit = be(cdb, *command.allocation)
                if len(data) > limit:
                    data = data[:limit]
            return Response(GOOD, data, data_out_length=need)
        except CheckCondition as e:
            return Response(CHECK_CONDITION, sense=e.sense(self.modes.d_sense), data_out_length=need)
        except ReservationConflict:
            return Response(RESERVATION_CONFLICT, data_out_length=need)
        except DingyuanError as e:
            key, asc = _device_error(e, command is not None and command.writes)
            sense = encode_sense(key, asc, self.modes.d_sense)
            return Response(CHECK_CONDITION, sense=sense, data_out_length=need)


def _fit(policy: DataOut, data_out: bytes, need: int) -> bytes:
    """Data-Out of another length than the CDB's, as the command's policy says."""
    if len(data_out) > need and policy is not DataOut.EXACT:
        return data_out[:need]
    if len(data_out) < need and policy is DataOut.BLOCKS and not len(data_out) % BLOCK:
        return data_out
    if need == 0 and policy is DataOut.EXACT:
        # Data-Out for a count of zero: the count the initiator meant did not fit its CDB field
        # (COMPARE AND WRITE of 256 blocks has a one-byte count), so the CDB is what is wrong
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
    raise CheckCondition(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_INFORMATION_UNIT)


def _lookup(cdb: bytes) -> Command | None:
    if not cdb:
        return None
    entry = TABLE.get(cdb[0])
    if isinstance(entry, dict):
        return entry.get(cdb[1] & 0x1F) if len(cdb) > 1 else None
    return entry


def _unsupported(cdb: bytes) -> CheckCondition:
    """An unknown operation code, or a known one with an unknown service action."""
    if cdb and isinstance(TABLE.get(cdb[0]), dict):
        return invalid_cdb(1, 4)
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE, field=FieldPointer(0, 7))


def _device_error(error: DingyuanError, writes: bool) -> tuple[SenseKey, Asc]:
    """The sense for a device's error: the initiator retries or reports a medium error; a full
    repository write-protects the disk, as a thin-provisioned array out of space does."""
    if isinstance(error, ReadOnlyDevice):
        return SenseKey.DATA_PROTECT, WRITE_PROTECTED
    if isinstance(error, StorageFull):
        return SenseKey.DATA_PROTECT, SPACE_ALLOCATION_FAILED_WRITE_PROTECT
    if isinstance(error, UsageError):  # a range the checks let through: a bug of this layer
        return SenseKey.HARDWARE_ERROR, INTERNAL_TARGET_FAILURE
    return SenseKey.MEDIUM_ERROR, WRITE_ERROR if writes else UNRECOVERED_READ_ERROR


class ScsiTarget:
    """The LUN map of one iSCSI target."""

    def __init__(self, luns: Mapping[int, LogicalUnit]) -> None:
        for lun in luns:
            if not 0 <= lun <= spc.MAX_LUN:
                raise UsageError(f"LUN {lun} is outside 0..{spc.MAX_LUN}")
        self._luns = dict(luns)
        self._numbers = tuple(sorted(self._luns))

    def plan_read(self, lun: int, cdb: bytes, nexus: Nexus) -> tuple[BlockDevice, int, int] | None:
        """The device and byte range of a plain, valid READ (see :meth:`LogicalUnit.plan_read`)."""
        unit = self._luns.get(lun)
        planned = None if unit is None else unit.plan_read(cdb, nexus)
        return None if planned is None or unit is None else (unit.device, *planned)

    def execute(self, lun: int, cdb: bytes, data_out: bytes, nexus: Nexus) -> Response:
        unit = self._luns.get(lun)
        if unit is not None:
            return unit.execute(cdb, data_out, nexus, self._numbers)
        return self._no_unit(cdb, nexus)

    def _no_unit(self, cdb: bytes, nexus: Nexus) -> Response:
        """INQUIRY, REPORT LUNS and REQUEST SENSE to a LUN with no logical unit are answered
        (that is how an initiator scans); anything else is LOGICAL UNIT NOT SUPPORTED."""
        command = _lookup(cdb)
        try:
            if command is None or cdb[0] not in _NO_ATTENTION:
                raise CheckCondition(SenseKey.ILLEGAL_REQUEST, LOGICAL_UNIT_NOT_SUPPORTED)
            command.check_cdb(cdb)
            if cdb[0] == _INQUIRY:
                data = inquiry.answer(None, cdb, nexus)
            elif cdb[0] == _REPORT_LUNS:
                data = spc.report_luns(cdb, self._numbers)
            else:
                data = encode_sense(SenseKey.ILLEGAL_REQUEST, LOGICAL_UNIT_NOT_SUPPORTED, bool(cdb[1] & 1))
            assert command.allocation is not None
            return Response(GOOD, data[: be(cdb, *command.allocation)])
        except CheckCondition as e:
            return Response(CHECK_CONDITION, sense=e.sense(False))

    def nexus_lost(self, nexus: Nexus) -> None:
        for unit in self._luns.values():
            unit.nexus_lost(nexus)

    def reset(self, *, lun: int | None) -> None:
        """A LOGICAL UNIT RESET of ``lun``, or a TARGET RESET (``lun`` None) of every unit; every
        nexus learns of it, whichever asked."""
        if lun is None:
            for unit in self._luns.values():
                unit.reset(POWER_ON_RESET)
        elif lun in self._luns:
            self._luns[lun].reset(BUS_DEVICE_RESET)

    def close(self) -> None:
        for unit in self._luns.values():
            unit.device.close()
