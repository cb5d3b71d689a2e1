"""LOG SENSE (SPC-4 §6.6): the pages a virtual disk reports, byte for byte, in-process."""
from __future__ import annotations

import struct

from tests.unit.test_scsi_support import Initiator, make_lu

ILLEGAL_FIELD = (0x5, 0x24, 0x00)
BLOCK = 512


def log_sense(page: int, subpage: int = 0, *, pointer: int = 0, alloc: int = 1024, sp: int = 0,
              pc: int = 1) -> bytes:
    return bytes((0x4D, sp, (pc << 6) | page, subpage, 0)) + struct.pack(">HHB", pointer, alloc, 0)


def params(page: bytes) -> dict[int, bytes]:
    """Parameter code -> (control byte, value) of a log page."""
    out = {}
    pos, end = 4, 4 + struct.unpack_from(">H", page, 2)[0]
    while pos < end:
        code, control, length = struct.unpack_from(">HBB", page, pos)
        out[code] = bytes([control]) + page[pos + 4:pos + 4 + length]
        pos += 4 + length
    assert pos == end, "parameters fill the page exactly"
    return out


async def ready(lu) -> Initiator:
    ini = Initiator(lu)
    await ini.clear_ua()
    return ini


async def test_supported_pages_list_what_the_lu_answers(tmp_path):
    file_ini = await ready(make_lu("file", tmp_path))
    data = bytes((await file_ini.ok(log_sense(0x00))).data)
    assert data[:2] == b"\x80\x00" and data[4:] == bytes([0x00, 0x0C, 0x2F])
    assert struct.unpack_from(">H", data, 2)[0] == 3
    data = bytes((await file_ini.ok(log_sense(0x00, 0xFF))).data)
    assert data[0] & 0x40 and data[0] & 0x3F == 0 and data[1] == 0xFF, "SPF set on a subpage list"
    pairs = [tuple(data[i:i + 2]) for i in range(4, len(data), 2)]
    assert pairs == [(0x00, 0x00), (0x00, 0xFF), (0x0C, 0x00), (0x2F, 0x00)]
    for page, subpage in pairs:           # every page listed really answers
        await file_ini.ok(log_sense(page, subpage))
    # A backstore that cannot tell how much it occupies does not offer the provisioning page.
    ram_ini = await ready(make_lu("ram"))
    data = bytes((await ram_ini.ok(log_sense(0x00))).data)
    assert data[4:] == bytes([0x00, 0x2F])
    assert (await ram_ini.fails(log_sense(0x0C))).code == ILLEGAL_FIELD


async def test_provisioning_page_follows_writes_and_unmaps(tmp_path):
    lu = make_lu("file", tmp_path, size=64 << 20)
    ini = await ready(lu)

    async def counts() -> tuple[int, int]:
        p = params(bytes((await ini.ok(log_sense(0x0C))).data))
        assert sorted(p) == [1, 2]
        for raw in p.values():
            assert raw[0] == 0x23 and len(raw) == 9, "TSD + binary list; 8-byte value"
            assert raw[5] & 0x03 == 0x02, "scope: resources shared with other LUs"
        return struct.unpack_from(">I", p[1], 1)[0], struct.unpack_from(">I", p[2], 1)[0]

    available0, used0 = await counts()
    assert used0 < 256, "a fresh sparse image occupies (almost) nothing"
    assert available0 <= lu.num_blocks - used0
    blocks = 8192                          # 4 MiB written at LBA 0
    write16 = bytes((0x8A, 0)) + struct.pack(">QIBB", 0, blocks, 0, 0)
    await ini.ok(write16, b"\x5a" * (blocks * BLOCK))
    available1, used1 = await counts()
    assert used1 >= used0 + blocks and available1 <= lu.num_blocks - used1
    unmap = bytes((0x42, 0, 0, 0, 0, 0, 0)) + struct.pack(">HB", 24, 0)
    descriptor = struct.pack(">QI4x", 0, blocks)
    await ini.ok(unmap, struct.pack(">HH4x", 22, 16) + descriptor)
    _, used2 = await counts()
    assert used2 <= used1 - blocks, "unmapped blocks are given back"


async def test_parameter_pointer_and_allocation_length(tmp_path):
    ini = await ready(make_lu("file", tmp_path))
    only_used = bytes((await ini.ok(log_sense(0x0C, pointer=2))).data)
    assert sorted(params(only_used)) == [2]
    sense = await ini.fails(log_sense(0x0C, pointer=3))
    assert sense.code == ILLEGAL_FIELD and sense.sks[1:] == b"\x00\x05", "points at PARAMETER POINTER"
    full = bytes((await ini.ok(log_sense(0x0C))).data)
    cut = bytes((await ini.ok(log_sense(0x0C, alloc=4))).data)
    assert cut == full[:4] and struct.unpack_from(">H", cut, 2)[0] == len(full) - 4


async def test_informational_exceptions_reports_no_failure(tmp_path):
    ini = await ready(make_lu("file", tmp_path))
    page = bytes((await ini.ok(log_sense(0x2F))).data)
    assert page[0] == 0x80 | 0x2F
    general = params(page)[0]
    assert general[1:3] == b"\x00\x00", "ASC/ASCQ 00h: no failure predicted"
    assert general[3] == 0xFF, "no temperature reading on a virtual disk"


async def test_bad_fields_are_refused_with_a_pointer(tmp_path):
    ini = await ready(make_lu("file", tmp_path))
    for cdb, byte in [(log_sense(0x0C, sp=1), 1), (log_sense(0x0D), 2), (log_sense(0x0C, 0x01), 3),
                      (log_sense(0x00, pointer=1), 5)]:
        sense = await ini.fails(cdb)
        assert sense.code == ILLEGAL_FIELD, cdb.hex()
        assert sense.sks[1:] == bytes((0, byte)), cdb.hex()
    # Every page control reads the same values (no thresholds are kept).
    pages = {bytes((await ini.ok(log_sense(0x2F, pc=pc))).data) for pc in range(4)}
    assert len(pages) == 1


async def test_report_supported_operation_codes_lists_log_sense(tmp_path):
    ini = await ready(make_lu("file", tmp_path))
    cdb = bytes((0xA3, 0x0C, 0x01, 0x4D, 0, 0)) + struct.pack(">IBB", 64, 0, 0)
    data = bytes((await ini.ok(cdb)).data)
    assert data[1] & 0x07 == 0x03, "supported, as the standard says"
    size = struct.unpack_from(">H", data, 2)[0]
    assert size == 10 and data[4] == 0x4D
