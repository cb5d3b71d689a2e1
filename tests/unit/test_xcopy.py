"""EXTENDED COPY (LID1) / RECEIVE COPY RESULTS (SPC-4 §6.4, §6.18) with fake logical units.

The parameter lists are built the way libiscsi's test-tool builds them (populate_param_header,
populate_tgt_desc, populate_seg_desc_b2b), and each error case expects what its tests expect.
"""
from __future__ import annotations

import asyncio
import struct

import pytest

from iscsi.scsi import sense, xcopy
from iscsi.scsi.sense import SenseError, SenseKey
from iscsi.scsi.types import ITNexus, ScsiCommand, Status
from iscsi.scsi.xcopy import CopyAborted, CopyManager, CopyTarget

NEXUS = ITNexus("iqn.1994-05.com.example:a,i,0x023d00000001", "iqn.2024-01.org.sanstack:t,t,0x0001")
OTHER = ITNexus("iqn.1994-05.com.example:b,i,0x023d00000002", "iqn.2024-01.org.sanstack:t,t,0x0001")


class FakeLU:
    """A RAM logical unit with the CopyTarget surface."""

    def __init__(self, naa: bytes, num_blocks: int = 4096, block_size: int = 512) -> None:
        self.naa_designator = naa
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.mem = bytearray(num_blocks * block_size)
        self.reads: list[tuple[int, int]] = []
        self.fail_writes = False

    async def read_blocks(self, lba: int, count: int) -> bytes:
        assert 0 <= lba and lba + count <= self.num_blocks
        self.reads.append((lba, count))
        bs = self.block_size
        return bytes(self.mem[lba * bs:(lba + count) * bs])

    async def write_blocks(self, lba: int, data: bytes) -> None:
        if self.fail_writes:
            raise OSError("EIO")
        bs = self.block_size
        assert len(data) % bs == 0 and lba + len(data) // bs <= self.num_blocks
        self.mem[lba * bs:lba * bs + len(data)] = data


NAA1 = bytes.fromhex("6001405a1b2c3d4e5f60718293a4b5c6")
NAA2 = bytes.fromhex("6001405a1b2c3d4e5f60718293a4b5c7")


def cscd(naa: bytes = NAA1, *, code: int = 0xE4, desig_type: int = 3, assoc: int = 0,
         luid_type: int = 0, device_type: int = 0, block_size: int = 512) -> bytes:
    """Identification descriptor CSCD (libiscsi populate_tgt_desc + populate_ident_tgt_desc)."""
    d = bytearray(64 if code in (0xEA, 0xEB) else 32)
    d[0] = code
    d[1] = (luid_type << 6) | device_type
    d[4] = 0x01  # code set binary
    d[5] = (assoc << 4) | desig_type
    d[7] = len(naa)
    d[8:8 + len(naa)] = naa
    d[29:32] = block_size.to_bytes(3, "big")
    return bytes(d)


def b2b(src: int, dst: int, nblocks: int, src_lba: int, dst_lba: int, *, dc: bool = False, code: int = 0x02) -> bytes:
    """Block -> block segment descriptor (libiscsi populate_seg_desc_b2b)."""
    if code != 0x02:
        length = {0x03: 0x14, 0x00: 0x18, 0x01: 0x18}.get(code, 0x1C)
        d = bytearray(length)
        d[0], d[2:4], d[4:6], d[6:8] = code, (length - 4).to_bytes(2, "big"), src.to_bytes(2, "big"), dst.to_bytes(2, "big")
        return bytes(d)
    return struct.pack(">BBHHH2xHQQ", 0x02, 0x02 if dc else 0, 0x18, src, dst, nblocks, src_lba, dst_lba)


def plist(cscds: list[bytes], segs: list[bytes], *, list_id: int = 1, usage: int = 0,
          inline: int = 0, cscd_len: int | None = None, seg_len: int | None = None) -> bytes:
    t, s = b"".join(cscds), b"".join(segs)
    hdr = bytearray(16)
    hdr[0] = list_id
    hdr[1] = (usage & 3) << 3
    hdr[2:4] = (len(t) if cscd_len is None else cscd_len).to_bytes(2, "big")
    hdr[8:12] = (len(s) if seg_len is None else seg_len).to_bytes(4, "big")
    hdr[12:16] = inline.to_bytes(4, "big")
    return bytes(hdr) + t + s


def xcopy_cmd(data: bytes, length: int | None = None, nexus: ITNexus = NEXUS, sa: int = 0) -> ScsiCommand:
    n = len(data) if length is None else length
    cdb = bytes([0x83, sa]) + bytes(8) + n.to_bytes(4, "big") + bytes(2)
    return ScsiCommand(cdb, 0, nexus, data_out=data)


def rcr_cmd(sa: int, list_id: int = 0, alloc: int = 1024, nexus: ITNexus = NEXUS) -> ScsiCommand:
    cdb = bytes([0x84, sa, list_id]) + bytes(7) + alloc.to_bytes(4, "big") + bytes(2)
    return ScsiCommand(cdb, 0, nexus)


@pytest.fixture
def env():
    cm = CopyManager()
    lu1, lu2 = FakeLU(NAA1), FakeLU(NAA2, num_blocks=8192)
    cm.register_lu(lu1)
    cm.register(NAA2, lu2)
    return cm, lu1, lu2


def expect(exc: pytest.ExceptionInfo, key: SenseKey, asc_ascq: tuple[int, int]) -> None:
    assert (exc.value.key, (exc.value.asc, exc.value.ascq)) == (key, asc_ascq)


def test_fake_lu_satisfies_protocol():
    assert isinstance(FakeLU(NAA1), CopyTarget)


# ------------------------------------------------------------------ copying
async def test_simple_copy_within_one_lu(env):
    # libiscsi test_extendedcopy_simple: 2048 blocks of 'A' from LBA 0 to the end of the LUN.
    cm, lu1, _ = env
    n = 2048
    lu1.mem[:n * 512] = b"A" * (n * 512)
    data = plist([cscd(NAA1)], [b2b(0, 0, n, 0, lu1.num_blocks - n)], usage=xcopy.LIST_ID_DISCARD)
    res = await cm.extended_copy(lu1, xcopy_cmd(data))
    assert res.status == Status.GOOD
    assert lu1.mem[-n * 512:] == b"A" * (n * 512)
    # Copied in bounded chunks, not in one read.
    assert max(count for _, count in lu1.reads) * 512 <= xcopy.COPY_CHUNK_BYTES
    assert sum(count for _, count in lu1.reads) == n


async def test_copy_between_two_lus_several_segments(env):
    cm, lu1, lu2 = env
    for lba in range(64):
        lu1.mem[lba * 512:(lba + 1) * 512] = bytes([lba]) * 512
    segs = [b2b(0, 1, 16, 0, 1000), b2b(0, 1, 8, 32, 2000), b2b(1, 0, 4, 1000, 3000)]
    await cm.extended_copy(lu1, xcopy_cmd(plist([cscd(NAA1), cscd(NAA2)], segs)))
    assert lu2.mem[1000 * 512:1016 * 512] == lu1.mem[0:16 * 512]
    assert lu2.mem[2000 * 512:2008 * 512] == lu1.mem[32 * 512:40 * 512]
    assert lu1.mem[3000 * 512:3004 * 512] == lu1.mem[0:4 * 512]
    # Held (LIST ID USAGE 00b): COPY STATUS reports the work.
    res = await cm.receive_copy_results(lu1, rcr_cmd(xcopy.RCR_COPY_STATUS, 1))
    avail, status, segs_done, units, count = struct.unpack(">IBHBI", res.data)
    assert (avail, status & 0x7F, segs_done, units, count) == (8, 0x01, 3, 0, 28 * 512)


async def test_copy_with_dc_bit_and_different_block_sizes():
    cm = CopyManager()
    small, big = FakeLU(NAA1, 4096, 512), FakeLU(NAA2, 512, 4096)
    cm.register_lu(small)
    cm.register_lu(big)
    small.mem[:8 * 512] = bytes(range(256)) * 16
    # DC=1: NUMBER OF BLOCKS counts destination (4096-byte) blocks: 1 block = 8 source blocks.
    data = plist([cscd(NAA1), cscd(NAA2, block_size=4096)], [b2b(0, 1, 1, 0, 3, dc=True)])
    await cm.extended_copy(small, xcopy_cmd(data))
    assert big.mem[3 * 4096:4 * 4096] == small.mem[:4096]


async def test_zero_blocks_segment_and_zero_parameter_length(env):
    cm, lu1, _ = env
    await cm.extended_copy(lu1, xcopy_cmd(plist([cscd()], [b2b(0, 0, 0, 0, 0)])))
    assert lu1.reads == []
    # libiscsi test_extendedcopy_param: PARAMETER LIST LENGTH 0 is GOOD and does nothing.
    res = await cm.extended_copy(lu1, xcopy_cmd(b""))
    assert res.status == Status.GOOD


# ------------------------------------------------------------------ parameter list errors
async def test_parameter_list_truncating_descriptors(env):
    # libiscsi test_extendedcopy_param.
    cm, lu1, _ = env
    full = plist([cscd()], [b2b(0, 0, 2048, 0, 2048)])
    for length in (16 + 32 - 1, 16 + 32 + 28 - 1, 8):
        with pytest.raises(SenseError) as exc:
            await cm.extended_copy(lu1, xcopy_cmd(full[:length]))
        expect(exc, SenseKey.ILLEGAL_REQUEST, sense.PARAMETER_LIST_LENGTH_ERROR)
    # The CDB announces more than the initiator sent.
    with pytest.raises(SenseError) as exc:
        await cm.extended_copy(lu1, xcopy_cmd(full, length=len(full) + 4))
    expect(exc, SenseKey.ILLEGAL_REQUEST, sense.PARAMETER_LIST_LENGTH_ERROR)


async def test_descriptor_limits(env):
    # libiscsi test_extendedcopy_descr_limits, with the limits OPERATING PARAMETERS reports.
    cm, lu1, _ = env
    op = (await cm.receive_copy_results(lu1, rcr_cmd(xcopy.RCR_OPERATING_PARAMETERS))).data
    max_tgt, max_seg, max_list = struct.unpack_from(">HHI", op, 8)
    seg = b2b(0, 0, 2048, 0, 2048)
    with pytest.raises(SenseError) as exc:
        await cm.extended_copy(lu1, xcopy_cmd(plist([cscd()] * (max_tgt + 1), [seg])))
    expect(exc, SenseKey.ILLEGAL_REQUEST, sense.TOO_MANY_TARGET_DESCRIPTORS)
    with pytest.raises(SenseError) as exc:
        await cm.extended_copy(lu1, xcopy_cmd(plist([cscd()], [seg] * (max_seg + 1), list_id=2)))
    expect(exc, SenseKey.ILLEGAL_REQUEST, sense.TOO_MANY_SEGMENT_DESCRIPTORS)
    # Descriptors beyond MAXIMUM DESCRIPTOR LIST LENGTH: PARAMETER LIST LENGTH ERROR first.
    tgts = [cscd()] * (max_tgt + 1)
    alloc = max(16 + (max_tgt + 1) * 32 + (max_seg + 1) * 28, 16 + max_list + 28)
    nseg = (alloc - 16 - len(tgts) * 32) // 28
    with pytest.raises(SenseError) as exc:
        await cm.extended_copy(lu1, xcopy_cmd(plist(tgts, [seg] * nseg, list_id=3)))
    expect(exc, SenseKey.ILLEGAL_REQUEST, sense.PARAMETER_LIST_LENGTH_ERROR)


async def test_unsupported_descriptor_types(env):
    # libiscsi test_extendedcopy_descr_type: FC N_Port_Name CSCD, stream-to-stream segment.
    cm, lu1, _ = env
    with pytest.raises(SenseError) as exc:
        await cm.extended_copy(lu1, xcopy_cmd(plist([cscd(code=0xE0)], [b2b(0, 0, 1, 0, 1)])))
    expect(exc, SenseKey.ILLEGAL_REQUEST, sense.UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE)
    assert exc.value.field_pointer == 16 and not exc.value.in_cdb
    with pytest.raises(SenseError) as exc:
        await cm.extended_copy(lu1, xcopy_cmd(plist([cscd()], [b2b(0, 0, 0, 0, 0, code=0x03)])))
    expect(exc, SenseKey.ILLEGAL_REQUEST, sense.UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE)
    assert exc.value.field_pointer == 48
    # A 64-byte IPv6 CSCD is walked over correctly and then refused as unsupported.
    with pytest.raises(SenseError) as exc:
        await cm.extended_copy(lu1, xcopy_cmd(plist([cscd(), cscd(code=0xEA)], [b2b(0, 0, 1, 0, 1)])))
    expect(exc, SenseKey.ILLEGAL_REQUEST, sense.UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE)
    assert exc.value.field_pointer == 48


async def test_lu_id_type_ignored_spc4(env):
    # libiscsi test_extendedcopy_validate_tgt_descr with an SPC-4 target: LU ID TYPE is ignored.
    cm, lu1, _ = env
    res = await cm.extended_copy(lu1, xcopy_cmd(plist([cscd(luid_type=2)], [b2b(0, 0, 16, 0, 100)])))
    assert res.status == Status.GOOD


async def test_unreachable_copy_targets(env):
    # libiscsi test_extendedcopy_validate_seg_descr: bad CSCD index, beyond the end of the LU.
    cm, lu1, _ = env
    cases = [
        plist([cscd()], [b2b(0, 1, 2048, 0, 2048)]),  # destination index 1 does not exist
        plist([cscd()], [b2b(0, 0, 2048, 0, lu1.num_blocks - 1)]),  # beyond the destination's capacity
        plist([cscd()], [b2b(0, 0, 16, lu1.num_blocks - 8, 0)]),  # beyond the source's capacity
        plist([cscd(bytes(16))], [b2b(0, 0, 1, 0, 1)]),  # unknown NAA
        plist([cscd(desig_type=2, naa=NAA1[:8])], [b2b(0, 0, 1, 0, 1)]),  # EUI-64 designator
        plist([cscd(assoc=1)], [b2b(0, 0, 1, 0, 1)]),  # target port association
        plist([cscd(block_size=4096)], [b2b(0, 0, 1, 0, 1)]),  # block size of another device
    ]
    for data in cases:
        with pytest.raises(SenseError) as exc:
            await cm.extended_copy(lu1, xcopy_cmd(data))
        expect(exc, SenseKey.COPY_ABORTED, sense.COPY_TARGET_DEVICE_NOT_REACHABLE)
    assert lu1.reads == [], "nothing may be copied before every segment is validated"


async def test_unregistered_lu_is_unreachable(env):
    cm, lu1, lu2 = env
    cm.unregister(NAA2)
    with pytest.raises(SenseError) as exc:
        await cm.extended_copy(lu1, xcopy_cmd(plist([cscd(NAA1), cscd(NAA2)], [b2b(0, 1, 1, 0, 0)])))
    expect(exc, SenseKey.COPY_ABORTED, sense.COPY_TARGET_DEVICE_NOT_REACHABLE)


async def test_other_header_errors(env):
    cm, lu1, _ = env
    ok = [cscd()], [b2b(0, 0, 1, 0, 1)]
    # Inline data is not supported.
    data = plist(*ok, inline=4) + bytes(4)
    with pytest.raises(SenseError) as exc:
        await cm.extended_copy(lu1, xcopy_cmd(data))
    expect(exc, SenseKey.ILLEGAL_REQUEST, (0x26, 0x0B))
    # LIST ID USAGE 01b is reserved; 11b needs LIST IDENTIFIER 0.
    for usage, list_id in ((1, 1), (3, 5)):
        with pytest.raises(SenseError) as exc:
            await cm.extended_copy(lu1, xcopy_cmd(plist(*ok, usage=usage, list_id=list_id)))
        expect(exc, SenseKey.ILLEGAL_REQUEST, sense.INVALID_FIELD_IN_PARAMETER_LIST)
    await cm.extended_copy(lu1, xcopy_cmd(plist(*ok, usage=3, list_id=0)))
    # CSCD list length that splits a descriptor.
    with pytest.raises(SenseError) as exc:
        await cm.extended_copy(lu1, xcopy_cmd(plist(*ok, cscd_len=20)))
    assert exc.value.key == SenseKey.ILLEGAL_REQUEST
    # Segment descriptor with a wrong DESCRIPTOR LENGTH.
    bad = bytearray(b2b(0, 0, 1, 0, 1))
    bad[3] = 0x14
    with pytest.raises(SenseError) as exc:
        await cm.extended_copy(lu1, xcopy_cmd(plist([cscd()], [bytes(bad[:0x18])])))
    expect(exc, SenseKey.ILLEGAL_REQUEST, sense.INVALID_FIELD_IN_PARAMETER_LIST)
    # LID4 service action, short CDB.
    with pytest.raises(SenseError) as exc:
        await cm.extended_copy(lu1, xcopy_cmd(plist(*ok), sa=1))
    expect(exc, SenseKey.ILLEGAL_REQUEST, sense.INVALID_FIELD_IN_CDB)


async def test_segment_longer_than_maximum(monkeypatch, env):
    cm, lu1, _ = env
    monkeypatch.setattr(xcopy, "MAX_SEGMENT_LENGTH", 64 * 512)
    with pytest.raises(SenseError) as exc:
        await cm.extended_copy(lu1, xcopy_cmd(plist([cscd()], [b2b(0, 0, 65, 0, 1000)])))
    expect(exc, SenseKey.ILLEGAL_REQUEST, sense.INVALID_FIELD_IN_PARAMETER_LIST)
    assert exc.value.field_pointer == 48 + 10


async def test_io_error_while_copying_is_copy_aborted(env):
    cm, lu1, lu2 = env
    lu2.fail_writes = True
    data = plist([cscd(NAA1), cscd(NAA2)], [b2b(0, 0, 1, 0, 1), b2b(0, 1, 8, 0, 0)], list_id=9)
    with pytest.raises(CopyAborted) as exc:
        await cm.extended_copy(lu1, xcopy_cmd(data))
    expect(exc, SenseKey.COPY_ABORTED, sense.COPY_TARGET_DEVICE_NOT_REACHABLE)
    assert exc.value.segments_processed == 1
    fixed = exc.value.to_bytes()
    assert fixed[2] == SenseKey.COPY_ABORTED and fixed[8:12] == (1).to_bytes(4, "big")
    desc = exc.value.to_bytes(descriptor=True)
    assert desc[0] == 0x72 and desc[7] == len(desc) - 8 and bytes((0x01, 0x0A)) in desc
    # Held: COPY STATUS says "completed with errors", FAILED SEGMENT DETAILS carries the sense.
    st = (await cm.receive_copy_results(lu1, rcr_cmd(xcopy.RCR_COPY_STATUS, 9))).data
    assert st[4] & 0x7F == 0x02 and struct.unpack_from(">H", st, 5)[0] == 1
    fsd = (await cm.receive_copy_results(lu1, rcr_cmd(xcopy.RCR_FAILED_SEGMENT_DETAILS, 9))).data
    sense_len = struct.unpack_from(">H", fsd, 58)[0]
    assert fsd[56] == 0x02 and fsd[60:60 + sense_len] == fixed
    assert struct.unpack_from(">I", fsd)[0] == len(fsd) - 4


# ------------------------------------------------------------------ RECEIVE COPY RESULTS
async def test_copy_status_needs_a_held_list_id(env):
    # libiscsi test_receive_copy_results_copy_status.
    cm, lu1, _ = env
    with pytest.raises(SenseError) as exc:
        await cm.receive_copy_results(lu1, rcr_cmd(xcopy.RCR_COPY_STATUS, 1))
    expect(exc, SenseKey.ILLEGAL_REQUEST, sense.INVALID_FIELD_IN_CDB)
    assert exc.value.field_pointer == 2
    await cm.extended_copy(lu1, xcopy_cmd(plist([cscd()], [b2b(0, 0, 2048, 0, 2048)], list_id=1)))
    res = await cm.receive_copy_results(lu1, rcr_cmd(xcopy.RCR_COPY_STATUS, 1))
    assert res.data[4] & 0x7F == 0x01
    # Results belong to the I_T nexus: another nexus does not see them, nexus loss drops them.
    with pytest.raises(SenseError):
        await cm.receive_copy_results(lu1, rcr_cmd(xcopy.RCR_COPY_STATUS, 1, nexus=OTHER))
    cm.nexus_lost(NEXUS)
    with pytest.raises(SenseError):
        await cm.receive_copy_results(lu1, rcr_cmd(xcopy.RCR_COPY_STATUS, 1))


async def test_discard_and_no_list_id_are_not_held(env):
    cm, lu1, _ = env
    for usage, list_id in ((xcopy.LIST_ID_DISCARD, 4), (xcopy.LIST_ID_NONE, 0)):
        await cm.extended_copy(lu1, xcopy_cmd(plist([cscd()], [b2b(0, 0, 1, 0, 1)], usage=usage, list_id=list_id)))
        with pytest.raises(SenseError):
            await cm.receive_copy_results(lu1, rcr_cmd(xcopy.RCR_COPY_STATUS, list_id))


async def test_operating_parameters(env):
    cm, lu1, _ = env
    data = (await cm.receive_copy_results(lu1, rcr_cmd(xcopy.RCR_OPERATING_PARAMETERS))).data
    avail = struct.unpack_from(">I", data)[0]
    assert avail == len(data) - 4 and avail >= 40  # libiscsi refuses less than 40
    assert data[4] & 0x01  # SNLID
    assert struct.unpack_from(">HHIIII", data, 8) == (
        xcopy.MAX_TARGET_DESCRIPTORS, xcopy.MAX_SEGMENT_DESCRIPTORS, xcopy.MAX_DESCRIPTOR_LIST_LENGTH,
        xcopy.MAX_SEGMENT_LENGTH, xcopy.MAX_INLINE_DATA_LENGTH, xcopy.HELD_DATA_LIMIT)
    assert data[43] == 2 and set(data[44:46]) == {0x02, 0xE4}
    # The advertised counts fit in the advertised list length (libiscsi's limit test relies on it).
    assert (xcopy.MAX_TARGET_DESCRIPTORS + 1) * 32 + 28 <= xcopy.MAX_DESCRIPTOR_LIST_LENGTH
    assert 32 + (xcopy.MAX_SEGMENT_DESCRIPTORS + 1) * 28 <= xcopy.MAX_DESCRIPTOR_LIST_LENGTH
    # Allocation length truncates.
    short = (await cm.receive_copy_results(lu1, rcr_cmd(xcopy.RCR_OPERATING_PARAMETERS, alloc=10))).data
    assert short == data[:10]


@pytest.mark.parametrize("sa", [0x01, 0x02, 0x05, 0x1F])
async def test_receive_copy_results_unsupported_service_actions(env, sa):
    cm, lu1, _ = env
    with pytest.raises(SenseError) as exc:
        await cm.receive_copy_results(lu1, rcr_cmd(sa))
    expect(exc, SenseKey.ILLEGAL_REQUEST, sense.INVALID_FIELD_IN_CDB)


async def test_copy_in_progress_reports_and_blocks_same_list_id(env):
    cm, lu1, lu2 = env
    gate = asyncio.Event()
    original = lu2.write_blocks

    async def slow_write(lba, data):
        await gate.wait()
        await original(lba, data)

    lu2.write_blocks = slow_write
    data = plist([cscd(NAA1), cscd(NAA2)], [b2b(0, 1, 8, 0, 0)], list_id=7)
    task = asyncio.create_task(cm.extended_copy(lu1, xcopy_cmd(data)))
    await asyncio.sleep(0)
    st = (await cm.receive_copy_results(lu1, rcr_cmd(xcopy.RCR_COPY_STATUS, 7))).data
    assert st[4] & 0x7F == 0x00  # in progress
    with pytest.raises(SenseError) as exc:
        await cm.extended_copy(lu1, xcopy_cmd(data))
    expect(exc, SenseKey.ILLEGAL_REQUEST, (0x00, 0x16))  # OPERATION IN PROGRESS
    gate.set()
    await asyncio.wait_for(task, 5)
    st = (await cm.receive_copy_results(lu1, rcr_cmd(xcopy.RCR_COPY_STATUS, 7))).data
    assert st[4] & 0x7F == 0x01


def test_transfer_count_units():
    assert xcopy._transfer_count(1000) == (0, 1000)
    assert xcopy._transfer_count(1 << 33) == (1, 1 << 23)


# ------------------------------------------------------------------ VPD 8Fh
def test_vpd_8f_third_party_copy_page():
    page = CopyManager.vpd_8f()
    assert page[0] == 0x00 and page[1] == 0x8F
    assert struct.unpack_from(">H", page, 2)[0] == len(page) - 4
    descs, off = {}, 4
    while off < len(page):
        dtype, dlen = struct.unpack_from(">HH", page, off)
        assert (dlen + 4) % 4 == 0
        descs[dtype] = page[off + 4:off + 4 + dlen]
        off += 4 + dlen
    assert off == len(page)
    assert set(descs) == {0x0001, 0x0004, 0x0105, 0x0106, 0x8001}
    cmds = descs[0x0001]
    listed = cmds[1:1 + cmds[0]]
    assert listed[:3] == bytes([0x83, 1, 0x00])
    assert listed[3] == 0x84 and set(listed[5:5 + listed[4]]) == {0x00, 0x03, 0x04}
    assert struct.unpack_from(">HHII", descs[0x0004], 4) == (
        xcopy.MAX_TARGET_DESCRIPTORS, xcopy.MAX_SEGMENT_DESCRIPTORS,
        xcopy.MAX_DESCRIPTOR_LIST_LENGTH, xcopy.MAX_INLINE_DATA_LENGTH)
    assert set(descs[0x0105][1:1 + descs[0x0105][0]]) == {0x02, 0xE4}
    assert struct.unpack_from(">I", descs[0x8001], 8)[0] == xcopy.MAX_SEGMENT_LENGTH


async def test_long_copy_lets_other_tasks_run_between_chunks(env):
    """A copy of many chunks must not hold the event loop: another task (another session's
    NOP answer or ATS heartbeat) runs while it is in progress."""
    cm, lu1, _ = env
    n = 4096  # 2 MiB of 512-byte blocks: two chunks at least
    data = plist([cscd(NAA1)], [b2b(0, 0, n, 0, lu1.num_blocks - n)], usage=xcopy.LIST_ID_DISCARD)
    ticks = []

    async def other_session():
        for _ in range(50):
            ticks.append(len(lu1.reads))
            await asyncio.sleep(0)

    other = asyncio.ensure_future(other_session())
    await cm.extended_copy(lu1, xcopy_cmd(data))
    await other
    chunks = len(lu1.reads)
    assert chunks >= 2
    # The other task ran at points where the copy had started but not finished.
    assert any(0 < t < chunks for t in ticks)
