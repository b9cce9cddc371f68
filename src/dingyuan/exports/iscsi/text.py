"""The key=value text of Login and Text PDUs (RFC 7143 sections 6 and 13), and how a target
answers the keys an initiator offers.

The text is a sequence of ``key=value`` pairs, each ended by a NUL byte, in UTF-8. Key names are
at most 63 bytes of letters, digits and ``.-+@_`` and begin with a capital letter; the caller
joins the data segments of PDUs sent with the C (continue) bit before parsing, and a parser
refuses text over a total limit, so a peer cannot make us buffer without end.

Negotiation follows the RFC's kinds of keys:

- *list* keys (HeaderDigest, DataDigest, AuthMethod): the target answers with the first value in
  the initiator's list that it supports, or ``Reject`` when there is none;
- *numeric* keys: the result is the minimum (MaxConnections, MaxBurstLength, FirstBurstLength,
  DefaultTime2Retain, MaxOutstandingR2T, ErrorRecoveryLevel) or the maximum (DefaultTime2Wait) of
  the two sides' values;
- *boolean* keys: the result is the OR (InitialR2T, DataPDUInOrder, DataSequenceInOrder) or the
  AND (ImmediateData) of the two sides' values;
- *declarative* keys (InitiatorName, InitiatorAlias, TargetName, SessionType,
  MaxRecvDataSegmentLength) are recorded, not answered; the target declares its own
  MaxRecvDataSegmentLength in return, as each side's limits what the other may send.

A value out of range or malformed is answered ``key=Reject``, an unknown key
``key=NotUnderstood``, and a session-wide key in a discovery session ``key=Irrelevant``; these
three answers, when an initiator sends them, answer nothing of ours and are dropped. What ends
the login instead is raised as :class:`LoginRefused`, which carries the login status to send.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from dingyuan.exports.iscsi.pdu import (
    DETAIL_MISSING_PARAMETER,
    DETAIL_SESSION_TYPE_NOT_SUPPORTED,
    STATUS_INITIATOR_ERROR,
    ProtocolViolation,
)

MAX_KEY_LENGTH = 63
MAX_VALUE_LENGTH = 8192  # the whole value of one key, lists included
MAX_SIMPLE_VALUE_LENGTH = 255  # one value of a list (RFC 7143 section 6.1)
MAX_TEXT_LENGTH = 65536  # what we accept in one negotiation sequence (the RFC asks for 8192)

REJECT = "Reject"
IRRELEVANT = "Irrelevant"
NOT_UNDERSTOOD = "NotUnderstood"
_ANSWERS = frozenset({REJECT, IRRELEVANT, NOT_UNDERSTOOD})

_KEY = re.compile(r"[A-Z][A-Za-z0-9.\-+@_]*")

Pairs = list[tuple[str, str]]


class LoginRefused(ProtocolViolation):
    """iSCSI login refused: {detail}"""

    def __init__(self, detail: str, *, status_class: int, status_detail: int) -> None:
        super().__init__(detail, status_class=status_class, status_detail=status_detail)
        self.status_class = status_class
        self.status_detail = status_detail


# -- the text format ----------------------------------------------------------------------------


def parse_text(data: bytes, *, max_length: int = MAX_TEXT_LENGTH) -> Pairs:
    """The (key, value) pairs of ``data``, in order; malformed text raises ProtocolViolation.

    A key given twice is refused: the RFC lets an originator offer a key only once.
    """
    if len(data) > max_length:
        raise ProtocolViolation(f"text of {len(data)} bytes is over the limit of {max_length}")
    if not data:
        return []
    if not data.endswith(b"\0"):
        raise ProtocolViolation("text does not end with a NUL byte")
    pairs: Pairs = []
    seen = set()
    for item in data[:-1].split(b"\0"):
        key_bytes, sep, value_bytes = item.partition(b"=")
        if not sep:
            raise ProtocolViolation(f"text item without '=': {item[:80]!r}")
        if len(key_bytes) > MAX_KEY_LENGTH:
            raise ProtocolViolation(f"key of {len(key_bytes)} bytes is over {MAX_KEY_LENGTH}")
        if len(value_bytes) > MAX_VALUE_LENGTH:
            raise ProtocolViolation(f"value of {len(value_bytes)} bytes is over {MAX_VALUE_LENGTH}")
        try:
            key, value = key_bytes.decode("ascii"), value_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolViolation(f"text item is not valid UTF-8: {item[:80]!r}") from e
        if not _KEY.fullmatch(key):
            raise ProtocolViolation(f"malformed key name {key!r}")
        if key in seen:
            raise ProtocolViolation(f"key {key} given twice")
        seen.add(key)
        pairs.append((key, value))
    return pairs


def build_text(pairs: Sequence[tuple[str, str]]) -> bytes:
    """``pairs`` as text, each pair ended by a NUL; a key or value we must not send is a bug."""
    out = bytearray()
    for key, value in pairs:
        encoded = value.encode("utf-8")
        if not _KEY.fullmatch(key) or len(key) > MAX_KEY_LENGTH:
            raise ValueError(f"malformed key name {key!r}")
        if b"\0" in encoded or len(encoded) > MAX_VALUE_LENGTH:
            raise ValueError(f"value of {key} contains NUL or is too long")
        out += key.encode("ascii") + b"=" + encoded + b"\0"
    return bytes(out)


# -- session parameters -------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionParams:
    """Where negotiation stands; the defaults are RFC 7143's, in force until a key changes them.

    ``max_recv_data_segment_length`` is the initiator's declaration: the largest data segment the
    target may send. The target's own is :attr:`TargetConfig.max_recv_data_segment_length`.
    """

    header_digest: str = "None"
    data_digest: str = "None"
    max_recv_data_segment_length: int = 8192
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    initial_r2t: bool = True
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    max_connections: int = 1
    default_time2wait: int = 2
    default_time2retain: int = 20
    session_type: str = "Normal"
    target_name: str | None = None
    initiator_name: str | None = None
    initiator_alias: str | None = None
    auth_method: str = "None"


@dataclass(frozen=True)
class TargetConfig:
    """What this target supports and prefers; each value enters the function of its key."""

    digests: tuple[str, ...] = ("CRC32C", "None")
    auth_methods: tuple[str, ...] = ("None",)
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1048576
    first_burst_length: int = 262144
    initial_r2t: bool = False
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    max_connections: int = 4
    default_time2wait: int = 2
    default_time2retain: int = 0


_U24 = (1 << 24) - 1

# key -> (field, lowest, highest, function)
_NUMERIC: dict[str, tuple[str, int, int, Callable[[int, int], int]]] = {
    "MaxConnections": ("max_connections", 1, 65535, min),
    "MaxBurstLength": ("max_burst_length", 512, _U24, min),
    "FirstBurstLength": ("first_burst_length", 512, _U24, min),
    "DefaultTime2Wait": ("default_time2wait", 0, 3600, max),
    "DefaultTime2Retain": ("default_time2retain", 0, 3600, min),
    "MaxOutstandingR2T": ("max_outstanding_r2t", 1, 65535, min),
    "ErrorRecoveryLevel": ("error_recovery_level", 0, 2, min),
}

# key -> (field, function)
_BOOLEAN: dict[str, tuple[str, Callable[[bool, bool], bool]]] = {
    "InitialR2T": ("initial_r2t", lambda a, b: a or b),
    "ImmediateData": ("immediate_data", lambda a, b: a and b),
    "DataPDUInOrder": ("data_pdu_in_order", lambda a, b: a or b),
    "DataSequenceInOrder": ("data_sequence_in_order", lambda a, b: a or b),
}

# key -> (field, the config attribute listing what we support)
_LIST: dict[str, tuple[str, str]] = {
    "HeaderDigest": ("header_digest", "digests"),
    "DataDigest": ("data_digest", "digests"),
    "AuthMethod": ("auth_method", "auth_methods"),
}

# Keys that mean nothing in a discovery session (RFC 7143 section 13: "Irrelevant when").
_SESSION_WIDE = frozenset(
    {
        "MaxConnections",
        "InitialR2T",
        "ImmediateData",
        "MaxBurstLength",
        "FirstBurstLength",
        "MaxOutstandingR2T",
        "DataPDUInOrder",
        "DataSequenceInOrder",
    }
)

_MARKERS = frozenset({"IFMarker", "OFMarker", "IFMarkInt", "OFMarkInt"})

_SESSION_TYPES = frozenset({"Normal", "Discovery"})


def _number(value: str, lowest: int, highest: int) -> int | None:
    """A decimal or 0x-hexadecimal constant within [lowest, highest], else None."""
    if re.fullmatch(r"[0-9]{1,10}", value):
        n = int(value)
    elif re.fullmatch(r"0[xX][0-9A-Fa-f]{1,8}", value):
        n = int(value, 16)
    else:
        return None
    return n if lowest <= n <= highest else None


def _boolean(value: str) -> bool | None:
    return {"Yes": True, "No": False}.get(value)


def _set(params: SessionParams, field: str, value: Any) -> SessionParams:
    """``params`` with the field a key table names set to ``value``."""
    return replace(params, **{field: value})


def negotiate(
    offers: Sequence[tuple[str, str]], params: SessionParams, config: TargetConfig
) -> tuple[Pairs, SessionParams]:
    """The target's answers to the initiator's ``offers``, and the parameters that result.

    SessionType is taken first whatever its place, since it decides what the other keys mean.
    """
    for key, value in offers:
        if key == "SessionType":
            if value not in _SESSION_TYPES:
                raise LoginRefused(
                    f"session type {value!r} is not supported",
                    status_class=STATUS_INITIATOR_ERROR,
                    status_detail=DETAIL_SESSION_TYPE_NOT_SUPPORTED,
                )
            params = replace(params, session_type=value)
    discovery = params.session_type == "Discovery"
    answers: Pairs = []
    first_burst_answer = None
    for key, value in offers:
        if value in _ANSWERS or key in ("SessionType", "InitiatorAlias"):
            if key == "InitiatorAlias":
                params = replace(params, initiator_alias=value)
            continue
        if key in ("InitiatorName", "TargetName"):
            if not value or len(value.encode()) > 223:
                answers.append((key, REJECT))
            elif key == "InitiatorName":
                params = replace(params, initiator_name=value)
            else:
                params = replace(params, target_name=value)
        elif key == "MaxRecvDataSegmentLength":
            n = _number(value, 512, _U24)
            if n is None:
                answers.append((key, REJECT))
            else:
                params = replace(params, max_recv_data_segment_length=n)
                answers.append((key, str(config.max_recv_data_segment_length)))
        elif key in _MARKERS:
            # RFC 7143 section 13.25 obsoletes markers; answering "No" (which it allows) keeps
            # RFC 3720 initiators that offer them logging in.
            answers.append((key, "No" if key in ("IFMarker", "OFMarker") else REJECT))
        elif key in _SESSION_WIDE and discovery:
            answers.append((key, IRRELEVANT))
        elif key in _LIST:
            field, supported_attr = _LIST[key]
            supported: tuple[str, ...] = getattr(config, supported_attr)
            offered = value.split(",")
            if any(not v or len(v) > MAX_SIMPLE_VALUE_LENGTH for v in offered):
                answers.append((key, REJECT))
                continue
            chosen = next((v for v in offered if v in supported), None)
            if chosen is None:
                answers.append((key, REJECT))
            else:
                params = _set(params, field, chosen)
                answers.append((key, chosen))
        elif key in _NUMERIC:
            field, lowest, highest, function = _NUMERIC[key]
            n = _number(value, lowest, highest)
            if n is None:
                answers.append((key, REJECT))
                continue
            result = function(n, getattr(config, field))
            params = _set(params, field, result)
            if key == "FirstBurstLength":
                first_burst_answer = len(answers)
            answers.append((key, str(result)))
        elif key in _BOOLEAN:
            field, bool_function = _BOOLEAN[key]
            b = _boolean(value)
            if b is None:
                answers.append((key, REJECT))
                continue
            result_bool = bool_function(b, getattr(config, field))
            params = _set(params, field, result_bool)
            answers.append((key, "Yes" if result_bool else "No"))
        else:
            answers.append((key, NOT_UNDERSTOOD))
    if params.first_burst_length > params.max_burst_length:
        # FirstBurstLength must not exceed MaxBurstLength (RFC 7143 section 13.14).
        params = replace(params, first_burst_length=params.max_burst_length)
        if first_burst_answer is not None:
            answers[first_burst_answer] = ("FirstBurstLength", str(params.max_burst_length))
    return answers, params


def require_names(params: SessionParams) -> None:
    """Refuse a login whose initiator did not name itself, or, for a normal session, its target."""
    if params.initiator_name is None:
        raise LoginRefused(
            "the initiator did not send InitiatorName",
            status_class=STATUS_INITIATOR_ERROR,
            status_detail=DETAIL_MISSING_PARAMETER,
        )
    if params.session_type == "Normal" and params.target_name is None:
        raise LoginRefused(
            "a normal session needs TargetName",
            status_class=STATUS_INITIATOR_ERROR,
            status_detail=DETAIL_MISSING_PARAMETER,
        )
