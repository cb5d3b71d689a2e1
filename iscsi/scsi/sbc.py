"""Block commands (SBC-4): READ/WRITE and friends, thin provisioning, COMPARE AND WRITE.

Handlers take ``(lu, cmd)`` and return a :class:`ScsiResult`, or an awaitable of one
when they must wait (flush to stable storage, the COMPARE AND WRITE lock).  The hot
path (READ/WRITE 10/16) decodes with precompiled structs and does one pread/pwrite.

Data-Out rules (RFC 7143 §11.4.5.2 residuals, libiscsi test_write10_residuals):
the initiator may send less than the CDB asks (overflow): only the whole blocks
received are written and the command still ends GOOD; extra bytes are ignored.
"""
from __future__ import annotations

import asyncio
import struct
import weakref
from typing import TYPE_CHECKING

from . import sense as S
from . import zerocopy
from .cdb import RW6, RW10, RW12, RW16, U16, U32, be16, be32, be64
from .sense import SenseError, SenseKey
from .types import ScsiCommand, ScsiResult, Status

_GOOD = Status.GOOD
# A READ or WRITE larger than this is copied in pieces of this size with a turn of the event
# loop between them: one maximum-length transfer (65536 blocks, up to 256 MiB) would
# otherwise hold every other session of the daemon for the whole copy (~100 ms).  Smaller
# transfers stay one synchronous pread/pwrite, which is what keeps ordinary I/O fast.
LARGE_TRANSFER_STEP = 4 << 20

if TYPE_CHECKING:
    from .lu import LogicalUnit


def _protect(byte: int = 1) -> SenseError:
    """RDPROTECT/WRPROTECT/VRPROTECT/ORPROTECT non-zero on a device without protection information.

    SBC-4 §5.x: with PROTECT=0 in the standard INQUIRY data, a non-zero protect field is
    an INVALID FIELD IN CDB.
    """
    return S.illegal_field(byte, 7)


def _oob() -> SenseError:
    return SenseError(SenseKey.ILLEGAL_REQUEST, S.LBA_OUT_OF_RANGE)


def check_range(lu: LogicalUnit, lba: int, n: int) -> None:
    """SBC-4 §4.5: LBA + transfer length beyond the capacity is LBA OUT OF RANGE.

    With a zero transfer length the LBA itself must still address a block.
    """
    if lba + (n or 1) > lu.num_blocks:
        raise _oob()


def _length_limit(n: int, field: int, limit: int) -> None:
    if n > limit:
        raise S.illegal_field(field)


def _whole_blocks(lu: LogicalUnit, data, want: int) -> memoryview:
    """The Data-Out bytes to use: at most ``want``, and only whole blocks of what arrived."""
    got = len(data)
    if got >= want:
        return memoryview(data)[:want]
    return memoryview(data)[: got - got % lu.block_size]


# -- READ ---------------------------------------------------------------------------------

def _read(lu: LogicalUnit, cmd: ScsiCommand, lba: int, n: int, len_field: int) -> ScsiResult:
    if lba + (n or 1) > lu.num_blocks:
        raise _oob()
    if n > lu.max_transfer:
        raise S.illegal_field(len_field)
    if not n:
        return ScsiResult()
    bs = lu.block_size
    length = n * bs
    fence = lu.fence
    if cmd.zero_copy and length >= zerocopy.MIN_BYTES and lu.zero_copy_source is not None \
            and not fence.writers and cmd.nexus is lu.sole_user and fence.sendfile_ok:
        # Sent from the page cache by the transport; the range is held unchanged until the
        # initiator has read it (zerocopy.py).  Gathered writes reach the file first.
        source = lu.zero_copy_source
        source.drain()
        start = lba * bs
        return ScsiResult(_GOOD, fence.hold(source, start, length))
    if length > LARGE_TRANSFER_STEP:
        return _read_in_steps(lu, lba * bs, length)
    return ScsiResult(_GOOD, lu.backstore.read(lba * bs, length))


async def _read_in_steps(lu: LogicalUnit, offset: int, length: int) -> ScsiResult:
    """A large READ, read piece by piece into one buffer, yielding to other tasks in between.

    Like a disk serving a long transfer, the pieces are read at different moments: an
    overlapping WRITE from another task may land between two of them (SAM-5 leaves
    concurrent overlapping SIMPLE tasks unordered; ORDERED ones still wait for this task).
    """
    data = bytearray(length)  # calloc: pages appear as they are filled
    view = memoryview(data)
    backstore = lu.backstore
    for pos in range(0, length, LARGE_TRANSFER_STEP):
        if pos:
            await asyncio.sleep(0)
        backstore.read_into(offset + pos, view[pos:pos + LARGE_TRANSFER_STEP])
    return ScsiResult(_GOOD, data)


def read_6(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """READ(6) (SBC-4 §5.15): a TRANSFER LENGTH of 0 means 256 blocks."""
    w = RW6.unpack_from(cmd.cdb)[0]
    return _read(lu, cmd, (w >> 8) & 0x1FFFFF, (w & 0xFF) or 256, 4)


def read_10(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    flags, lba, _g, n = RW10.unpack_from(cmd.cdb)
    if flags & 0xE0:
        raise _protect()
    return _read(lu, cmd, lba, n, 7)


def read_12(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    flags, lba, n = RW12.unpack_from(cmd.cdb)
    if flags & 0xE0:
        raise _protect()
    return _read(lu, cmd, lba, n, 6)


def read_16(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    flags, lba, n, _g = RW16.unpack_from(cmd.cdb)
    if flags & 0xE0:
        raise _protect()
    return _read(lu, cmd, lba, n, 10)


# -- WRITE --------------------------------------------------------------------------------

def _write(lu: LogicalUnit, cmd: ScsiCommand, lba: int, n: int, len_field: int, fua: bool,
           atomic: bool = False):
    if lba + (n or 1) > lu.num_blocks:
        raise _oob()
    if n > lu.max_transfer:
        raise S.illegal_field(len_field)
    lu.check_writable()
    if not n:
        return ScsiResult()
    bs = lu.block_size
    want = n * bs
    data = cmd.data_out
    if len(data) != want:
        if atomic and len(data) < want:
            # Part of an atomic write is not a write of it (SBC-4 atomic writes: all or none).
            raise S.illegal_field(len_field)
        data = _whole_blocks(lu, data, want)
        if not data:
            return ScsiResult()
    if len(data) > LARGE_TRANSFER_STEP and not atomic:
        return _write_in_steps(lu, lba * bs, data, fua)
    lu.backstore.write(lba * bs, data)
    if fua or not lu.mode.wce:
        return lu.flushed(ScsiResult())
    return ScsiResult()


async def _write_in_steps(lu: LogicalUnit, offset: int, data, fua: bool) -> ScsiResult:
    """A large WRITE in pieces with a loop turn between them (see LARGE_TRANSFER_STEP)."""
    view = memoryview(data)
    backstore = lu.backstore
    for pos in range(0, len(view), LARGE_TRANSFER_STEP):
        if pos:
            await asyncio.sleep(0)
        backstore.write(offset + pos, view[pos:pos + LARGE_TRANSFER_STEP])
    if fua or not lu.mode.wce:
        return await lu.flushed(ScsiResult())
    return ScsiResult()


def write_6(lu: LogicalUnit, cmd: ScsiCommand):
    w = RW6.unpack_from(cmd.cdb)[0]
    return _write(lu, cmd, (w >> 8) & 0x1FFFFF, (w & 0xFF) or 256, 4, False)


def write_10(lu: LogicalUnit, cmd: ScsiCommand):
    flags, lba, _g, n = RW10.unpack_from(cmd.cdb)
    if flags & 0xE0:
        raise _protect()
    return _write(lu, cmd, lba, n, 7, bool(flags & 0x08))


def write_12(lu: LogicalUnit, cmd: ScsiCommand):
    flags, lba, n = RW12.unpack_from(cmd.cdb)
    if flags & 0xE0:
        raise _protect()
    return _write(lu, cmd, lba, n, 6, bool(flags & 0x08))


def write_16(lu: LogicalUnit, cmd: ScsiCommand):
    flags, lba, n, _g = RW16.unpack_from(cmd.cdb)
    if flags & 0xE0:
        raise _protect()
    return _write(lu, cmd, lba, n, 10, bool(flags & 0x08))


def write_atomic_16(lu: LogicalUnit, cmd: ScsiCommand):
    """WRITE ATOMIC(16) (SBC-4 §5.46): bytes 10-11 ATOMIC BOUNDARY, 12-13 TRANSFER LENGTH.

    One pwrite runs inside one event-loop step, so no other command of this target can
    observe or interleave with a partial write (atomic with respect to other commands;
    a power cut can still tear it, as with any file).
    """
    cdb = cmd.cdb
    flags = cdb[1]
    if flags & 0xE0:
        raise _protect()
    lba = be64(cdb, 2)
    boundary = be16(cdb, 10)
    n = be16(cdb, 12)
    if boundary:
        raise S.illegal_field(10)  # MAXIMUM ATOMIC BOUNDARY SIZE is 0: boundaries not supported
    if lba + (n or 1) > lu.num_blocks:
        raise _oob()
    if n > lu.max_atomic_transfer:
        raise S.illegal_field(12)
    return _write(lu, cmd, lba, n, 12, bool(flags & 0x08), atomic=True)


# -- WRITE AND VERIFY / VERIFY ------------------------------------------------------------

def _bytchk(flags: int) -> int:
    return (flags >> 1) & 0x03


def _write_verify(lu: LogicalUnit, cmd: ScsiCommand, flags: int, lba: int, n: int, len_field: int):
    """WRITE AND VERIFY (SBC-4 §5.42-5.44): write, then make it stable (the "verify" reads the medium)."""
    if flags & 0xE0:
        raise _protect()
    if _bytchk(flags) > 1:
        raise S.illegal_field(1, 2)
    return _write(lu, cmd, lba, n, len_field, True)


def write_and_verify_10(lu: LogicalUnit, cmd: ScsiCommand):
    flags, lba, _g, n = RW10.unpack_from(cmd.cdb)
    return _write_verify(lu, cmd, flags, lba, n, 7)


def write_and_verify_12(lu: LogicalUnit, cmd: ScsiCommand):
    flags, lba, n = RW12.unpack_from(cmd.cdb)
    return _write_verify(lu, cmd, flags, lba, n, 6)


def write_and_verify_16(lu: LogicalUnit, cmd: ScsiCommand):
    flags, lba, n, _g = RW16.unpack_from(cmd.cdb)
    return _write_verify(lu, cmd, flags, lba, n, 10)


# first_difference() narrows a mismatch down in windows of this size before it locates the
# byte: the int arithmetic that finds it costs ~4 ns a byte, memcmp a fraction of that.
_DIFF_WINDOW = 64 << 10


def first_difference(a, b) -> int:
    """Offset of the first differing byte of two equal-length buffers (-1 if equal), in C speed.

    memoryviews are compared as bytes: ``memoryview == bytes`` goes element by element
    (~5 ns a byte, seconds for a maximum-length VERIFY); a copy and memcmp cost ~1 ns.
    """
    if a.__class__ is not bytes:
        a = bytes(a)
    if b.__class__ is not bytes:
        b = bytes(b)
    if a == b:
        return -1
    base = 0
    n = len(a)
    while n - base > _DIFF_WINDOW and a[base:base + _DIFF_WINDOW] == b[base:base + _DIFF_WINDOW]:
        base += _DIFF_WINDOW
    end = min(n, base + _DIFF_WINDOW)
    x = int.from_bytes(a[base:end], "big") ^ int.from_bytes(b[base:end], "big")
    return end - (x.bit_length() + 7) // 8


def _miscompare(offset: int) -> SenseError:
    """MISCOMPARE DURING VERIFY OPERATION with the byte offset in INFORMATION (SBC-4 §5.3, §5.38)."""
    return SenseError(SenseKey.MISCOMPARE, S.MISCOMPARE_DURING_VERIFY, information=offset)


def _verify(lu: LogicalUnit, cmd: ScsiCommand, flags: int, lba: int, n: int, len_field: int):
    """VERIFY (SBC-4 §5.38-5.40). BYTCHK 00b: check the medium; 01b: compare n blocks; 11b: one block against each.

    A logical unit with a cache writes the referenced cached blocks to the medium first, as
    SYNCHRONIZE CACHE of the range would (SBC-4 §5.38): with WCE=1 the blocks verified may
    still be in the page cache only, so a verified range is a flushed one.
    """
    if flags & 0xE0:
        raise _protect()
    bytchk = _bytchk(flags)
    if bytchk == 2:
        raise S.illegal_field(1, 2)
    if lba + (n or 1) > lu.num_blocks:
        raise _oob()
    if n > lu.max_transfer:
        raise S.illegal_field(len_field)
    if not n:
        return ScsiResult()
    if bytchk:
        bs = lu.block_size
        if bytchk == 1:
            data = _whole_blocks(lu, cmd.data_out, n * bs)
            if len(data) > LARGE_TRANSFER_STEP:
                return _verify_in_steps(lu, lba * bs, data)
            if data:
                off = first_difference(data, lu.backstore.read(lba * bs, len(data)))
                if off >= 0:
                    raise _miscompare(off)
        else:
            pattern = bytes(cmd.data_out[:bs])
            if len(pattern) == bs:
                for i in range(n):
                    off = first_difference(pattern, lu.backstore.read((lba + i) * bs, bs))
                    if off >= 0:
                        raise _miscompare(i * bs + off)
    return _verified(lu)


def _verified(lu: LogicalUnit):
    """GOOD once the verified blocks are on the medium (nothing to flush with WCE=0)."""
    if lu.mode.wce:
        return lu.flushed(ScsiResult())
    return ScsiResult()


async def _verify_in_steps(lu: LogicalUnit, offset: int, data) -> ScsiResult:
    """VERIFY BYTCHK=01b of a large transfer, compared piece by piece with a loop turn between
    pieces (see LARGE_TRANSFER_STEP): up to 256 MiB compared at once held every session."""
    view = memoryview(data)
    backstore = lu.backstore
    for pos in range(0, len(view), LARGE_TRANSFER_STEP):
        if pos:
            await asyncio.sleep(0)
        piece = view[pos:pos + LARGE_TRANSFER_STEP]
        off = first_difference(piece, backstore.read(offset + pos, len(piece)))
        if off >= 0:
            raise _miscompare(pos + off)
    r = _verified(lu)
    return r if r.__class__ is ScsiResult else await r


def verify_10(lu: LogicalUnit, cmd: ScsiCommand):
    flags, lba, _g, n = RW10.unpack_from(cmd.cdb)
    return _verify(lu, cmd, flags, lba, n, 7)


def verify_12(lu: LogicalUnit, cmd: ScsiCommand):
    flags, lba, n = RW12.unpack_from(cmd.cdb)
    return _verify(lu, cmd, flags, lba, n, 6)


def verify_16(lu: LogicalUnit, cmd: ScsiCommand):
    flags, lba, n, _g = RW16.unpack_from(cmd.cdb)
    return _verify(lu, cmd, flags, lba, n, 10)


def verify_data_out_length(cdb: bytes, block_size: int) -> int:
    """Data-Out bytes of VERIFY 10/12/16 (BYTCHK 01b: n blocks, 11b: one block, else none)."""
    op = cdb[0]
    bytchk = (cdb[1] >> 1) & 0x03
    if op == 0x2F:
        n = be16(cdb, 7)
    elif op == 0xAF:
        n = be32(cdb, 6)
    else:
        n = be32(cdb, 10)
    if bytchk == 1:
        return n * block_size
    if bytchk == 3 and n:
        return block_size
    return 0


# -- SYNCHRONIZE CACHE / PRE-FETCH ----------------------------------------------------------

def _sync(lu: LogicalUnit, lba: int, n: int):
    """SYNCHRONIZE CACHE (SBC-4 §5.24): the whole file is flushed whatever the range (fdatasync has no range)."""
    if lba + (n or 1) > lu.num_blocks:
        raise _oob()
    return lu.flushed(ScsiResult())


def synchronize_cache_10(lu: LogicalUnit, cmd: ScsiCommand):
    _flags, lba, _g, n = RW10.unpack_from(cmd.cdb)
    return _sync(lu, lba, n)


def synchronize_cache_16(lu: LogicalUnit, cmd: ScsiCommand):
    _flags, lba, n, _g = RW16.unpack_from(cmd.cdb)
    return _sync(lu, lba, n)


def _prefetch(lu: LogicalUnit, lba: int, n: int, len_field: int) -> ScsiResult:
    """PRE-FETCH (SBC-4 §5.11): a read-ahead hint; GOOD since nothing is promised to stay cached.

    The PREFETCH LENGTH is held to the MAXIMUM PREFETCH LENGTH of the Block Limits page, which
    advertises the MAXIMUM TRANSFER LENGTH (SBC-4 §6.6.4, Table "Transfer limits for commands":
    INVALID FIELD IN CDB beyond it).  Unchecked, one PRE-FETCH of 2^32 - 1 blocks had the
    kernel read terabytes of image into the page cache, evicting every other LU's data.
    """
    if lba + (n or 1) > lu.num_blocks:
        raise _oob()
    if n > lu.max_transfer:
        raise S.illegal_field(len_field)
    hint = getattr(lu.backstore, "prefetch", None)
    if hint is not None and n:
        bs = lu.block_size
        hint(lba * bs, n * bs)
    return ScsiResult()


def pre_fetch_10(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    _flags, lba, _g, n = RW10.unpack_from(cmd.cdb)
    return _prefetch(lu, lba, n, 7)


def pre_fetch_16(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    _flags, lba, n, _g = RW16.unpack_from(cmd.cdb)
    return _prefetch(lu, lba, n, 10)


# -- READ CAPACITY ------------------------------------------------------------------------

_RC10 = struct.Struct(">II")
_RC16 = struct.Struct(">QIBBH16x")


def read_capacity_10(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """READ CAPACITY(10) (SBC-4 §5.19): FFFFFFFFh tells the initiator to use READ CAPACITY(16)."""
    cdb = cmd.cdb
    pmi = cdb[8] & 0x01
    if not pmi and be32(cdb, 2):
        raise S.illegal_field(2)  # SBC-3: LBA must be 0 when PMI is 0
    last = lu.num_blocks - 1
    return ScsiResult(data=_RC10.pack(min(last, 0xFFFFFFFF), lu.block_size))


def read_capacity_16(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """READ CAPACITY(16) (SBC-4 §5.20): LBPPBE, LBPME and LBPRZ for thin provisioning.

    The (obsolete) LOGICAL BLOCK ADDRESS and PMI fields follow READ CAPACITY(10): an LBA
    without PMI is an INVALID FIELD IN CDB, as REPORT SUPPORTED OPERATION CODES says.
    """
    cdb = cmd.cdb
    if not cdb[14] & 0x01 and be64(cdb, 2):
        raise S.illegal_field(2)
    alloc = be32(cdb, 10)
    b14 = 0
    if lu.thin:
        b14 = 0x80 | (0x40 if lu.lbprz else 0)  # LBPME, LBPRZ; LOWEST ALIGNED LBA 0
    data = _RC16.pack(lu.num_blocks - 1, lu.block_size, 0, lu.lbppbe & 0x0F, b14 << 8)
    return ScsiResult(data=data[:alloc])


# -- thin provisioning: UNMAP, WRITE SAME, GET LBA STATUS ------------------------------------

def _deallocate(lu: LogicalUnit, lba: int, n: int) -> None:
    bs = lu.block_size
    lu.backstore.unmap(lba * bs, n * bs)


def _zero(lu: LogicalUnit, lba: int, n: int) -> None:
    """Write zeroes and keep the blocks mapped (WRITE SAME with UNMAP=0)."""
    bs = lu.block_size
    zero = getattr(lu.backstore, "write_zeroes", None)
    if zero is not None:
        zero(lba * bs, n * bs)
    else:
        _fill(lu, lba, n, bytes(bs))


# Pattern writes go out in pieces of this size: one pwrite per MiB, not per block.
_FILL_CHUNK = 1 << 20


def _fill(lu: LogicalUnit, lba: int, n: int, block: bytes) -> None:
    bs = lu.block_size
    per = max(1, _FILL_CHUNK // bs)
    chunk = block * min(per, n)
    off = lba * bs
    end = (lba + n) * bs
    view = memoryview(chunk)
    while off < end:
        k = min(len(chunk), end - off)
        lu.backstore.write(off, view[:k])
        off += k


def _write_same(lu: LogicalUnit, cmd: ScsiCommand, flags: int, lba: int, n: int, ndob: bool, len_field: int):
    """WRITE SAME(10)/(16) (SBC-4 §5.47, §5.48).

    - ANCHOR: anchored LBAs are not supported (ANC_SUP=0), so ANCHOR=1 is invalid;
    - NUMBER OF LOGICAL BLOCKS 0 means "up to the last LBA" (WSNZ=0);
    - UNMAP=1 (ANCHOR=0) deallocates the range on a thin LU (SBC-4 Table "ANCHOR bit,
      UNMAP bit and ANC_SUP bit relationships": unmap), whatever the Data-Out block;
      with LBPRZ=1 the LBAs then read as zeroes (libiscsi WriteSame10.UnmapUntilEnd);
    - NDOB=1: no Data-Out, the block is zeroes.
    """
    if flags & 0xE0:
        raise _protect()
    anchor = flags & 0x10
    unmap = flags & 0x08
    if anchor:
        raise S.illegal_field(1, 4)
    if flags & 0x06:
        # PBDATA / LBDATA (defined by SBC-2, obsolete since SBC-3): the initiator wants the LBA
        # stamped into every block; writing the plain block would hand it other data.
        raise S.illegal_field(1, 2 if flags & 0x04 else 1)
    nb = lu.num_blocks
    if lba >= nb:
        raise _oob()
    if n == 0:
        n = nb - lba
    elif lba + n > nb:
        raise _oob()
    if n > lu.max_write_same:
        raise S.illegal_field(len_field)
    lu.check_writable()
    bs = lu.block_size
    if ndob:
        block = None
    else:
        data = cmd.data_out
        exp = cmd.expected_length
        if len(data) < bs or (exp and exp != bs):
            raise S.illegal_field(len_field)  # exactly one block of Data-Out is expected
        block = bytes(data[:bs])
    zero = block is None or not any(block)
    if unmap and lu.thin:
        _deallocate(lu, lba, n)
    elif zero:
        _zero(lu, lba, n)
    else:
        _fill(lu, lba, n, block)
    if not lu.mode.wce:
        return lu.flushed(ScsiResult())
    return ScsiResult()


def write_same_10(lu: LogicalUnit, cmd: ScsiCommand):
    flags, lba, _g, n = RW10.unpack_from(cmd.cdb)
    if flags & 0x01:
        raise S.illegal_field(1, 0)  # NDOB does not exist in WRITE SAME(10)
    return _write_same(lu, cmd, flags, lba, n, False, 7)


def write_same_16(lu: LogicalUnit, cmd: ScsiCommand):
    flags, lba, n, _g = RW16.unpack_from(cmd.cdb)
    return _write_same(lu, cmd, flags, lba, n, bool(flags & 0x01), 10)


def write_same_data_out_length(cdb: bytes, block_size: int) -> int:
    if cdb[0] == 0x93 and cdb[1] & 0x01:
        return 0  # NDOB
    return block_size


_UNMAP_DESC = struct.Struct(">QI4x")


def unmap(lu: LogicalUnit, cmd: ScsiCommand):
    """UNMAP (SBC-4 §5.32): every descriptor is checked before any range is deallocated."""
    cdb = cmd.cdb
    if cdb[1] & 0x01:
        raise S.illegal_field(1, 0)  # ANCHOR: anchored state not supported (ANC_SUP=0)
    plen = be16(cdb, 7)
    if plen == 0:
        return ScsiResult()
    if plen < 8:
        raise SenseError(SenseKey.ILLEGAL_REQUEST, S.PARAMETER_LIST_LENGTH_ERROR)
    lu.check_writable()
    params = cmd.data_out[:plen]
    if len(params) < 8:
        raise SenseError(SenseKey.ILLEGAL_REQUEST, S.PARAMETER_LIST_LENGTH_ERROR)
    bd_len = be16(params, 2)
    avail = min(bd_len, len(params) - 8)
    count = avail // 16  # a trailing partial descriptor is ignored (SBC-4 §5.32.2)
    if count > lu.max_unmap_descriptors:
        raise S.illegal_param(2)
    ranges = []
    total = 0
    nb = lu.num_blocks
    for i in range(count):
        lba, n = _UNMAP_DESC.unpack_from(params, 8 + 16 * i)
        if lba + n > nb:
            raise _oob()
        total += n
        if n:
            ranges.append((lba, n))
    if total > lu.max_unmap_lba_count:
        raise S.illegal_param(8)
    for lba, n in ranges:
        _deallocate(lu, lba, n)
    if ranges and not lu.mode.wce:
        # WCE=0 (SBC-4 §6.5.5): no volatile cache, so the new medium state is stable before
        # GOOD.  A punched hole is a metadata change of the image, and where holes cannot be
        # punched (or only part of a filesystem block goes) the backstore writes zeroes: both
        # sit in the page cache until a flush, and a crash would bring the old data back.
        return lu.flushed(ScsiResult())
    return ScsiResult()


_LBA_STATUS_HDR = struct.Struct(">I4x")
_LBA_STATUS_DESC = struct.Struct(">QIB3x")
# One GET LBA STATUS answer describes at most this many extents: the allocation length
# bounds it anyway, this bounds the SEEK_DATA/SEEK_HOLE calls spent on one command.
MAX_LBA_STATUS_DESCRIPTORS = 512


def get_lba_status(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """GET LBA STATUS (SBC-4 §5.8): mapped (0) / deallocated (1) extents from the backstore map."""
    cdb = cmd.cdb
    lba = be64(cdb, 2)
    alloc = be32(cdb, 10)
    nb = lu.num_blocks
    if lba >= nb:
        raise _oob()
    bs = lu.block_size
    room = max(1, min(MAX_LBA_STATUS_DESCRIPTORS, (alloc - 8) // 16 if alloc >= 24 else 1))
    descs = bytearray()
    cur = lba
    while cur < nb and room:
        mapped, length = lu.backstore.is_mapped(cur * bs)
        n = max(1, length // bs)
        n = min(n, nb - cur, 0xFFFFFFFF)
        descs += _LBA_STATUS_DESC.pack(cur, n, 0 if mapped else 1)
        cur += n
        room -= 1
    data = _LBA_STATUS_HDR.pack(len(descs) + 4) + bytes(descs)
    return ScsiResult(data=data[:alloc])


# -- COMPARE AND WRITE / ORWRITE -----------------------------------------------------------

def compare_and_write(lu: LogicalUnit, cmd: ScsiCommand):
    """COMPARE AND WRITE (SBC-4 §5.3): atomic per LU across every session and portal.

    The Data-Out buffer is n blocks to compare followed by n blocks to write; its size
    must be exactly 2n blocks.
    """
    cdb = cmd.cdb
    flags = cdb[1]
    if flags & 0xE0:
        raise _protect()
    lba = be64(cdb, 2)
    n = cdb[13]
    bs = lu.block_size
    want = 2 * n * bs
    exp = cmd.expected_length
    if (exp and exp != want) or len(cmd.data_out) < want:
        raise S.illegal_field(13)  # Data-Out does not match NUMBER OF LOGICAL BLOCKS
    if n > lu.max_compare_and_write:
        raise S.illegal_field(13)
    if lba + (n or 1) > lu.num_blocks:
        raise _oob()
    lu.check_writable()
    if not n:
        return ScsiResult()
    data = memoryview(cmd.data_out)
    return lu.compare_and_write(lba, data[: n * bs], data[n * bs: want], bool(flags & 0x08))


def orwrite_16(lu: LogicalUnit, cmd: ScsiCommand):
    """ORWRITE(16) (SBC-4 §5.10): medium := medium OR Data-Out."""
    flags, lba, n, _g = RW16.unpack_from(cmd.cdb)
    if flags & 0xE0:
        raise _protect()
    if lba + (n or 1) > lu.num_blocks:
        raise _oob()
    if n > lu.max_transfer:
        raise S.illegal_field(10)
    lu.check_writable()
    if not n:
        return ScsiResult()
    bs = lu.block_size
    data = _whole_blocks(lu, cmd.data_out, n * bs)
    if not data:
        return ScsiResult()
    fua = bool(flags & 0x08)
    if len(data) > LARGE_TRANSFER_STEP:
        return _orwrite_in_steps(lu, lba * bs, data, fua)
    _or_into(lu, lba * bs, data)
    if fua or not lu.mode.wce:
        return lu.flushed(ScsiResult())
    return ScsiResult()


def _or_into(lu: LogicalUnit, offset: int, data) -> None:
    """medium := medium OR data, in one synchronous read-modify-write."""
    medium = lu.backstore.read(offset, len(data))
    ored = (int.from_bytes(medium, "big") | int.from_bytes(data, "big")).to_bytes(len(data), "big")
    lu.backstore.write(offset, ored)


async def _orwrite_in_steps(lu: LogicalUnit, offset: int, data, fua: bool) -> ScsiResult:
    """A large ORWRITE piece by piece with a loop turn between pieces (see LARGE_TRANSFER_STEP):
    one 256 MiB OR held every session for seconds.  Each piece is read, ORed and written in
    one step, so no write of another task lands inside a piece."""
    view = memoryview(data)
    for pos in range(0, len(view), LARGE_TRANSFER_STEP):
        if pos:
            await asyncio.sleep(0)
        _or_into(lu, offset + pos, view[pos:pos + LARGE_TRANSFER_STEP])
    if fua or not lu.mode.wce:
        return await lu.flushed(ScsiResult())
    return ScsiResult()


# -- READ DEFECT DATA ------------------------------------------------------------------------

def read_defect_data_10(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """READ DEFECT DATA(10) (SBC-4 §5.16): a file has no defects; an empty list in the format asked."""
    cdb = cmd.cdb
    alloc = be16(cdb, 7)
    data = bytes((0, cdb[2] & 0x1F)) + U16.pack(0)
    return ScsiResult(data=data[:alloc])


def read_defect_data_12(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    alloc = be32(cdb, 6)
    data = bytes((0, cdb[1] & 0x1F, 0, 0)) + U32.pack(0)
    return ScsiResult(data=data[:alloc])


# -- START STOP UNIT ------------------------------------------------------------------------

def start_stop_unit(lu: LogicalUnit, cmd: ScsiCommand):
    """START STOP UNIT (SBC-4 §5.25).

    A POWER CONDITION other than 0 makes START and LOEJ ignored.  On a removable LU,
    LOEJ ejects (START=0) or loads (START=1) the medium unless an I_T nexus prevents
    removal (ILLEGAL REQUEST, MEDIUM REMOVAL PREVENTED).  A non-removable LU has no
    motor to stop and stays ready; stopping still flushes unless NO_FLUSH.
    """
    cdb = cmd.cdb
    power = cdb[4] >> 4
    no_flush = cdb[4] & 0x04
    loej = cdb[4] & 0x02
    start = cdb[4] & 0x01
    if power:
        return ScsiResult()
    if loej and lu.removable:
        if lu.removal_prevented():
            raise SenseError(SenseKey.ILLEGAL_REQUEST, S.MEDIUM_REMOVAL_PREVENTED)
        lu.set_medium(bool(start), cmd.nexus)
    if not start and not no_flush:
        return lu.flushed(ScsiResult())
    return ScsiResult()


# -- SANITIZE --------------------------------------------------------------------------------

def sanitize_data_out_length(cdb: bytes, block_size: int) -> int:
    return be16(cdb, 7)


# LUs whose last SANITIZE asked for the restricted completion mode (AUSE=0): if it failed,
# only another SANITIZE that succeeds ends the failure mode (SBC-4 §4.11.4).  Weak: the
# set never keeps a removed LU alive.
_RESTRICTED_COMPLETION: "weakref.WeakSet[LogicalUnit]" = weakref.WeakSet()


def _check_room_to_overwrite(lu: LogicalUnit, block: bytes) -> None:
    """An OVERWRITE writes every block: on a thin LU whose filesystem cannot hold that, it
    would fill it (and starve every other image there) hours in, then fail.  It is refused
    before it starts, as a write that cannot get its space is (SBC-4 §4.7.3.7).  An all-zero
    pattern deallocates instead (LBPRZ), so it needs no room."""
    if lu.thin and lu.lbprz and not any(block):
        return
    free = getattr(lu.backstore, "free_bytes", None)
    allocated = getattr(lu.backstore, "allocated_bytes", None)
    if free is None or allocated is None:
        return
    try:
        short = free() < lu.num_blocks * lu.block_size - allocated()
    except OSError:
        return  # cannot tell: the overwrite itself reports a lack of room
    if short:
        raise SenseError(SenseKey.DATA_PROTECT, S.SPACE_ALLOCATION_FAILED_WRITE_PROTECT)


def sanitize(lu: LogicalUnit, cmd: ScsiCommand):
    """SANITIZE (SBC-4 §5.30): OVERWRITE, BLOCK ERASE, CRYPTOGRAPHIC ERASE, EXIT FAILURE MODE.

    Block and cryptographic erase deallocate every block (reads return zeroes afterwards,
    WABEREQ/WACEREQ=01b).  OVERWRITE writes only the last pass: a file keeps no remanence
    of earlier ones.  That pass is the INITIALIZATION PATTERN itself whatever INVERT and
    OVERWRITE COUNT say: with INVERT=1 the first pass of an even count is the inverse,
    so the passes alternate and end on the pattern (SBC-4 §5.30.2.2).  While it runs the
    LU answers NOT READY, SANITIZE IN PROGRESS.
    """
    cdb = cmd.cdb
    sa = cdb[1] & 0x1F
    immed = cdb[1] & 0x80
    ause = bool(cdb[1] & 0x20)
    if cdb[1] & 0x40 or any(cdb[2:7]):
        raise S.illegal_field(1 if cdb[1] & 0x40 else 2)
    if lu.sanitize_failed and lu in _RESTRICTED_COMPLETION:
        # Restricted completion: neither EXIT FAILURE MODE nor a SANITIZE that would allow it
        # (AUSE=1) may put back to use a medium whose erase failed (SBC-4 §4.11.4, §5.30.1).
        if sa == 0x1F:
            raise S.illegal_field(1, 4)
        if ause:
            raise S.illegal_field(1, 5)
    plen = be16(cdb, 7)
    if sa == 0x01:  # OVERWRITE
        if plen < 5 or plen > lu.block_size + 4:
            raise S.illegal_field(7)
        params = bytes(cmd.data_out[:plen])
        if len(params) < plen:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, S.PARAMETER_LIST_LENGTH_ERROR)
        count = params[0] & 0x1F
        pat_len = be16(params, 2)
        if count == 0 or pat_len == 0 or pat_len > lu.block_size or pat_len + 4 != plen:
            raise S.illegal_param(0 if count == 0 else 2)
        if params[0] & 0x60 or params[1]:
            raise S.illegal_param(0 if params[0] & 0x60 else 1)  # TEST (vendor specific) / reserved
        pattern = params[4:4 + pat_len]
        bs = lu.block_size
        block = (pattern * (bs // pat_len + 1))[:bs]
        job = ("overwrite", block, count)
    elif sa in (0x02, 0x03):  # BLOCK ERASE, CRYPTOGRAPHIC ERASE
        if plen:
            raise S.illegal_field(7)
        job = ("erase", None, 1)
    elif sa == 0x1F:  # EXIT FAILURE MODE
        if plen:
            raise S.illegal_field(7)
        lu.exit_sanitize_failure_mode()
        _RESTRICTED_COMPLETION.discard(lu)
        return ScsiResult()
    else:
        raise S.illegal_field(1, 4)
    lu.check_writable()
    if job[0] == "overwrite":
        _check_room_to_overwrite(lu, job[1])
    if ause:
        _RESTRICTED_COMPLETION.discard(lu)
    else:
        _RESTRICTED_COMPLETION.add(lu)
    return lu.run_sanitize(job, bool(immed))
