"""INQUIRY standard data and VPD pages; READ CAPACITY; REPORT LUNS and LUNs without an LU."""
from __future__ import annotations

import struct

import pytest

from iscsi.scsi.cdb import decode_lun, encode_lun
from iscsi.scsi.target import LunMap

from .test_scsi_support import NEXUS_A, NEXUS_B, Initiator, inquiry, make_lu, read_capacity16, report_luns

INVALID_FIELD = (0x5, 0x24, 0x00)


async def test_standard_inquiry_fields():
    lu = make_lu("ram", vendor="SANSTACK", product="VIRTUAL-DISK", revision="0001")
    ini = Initiator(lu)
    r = await ini.ok(inquiry(alloc=260))
    d = r.data
    assert len(d) == 96 and d[4] == 91  # additional length matches
    assert d[0] == 0x00  # qualifier 0, direct access
    assert d[2] == 0x06  # SPC-4
    assert d[3] == 0x12  # HISUP, response data format 2
    assert d[7] & 0x02  # CMDQUE
    assert d[8:16] == b"SANSTACK" and d[16:32] == b"VIRTUAL-DISK    " and d[32:36] == b"0001"
    descs = struct.unpack_from(">8H", d, 58)
    assert 0x04C0 in descs and 0x0460 in descs  # SBC-3, SPC-4
    assert all(c == 0 or 0x20 <= c < 0x7F for c in d[8:36])


async def test_inquiry_allocation_length_cuts_data():
    lu = make_lu("ram")
    ini = Initiator(lu)
    for n in (0, 5, 36, 95, 511, 512):
        assert len((await ini.ok(inquiry(alloc=n))).data) == min(n, 96)


async def test_inquiry_page_code_without_evpd_is_invalid():
    ini = Initiator(make_lu("ram"))
    s = await ini.fails(inquiry(evpd=0, page=1))
    assert s.code == INVALID_FIELD and s.sks[1:] == b"\x00\x02"
    assert (await ini.fails(inquiry(evpd=1, page=0x99))).code == INVALID_FIELD


async def test_every_supported_vpd_page_reads_with_right_length():
    lu = make_lu("ram")
    ini = Initiator(lu)
    sup = (await ini.ok(inquiry(1, 0x00))).data
    pages = list(sup[4:4 + sup[3]])
    for p in (0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2):
        assert p in pages
    assert pages == sorted(pages)
    for p in pages:
        d = (await ini.ok(inquiry(1, p, 1024))).data
        assert d[1] == p and len(d) == struct.unpack_from(">H", d, 2)[0] + 4


def _designators(page: bytes):
    out = []
    pos = 4
    while pos < len(page):
        b0, b1, _, n = page[pos:pos + 4]
        out.append(((b1 >> 4) & 3, b1 & 0x0F, b0 & 0x0F, bytes(page[pos + 4:pos + 4 + n])))
        pos += 4 + n
    return out


async def test_device_identification_unique_per_lu_and_port_designators():
    lu1 = make_lu("ram", serial="serial-0001")
    lu2 = make_lu("ram", serial="serial-0002")
    d1 = _designators((await Initiator(lu1, NEXUS_A).ok(inquiry(1, 0x83))).data)
    d2 = _designators((await Initiator(lu2, NEXUS_B).ok(inquiry(1, 0x83))).data)
    naa1 = [v for a, t, c, v in d1 if a == 0 and t == 3][0]
    naa2 = [v for a, t, c, v in d2 if a == 0 and t == 3][0]
    assert len(naa1) == 8 and naa1[0] >> 4 == 0x3 and naa1 != naa2
    t10_1 = [v for a, t, c, v in d1 if a == 0 and t == 1][0]
    t10_2 = [v for a, t, c, v in d2 if a == 0 and t == 1][0]
    assert t10_1[:8] == b"SANSTACK"
    assert t10_1[8:16] != t10_2[8:16]  # ESXi looks at the first 8 vendor-specific characters only
    rel = [v for a, t, c, v in d1 if a == 1 and t == 4][0]
    tpg = [v for a, t, c, v in d2 if a == 1 and t == 5][0]
    assert struct.unpack(">HH", rel) == (0, 1) and struct.unpack(">HH", tpg) == (0, 2)
    names = [v for a, t, c, v in d1 if t == 8]
    assert any(v.rstrip(b"\0") == NEXUS_A.target_port.encode() for v in names)
    assert all(len(v) % 4 == 0 for v in names)
    # the LU designators are the same through another port (multipath identity)
    d1b = _designators((await Initiator(lu1, NEXUS_B).ok(inquiry(1, 0x83))).data)
    assert [x for x in d1 if x[0] == 0] == [x for x in d1b if x[0] == 0]


async def test_block_limits_and_provisioning_pages():
    lu = make_lu("ram", block_size=512)
    ini = Initiator(lu)
    bl = (await ini.ok(inquiry(1, 0xB0))).data
    assert bl[3] == 0x3C
    max_cmp = bl[5]
    opt_gran, max_xfer, opt_xfer = struct.unpack_from(">HII", bl, 6)
    max_unmap, max_desc, gran = struct.unpack_from(">III", bl, 20)
    max_ws = struct.unpack_from(">Q", bl, 36)[0]
    assert max_cmp >= 1 and max_xfer >= 256 and opt_gran == 1  # physical = logical by default
    assert max_unmap >= 8 and max_desc >= 1 and gran == 8
    assert max_ws >= 256
    max_atomic = struct.unpack_from(">I", bl, 44)[0]
    assert 0 < max_atomic <= max_xfer
    lbp = (await ini.ok(inquiry(1, 0xB2))).data
    assert lbp[5] & 0xE4 == 0xE4  # LBPU, LBPWS, LBPWS10, LBPRZ
    assert lbp[6] & 0x07 == 2  # thin
    bdc = (await ini.ok(inquiry(1, 0xB1))).data
    assert struct.unpack_from(">H", bdc, 4)[0] == 1  # non-rotating


async def test_read_capacity():
    lu = make_lu("ram", size=1 << 20, block_size=4096)
    ini = Initiator(lu)
    await ini.clear_ua()
    r10 = (await ini.ok(bytes((0x25,)) + bytes(9))).data
    assert struct.unpack(">II", r10) == (255, 4096)
    r16 = (await ini.ok(read_capacity16(32))).data
    lba, bl, p, exp, b14 = struct.unpack_from(">QIBBB", r16)
    assert (lba, bl, p, exp & 0x0F) == (255, 4096, 0, 0)
    assert b14 & 0xC0 == 0xC0  # LBPME, LBPRZ
    for alloc in range(0, 16):
        assert len((await ini.ok(read_capacity16(alloc))).data) == alloc
    assert (await ini.fails(bytes((0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0)))).code == INVALID_FIELD  # LBA w/o PMI


async def test_read_capacity16_reports_physical_block_exponent():
    ini = Initiator(make_lu("ram", block_size=512))
    await ini.clear_ua()
    assert (await ini.ok(read_capacity16())).data[13] & 0x0F == 0
    lu = make_lu("ram", block_size=512, physical_block_size=4096)
    ini = Initiator(lu)
    await ini.clear_ua()
    assert (await ini.ok(read_capacity16())).data[13] & 0x0F == 3  # 8 logical blocks per physical block
    assert struct.unpack_from(">H", (await ini.ok(inquiry(1, 0xB0))).data, 6)[0] == 8
    with pytest.raises(ValueError):
        make_lu("ram", block_size=512, physical_block_size=1536)


def test_lun_encoding_round_trip():
    assert encode_lun(0) == bytes(8)
    assert encode_lun(5)[:2] == b"\x00\x05"
    assert encode_lun(300)[:2] == bytes((0x41, 0x2C))
    for n in (0, 1, 255, 256, 16383):
        assert decode_lun(encode_lun(n)) == n


async def test_report_luns_and_missing_lun():
    m = LunMap({0: make_lu("ram", serial="a"), 300: make_lu("ram", serial="b")})
    ini = Initiator(m, lun=0)
    d = (await ini.ok(report_luns())).data
    assert struct.unpack_from(">I", d)[0] == 16
    assert d[8:16] == encode_lun(0) and d[16:24] == encode_lun(300)
    assert len((await ini.ok(report_luns(alloc=16))).data) == 16
    # through a LUN that has no LU: REPORT LUNS works, INQUIRY says "no device here"
    ghost = Initiator(m, lun=7)
    assert (await ghost.ok(report_luns())).data == d
    inq = (await ghost.ok(inquiry(alloc=96))).data
    assert inq[0] == 0x7F
    rs = (await ghost.ok(bytes((0x03, 0, 0, 0, 18, 0)))).data
    assert (rs[2] & 0xF, rs[12], rs[13]) == (0x5, 0x25, 0x00)
    assert (await ghost.fails(bytes(6))).code == (0x5, 0x25, 0x00)
    assert m.data_out_length(7, bytes((0x2A,)) + bytes(15)) == 0
