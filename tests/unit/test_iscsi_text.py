"""iSCSI login/text negotiation: the key=value text round-trips and refuses malformed input, and
the target answers each kind of key as RFC 7143 says."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dingyuan.exports.iscsi import pdu, text

keys = st.from_regex(r"[A-Z][A-Za-z0-9.\-+@_]{0,62}", fullmatch=True)
values = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=60)
CONFIG = text.TargetConfig()


@given(st.dictionaries(keys, values, max_size=10))
def test_text_round_trip(pairs: dict[str, str]) -> None:
    items = list(pairs.items())
    data = text.build_text(items)
    assert data.count(b"\0") == len(items)
    assert text.parse_text(data) == items


def test_text_is_nul_terminated_key_equals_value() -> None:
    data = text.build_text([("InitiatorName", "iqn.2004-10.com.example:host"), ("AuthMethod", "None")])
    assert data == b"InitiatorName=iqn.2004-10.com.example:host\0AuthMethod=None\0"
    assert text.parse_text(b"") == []


@pytest.mark.parametrize(
    "data",
    [
        b"HeaderDigest=None",  # no terminating NUL
        b"HeaderDigest\0",  # no '='
        b"=None\0",  # empty key
        b"headerDigest=None\0",  # must begin with a capital letter
        b"Header Digest=None\0",  # space in a key
        b"A" * 64 + b"=1\0",  # key over 63 bytes
        b"K=" + b"v" * 8193 + b"\0",  # value over the limit
        b"K=\xff\xfe\0",  # not UTF-8
        b"K=1\0\0",  # empty item
        b"K=1\0K=2\0",  # a key twice
    ],
)
def test_malformed_text_is_rejected(data: bytes) -> None:
    with pytest.raises(pdu.ProtocolViolation):
        text.parse_text(data)


def test_text_over_the_total_limit_is_rejected() -> None:
    data = text.build_text([(f"K{i}", "x" * 100) for i in range(20)])
    with pytest.raises(pdu.ProtocolViolation, match="over the limit"):
        text.parse_text(data, max_length=len(data) - 1)
    assert len(text.parse_text(data, max_length=len(data))) == 20


def test_a_key_of_63_bytes_is_accepted() -> None:
    assert text.parse_text(b"A" * 63 + b"=1\0") == [("A" * 63, "1")]


@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_protocol_violation(data: bytes) -> None:
    try:
        text.parse_text(data)
    except pdu.ProtocolViolation:
        return


# -- negotiation ----------------------------------------------------------------------------------


def negotiate(
    *pairs: tuple[str, str], config: text.TargetConfig = CONFIG, params: text.SessionParams | None = None
) -> tuple[dict[str, str], text.SessionParams]:
    answers, result = text.negotiate(list(pairs), params or text.SessionParams(), config)
    return dict(answers), result


def test_security_stage_of_an_open_iscsi_login() -> None:
    answers, params = negotiate(
        ("InitiatorName", "iqn.2004-10.com.ubuntu:01:abc"),
        ("InitiatorAlias", "host"),
        ("SessionType", "Normal"),
        ("TargetName", "iqn.2026-01.org.dingyuan:clone1"),
        ("AuthMethod", "CHAP,None"),
    )
    assert answers == {"AuthMethod": "None"}
    assert params.initiator_name == "iqn.2004-10.com.ubuntu:01:abc"
    assert params.target_name == "iqn.2026-01.org.dingyuan:clone1"
    assert params.initiator_alias == "host"
    text.require_names(params)


def test_operational_stage_of_an_open_iscsi_login() -> None:
    answers, params = negotiate(
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("IFMarker", "No"),
        ("OFMarker", "No"),
        ("ErrorRecoveryLevel", "0"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("MaxBurstLength", "16776192"),
        ("FirstBurstLength", "262144"),
        ("MaxOutstandingR2T", "1"),
        ("MaxConnections", "1"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
        ("MaxRecvDataSegmentLength", "262144"),
    )
    assert answers == {
        "HeaderDigest": "None",
        "DataDigest": "None",
        "DefaultTime2Wait": "2",
        "DefaultTime2Retain": "0",
        "IFMarker": "No",
        "OFMarker": "No",
        "ErrorRecoveryLevel": "0",
        "InitialR2T": "No",
        "ImmediateData": "Yes",
        "MaxBurstLength": str(CONFIG.max_burst_length),
        "FirstBurstLength": "262144",
        "MaxOutstandingR2T": "1",
        "MaxConnections": "1",
        "DataPDUInOrder": "Yes",
        "DataSequenceInOrder": "Yes",
        "MaxRecvDataSegmentLength": str(CONFIG.max_recv_data_segment_length),
    }
    assert params.max_burst_length == CONFIG.max_burst_length
    assert params.max_recv_data_segment_length == 262144
    assert not params.initial_r2t and params.immediate_data


@pytest.mark.parametrize(
    ("offer", "supported", "answer"),
    [
        ("CRC32C,None", ("CRC32C", "None"), "CRC32C"),  # the initiator's order decides
        ("None,CRC32C", ("CRC32C", "None"), "None"),
        ("CRC32C,None", ("None",), "None"),
        ("CRC32C", ("None",), "Reject"),
        ("Foo,,None", ("None",), "Reject"),
    ],
)
def test_list_keys_take_the_first_offered_value_we_support(
    offer: str, supported: tuple[str, ...], answer: str
) -> None:
    answers, params = negotiate(("HeaderDigest", offer), config=text.TargetConfig(digests=supported))
    assert answers == {"HeaderDigest": answer}
    assert params.header_digest == (answer if answer != "Reject" else "None")


@pytest.mark.parametrize(
    ("key", "offer", "ours", "result"),
    [
        ("MaxBurstLength", 16776192, 1048576, 1048576),  # minimum
        ("MaxBurstLength", 65536, 1048576, 65536),
        ("MaxConnections", 4, 1, 1),
        ("ErrorRecoveryLevel", 2, 0, 0),
        ("MaxOutstandingR2T", 8, 4, 4),
        ("DefaultTime2Retain", 20, 0, 0),
        ("DefaultTime2Wait", 0, 2, 2),  # maximum
        ("DefaultTime2Wait", 10, 2, 10),
    ],
)
def test_numeric_keys_take_min_or_max(key: str, offer: int, ours: int, result: int) -> None:
    field = text._NUMERIC[key][0]
    config = text.TargetConfig(**{field: ours})
    answers, params = negotiate((key, str(offer)), config=config)
    assert answers == {key: str(result)}
    assert getattr(params, field) == result


@pytest.mark.parametrize(
    ("key", "offer", "ours", "result"),
    [
        ("InitialR2T", "No", False, "No"),  # OR
        ("InitialR2T", "Yes", False, "Yes"),
        ("InitialR2T", "No", True, "Yes"),
        ("DataPDUInOrder", "No", True, "Yes"),
        ("DataSequenceInOrder", "No", False, "No"),
        ("ImmediateData", "Yes", True, "Yes"),  # AND
        ("ImmediateData", "Yes", False, "No"),
        ("ImmediateData", "No", True, "No"),
    ],
)
def test_boolean_keys_take_or_and(key: str, offer: str, ours: bool, result: str) -> None:
    field = text._BOOLEAN[key][0]
    answers, params = negotiate((key, offer), config=text.TargetConfig(**{field: ours}))
    assert answers == {key: result}
    assert getattr(params, field) is (result == "Yes")


def test_hexadecimal_numbers_are_understood() -> None:
    answers, _ = negotiate(("MaxBurstLength", "0x10000"))
    assert answers == {"MaxBurstLength": "65536"}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("MaxBurstLength", "511"),
        ("MaxBurstLength", "16777216"),
        ("MaxConnections", "0"),
        ("ErrorRecoveryLevel", "3"),
        ("DefaultTime2Wait", "3601"),
        ("MaxRecvDataSegmentLength", "lots"),
        ("InitialR2T", "yes"),
        ("ImmediateData", ""),
        ("InitiatorName", ""),
    ],
)
def test_values_out_of_range_are_answered_reject(key: str, value: str) -> None:
    before = text.SessionParams()
    answers, params = negotiate((key, value))
    assert answers == {key: "Reject"}
    assert params == before


def test_unknown_keys_are_not_understood_and_answers_are_not_answered() -> None:
    answers, _ = negotiate(("X-com.example.Feature", "1"), ("HeaderDigest", "Reject"))
    assert answers == {"X-com.example.Feature": "NotUnderstood"}


def test_first_burst_never_exceeds_max_burst() -> None:
    answers, params = negotiate(("FirstBurstLength", "262144"), ("MaxBurstLength", "65536"))
    assert answers == {"FirstBurstLength": "65536", "MaxBurstLength": "65536"}
    assert params.first_burst_length == params.max_burst_length == 65536


def test_session_wide_keys_are_irrelevant_in_a_discovery_session() -> None:
    answers, params = negotiate(
        ("MaxBurstLength", "65536"),
        ("InitiatorName", "iqn.2004-10.com.ubuntu:01:abc"),
        ("SessionType", "Discovery"),
        ("HeaderDigest", "None"),
    )
    assert answers == {"MaxBurstLength": "Irrelevant", "HeaderDigest": "None"}
    assert params.session_type == "Discovery"
    text.require_names(params)  # a discovery session names no target


def test_an_unknown_session_type_refuses_the_login() -> None:
    with pytest.raises(text.LoginRefused) as caught:
        negotiate(("SessionType", "Backup"))
    assert (caught.value.status_class, caught.value.status_detail) == (
        pdu.STATUS_INITIATOR_ERROR,
        pdu.DETAIL_SESSION_TYPE_NOT_SUPPORTED,
    )


@pytest.mark.parametrize(
    "params",
    [text.SessionParams(), text.SessionParams(initiator_name="iqn.2004-10.com.ubuntu:01:abc")],
)
def test_a_login_without_names_is_refused(params: text.SessionParams) -> None:
    with pytest.raises(text.LoginRefused) as caught:
        text.require_names(params)
    assert caught.value.status_detail == pdu.DETAIL_MISSING_PARAMETER


def test_negotiation_builds_on_earlier_rounds() -> None:
    _, first = negotiate(("HeaderDigest", "CRC32C"))
    _, second = negotiate(("DataDigest", "CRC32C,None"), params=first)
    assert (second.header_digest, second.data_digest) == ("CRC32C", "CRC32C")
