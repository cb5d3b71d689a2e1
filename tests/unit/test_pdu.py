"""Round trip of every opcode through the BHS codec (RFC 7143 §11)."""
import pytest

from iscsi import pdu as P

SAMPLES = [
    P.NopOut(lun=P.encode_lun(3), ttt=0x1234, cmdsn=7, expstatsn=9, itt=0x55, data=b"ping"),
    P.ScsiCommandPdu(read=True, attr=2, lun=P.encode_lun(1), edtl=4096, cmdsn=10, expstatsn=4,
                     cdb=bytes(range(10)), itt=0xABCD),
    P.ScsiCommandPdu(write=True, read=True, lun=0, edtl=512, cmdsn=1, cdb=bytes(range(32)),
                     bidi_read_length=1024, itt=1),
    P.TaskMgmtRequest(function=P.TmfFunction.ABORT_TASK, lun=P.encode_lun(2), rtt=77, cmdsn=5,
                      expstatsn=6, refcmdsn=4, expdatasn=2, itt=3, immediate=True),
    P.LoginRequest(transit=True, cont=False, csg=1, nsg=3, version_max=0, version_min=0,
                   isid=0x23D000000001, tsih=0, cid=1, cmdsn=1, expstatsn=0, itt=0, data=b"A=B\0"),
    P.TextRequest(cont=True, ttt=P.RESERVED_TAG, cmdsn=2, expstatsn=3, itt=9, data=b"SendTargets=All\0"),
    P.DataOut(lun=P.encode_lun(1), ttt=4, expstatsn=2, datasn=1, offset=8192, itt=6, data=b"x" * 13),
    P.LogoutRequest(reason=1, cid=2, cmdsn=7, expstatsn=8, itt=10, immediate=True),
    P.SnackRequest(type=1, lun=0, ttt=3, expstatsn=5, begrun=2, runlength=4, itt=11),
    P.NopIn(ttt=0x99, statsn=1, expcmdsn=2, maxcmdsn=33, itt=0x77),
    P.ScsiResponse(response=0, status=2, underflow=True, residual=512, statsn=4, expcmdsn=5,
                   maxcmdsn=36, expdatasn=1, itt=12, data=P.ScsiResponse.sense_segment(b"\x70" + b"\0" * 17)),
    P.TaskMgmtResponse(response=P.TmfResponse.TASK_DOES_NOT_EXIST, statsn=1, expcmdsn=2, maxcmdsn=3, itt=13),
    P.LoginResponse(transit=True, csg=0, nsg=1, version_max=0, version_active=0, isid=0x800000000001,
                    tsih=0x1234, status_class=2, status_detail=1, statsn=1, expcmdsn=2, maxcmdsn=2, itt=14),
    P.TextResponse(cont=False, ttt=P.RESERVED_TAG, statsn=3, expcmdsn=4, maxcmdsn=5, itt=15, data=b"TargetName=x\0"),
    P.DataIn(has_status=True, status=0, underflow=True, residual=100, lun=0, ttt=P.RESERVED_TAG,
             datasn=3, offset=65536, statsn=9, expcmdsn=10, maxcmdsn=41, itt=16, data=b"y" * 7),
    P.LogoutResponse(response=0, time2wait=2, time2retain=20, statsn=1, expcmdsn=2, maxcmdsn=3, itt=17),
    P.R2T(lun=P.encode_lun(1), ttt=5, r2tsn=2, offset=262144, length=65536, statsn=4, expcmdsn=5,
          maxcmdsn=6, itt=18),
    P.AsyncMessage(lun=P.encode_lun(1), event=1, vcode=0, param1=0, param2=2, param3=20, statsn=5,
                   expcmdsn=6, maxcmdsn=7),
    P.Reject(reason=P.RejectReason.PROTOCOL_ERROR, datasn=0, statsn=2, expcmdsn=3, maxcmdsn=4, data=b"\1" * 48),
]


@pytest.mark.parametrize("pdu", SAMPLES, ids=lambda p: type(p).__name__)
def test_round_trip(pdu):
    raw = pdu.encode()
    assert len(raw) % 4 == 0
    back = P.decode_pdu(raw)
    assert type(back) is type(pdu)
    assert back.encode() == raw
    for name in pdu._repr_fields():
        if name == "cdb":  # the BHS always carries 16 CDB bytes, zero padded
            assert back.cdb[:len(pdu.cdb)] == pdu.cdb
        elif name != "ahs":
            assert getattr(back, name) == getattr(pdu, name), name


def test_every_opcode_has_a_sample():
    assert {type(p).OPCODE for p in SAMPLES} == set(P.PDU_CLASSES)


def test_extended_cdb_and_bidi_ahs_decoded():
    cmd = P.ScsiCommandPdu(write=True, cdb=bytes(range(32)), bidi_read_length=1024, edtl=5)
    back = P.decode_pdu(cmd.encode())
    assert back.cdb == bytes(range(32))
    assert back.bidi_read_length == 1024


def test_login_fields_at_rfc_offsets():
    raw = P.LoginRequest(transit=True, csg=1, nsg=3, isid=0x0123456789AB, tsih=0xCDEF, cid=0x4321,
                         cmdsn=0x11223344, itt=0xAABBCCDD).encode()
    assert raw[0] == 0x43  # I bit + opcode 0x03
    assert raw[1] == 0x80 | (1 << 2) | 3  # T, CSG=1, NSG=3
    assert raw[8:14] == bytes.fromhex("0123456789ab")
    assert raw[14:16] == bytes.fromhex("cdef")
    assert raw[16:20] == bytes.fromhex("aabbccdd")
    assert raw[20:22] == bytes.fromhex("4321")
    assert raw[24:28] == bytes.fromhex("11223344")


def test_data_segment_length_and_padding():
    raw = P.NopOut(data=b"abcde").encode()
    assert raw[5:8] == b"\0\0\x05"
    assert len(raw) == 48 + 8


def test_unknown_opcode_rejected():
    raw = bytearray(48)
    raw[0] = 0x1C
    with pytest.raises(P.PduFormatError) as err:
        P.decode_pdu(bytes(raw))
    assert err.value.reason == P.RejectReason.COMMAND_NOT_SUPPORTED


def test_target_opcode_refused_when_only_initiator_allowed():
    raw = P.NopIn().encode()
    with pytest.raises(P.PduFormatError):
        P.decode_pdu(raw, allowed=P.INITIATOR_OPCODES)


@pytest.mark.parametrize("lun", [0, 1, 255, 256, 1000, 0x3FFF])
def test_lun_encoding(lun):
    assert P.decode_lun(P.encode_lun(lun)) == lun


def test_truncated_bhs():
    with pytest.raises(P.PduFormatError):
        P.parse_bhs(b"\0" * 20)
