"""REPORT SUPPORTED OPERATION CODES / TMFs, REPORT TARGET PORT GROUPS, removable medium,
PRE-FETCH, READ DEFECT DATA, SANITIZE, SEND DIAGNOSTIC, and the reservation hook."""
from __future__ import annotations

import asyncio
import struct

from iscsi.scsi.types import Status

from .test_scsi_support import (
    NEXUS_A, NEXUS_B, Initiator, make_lu, parse_sense, read10, request_sense, rsoc, rw10, rw16, write10,
)

INVALID_FIELD = (0x5, 0x24, 0x00)
NO_MEDIUM = (0x2, 0x3A, 0x00)


async def ready(lu, nexus=NEXUS_A) -> Initiator:
    ini = Initiator(lu, nexus)
    await ini.clear_ua()
    return ini


def all_descriptors(data: bytes, rctd: bool = False):
    n = struct.unpack_from(">I", data)[0]
    out, pos = [], 4
    while pos < 4 + n:
        op, sa, flags, cdblen = struct.unpack_from(">BxHxBH", data, pos)
        out.append((op, sa, flags, cdblen))
        pos += 8 + (12 if flags & 0x02 else 0)
    return out


async def test_report_supported_operation_codes_all_and_one():
    lu = make_lu("ram")
    ini = await ready(lu)
    descs = all_descriptors((await ini.ok(rsoc())).data)
    ops = {(d[0], d[1] if d[2] & 1 else None) for d in descs}
    for must in [(0x28, None), (0x2A, None), (0x88, None), (0x8A, None), (0x89, None), (0x42, None),
                 (0x93, None), (0x9E, 0x10), (0x9E, 0x12), (0xA3, 0x0C)]:
        assert must in ops
    for op, sa, flags, cdblen in descs:
        if not flags & 0x01:
            assert sa == 0
            one = (await ini.ok(rsoc(1, op))).data
            assert one[1] & 0x07 == 0x03 and one[4] == op
            assert struct.unpack_from(">H", one, 2)[0] == cdblen == len(one) - 4
            assert (await ini.fails(rsoc(2, op, sa))).code == INVALID_FIELD
        else:
            one = (await ini.ok(rsoc(2, op, sa))).data
            assert one[1] & 0x07 == 0x03 and one[4] == op
            assert (await ini.fails(rsoc(1, op))).code == INVALID_FIELD
    # DPO/FUA usage bits where DPOFUA=1
    for op in (0x28, 0x2A, 0x88, 0x8A, 0x89):
        assert (await ini.ok(rsoc(1, op))).data[5] & 0x18 == 0x18
    assert (await ini.ok(rsoc(1, 0xC5))).data[1] & 0x07 == 0x01  # not supported
    timed = all_descriptors((await ini.ok(rsoc(rctd=1))).data)
    assert timed and all(d[2] & 0x02 for d in timed)
    one = (await ini.ok(rsoc(1, 0x28, rctd=1))).data
    assert one[1] & 0x80 and struct.unpack_from(">H", one, 4 + 10)[0] == 0x0A


async def test_report_supported_tmfs_and_target_port_groups():
    lu = make_lu("ram")
    ini = await ready(lu, NEXUS_B)
    d = (await ini.ok(struct.pack(">BBBxxxIBB", 0xA3, 0x0D, 0, 4, 0, 0))).data
    assert d[0] & 0xC8 == 0xC8  # ABORT TASK, ABORT TASK SET, LOGICAL UNIT RESET
    assert (await ini.fails(struct.pack(">BBBxxxIBB", 0xA3, 0x0D, 0, 3, 0, 0))).code == INVALID_FIELD
    d = (await ini.ok(struct.pack(">BBxxxxIBB", 0xA3, 0x0A, 256, 0, 0))).data
    assert struct.unpack_from(">I", d)[0] == len(d) - 4 == 12
    assert d[4] & 0x0F == 0 and struct.unpack_from(">H", d, 6)[0] == NEXUS_B.target_port_group
    assert struct.unpack_from(">H", d, 14)[0] == NEXUS_B.relative_port_id
    inq = (await ini.ok(bytes((0x12, 0, 0, 0, 96, 0)))).data
    assert (inq[5] >> 4) & 3 == 1  # TPGS: implicit ALUA


async def test_prefetch_and_read_defect_data():
    lu = make_lu("ram")
    ini = await ready(lu)
    assert (await ini.ok(rw10(0x34, 0, 8))).status == Status.GOOD
    await ini.ok(rw16(0x90, lu.num_blocks - 1, 1, 0x02))
    assert (await ini.fails(rw10(0x34, lu.num_blocks, 1))).code == (0x5, 0x21, 0x00)
    d = (await ini.ok(bytes((0x37, 0, 0x18, 0, 0, 0, 0, 0, 32, 0)))).data
    assert len(d) == 4 and struct.unpack_from(">H", d, 2)[0] == 0
    d = (await ini.ok(bytes((0xB7, 0x00, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0)))).data
    assert len(d) == 8 and struct.unpack_from(">I", d, 4)[0] == 0


def ssu(loej: int, start: int, power: int = 0) -> bytes:
    return bytes((0x1B, 0, 0, 0, (power << 4) | (loej << 1) | start, 0))


def prevent(on: int) -> bytes:
    return bytes((0x1E, 0, 0, 0, on, 0))


async def test_removable_medium_eject_load_and_prevent():
    lu = make_lu("ram", removable=True)
    a = await ready(lu)
    assert (await a.ok(bytes((0x12, 0, 0, 0, 36, 0)))).data[1] & 0x80  # RMB
    await a.ok(ssu(1, 0))  # eject
    assert (await a.fails(bytes(6))).code == NO_MEDIUM
    assert (await a.fails(read10(0, 1))).code == NO_MEDIUM
    assert (await a.fails(write10(0, 1), bytes(512))).code == NO_MEDIUM
    rs = parse_sense((await a.ok(request_sense())).data)
    assert rs.code == NO_MEDIUM
    await a.ok(bytes((0x12, 0, 0, 0, 36, 0)))  # INQUIRY still answers
    await a.ok(ssu(1, 1))  # load
    await a.ok(bytes(6))
    # PREVENT from one nexus stops removal for everybody, until it allows again
    b = await ready(lu, NEXUS_B)
    await a.ok(prevent(1))
    assert (await a.fails(ssu(1, 0))).code == (0x5, 0x53, 0x02)
    assert (await b.fails(ssu(1, 0))).code == (0x5, 0x53, 0x02)
    await a.ok(ssu(1, 0, power=3))  # a power condition ignores LOEJ/START
    await a.ok(bytes(6))
    await a.ok(prevent(0))
    await b.ok(ssu(1, 0))
    await b.ok(ssu(1, 1))
    # the other nexus learns that the medium changed
    assert (await a.fails(bytes(6))).code == (0x6, 0x28, 0x00)
    # prevention ends with the nexus and with resets
    await a.ok(prevent(1))
    lu.nexus_lost(NEXUS_A)
    await b.clear_ua()
    await b.ok(ssu(1, 0))
    await b.ok(ssu(1, 1))
    await a.clear_ua()
    await a.ok(prevent(1))
    lu.lun_reset()
    await a.clear_ua()
    await a.ok(ssu(1, 0))
    await a.ok(ssu(1, 1))
    assert (await a.fails(prevent(2))).code == INVALID_FIELD


async def test_non_removable_ignores_eject():
    lu = make_lu("ram")
    ini = await ready(lu)
    await ini.ok(ssu(1, 0))
    await ini.ok(bytes(6))
    await ini.ok(prevent(1))


async def test_send_diagnostic_default_self_test():
    lu = make_lu("ram")
    ini = await ready(lu)
    await ini.ok(bytes((0x1D, 0x04, 0, 0, 0, 0)))
    assert (await ini.fails(bytes((0x1D, 0x04 | 0x20, 0, 0, 0, 0)))).code == INVALID_FIELD


def sanitize_cdb(sa: int, plen: int = 0, immed: int = 0) -> bytes:
    return bytes((0x48, sa | (0x80 if immed else 0), 0, 0, 0, 0, 0)) + struct.pack(">HB", plen, 0)


async def test_sanitize_block_erase_and_overwrite():
    lu = make_lu("ram", size=1 << 20)
    ini = await ready(lu)
    await ini.ok(write10(0, 8), b"a" * 4096)
    await ini.ok(sanitize_cdb(0x02))
    assert (await ini.ok(read10(0, 8))).data == bytes(4096)
    params = bytes((0x01, 0, 0, 4)) + b"\xde\xad\xbe\xef"
    await ini.ok(sanitize_cdb(0x01, len(params)), params)
    assert (await ini.ok(read10(lu.num_blocks - 1, 1))).data == b"\xde\xad\xbe\xef" * 128
    for plen in range(0, 5):
        assert (await ini.fails(sanitize_cdb(0x01, plen), params[:plen])).key == 0x5
    assert (await ini.fails(sanitize_cdb(0x02, 8), bytes(8))).code == INVALID_FIELD
    for sa in (0x00, 0x04, 0x1E):
        assert (await ini.fails(sanitize_cdb(sa))).code == INVALID_FIELD
    bad = bytearray(sanitize_cdb(0x02))
    bad[3] = 1  # reserved byte
    assert (await ini.fails(bytes(bad))).code == INVALID_FIELD


async def test_sanitize_immed_reports_in_progress():
    lu = make_lu("ram", size=1 << 20)
    ini = await ready(lu)
    import threading
    gate = threading.Event()
    real = lu.backstore.unmap
    lu.backstore.unmap = lambda off, n: (gate.wait(10), real(off, n))
    await ini.ok(sanitize_cdb(0x02, immed=1))
    s = await ini.fails(bytes(6))
    assert s.code == (0x2, 0x04, 0x1B)
    await ini.ok(bytes((0x12, 0, 0, 0, 36, 0)))
    assert parse_sense((await ini.ok(request_sense())).data).code == (0x2, 0x04, 0x1B)
    gate.set()
    for _ in range(200):
        if not lu.sanitizing:
            break
        await asyncio.sleep(0.01)
    await ini.ok(bytes(6))


async def test_sanitize_on_read_only_lu():
    lu = make_lu("ram", read_only=True)
    ini = await ready(lu)
    assert (await ini.fails(sanitize_cdb(0x02))).code == (0x7, 0x27, 0x00)


async def test_reservations_are_routed_to_pr():
    lu = make_lu("ram")
    assert lu.pr is not None
    a, b = await ready(lu, NEXUS_A), await ready(lu, NEXUS_B)
    await a.ok(bytes((0x16, 0, 0, 0, 0, 0)))  # RESERVE(6)
    r = await b.cmd(read10(0, 1))
    assert r.status == Status.RESERVATION_CONFLICT and not r.sense
    await a.ok(read10(0, 1))
    lu.lun_reset()  # SPC-2 reservations end with a LUN reset
    await a.clear_ua()
    await b.clear_ua()
    await b.ok(read10(0, 1))
    # persistent reservation commands are reachable: READ KEYS
    d = (await a.ok(bytes((0x5E, 0, 0, 0, 0, 0, 0, 0, 8, 0)))).data
    assert len(d) == 8


async def test_lu_without_pr_refuses_reservation_opcodes():
    lu = make_lu("ram", enable_pr=False)
    ini = await ready(lu)
    assert (await ini.fails(bytes((0x16, 0, 0, 0, 0, 0)))).code == (0x5, 0x20, 0x00)
    assert (await ini.fails(bytes((0x5E,)) + bytes(9))).code == (0x5, 0x20, 0x00)


async def test_extended_copy_between_two_lus():
    """The copy manager is shared: a block-to-block segment copies LU 1 -> LU 2 by NAA designator."""
    src, dst = make_lu("ram", serial="xsrc"), make_lu("ram", serial="xdst")
    a = await ready(src)
    await a.ok(write10(0, 4), b"C" * 2048)

    def cscd(naa: bytes) -> bytes:
        desig = bytes((0x01, 0x03, 0x00, 0x08)) + naa
        # E4h identification CSCD: designation descriptor in bytes 4-23, block length in 29-31
        return bytes((0xE4, 0, 0, 0)) + desig + bytes(20 - len(desig)) + bytes(4) + struct.pack(">I", 512)

    cscds = cscd(src.naa) + cscd(dst.naa)
    seg = struct.pack(">BBHHH2xHQQ", 0x02, 0, 0x18, 0, 1, 4, 0, 10)
    header = struct.pack(">BBH4xII", 0, 0x18, len(cscds), len(seg), 0)
    params = header + cscds + seg
    cdb = bytes((0x83, 0)) + bytes(8) + struct.pack(">I", len(params)) + b"\x00\x00"
    r = await a.cmd(cdb, params)
    assert r.status == Status.GOOD, parse_sense(r.sense)
    b = await ready(dst)
    assert (await b.ok(read10(10, 4))).data == b"C" * 2048
    inq = (await a.ok(bytes((0x12, 0, 0, 0, 36, 0)))).data
    assert inq[5] & 0x08  # 3PC
    await a.ok(bytes((0x12, 1, 0x8F, 1, 0, 0)))


async def test_sanitize_failure_mode_until_exit():
    lu = make_lu("ram", size=1 << 20)
    ini = await ready(lu)

    def broken(off, data, fua=False):
        raise OSError(5, "EIO")

    real = lu.backstore.write
    lu.backstore.write = broken
    params = bytes((0x01, 0, 0, 4)) + b"\x01\x02\x03\x04"
    # AUSE=1: the initiator allows EXIT FAILURE MODE should this sanitize fail (SBC-4 §5.30.1).
    s = await ini.fails(sanitize_cdb(0x21, len(params)), params)
    assert s.code == (0x3, 0x31, 0x03)
    lu.backstore.write = real
    assert (await ini.fails(read10(0, 1))).code == (0x3, 0x31, 0x03)
    await ini.ok(bytes((0x12, 0, 0, 0, 36, 0)))
    await ini.ok(sanitize_cdb(0x1F))  # EXIT FAILURE MODE
    await ini.ok(read10(0, 1))


def prout(sa: int, key: int, sa_key: int = 0, prtype: int = 0) -> tuple[bytes, bytes]:
    params = struct.pack(">QQ4xBxH", key, sa_key, 0, 0)
    return bytes((0x5F, sa, prtype, 0, 0)) + struct.pack(">IB", len(params), 0), params


async def test_persistent_reservation_unit_attentions_reach_the_right_nexus():
    """pr.py's ua_sink targets are mapped onto the LU's nexuses (PREEMPT -> REGISTRATIONS PREEMPTED)."""
    lu = make_lu("ram")
    a, b = await ready(lu, NEXUS_A), await ready(lu, NEXUS_B)
    await a.ok(*prout(0x00, 0, sa_key=0xA))  # REGISTER key A
    await b.ok(*prout(0x00, 0, sa_key=0xB))  # REGISTER key B
    await a.ok(*prout(0x01, 0xA, prtype=0x01))  # RESERVE, Write Exclusive
    r = await b.cmd(write10(0, 1), bytes(512))
    assert r.status == Status.RESERVATION_CONFLICT
    await b.ok(read10(0, 1))  # reads pass a Write Exclusive reservation
    await b.ok(*prout(0x04, 0xB, sa_key=0xA, prtype=0x01))  # PREEMPT A
    assert (await a.fails(bytes(6))).code == (0x6, 0x2A, 0x05)  # REGISTRATIONS PREEMPTED
    await b.ok(write10(0, 1), bytes(512))


async def test_sanitize_overwrite_without_room_for_it_is_refused_before_it_starts(tmp_path):
    """A thin LU whose filesystem cannot hold every block: OVERWRITE would fill it hours in
    (and starve the other images there), then fail.  It is refused at once with DATA
    PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT (SBC-4 §4.7.3.7), nothing started; an
    all-zero pattern deallocates instead and needs no room."""
    lu = make_lu("file", tmp_path, size=8 << 20)
    ini = await ready(lu)
    await ini.ok(write10(0, 8), b"a" * 4096)
    lu.backstore.free_bytes = lambda: (8 << 20) // 2        # half of what the LU needs
    params = bytes((0x01, 0, 0, 4)) + b"\xde\xad\xbe\xef"
    refused = await ini.fails(sanitize_cdb(0x01, len(params)), params)
    assert refused.code == (0x7, 0x27, 0x07)
    assert not lu.sanitizing and not lu.sanitize_failed
    assert (await ini.ok(read10(0, 8))).data == b"a" * 4096   # nothing was overwritten
    zeros = bytes((0x01, 0, 0, 4)) + bytes(4)
    await ini.ok(sanitize_cdb(0x01, len(zeros)), zeros)
    assert (await ini.ok(read10(0, 8))).data == bytes(4096)
    lu.backstore.free_bytes = lambda: 1 << 40                  # room enough: the pattern is written
    await ini.ok(sanitize_cdb(0x01, len(params)), params)
    assert (await ini.ok(read10(lu.num_blocks - 1, 1))).data == b"\xde\xad\xbe\xef" * 128
