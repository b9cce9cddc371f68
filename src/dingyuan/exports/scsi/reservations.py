"""Reservations: persistent reservations (SPC-4 5.9, PERSISTENT RESERVE IN/OUT) and the older
RESERVE(6)/RELEASE(6), kept per logical unit, behind one lock.

Windows failover clustering arbitrates its disks with persistent reservations (REGISTER AND
IGNORE EXISTING KEY, RESERVE type 5 or 6, PREEMPT, READ KEYS, READ RESERVATION); ESXi and Linux
use them for their own clusters. Registrations are per I_T nexus and survive the nexus (a
session that reconnects is still registered, as SPC-4 requires); they do not survive the target
(no APTPL: ``REPORT CAPABILITIES`` says so, and APTPL=1 is refused). ALL_TG_PT and SPEC_I_P are
not supported either: the export has one target port group.

Which command conflicts with which reservation is SPC-4 table 66 and SBC-3 table 13, reduced to
the :class:`~dingyuan.exports.scsi.command.Access` class of each command:

=================================  ========================  ==========================
reservation type                   registered, not holder    not registered
=================================  ========================  ==========================
Write Exclusive (1)                writes conflict           writes conflict
Exclusive Access (3)               reads, writes conflict    reads, writes conflict
WE Registrants Only/All Reg. (5/7) no conflict               writes conflict
EA Registrants Only/All Reg. (6/8) no conflict               reads, writes conflict
=================================  ========================  ==========================

Under RESERVE(6) everything but INQUIRY, REPORT LUNS, REQUEST SENSE, REPORT SUPPORTED OPERATION
CODES and RELEASE(6) conflicts for the other nexuses. RESERVE(6)/RELEASE(6) meet persistent
reservations as SPC-4 5.9.3 says (CRH=1): GOOD without effect from a holder, else a conflict.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from dingyuan.exports.scsi.command import Access, Command, Request, be
from dingyuan.exports.scsi.sense import (
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
    REGISTRATIONS_PREEMPTED,
    RESERVATIONS_PREEMPTED,
    RESERVATIONS_RELEASED,
    Asc,
    CheckCondition,
    SenseKey,
    invalid_cdb,
    invalid_parameter,
    parameter_list_length_error,
)

if TYPE_CHECKING:
    from dingyuan.exports.scsi.target import LogicalUnit, Nexus

WRITE_EXCLUSIVE = 1
EXCLUSIVE_ACCESS = 3
WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5
EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 6
WRITE_EXCLUSIVE_ALL_REGISTRANTS = 7
EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 8
TYPES = frozenset({1, 3, 5, 6, 7, 8})
_ALL_REGISTRANTS = frozenset({7, 8})
_REGISTRANTS = frozenset({5, 6, 7, 8})
_WRITE_ONLY = frozenset({1, 5, 7})

_PARAMETERS = 24
_PROTOCOL_ISCSI = 0x5


class ReservationConflict(Exception):
    """The command ends in RESERVATION CONFLICT status (no sense data)."""


Notify = Callable[[Iterable["Nexus"], Asc], None]


class Reservations:
    def __init__(self, notify: Notify) -> None:
        self._lock = threading.Lock()
        self._notify = notify
        self.generation = 0
        self._keys: dict[Nexus, int] = {}
        self._holder: Nexus | None = None
        self._type: int | None = None
        self._reserve6: Nexus | None = None

    @property
    def active(self) -> bool:
        """False when nothing is registered or reserved: the dispatcher skips the check."""
        return bool(self._keys) or self._reserve6 is not None

    # -- the conflict check -----------------------------------------------------------------------

    def check(self, nexus: Nexus, access: Access, cdb: bytes) -> None:
        with self._lock:
            if self._conflicts(nexus, access, cdb):
                raise ReservationConflict()

    def _conflicts(self, nexus: Nexus, access: Access, cdb: bytes) -> bool:
        if access is Access.FREE or access is Access.RESERVE6:
            return False
        if self._reserve6 is not None:
            return self._reserve6 != nexus
        if self._type is None or access in (Access.STATUS, Access.PERSISTENT):
            return False
        if access is Access.START_STOP:
            access = Access.STATUS if cdb[4] & 0x01 and not cdb[4] >> 4 else Access.WRITE
        elif access is Access.PREVENT:
            access = Access.WRITE if cdb[4] & 0x03 else Access.STATUS
        if access is Access.STATUS or self._holds(nexus):
            return False
        if nexus in self._keys and self._type in _REGISTRANTS:
            return False
        return access is Access.WRITE or self._type not in _WRITE_ONLY

    def _holds(self, nexus: Nexus) -> bool:
        if self._type in _ALL_REGISTRANTS:
            return nexus in self._keys
        return self._type is not None and self._holder == nexus

    # -- I_T nexus loss, reset --------------------------------------------------------------------

    def release_reserve6(self, nexus: Nexus | None) -> None:
        """Drop the RESERVE(6) reservation held through ``nexus`` (any nexus if None)."""
        with self._lock:
            if nexus is None or self._reserve6 == nexus:
                self._reserve6 = None

    # -- RESERVE(6) / RELEASE(6) ------------------------------------------------------------------

    def reserve6(self, nexus: Nexus) -> None:
        with self._lock:
            if self._reserve6 is not None and self._reserve6 != nexus:
                raise ReservationConflict()
            if self._type is not None:
                if not self._holds(nexus) and not (self._type in _REGISTRANTS and nexus in self._keys):
                    raise ReservationConflict()
                return
            if self._keys:
                raise ReservationConflict()
            self._reserve6 = nexus

    def release6(self, nexus: Nexus) -> None:
        with self._lock:
            if self._reserve6 is not None:
                if self._reserve6 == nexus:
                    self._reserve6 = None
                return
            if self._type is not None and not (
                self._holds(nexus) or (self._type in _REGISTRANTS and nexus in self._keys)
            ):
                raise ReservationConflict()

    # -- PERSISTENT RESERVE IN --------------------------------------------------------------------

    def read_keys(self) -> bytes:
        with self._lock:
            keys = b"".join(struct.pack(">Q", key) for key in self._keys.values())
            return struct.pack(">II", self.generation, len(keys)) + keys

    def read_reservation(self) -> bytes:
        with self._lock:
            if self._type is None:
                return struct.pack(">II", self.generation, 0)
            key = 0
            if self._type not in _ALL_REGISTRANTS and self._holder is not None:
                key = self._keys.get(self._holder, 0)
            return struct.pack(">IIQ4xxBxx", self.generation, 16, key, self._type)

    def read_full_status(self) -> bytes:
        with self._lock:
            entries = []
            for nexus, key in self._keys.items():
                holder = self._holds(nexus)
                transport_id = _transport_id(nexus.initiator_port)
                entries.append(
                    struct.pack(
                        ">Q4xBB4xHI",
                        key,
                        0x01 if holder else 0,
                        (self._type or 0) if holder else 0,
                        nexus.relative_port,
                        len(transport_id),
                    )
                    + transport_id
                )
            body = b"".join(entries)
            return struct.pack(">II", self.generation, len(body)) + body

    # -- PERSISTENT RESERVE OUT -------------------------------------------------------------------

    def register(self, nexus: Nexus, key: int, new_key: int, ignore_existing: bool) -> None:
        with self._lock:
            current = self._keys.get(nexus)
            if not ignore_existing and key != (current or 0):
                raise ReservationConflict()
            if current is None and not new_key:
                return
            if new_key:
                self._keys[nexus] = new_key
            else:
                self._unregister(nexus)
            self._bump()

    def _unregister(self, nexus: Nexus) -> None:
        """Remove a registration; a reservation it held goes with it (SPC-4 5.9.11.3)."""
        del self._keys[nexus]
        if self._type is None:
            return
        if self._type in _ALL_REGISTRANTS:
            if not self._keys:
                self._clear_reservation()
        elif self._holder == nexus:
            released_type = self._type
            self._clear_reservation()
            if released_type in _REGISTRANTS:
                self._notify(list(self._keys), RESERVATIONS_RELEASED)

    def reserve(self, nexus: Nexus, key: int, kind: int) -> None:
        with self._lock:
            self._check_key(nexus, key)
            if self._type is not None:
                if not self._holds(nexus) or self._type != kind:
                    raise ReservationConflict()
                return
            self._type, self._holder = kind, nexus

    def release(self, nexus: Nexus, key: int, kind: int) -> None:
        with self._lock:
            self._check_key(nexus, key)
            if self._type is None or not self._holds(nexus):
                return
            if self._type != kind:
                raise CheckCondition(SenseKey.ILLEGAL_REQUEST, INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
            released_type = self._type
            self._clear_reservation()
            if released_type in _REGISTRANTS:
                self._notify([n for n in self._keys if n != nexus], RESERVATIONS_RELEASED)

    def clear(self, nexus: Nexus, key: int) -> None:
        with self._lock:
            self._check_key(nexus, key)
            others = [n for n in self._keys if n != nexus]
            self._keys.clear()
            self._clear_reservation()
            self._bump()
            self._notify(others, RESERVATIONS_PREEMPTED)

    def preempt(self, nexus: Nexus, key: int, victim: int, kind: int) -> None:
        """PREEMPT (and PREEMPT AND ABORT: the transport aborts the victims' tasks; this layer has
        none queued)."""
        with self._lock:
            self._check_key(nexus, key)
            if self._type in _ALL_REGISTRANTS and not victim:
                removed = [n for n in self._keys if n != nexus]
                self._remove(removed)
                self._type, self._holder = kind, nexus
            elif (
                self._type is not None
                and self._type not in _ALL_REGISTRANTS
                and (self._holder is not None and victim == self._keys.get(self._holder))
            ):
                removed = [n for n, k in self._keys.items() if k == victim and n != nexus]
                self._remove(removed)
                self._type, self._holder = kind, nexus
            else:
                if not victim:
                    raise invalid_parameter(8)
                removed = [n for n, k in self._keys.items() if k == victim]
                if not removed:
                    raise ReservationConflict()
                self._remove(removed)
                if self._type in _ALL_REGISTRANTS and not self._keys:
                    self._clear_reservation()
            self._bump()
            self._notify(removed, REGISTRATIONS_PREEMPTED)

    def _remove(self, nexuses: list[Nexus]) -> None:
        for n in nexuses:
            del self._keys[n]
            if self._holder == n:
                self._clear_reservation()

    def _check_key(self, nexus: Nexus, key: int) -> None:
        if self._reserve6 is not None and self._reserve6 != nexus:
            raise ReservationConflict()
        if self._keys.get(nexus) != key or nexus not in self._keys:
            raise ReservationConflict()

    def _clear_reservation(self) -> None:
        self._type, self._holder = None, None

    def _bump(self) -> None:
        self.generation = (self.generation + 1) & 0xFFFFFFFF


def _transport_id(initiator_port: str) -> bytes:
    """An iSCSI TransportID, format 01b: the initiator port name "<name>,i,0x<ISID>"."""
    name = initiator_port.encode("utf-8") + b"\x00"
    name += bytes(-len(name) % 4)
    return struct.pack(">BxH", 0x40 | _PROTOCOL_ISCSI, len(name)) + name


# -- the commands --------------------------------------------------------------------------------


def read_keys(lu: LogicalUnit, req: Request) -> bytes:
    return lu.reservations.read_keys()


def read_reservation(lu: LogicalUnit, req: Request) -> bytes:
    return lu.reservations.read_reservation()


def report_capabilities(lu: LogicalUnit, req: Request) -> bytes:
    # CRH; TMV with every type of TYPES in the mask; no SIP_C, ATP_C, PTPL_C
    return struct.pack(">HBBBBxx", 8, 0x10, 0x80, 0xEA, 0x01)


def read_full_status(lu: LogicalUnit, req: Request) -> bytes:
    return lu.reservations.read_full_status()


def _parameters(req: Request) -> tuple[int, int]:
    """The reservation key and service action reservation key of PR OUT's 24-byte list."""
    data = req.data_out
    if be(req.cdb, 5, 4) != _PARAMETERS:
        raise parameter_list_length_error()
    flags = data[20]
    if flags & 0x08:
        raise invalid_parameter(20, 3)  # SPEC_I_P
    if flags & 0x04:
        raise invalid_parameter(20, 2)  # ALL_TG_PT
    if flags & 0x01:
        raise invalid_parameter(20, 0)  # APTPL
    key, service_key = struct.unpack_from(">QQ", data)
    return key, service_key


def _type(cdb: bytes) -> int:
    if cdb[2] >> 4:
        raise invalid_cdb(2, 7)
    kind = cdb[2] & 0x0F
    if kind not in TYPES:
        raise invalid_cdb(2, 3)
    return kind


def register(lu: LogicalUnit, req: Request) -> bytes:
    key, new_key = _parameters(req)
    lu.reservations.register(req.nexus, key, new_key, ignore_existing=False)
    return b""


def register_and_ignore(lu: LogicalUnit, req: Request) -> bytes:
    _, new_key = _parameters(req)
    lu.reservations.register(req.nexus, 0, new_key, ignore_existing=True)
    return b""


def reserve(lu: LogicalUnit, req: Request) -> bytes:
    kind = _type(req.cdb)
    key, _ = _parameters(req)
    lu.reservations.reserve(req.nexus, key, kind)
    return b""


def release(lu: LogicalUnit, req: Request) -> bytes:
    kind = _type(req.cdb)
    key, _ = _parameters(req)
    lu.reservations.release(req.nexus, key, kind)
    return b""


def clear(lu: LogicalUnit, req: Request) -> bytes:
    key, _ = _parameters(req)
    lu.reservations.clear(req.nexus, key)
    return b""


def preempt(lu: LogicalUnit, req: Request) -> bytes:
    kind = _type(req.cdb)
    key, victim = _parameters(req)
    lu.reservations.preempt(req.nexus, key, victim, kind)
    return b""


def reserve6(lu: LogicalUnit, req: Request) -> bytes:
    lu.reservations.reserve6(req.nexus)
    return b""


def release6(lu: LogicalUnit, req: Request) -> bytes:
    lu.reservations.release6(req.nexus)
    return b""


def _prout_length(cdb: bytes) -> int:
    return be(cdb, 5, 4)


_PRIN = bytes((0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x00))
#: scope and type are looked at only by RESERVE, RELEASE and the PREEMPTs; the others ignore them
_PROUT = bytes((0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x00))


def _prin(action: int, name: str, run: Callable[[LogicalUnit, Request], bytes]) -> Command:
    return Command(0x5E, name, _PRIN, run, Access.PERSISTENT, service_action=action, allocation=(7, 2))


def _prout(action: int, name: str, run: Callable[[LogicalUnit, Request], bytes]) -> Command:
    return Command(
        0x5F,
        name,
        _PROUT,
        run,
        Access.PERSISTENT,
        service_action=action,
        data_out=_prout_length,
    )


COMMANDS = (
    _prin(0x00, "PERSISTENT RESERVE IN / READ KEYS", read_keys),
    _prin(0x01, "PERSISTENT RESERVE IN / READ RESERVATION", read_reservation),
    _prin(0x02, "PERSISTENT RESERVE IN / REPORT CAPABILITIES", report_capabilities),
    _prin(0x03, "PERSISTENT RESERVE IN / READ FULL STATUS", read_full_status),
    _prout(0x00, "PERSISTENT RESERVE OUT / REGISTER", register),
    _prout(0x01, "PERSISTENT RESERVE OUT / RESERVE", reserve),
    _prout(0x02, "PERSISTENT RESERVE OUT / RELEASE", release),
    _prout(0x03, "PERSISTENT RESERVE OUT / CLEAR", clear),
    _prout(0x04, "PERSISTENT RESERVE OUT / PREEMPT", preempt),
    _prout(0x05, "PERSISTENT RESERVE OUT / PREEMPT AND ABORT", preempt),
    _prout(0x06, "PERSISTENT RESERVE OUT / REGISTER AND IGNORE EXISTING KEY", register_and_ignore),
    Command(0x16, "RESERVE(6)", bytes((0x16, 0, 0, 0, 0, 0)), reserve6, Access.RESERVE6),
    Command(0x17, "RELEASE(6)", bytes((0x17, 0, 0, 0, 0, 0)), release6, Access.RESERVE6),
)
