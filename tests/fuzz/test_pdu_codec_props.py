"""Properties of the PDU codec (iscsi/pdu.py, iscsi/framing.py) on arbitrary input (hypothesis).

- decoding any 48-byte header (plus any AHS) raises nothing but PduFormatError (RFC 7143 §11:
  a malformed PDU is the peer's error, answered with a Reject, never an exception in the daemon);
- every PDU class survives encode -> decode with every field intact, with and without digests,
  whatever way the byte stream is cut into reads.
"""
from __future__ import annotations

import os

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iscsi import pdu as P
from iscsi.framing import HeaderDigestError, PduReader, encode_bytes

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
flag = st.booleans()
small_data = st.binary(max_size=300)

# SANSTACK_FUZZ_EXAMPLES raises the count for a deeper run than CI's.
FUZZ = settings(max_examples=int(os.environ.get("SANSTACK_FUZZ_EXAMPLES", 400)), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(bhs=st.binary(min_size=48, max_size=48), ahs_words=st.binary(max_size=64).map(lambda b: b[: len(b) & ~3]),
       data=small_data, restrict=flag)
def test_decode_raises_only_pdu_format_error(bhs, ahs_words, data, restrict):
    allowed = P.INITIATOR_OPCODES if restrict else None
    for ahs in (b"", ahs_words):
        try:
            pdu = P.decode(bhs, ahs, data, allowed=allowed)
        except P.PduFormatError as err:
            assert isinstance(err.reason, int) and 0 < err.reason <= 0x0C
            continue
        assert pdu.OPCODE == bhs[0] & 0x3F
        assert allowed is None or pdu.OPCODE in allowed
        # A decoded PDU always encodes again (no field out of range after decode).
        assert len(pdu.header()) >= P.BHS_LEN


@FUZZ
@given(raw=st.binary(max_size=47))
def test_short_header_is_a_format_error(raw):
    try:
        P.parse_bhs(raw)
    except P.PduFormatError:
        return
    raise AssertionError("parse_bhs accepted fewer than 48 bytes")


@FUZZ
@given(raw=st.binary(min_size=48, max_size=600))
def test_decode_pdu_whole_buffer(raw):
    try:
        P.decode_pdu(raw)
    except P.PduFormatError:
        pass


# -- round trip ---------------------------------------------------------------------------

def _cdb():
    return st.one_of(st.binary(min_size=16, max_size=16), st.binary(min_size=17, max_size=260))


FIELDS: dict[type, dict] = {
    P.NopOut: dict(lun=u64, ttt=u32, cmdsn=u32, expstatsn=u32, itt=u32, immediate=flag),
    P.ScsiCommandPdu: dict(read=flag, write=flag, attr=st.integers(0, 7), lun=u64, edtl=u32, cmdsn=u32,
                           expstatsn=u32, cdb=_cdb(), bidi_read_length=st.none() | u32, itt=u32,
                           immediate=flag, final=flag),
    P.TaskMgmtRequest: dict(function=st.integers(0, 0x7F), lun=u64, rtt=u32, cmdsn=u32, expstatsn=u32,
                            refcmdsn=u32, expdatasn=u32, itt=u32, immediate=flag),
    P.LoginRequest: dict(transit=flag, cont=flag, csg=st.integers(0, 3), nsg=st.integers(0, 3), version_max=u8,
                         version_min=u8, isid=st.integers(0, (1 << 48) - 1), tsih=u16, cid=u16, cmdsn=u32,
                         expstatsn=u32, itt=u32),
    P.TextRequest: dict(cont=flag, lun=u64, ttt=u32, cmdsn=u32, expstatsn=u32, itt=u32, final=flag, immediate=flag),
    P.DataOut: dict(lun=u64, ttt=u32, expstatsn=u32, datasn=u32, offset=u32, itt=u32, final=flag),
    P.LogoutRequest: dict(reason=st.integers(0, 0x7F), cid=u16, cmdsn=u32, expstatsn=u32, itt=u32, immediate=flag),
    P.SnackRequest: dict(type=st.integers(0, 15), lun=u64, ttt=u32, expstatsn=u32, begrun=u32, runlength=u32,
                         itt=u32),
    P.NopIn: dict(lun=u64, ttt=u32, itt=u32, statsn=u32, expcmdsn=u32, maxcmdsn=u32),
    P.ScsiResponse: dict(response=u8, status=u8, bidi_overflow=flag, bidi_underflow=flag, overflow=flag,
                         underflow=flag, snack_tag=u32, expdatasn=u32, bidi_residual=u32, residual=u32,
                         itt=u32, statsn=u32, expcmdsn=u32, maxcmdsn=u32),
    P.TaskMgmtResponse: dict(response=u8, itt=u32, statsn=u32, expcmdsn=u32, maxcmdsn=u32),
    P.LoginResponse: dict(transit=flag, cont=flag, csg=st.integers(0, 3), nsg=st.integers(0, 3), version_max=u8,
                          version_active=u8, isid=st.integers(0, (1 << 48) - 1), tsih=u16, status_class=u8,
                          status_detail=u8, itt=u32, statsn=u32, expcmdsn=u32, maxcmdsn=u32),
    P.TextResponse: dict(cont=flag, lun=u64, ttt=u32, itt=u32, final=flag, statsn=u32, expcmdsn=u32,
                         maxcmdsn=u32),
    P.DataIn: dict(ack=flag, overflow=flag, underflow=flag, has_status=flag, status=u8, lun=u64, ttt=u32,
                   datasn=u32, offset=u32, residual=u32, itt=u32, final=flag, statsn=u32, expcmdsn=u32,
                   maxcmdsn=u32),
    P.LogoutResponse: dict(response=u8, time2wait=u16, time2retain=u16, itt=u32, statsn=u32, expcmdsn=u32,
                           maxcmdsn=u32),
    P.R2T: dict(lun=u64, ttt=u32, r2tsn=u32, offset=u32, length=u32, itt=u32, statsn=u32, expcmdsn=u32,
                maxcmdsn=u32),
    P.AsyncMessage: dict(lun=u64, event=u8, vcode=u8, param1=u16, param2=u16, param3=u16, itt=u32, statsn=u32,
                         expcmdsn=u32, maxcmdsn=u32),
    P.Reject: dict(reason=u8, datasn=u32, itt=u32, statsn=u32, expcmdsn=u32, maxcmdsn=u32),
}


def test_every_opcode_has_a_round_trip_strategy():
    assert set(FIELDS) == set(P.PDU_CLASSES.values())


@st.composite
def pdus(draw):
    cls = draw(st.sampled_from(sorted(FIELDS, key=lambda c: c.OPCODE)))
    kwargs = draw(st.fixed_dictionaries(FIELDS[cls]))
    if cls is P.LoginRequest:
        kwargs["immediate"] = draw(flag)
    pdu = cls(**kwargs, data=draw(small_data))
    return pdu, kwargs


def _field_values(pdu: P.Pdu) -> dict:
    return {name: getattr(pdu, name) for name in pdu._repr_fields()}


@FUZZ
@given(item=pdus())
def test_round_trip_every_field(item):
    pdu, kwargs = item
    raw = pdu.encode()
    assert len(raw) % 4 == 0
    back = P.decode_pdu(raw)
    assert type(back) is type(pdu)
    assert bytes(back.data) == bytes(pdu.data)
    assert _field_values(back) == _field_values(pdu)
    for name, value in kwargs.items():
        if name == "transit":
            assert back.transit == value
        else:
            assert getattr(back, name) == value, name
    assert back.encode() == raw


@FUZZ
@given(items=st.lists(pdus(), min_size=1, max_size=6), hd=flag, dd=flag,
       cuts=st.lists(st.integers(1, 200), min_size=1, max_size=40))
def test_stream_round_trip_with_digests_and_any_read_size(items, hd, dd, cuts):
    stream = b"".join(encode_bytes(p, header_digest=hd, data_digest=dd) for p, _ in items)
    reader = PduReader(header_digest=hd, data_digest=dd, max_data_segment=1 << 24)
    got: list = []
    pos, i = 0, 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        got += reader.feed(stream[pos:pos + n])
        pos += n
        i += 1
    assert reader.buffered == 0
    assert [type(p) for p in got] == [type(p) for p, _ in items]
    for (want, _), have in zip(items, got):
        assert _field_values(have) == _field_values(want)
        assert bytes(have.data) == bytes(want.data)


@FUZZ
@given(item=pdus(), flip=st.integers(0, 47 * 8 - 1))
def test_corrupt_header_with_digest_never_decodes(item, flip):
    """RFC 7143 §7.8: a header digest mismatch is detected; the PDU is never delivered."""
    pdu, _ = item
    raw = bytearray(encode_bytes(pdu, header_digest=True))
    raw[flip // 8] ^= 1 << (flip % 8)
    reader = PduReader(header_digest=True, max_data_segment=1 << 24)
    try:
        out = reader.feed(bytes(raw))
    except (HeaderDigestError, P.PduFormatError):
        return
    # A flipped length bit can make the reader wait for more bytes: then nothing came out.
    assert out == [], f"corrupted header decoded as {out}"


@FUZZ
@given(limit=st.integers(512, 1 << 18), extra=st.integers(1, 1 << 20))
def test_oversized_data_segment_refused_on_the_header_alone(limit, extra):
    """§13.12: a data segment over our MaxRecvDataSegmentLength is refused as soon as the BHS
    is in, before one byte of it is buffered (a lying length must not make us wait or grow)."""
    hdr = P.DataOut(itt=1, data=b"").header()
    raw = bytearray(hdr)
    struct.pack_into(">I", raw, 4, min(limit + extra, 0xFFFFFF))
    reader = PduReader(max_data_segment=limit)
    try:
        reader.feed(bytes(raw))
    except P.PduFormatError as err:
        assert err.reason == P.RejectReason.PROTOCOL_ERROR
    else:
        raise AssertionError("oversized DataSegmentLength accepted")
