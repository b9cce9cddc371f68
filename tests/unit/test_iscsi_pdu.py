"""The iSCSI PDU layout: every PDU builds and parses back to itself, digests match RFC 3720's
test vectors, and malformed input is rejected with ProtocolViolation (an ExportError)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dingyuan.errors import ExportError
from dingyuan.exports.iscsi import pdu

u32 = st.integers(0, 2**32 - 1)

bhs_strategy = st.builds(
    pdu.Bhs,
    opcode=st.integers(0, 0x3F),
    immediate=st.booleans(),
    final=st.booleans(),
    flags=st.integers(0, 0x7F),
    specific=st.binary(min_size=2, max_size=2),
    lun=st.integers(0, 2**64 - 1),
    itt=u32,
    tail=st.binary(min_size=28, max_size=28),
)
ahs_strategy = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4)


def test_protocol_violation_is_an_export_error() -> None:
    assert issubclass(pdu.ProtocolViolation, ExportError)
    assert issubclass(pdu.HeaderDigestError, pdu.ProtocolViolation)
    assert issubclass(pdu.DataDigestError, pdu.ProtocolViolation)


# RFC 3720 appendix B.4: CRC32C values and the bytes sent on the wire (least significant first).
@pytest.mark.parametrize(
    ("data", "value", "wire"),
    [
        (bytes(32), 0x8A9136AA, "aa36918a"),
        (b"\xff" * 32, 0x62A8AB43, "43aba862"),
        (bytes(range(32)), 0x46DD794E, "4e79dd46"),
        (bytes(range(31, -1, -1)), 0x113FDB5C, "5cdb3f11"),
        (
            bytes.fromhex(
                "01c00000000000000000000000000000"
                "14000000000004000000001400000018"
                "28000000000000000200000000000000"
            ),
            0xD9963A56,
            "563a96d9",
        ),
    ],
)
def test_crc32c_known_answers(data: bytes, value: int, wire: str) -> None:
    assert pdu.crc32c(data) == value
    assert pdu.digest(data).hex() == wire


@given(bhs_strategy)
def test_bhs_round_trip(bhs: pdu.Bhs) -> None:
    data = pdu.build_pdu(pdu.Pdu(bhs))
    assert len(data) == pdu.BHS_SIZE
    assert pdu.parse_bhs(data) == bhs


@given(bhs_strategy, ahs_strategy, st.binary(max_size=300), st.booleans(), st.booleans())
def test_pdu_round_trip(bhs: pdu.Bhs, ahs: list[tuple[int, bytes]], data: bytes, hd: bool, dd: bool) -> None:
    ahs_bytes = pdu.build_ahs(ahs)
    wire = pdu.build_pdu(pdu.Pdu(bhs, ahs_bytes, data), header_digest=hd, data_digest=dd)
    assert len(wire) % 4 == 0
    header = pdu.parse_bhs(wire[: pdu.BHS_SIZE])
    assert header.data_segment_length == len(data)
    assert header.total_ahs_length * 4 == len(ahs_bytes)
    assert pdu.BHS_SIZE + pdu.remaining_length(header, header_digest=hd, data_digest=dd) == len(wire)
    parsed = pdu.parse_pdu(wire, header_digest=hd, data_digest=dd)
    assert parsed == pdu.Pdu(header, ahs_bytes, data)
    assert pdu.parse_ahs(parsed.ahs) == ahs


def test_header_fields_sit_where_rfc_7143_puts_them() -> None:
    tail = pdu.build_tail({pdu.OFF_TTT: 512, pdu.OFF_CMD_SN: 7, pdu.OFF_EXP_STAT_SN: 9}, b"\x28")
    bhs = pdu.Bhs(
        pdu.OP_SCSI_COMMAND,
        final=True,
        flags=pdu.CMD_READ | pdu.ATTR_SIMPLE,
        lun=1 << 48,
        itt=0x14,
        tail=tail,
    )
    wire = pdu.build_pdu(pdu.Pdu(bhs, data=b"abcde"))
    assert wire[0] == 0x01 and wire[1] == 0xC1
    assert wire[5:8] == b"\x00\x00\x05"
    assert wire[8:16] == bytes.fromhex("0001000000000000")
    assert wire[16:20] == bytes.fromhex("00000014")
    assert wire[20:24] == (512).to_bytes(4, "big")
    assert wire[32] == 0x28
    assert wire[48:] == b"abcde\0\0\0"
    parsed = pdu.parse_bhs(wire[:48])
    assert (parsed.expected_data_transfer_length, parsed.cmd_sn, parsed.exp_stat_sn) == (512, 7, 9)
    assert parsed.cdb == b"\x28" + bytes(15)


def test_target_words_accessors() -> None:
    words = {
        pdu.OFF_TTT: 1,
        pdu.OFF_CMD_SN: 2,
        pdu.OFF_EXP_STAT_SN: 3,
        pdu.OFF_MAX_CMD_SN: 4,
        pdu.OFF_DATA_SN: 5,
        pdu.OFF_BUFFER_OFFSET: 6,
        pdu.OFF_RESIDUAL_COUNT: 7,
    }
    bhs = pdu.parse_bhs(pdu.build_pdu(pdu.Pdu(pdu.Bhs(pdu.OP_R2T, tail=pdu.build_tail(words)))))
    assert (bhs.ttt, bhs.stat_sn, bhs.exp_cmd_sn, bhs.max_cmd_sn) == (1, 2, 3, 4)
    assert (bhs.r2t_sn, bhs.data_sn, bhs.exp_data_sn) == (5, 5, 5)
    assert (bhs.buffer_offset, bhs.desired_data_transfer_length, bhs.residual_count) == (6, 7, 7)


def test_login_fields() -> None:
    flags = pdu.login_flags(csg=pdu.STAGE_OPERATIONAL, nsg=pdu.STAGE_FULL_FEATURE)
    bhs = pdu.Bhs(
        pdu.OP_LOGIN_REQUEST,
        immediate=True,
        final=True,
        flags=flags,
        specific=b"\x00\x00",
        lun=pdu.isid_tsih(bytes.fromhex("80123456789a"), 0x0102),
        tail=pdu.build_tail({pdu.OFF_TTT: 3 << 16}),
    )
    wire = pdu.build_pdu(pdu.Pdu(bhs))
    assert wire[0] == 0x43 and wire[1] == 0x87
    assert wire[8:16] == bytes.fromhex("80123456789a0102")
    parsed = pdu.parse_bhs(wire)
    assert parsed.transit and not parsed.continue_
    assert (parsed.csg, parsed.nsg) == (pdu.STAGE_OPERATIONAL, pdu.STAGE_FULL_FEATURE)
    assert (parsed.isid, parsed.tsih, parsed.cid) == (bytes.fromhex("80123456789a"), 0x0102, 3)
    response_tail = bytearray(28)
    response_tail[16:18] = bytes([pdu.STATUS_INITIATOR_ERROR, pdu.DETAIL_NOT_FOUND])
    response = pdu.Bhs(pdu.OP_LOGIN_RESPONSE, tail=bytes(response_tail))
    assert (response.status_class, response.status_detail) == (2, 3)


@pytest.mark.parametrize("size", [0, 47, 49])
def test_a_header_of_the_wrong_size_is_rejected(size: int) -> None:
    with pytest.raises(pdu.ProtocolViolation):
        pdu.parse_bhs(bytes(size))


def test_a_data_segment_over_the_limit_is_rejected_before_reading_it() -> None:
    wire = pdu.build_pdu(pdu.Pdu(pdu.Bhs(pdu.OP_DATA_OUT), data=bytes(8193)))
    with pytest.raises(pdu.ProtocolViolation, match="over the limit"):
        pdu.parse_bhs(wire[:48], max_data_segment_length=8192)
    assert pdu.parse_bhs(wire[:48], max_data_segment_length=8193).data_segment_length == 8193


def test_unknown_opcodes_are_returned_for_a_reject() -> None:
    assert pdu.parse_bhs(pdu.build_pdu(pdu.Pdu(pdu.Bhs(0x1C)))).opcode == 0x1C


@given(st.binary(min_size=1, max_size=8))
def test_a_pdu_of_the_wrong_length_is_rejected(extra: bytes) -> None:
    wire = pdu.build_pdu(pdu.Pdu(pdu.Bhs(pdu.OP_TEXT_REQUEST), data=b"a=b\0"))
    with pytest.raises(pdu.ProtocolViolation):
        pdu.parse_pdu(wire + extra)
    with pytest.raises(pdu.ProtocolViolation):
        pdu.parse_pdu(wire[: -len(extra)])


@given(st.integers(0, 48 + 4 - 1), st.integers(1, 255))
def test_a_corrupt_header_fails_its_digest(position: int, flip: int) -> None:
    wire = bytearray(pdu.build_pdu(pdu.Pdu(pdu.Bhs(pdu.OP_NOP_OUT)), header_digest=True))
    wire[position] ^= flip
    with pytest.raises(pdu.ProtocolViolation):
        pdu.parse_pdu(bytes(wire), header_digest=True)


@given(st.integers(48 + 4, 48 + 4 + 8 + 4 - 1), st.integers(1, 255))
def test_corrupt_data_fails_the_data_digest(position: int, flip: int) -> None:
    message = pdu.Pdu(pdu.Bhs(pdu.OP_DATA_OUT), data=b"payload")
    wire = bytearray(pdu.build_pdu(message, header_digest=True, data_digest=True))
    wire[position] ^= flip
    with pytest.raises(pdu.DataDigestError):
        pdu.parse_pdu(bytes(wire), header_digest=True, data_digest=True)


@pytest.mark.parametrize(
    "ahs",
    [
        bytes.fromhex("00050100"),  # AHSLength 5 in a 4-byte AHS
        bytes.fromhex("0001010000"),  # not a multiple of 4 after the first segment
        bytes.fromhex("00"),
    ],
)
def test_a_malformed_ahs_is_rejected(ahs: bytes) -> None:
    with pytest.raises(pdu.ProtocolViolation):
        pdu.parse_ahs(ahs)


def test_a_malformed_ahs_in_a_pdu_is_rejected() -> None:
    wire = bytearray(pdu.build_pdu(pdu.Pdu(pdu.Bhs(pdu.OP_SCSI_COMMAND), ahs=bytes(4))))
    wire[48:50] = b"\x00\x09"
    with pytest.raises(pdu.ProtocolViolation):
        pdu.parse_pdu(bytes(wire))


@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_protocol_violation(data: bytes) -> None:
    with contextlib.suppress(pdu.ProtocolViolation):
        pdu.parse_pdu(data, header_digest=True, data_digest=True)
