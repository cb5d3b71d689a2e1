"""Properties of text key negotiation (iscsi/keys.py) on arbitrary peer input (hypothesis).

- parse_text on any bytes returns pairs or raises ProtocolError, nothing else (RFC 7143 §6.1:
  malformed text is the initiator's error, status 0x0200);
- what parse_text returns encodes and parses back to the same pairs;
- Negotiator.respond, for either role, in any phase, with any keys and values, raises nothing
  but NegotiationError/ProtocolError; whatever the initiator said, the parameters the target
  ends up with stay inside what the target supports (ERL 0, one connection, legal segment
  lengths, FirstBurstLength <= MaxBurstLength: §13.2, §13.12-14, §13.20).
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iscsi import keys as K

# SANSTACK_FUZZ_EXAMPLES raises the count for a deeper run than CI's.
FUZZ = settings(max_examples=int(os.environ.get("SANSTACK_FUZZ_EXAMPLES", 500)), deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEY_NAMES = sorted(K.KEYS) + ["X-com.example.foo", "X#bar", "Bogus", "SendTargets"]
INTERESTING_VALUES = [
    "", "0", "1", "2", "511", "512", "8192", "65536", "262144", "16776192", "16777215", "16777216",
    "18446744073709551615", "18446744073709551616", "-1", "0x10", "0xFFFFFFFFFFFFFFFFFF", "0b", "0bAAAA",
    "Yes", "No", "yes", "None", "CRC32C", "CRC32C,None", "None,CRC32C", ",", "CRC32C,,", "Reject",
    "Irrelevant", "NotUnderstood", "Normal", "Discovery", "CHAP", "None,CHAP", "5", "7", "RFC3720",
    "FastAbort", "iqn.2026-11.org.example:x", "a" * 255, "a" * 256,
]
values = st.one_of(st.sampled_from(INTERESTING_VALUES), st.text(max_size=40).filter(lambda v: "\0" not in v))
pairs = st.lists(st.tuples(st.sampled_from(KEY_NAMES), values), max_size=25)


@FUZZ
@given(raw=st.binary(max_size=2000))
def test_parse_text_raises_only_protocol_error(raw):
    try:
        got = K.parse_text(raw)
    except K.ProtocolError:
        return
    for key, value in got:
        assert isinstance(key, str) and isinstance(value, str)
        assert "\0" not in key + value and "=" not in key
    assert K.parse_text(K.encode_text(got)) == got


@FUZZ
@given(items=st.lists(st.tuples(st.sampled_from(KEY_NAMES), values), max_size=30),
       junk=st.binary(max_size=64))
def test_parse_text_of_well_formed_pairs_with_junk(items, junk):
    raw = K.encode_text([(k, v) for k, v in items if len(v.encode()) <= 255]) + junk
    try:
        K.parse_text(raw)
    except K.ProtocolError:
        pass


@FUZZ
@given(size=st.integers(K.MAX_TEXT_SEQUENCE_LEN + 1, K.MAX_TEXT_SEQUENCE_LEN + 4096))
def test_text_longer_than_limit_refused(size):
    try:
        K.parse_text(b"A=" + b"b" * (size - 2))
    except K.ProtocolError:
        return
    raise AssertionError("oversized text accepted")


def _check_target_bounds(neg: K.Negotiated) -> None:
    s, c = neg.session, neg.connection
    assert s.error_recovery_level == K.SUPPORTED_ERROR_RECOVERY_LEVEL
    assert s.max_connections == K.SUPPORTED_MAX_CONNECTIONS
    assert 512 <= c.max_send_data_segment_length <= 2**24 - 1
    assert 512 <= c.max_recv_data_segment_length <= 2**24 - 1
    assert 512 <= s.first_burst_length <= s.max_burst_length <= K.DEFAULT_MAX_BURST_LENGTH
    assert 1 <= s.max_outstanding_r2t <= K.DEFAULT_MAX_OUTSTANDING_R2T
    assert s.data_pdu_in_order and s.data_sequence_in_order


@FUZZ
@given(rounds=st.lists(pairs, min_size=1, max_size=4), role=st.sampled_from(["target", "initiator"]),
       session_type=st.sampled_from(["Normal", "Discovery"]),
       phases=st.lists(st.sampled_from(["security", "operational", "ffp"]), min_size=4, max_size=4))
def test_negotiator_raises_only_negotiation_errors(rounds, role, session_type, phases):
    neg = K.Negotiator(role, session_type=session_type)
    try:
        for received, phase in zip(rounds, phases):
            answers = neg.respond(received, phase=phase)
            # Whatever we answer can go on the wire.
            K.parse_text(K.encode_text(answers))
            K.encode_text(neg.pending_declarations(phase))
        result = neg.negotiated()
    except K.ProtocolError as err:  # NegotiationError is a ProtocolError
        assert isinstance(err.status, int) and err.status >> 8 in (2, 3)
        return
    if role == "target":
        _check_target_bounds(result)


@FUZZ
@given(received=pairs)
def test_target_operational_stage_keeps_target_limits(received):
    """A single operational-stage request, the common case, as open-iscsi sends it."""
    neg = K.Negotiator("target", session_type="Normal")
    try:
        neg.respond(received, phase="operational")
        neg.pending_declarations("operational")
        result = neg.negotiated()
    except K.ProtocolError:
        return
    _check_target_bounds(result)
