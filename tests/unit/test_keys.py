"""Text key format and negotiation rules (RFC 7143 §6, §13)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from iscsi.keys import (
    KEYS, Kind, LoginStatus, Negotiated, NegotiationError, Negotiator, ProtocolError,
    Scope, TextAccumulator, decode_binary, encode_hex, encode_text, format_target_address,
    parse_number, parse_send_targets, parse_target_address, parse_text, split_text,
)

# What open-iscsi 2.1.8 sends in its operational stage (shared/notes/openiscsi-guest.md)
OPEN_ISCSI_OFFER = [
    ("HeaderDigest", "None"), ("DataDigest", "None"), ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"), ("IFMarker", "No"), ("OFMarker", "No"),
    ("ErrorRecoveryLevel", "0"), ("InitialR2T", "No"), ("ImmediateData", "Yes"),
    ("MaxBurstLength", "16776192"), ("FirstBurstLength", "262144"),
    ("MaxOutstandingR2T", "1"), ("MaxConnections", "1"), ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"), ("MaxRecvDataSegmentLength", "262144"),
]
OPEN_ISCSI_LOGIN = [
    ("InitiatorName", "iqn.2004-10.com.ubuntu:01:guest"), ("InitiatorAlias", "guest"),
    ("TargetName", "iqn.2026-11.org.example:t1"), ("SessionType", "Normal"),
]


def target(**kw) -> Negotiator:
    kw["local"] = {"TargetPortalGroupTag": "1", **kw.get("local", {})}
    return Negotiator("target", **kw)


def answer(neg: Negotiator, pairs, phase="operational") -> dict[str, str]:
    return dict(neg.respond(pairs, phase))


# ----------------------------------------------------------------------------- format


class TestParseText:
    def test_pairs_in_order(self):
        assert parse_text(b"A=1\x00B=two\x00A=3\x00") == [("A", "1"), ("B", "two"), ("A", "3")]

    def test_missing_final_nul_and_empty_entries_tolerated(self):
        assert parse_text(b"A=1\x00\x00B=2") == [("A", "1"), ("B", "2")]
        assert parse_text(b"") == []

    def test_value_may_contain_equals(self):
        assert parse_text(b"CHAP_C=0bAAE=\x00") == [("CHAP_C", "0bAAE=")]

    def test_entry_without_equals(self):
        with pytest.raises(ProtocolError):
            parse_text(b"A=1\x00garbage\x00")

    def test_key_name_length_limit(self):
        assert parse_text(b"X" * 63 + b"=1\x00")[0][0] == "X" * 63
        with pytest.raises(ProtocolError, match="63"):
            parse_text(b"X" * 64 + b"=1\x00")

    @pytest.mark.parametrize("key", [b"1Key", b"Key Name", b"=v", b"K\xc3\xa9y"])
    def test_malformed_key_names(self, key):
        with pytest.raises(ProtocolError):
            parse_text(key + b"=v\x00")

    def test_value_length_limit_is_per_list_item(self):
        item = "a" * 255
        assert parse_text(f"K={item},{item}\x00".encode()) == [("K", f"{item},{item}")]
        with pytest.raises(ProtocolError, match="255"):
            parse_text(b"K=" + b"a" * 256 + b"\x00")

    def test_large_binary_values(self):
        ok = b"CHAP_C=0x" + b"ab" * 1024 + b"\x00"
        assert len(parse_text(ok)[0][1]) == 2 + 2048
        with pytest.raises(ProtocolError):
            parse_text(b"CHAP_C=0x" + b"ab" * 1025 + b"\x00")

    def test_invalid_utf8(self):
        with pytest.raises(ProtocolError):
            parse_text(b"TargetAlias=\xff\xfe\x00")

    def test_utf8_values(self):
        assert parse_text("TargetAlias=dépôt\x00".encode()) == [("TargetAlias", "dépôt")]

    def test_unique(self):
        assert len(parse_text(b"A=1\x00A=1\x00")) == 2
        with pytest.raises(ProtocolError, match="twice"):
            parse_text(b"A=1\x00A=1\x00", unique=True)

    def test_whole_sequence_limit(self):
        with pytest.raises(ProtocolError):
            parse_text(b"A=1\x00" * 20000)


_key = st.from_regex(r"[A-Za-z][A-Za-z0-9.\-+@_]{0,62}", fullmatch=True)
_value = st.text(st.characters(blacklist_characters="\x00,", blacklist_categories=("Cs",)),
                 max_size=60)


@given(st.lists(st.tuples(_key, _value), max_size=20))
def test_encode_parse_round_trip(pairs):
    assert parse_text(encode_text(pairs)) == pairs


@given(st.lists(st.tuples(_key, _value), max_size=20), st.integers(1, 300))
def test_split_and_accumulate_round_trip(pairs, max_len):
    data = encode_text(pairs)
    pieces = split_text(data, max_len)
    assert all(len(p) <= max_len for p in pieces)
    acc = TextAccumulator()
    results = [acc.append(p, i < len(pieces) - 1) for i, p in enumerate(pieces)]
    assert results[:-1] == [None] * (len(pieces) - 1)
    assert results[-1] == data
    assert not acc.pending


def test_encode_text_refuses_nul_and_bad_keys():
    with pytest.raises(ValueError):
        encode_text([("A", "x\x00y")])
    with pytest.raises(ProtocolError):
        encode_text([("bad key", "v")])
    assert encode_text([("A", "1"), ("B", "")]) == b"A=1\x00B=\x00"


def test_accumulator_limit():
    acc = TextAccumulator(max_len=10)
    assert acc.append(b"12345", True) is None
    assert acc.pending
    with pytest.raises(ProtocolError):
        acc.append(b"123456", False)
    assert not acc.pending          # reset after the error


def test_split_empty_and_bad_length():
    assert split_text(b"", 8192) == [b""]
    with pytest.raises(ValueError):
        split_text(b"x", 0)


class TestValues:
    @pytest.mark.parametrize("text,value", [
        ("0", 0), ("8192", 8192), ("0x2000", 8192), ("0X2000", 8192), ("0bIAA=", 0x2000),
        ("0xF", 15), ("18446744073709551615", 2**64 - 1),
    ])
    def test_numbers(self, text, value):
        assert parse_number(text) == value

    @pytest.mark.parametrize("text", ["", "-1", "1.5", "0x", "abc", "18446744073709551616"])
    def test_bad_numbers(self, text):
        with pytest.raises(ProtocolError):
            parse_number(text)

    def test_binary(self):
        assert decode_binary("0x0102ff") == b"\x01\x02\xff"
        assert decode_binary("0X0102FF") == b"\x01\x02\xff"
        assert decode_binary("0x123") == b"\x01\x23"          # odd digits: implied 0
        assert decode_binary("0bAQL/") == b"\x01\x02\xff"
        assert encode_hex(b"\x01\x02\xff") == "0x0102ff"
        for bad in ("0102", "0xzz", "0b!!", "0b"):
            with pytest.raises(ProtocolError):
                decode_binary(bad)


# ----------------------------------------------------------------------------- table

# Independent transcription of RFC 7143 §13: kind, default, range, scope
RFC_TABLE = {
    "HeaderDigest": (Kind.LIST, "None", None, Scope.CONNECTION),
    "DataDigest": (Kind.LIST, "None", None, Scope.CONNECTION),
    "MaxConnections": (Kind.MIN, "1", (1, 65535), Scope.SESSION),
    "SendTargets": (Kind.REQUEST, None, None, Scope.SESSION),
    "TargetName": (Kind.DECLARATIVE, None, None, Scope.SESSION),
    "InitiatorName": (Kind.DECLARATIVE, None, None, Scope.SESSION),
    "TargetAlias": (Kind.DECLARATIVE, None, None, Scope.SESSION),
    "InitiatorAlias": (Kind.DECLARATIVE, None, None, Scope.SESSION),
    "TargetAddress": (Kind.DECLARATIVE, None, None, Scope.SESSION),
    "TargetPortalGroupTag": (Kind.DECLARATIVE, None, (0, 65535), Scope.SESSION),
    "InitialR2T": (Kind.OR, "Yes", None, Scope.SESSION),
    "ImmediateData": (Kind.AND, "Yes", None, Scope.SESSION),
    "MaxRecvDataSegmentLength": (Kind.DECLARATIVE, "8192", (512, 2**24 - 1), Scope.CONNECTION),
    "MaxBurstLength": (Kind.MIN, "262144", (512, 2**24 - 1), Scope.SESSION),
    "FirstBurstLength": (Kind.MIN, "65536", (512, 2**24 - 1), Scope.SESSION),
    "DefaultTime2Wait": (Kind.MAX, "2", (0, 3600), Scope.SESSION),
    "DefaultTime2Retain": (Kind.MIN, "20", (0, 3600), Scope.SESSION),
    "MaxOutstandingR2T": (Kind.MIN, "1", (1, 65535), Scope.SESSION),
    "DataPDUInOrder": (Kind.OR, "Yes", None, Scope.SESSION),
    "DataSequenceInOrder": (Kind.OR, "Yes", None, Scope.SESSION),
    "ErrorRecoveryLevel": (Kind.MIN, "0", (0, 2), Scope.SESSION),
    "SessionType": (Kind.DECLARATIVE, "Normal", None, Scope.SESSION),
    "TaskReporting": (Kind.LIST, "RFC3720", None, Scope.SESSION),
    "iSCSIProtocolLevel": (Kind.MIN, "0", (0, 31), Scope.SESSION),
}
IRRELEVANT_IN_DISCOVERY = {"MaxConnections", "InitialR2T", "ImmediateData", "MaxBurstLength",
                           "FirstBurstLength", "MaxOutstandingR2T", "DataPDUInOrder",
                           "DataSequenceInOrder", "TaskReporting"}


@pytest.mark.parametrize("name", sorted(RFC_TABLE))
def test_table_matches_rfc(name):
    kind, default, rng, scope = RFC_TABLE[name]
    spec = KEYS[name]
    assert (spec.kind, spec.default, spec.scope) == (kind, default, scope)
    if rng:
        assert (spec.low, spec.high) == rng
    assert spec.irrelevant_in_discovery == (name in IRRELEVANT_IN_DISCOVERY)
    assert spec.ref


def test_table_has_security_and_obsolete_keys():
    for name in ("AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R", "SRP_U"):
        assert KEYS[name].kind is Kind.AUTH and KEYS[name].phases == {"security"}
    for name in ("IFMarker", "OFMarker", "IFMarkInt", "OFMarkInt"):
        assert KEYS[name].kind is Kind.OBSOLETE


# ----------------------------------------------------------------------------- responder


class TestOpenIscsiLogin:
    def test_security_then_operational(self):
        neg = target(local={"TargetPortalGroupTag": "1", "TargetAlias": "disk"})
        assert neg.respond(OPEN_ISCSI_LOGIN + [("AuthMethod", "CHAP,None")], "security") == []
        assert neg.missing_declarations() == []
        assert neg.pending_declarations("security") == [("TargetPortalGroupTag", "1"),
                                                        ("TargetAlias", "disk")]
        assert neg.pending_declarations("security") == []
        answers = answer(neg, OPEN_ISCSI_OFFER)
        assert answers == {
            "HeaderDigest": "None", "DataDigest": "None", "DefaultTime2Wait": "2",
            "DefaultTime2Retain": "0", "IFMarker": "No", "OFMarker": "No",
            "ErrorRecoveryLevel": "0", "InitialR2T": "No", "ImmediateData": "Yes",
            "MaxBurstLength": "16776192", "FirstBurstLength": "262144",
            "MaxOutstandingR2T": "1", "MaxConnections": "1", "DataPDUInOrder": "Yes",
            "DataSequenceInOrder": "Yes",
        }
        # the target declares its own MRDSL; nothing else needs offering
        assert neg.pending_declarations("operational") == [("MaxRecvDataSegmentLength", "262144")]
        assert neg.outstanding == frozenset()
        result = neg.negotiated()
        s, c = result.session, result.connection
        assert (s.initiator_name, s.target_name, s.target_portal_group_tag) == (
            "iqn.2004-10.com.ubuntu:01:guest", "iqn.2026-11.org.example:t1", 1)
        assert (s.initial_r2t, s.immediate_data, s.max_burst_length, s.first_burst_length) == (
            False, True, 16776192, 262144)
        assert (s.default_time2wait, s.default_time2retain, s.error_recovery_level) == (2, 0, 0)
        assert (c.header_digest, c.data_digest) == (False, False)
        assert (c.max_recv_data_segment_length, c.max_send_data_segment_length) == (262144, 262144)

    def test_no_chap_login_starts_in_operational_stage(self):
        neg = target()
        answers = answer(neg, OPEN_ISCSI_LOGIN + OPEN_ISCSI_OFFER)
        assert "InitiatorName" not in answers and answers["MaxConnections"] == "1"
        decl = neg.pending_declarations("operational")
        assert decl == [("TargetPortalGroupTag", "1"), ("MaxRecvDataSegmentLength", "262144")]

    def test_crc32c_requested(self):
        neg = target()
        offer = [("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C,None")]
        assert answer(neg, offer) == {"HeaderDigest": "CRC32C", "DataDigest": "CRC32C"}
        assert neg.negotiated().connection.header_digest is True
        assert neg.negotiated().connection.data_digest is True

    def test_lio_like_target_limits(self):
        # a target configured like LIO's defaults answers open-iscsi with minima
        neg = target(local={"MaxRecvDataSegmentLength": "8192", "MaxBurstLength": "262144",
                            "FirstBurstLength": "65536"})
        answers = answer(neg, OPEN_ISCSI_OFFER)
        assert (answers["MaxBurstLength"], answers["FirstBurstLength"]) == ("262144", "65536")
        assert neg.pending_declarations("operational") == [("TargetPortalGroupTag", "1"),
                                                           ("MaxRecvDataSegmentLength", "8192")]
        c = neg.negotiated().connection
        assert (c.max_recv_data_segment_length, c.max_send_data_segment_length) == (8192, 262144)


class TestListKeys:
    @pytest.mark.parametrize("offer,expected", [
        ("CRC32C,None", "CRC32C"), ("None,CRC32C", "None"), ("None", "None"),
        ("Foo,CRC32C", "CRC32C"),               # unknown values are ignored (§6.2.1)
    ])
    def test_first_offered_value_we_support(self, offer, expected):
        assert answer(target(), [("HeaderDigest", offer)]) == {"HeaderDigest": expected}

    def test_required_digest_not_offered_fails(self):
        neg = target(local={"HeaderDigest": "CRC32C"})
        with pytest.raises(NegotiationError) as err:
            neg.respond([("HeaderDigest", "None")], "operational")
        assert err.value.status is LoginStatus.INITIATOR_ERROR and err.value.key == "HeaderDigest"

    def test_no_common_value_with_acceptable_default_is_reject(self):
        assert answer(target(), [("TaskReporting", "ResponseFence")]) == {"TaskReporting": "Reject"}
        assert answer(target(), [("HeaderDigest", "MD5")]) == {"HeaderDigest": "Reject"}
        assert answer(target(), [("TaskReporting", "FastAbort,RFC3720")]) == {
            "TaskReporting": "RFC3720"}


class TestNumericalKeys:
    @pytest.mark.parametrize("key,offer,expected", [
        ("MaxBurstLength", "1048576", "1048576"), ("MaxBurstLength", "4096", "4096"),
        ("MaxBurstLength", "0x1000", "4096"),
        ("FirstBurstLength", "16777215", "262144"),
        ("MaxOutstandingR2T", "64", "8"), ("MaxOutstandingR2T", "2", "2"),
        ("MaxConnections", "4", "1"), ("ErrorRecoveryLevel", "2", "0"),
        ("DefaultTime2Retain", "3600", "20"), ("DefaultTime2Retain", "0", "0"),
        ("DefaultTime2Wait", "0", "2"), ("DefaultTime2Wait", "60", "60"),   # maximum
        ("iSCSIProtocolLevel", "2", "1"), ("iSCSIProtocolLevel", "0", "0"),
    ])
    def test_min_and_max(self, key, offer, expected):
        assert answer(target(), [(key, offer)]) == {key: expected}

    @pytest.mark.parametrize("key,offer", [
        ("MaxBurstLength", "511"), ("MaxBurstLength", "16777216"), ("MaxBurstLength", "big"),
        ("MaxConnections", "0"), ("DefaultTime2Wait", "3601"), ("ErrorRecoveryLevel", "3"),
        ("MaxOutstandingR2T", "-1"), ("iSCSIProtocolLevel", "32"),
    ])
    def test_illegal_value_is_rejected_not_fatal(self, key, offer):
        neg = target()
        assert answer(neg, [(key, offer)]) == {key: "Reject"}
        default = neg.negotiated()
        assert default.session == Negotiated().session

    @pytest.mark.parametrize("order", [1, -1])
    def test_first_burst_never_exceeds_max_burst(self, order):
        offer = [("MaxBurstLength", "65536"), ("FirstBurstLength", "262144")][::order]
        neg = target()
        assert answer(neg, offer) == {"MaxBurstLength": "65536", "FirstBurstLength": "65536"}
        assert neg.negotiated().session.first_burst_length == 65536


class TestBooleanKeys:
    @pytest.mark.parametrize("key,local,offer,expected", [
        ("ImmediateData", "Yes", "Yes", "Yes"), ("ImmediateData", "Yes", "No", "No"),
        ("ImmediateData", "No", "Yes", "No"), ("ImmediateData", "No", "No", "No"),
        ("InitialR2T", "No", "No", "No"), ("InitialR2T", "No", "Yes", "Yes"),
        ("InitialR2T", "Yes", "No", "Yes"), ("DataPDUInOrder", "Yes", "No", "Yes"),
        ("DataSequenceInOrder", "Yes", "No", "Yes"),
    ])
    def test_and_or(self, key, local, offer, expected):
        assert answer(target(local={key: local}), [(key, offer)]) == {key: expected}

    def test_not_boolean_is_rejected(self):
        assert answer(target(), [("ImmediateData", "yes")]) == {"ImmediateData": "Reject"}


class TestSpecialAnswers:
    @pytest.mark.parametrize("key", ["X-com.example.Feature", "X#ORG.EXAMPLE.F", "FooBar"])
    def test_unknown_keys_not_understood(self, key):
        assert answer(target(), [(key, "1")]) == {key: "NotUnderstood"}

    def test_obsolete_marker_keys(self):
        answers = answer(target(), [("IFMarker", "No"), ("OFMarker", "Yes"),
                                    ("IFMarkInt", "2048~2048"), ("OFMarkInt", "1")])
        # §13.25: never NotUnderstood; MarkInt keys MUST be Reject
        assert answers == {"IFMarker": "No", "OFMarker": "No", "IFMarkInt": "Reject",
                           "OFMarkInt": "Reject"}

    @pytest.mark.parametrize("position", ["first", "last"])
    def test_discovery_session_irrelevant_keys(self, position):
        keys = [("HeaderDigest", "None"), ("MaxConnections", "1"), ("InitialR2T", "No"),
                ("ImmediateData", "Yes"), ("MaxBurstLength", "16776192"),
                ("FirstBurstLength", "262144"), ("MaxOutstandingR2T", "1"),
                ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes"),
                ("DefaultTime2Wait", "2"), ("ErrorRecoveryLevel", "0"),
                ("MaxRecvDataSegmentLength", "32768")]
        declare = [("InitiatorName", "iqn.a:b"), ("SessionType", "Discovery")]
        neg = target()
        answers = answer(neg, declare + keys if position == "first" else keys + declare)
        for key in IRRELEVANT_IN_DISCOVERY & dict(keys).keys():
            assert answers[key] == "Irrelevant", key
        assert answers["HeaderDigest"] == "None" and answers["DefaultTime2Wait"] == "2"
        assert answers["ErrorRecoveryLevel"] == "0"
        assert neg.negotiated().session.session_type == "Discovery"
        assert neg.missing_declarations() == []       # no TargetName needed
        # no TargetPortalGroupTag in discovery, only the MRDSL declaration
        assert neg.pending_declarations("operational") == [("MaxRecvDataSegmentLength", "262144")]


class TestErrors:
    def test_key_twice_in_one_request(self):
        with pytest.raises(NegotiationError, match="twice"):
            target().respond([("MaxBurstLength", "512"), ("MaxBurstLength", "512")], "operational")

    def test_renegotiation_across_requests(self):
        neg = target()
        neg.respond([("MaxBurstLength", "65536")], "operational")
        with pytest.raises(NegotiationError) as err:
            neg.respond([("MaxBurstLength", "65536")], "operational")
        assert err.value.status is LoginStatus.INITIATOR_ERROR

    def test_identical_redeclaration_tolerated_different_refused(self):
        neg = target()
        neg.respond(OPEN_ISCSI_LOGIN, "security")
        assert neg.respond(OPEN_ISCSI_LOGIN, "operational") == []      # libiscsi does this
        with pytest.raises(NegotiationError):
            neg.respond([("InitiatorName", "iqn.other:x")], "operational")

    def test_unknown_key_twice(self):
        neg = target()
        neg.respond([("X-a", "1")], "operational")
        with pytest.raises(NegotiationError):
            neg.respond([("X-a", "1")], "operational")

    @pytest.mark.parametrize("key,value,phase", [
        ("HeaderDigest", "None", "security"),             # §12: not a security key
        ("MaxRecvDataSegmentLength", "8192", "security"),
        ("AuthMethod", "None", "operational"),
        ("SendTargets", "All", "operational"),
        ("TargetAlias", "mine", "operational"),           # only the target sends it
        ("TargetPortalGroupTag", "1", "security"),        # only the target sends it
    ])
    def test_key_out_of_place_fails_login(self, key, value, phase):
        with pytest.raises(NegotiationError):
            target().respond([(key, value)], phase)

    def test_key_out_of_place_in_full_feature_phase_is_irrelevant(self):
        assert answer(target(), [("MaxBurstLength", "512")], "ffp") == {"MaxBurstLength": "Irrelevant"}

    def test_leading_only_keys_on_second_connection(self):
        neg = target(leading=False)
        with pytest.raises(NegotiationError, match="leading"):
            neg.respond([("MaxBurstLength", "65536")], "operational")
        assert answer(target(leading=False), [("HeaderDigest", "None")]) == {"HeaderDigest": "None"}

    def test_bad_session_type(self):
        with pytest.raises(NegotiationError) as err:
            target().respond([("SessionType", "Weird")], "security")
        assert err.value.status is LoginStatus.SESSION_TYPE_NOT_SUPPORTED

    @pytest.mark.parametrize("name", ["", "iqn.with space", "iqn." + "x" * 220])
    def test_bad_iscsi_names(self, name):
        with pytest.raises(NegotiationError):
            target().respond([("InitiatorName", name)], "security")

    @pytest.mark.parametrize("value", ["100", "16777216", "lots"])
    def test_bad_max_recv_data_segment_length(self, value):
        with pytest.raises(NegotiationError):
            target().respond([("MaxRecvDataSegmentLength", value)], "operational")

    def test_missing_names(self):
        neg = target()
        neg.respond([("SessionType", "Normal"), ("InitiatorName", "iqn.a:b")], "security")
        assert neg.missing_declarations() == ["TargetName"]
        assert target().missing_declarations() == ["InitiatorName", "TargetName"]


def test_security_keys_left_to_auth():
    neg = target()
    assert neg.respond([("AuthMethod", "CHAP,None")], "security") == []
    assert neg.respond([("CHAP_A", "5")], "security") == []


def test_send_targets_recorded_for_discovery_code():
    neg = Negotiator("target", session_type="Discovery")
    assert neg.respond([("SendTargets", "All")], "ffp") == []
    assert neg.send_targets == "All"


def test_full_feature_mrdsl_redeclaration():
    login = target()
    login.respond(OPEN_ISCSI_LOGIN + OPEN_ISCSI_OFFER, "operational")
    login.pending_declarations("operational")
    text = Negotiator("target", initial=login.negotiated())
    assert text.respond([("MaxRecvDataSegmentLength", "65536")], "ffp") == []
    result = text.negotiated()
    assert result.connection.max_send_data_segment_length == 65536
    assert result.connection.max_recv_data_segment_length == 262144
    assert result.session == login.negotiated().session


# ----------------------------------------------------------------------------- offers


class TestTargetOffers:
    def test_target_offers_what_the_default_would_break(self):
        neg = target(local={"ImmediateData": "No", "HeaderDigest": "CRC32C",
                            "MaxBurstLength": "65536", "FirstBurstLength": "65536"})
        neg.respond([("InitiatorName", "iqn.a:b"), ("TargetName", "iqn.t:1")], "operational")
        sent = dict(neg.pending_declarations("operational"))
        assert sent == {"TargetPortalGroupTag": "1", "MaxRecvDataSegmentLength": "262144",
                        "HeaderDigest": "CRC32C", "ImmediateData": "No",
                        "MaxBurstLength": "65536"}
        # ImmediateData=No decides the AND alone: its answer is optional (§6.2.2)
        assert neg.outstanding == {"HeaderDigest", "MaxBurstLength"}
        assert neg.respond([("HeaderDigest", "CRC32C"), ("MaxBurstLength", "65536")],
                           "operational") == []
        assert neg.outstanding == frozenset()
        s, c = neg.negotiated().session, neg.negotiated().connection
        assert (c.header_digest, s.immediate_data, s.max_burst_length) == (True, False, 65536)

    def test_optional_boolean_answer_still_accepted(self):
        neg = target(local={"ImmediateData": "No"})
        neg.pending_declarations("operational")
        assert neg.respond([("ImmediateData", "No")], "operational") == []
        neg = target(local={"ImmediateData": "No"})
        neg.pending_declarations("operational")
        with pytest.raises(NegotiationError):         # Yes contradicts AND with our No
            neg.respond([("ImmediateData", "Yes")], "operational")

    def test_required_digest_refused_by_initiator(self):
        neg = target(local={"DataDigest": "CRC32C"})
        neg.pending_declarations("operational")
        with pytest.raises(NegotiationError):
            neg.respond([("DataDigest", "Reject")], "operational")


class TestInitiatorSide:
    def initiator(self, **local) -> Negotiator:
        return Negotiator("initiator", local={"InitiatorName": "iqn.i:1",
                                              "TargetName": "iqn.t:1", **local})

    def test_first_request_and_operational_offer(self):
        neg = self.initiator()
        assert neg.pending_declarations("security") == [
            ("InitiatorName", "iqn.i:1"), ("SessionType", "Normal"), ("TargetName", "iqn.t:1")]
        offer = dict(neg.pending_declarations("operational"))
        assert offer["MaxRecvDataSegmentLength"] == "262144"
        assert offer["HeaderDigest"] == "None,CRC32C" and offer["MaxConnections"] == "1"
        assert "iSCSIProtocolLevel" not in offer and "IFMarker" not in offer
        assert "MaxRecvDataSegmentLength" not in neg.outstanding
        assert {"MaxBurstLength", "HeaderDigest", "ErrorRecoveryLevel"} <= neg.outstanding
        assert "ImmediateData" in neg.outstanding          # Yes under AND needs an answer

    def test_discovery_offer_is_small(self):
        neg = Negotiator("initiator", session_type="Discovery",
                         local={"InitiatorName": "iqn.i:1"})
        assert neg.pending_declarations("security") == [("InitiatorName", "iqn.i:1"),
                                                         ("SessionType", "Discovery")]
        offer = dict(neg.pending_declarations("operational"))
        assert set(offer) == {"MaxRecvDataSegmentLength", "HeaderDigest", "DataDigest",
                              "DefaultTime2Wait", "DefaultTime2Retain", "ErrorRecoveryLevel"}

    @pytest.mark.parametrize("key,offered,bad_answer", [
        ("HeaderDigest", "None", "CRC32C"),          # not offered (§6.2.1)
        ("HeaderDigest", "CRC32C,None", "CRC32C,None"),
        ("MaxBurstLength", "65536", "131072"),       # breaks the minimum rule
        ("DefaultTime2Wait", "5", "2"),              # breaks the maximum rule
        ("ErrorRecoveryLevel", "0", "1"),
        ("ImmediateData", "No", "Yes"),              # AND with our No
        ("InitialR2T", "Yes", "No"),                 # OR with our Yes
        ("MaxBurstLength", "65536", "lots"),
        ("ImmediateData", "Yes", "Maybe"),
    ])
    def test_illegal_answers(self, key, offered, bad_answer):
        neg = self.initiator()
        neg.offer({key: offered})
        with pytest.raises(NegotiationError):
            neg.respond([(key, bad_answer)], "operational")

    def test_legal_answers_applied(self):
        neg = self.initiator()
        neg.offer({"MaxBurstLength": "1048576", "DefaultTime2Wait": "2", "ImmediateData": "Yes"})
        assert neg.respond([("MaxBurstLength", "262144"), ("DefaultTime2Wait", "10"),
                            ("ImmediateData", "No")], "operational") == []
        s = neg.negotiated().session
        assert (s.max_burst_length, s.default_time2wait, s.immediate_data) == (262144, 10, False)

    def test_old_target_answers_not_understood(self):
        neg = self.initiator(iSCSIProtocolLevel="1")
        offer = dict(neg.pending_declarations("operational"))
        assert offer["iSCSIProtocolLevel"] == "1"
        neg.respond([("iSCSIProtocolLevel", "NotUnderstood")], "operational")
        assert neg.negotiated().session.iscsi_protocol_level == 0

    def test_reject_leaves_default_if_acceptable(self):
        neg = self.initiator()
        neg.offer({"MaxBurstLength": "1048576"})
        neg.respond([("MaxBurstLength", "Reject")], "operational")
        assert neg.negotiated().session.max_burst_length == 262144
        neg = self.initiator(HeaderDigest="CRC32C")
        neg.offer({"HeaderDigest": "CRC32C"})
        with pytest.raises(NegotiationError):             # what open-iscsi also refuses
            neg.respond([("HeaderDigest", "Reject")], "operational")

    def test_answers_offers_from_the_target(self):
        # tgt offers keys whose value differs from the default (text_check_param)
        neg = self.initiator()
        assert dict(neg.respond([("ImmediateData", "No"), ("MaxOutstandingR2T", "16")],
                                "operational")) == {"ImmediateData": "No",
                                                    "MaxOutstandingR2T": "8"}

    def test_target_declarations_recorded(self):
        neg = self.initiator()
        neg.respond([("TargetPortalGroupTag", "1"), ("TargetAlias", "disk")], "security")
        neg.respond([("MaxRecvDataSegmentLength", "8192")], "operational")
        result = neg.negotiated()
        assert (result.session.target_portal_group_tag, result.session.target_alias) == (1, "disk")
        assert result.connection.max_send_data_segment_length == 8192
        assert neg.missing_declarations() == []

    def test_initiator_refuses_initiator_keys_from_target(self):
        with pytest.raises(NegotiationError):
            self.initiator().respond([("InitiatorName", "iqn.x:y")], "security")

    def test_offer_misuse(self):
        neg = self.initiator()
        neg.offer({"MaxBurstLength": "65536"})
        with pytest.raises(ValueError):
            neg.offer({"MaxBurstLength": "65536"})
        with pytest.raises(ValueError):
            neg.offer({"TargetAlias": "x"})
        with pytest.raises(ValueError):
            neg.offer({"MaxBurstLength": "65536"}, "security")


def test_initiator_and_target_agree():
    ini = Negotiator("initiator", local={"InitiatorName": "iqn.i:1", "TargetName": "iqn.t:1",
                                         "MaxRecvDataSegmentLength": "65536",
                                         "HeaderDigest": "CRC32C,None"})
    tgt = target(local={"TargetPortalGroupTag": "7", "MaxBurstLength": "1048576",
                        "FirstBurstLength": "65536", "MaxRecvDataSegmentLength": "131072"})
    request = ini.pending_declarations("security") + [("AuthMethod", "None")]
    response = tgt.respond(request, "security") + tgt.pending_declarations("security")
    assert ini.respond(response, "security") == []
    request = ini.pending_declarations("operational")
    response = tgt.respond(request, "operational") + tgt.pending_declarations("operational")
    assert ini.respond(response, "operational") == []
    assert ini.outstanding == frozenset() and tgt.outstanding == frozenset()
    a, b = ini.negotiated(), tgt.negotiated()
    assert a.session == b.session
    assert a.session.target_portal_group_tag == 7
    assert (a.session.max_burst_length, a.session.first_burst_length) == (1048576, 65536)
    assert a.connection.header_digest and b.connection.header_digest
    assert a.connection.max_recv_data_segment_length == b.connection.max_send_data_segment_length == 65536
    assert a.connection.max_send_data_segment_length == b.connection.max_recv_data_segment_length == 131072


@pytest.mark.parametrize("local", [
    {"MaxBurstLength": "100"}, {"HeaderDigest": "MD5"}, {"ImmediateData": "yes"},
    {"FirstBurstLength": "1048576", "MaxBurstLength": "65536"}, {"AuthMethod": "CHAP"},
    {"Bogus": "1"}, {"TargetPortalGroupTag": "70000"},
])
def test_bad_local_configuration(local):
    with pytest.raises(ValueError):
        Negotiator("target", local=local)


# ----------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("value,expected", [
    ("127.0.0.1:3261,1", ("127.0.0.1", 3261, 1)),
    ("10.0.2.2", ("10.0.2.2", 3260, None)),
    ("[::1]:3262,7", ("::1", 3262, 7)),
    ("[fe80::1],2", ("fe80::1", 3260, 2)),
    ("san.example.org:860", ("san.example.org", 860, None)),
])
def test_target_address(value, expected):
    assert parse_target_address(value) == expected
    host, port, tpgt = expected
    if tpgt is not None:
        assert parse_target_address(format_target_address(host, port, tpgt)) == expected


@pytest.mark.parametrize("value", ["", ":3260", "[::1", "[::1]x", "h:0", "h:70000", "h:1,70000",
                                   "h:port"])
def test_bad_target_address(value):
    with pytest.raises(ProtocolError):
        parse_target_address(value)


def test_send_targets_answer_grouping():
    data = (b"TargetName=iqn.t:1\x00TargetAddress=127.0.0.1:3260,1\x00"
            b"TargetAddress=[::1]:3260,1\x00TargetName=iqn.t:2\x00")
    assert parse_send_targets(parse_text(data)) == [
        ("iqn.t:1", ["127.0.0.1:3260,1", "[::1]:3260,1"]), ("iqn.t:2", [])]
    with pytest.raises(ProtocolError):
        parse_send_targets([("TargetAddress", "h:1,1")])
