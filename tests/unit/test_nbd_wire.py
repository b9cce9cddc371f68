"""The NBD wire format: every message builds and parses back to itself, and malformed input is
rejected with ProtocolViolation (an ExportError), never another exception."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dingyuan.errors import ExportError
from dingyuan.exports.nbd import wire

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
names = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=40)


def test_protocol_violation_is_an_export_error() -> None:
    assert issubclass(wire.ProtocolViolation, ExportError)


@given(u16)
def test_greeting_round_trip(flags: int) -> None:
    data = wire.build_greeting(flags)
    assert data[:16] == b"NBDMAGICIHAVEOPT"
    assert wire.parse_greeting(data) == flags


@given(st.integers(0, wire.CLIENT_FLAGS_KNOWN))
def test_client_flags_round_trip(flags: int) -> None:
    assert wire.parse_client_flags(wire.build_client_flags(flags)) == flags


@given(st.integers(wire.CLIENT_FLAGS_KNOWN + 1, 2**32 - 1))
def test_unknown_client_flags_are_rejected(flags: int) -> None:
    with pytest.raises(wire.ProtocolViolation):
        wire.parse_client_flags(wire.build_client_flags(flags))


@given(u32, st.binary(max_size=300))
def test_option_round_trip(option: int, data: bytes) -> None:
    raw = wire.build_option(option, data)
    assert wire.parse_option_header(raw[:16]) == (option, len(data))
    assert raw[16:] == data


@given(u32, st.sampled_from(sorted(wire.REPLY_TYPES)), st.binary(max_size=300))
def test_option_reply_round_trip(option: int, reply_type: int, data: bytes) -> None:
    raw = wire.build_option_reply(option, reply_type, data)
    assert wire.parse_option_reply_header(raw[:20]) == (option, reply_type, len(data))
    assert raw[20:] == data


@given(names)
def test_export_name_round_trip(name: str) -> None:
    assert wire.parse_export_name(wire.build_export_name(name)) == name


@given(u64, u16, st.booleans())
def test_export_name_reply_round_trip(size: int, flags: int, no_zeroes: bool) -> None:
    raw = wire.build_export_name_reply(size, flags, no_zeroes)
    assert len(raw) == (10 if no_zeroes else 134)
    assert wire.parse_export_name_reply(raw) == (size, flags)


@given(names, st.lists(u16, max_size=8))
def test_info_request_round_trip(name: str, requests: list[int]) -> None:
    request = wire.InfoRequest(name, tuple(requests))
    assert wire.parse_info_request(wire.build_info_request(request)) == request


@given(names, st.lists(names, max_size=5))
def test_meta_context_request_round_trip(name: str, queries: list[str]) -> None:
    request = wire.MetaContextRequest(name, tuple(queries))
    assert wire.parse_meta_context_request(wire.build_meta_context_request(request)) == request


@given(names, names)
def test_rep_server_round_trip(name: str, details: str) -> None:
    assert wire.parse_rep_server(wire.build_rep_server(name, details)) == (name, details)


@given(u32, names)
def test_rep_meta_context_round_trip(context_id: int, name: str) -> None:
    assert wire.parse_rep_meta_context(wire.build_rep_meta_context(context_id, name)) == (context_id, name)


infos = st.one_of(
    st.builds(wire.InfoExport, u64, u16),
    st.builds(wire.InfoName, names),
    st.builds(wire.InfoDescription, names),
    st.builds(wire.InfoBlockSize, u32, u32, u32),
)


@given(infos)
def test_info_round_trip(info: wire.Info) -> None:
    assert wire.parse_info(wire.build_info(info)) == info


requests = st.builds(wire.Request, u16, u16, u64, u64, u32)


@given(requests)
def test_request_round_trip(request: wire.Request) -> None:
    raw = wire.build_request(request)
    assert len(raw) == 28
    assert wire.parse_request(raw) == request


@given(u32, u64)
def test_simple_reply_round_trip(error: int, cookie: int) -> None:
    assert wire.parse_simple_reply(wire.build_simple_reply(error, cookie)) == (error, cookie)


def _parse_chunk(raw: bytes) -> tuple[wire.ChunkHeader, wire.Chunk]:
    header = wire.parse_chunk_header(raw[:20])
    return header, wire.parse_chunk_payload(header, raw[20:])


@given(u64)
def test_none_chunk_round_trip(cookie: int) -> None:
    header, chunk = _parse_chunk(wire.build_none(cookie))
    assert (header.cookie, header.done, header.type, chunk) == (cookie, True, wire.REPLY_TYPE_NONE, None)


@given(u64, u64, st.binary(min_size=1, max_size=600), st.booleans())
def test_offset_data_round_trip(cookie: int, offset: int, data: bytes, done: bool) -> None:
    raw = wire.build_offset_data_header(cookie, offset, len(data), done) + data
    header, chunk = _parse_chunk(raw)
    assert (header.cookie, header.done) == (cookie, done)
    assert chunk == wire.OffsetData(offset, data)


@given(u64, u64, st.integers(1, 2**32 - 1), st.booleans())
def test_offset_hole_round_trip(cookie: int, offset: int, length: int, done: bool) -> None:
    header, chunk = _parse_chunk(wire.build_offset_hole(cookie, offset, length, done))
    assert (header.cookie, header.done, chunk) == (cookie, done, wire.OffsetHole(offset, length))


@given(u64, st.integers(1, 2**32 - 1), names, st.one_of(st.none(), u64))
def test_error_chunk_round_trip(cookie: int, error: int, message: str, offset: int | None) -> None:
    header, chunk = _parse_chunk(wire.build_error(cookie, error, message, offset=offset))
    assert header.done and header.cookie == cookie
    assert chunk == wire.ErrorChunk(error, message, offset)


@given(u64, u32, st.lists(st.tuples(st.integers(1, 2**32 - 1), u32), min_size=1, max_size=20))
def test_block_status_round_trip(cookie: int, context_id: int, descriptors: list[tuple[int, int]]) -> None:
    header, chunk = _parse_chunk(wire.build_block_status(cookie, context_id, descriptors))
    assert header.cookie == cookie
    assert chunk == wire.BlockStatus(context_id, tuple(descriptors))


# -- malformed input -------------------------------------------------------------------------------


def _flip_magic(raw: bytes) -> bytes:
    return bytes([raw[0] ^ 0xFF]) + raw[1:]


@pytest.mark.parametrize(
    ("parse", "raw"),
    [
        (wire.parse_greeting, wire.build_greeting(3)),
        (wire.parse_option_header, wire.build_option(7)),
        (wire.parse_option_reply_header, wire.build_option_reply(7, wire.REP_ACK)),
        (wire.parse_request, wire.build_request(wire.Request(0, 0, 1, 0, 512))),
        (wire.parse_simple_reply, wire.build_simple_reply(0, 1)),
        (wire.parse_chunk_header, wire.build_none(1)),
    ],
)
def test_bad_magic_is_rejected(parse: object, raw: bytes) -> None:
    assert callable(parse)
    with pytest.raises(wire.ProtocolViolation, match="magic"):
        parse(_flip_magic(raw))


@given(st.binary(max_size=40))
def test_fixed_headers_reject_every_wrong_length(data: bytes) -> None:
    for parse, size in [
        (wire.parse_greeting, 18),
        (wire.parse_client_flags, 4),
        (wire.parse_option_header, 16),
        (wire.parse_option_reply_header, 20),
        (wire.parse_request, 28),
        (wire.parse_simple_reply, 16),
        (wire.parse_chunk_header, 20),
    ]:
        if len(data) != size:
            with pytest.raises(wire.ProtocolViolation):
                parse(data)


@given(st.integers(wire.MAX_OPTION_LENGTH + 1, 2**32 - 1))
def test_oversized_option_is_rejected_before_its_payload_is_read(length: int) -> None:
    with pytest.raises(wire.ProtocolViolation, match="over"):
        wire.parse_option_header(struct.pack(">QII", wire.IHAVEOPT, wire.OPT_GO, length))


def test_unknown_types_are_rejected() -> None:
    with pytest.raises(wire.ProtocolViolation, match="reply type"):
        wire.parse_option_reply_header(struct.pack(">QIII", wire.OPTION_REPLY_MAGIC, 7, 99, 0))
    with pytest.raises(wire.ProtocolViolation, match="structured reply type"):
        wire.parse_chunk_header(struct.pack(">IHHQI", wire.STRUCTURED_REPLY_MAGIC, 1, 77, 1, 0))
    with pytest.raises(wire.ProtocolViolation, match="info type"):
        wire.parse_info(struct.pack(">H", 9) + b"x")


def test_unknown_options_and_commands_are_left_to_the_server() -> None:
    """Not violations: the server answers them with NBD_REP_ERR_UNSUP and EINVAL."""
    assert wire.parse_option_header(wire.build_option(4242)) == (4242, 0)
    assert wire.parse_request(wire.build_request(wire.Request(0x8000, 99, 1, 2, 3))).type == 99


@given(st.binary(max_size=64))
def test_option_payload_parsers_reject_garbage_cleanly(data: bytes) -> None:
    """Arbitrary bytes either parse or raise ProtocolViolation; nothing else escapes."""
    for parse in (
        wire.parse_info_request,
        wire.parse_meta_context_request,
        wire.parse_export_name,
        wire.parse_rep_server,
        wire.parse_rep_meta_context,
        wire.parse_info,
    ):
        with contextlib.suppress(wire.ProtocolViolation):
            parse(data)


@pytest.mark.parametrize(
    "data",
    [
        struct.pack(">I", 10) + b"abc" + struct.pack(">H", 0),  # name overruns the option
        struct.pack(">I", 1) + b"a" + struct.pack(">H", 2) + b"\0\0",  # 2 requests, 1 present
        struct.pack(">I", 1) + b"\0" + struct.pack(">H", 0),  # NUL in the name
        struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0),  # not UTF-8
    ],
)
def test_malformed_info_requests_are_rejected(data: bytes) -> None:
    with pytest.raises(wire.ProtocolViolation):
        wire.parse_info_request(data)


@pytest.mark.parametrize(
    "data",
    [
        struct.pack(">II", 0, 1),  # one query announced, none present
        struct.pack(">III", 0, 1, 50) + b"base:",  # query overruns the option
        struct.pack(">II", 0, 0) + b"x",  # trailing byte
        struct.pack(">II", 0, 2**32 - 1),  # absurd query count
        struct.pack(">I", 5000) + b"a" * 5000 + struct.pack(">I", 0),  # name over 4096 bytes
    ],
)
def test_malformed_meta_context_requests_are_rejected(data: bytes) -> None:
    with pytest.raises(wire.ProtocolViolation):
        wire.parse_meta_context_request(data)


def test_malformed_chunks_are_rejected() -> None:
    def chunk(kind: int, payload: bytes, flags: int = 1) -> None:
        header = wire.parse_chunk_header(
            struct.pack(">IHHQI", wire.STRUCTURED_REPLY_MAGIC, flags, kind, 1, len(payload))
        )
        wire.parse_chunk_payload(header, payload)

    bad = [
        (wire.REPLY_TYPE_NONE, b"x"),
        (wire.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 0)),  # no data byte
        (wire.REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", 0, 0)),  # empty hole
        (wire.REPLY_TYPE_BLOCK_STATUS, struct.pack(">I", 1)),  # no descriptor
        (wire.REPLY_TYPE_BLOCK_STATUS, struct.pack(">III", 1, 0, 0)),  # zero-length descriptor
        (wire.REPLY_TYPE_ERROR, struct.pack(">IH", 0, 0)),  # error 0
        (wire.REPLY_TYPE_ERROR, struct.pack(">IH", 5, 9) + b"abc"),  # message overruns
    ]
    for kind, payload in bad:
        with pytest.raises(wire.ProtocolViolation):
            chunk(kind, payload)
    with pytest.raises(wire.ProtocolViolation):
        chunk(wire.REPLY_TYPE_NONE, b"", flags=0)  # NONE must be final


def test_builders_refuse_what_the_protocol_forbids() -> None:
    with pytest.raises(wire.ProtocolViolation):
        wire.build_export_name("a\0b")
    with pytest.raises(wire.ProtocolViolation):
        wire.build_export_name("x" * 4097)
    with pytest.raises(wire.ProtocolViolation):
        wire.build_error(1, 0)
    with pytest.raises(wire.ProtocolViolation):
        wire.build_block_status(1, 1, [])
    with pytest.raises(wire.ProtocolViolation):
        wire.build_offset_hole(1, 0, 0)
