"""Persistent reservations and RESERVE(6)/RELEASE(6) between several I_T nexuses: who may read
and write under each reservation type (the SPC-4 table libiscsi's ProutReserve tests check), what
releasing, preempting and clearing do, and the flow Windows failover clustering uses."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from scsi_support import (
    BLOCK,
    READ10,
    TUR,
    WRITE10,
    A,
    B,
    C,
    Harness,
    Nexus,
    inquiry,
    make_disk,
    mode_sense6,
    prin,
    prout,
    prout_parameters,
    read_capacity10,
    rw10,
)

REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_ABORT, REGISTER_IGNORE = range(7)
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES, READ_FULL_STATUS = range(4)
WE, EA, WE_RO, EA_RO, WE_AR, EA_AR = 1, 3, 5, 6, 7, 8
KEY_A, KEY_B, KEY_C = 0xA1A1, 0xB2B2, 0xC3C3


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    path = tmp_path / "disk.img"
    make_disk(path, 64)
    harness = Harness(path)
    for nexus in (A, B, C):
        harness.ok(TUR, nexus=nexus)
    yield harness
    harness.target.close()


def out(h: Harness, nexus: object, action: int, key: int, service_key: int = 0, kind: int = 0) -> int:
    """PERSISTENT RESERVE OUT; the status."""
    response = h.run(prout(action, kind), prout_parameters(key, service_key), nexus=nexus)  # type: ignore[arg-type]
    return response.status


def keys(h: Harness, nexus: Nexus = A) -> list[int]:
    data = h.ok(prin(READ_KEYS), nexus=nexus)
    length = struct.unpack_from(">I", data, 4)[0]
    return [struct.unpack_from(">Q", data, 8 + i)[0] for i in range(0, length, 8)]


def reservation(h: Harness, nexus: Nexus = A) -> tuple[int, int] | None:
    data = h.ok(prin(READ_RESERVATION), nexus=nexus)
    if not struct.unpack_from(">I", data, 4)[0]:
        return None
    key, scope_type = struct.unpack_from(">Q5xB", data, 8)
    return key, scope_type & 0x0F


def can_read(h: Harness, nexus: object) -> bool:
    status = h.run(rw10(READ10, 0, 1), nexus=nexus).status  # type: ignore[arg-type]
    assert status in (0x00, 0x18)
    return status == 0


def can_write(h: Harness, nexus: object) -> bool:
    status = h.run(rw10(WRITE10, 0, 1), bytes(BLOCK), nexus=nexus).status  # type: ignore[arg-type]
    assert status in (0x00, 0x18)
    return status == 0


@pytest.mark.parametrize(
    ("kind", "registered_read", "registered_write", "unregistered_read", "unregistered_write"),
    [
        (EA, False, False, False, False),
        (WE, True, False, True, False),
        (EA_RO, True, True, False, False),
        (WE_RO, True, True, True, False),
        (EA_AR, True, True, False, False),
        (WE_AR, True, True, True, False),
    ],
)
def test_access_under_each_reservation_type(
    h: Harness,
    kind: int,
    registered_read: bool,
    registered_write: bool,
    unregistered_read: bool,
    unregistered_write: bool,
) -> None:
    assert out(h, A, REGISTER_IGNORE, 0, KEY_A) == 0
    assert out(h, B, REGISTER_IGNORE, 0, KEY_B) == 0
    assert out(h, A, RESERVE, KEY_A, kind=kind) == 0
    assert reservation(h) == (0 if kind in (WE_AR, EA_AR) else KEY_A, kind)
    assert can_read(h, A) and can_write(h, A)
    assert (can_read(h, B), can_write(h, B)) == (registered_read, registered_write)
    assert (can_read(h, C), can_write(h, C)) == (unregistered_read, unregistered_write)
    # whatever the type: identification, capacity and the reservation commands still work
    for nexus in (B, C):
        assert h.run(inquiry(), nexus=nexus).status == 0
        assert h.run(read_capacity10(), nexus=nexus).status == 0
        assert h.run(TUR, nexus=nexus).status == 0
        assert h.run(prin(READ_KEYS), nexus=nexus).status == 0
    assert h.run(mode_sense6(0x3F), nexus=C).status == (0 if unregistered_read else 0x18)
    assert out(h, A, RELEASE, KEY_A, kind=kind) == 0
    assert reservation(h) is None
    assert can_write(h, C)


@pytest.mark.parametrize(("kind", "shared"), [(EA, False), (WE_RO, False), (EA_RO, False), (WE_AR, True)])
def test_unregistering_the_holder(h: Harness, kind: int, shared: bool) -> None:
    """A holder's reservation goes with its registration, except an all-registrants one, which
    the other registrants still hold; only other registrants hear RESERVATIONS RELEASED."""
    out(h, A, REGISTER_IGNORE, 0, KEY_A)
    out(h, B, REGISTER_IGNORE, 0, KEY_B)
    assert out(h, A, RESERVE, KEY_A, kind=kind) == 0
    assert out(h, A, REGISTER, KEY_A, 0) == 0
    assert keys(h) == [KEY_B]
    if shared:
        assert reservation(h) == (0, kind)
        assert out(h, B, RELEASE, KEY_B, kind=kind) == 0
    else:
        assert reservation(h) is None  # A gets no unit attention for its own command
    response = h.run(TUR, nexus=B)
    if kind in (WE_RO, EA_RO):
        assert response.status == 0x02 and response.sense[12:14] == b"\x2a\x04"
    else:
        assert response.status == 0
    assert out(h, B, REGISTER, KEY_B, 0) == 0
    assert keys(h) == []


def test_register_checks_the_key(h: Harness) -> None:
    assert out(h, A, REGISTER, 0x99, KEY_A) == 0x18  # not registered: the key must be 0
    assert out(h, A, REGISTER, 0, KEY_A) == 0
    assert out(h, A, REGISTER, 0x99, 0x77) == 0x18
    assert out(h, A, REGISTER, KEY_A, 0x77) == 0
    assert out(h, A, REGISTER_IGNORE, 0x12345, 0x78) == 0
    assert keys(h) == [0x78]
    generation = struct.unpack_from(">I", h.ok(prin(READ_KEYS)))[0]
    assert generation == 3
    assert out(h, B, RESERVE, 0, kind=WE) == 0x18  # not registered
    assert out(h, A, RESERVE, 0x78, kind=WE) == 0
    assert out(h, A, RESERVE, 0x78, kind=WE) == 0  # the same reservation again
    assert out(h, A, RESERVE, 0x78, kind=EA) == 0x18  # another type
    response = h.run(prout(RELEASE, EA), prout_parameters(0x78))
    assert response.status == 0x02 and response.sense[12:14] == b"\x26\x04"
    assert reservation(h) == (0x78, WE)


def test_parameter_list_refusals(h: Harness) -> None:
    for flags, bit in ((0x01, 0), (0x04, 2), (0x08, 3)):  # APTPL, ALL_TG_PT, SPEC_I_P
        sense = h.fails(prout(REGISTER_IGNORE), prout_parameters(0, KEY_A, flags))
        assert (sense.asc, sense.field) == (0x26, bytes((0x88 | bit, 0, 20)))
    assert h.fails(prout(REGISTER, length=23), prout_parameters(0, KEY_A)[:23]).asc == 0x1A
    assert h.fails(prout(RESERVE, kind=2), prout_parameters(0)).asc == 0x24
    assert h.fails(prout(RESERVE, kind=1, scope=1), prout_parameters(0)).asc == 0x24
    assert keys(h) == []


def test_windows_cluster_arbitration(h: Harness) -> None:
    """Node A owns the disk; node B challenges it, A stops defending, B preempts and owns it."""
    out(h, A, REGISTER_IGNORE, 0, KEY_A)
    assert out(h, A, RESERVE, KEY_A, kind=WE_RO) == 0
    out(h, B, REGISTER_IGNORE, 0, KEY_B)
    assert reservation(h) == (KEY_A, WE_RO)
    assert sorted(keys(h)) == [KEY_A, KEY_B]
    assert out(h, B, PREEMPT, KEY_B, KEY_A, WE_RO) == 0
    assert reservation(h, B) == (KEY_B, WE_RO)
    assert keys(h, B) == [KEY_B]
    sense = h.fails(TUR, nexus=A)
    assert (sense.key, sense.asc, sense.ascq) == (0x06, 0x2A, 0x05)  # registrations preempted
    assert not can_write(h, A)
    assert can_read(h, A)
    assert out(h, A, REGISTER, KEY_A, 0) == 0x18  # its key is gone


def test_preempt_and_clear(h: Harness) -> None:
    out(h, A, REGISTER_IGNORE, 0, KEY_A)
    out(h, B, REGISTER_IGNORE, 0, KEY_B)
    out(h, C, REGISTER_IGNORE, 0, KEY_C)
    assert out(h, A, PREEMPT, KEY_A, 0x5555, WE) == 0x18  # no registration has that key
    assert out(h, A, PREEMPT_ABORT, KEY_A, KEY_C, WE) == 0  # no reservation: removes C only
    assert sorted(keys(h)) == [KEY_A, KEY_B]
    assert reservation(h) is None
    assert out(h, B, RESERVE, KEY_B, kind=EA_AR) == 0
    assert out(h, A, PREEMPT, KEY_A, 0, EA) == 0  # all registrants: key 0 takes it all
    assert keys(h) == [KEY_A] and reservation(h) == (KEY_A, EA)
    assert h.fails(TUR, nexus=B).asc == 0x2A  # B's registration was preempted
    out(h, B, REGISTER_IGNORE, 0, KEY_B)
    assert out(h, B, CLEAR, KEY_B) == 0
    assert keys(h, B) == [] and reservation(h, B) is None
    sense = h.fails(TUR, nexus=A)
    assert (sense.asc, sense.ascq) == (0x2A, 0x03)


def test_read_full_status_and_capabilities(h: Harness) -> None:
    out(h, A, REGISTER_IGNORE, 0, KEY_A)
    out(h, B, REGISTER_IGNORE, 0, KEY_B)
    out(h, B, RESERVE, KEY_B, kind=WE)
    data = h.ok(prin(READ_FULL_STATUS))
    assert struct.unpack_from(">I", data, 4)[0] == len(data) - 8
    entries = []
    offset = 8
    while offset < len(data):
        key, holder, scope_type, port, length = struct.unpack_from(">Q4xBB4xHI", data, offset)
        transport_id = data[offset + 24 : offset + 24 + length]
        entries.append((key, holder, scope_type, port, transport_id[0], transport_id[4:].rstrip(b"\0")))
        offset += 24 + length
    assert entries == [
        (KEY_A, 0, 0, 1, 0x45, A.initiator_port.encode()),
        (KEY_B, 1, WE, 1, 0x45, B.initiator_port.encode()),
    ]
    capabilities = h.ok(prin(REPORT_CAPABILITIES))
    assert struct.unpack(">HBBH", capabilities[:6]) == (8, 0x10, 0x80, 0xEA01)


def test_reserve6_between_two_initiators(h: Harness) -> None:
    """libiscsi's Reserve6.2Initiators, then the nexus loss and reset that end a reservation."""
    reserve6, release6 = bytes((0x16, 0, 0, 0, 0, 0)), bytes((0x17, 0, 0, 0, 0, 0))
    h.ok(reserve6, nexus=A)
    h.ok(reserve6, nexus=A)
    assert h.run(reserve6, nexus=B).status == 0x18
    h.ok(release6, nexus=B)  # not the holder: no effect
    h.ok(mode_sense6(0x3F), nexus=A)
    assert h.run(mode_sense6(0x3F), nexus=B).status == 0x18
    assert h.run(TUR, nexus=B).status == 0x18
    assert h.run(inquiry(), nexus=B).status == 0
    assert h.run(prin(READ_KEYS), nexus=B).status == 0x18
    h.ok(release6, nexus=A)
    h.ok(reserve6, nexus=B)
    h.target.nexus_lost(B)
    h.ok(reserve6, nexus=A)
    h.target.reset(lun=0)
    assert h.fails(TUR, nexus=B).asc == 0x29
    assert h.fails(TUR, nexus=C).asc == 0x29
    assert h.run(rw10(WRITE10, 0, 1), bytes(BLOCK), nexus=C).status == 0
    # a persistent reservation and RESERVE(6) exclude each other
    assert h.fails(TUR, nexus=A).asc == 0x29
    out(h, A, REGISTER_IGNORE, 0, KEY_A)
    assert h.run(reserve6, nexus=B).status == 0x18
    out(h, A, RESERVE, KEY_A, kind=EA)
    h.ok(reserve6, nexus=A)  # from the holder: GOOD, and nothing changes
    assert reservation(h) == (KEY_A, EA)
