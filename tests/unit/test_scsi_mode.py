"""MODE SENSE / MODE SELECT: pages, page control, DBD, truncation, D_SENSE, SWP, WCE."""
from __future__ import annotations

import struct

from .test_scsi_support import (
    NEXUS_A, NEXUS_B, Initiator, make_lu, mode_select6, mode_sense6, mode_sense10, read10, read16, write10,
)

INVALID_FIELD = (0x5, 0x24, 0x00)
INVALID_PARAM = (0x5, 0x26, 0x00)


def pages(data: bytes, hdr: int, bd_len: int) -> dict[int, bytes]:
    out = {}
    pos = hdr + bd_len
    while pos < len(data):
        code, n = data[pos] & 0x3F, data[pos + 1]
        out[code] = data[pos:pos + 2 + n]
        pos += 2 + n
    return out


async def ready(lu, nexus=NEXUS_A):
    ini = Initiator(lu, nexus)
    await ini.clear_ua()
    return ini


async def test_mode_sense6_all_pages():
    lu = make_lu("ram")
    ini = await ready(lu)
    d = (await ini.ok(mode_sense6())).data
    assert d[0] + 1 == len(d)
    assert d[3] == 8  # short block descriptor
    nblocks, blen = struct.unpack_from(">I", d, 4)[0], int.from_bytes(d[9:12], "big")
    assert (nblocks, blen) == (lu.num_blocks, 512)
    pg = pages(d, 4, 8)
    assert set(pg) >= {0x08, 0x0A, 0x1C}
    assert pg[0x08][2] & 0x04  # WCE
    assert pg[0x0A][1] == 0x0A and pg[0x1C][1] == 0x0A


async def test_mode_sense_dbd_single_page_and_truncation():
    lu = make_lu("ram")
    ini = await ready(lu)
    d = (await ini.ok(mode_sense6(0x0A, dbd=1))).data
    assert d[3] == 0 and len(d) == 4 + 12 and d[4] & 0x3F == 0x0A
    full = (await ini.ok(mode_sense6())).data
    d4 = (await ini.ok(mode_sense6(alloc=4))).data
    assert d4 == full[:4]  # header says the full length, data is cut
    assert (await ini.fails(mode_sense6(0x05))).code == INVALID_FIELD  # unsupported page
    assert (await ini.fails(mode_sense6(0x3F, subpage=0x01))).code == INVALID_FIELD


async def test_mode_sense10_long_lba_descriptor():
    lu = make_lu("ram")
    ini = await ready(lu)
    d = (await ini.ok(mode_sense10(llbaa=1))).data
    assert struct.unpack_from(">H", d)[0] + 2 == len(d)
    assert d[4] & 0x01 and struct.unpack_from(">H", d, 6)[0] == 16
    assert struct.unpack_from(">Q", d, 8)[0] == lu.num_blocks
    d = (await ini.ok(mode_sense10(dbd=1))).data
    assert struct.unpack_from(">H", d, 6)[0] == 0


async def test_page_control_changeable_default_saved():
    lu = make_lu("ram")
    ini = await ready(lu)
    ch = pages((await ini.ok(mode_sense6(pc=1, dbd=1))).data, 4, 0)
    assert ch[0x0A][2] == 0x04 and ch[0x0A][4] == 0x08  # D_SENSE, SWP
    assert ch[0x08][2] == 0x04  # WCE
    assert not any(ch[0x1C][2:])
    default = pages((await ini.ok(mode_sense6(pc=2, dbd=1))).data, 4, 0)
    saved = pages((await ini.ok(mode_sense6(pc=3, dbd=1))).data, 4, 0)
    assert default[0x0A][2:] == saved[0x0A][2:]


def control_page(d_sense=0, swp=0) -> bytes:
    p = bytearray(12)
    p[0], p[1] = 0x0A, 0x0A
    p[2] = 0x04 if d_sense else 0
    p[3] = 0x10
    p[4] = 0x08 if swp else 0
    p[8:10] = b"\xff\xff"
    return bytes(p)


async def test_mode_select_d_sense_switches_sense_format_and_raises_ua_elsewhere():
    lu = make_lu("ram")
    a = await ready(lu, NEXUS_A)
    b = await ready(lu, NEXUS_B)
    fixed = await a.fails(read16(1 << 40, 1))
    assert not fixed.descriptor
    params = bytes(4) + control_page(d_sense=1)
    await a.ok(mode_select6(len(params)), params)
    s = await a.fails(read16(1 << 40, 1))
    assert s.descriptor and s.code == (0x5, 0x21, 0x00)
    # the other nexus learns that mode parameters changed
    ua = await b.fails(bytes(6))
    assert ua.code[:3] == (0x6, 0x2A, 0x01)
    assert await a.clear_ua() == 0


async def test_software_write_protect():
    lu = make_lu("ram")
    ini = await ready(lu)
    params = bytes(4) + control_page(swp=1)
    await ini.ok(mode_select6(len(params)), params)
    assert (await ini.ok(mode_sense6())).data[2] & 0x80  # WP
    assert (await ini.fails(write10(0, 1), bytes(512))).code == (0x7, 0x27, 0x02)
    await ini.ok(read10(0, 1))
    params = bytes(4) + control_page(swp=0)
    await ini.ok(mode_select6(len(params)), params)
    await ini.ok(write10(0, 1), bytes(512))


async def test_mode_select_refuses_unchangeable_bits_and_bad_lists():
    lu = make_lu("ram")
    ini = await ready(lu)
    bad = bytearray(control_page())
    bad[3] = 0x00  # QUEUE ALGORITHM MODIFIER is not changeable
    s = await ini.fails(mode_select6(16), bytes(4) + bytes(bad))
    assert s.code == INVALID_PARAM and s.sks is not None and (s.sks[1] << 8 | s.sks[2]) == 4 + 3
    assert (await ini.fails(mode_select6(6), bytes(4) + b"\x05\x00")).code == INVALID_PARAM  # unknown page
    assert (await ini.fails(mode_select6(16, pf=0), bytes(4) + control_page())).code == INVALID_FIELD
    short = bytes(4) + control_page()[:8]
    assert (await ini.fails(mode_select6(len(short)), short)).code == (0x5, 0x1A, 0x00)
    # a good block descriptor (same block length) is accepted; a different one is not
    bd = struct.pack(">IxBH", 0, 0, 512)
    await ini.ok(mode_select6(4 + 8 + 12), bytes((0, 0, 0, 8)) + bd + control_page())
    bd = struct.pack(">IxBH", 0, 0, 4096)
    assert (await ini.fails(mode_select6(4 + 8 + 12), bytes((0, 0, 0, 8)) + bd + control_page())).code == INVALID_PARAM
    await ini.ok(mode_select6(0))


async def test_wce_off_makes_every_write_stable():
    lu = make_lu("ram")
    ini = await ready(lu)
    caching = bytearray(20)
    caching[0], caching[1] = 0x08, 0x12
    await ini.ok(mode_select6(24), bytes(4) + bytes(caching))
    before = lu.backstore.flushes
    await ini.ok(write10(0, 1), bytes(512))
    assert lu.backstore.flushes == before + 1


async def test_saved_values_survive_lun_reset_current_do_not():
    lu = make_lu("ram")
    ini = await ready(lu)
    params = bytes(4) + control_page(d_sense=1)
    await ini.ok(mode_select6(len(params)), params)
    lu.lun_reset()
    await ini.clear_ua()
    assert not lu.mode.d_sense  # current reverted to saved (default)
    await ini.ok(mode_select6(len(params), sp=1), params)
    lu.lun_reset()
    assert lu.mode.d_sense
    assert lu.mode.saved_state()[0x0A][2] & 0x04
