"""Review of the block device's SCSI semantics against SPC-4/SBC-4, driven in-process.

Each test pins one behaviour a real initiator (Linux sd, ESXi, Windows, libiscsi's
iscsi-test-cu) relies on, asserting the bytes the logical unit answers.
"""
from __future__ import annotations

import asyncio
import struct
import threading

import pytest

from tests.unit.test_scsi_support import Initiator, make_lu, parse_sense, request_sense

NOT_READY_SANITIZE = (0x2, 0x04, 0x1B)


async def ready(lu) -> Initiator:
    ini = Initiator(lu)
    await ini.clear_ua()
    return ini


def sanitize_cdb(sa: int, plen: int = 0, immed: int = 0) -> bytes:
    return bytes((0x48, sa | (0x80 if immed else 0), 0, 0, 0, 0, 0)) + struct.pack(">HB", plen, 0)


async def test_sanitize_in_progress_sense_carries_progress_indication():
    """SBC-4 §4.11: REQUEST SENSE during a sanitize returns NOT READY, SANITIZE IN PROGRESS with
    the PROGRESS INDICATION in the sense-key specific field (SKSV=1, bytes 16-17 fixed format)."""
    lu = make_lu("ram", size=1 << 20)
    ini = await ready(lu)
    gate = threading.Event()
    real = lu.backstore.write
    calls = []

    def slow_write(off, data, fua=False):
        calls.append(off)
        if len(calls) == 2:  # first chunk written, hold the second
            gate.wait(10)
        return real(off, data, fua)

    lu.backstore.write = slow_write
    import iscsi.scsi.lu as lu_mod
    old_chunk = lu_mod.SANITIZE_CHUNK_BYTES
    lu_mod.SANITIZE_CHUNK_BYTES = 256 << 10  # 4 chunks over the 1 MiB LU
    try:
        params = bytes((0x01, 0, 0, 4)) + b"\xde\xad\xbe\xef"
        await ini.ok(sanitize_cdb(0x01, len(params), immed=1), params)
        for _ in range(200):
            if len(calls) >= 2:
                break
            await asyncio.sleep(0.005)
        raw = bytes((await ini.ok(request_sense(0))).data)
        assert raw[0] == 0x70 and raw[2] & 0x0F == 0x2 and raw[12:14] == b"\x04\x1b"
        assert raw[15] == 0x80  # SKSV, progress indication
        assert struct.unpack_from(">H", raw, 16)[0] == 0x4000  # one quarter done
        raw = bytes((await ini.ok(request_sense(1))).data)
        assert raw[:4] == b"\x72\x02\x04\x1b"
        assert raw[8:16] == b"\x02\x06\x00\x00\x80\x40\x00\x00"
        s = await ini.fails(bytes(6))  # TEST UNIT READY refused with the same progress
        assert s.code == NOT_READY_SANITIZE and s.sks == b"\x80\x40\x00"
    finally:
        gate.set()
        lu_mod.SANITIZE_CHUNK_BYTES = old_chunk
        for _ in range(400):
            if not lu.sanitizing:
                break
            await asyncio.sleep(0.01)
    assert not lu.sanitizing


# -- MODE SELECT SP=1 (SPC-4 §6.9) ---------------------------------------------------------

def _mode_select6(plen: int, sp: int) -> bytes:
    return bytes((0x15, 0x10 | sp, 0, 0, plen, 0))


def _caching(wce: int) -> bytes:
    page = bytearray(20)
    page[0], page[1], page[2] = 0x08, 0x12, 0x04 if wce else 0
    return bytes(4) + bytes(page)


def _control(d_sense: int) -> bytes:
    page = bytearray(12)
    page[0], page[1], page[2], page[3] = 0x0A, 0x0A, 0x04 if d_sense else 0, 0x10
    page[8:10] = b"\xff\xff"
    return bytes(4) + bytes(page)


async def test_mode_select_sp_saves_every_page_not_only_the_ones_sent():
    """SPC-4 §6.9: SP=1 saves all the saveable pages, including the ones changed before with SP=0."""
    lu = make_lu("ram", size=1 << 20)
    ini = await ready(lu)
    await ini.ok(_mode_select6(24, 0), _caching(wce=0))  # current only
    await ini.ok(_mode_select6(16, 1), _control(d_sense=1))  # save: the caching page too
    saved = lu.mode.saved_state()
    assert saved[0x08][2] & 0x04 == 0 and saved[0x0A][2] & 0x04
    lu.lun_reset()
    assert not lu.mode.wce and lu.mode.d_sense


async def test_mode_select_sp_reaches_the_persist_hook_and_survives_a_restart():
    """SP=1 has to reach nonvolatile storage: WCE=0 saved by the initiator must still hold after
    the LU is rebuilt (else writes are acknowledged from the page cache again)."""
    stored = []
    lu = make_lu("ram", size=1 << 20, mode_persist=stored.append)
    ini = await ready(lu)
    await ini.ok(_mode_select6(24, 1), _caching(wce=0))
    assert stored and stored[-1]["pages"]["08"][4:6] == "00"
    again = make_lu("ram", size=1 << 20, mode_state=stored[-1])
    assert not again.mode.wce
    ini2 = await ready(again)
    d = bytes((await ini2.ok(bytes((0x1A, 0x08, 0x08, 0, 255, 0)))).data)  # MODE SENSE(6) caching
    assert d[4] == 0x88 and d[6] & 0x04 == 0  # PS, WCE=0


async def test_mode_select_sp_persist_failure_changes_nothing():
    def broken(state):
        raise OSError(28, "No space left on device")

    lu = make_lu("ram", size=1 << 20, mode_persist=broken)
    ini = await ready(lu)
    r = await ini.cmd(_mode_select6(24, 1), _caching(wce=0))
    assert r.status == 0x02
    assert lu.mode.wce and lu.mode.saved_state()[0x08][2] & 0x04


# -- Block Limits VPD (SBC-4 §6.6.4) -------------------------------------------------------

async def test_block_limits_atomic_length_fits_write_atomic16():
    """MAXIMUM ATOMIC TRANSFER LENGTH (bytes 44-47) must be expressible in WRITE ATOMIC(16)'s
    16-bit TRANSFER LENGTH and not exceed MAXIMUM TRANSFER LENGTH (bytes 8-11)."""
    lu = make_lu("ram", size=64 << 20)
    ini = await ready(lu)
    page = bytes((await ini.ok(bytes((0x12, 1, 0xB0, 0, 64, 0)))).data)
    max_transfer = struct.unpack_from(">I", page, 8)[0]
    max_atomic = struct.unpack_from(">I", page, 44)[0]
    assert 0 < max_atomic <= min(0xFFFF, max_transfer)
    # and a WRITE ATOMIC(16) of exactly that many blocks is accepted
    cdb = struct.pack(">BBQHHBB", 0x9C, 0, 0, 0, max_atomic, 0, 0)
    await ini.ok(cdb, bytes(max_atomic * 512))


async def test_lbprz_in_vpd_b2_matches_read_capacity16():
    """A thin backstore whose deallocated blocks do not read as zeroes: READ CAPACITY(16) and the
    Logical Block Provisioning VPD page must both say LBPRZ=0 (SBC-4 §5.20, §6.6.6)."""
    from iscsi.backstore.ram import RamBackstore
    from iscsi.scsi.lu import LogicalUnit

    class NotZeroAfterUnmap(RamBackstore):
        unmap_reads_zero = False

    lu = LogicalUnit(NotZeroAfterUnmap(1 << 20), serial="lbprz0")
    ini = await ready(lu)
    rc16 = bytes((await ini.ok(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0))).data)
    b2 = bytes((await ini.ok(bytes((0x12, 1, 0xB2, 0, 64, 0)))).data)
    assert rc16[14] & 0xC0 == 0x80  # LBPME=1, LBPRZ=0
    assert b2[5] & 0xE0 == 0xE0 and b2[5] & 0x1C == 0  # LBPU, LBPWS, LBPWS10; LBPRZ=000b
    default = make_lu("ram", size=1 << 20)
    ini = await ready(default)
    rc16 = bytes((await ini.ok(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0))).data)
    b2 = bytes((await ini.ok(bytes((0x12, 1, 0xB2, 0, 64, 0)))).data)
    assert rc16[14] & 0xC0 == 0xC0 and b2[5] & 0x1C == 0x04


# -- EXTENDED COPY: who may be copied from and to (SPC-4 §6.4, §5.13) ----------------------

from iscsi.scsi.target import LunMap  # noqa: E402
from iscsi.scsi.types import ITNexus, ScsiCommand  # noqa: E402
from iscsi.scsi.xcopy import CopyManager  # noqa: E402

NEXUS_A = ITNexus("iqn.2026-01.org.example:a,i,0x000000000001", "iqn.2026-01.org.example:t1,t,0x0001", 1, 1)
NEXUS_A_T2 = ITNexus("iqn.2026-01.org.example:a,i,0x000000000001", "iqn.2026-01.org.example:t2,t,0x0001", 1, 1)
NEXUS_B = ITNexus("iqn.2026-01.org.example:b,i,0x000000000002", "iqn.2026-01.org.example:t1,t,0x0001", 1, 1)


def _cscd(naa: bytes) -> bytes:
    d = bytearray(32)
    d[0], d[4], d[5], d[7] = 0xE4, 0x01, 0x03, len(naa)
    d[8:8 + len(naa)] = naa
    d[29:32] = (512).to_bytes(3, "big")
    return bytes(d)


def _xcopy(src_naa: bytes, dst_naa: bytes, nblocks: int, src_lba: int, dst_lba: int) -> tuple[bytes, bytes]:
    cscds = _cscd(src_naa) + _cscd(dst_naa)
    seg = struct.pack(">BBHHH2xHQQ", 0x02, 0, 0x18, 0, 1, nblocks, src_lba, dst_lba)
    hdr = bytearray(16)
    hdr[1] = 0b11 << 3  # LIST ID USAGE 11b: no list identifier
    hdr[2:4] = len(cscds).to_bytes(2, "big")
    hdr[8:12] = len(seg).to_bytes(4, "big")
    params = bytes(hdr) + cscds + seg
    return bytes((0x83, 0)) + bytes(8) + len(params).to_bytes(4, "big") + bytes(2), params


async def _run(target, nexus, cdb, data=b"", lun=0):
    return await target.execute(ScsiCommand(bytes(cdb).ljust(16, b"\x00"), lun, nexus, data, len(data)))


async def _clear(target, nexus, lun=0):
    for _ in range(10):
        if (await _run(target, nexus, bytes(6), lun=lun)).status == 0:
            return
    raise AssertionError("unit attentions never cleared")


def _two_targets():
    cm = CopyManager()
    lu1 = make_lu("ram", size=1 << 20, serial="xc-one", copy_manager=cm)
    lu2 = make_lu("ram", size=1 << 20, serial="xc-two", copy_manager=cm)
    return cm, lu1, lu2


async def test_xcopy_cannot_reach_an_lu_of_another_target():
    """The copy manager is daemon-wide; a CSCD naming an LU the I_T nexus cannot address (another
    target, or masked by an ACL) must not let the initiator read or write it."""
    _, lu1, lu2 = _two_targets()
    t1, t2 = LunMap({0: lu1}), LunMap({0: lu2})
    await _clear(t1, NEXUS_A)
    await _clear(t2, NEXUS_A_T2)  # A logged in to target 2 as well: another I_T nexus
    await _run(t1, NEXUS_A, struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0), b"\xAA" * 4096)
    cdb, params = _xcopy(lu1.naa, lu2.naa, 8, 0, 0)  # into the other target's LU
    r = await _run(t1, NEXUS_A, cdb, params)
    assert r.status == 0x02
    s = parse_sense(r.sense)
    assert s.code == (0x0A, 0x0D, 0x02)  # COPY ABORTED, COPY TARGET DEVICE NOT REACHABLE
    assert s.sks == b"\x80\x00\x56"  # parameter list byte 16+64+6: the segment's DESTINATION CSCD INDEX
    assert lu2.backstore.read(0, 4096) == bytes(4096)
    cdb, params = _xcopy(lu2.naa, lu1.naa, 8, 0, 100)  # out of it
    r = await _run(t1, NEXUS_A, cdb, params)
    assert parse_sense(r.sense).code == (0x0A, 0x0D, 0x02)


async def test_xcopy_between_lus_the_nexus_uses_still_works():
    _, lu1, lu2 = _two_targets()
    t = LunMap({0: lu1, 1: lu2})
    await _clear(t, NEXUS_A, 0)
    await _clear(t, NEXUS_A, 1)
    await _run(t, NEXUS_A, struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0), b"\xAB" * 4096)
    cdb, params = _xcopy(lu1.naa, lu2.naa, 8, 0, 16)
    assert (await _run(t, NEXUS_A, cdb, params)).status == 0
    assert lu2.backstore.read(16 * 512, 4096) == b"\xAB" * 4096


async def test_xcopy_does_not_write_through_another_initiators_reservation():
    """LU 1 reserved Write Exclusive by B: A's WRITE there conflicts, so must A's copy into it."""
    _, lu1, lu2 = _two_targets()
    t = LunMap({0: lu1, 1: lu2})
    for nexus in (NEXUS_A, NEXUS_B):
        for lun in (0, 1):
            await _clear(t, nexus, lun)
    key = (0xB0B).to_bytes(8, "big")
    prout = lambda sa, typ=0: bytes((0x5F, sa, typ, 0, 0, 0, 0, 0, 24, 0))  # noqa: E731
    assert (await _run(t, NEXUS_B, prout(0x00), bytes(8) + key + bytes(8), 1)).status == 0  # REGISTER
    assert (await _run(t, NEXUS_B, prout(0x01, 0x01), key + bytes(16), 1)).status == 0  # RESERVE WE
    await _run(t, NEXUS_A, struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0), b"\xCD" * 4096)
    assert (await _run(t, NEXUS_A, struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0), b"\xCD" * 4096, 1)).status == 0x18
    cdb, params = _xcopy(lu1.naa, lu2.naa, 8, 0, 0)
    assert (await _run(t, NEXUS_A, cdb, params)).status == 0x18  # RESERVATION CONFLICT
    assert lu2.backstore.read(0, 4096) == bytes(4096)
    cdb, params = _xcopy(lu2.naa, lu1.naa, 8, 0, 100)  # reading from it passes Write Exclusive
    assert (await _run(t, NEXUS_A, cdb, params)).status == 0


async def test_xcopy_does_not_touch_an_lu_without_medium():
    cm = CopyManager()
    lu1 = make_lu("ram", size=1 << 20, serial="xc-m1", copy_manager=cm)
    lu2 = make_lu("ram", size=1 << 20, serial="xc-m2", copy_manager=cm, removable=True)
    t = LunMap({0: lu1, 1: lu2})
    await _clear(t, NEXUS_A, 0)
    await _clear(t, NEXUS_A, 1)
    lu2.set_medium(False)  # ejected: every medium access is NOT READY, MEDIUM NOT PRESENT
    cdb, params = _xcopy(lu1.naa, lu2.naa, 8, 0, 0)
    r = await _run(t, NEXUS_A, cdb, params)
    assert parse_sense(r.sense).code == (0x0A, 0x0D, 0x02)


# -- WRITE SAME (SBC-4 §5.47, §5.48) -------------------------------------------------------

async def test_write_same_refuses_lbdata_and_pbdata():
    """Byte 1 bits 1 (LBDATA) and 2 (PBDATA) asked SBC-2 devices to stamp the LBA into each block;
    they are obsolete and not implemented, so they are refused rather than silently ignored."""
    lu = make_lu("ram", size=1 << 20)
    ini = await ready(lu)
    for op, fmt in ((0x41, ">BBIBHB"), (0x93, ">BBQIBB")):
        for bit, flag in ((1, 0x02), (2, 0x04)):
            cdb = struct.pack(fmt, op, flag, 0, 0, 4, 0) if op == 0x41 else struct.pack(fmt, op, flag, 0, 4, 0, 0)
            s = await ini.fails(cdb, b"\x5A" * 512)
            assert s.code == (0x5, 0x24, 0x00) and s.sks == bytes((0xC8 | bit, 0, 1))
    assert lu.backstore.read(0, 2048) == bytes(2048)  # nothing written


# -- I/O errors: which sense (SPC-4 §4.5.4, SBC-4 §4.15) -----------------------------------

async def test_failed_synchronize_cache_is_a_write_error(tmp_path):
    """fdatasync failing means acknowledged writes may be lost: MEDIUM ERROR, WRITE ERROR (0C/00),
    not UNRECOVERED READ ERROR (11/00)."""
    lu = make_lu("file", tmp_path, size=1 << 20)
    ini = await ready(lu)

    def broken_flush():
        raise OSError(5, "Input/output error")

    lu.backstore.flush = broken_flush
    for cdb in (struct.pack(">BBIBHB", 0x35, 0, 0, 0, 0, 0), struct.pack(">BBQIBB", 0x91, 0, 0, 0, 0, 0)):
        s = await ini.fails(cdb)
        assert s.code == (0x3, 0x0C, 0x00)


@pytest.mark.parametrize("errno_, key, asc", [
    (5, 0x3, b"\x0c\x00"),    # EIO: MEDIUM ERROR, WRITE ERROR
    (28, 0x7, b"\x27\x07"),   # ENOSPC: DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT (SBC-4 §4.7.3.7)
])
async def test_failed_gathered_write_is_reported_as_a_deferred_error(tmp_path, errno_, key, asc):
    """A gathered write acknowledged earlier that failed on its way to the file is reported to the
    next command as a deferred error (response code 71h), not as a read error of that command;
    a full filesystem is a thin LU out of space, not a failing medium."""
    from iscsi.backstore.file import FileBackstore
    from iscsi.scsi.lu import LogicalUnit

    bs = FileBackstore(tmp_path / "g.img", size=1 << 20, gather_writes=True)
    lu = LogicalUnit(bs, serial="deferred")
    ini = await ready(lu)
    assert bs._gather is not None
    bs._gather.error = OSError(errno_, "failed")  # as a failed pwritev leaves it
    r = await ini.cmd(struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0))  # READ(10)
    assert r.status == 0x02
    assert r.sense[0] == 0x71 and r.sense[2] & 0x0F == key and r.sense[12:14] == asc
    await ini.ok(struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0))  # reported once
    bs.close()


async def test_write_atomic_with_short_data_out_writes_nothing():
    """WRITE ATOMIC(16) is all or nothing (SBC-4 atomic writes, §5.46): with fewer Data-Out bytes than its
    TRANSFER LENGTH asks (iSCSI overflow), writing the blocks that did arrive would be a torn
    atomic write under GOOD status; it fails instead and the medium is unchanged."""
    lu = make_lu("ram", size=1 << 20)
    ini = await ready(lu)
    cdb = struct.pack(">BBQHHBB", 0x9C, 0, 0, 0, 4, 0, 0)  # 4 blocks
    s = await ini.fails(cdb, b"\x77" * (2 * 512))  # only 2 arrived
    assert s.code == (0x5, 0x24, 0x00) and s.sks == b"\xc0\x00\x0c"
    assert lu.backstore.read(0, 4 * 512) == bytes(4 * 512)
    await ini.ok(cdb, b"\x77" * (4 * 512))
    assert lu.backstore.read(0, 4 * 512) == b"\x77" * (4 * 512)
