"""Second review of the block device's SCSI semantics (SPC-4 / SBC-4), driven in-process.

Each test pins one behaviour an initiator, an admin's tool or a hostile peer can hit, and
that the logical unit got wrong before (the fix is named in the test's docstring).  The
first sweep is tests/target/test_scsi_semantics_review.py; this file does not repeat it.
"""
from __future__ import annotations

import struct

import pytest

from tests.unit.test_scsi_support import Initiator, make_lu, parse_sense

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

@pytest.mark.parametrize("count, invert, expect", [
    (1, 0, 0x0F), (2, 0, 0x0F),
    (1, 1, 0x0F),  # one pass: nothing to invert between
    (2, 1, 0xF0),  # the second pass writes the inverse
    (3, 1, 0x0F),
])
async def test_sanitize_overwrite_invert_leaves_the_last_pass_on_the_medium(count, invert, expect):
    """INVERT=1 inverts the initialization pattern between consecutive overwrite passes, so
    after an even OVERWRITE COUNT the medium holds the inverted pattern.  The LU wrote the
    pattern itself whatever INVERT said (sg_sanitize --invert --count=2 then read back the
    wrong data)."""
    lu = make_lu("ram", size=64 << 10)
    ini = await ready(lu)
    params = bytes(((0x80 if invert else 0) | count, 0, 0, 1, 0x0F))
    await ini.ok(bytes((0x48, 0x01, 0, 0, 0, 0, 0, 0, len(params), 0)), params)
    assert lu.backstore.read(0, lu.num_blocks * 512) == bytes((expect,)) * (lu.num_blocks * 512)
