"""Second review of the block device's SCSI semantics (SPC-4 / SBC-4), driven in-process.

Each test pins one behaviour an initiator, an admin's tool or a hostile peer can hit, and
that the logical unit got wrong before (the fix is named in the test's docstring).  The
first sweep is tests/target/test_scsi_semantics_review.py; this file does not repeat it.
"""
from __future__ import annotations

import asyncio
import struct

import pytest

from iscsi import pdu as P
from iscsi.backstore.ram import RamBackstore
from iscsi.scsi.lu import LogicalUnit
from iscsi.scsi.target import LunMap
from iscsi.target.server import IscsiServer
from tests.unit.test_scsi_support import Initiator, make_lu

from .fakes import FakeRegistry, FakeTarget
from .wire import Wire

IQN_T = "iqn.2026-11.org.sanstack:review2"

GOOD = 0x00
CHECK = 0x02
INVALID_FIELD_IN_CDB = (0x5, 0x24, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = (0x5, 0x26, 0x00)
LBA_OUT_OF_RANGE = (0x5, 0x21, 0x00)


async def ready(lu, nexus=None) -> Initiator:
    ini = Initiator(lu) if nexus is None else Initiator(lu, nexus)
    await ini.clear_ua()
    return ini


def numbered_blocks(count: int, bs: int = 512) -> bytes:
    """``count`` blocks, each filled with its own 32-bit block number: any misplaced block shows."""
    return b"".join(i.to_bytes(4, "big") * (bs // 4) for i in range(count))


# -- EXTENDED COPY (LID1), SPC-4 §6.4 ------------------------------------------------------

def _cscd(naa: bytes, bs: int = 512) -> bytes:
    """Identification descriptor CSCD (E4h) naming an LU by its NAA designator (SPC-4 §6.4.5.3)."""
    d = bytearray(32)
    d[0], d[4], d[5], d[7] = 0xE4, 0x01, 0x03, len(naa)
    d[8:8 + len(naa)] = naa
    d[29:32] = bs.to_bytes(3, "big")
    return bytes(d)


def xcopy(cscds: list[bytes], segments: list[tuple[int, int, int, int, int]]) -> tuple[bytes, bytes]:
    """EXTENDED COPY(LID1) CDB and parameter list; segments are (src index, dst index, blocks, src LBA, dst LBA)."""
    tds = b"".join(cscds)
    segs = b"".join(struct.pack(">BBHHH2xHQQ", 0x02, 0, 0x18, s, d, n, sl, dl) for s, d, n, sl, dl in segments)
    hdr = bytearray(16)
    hdr[1] = 0b11 << 3  # LIST ID USAGE 11b: no list identifier
    hdr[2:4] = len(tds).to_bytes(2, "big")
    hdr[8:12] = len(segs).to_bytes(4, "big")
    params = bytes(hdr) + tds + segs
    return bytes((0x83, 0)) + bytes(8) + len(params).to_bytes(4, "big") + bytes(2), params


@pytest.mark.parametrize("src_lba, dst_lba", [(0, 1), (0, 2047), (10, 3), (100, 100)])
async def test_xcopy_within_one_lu_with_overlapping_ranges_copies_the_source(src_lba, dst_lba):
    """A block -> block segment (SPC-4 §6.4.6.5) copies the source blocks to the destination.

    The copy goes in 1 MiB steps; with the destination a little past the source in the same
    LU, the forward steps read blocks an earlier step had overwritten, so the destination held
    the first MiB over and over (the fix copies such a segment from its end backwards)."""
    lu = make_lu("ram", size=8 << 20, serial="xc-overlap")
    ini = await ready(lu)
    blocks = 4096  # 2 MiB: more than one copy step
    original = numbered_blocks(8192)
    lu.backstore.write(0, original)
    cdb, params = xcopy([_cscd(lu.naa)], [(0, 0, blocks, src_lba, dst_lba)])
    await ini.ok(cdb, params)
    got = lu.backstore.read(dst_lba * 512, blocks * 512)
    assert got == original[src_lba * 512:(src_lba + blocks) * 512]
    # the blocks outside the destination are untouched
    assert lu.backstore.read(0, dst_lba * 512) == original[:dst_lba * 512]
    end = (dst_lba + blocks) * 512
    assert lu.backstore.read(end, len(original) - end) == original[end:]


# -- SANITIZE OVERWRITE, SBC-4 §5.30.2.2 ------------------------------------------------------

@pytest.mark.parametrize("count, invert", [(1, 0), (2, 0), (1, 1), (2, 1), (3, 1)])
async def test_sanitize_overwrite_always_ends_on_the_initialization_pattern(count, invert):
    """With INVERT=1 the passes alternate between the pattern and its inverse and the first pass
    of an even OVERWRITE COUNT is the inverse, so the last pass, what stays on the medium, is
    always the INITIALIZATION PATTERN (SBC-4 §5.30.2.2).  (A fix of this review once inverted
    the result of even counts; the rule above is why it was taken back.)"""
    lu = make_lu("ram", size=64 << 10)
    ini = await ready(lu)
    params = bytes(((0x80 if invert else 0) | count, 0, 0, 1, 0x0F))
    await ini.ok(bytes((0x48, 0x01, 0, 0, 0, 0, 0, 0, len(params), 0)), params)
    assert lu.backstore.read(0, lu.num_blocks * 512) == b"\x0f" * (lu.num_blocks * 512)


# -- through the real target (iSCSI transport + SCSI core) ---------------------------------

@pytest.fixture
async def served():
    """An IscsiServer on loopback serving one 8 MiB RAM LU; yields (server, lu)."""
    lu = LogicalUnit(RamBackstore(8 << 20, 512), serial="review2", lun_id=0)
    reg = FakeRegistry({IQN_T: FakeTarget(IQN_T, luns=LunMap({0: lu}))})
    srv = IscsiServer(reg, nop_interval=60, nop_timeout=60)
    _, srv.port = await srv.add_portal("127.0.0.1", 0)
    yield srv, lu
    await srv.shutdown(drain_timeout=1)


async def logged_in(srv) -> Wire:
    wire = await Wire.open(srv.port)
    assert (await wire.login(IQN_T)).status_class == 0
    for _ in range(3):  # the power-on unit attention
        wire.command(bytes(6))
        if (await wire.recv()).status == GOOD:
            return wire
    raise AssertionError("unit attentions never cleared")


async def set_d_sense(wire: Wire) -> None:
    """MODE SELECT(6) of the Control mode page with D_SENSE=1 (SPC-4 §7.5.8)."""
    page = bytearray(12)
    page[0], page[1], page[2], page[3] = 0x0A, 0x0A, 0x04, 0x10
    page[8:10] = b"\xff\xff"
    params = bytes(4) + bytes(page)
    wire.command(bytes((0x15, 0x10, 0, 0, len(params), 0)), write=True, edtl=len(params), data=params)
    assert (await wire.recv()).status == GOOD


async def test_data_phase_error_sense_follows_d_sense(served):
    """SPC-4 §7.5.8: with D_SENSE=1 the device server returns descriptor-format sense data
    with every CHECK CONDITION.  The LU's own errors do (response code 72h); the transport's
    ABORTED COMMAND for a bad Data-Out still came back as fixed format (70h)."""
    srv, _lu = served
    wire = await logged_in(srv)
    await set_d_sense(wire)
    wire.command(struct.pack(">BBIBHB", 0x28, 0, 0xFFFFFF, 0, 1, 0), read=True, edtl=512)
    resp = await wire.recv()
    assert resp.status == CHECK and bytes(resp.data)[2] == 0x72  # the LU's own sense: descriptor format
    itt = wire.command(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0), write=True, edtl=512)
    r2t = await wire.recv()
    assert isinstance(r2t, P.R2T) and r2t.itt == itt
    # Data-Out beyond the Expected Data Transfer Length: a data phase error of this task
    wire.send(P.DataOut(itt=itt, ttt=r2t.ttt, datasn=0, offset=0, final=True, expstatsn=wire.expstatsn,
                        data=bytes(1024)))
    resp = await wire.recv()
    assert isinstance(resp, P.ScsiResponse) and resp.status == CHECK
    sense = bytes(resp.data)[2:]  # after the SenseLength field (RFC 7143 §11.4.7.2)
    assert sense[0] == 0x72 and sense[1] & 0x0F == 0xB  # descriptor format, ABORTED COMMAND


# -- UNMAP with the write cache disabled, SBC-4 §5.32, §6.5.5 --------------------------------

def _unmap(ranges: list[tuple[int, int]]) -> tuple[bytes, bytes]:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    params = struct.pack(">HH4x", len(body) + 6, len(body)) + body
    return bytes((0x42, 0, 0, 0, 0, 0, 0)) + struct.pack(">HB", len(params), 0), params


async def test_unmap_with_wce_off_is_stable_before_good():
    """With WCE=0 every medium change is on stable storage before GOOD; a deallocation is
    one (reads of the LBAs return zeroes from then on, LBPRZ=1).  WRITE SAME with UNMAP=1
    flushed; UNMAP did not, so after a power cut the unmapped blocks could read back their
    old data."""
    lu = make_lu("ram", size=1 << 20)
    ini = await ready(lu)
    await ini.ok(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0), b"\xAB" * 4096)
    cdb, params = _unmap([(0, 8)])
    before = lu.backstore.flushes
    await ini.ok(cdb, params)
    assert lu.backstore.flushes == before  # WCE=1 (the default): no flush needed
    page = bytearray(20)
    page[0], page[1] = 0x08, 0x12  # Caching mode page, WCE=0
    await ini.ok(bytes((0x15, 0x10, 0, 0, 24, 0)), bytes(4) + bytes(page))
    assert not lu.mode.wce
    await ini.ok(struct.pack(">BBIBHB", 0x2A, 0, 8, 0, 8, 0), b"\xAB" * 4096)
    before = lu.backstore.flushes
    cdb, params = _unmap([(8, 8)])
    await ini.ok(cdb, params)
    assert lu.backstore.flushes == before + 1
    assert lu.backstore.read(0, 8192) == bytes(8192)


# -- large ORWRITE / VERIFY BYTCHK=01b do not hold the event loop (SBC-4 §5.10, §5.38) -------

STEP = 64 << 10


@pytest.fixture
def small_step(monkeypatch):
    """Large transfers go in STEP-byte pieces (instead of 4 MiB) so a 1 MiB command has 16."""
    from iscsi.scsi import sbc

    monkeypatch.setattr(sbc, "LARGE_TRANSFER_STEP", STEP)
    return STEP


async def _meanwhile(coro, backstore) -> tuple[object, list[int], int]:
    """Run ``coro``; return its result, the backstore read counts another task saw while it
    ran, and the reads it made in all."""
    seen: list[int] = []
    reads = 0
    real = backstore.read

    def counting_read(offset, length):
        nonlocal reads
        reads += 1
        return real(offset, length)

    backstore.read = counting_read

    async def other_session():
        for _ in range(200):
            seen.append(reads)
            await asyncio.sleep(0)

    other = asyncio.ensure_future(other_session())
    try:
        result = await coro
    finally:
        total = reads
        await other
        backstore.read = real
    return result, [k for k in seen if k < total], total


async def test_large_orwrite_goes_in_steps_and_ors_every_byte(small_step):
    """ORWRITE of up to MAXIMUM TRANSFER LENGTH (256 MiB at 4 KiB blocks) did its read, OR and
    write in one go: ~3 s during which no other session's command, NOP or ATS heartbeat ran."""
    lu = make_lu("ram", size=2 << 20)
    ini = await ready(lu)
    n = (1 << 20) // 512 + 3  # 16 steps and a bit
    base = numbered_blocks(n)
    lu.backstore.write(512, base)
    mask = bytes((0x80,)) * (n * 512)
    r, seen, reads = await _meanwhile(ini.cmd(struct.pack(">BBQIBB", 0x8B, 0, 1, n, 0, 0), mask), lu.backstore)
    assert r.status == GOOD and reads == 17
    assert lu.backstore.read(512, n * 512) == bytes(b | 0x80 for b in base)
    assert lu.backstore.read(0, 512) == bytes(512) and lu.backstore.read((n + 1) * 512, 512) == bytes(512)
    assert any(k > 0 for k in seen)  # the other session ran between the pieces


async def test_large_verify_compares_in_steps_and_reports_the_data_out_offset(small_step):
    """VERIFY(16) BYTCHK=01b of a large transfer compares piece by piece (other sessions run in
    between) and still reports the miscompare offset from the start of the Data-Out Buffer."""
    lu = make_lu("ram", size=2 << 20)
    ini = await ready(lu)
    n = (1 << 20) // 512
    data = numbered_blocks(n)
    lu.backstore.write(0, data)
    cdb = struct.pack(">BBQIBB", 0x8F, 0x02, 0, n, 0, 0)
    r, seen, reads = await _meanwhile(ini.cmd(cdb, data), lu.backstore)
    assert r.status == GOOD and reads == 16 and any(k > 0 for k in seen)
    for where in (0, STEP - 1, STEP, 5 * STEP + 77, n * 512 - 1):
        bad = bytearray(data)
        bad[where] ^= 0x01
        bad[-1] ^= 0x10 if where != n * 512 - 1 else 0  # a later difference too: the first one counts
        s = await ini.fails(cdb, bytes(bad))
        assert s.code == (0xE, 0x1D, 0x00) and s.info == where


def test_first_difference_finds_the_first_byte_in_any_buffer_type():
    from iscsi.scsi.sbc import first_difference

    a = bytes(range(256)) * 1024  # 256 KiB: several comparison windows
    assert first_difference(a, bytearray(a)) == -1
    assert first_difference(memoryview(a), a) == -1
    for where in (0, 1, 65535, 65536, 65537, 200000, len(a) - 1):
        b = bytearray(a)
        b[where] ^= 0xFF
        b[-1] ^= 0x01 if where != len(a) - 1 else 0
        assert first_difference(memoryview(a), memoryview(b)) == where
        assert first_difference(a, bytes(b)) == where


# -- MODE SELECT turning the write cache off, SBC-4 §6.5.5 -----------------------------------

def _caching_page(wce: bool) -> bytes:
    page = bytearray(20)
    page[0], page[1], page[2] = 0x08, 0x12, 0x04 if wce else 0
    return bytes(4) + bytes(page)


async def test_turning_wce_off_flushes_what_the_cache_holds():
    """After WCE=0 the initiator believes there is no volatile cache: Linux sd stops sending
    SYNCHRONIZE CACHE and an fsync returns at once.  Writes acknowledged before the switch
    were still only in the page cache, and nothing would ever ask for them to be flushed."""
    lu = make_lu("ram", size=1 << 20)
    ini = await ready(lu)
    await ini.ok(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0), b"\x42" * 4096)  # WCE=1: not flushed
    before = lu.backstore.flushes
    await ini.ok(bytes((0x15, 0x10, 0, 0, 24, 0)), _caching_page(wce=True))  # no change
    assert lu.backstore.flushes == before
    await ini.ok(bytes((0x15, 0x10, 0, 0, 24, 0)), _caching_page(wce=False))
    assert lu.backstore.flushes == before + 1 and not lu.mode.wce
    await ini.ok(bytes((0x15, 0x10, 0, 0, 24, 0)), _caching_page(wce=False))  # already off
    assert lu.backstore.flushes == before + 1


# -- NACA=1 in the CONTROL byte of the commands the target level answers (SAM-5 §5.9.1.4) -----

def _report_luns(control: int = 0) -> bytes:
    return struct.pack(">BBB3xIBB", 0xA0, 0, 0, 64, 0, control)


async def test_report_luns_with_naca_is_refused_through_every_lun():
    """NormACA=0 in the INQUIRY data: a CDB with NACA=1 ends in INVALID FIELD IN CDB (pointing
    at the CONTROL byte, bit 2), as every command dispatched by the LU does.  REPORT LUNS is
    answered by the LUN map (through an LU or a LUN without one) and returned GOOD."""
    lu = make_lu("ram", size=1 << 20)
    luns = LunMap({0: lu})
    for lun in (0, 5):
        ini = Initiator(luns, lun=lun)
        if lun == 0:
            await ini.clear_ua()
        s = await ini.fails(_report_luns(control=0x04))
        assert s.code == INVALID_FIELD_IN_CDB and s.sks == bytes((0xCA, 0, 11))
        r = await ini.ok(_report_luns())
        assert bytes(r.data)[:4] == b"\x00\x00\x00\x08"


async def test_inquiry_with_naca_to_a_lun_without_lu_is_refused():
    luns = LunMap({0: make_lu("ram", size=1 << 20)})
    ini = Initiator(luns, lun=5)
    s = await ini.fails(bytes((0x12, 0, 0, 0, 36, 0x04)))
    assert s.code == INVALID_FIELD_IN_CDB and s.sks == bytes((0xCA, 0, 5))


# -- VERIFY over deallocated LBAs and the VBULS bit, SBC-4 §5.38, §6.6.2 ----------------------

async def test_vbuls_matches_how_verify_treats_unmapped_lbas():
    """The device server compares unmapped LBAs in a VERIFY BYTCHK=01b/11b like mapped ones (they
    read as zeroes, LBPRZ=1).  The Block Device Characteristics page has to say so with
    VBULS=1 (byte 8 bit 0); with VBULS=0 an initiator must expect MISCOMPARE VERIFY OF
    UNMAPPED LBA for any deallocated LBA instead."""
    lu = make_lu("ram", size=1 << 20)
    ini = await ready(lu)
    b1 = bytes((await ini.ok(bytes((0x12, 1, 0xB1, 0, 64, 0)))).data)
    assert b1[1] == 0xB1 and b1[8] & 0x01
    cdb, params = _unmap([(0, 16)])
    await ini.ok(cdb, params)
    await ini.ok(struct.pack(">BBQIBB", 0x8F, 0x02, 0, 16, 0, 0), bytes(16 * 512))  # BYTCHK=01b
    await ini.ok(struct.pack(">BBQIBB", 0x8F, 0x06, 0, 16, 0, 0), bytes(512))  # BYTCHK=11b
    s = await ini.fails(struct.pack(">BBQIBB", 0x8F, 0x02, 0, 1, 0, 0), b"\x01" + bytes(511))
    assert s.code == (0xE, 0x1D, 0x00) and s.info == 0


# -- VERIFY writes the referenced cached blocks to the medium, SBC-4 §5.38 -------------------

@pytest.mark.parametrize("bytchk, blocks_out", [(0, 0), (1, 8), (3, 1)])
async def test_verify_flushes_the_write_cache(bytchk, blocks_out):
    """"Logical units that contain cache shall write referenced cached logical blocks to the
    medium" before verifying them.  With WCE=1 the image's page cache is that cache; VERIFY
    returned GOOD with the blocks possibly still only in memory."""
    lu = make_lu("ram", size=1 << 20)
    ini = await ready(lu)
    cdb = struct.pack(">BBIBHB", 0x2F, bytchk << 1, 0, 0, 8, 0)
    before = lu.backstore.flushes
    await ini.ok(struct.pack(">BBIBHB", 0x2F, bytchk << 1, 0, 0, 0, 0))  # 0 blocks: nothing to verify
    assert lu.backstore.flushes == before
    await ini.ok(cdb, bytes(blocks_out * 512))
    assert lu.backstore.flushes == before + 1


# -- READ CAPACITY(16): obsolete LBA / PMI as READ CAPACITY(10), SBC-4 §5.20 ---------------------

async def test_read_capacity16_lba_without_pmi_is_refused_as_rsoc_reports():
    """REPORT SUPPORTED OPERATION CODES said READ CAPACITY(16) evaluates the LBA field (bytes
    2-9) but not PMI (byte 14 bit 0), while the handler ignored both.  Like READ CAPACITY(10):
    an LBA with PMI=0 is INVALID FIELD IN CDB; with PMI=1 the last LBA is returned."""
    lu = make_lu("ram", size=1 << 20)
    ini = await ready(lu)
    s = await ini.fails(struct.pack(">BBQIBB", 0x9E, 0x10, 5, 32, 0, 0))
    assert s.code == INVALID_FIELD_IN_CDB and s.sks == b"\xc0\x00\x02"
    r = await ini.ok(struct.pack(">BBQIBB", 0x9E, 0x10, 5, 32, 0x01, 0))
    assert struct.unpack_from(">QI", bytes(r.data)) == (lu.num_blocks - 1, 512)
    one = bytes((await ini.ok(struct.pack(">BBBBHIBB", 0xA3, 0x0C, 0x02, 0x9E, 0x10, 64, 0, 0))).data)
    usage = one[4:4 + struct.unpack_from(">H", one, 2)[0]]
    assert usage[2:10] == b"\xff" * 8 and usage[14] == 0x01


# -- SANITIZE restricted completion mode (AUSE=0), SBC-4 §4.11.3, §5.30 ------------------------

def _sanitize(sa: int, plen: int = 0, ause: bool = False) -> bytes:
    return bytes((0x48, sa | (0x20 if ause else 0), 0, 0, 0, 0, 0)) + struct.pack(">HB", plen, 0)


async def _failed_overwrite(lu, ini, ause: bool) -> None:
    real = lu.backstore.write

    def broken(off, data, fua=False):
        raise OSError(5, "EIO")

    lu.backstore.write = broken
    params = bytes((0x01, 0, 0, 4)) + b"\x01\x02\x03\x04"
    try:
        s = await ini.fails(_sanitize(0x01, len(params), ause), params)
    finally:
        lu.backstore.write = real
    assert s.code == (0x3, 0x31, 0x03)  # MEDIUM ERROR, SANITIZE COMMAND FAILED


async def test_exit_failure_mode_after_an_unrestricted_sanitize():
    lu = make_lu("ram", size=64 << 10)
    ini = await ready(lu)
    await _failed_overwrite(lu, ini, ause=True)
    await ini.ok(_sanitize(0x1F))
    await ini.ok(struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0))


async def test_exit_failure_mode_is_refused_after_a_restricted_sanitize_failed():
    """AUSE=0 asks for the restricted completion mode: if that sanitize fails, the only way out is
    another sanitize that succeeds; EXIT FAILURE MODE, and a new SANITIZE asking for AUSE=1, end
    in INVALID FIELD IN CDB.  It is what keeps a disk whose erase failed from being put back to
    use as if it had been erased (sg_sanitize sends AUSE=0 unless told --ause)."""
    lu = make_lu("ram", size=64 << 10)
    ini = await ready(lu)
    await _failed_overwrite(lu, ini, ause=False)
    assert (await ini.fails(_sanitize(0x1F))).code == INVALID_FIELD_IN_CDB
    assert (await ini.fails(_sanitize(0x02, ause=True))).code == INVALID_FIELD_IN_CDB
    assert (await ini.fails(struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0))).code == (0x3, 0x31, 0x03)
    await ini.ok(_sanitize(0x02))  # BLOCK ERASE, restricted again, succeeds: the way out
    await ini.ok(struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0))
