"""Initiator codecs: hot-path headers cross-checked against iscsi.pdu, CDBs, sense, URLs, records."""
from __future__ import annotations

import os
import struct

import pytest

from iscsi import pdu as P
from iscsi.initiator import scsi
from iscsi.initiator.client import parse_send_targets
from iscsi.initiator.connection import BHS
from iscsi.initiator.errors import (
    Busy, CheckCondition, IllegalRequest, MiscompareError, ReservationConflict, UnitAttention,
    decode_sense, scsi_error,
)
from iscsi.initiator.nodes import NodeRecord, NodeStore
from iscsi.initiator.session import _CMD
from iscsi.initiator.url import UrlError, parse_portal, parse_url
from iscsi.scsi.sense import SenseKey, build_sense


@pytest.mark.parametrize("read,write,final,attr,imm", [
    (True, False, True, 1, 0), (False, True, True, 2, 512), (False, True, False, 1, 4096), (False, False, True, 3, 0),
])
def test_fast_command_header_matches_shared_codec(read, write, final, attr, imm):
    cdb = scsi.read16(0x123456789, 77)
    lun = P.encode_lun(5)
    flags = (0x80 if final else 0) | (0x40 if read else 0) | (0x20 if write else 0) | attr
    fast = _CMD.pack(0x01, flags, 0, 0, imm, lun, 0xABCD, 65536, 0xFFFFFFF0, 17, cdb)
    ref = P.ScsiCommandPdu(read=read, write=write, final=final, attr=attr, lun=lun, itt=0xABCD, edtl=65536,
                           cmdsn=0xFFFFFFF0, expstatsn=17, cdb=cdb, data=b"\0" * imm).header()
    assert fast == ref


def test_fast_data_out_header_matches_shared_codec():
    fast = BHS.pack(0x05, 0x80, 0, 0, 8192, P.encode_lun(1), 9, 0x77, 0, 33, 0, 4, 16384, 0)
    ref = P.DataOut(final=True, lun=P.encode_lun(1), itt=9, ttt=0x77, expstatsn=33, datasn=4, offset=16384,
                    data=b"\0" * 8192).header()
    assert fast == ref


def test_bhs_tuple_positions_for_target_pdus():
    d = BHS.unpack(P.DataIn(itt=1, ttt=2, statsn=3, expcmdsn=4, maxcmdsn=5, datasn=6, offset=7, residual=8,
                            has_status=True, underflow=True, status=2, data=b"abcd").header())
    assert (d[0], d[1] & 0x03, d[3], d[4], d[6], d[7], d[8], d[9], d[10], d[11], d[12], d[13]) == \
        (0x25, 0x03, 2, 4, 1, 2, 3, 4, 5, 6, 7, 8)
    r = BHS.unpack(P.ScsiResponse(itt=11, response=1, status=0x18, statsn=12, expcmdsn=13, maxcmdsn=14,
                                  residual=15, overflow=True).header())
    assert (r[2], r[3], r[6], r[8], r[9], r[10], r[13], r[1] & 0x04) == (1, 0x18, 11, 12, 13, 14, 15, 0x04)
    t = BHS.unpack(P.R2T(itt=21, ttt=22, statsn=23, expcmdsn=24, maxcmdsn=25, r2tsn=26, offset=27,
                         length=28).header())
    assert t[6:] == (21, 22, 23, 24, 25, 26, 27, 28)


def test_cdb_layouts():
    assert scsi.read16(1, 2, fua=True) == bytes([0x88, 0x08]) + (1).to_bytes(8, "big") + (2).to_bytes(4, "big") + b"\0\0"
    caw = scsi.compare_and_write(9, 3)
    assert len(caw) == 16 and caw[0] == 0x89 and caw[13] == 3 and caw[2:10] == (9).to_bytes(8, "big")
    with pytest.raises(ValueError):
        scsi.compare_and_write(0, 256)
    params = scsi.unmap_parameters([(10, 5), (100, 7)])
    assert len(params) == 8 + 32 and struct.unpack_from(">HH", params) == (38, 32)
    assert struct.unpack_from(">QI", params, 24) == (100, 7)
    assert scsi.unmap(len(params))[7:9] == (40).to_bytes(2, "big")
    inq = scsi.inquiry(0x83, 1024)
    assert inq == bytes([0x12, 1, 0x83, 4, 0, 0])
    pr = scsi.persistent_reserve_out(1, 0, 5)
    assert pr[0] == 0x5F and pr[1] == 1 and pr[2] == 5 and pr[5:9] == (24).to_bytes(4, "big")
    assert len(scsi.pr_out_parameters(1, 2, aptpl=True)) == 24
    assert len(scsi.report_luns()) == 12 and len(scsi.report_target_port_groups()) == 12


def test_parsers():
    cap = scsi.parse_read_capacity16(struct.pack(">QIBBBB", 2047, 4096, 0, 3, 0xC0, 0) + bytes(16))
    assert (cap.blocks, cap.block_size, cap.size, cap.lbppb_exponent, cap.lbpme, cap.lbprz) == \
        (2048, 4096, 8 << 20, 3, True, True)
    luns = scsi.parse_report_luns(struct.pack(">I4x", 24) + bytes([0, 1]) + bytes(6)
                                  + bytes([0x41, 0x06]) + bytes(6) + bytes([0, 7]) + bytes(6))
    assert luns == [1, 0x106, 7]   # peripheral, flat (SAM-5 §4.7.7), peripheral
    rtpg = struct.pack(">I", 24) + bytes([0x80, 0, 0, 1, 0, 0, 0, 1]) + struct.pack(">HH", 0, 1) \
        + bytes([0x02, 0, 0, 2, 0, 0, 0, 1]) + struct.pack(">HH", 0, 2)
    groups = scsi.parse_report_target_port_groups(rtpg)
    assert [(g.group, g.state, g.preferred, g.ports) for g in groups] == [
        (1, scsi.AluaState.ACTIVE_OPTIMIZED, True, (1,)), (2, scsi.AluaState.STANDBY, False, (2,))]
    lbas = scsi.parse_lba_status(struct.pack(">I4x", 36) + struct.pack(">QIB3x", 0, 8, 0)
                                 + struct.pack(">QIB3x", 8, 100, 1))
    assert [(s.lba, s.count, s.mapped) for s in lbas] == [(0, 8, True), (8, 100, False)]
    naa = bytes([1, 3, 0, 8]) + bytes.fromhex("6001405abcdef012")
    port = bytes([1, 0x14, 0, 4, 0, 0, 0, 2]) + bytes([1, 0x15, 0, 4, 0, 0, 0, 9])
    vpd = bytes([0, 0x83]) + struct.pack(">H", len(naa) + len(port)) + naa + port
    d = scsi.parse_vpd83(vpd)
    assert scsi.lu_identity(d) == "naa.6001405abcdef012"
    assert scsi.port_identity(d) == (2, 9)


def test_sense_decoding_and_typed_errors():
    fixed = build_sense(SenseKey.MISCOMPARE, (0x1D, 0x00), information=37)
    err = scsi_error(2, fixed, b"\x89")
    assert isinstance(err, MiscompareError) and err.offset == 37 and err.asc_ascq == (0x1D, 0)
    desc = build_sense(SenseKey.MISCOMPARE, (0x1D, 0x00), descriptor=True, information=1 << 40)
    assert isinstance(scsi_error(2, desc), MiscompareError) and scsi_error(2, desc).offset == 1 << 40
    ua = scsi_error(2, build_sense(SenseKey.UNIT_ATTENTION, (0x29, 0x00)))
    assert isinstance(ua, UnitAttention) and isinstance(ua, CheckCondition)
    assert isinstance(scsi_error(2, build_sense(SenseKey.ILLEGAL_REQUEST, (0x24, 0))), IllegalRequest)
    assert isinstance(scsi_error(0x18, None), ReservationConflict)
    assert isinstance(scsi_error(0x08, None), Busy)
    assert decode_sense(b"") is None and decode_sense(b"\x00\x01\x02") is None
    assert "MISCOMPARE" in str(err)


def test_url_parsing():
    u = parse_url("iscsi://alice%s3cr%40t@[::1]:3270/iqn.2026-11.x:y/5?target_user=t&target_password=p"
                  "&header_digest=crc32c-none")
    assert (u.host, u.port, u.target, u.lun, u.user, u.password) == ("::1", 3270, "iqn.2026-11.x:y", 5, "alice", "s3cr@t")
    assert (u.target_user, u.target_password, u.header_digest) == ("t", "p", "CRC32C,None")
    assert "s3cr" not in str(u) and "***" in str(u)
    assert parse_url(u.to_string(secrets=True)) == u
    d = parse_url("iscsi://10.1.2.3", require_target=False)
    assert (d.host, d.port, d.target) == ("10.1.2.3", 3260, None)
    for bad in ("http://x/iqn/0", "iscsi://h/iqn/notanumber", "iscsi://h:99999/iqn/0", "iscsi://h",
                "iscsi://h/iqn/0?bogus=1", "iscsi://h/iqn/0?header_digest=md5"):
        with pytest.raises(UrlError):
            parse_url(bad)
    assert parse_portal("[fe80::1]:3261,2") == ("fe80::1", 3261)


def test_send_targets_parsing():
    pairs = [("TargetName", "iqn.a"), ("TargetAddress", "10.0.0.1:3260,1"), ("TargetAddress", "[::1]:3261,2"),
             ("TargetName", "iqn.b")]
    a, b = parse_send_targets(pairs)
    assert a.name == "iqn.a" and a.portals == (("10.0.0.1", 3260, 1), ("::1", 3261, 2))
    assert b.name == "iqn.b" and b.portals == ()


def test_node_store_is_private_and_masks_secrets(tmp_path):
    store = NodeStore(tmp_path / "cfg" / "nodes.json")
    rec = NodeRecord(target="iqn.t", host="127.0.0.1", port=3260, user="u", password="very-secret-pw")
    store.upsert(rec)
    store.upsert(NodeRecord(target="iqn.t", host="127.0.0.1", port=3261))
    assert os.stat(store.path).st_mode & 0o777 == 0o600
    assert os.stat(store.path.parent).st_mode & 0o777 == 0o700
    assert [n.port for n in store.load()] == [3260, 3261]
    assert store.find("iqn.t", "127.0.0.1:3260")[0].password == "very-secret-pw"
    assert "very-secret" not in repr(rec) and rec.public()["password"] == "***"
    assert store.delete("iqn.t", "127.0.0.1:3261") == 1 and len(store.load()) == 1
