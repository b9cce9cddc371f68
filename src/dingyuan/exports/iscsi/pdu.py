"""The iSCSI PDU layout (RFC 7143 section 11): constants and pure build/parse functions, no I/O.

Every PDU starts with a 48-byte Basic Header Segment (BHS), big-endian::

    byte  0      .|I|opcode(6)          reserved bit, immediate delivery, opcode
    byte  1      F|opcode-specific(7)   final bit and flags of the opcode
    bytes 2-3    opcode-specific        (versions, response codes, reject reason, ...)
    byte  4      TotalAHSLength         in 4-byte words
    bytes 5-7    DataSegmentLength      24 bits, in bytes, without padding
    bytes 8-15   LUN or opcode-specific (ISID and TSIH in login PDUs)
    bytes 16-19  Initiator Task Tag
    bytes 20-47  opcode-specific        kept raw as :attr:`Bhs.tail`, read with the accessors

followed by the Additional Header Segments (AHS), an optional header digest, the data segment
padded to a multiple of 4 bytes, and an optional data digest. The accessors name the 32-bit
words by what they hold in the PDUs that use them (CmdSN in initiator PDUs sits where StatSN sits
in target PDUs, and so on); the ``OFF_*`` constants are their byte offsets in the BHS, which
:func:`build_tail` takes to assemble a tail.

The parsers raise :class:`ProtocolViolation` for anything a peer must not send: a short header,
a data segment over the negotiated limit, a malformed AHS, a wrong digest. An unknown opcode is
*not* a violation: a target answers it with a Reject PDU (reason "command not supported"), so
:func:`parse_bhs` returns its number as it is. Digests are CRC32C (Castagnoli), sent with the
least significant byte first, as RFC 3720 appendix B.4 shows, computed by ``google-crc32c``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import google_crc32c

from dingyuan.errors import ExportError


class ProtocolViolation(ExportError):
    """iSCSI protocol violation: {detail}"""


class HeaderDigestError(ProtocolViolation):
    """iSCSI header digest mismatch: {detail}"""


class DataDigestError(ProtocolViolation):
    """iSCSI data digest mismatch: {detail}"""


# -- opcodes (byte 0, low 6 bits) ---------------------------------------------------------------

OP_NOP_OUT = 0x00
OP_SCSI_COMMAND = 0x01
OP_TASK_MGMT_REQUEST = 0x02
OP_LOGIN_REQUEST = 0x03
OP_TEXT_REQUEST = 0x04
OP_DATA_OUT = 0x05
OP_LOGOUT_REQUEST = 0x06
OP_SNACK_REQUEST = 0x10

OP_NOP_IN = 0x20
OP_SCSI_RESPONSE = 0x21
OP_TASK_MGMT_RESPONSE = 0x22
OP_LOGIN_RESPONSE = 0x23
OP_TEXT_RESPONSE = 0x24
OP_DATA_IN = 0x25
OP_LOGOUT_RESPONSE = 0x26
OP_R2T = 0x31
OP_ASYNC_MESSAGE = 0x32
OP_REJECT = 0x3F

INITIATOR_OPCODES = frozenset(
    {
        OP_NOP_OUT,
        OP_SCSI_COMMAND,
        OP_TASK_MGMT_REQUEST,
        OP_LOGIN_REQUEST,
        OP_TEXT_REQUEST,
        OP_DATA_OUT,
        OP_LOGOUT_REQUEST,
        OP_SNACK_REQUEST,
    }
)
TARGET_OPCODES = frozenset(
    {
        OP_NOP_IN,
        OP_SCSI_RESPONSE,
        OP_TASK_MGMT_RESPONSE,
        OP_LOGIN_RESPONSE,
        OP_TEXT_RESPONSE,
        OP_DATA_IN,
        OP_LOGOUT_RESPONSE,
        OP_R2T,
        OP_ASYNC_MESSAGE,
        OP_REJECT,
    }
)

# -- byte 0 and byte 1 bits ---------------------------------------------------------------------

IMMEDIATE = 0x40
OPCODE_MASK = 0x3F
FINAL = 0x80
FLAGS_MASK = 0x7F

# SCSI Command (11.3.1): read, write, task attributes.
CMD_READ = 0x40
CMD_WRITE = 0x20
CMD_ATTR_MASK = 0x07
ATTR_UNTAGGED = 0
ATTR_SIMPLE = 1
ATTR_ORDERED = 2
ATTR_HEAD_OF_QUEUE = 3
ATTR_ACA = 4

# SCSI Response (11.4.1) and Data-In (11.7.1): residual over/underflow, bidi residuals, status.
RSP_BIDI_OVERFLOW = 0x10
RSP_BIDI_UNDERFLOW = 0x08
RSP_OVERFLOW = 0x04
RSP_UNDERFLOW = 0x02
DATA_IN_ACK = 0x40
DATA_IN_STATUS = 0x01

# Login (11.12.1) and Text (11.10.1): continue, current and next stage. The Transit bit of a
# login PDU sits where other PDUs have F, so it is :attr:`Bhs.final` (and :attr:`Bhs.transit`).
CONTINUE = 0x40
LOGIN_CSG_SHIFT = 2
LOGIN_STAGE_MASK = 0x03

# -- login stages (11.12.3) ---------------------------------------------------------------------

STAGE_SECURITY = 0
STAGE_OPERATIONAL = 1
STAGE_FULL_FEATURE = 3

# -- login status classes and details (11.13.5) -------------------------------------------------

STATUS_SUCCESS = 0
STATUS_REDIRECTION = 1
STATUS_INITIATOR_ERROR = 2
STATUS_TARGET_ERROR = 3

DETAIL_SUCCESS = 0x00
DETAIL_TARGET_MOVED_TEMPORARILY = 0x01
DETAIL_TARGET_MOVED_PERMANENTLY = 0x02
DETAIL_INITIATOR_ERROR = 0x00
DETAIL_AUTHENTICATION_FAILURE = 0x01
DETAIL_AUTHORIZATION_FAILURE = 0x02
DETAIL_NOT_FOUND = 0x03
DETAIL_TARGET_REMOVED = 0x04
DETAIL_UNSUPPORTED_VERSION = 0x05
DETAIL_TOO_MANY_CONNECTIONS = 0x06
DETAIL_MISSING_PARAMETER = 0x07
DETAIL_CANT_INCLUDE_IN_SESSION = 0x08
DETAIL_SESSION_TYPE_NOT_SUPPORTED = 0x09
DETAIL_SESSION_DOES_NOT_EXIST = 0x0A
DETAIL_INVALID_DURING_LOGIN = 0x0B
DETAIL_TARGET_ERROR = 0x00
DETAIL_SERVICE_UNAVAILABLE = 0x01
DETAIL_OUT_OF_RESOURCES = 0x02

# -- reject reasons (11.17.1) -------------------------------------------------------------------

REJECT_DATA_DIGEST_ERROR = 0x02
REJECT_SNACK_REJECT = 0x03
REJECT_PROTOCOL_ERROR = 0x04
REJECT_COMMAND_NOT_SUPPORTED = 0x05
REJECT_IMMEDIATE_COMMAND = 0x06
REJECT_TASK_IN_PROGRESS = 0x07
REJECT_INVALID_DATA_ACK = 0x08
REJECT_INVALID_PDU_FIELD = 0x09
REJECT_LONG_OPERATION = 0x0A
REJECT_WAITING_FOR_LOGOUT = 0x0C

# -- AHS types (11.2.2) -------------------------------------------------------------------------

AHS_EXTENDED_CDB = 1
AHS_BIDI_READ_LENGTH = 2

# -- sizes and reserved values ------------------------------------------------------------------

BHS_SIZE = 48
TAIL_SIZE = 28
DIGEST_SIZE = 4
MAX_DATA_SEGMENT_LENGTH = (1 << 24) - 1
MAX_AHS_LENGTH = 255 * 4
RESERVED_TAG = 0xFFFFFFFF  # "no task tag" in ITT and TTT

# Byte offsets (in the BHS) of the 32-bit words of the opcode-specific tail.
OFF_TTT = 20  # Target Transfer Tag; Expected Data Transfer Length in SCSI Command; CID in login
OFF_CMD_SN = 24  # CmdSN in initiator PDUs, StatSN in target PDUs
OFF_EXP_STAT_SN = 28  # ExpStatSN in initiator PDUs, ExpCmdSN in target PDUs
OFF_MAX_CMD_SN = 32  # MaxCmdSN in target PDUs; start of the CDB in SCSI Command
OFF_DATA_SN = 36  # DataSN, R2TSN, ExpDataSN, login status class and detail
OFF_BUFFER_OFFSET = 40
OFF_RESIDUAL_COUNT = 44  # Residual Count; Desired Data Transfer Length in R2T
TAIL_OFFSETS = (20, 24, 28, 32, 36, 40, 44)

_BHS = struct.Struct(">BB2sBBHQI28s")
assert _BHS.size == BHS_SIZE


def _pad(n: int) -> int:
    """The bytes that bring ``n`` up to a multiple of 4: segments are padded on the wire."""
    return -n % 4


# -- CRC32C -------------------------------------------------------------------------------------


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli), as RFC 7143 digests use; computed in C (SSE 4.2 where the CPU has it)."""
    value: int = google_crc32c.value(data)
    return value


def digest_of(parts: Sequence[bytes | memoryview]) -> bytes:
    """:func:`digest` of the concatenation of ``parts``, without joining them."""
    crc = 0
    for part in parts:  # the C function takes bytes only: a view is copied (digests are rare)
        crc = google_crc32c.extend(crc, part if isinstance(part, bytes) else bytes(part))
    return int(crc).to_bytes(4, "little")


def digest(data: bytes) -> bytes:
    """The 4 digest bytes of ``data`` as sent on the wire (least significant byte first)."""
    return crc32c(data).to_bytes(4, "little")


# -- the Basic Header Segment -------------------------------------------------------------------


@dataclass(frozen=True)
class Bhs:
    """One Basic Header Segment, field by field; the lengths are filled in by :func:`build_pdu`.

    ``lun`` holds bytes 8-15 as an unsigned big-endian number whatever they mean for the opcode
    (a LUN, or ISID and TSIH in login PDUs); ``specific`` holds bytes 2-3 raw; ``tail`` bytes 20-47.
    """

    opcode: int
    immediate: bool = False
    final: bool = False
    flags: int = 0
    specific: bytes = b"\0\0"
    total_ahs_length: int = 0
    data_segment_length: int = 0
    lun: int = 0
    itt: int = 0
    tail: bytes = bytes(TAIL_SIZE)

    def __post_init__(self) -> None:
        if not 0 <= self.opcode <= OPCODE_MASK:
            raise ValueError(f"opcode {self.opcode:#x} does not fit in 6 bits")
        if not 0 <= self.flags <= FLAGS_MASK:
            raise ValueError(f"flags {self.flags:#x} do not fit in 7 bits")
        if len(self.specific) != 2 or len(self.tail) != TAIL_SIZE:
            raise ValueError("specific must be 2 bytes and tail 28 bytes")
        if not 0 <= self.total_ahs_length <= 255:
            raise ValueError(f"TotalAHSLength {self.total_ahs_length} is over 255 words")
        if not 0 <= self.data_segment_length <= MAX_DATA_SEGMENT_LENGTH:
            raise ValueError(f"DataSegmentLength {self.data_segment_length} is over 24 bits")
        if not 0 <= self.lun < 1 << 64 or not 0 <= self.itt < 1 << 32:
            raise ValueError("LUN must fit in 64 bits and ITT in 32 bits")

    def word(self, offset: int) -> int:
        """The 32-bit word at BHS byte ``offset`` (one of :data:`TAIL_OFFSETS`)."""
        if offset not in TAIL_OFFSETS:
            raise ValueError(f"no 32-bit tail word at offset {offset}")
        start = offset - 20
        return int.from_bytes(self.tail[start : start + 4], "big")

    # The words every PDU family shares, named by what they hold.
    @property
    def ttt(self) -> int:
        return self.word(OFF_TTT)

    @property
    def expected_data_transfer_length(self) -> int:
        return self.word(OFF_TTT)

    @property
    def cmd_sn(self) -> int:
        return self.word(OFF_CMD_SN)

    @property
    def stat_sn(self) -> int:
        return self.word(OFF_CMD_SN)

    @property
    def exp_stat_sn(self) -> int:
        return self.word(OFF_EXP_STAT_SN)

    @property
    def exp_cmd_sn(self) -> int:
        return self.word(OFF_EXP_STAT_SN)

    @property
    def max_cmd_sn(self) -> int:
        return self.word(OFF_MAX_CMD_SN)

    @property
    def data_sn(self) -> int:
        return self.word(OFF_DATA_SN)

    @property
    def r2t_sn(self) -> int:
        return self.word(OFF_DATA_SN)

    @property
    def exp_data_sn(self) -> int:
        return self.word(OFF_DATA_SN)

    @property
    def buffer_offset(self) -> int:
        return self.word(OFF_BUFFER_OFFSET)

    @property
    def residual_count(self) -> int:
        return self.word(OFF_RESIDUAL_COUNT)

    @property
    def desired_data_transfer_length(self) -> int:
        return self.word(OFF_RESIDUAL_COUNT)

    @property
    def cdb(self) -> bytes:
        """The 16-byte CDB of a SCSI Command (longer CDBs continue in an extended-CDB AHS)."""
        return self.tail[OFF_MAX_CMD_SN - 20 :]

    # Login request and response fields.
    @property
    def transit(self) -> bool:
        """The T bit of a login PDU: it sits where other PDUs have F."""
        return self.final

    @property
    def continue_(self) -> bool:
        """The C bit of login and text PDUs: more text follows in the next PDU."""
        return bool(self.flags & CONTINUE)

    @property
    def csg(self) -> int:
        return (self.flags >> LOGIN_CSG_SHIFT) & LOGIN_STAGE_MASK

    @property
    def nsg(self) -> int:
        return self.flags & LOGIN_STAGE_MASK

    @property
    def version_max(self) -> int:
        return self.specific[0]

    @property
    def version_min(self) -> int:
        """Version-min of a login request; Version-active in a login response."""
        return self.specific[1]

    @property
    def isid(self) -> bytes:
        return self.lun.to_bytes(8, "big")[:6]

    @property
    def tsih(self) -> int:
        return self.lun & 0xFFFF

    @property
    def cid(self) -> int:
        return self.word(OFF_TTT) >> 16

    @property
    def status_class(self) -> int:
        return self.tail[OFF_DATA_SN - 20]

    @property
    def status_detail(self) -> int:
        return self.tail[OFF_DATA_SN - 20 + 1]


def build_tail(words: Mapping[int, int], cdb: bytes = b"") -> bytes:
    """A 28-byte tail from 32-bit ``words`` keyed by BHS offset (``OFF_*``), and an optional CDB.

    The CDB, at most 16 bytes and zero-padded, fills offsets 32-47, so it excludes words there.
    """
    tail = bytearray(TAIL_SIZE)
    for offset, value in words.items():
        if offset not in TAIL_OFFSETS:
            raise ValueError(f"no 32-bit tail word at offset {offset}")
        if not 0 <= value < 1 << 32:
            raise ValueError(f"{value} does not fit the 32-bit word at offset {offset}")
        tail[offset - 20 : offset - 16] = value.to_bytes(4, "big")
    if cdb:
        if len(cdb) > 16 or any(o >= OFF_MAX_CMD_SN for o in words):
            raise ValueError("a CDB takes offsets 32-47 and at most 16 bytes")
        tail[OFF_MAX_CMD_SN - 20 : OFF_MAX_CMD_SN - 20 + len(cdb)] = cdb
    return bytes(tail)


def login_flags(*, csg: int, nsg: int, continue_: bool = False) -> int:
    """:attr:`Bhs.flags` of a login PDU: C, CSG and NSG (T goes in :attr:`Bhs.final`)."""
    if not (0 <= csg <= 3 and 0 <= nsg <= 3):
        raise ValueError("login stages are 2 bits")
    return (CONTINUE if continue_ else 0) | (csg << LOGIN_CSG_SHIFT) | nsg


def isid_tsih(isid: bytes, tsih: int) -> int:
    """Bytes 8-15 of a login PDU (the 6-byte ISID then the TSIH) as :attr:`Bhs.lun`."""
    if len(isid) != 6 or not 0 <= tsih <= 0xFFFF:
        raise ValueError("ISID is 6 bytes and TSIH 16 bits")
    return int.from_bytes(isid + tsih.to_bytes(2, "big"), "big")


def parse_bhs(b: bytes, *, max_data_segment_length: int = MAX_DATA_SEGMENT_LENGTH) -> Bhs:
    """The Basic Header Segment in exactly 48 bytes ``b``.

    ``max_data_segment_length`` is the receiver's MaxRecvDataSegmentLength: a PDU announcing more
    is refused here, before the caller reads (and buffers) its data segment.
    """
    if len(b) != BHS_SIZE:
        raise ProtocolViolation(f"a basic header segment is {BHS_SIZE} bytes, got {len(b)}")
    byte0, byte1, specific, ahs_words, dsl_high, dsl_low, lun, itt, tail = _BHS.unpack(b)
    data_segment_length = (dsl_high << 16) | dsl_low
    if data_segment_length > max_data_segment_length:
        raise ProtocolViolation(
            f"data segment of {data_segment_length} bytes is over the limit of {max_data_segment_length}"
        )
    return Bhs(
        opcode=byte0 & OPCODE_MASK,
        immediate=bool(byte0 & IMMEDIATE),
        final=bool(byte1 & FINAL),
        flags=byte1 & FLAGS_MASK,
        specific=specific,
        total_ahs_length=ahs_words,
        data_segment_length=data_segment_length,
        lun=lun,
        itt=itt,
        tail=tail,
    )


def _pack_bhs(bhs: Bhs) -> bytes:
    return _BHS.pack(
        bhs.opcode | (IMMEDIATE if bhs.immediate else 0),
        bhs.flags | (FINAL if bhs.final else 0),
        bhs.specific,
        bhs.total_ahs_length,
        bhs.data_segment_length >> 16,
        bhs.data_segment_length & 0xFFFF,
        bhs.lun,
        bhs.itt,
        bhs.tail,
    )


# -- AHS ----------------------------------------------------------------------------------------


def build_ahs(segments: Sequence[tuple[int, bytes]]) -> bytes:
    """Additional Header Segments from (AHSType, AHS-specific bytes) pairs, each padded to 4."""
    out = bytearray()
    for ahs_type, specific in segments:
        if not 0 <= ahs_type <= 0xFF or len(specific) > 0xFFFF:
            raise ValueError("AHSType is a byte and AHSLength 16 bits")
        out += struct.pack(">HB", len(specific), ahs_type) + specific
        out += bytes(_pad(3 + len(specific)))
    if len(out) > MAX_AHS_LENGTH:
        raise ValueError(f"AHS of {len(out)} bytes is over {MAX_AHS_LENGTH}")
    return bytes(out)


def parse_ahs(b: bytes) -> list[tuple[int, bytes]]:
    """The (AHSType, AHS-specific bytes) pairs of the AHS bytes ``b``; they must add up exactly."""
    segments = []
    pos = 0
    while pos < len(b):
        if pos + 3 > len(b):
            raise ProtocolViolation("truncated additional header segment")
        length, ahs_type = struct.unpack_from(">HB", b, pos)
        end = pos + 3 + length
        if end + _pad(3 + length) > len(b):
            raise ProtocolViolation(f"AHS of length {length} runs past TotalAHSLength")
        segments.append((ahs_type, b[pos + 3 : end]))
        pos = end + _pad(3 + length)
    return segments


# -- whole PDUs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pdu:
    """One PDU: its header, its AHS bytes (a multiple of 4) and its data segment (unpadded)."""

    bhs: Bhs
    ahs: bytes = b""
    data: bytes = b""


def build_header(bhs: Bhs, ahs: bytes = b"", *, data_length: int, header_digest: bool = False) -> bytes:
    """The header of a PDU on the wire (BHS, AHS, header digest) for a data segment of
    ``data_length`` bytes, which the caller writes after it: padded, then its digest if any."""
    if len(ahs) % 4 or len(ahs) > MAX_AHS_LENGTH:
        raise ValueError("AHS must be a multiple of 4 bytes, at most 1020")
    if data_length > MAX_DATA_SEGMENT_LENGTH:
        raise ValueError(f"data segment of {data_length} bytes is over 24 bits")
    header = _pack_bhs(replace(bhs, total_ahs_length=len(ahs) // 4, data_segment_length=data_length)) + ahs
    return header + digest(header) if header_digest else header


def padding(data_length: int) -> bytes:
    """The zero bytes that follow a data segment of ``data_length`` bytes on the wire."""
    return bytes(_pad(data_length))


def build_pdu(pdu: Pdu, *, header_digest: bool = False, data_digest: bool = False) -> bytes:
    """The bytes of ``pdu`` on the wire; TotalAHSLength and DataSegmentLength come from its
    segments (whatever its header says), the data is padded with zeros, digests appended."""
    parts = [build_header(pdu.bhs, pdu.ahs, data_length=len(pdu.data), header_digest=header_digest)]
    if pdu.data:
        padded = pdu.data + padding(len(pdu.data))
        parts.append(padded)
        if data_digest:
            parts.append(digest(padded))
    return b"".join(parts)


def remaining_length(bhs: Bhs, *, header_digest: bool, data_digest: bool) -> int:
    """How many bytes follow the BHS of this PDU on the wire: what a reader reads next."""
    n = bhs.total_ahs_length * 4 + (DIGEST_SIZE if header_digest else 0)
    if bhs.data_segment_length:
        n += bhs.data_segment_length + _pad(bhs.data_segment_length)
        n += DIGEST_SIZE if data_digest else 0
    return n


def parse_pdu(
    b: bytes,
    *,
    header_digest: bool = False,
    data_digest: bool = False,
    max_data_segment_length: int = MAX_DATA_SEGMENT_LENGTH,
) -> Pdu:
    """The PDU in exactly the bytes ``b``, digests checked, AHS checked to be well formed.

    A header digest error means the connection can no longer find PDU boundaries
    (:class:`HeaderDigestError`); a data digest error is answered with a Reject and the PDU
    dropped (:class:`DataDigestError`).
    """
    bhs = parse_bhs(b[:BHS_SIZE], max_data_segment_length=max_data_segment_length)
    expected = BHS_SIZE + remaining_length(bhs, header_digest=header_digest, data_digest=data_digest)
    if len(b) != expected:
        raise ProtocolViolation(f"PDU is {len(b)} bytes, its header announces {expected}")
    pos = BHS_SIZE + bhs.total_ahs_length * 4
    ahs = b[BHS_SIZE:pos]
    if header_digest:
        if b[pos : pos + DIGEST_SIZE] != digest(b[:pos]):
            raise HeaderDigestError(f"opcode {bhs.opcode:#04x}, ITT {bhs.itt:#010x}")
        pos += DIGEST_SIZE
    parse_ahs(ahs)
    end = pos + bhs.data_segment_length + _pad(bhs.data_segment_length)
    data = b[pos : pos + bhs.data_segment_length]
    if data_digest and bhs.data_segment_length and b[end:] != digest(b[pos:end]):
        raise DataDigestError(f"opcode {bhs.opcode:#04x}, ITT {bhs.itt:#010x}")
    return Pdu(bhs=bhs, ahs=ahs, data=data)
