"""The NBD wire format: constants and pure build/parse functions, no I/O.

Everything is big-endian (network order), as the protocol (NetworkBlockDevice/nbd
``doc/proto.md``) says. Builders take Python values and return bytes; parsers take exactly the
bytes of one message (the caller reads the fixed-size header first, then the length it announces)
and raise :class:`ProtocolViolation` for anything a peer must not send: a wrong magic, a length
over the caps below, a payload that does not add up, an unknown reply or info type. A parser
never trusts a length field to allocate memory: lengths are checked against the caps before the
caller reads the payload.

Values the receiver must still answer to are *not* violations: an unknown option is answered with
``NBD_REP_ERR_UNSUP`` and an unknown command with ``EINVAL``, so :func:`parse_option_header` and
:func:`parse_request` return their numbers as they are.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dingyuan.errors import ExportError


class ProtocolViolation(ExportError):
    """NBD protocol violation: {detail}"""


# -- magics -----------------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"; also the magic of every option request
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- handshake flags (server, 16 bits) and client flags (32 bits) ------------------------------

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# -- transmission flags (16 bits) --------------------------------------------------------------

FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# -- options ------------------------------------------------------------------------------------

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# -- option reply types ---------------------------------------------------------------------------

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR + 1
REP_ERR_POLICY = _REP_ERR + 2
REP_ERR_INVALID = _REP_ERR + 3
REP_ERR_PLATFORM = _REP_ERR + 4
REP_ERR_TLS_REQD = _REP_ERR + 5
REP_ERR_UNKNOWN = _REP_ERR + 6
REP_ERR_SHUTDOWN = _REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
REP_ERR_TOO_BIG = _REP_ERR + 9
REPLY_TYPES = frozenset(
    {REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT} | {_REP_ERR + n for n in range(1, 10)}
)

# -- NBD_REP_INFO types -------------------------------------------------------------------------

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- commands and command flags -------------------------------------------------------------------

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# -- structured reply flags and types -------------------------------------------------------------

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# -- errors (the protocol's own numbers, equal to Linux errno values) -----------------------------

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# -- metadata context base:allocation ------------------------------------------------------------

META_BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# -- limits ----------------------------------------------------------------------------------------

#: the largest option payload accepted (an option carries names and queries, never data)
MAX_OPTION_LENGTH = 64 << 10
#: the largest string (export name, query, message) the protocol allows
MAX_STRING = 4096
#: the largest request payload (WRITE) and read length served: 2^25, the size the protocol says
#: every peer must accept without calling it a denial of service
MAX_PAYLOAD = 32 << 20

# -- fixed layouts ----------------------------------------------------------------------------------

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (then 124 zero bytes)
EXPORT_NAME_PADDING = 124
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_OFFSET_HOLE = struct.Struct(">QI")
_ERROR_HEAD = struct.Struct(">IH")
_DESCRIPTOR = struct.Struct(">II")

assert GREETING.size == 18 and OPTION_HEADER.size == 16 and OPTION_REPLY_HEADER.size == 20
assert REQUEST.size == 28 and SIMPLE_REPLY.size == 16 and STRUCTURED_HEADER.size == 20


def _need(data: bytes, size: int, what: str) -> None:
    if len(data) != size:
        raise ProtocolViolation(f"{what} is {len(data)} bytes, not {size}")


def _string(raw: bytes, what: str) -> str:
    """A protocol string: UTF-8, no NUL, at most 4096 bytes."""
    if len(raw) > MAX_STRING:
        raise ProtocolViolation(f"{what} is {len(raw)} bytes long, over {MAX_STRING}")
    if b"\0" in raw:
        raise ProtocolViolation(f"{what} contains a NUL byte")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(f"{what} is not UTF-8") from None


def _encode(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING or b"\0" in raw:
        raise ProtocolViolation(f"{what} is not a protocol string (at most {MAX_STRING} bytes, no NUL)")
    return raw


# -- handshake ---------------------------------------------------------------------------------------


def build_greeting(flags: int) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def parse_greeting(data: bytes) -> int:
    """The server's handshake flags."""
    _need(data, GREETING.size, "greeting")
    magic, opt_magic, flags = GREETING.unpack(data)
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        raise ProtocolViolation(f"greeting magic {magic:#x}/{opt_magic:#x} is not newstyle NBD")
    return int(flags)


def build_client_flags(flags: int) -> bytes:
    return CLIENT_FLAGS.pack(flags)


def parse_client_flags(data: bytes) -> int:
    """The client's flags; an unknown flag is a violation (the server must then hang up)."""
    _need(data, CLIENT_FLAGS.size, "client flags")
    (flags,) = CLIENT_FLAGS.unpack(data)
    if flags & ~CLIENT_FLAGS_KNOWN:
        raise ProtocolViolation(f"unknown client flags {flags:#x}")
    return int(flags)


def build_option(option: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def parse_option_header(data: bytes) -> tuple[int, int]:
    """``(option, length)`` of an option request; the length is capped at MAX_OPTION_LENGTH."""
    _need(data, OPTION_HEADER.size, "option header")
    magic, option, length = OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolViolation(f"option magic {magic:#x} is not IHAVEOPT")
    if length > MAX_OPTION_LENGTH:
        raise ProtocolViolation(f"option {option} announces {length} bytes, over {MAX_OPTION_LENGTH}")
    return int(option), int(length)


def build_option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def parse_option_reply_header(data: bytes) -> tuple[int, int, int]:
    """``(option, reply type, length)`` of an option reply."""
    _need(data, OPTION_REPLY_HEADER.size, "option reply header")
    magic, option, reply_type, length = OPTION_REPLY_HEADER.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise ProtocolViolation(f"option reply magic {magic:#x} is wrong")
    if reply_type not in REPLY_TYPES:
        raise ProtocolViolation(f"unknown option reply type {reply_type:#x}")
    if length > MAX_OPTION_LENGTH:
        raise ProtocolViolation(f"option reply announces {length} bytes, over {MAX_OPTION_LENGTH}")
    return int(option), int(reply_type), int(length)


def build_export_name(name: str) -> bytes:
    """The payload of NBD_OPT_EXPORT_NAME: the bare name."""
    return _encode(name, "export name")


def parse_export_name(data: bytes) -> str:
    return _string(data, "export name")


def build_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """The answer to NBD_OPT_EXPORT_NAME (it has no option-reply header)."""
    reply = EXPORT_NAME_REPLY.pack(size, flags)
    return reply if no_zeroes else reply + bytes(EXPORT_NAME_PADDING)


def parse_export_name_reply(data: bytes) -> tuple[int, int]:
    """``(size, transmission flags)``, with or without the 124 zero bytes."""
    if len(data) not in (EXPORT_NAME_REPLY.size, EXPORT_NAME_REPLY.size + EXPORT_NAME_PADDING):
        raise ProtocolViolation(f"export name reply is {len(data)} bytes")
    size, flags = EXPORT_NAME_REPLY.unpack_from(data)
    return int(size), int(flags)


# -- option payloads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InfoRequest:
    """The payload of NBD_OPT_INFO and NBD_OPT_GO: an export name and the NBD_INFO_* wanted."""

    name: str
    requests: tuple[int, ...] = ()


def build_info_request(request: InfoRequest) -> bytes:
    raw = _encode(request.name, "export name")
    items = b"".join(_U16.pack(r) for r in request.requests)
    return _U32.pack(len(raw)) + raw + _U16.pack(len(request.requests)) + items


def parse_info_request(data: bytes) -> InfoRequest:
    if len(data) < 6:
        raise ProtocolViolation(f"info request is {len(data)} bytes, under 6")
    (name_len,) = _U32.unpack_from(data)
    if name_len > len(data) - 6:
        raise ProtocolViolation(f"export name length {name_len} overruns the option")
    name = _string(data[4 : 4 + name_len], "export name")
    (count,) = _U16.unpack_from(data, 4 + name_len)
    rest = data[6 + name_len :]
    if len(rest) != 2 * count:
        raise ProtocolViolation(f"{count} info requests need {2 * count} bytes, got {len(rest)}")
    return InfoRequest(name, tuple(_U16.unpack_from(rest, 2 * i)[0] for i in range(count)))


@dataclass(frozen=True)
class MetaContextRequest:
    """The payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT."""

    name: str
    queries: tuple[str, ...] = ()


def build_meta_context_request(request: MetaContextRequest) -> bytes:
    raw = _encode(request.name, "export name")
    parts = [_U32.pack(len(raw)), raw, _U32.pack(len(request.queries))]
    for query in request.queries:
        q = _encode(query, "query")
        parts += [_U32.pack(len(q)), q]
    return b"".join(parts)


def parse_meta_context_request(data: bytes) -> MetaContextRequest:
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n > len(data) - pos:
            raise ProtocolViolation(f"{what} overruns the option")
        pos += n
        return data[pos - n : pos]

    (name_len,) = _U32.unpack(take(4, "export name length"))
    name = _string(take(name_len, "export name"), "export name")
    (count,) = _U32.unpack(take(4, "query count"))
    if count > len(data) // 4:
        raise ProtocolViolation(f"{count} queries cannot fit in {len(data)} bytes")
    queries = []
    for _ in range(count):
        (query_len,) = _U32.unpack(take(4, "query length"))
        queries.append(_string(take(query_len, "query"), "query"))
    if pos != len(data):
        raise ProtocolViolation(f"{len(data) - pos} bytes after the last query")
    return MetaContextRequest(name, tuple(queries))


def build_rep_server(name: str, details: str = "") -> bytes:
    raw = _encode(name, "export name")
    return _U32.pack(len(raw)) + raw + _encode(details, "export details")


def parse_rep_server(data: bytes) -> tuple[str, str]:
    """``(name, details)`` of an NBD_REP_SERVER reply."""
    if len(data) < 4:
        raise ProtocolViolation("NBD_REP_SERVER reply is shorter than 4 bytes")
    (name_len,) = _U32.unpack_from(data)
    if name_len > len(data) - 4:
        raise ProtocolViolation(f"export name length {name_len} overruns the reply")
    return (
        _string(data[4 : 4 + name_len], "export name"),
        _string(data[4 + name_len :], "export details"),
    )


def build_rep_meta_context(context_id: int, name: str) -> bytes:
    return _U32.pack(context_id) + _encode(name, "context name")


def parse_rep_meta_context(data: bytes) -> tuple[int, str]:
    if len(data) < 4:
        raise ProtocolViolation("NBD_REP_META_CONTEXT reply is shorter than 4 bytes")
    (context_id,) = _U32.unpack_from(data)
    return int(context_id), _string(data[4:], "context name")


@dataclass(frozen=True)
class InfoExport:
    size: int
    flags: int


@dataclass(frozen=True)
class InfoName:
    name: str


@dataclass(frozen=True)
class InfoDescription:
    description: str


@dataclass(frozen=True)
class InfoBlockSize:
    minimum: int
    preferred: int
    maximum: int


Info = InfoExport | InfoName | InfoDescription | InfoBlockSize


def build_info(info: Info) -> bytes:
    """The payload of one NBD_REP_INFO reply."""
    if isinstance(info, InfoExport):
        return _INFO_EXPORT.pack(INFO_EXPORT, info.size, info.flags)
    if isinstance(info, InfoName):
        return _U16.pack(INFO_NAME) + _encode(info.name, "export name")
    if isinstance(info, InfoDescription):
        return _U16.pack(INFO_DESCRIPTION) + _encode(info.description, "description")
    return _INFO_BLOCK_SIZE.pack(INFO_BLOCK_SIZE, info.minimum, info.preferred, info.maximum)


def parse_info(data: bytes) -> Info:
    if len(data) < 2:
        raise ProtocolViolation("NBD_REP_INFO reply is shorter than 2 bytes")
    (kind,) = _U16.unpack_from(data)
    if kind == INFO_EXPORT:
        _need(data, _INFO_EXPORT.size, "NBD_INFO_EXPORT")
        _, size, flags = _INFO_EXPORT.unpack(data)
        return InfoExport(size, flags)
    if kind == INFO_NAME:
        return InfoName(_string(data[2:], "export name"))
    if kind == INFO_DESCRIPTION:
        return InfoDescription(_string(data[2:], "description"))
    if kind == INFO_BLOCK_SIZE:
        _need(data, _INFO_BLOCK_SIZE.size, "NBD_INFO_BLOCK_SIZE")
        _, minimum, preferred, maximum = _INFO_BLOCK_SIZE.unpack(data)
        return InfoBlockSize(minimum, preferred, maximum)
    raise ProtocolViolation(f"unknown info type {kind}")


# -- transmission ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def build_request(request: Request) -> bytes:
    return REQUEST.pack(
        REQUEST_MAGIC, request.flags, request.type, request.cookie, request.offset, request.length
    )


def parse_request(data: bytes) -> Request:
    """A request header; its type and flags are checked by the server (EINVAL, not a violation)."""
    _need(data, REQUEST.size, "request header")
    magic, flags, kind, cookie, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolViolation(f"request magic {magic:#x} is wrong")
    return Request(flags, kind, cookie, offset, length)


def build_simple_reply(error: int, cookie: int) -> bytes:
    """The header of a simple reply; a successful READ's data follows it."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def parse_simple_reply(data: bytes) -> tuple[int, int]:
    """``(error, cookie)``."""
    _need(data, SIMPLE_REPLY.size, "simple reply")
    magic, error, cookie = SIMPLE_REPLY.unpack(data)
    if magic != SIMPLE_REPLY_MAGIC:
        raise ProtocolViolation(f"simple reply magic {magic:#x} is wrong")
    return int(error), int(cookie)


@dataclass(frozen=True)
class ChunkHeader:
    flags: int
    type: int
    cookie: int
    length: int

    @property
    def done(self) -> bool:
        return bool(self.flags & REPLY_FLAG_DONE)


_CHUNK_TYPES = frozenset(
    {
        REPLY_TYPE_NONE,
        REPLY_TYPE_OFFSET_DATA,
        REPLY_TYPE_OFFSET_HOLE,
        REPLY_TYPE_BLOCK_STATUS,
        REPLY_TYPE_ERROR,
        REPLY_TYPE_ERROR_OFFSET,
    }
)


def _chunk(flags: int, kind: int, cookie: int, length: int) -> bytes:
    return STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)


def parse_chunk_header(data: bytes) -> ChunkHeader:
    _need(data, STRUCTURED_HEADER.size, "structured reply header")
    magic, flags, kind, cookie, length = STRUCTURED_HEADER.unpack(data)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise ProtocolViolation(f"structured reply magic {magic:#x} is wrong")
    if kind not in _CHUNK_TYPES:
        raise ProtocolViolation(f"unknown structured reply type {kind:#x}")
    if length > MAX_PAYLOAD + _U64.size:
        raise ProtocolViolation(f"structured reply announces {length} bytes, over the maximum")
    return ChunkHeader(flags, kind, cookie, length)


def build_none(cookie: int) -> bytes:
    """The final, empty chunk of a successful structured reply."""
    return _chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)


def build_offset_data_header(cookie: int, offset: int, length: int, done: bool = False) -> bytes:
    """Header and offset of an OFFSET_DATA chunk; its ``length`` bytes of data follow, sent
    separately so a large read is not copied once more."""
    if length < 1:
        raise ProtocolViolation("an OFFSET_DATA chunk carries at least one byte")
    flags = REPLY_FLAG_DONE if done else 0
    return _chunk(flags, REPLY_TYPE_OFFSET_DATA, cookie, 8 + length) + _U64.pack(offset)


def build_offset_hole(cookie: int, offset: int, length: int, done: bool = False) -> bytes:
    if length < 1:
        raise ProtocolViolation("an OFFSET_HOLE chunk covers at least one byte")
    flags = REPLY_FLAG_DONE if done else 0
    return _chunk(flags, REPLY_TYPE_OFFSET_HOLE, cookie, _OFFSET_HOLE.size) + _OFFSET_HOLE.pack(
        offset, length
    )


def build_error(
    cookie: int, error: int, message: str = "", done: bool = True, offset: int | None = None
) -> bytes:
    """An ERROR chunk, or an ERROR_OFFSET chunk when the failing ``offset`` is given."""
    if error == 0:
        raise ProtocolViolation("an error chunk needs a nonzero error")
    raw = _encode(message, "error message")
    body = _ERROR_HEAD.pack(error, len(raw)) + raw
    kind = REPLY_TYPE_ERROR
    if offset is not None:
        body += _U64.pack(offset)
        kind = REPLY_TYPE_ERROR_OFFSET
    return _chunk(REPLY_FLAG_DONE if done else 0, kind, cookie, len(body)) + body


def build_block_status(
    cookie: int, context_id: int, descriptors: list[tuple[int, int]], done: bool = True
) -> bytes:
    """A BLOCK_STATUS chunk: ``descriptors`` are ``(length, status flags)``, at least one."""
    if not descriptors or any(length < 1 for length, _ in descriptors):
        raise ProtocolViolation("a block status chunk needs descriptors of nonzero length")
    body = _U32.pack(context_id) + b"".join(_DESCRIPTOR.pack(n, s) for n, s in descriptors)
    flags = REPLY_FLAG_DONE if done else 0
    return _chunk(flags, REPLY_TYPE_BLOCK_STATUS, cookie, len(body)) + body


@dataclass(frozen=True)
class OffsetData:
    offset: int
    data: bytes


@dataclass(frozen=True)
class OffsetHole:
    offset: int
    length: int


@dataclass(frozen=True)
class ErrorChunk:
    error: int
    message: str
    offset: int | None = None


@dataclass(frozen=True)
class BlockStatus:
    context_id: int
    descriptors: tuple[tuple[int, int], ...]


Chunk = OffsetData | OffsetHole | ErrorChunk | BlockStatus | None


def parse_chunk_payload(header: ChunkHeader, payload: bytes) -> Chunk:
    """The payload of one structured chunk; None for NBD_REPLY_TYPE_NONE."""
    _need(payload, header.length, "structured reply payload")
    kind = header.type
    if kind == REPLY_TYPE_NONE:
        if payload or not header.done:
            raise ProtocolViolation("a NONE chunk must be empty and final")
        return None
    if kind == REPLY_TYPE_OFFSET_DATA:
        if len(payload) < 9:
            raise ProtocolViolation("an OFFSET_DATA chunk is shorter than 9 bytes")
        return OffsetData(_U64.unpack_from(payload)[0], payload[8:])
    if kind == REPLY_TYPE_OFFSET_HOLE:
        _need(payload, _OFFSET_HOLE.size, "OFFSET_HOLE payload")
        offset, length = _OFFSET_HOLE.unpack(payload)
        if length == 0:
            raise ProtocolViolation("an OFFSET_HOLE chunk covers no byte")
        return OffsetHole(offset, length)
    if kind == REPLY_TYPE_BLOCK_STATUS:
        if len(payload) < 12 or (len(payload) - 4) % 8:
            raise ProtocolViolation(f"a BLOCK_STATUS payload of {len(payload)} bytes is malformed")
        (context_id,) = _U32.unpack_from(payload)
        descriptors = tuple((int(n), int(s)) for n, s in _DESCRIPTOR.iter_unpack(payload[4:]))
        if any(n == 0 for n, _ in descriptors):
            raise ProtocolViolation("a block status descriptor has length zero")
        return BlockStatus(context_id, descriptors)
    # an error chunk
    if len(payload) < _ERROR_HEAD.size:
        raise ProtocolViolation("an error chunk is shorter than 6 bytes")
    error, message_len = _ERROR_HEAD.unpack_from(payload)
    tail = 8 if kind == REPLY_TYPE_ERROR_OFFSET else 0
    if error == 0 or _ERROR_HEAD.size + message_len + tail != len(payload):
        raise ProtocolViolation("an error chunk's error or message length is wrong")
    message = _string(payload[_ERROR_HEAD.size : _ERROR_HEAD.size + message_len], "error message")
    offset = _U64.unpack_from(payload, len(payload) - 8)[0] if tail else None
    return ErrorChunk(error, message, offset)
