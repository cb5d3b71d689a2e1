"""Thin provisioning: UNMAP, WRITE SAME (UNMAP, NDOB, ANCHOR), GET LBA STATUS; COMPARE AND WRITE; ORWRITE."""
from __future__ import annotations

import os
import struct

from .test_scsi_support import (
    Initiator, compare_and_write, get_lba_status, kind, make_lu, read10, rw16, unmap_cdb, unmap_params,
    write10, write_same10, write_same16,
)

__all__ = ["kind"]

INVALID_FIELD = (0x5, 0x24, 0x00)
INVALID_PARAM = (0x5, 0x26, 0x00)
LBA_OOB = (0x5, 0x21, 0x00)


async def ready(lu) -> Initiator:
    ini = Initiator(lu)
    await ini.clear_ua()
    return ini


def lba_status(data: bytes) -> list[tuple[int, int, int]]:
    n = (struct.unpack_from(">I", data)[0] - 4) // 16
    return [struct.unpack_from(">QIB", data, 8 + 16 * i) for i in range(n)]


async def test_unmap_deallocates_and_reads_zero(kind, tmp_path):
    lu = make_lu(kind, tmp_path, size=4 << 20)
    ini = await ready(lu)
    await ini.ok(write10(0, 64), os.urandom(64 * 512))
    st = lba_status((await ini.ok(get_lba_status(0, 64))).data)
    assert st[0][0] == 0 and st[0][2] == 0 and st[0][1] >= 64  # mapped
    p = unmap_params([(8, 16), (40, 8)])
    await ini.ok(unmap_cdb(len(p)), p)
    data = (await ini.ok(read10(0, 64))).data
    assert data[8 * 512:24 * 512] == bytes(16 * 512)
    assert data[40 * 512:48 * 512] == bytes(8 * 512)
    assert data[:8 * 512] != bytes(8 * 512)
    st = lba_status((await ini.ok(get_lba_status(8, 24))).data)
    assert st[0] == (8, 16, 1)  # deallocated
    st = lba_status((await ini.ok(get_lba_status(24, 24))).data)
    assert st[0][0] == 24 and st[0][2] == 0


async def test_unmap_punches_holes_in_the_image(tmp_path):
    lu = make_lu("file", tmp_path, size=64 << 20)
    ini = await ready(lu)
    await ini.ok(rw16(0x8A, 0, 8192), os.urandom(8192 * 512))  # 4 MiB
    before = lu.backstore.allocated_bytes()
    p = unmap_params([(0, 8192)])
    await ini.ok(unmap_cdb(len(p)), p)
    assert lu.backstore.allocated_bytes() <= before - (4 << 20) + 65536


async def test_unaligned_unmap_zeroes_partial_blocks(kind, tmp_path):
    lu = make_lu(kind, tmp_path)
    ini = await ready(lu)
    await ini.ok(write10(0, 16), b"\xff" * 16 * 512)
    p = unmap_params([(3, 2)])  # inside one 4 KiB physical block
    await ini.ok(unmap_cdb(len(p)), p)
    data = (await ini.ok(read10(0, 16))).data
    assert data[3 * 512:5 * 512] == bytes(1024)
    assert data[:3 * 512] == b"\xff" * 1536 and data[5 * 512:] == b"\xff" * 11 * 512


async def test_unmap_parameter_checks():
    lu = make_lu("ram")
    ini = await ready(lu)
    nb = lu.num_blocks
    await ini.ok(unmap_cdb(0))  # no parameter list: nothing to do
    p = unmap_params([])
    await ini.ok(unmap_cdb(len(p)), p)
    p = unmap_params([(nb, 0)])  # zero blocks at the end: fine
    await ini.ok(unmap_cdb(len(p)), p)
    assert (await ini.fails(unmap_cdb(4), bytes(4))).code == (0x5, 0x1A, 0x00)
    p = unmap_params([(nb - 1, 2)])
    assert (await ini.fails(unmap_cdb(len(p)), p)).code == LBA_OOB
    p = unmap_params([(0, 1)] * (lu.max_unmap_descriptors + 1))
    assert (await ini.fails(unmap_cdb(len(p)), p)).code == INVALID_PARAM
    p = unmap_params([(0, 1)])
    assert (await ini.fails(unmap_cdb(len(p), anchor=1), p)).code == INVALID_FIELD
    # nothing is unmapped when one descriptor of the list is bad
    await ini.ok(write10(0, 1), b"k" * 512)
    p = unmap_params([(0, 1), (nb, 5)])
    assert (await ini.fails(unmap_cdb(len(p)), p)).code == LBA_OOB
    assert (await ini.ok(read10(0, 1))).data == b"k" * 512


async def test_write_same_pattern_and_zero_length_to_end(kind, tmp_path):
    lu = make_lu(kind, tmp_path, size=1 << 20)
    ini = await ready(lu)
    nb = lu.num_blocks
    block = bytes(range(256)) * 2
    await ini.ok(write_same10(5, 3), block)
    assert (await ini.ok(read10(4, 5))).data == bytes(512) + block * 3 + bytes(512)
    await ini.ok(write_same16(nb - 4, 0), b"\x77" * 512)  # 0 blocks: up to the last LBA
    assert (await ini.ok(read10(nb - 4, 4))).data == b"\x77" * 2048
    assert (await ini.fails(write_same10(nb - 1, 2), block)).code == LBA_OOB
    assert (await ini.fails(write_same10(nb + 1, 0), block)).code == LBA_OOB


async def test_write_same_unmap_and_ndob(kind, tmp_path):
    lu = make_lu(kind, tmp_path, size=1 << 20)
    ini = await ready(lu)
    await ini.ok(write10(0, 32), b"\xee" * 32 * 512)
    await ini.ok(write_same10(0, 16, flags=0x08), bytes(512))  # UNMAP with a zero block: deallocate
    assert (await ini.ok(read10(0, 16))).data == bytes(16 * 512)
    assert lba_status((await ini.ok(get_lba_status(0))).data)[0] == (0, 16, 1)
    await ini.ok(write_same16(16, 8, flags=0x08 | 0x01))  # NDOB + UNMAP, no Data-Out
    assert (await ini.ok(read10(16, 8))).data == bytes(8 * 512)
    await ini.ok(write10(24, 8), b"\xee" * 8 * 512)
    await ini.ok(write_same16(24, 8, flags=0x08), b"\x01" * 512)  # UNMAP deallocates whatever the block
    assert (await ini.ok(read10(24, 8))).data == bytes(8 * 512)
    await ini.ok(write_same16(24, 8), b"\x01" * 512)  # without UNMAP the block is written
    assert (await ini.ok(read10(24, 8))).data == b"\x01" * 8 * 512


async def test_write_same_field_checks():
    lu = make_lu("ram")
    ini = await ready(lu)
    block = bytes(512)
    assert (await ini.fails(write_same10(0, 1, flags=0x10), block)).code == INVALID_FIELD  # ANCHOR w/o UNMAP
    assert (await ini.fails(write_same10(0, 1, flags=0x18), block)).code == INVALID_FIELD  # ANC_SUP=0
    assert (await ini.fails(write_same10(0, 1, flags=0x20), block)).code == INVALID_FIELD  # WRPROTECT
    assert (await ini.fails(write_same10(0, 1), bytes(256))).key == 0x5  # half a block of Data-Out
    assert (await ini.fails(write_same10(0, 1), bytes(1024), expected=1024)).key == 0x5  # two blocks
    assert (await ini.fails(write_same16(0, lu.max_write_same + 1), block)).code in (INVALID_FIELD, LBA_OOB)
    lu.max_write_same = 4
    assert (await ini.fails(write_same16(0, 5), block)).code == INVALID_FIELD
    assert (await ini.fails(write_same16(0, 0), block)).code == INVALID_FIELD  # 0 = whole LU > max


async def test_write_same_on_read_only_lu_before_data_checks():
    lu = make_lu("ram", read_only=True)
    ini = await ready(lu)
    assert (await ini.fails(write_same10(0, 1, flags=0x08))).code == (0x7, 0x27, 0x00)
    p = unmap_params([(0, 1)])
    assert (await ini.fails(unmap_cdb(len(p)), p)).code == (0x7, 0x27, 0x00)


async def test_get_lba_status_boundaries():
    lu = make_lu("ram")
    ini = await ready(lu)
    nb = lu.num_blocks
    st = lba_status((await ini.ok(get_lba_status(nb - 1))).data)
    assert st == [(nb - 1, 1, 1)]
    for lba in (nb, nb + 1, 1 << 63, (1 << 64) - 1):
        assert (await ini.fails(get_lba_status(lba))).code == LBA_OOB
    await ini.ok(write10(10, 10), b"x" * 5120)
    st = lba_status((await ini.ok(get_lba_status(0, 8 + 16 * 10))).data)
    assert st == [(0, 10, 1), (10, 10, 0), (20, nb - 20, 1)]
    assert len((await ini.ok(get_lba_status(0, 4))).data) == 4


async def test_compare_and_write(kind, tmp_path):
    lu = make_lu(kind, tmp_path)
    ini = await ready(lu)
    old = b"A" * 1024
    new = b"B" * 1024
    await ini.ok(write10(100, 2), old)
    await ini.ok(compare_and_write(100, 2), old + new)
    assert (await ini.ok(read10(100, 2))).data == new
    wrong = bytearray(new)
    wrong[700] = 0
    s = await ini.fails(compare_and_write(100, 2), bytes(wrong) + old)
    assert s.code == (0xE, 0x1D, 0x00) and s.info == 700
    assert (await ini.ok(read10(100, 2))).data == new  # nothing written on miscompare
    # Data-Out must be exactly 2 x NUMBER OF LOGICAL BLOCKS
    assert (await ini.fails(compare_and_write(100, 1), new + old)).key == 0x5
    assert (await ini.fails(compare_and_write(100, 3), new + old)).key == 0x5
    assert (await ini.fails(compare_and_write(lu.num_blocks - 1, 2), new + old)).code == LBA_OOB
    assert (await ini.fails(compare_and_write(0, 1, flags=0x20), bytes(1024))).code == INVALID_FIELD
    lu.max_compare_and_write = 1
    assert (await ini.fails(compare_and_write(100, 2), new + old)).code == INVALID_FIELD
    await ini.ok(compare_and_write(100, 0))  # zero blocks: nothing compared, GOOD


async def test_compare_and_write_fua_flushes(tmp_path):
    lu = make_lu("ram")
    ini = await ready(lu)
    n = lu.backstore.flushes
    await ini.ok(compare_and_write(0, 1, flags=0x08), bytes(512) + b"z" * 512)
    assert lu.backstore.flushes == n + 1


async def test_orwrite_ors_into_the_medium():
    lu = make_lu("ram")
    ini = await ready(lu)
    await ini.ok(write10(0, 1), b"\x0f" * 512)
    await ini.ok(rw16(0x8B, 0, 1), b"\xa0" * 512)
    assert (await ini.ok(read10(0, 1))).data == b"\xaf" * 512
    assert (await ini.fails(rw16(0x8B, lu.num_blocks, 1), bytes(512))).code == LBA_OOB
    assert (await ini.fails(rw16(0x8B, 0, 1, 0x20), bytes(512))).code == INVALID_FIELD


async def test_write_atomic16():
    lu = make_lu("ram")
    ini = await ready(lu)

    def wa(lba, n, flags=0, boundary=0):
        return struct.pack(">BBQHHBB", 0x9C, flags, lba, boundary, n, 0, 0)

    await ini.ok(wa(2, 2), b"q" * 1024)
    assert (await ini.ok(read10(2, 2))).data == b"q" * 1024
    await ini.ok(wa(0, 0))
    assert (await ini.fails(wa(lu.num_blocks - 1, 2), bytes(1024))).code == LBA_OOB
    assert (await ini.fails(wa(0, 1, 0x40), bytes(512))).code == INVALID_FIELD
    assert (await ini.fails(wa(0, 1, boundary=1), bytes(512))).code == INVALID_FIELD
    assert lu.data_out_length(wa(0, 3)) == 3 * 512


class _PlainBackstore:
    """A backstore without thin provisioning (no unmap / is_mapped)."""

    block_size = 512
    read_only = False

    def __init__(self, size: int) -> None:
        self._b = bytearray(size)
        self.size = size

    def read(self, off, n):
        return bytes(self._b[off:off + n])

    def write(self, off, data, fua=False):
        self._b[off:off + len(data)] = data

    def flush(self):
        pass

    def close(self):
        pass


async def test_fully_provisioned_backstore_has_no_unmap():
    from iscsi.scsi.lu import LogicalUnit

    lu = LogicalUnit(_PlainBackstore(1 << 20), serial="plain")
    ini = await ready(lu)
    rc = (await ini.ok(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0))).data
    assert rc[14] & 0x80 == 0  # LBPME=0
    p = unmap_params([(0, 1)])
    assert (await ini.fails(unmap_cdb(len(p)), p)).code == (0x5, 0x20, 0x00)
    assert (await ini.fails(get_lba_status(0))).code == INVALID_FIELD
    await ini.ok(write_same10(0, 4, flags=0x08), b"\x05" * 512)  # UNMAP bit ignored: written
    assert (await ini.ok(read10(0, 4))).data == b"\x05" * 2048
    bl = (await ini.ok(bytes((0x12, 1, 0xB0, 0, 255, 0)))).data
    assert struct.unpack_from(">II", bl, 20) == (0, 0)  # no UNMAP limits
