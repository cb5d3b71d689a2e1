"""READ/WRITE 6/10/12/16, WRITE AND VERIFY, VERIFY, SYNCHRONIZE CACHE: data, boundaries, fields, residual lengths."""
from __future__ import annotations

import os

import pytest

from iscsi.scsi.types import Status

from .test_scsi_support import (
    Initiator, kind, make_lu, read6, read10, read16, rw10, rw12, rw16, write6, write10, write16,
)

__all__ = ["kind"]

ILLEGAL = 0x5
LBA_OOB = (0x5, 0x21, 0x00)
INVALID_FIELD = (0x5, 0x24, 0x00)


async def ready(lu) -> Initiator:
    ini = Initiator(lu)
    await ini.clear_ua()
    return ini


@pytest.mark.parametrize("bs", [512, 4096])
async def test_write_read_all_cdb_sizes(kind, tmp_path, bs):
    lu = make_lu(kind, tmp_path, size=4 << 20, block_size=bs)
    ini = await ready(lu)
    nb = lu.num_blocks
    payload = os.urandom(3 * bs)
    for wr, rd in [
        (write10(5, 3), read10(5, 3)),
        (rw12(0xAA, nb - 3, 3), rw12(0xA8, nb - 3, 3)),
        (write16(nb - 3, 3), read16(nb - 3, 3)),
        (write6(7, 3), read6(7, 3)),
    ]:
        await ini.ok(wr, payload)
        r = await ini.ok(rd)
        assert bytes(r.data) == payload


async def test_read6_zero_length_means_256_blocks(tmp_path):
    lu = make_lu("ram", size=1 << 20)
    ini = await ready(lu)
    r = await ini.ok(read6(0, 0))
    assert len(r.data) == 256 * 512


@pytest.mark.parametrize("op_read,op_write,builder", [
    (0x28, 0x2A, rw10), (0xA8, 0xAA, rw12), (0x88, 0x8A, rw16),
])
async def test_lba_out_of_range(kind, tmp_path, op_read, op_write, builder):
    lu = make_lu(kind, tmp_path, size=1 << 20)
    ini = await ready(lu)
    nb = lu.num_blocks
    assert len((await ini.ok(builder(op_read, nb - 1, 1))).data) == 512  # last LBA works
    for lba, n in [(nb, 1), (nb - 1, 2), (nb + 1, 0), (0x80000000, 1), (0xFFFFFFFF, 1)]:
        assert (await ini.fails(builder(op_read, lba, n))).code == LBA_OOB
        assert (await ini.fails(builder(op_write, lba, n), bytes(512 * n))).code == LBA_OOB
    # zero blocks at a valid LBA: GOOD with no data
    r = await ini.ok(builder(op_read, 0, 0))
    assert len(r.data) == 0
    await ini.ok(builder(op_write, nb - 1, 0))


async def test_lba_out_of_range_64bit(tmp_path):
    lu = make_lu("ram")
    ini = await ready(lu)
    for lba in (1 << 63, (1 << 64) - 1):
        assert (await ini.fails(read16(lba, 1))).code == LBA_OOB


@pytest.mark.parametrize("builder,op", [(rw10, 0x28), (rw10, 0x2A), (rw12, 0xA8), (rw16, 0x8A), (rw10, 0x2F), (rw10, 0x2E)])
async def test_protect_fields_rejected_without_pi(builder, op):
    lu = make_lu("ram")
    ini = await ready(lu)
    for prot in range(1, 8):
        s = await ini.fails(builder(op, 0, 1, prot << 5), bytes(512))
        assert s.code == INVALID_FIELD
        assert s.sks is not None and s.sks[0] & 0x40  # points into the CDB
        assert (s.sks[1] << 8 | s.sks[2]) == 1


async def test_dpo_fua_accepted_and_advertised():
    lu = make_lu("ram")
    ini = await ready(lu)
    ms = await ini.ok(bytes((0x1A, 0, 0x3F, 0, 255, 0)))
    assert ms.data[2] & 0x10  # DPOFUA
    for flags in (0x10, 0x08, 0x18, 0x02):  # DPO, FUA, both, FUA_NV (obsolete, ignored)
        await ini.ok(write10(0, 1, flags), bytes(512))
        await ini.ok(read16(0, 1, flags))


async def test_fua_and_sync_cache_reach_fdatasync(tmp_path, monkeypatch):
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    lu = make_lu("file", tmp_path)
    ini = await ready(lu)
    await ini.ok(write10(0, 1), bytes(512))
    assert calls == []  # write-back cache (WCE=1): no flush for a plain write
    await ini.ok(write10(0, 1, 0x08), bytes(512))
    assert len(calls) == 1
    await ini.ok(rw10(0x35, 0, 0))  # SYNCHRONIZE CACHE(10)
    assert len(calls) == 2
    await ini.ok(rw16(0x91, 0, 1))  # SYNCHRONIZE CACHE(16)
    assert len(calls) == 3
    await ini.ok(rw16(0x8E, 0, 1, 0x02), bytes(512))  # WRITE AND VERIFY(16) makes it stable
    assert len(calls) == 4
    assert (await ini.fails(rw10(0x35, lu.num_blocks, 1))).code == LBA_OOB


async def test_short_data_out_writes_only_whole_blocks():
    """libiscsi Write10Residuals: EDTL < SCSI transfer length writes only what arrived, GOOD."""
    lu = make_lu("ram")
    ini = await ready(lu)
    await ini.ok(write10(0, 2), b"a" * 1024)
    await ini.ok(write10(0, 2), b"b" * 512)  # two blocks asked, one block sent
    r = await ini.ok(read10(0, 2))
    assert r.data == b"b" * 512 + b"a" * 512
    await ini.ok(write10(0, 1), b"c" * 200)  # less than one block: nothing written
    assert (await ini.ok(read10(0, 1))).data == b"b" * 512
    await ini.ok(write10(0, 1), b"")  # no data at all
    # more data than asked: only the CDB's transfer length is used
    await ini.ok(write10(0, 1), b"d" * 1024)
    assert (await ini.ok(read10(0, 2))).data == b"d" * 512 + b"a" * 512


async def test_read_returns_exactly_transfer_length():
    lu = make_lu("ram")
    ini = await ready(lu)
    for n in (1, 7, 256):
        assert len((await ini.ok(read10(0, n))).data) == n * 512


async def test_transfer_length_limit():
    lu = make_lu("ram", size=64 << 20)
    ini = await ready(lu)
    lu.max_transfer = 128
    s = await ini.fails(read10(0, 129))
    assert s.code == INVALID_FIELD
    await ini.ok(read10(0, 128))


async def test_read_only_lu_write_protected(kind, tmp_path):
    lu = make_lu(kind, tmp_path, read_only=True)
    ini = await ready(lu)
    ms = await ini.ok(bytes((0x1A, 0, 0x3F, 0, 255, 0)))
    assert ms.data[2] & 0x80  # WP in the device-specific parameter
    for cdb in (write10(0, 1), write16(0, 1), rw12(0xAA, 0, 1), write6(0, 1), rw10(0x2E, 0, 1)):
        assert (await ini.fails(cdb, bytes(512))).code == (0x7, 0x27, 0x00)
    await ini.ok(read10(0, 1))


@pytest.mark.parametrize("op", [0x2F, 0xAF, 0x8F])
async def test_verify_bytchk(kind, tmp_path, op):
    lu = make_lu(kind, tmp_path)
    ini = await ready(lu)
    data = os.urandom(4 * 512)
    await ini.ok(write10(10, 4), data)
    build = {0x2F: rw10, 0xAF: rw12, 0x8F: rw16}[op]
    await ini.ok(build(op, 10, 4, 0x02), data)  # BYTCHK=01b: equal
    bad = bytearray(data)
    bad[1234] ^= 0x55
    s = await ini.fails(build(op, 10, 4, 0x02), bytes(bad))
    assert s.code == (0xE, 0x1D, 0x00)
    assert s.info == 1234
    await ini.ok(build(op, 10, 4, 0x00))  # BYTCHK=0: medium check only, no data
    await ini.ok(build(op, 10, 4, 0x10 | 0x00))  # DPO
    assert (await ini.fails(build(op, lu.num_blocks - 1, 2, 0x02), bytes(1024))).code == LBA_OOB
    assert (await ini.fails(build(op, 0, 1, 0x04), bytes(512))).code == INVALID_FIELD  # BYTCHK=10b
    assert (await ini.fails(build(op, 0, 1, 0x20 | 0x02), bytes(512))).code == INVALID_FIELD  # VRPROTECT


async def test_verify_bytchk_11_compares_one_block_to_each():
    lu = make_lu("ram")
    ini = await ready(lu)
    block = b"\x5a" * 512
    await ini.ok(write10(0, 3), block * 3)
    await ini.ok(rw10(0x2F, 0, 3, 0x06), block)
    await ini.ok(write10(2, 1), b"\x5a" * 100 + b"\x00" + b"\x5a" * 411)
    s = await ini.fails(rw10(0x2F, 0, 3, 0x06), block)
    assert s.key == 0xE and s.info == 2 * 512 + 100
    assert lu.data_out_length(rw10(0x2F, 0, 3, 0x06).ljust(16, b"\0")) == 512


async def test_data_out_length_from_cdb():
    lu = make_lu("ram", block_size=4096)
    d = lambda cdb: lu.data_out_length(bytes(cdb).ljust(16, b"\0"))  # noqa: E731
    assert d(write10(0, 3)) == 3 * 4096
    assert d(write16(0, 2)) == 2 * 4096
    assert d(rw12(0xAA, 0, 5)) == 5 * 4096
    assert d(write6(0, 0)) == 256 * 4096
    assert d(read10(0, 8)) == 0
    assert d(rw10(0x2F, 0, 4, 0x02)) == 4 * 4096
    assert d(rw10(0x2F, 0, 4, 0x00)) == 0
    assert d(bytes((0x89,)) + bytes(12) + b"\x02") == 2 * 2 * 4096  # COMPARE AND WRITE
    assert d(bytes((0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0))) == 24  # UNMAP parameter list
    assert d(rw16(0x93, 0, 8, 0x01)) == 0  # WRITE SAME(16) NDOB
    assert d(rw16(0x93, 0, 8)) == 4096
    assert d(bytes((0xC5,))) is None  # unknown opcode: transport falls back to EDTL


async def test_write_and_verify_bytchk_reserved_value():
    lu = make_lu("ram")
    ini = await ready(lu)
    assert (await ini.fails(rw10(0x2E, 0, 1, 0x04), bytes(512))).code == INVALID_FIELD
    await ini.ok(rw10(0x2E, 0, 1, 0x02), b"w" * 512)
    assert (await ini.ok(read10(0, 1))).data == b"w" * 512


async def test_naca_not_supported():
    lu = make_lu("ram")
    ini = await ready(lu)
    cdb = bytearray(read10(0, 1))
    cdb[9] = 0x04
    s = await ini.fails(bytes(cdb))
    assert s.code == INVALID_FIELD


async def test_unknown_opcode():
    lu = make_lu("ram")
    ini = await ready(lu)
    assert (await ini.fails(bytes((0xC5, 0, 0, 0, 0, 0)))).code == (0x5, 0x20, 0x00)
    assert (await ini.fails(bytes((0x9E, 0x1F)) + bytes(14))).code == INVALID_FIELD


async def test_backstore_error_becomes_medium_error(tmp_path):
    lu = make_lu("ram")
    ini = await ready(lu)

    def broken(*a, **k):
        raise OSError(5, "EIO")

    lu.backstore.read = broken
    s = await ini.fails(read10(0, 1))
    assert s.code == (0x3, 0x11, 0x00)
    lu.backstore.write = broken
    assert (await ini.fails(write10(0, 1), bytes(512))).code == (0x3, 0x0C, 0x00)
    assert (await ini.cmd(bytes(6))).status == Status.GOOD


# -- large transfers are copied in steps -------------------------------------------------------

STEP = 64 << 10  # LARGE_TRANSFER_STEP made small so a few-MiB LU has multi-step transfers


@pytest.fixture
def small_step(monkeypatch):
    from iscsi.scsi import sbc

    monkeypatch.setattr(sbc, "LARGE_TRANSFER_STEP", STEP)
    return STEP


class _Counting:
    """Wraps a backstore and records each read/write call's length, in order."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.calls: list[tuple[str, int]] = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def read(self, offset, length):
        self.calls.append(("read", length))
        return self._inner.read(offset, length)

    def read_into(self, offset, dest):
        self.calls.append(("read", len(dest)))
        return self._inner.read_into(offset, dest)

    def write(self, offset, data, fua=False):
        self.calls.append(("write", len(data)))
        return self._inner.write(offset, data, fua)


@pytest.mark.parametrize("bs", [512, 4096])
async def test_large_read_and_write_go_in_steps_and_keep_every_byte(kind, tmp_path, small_step, bs):
    lu = make_lu(kind, tmp_path, size=4 << 20, block_size=bs)
    lu.backstore = counting = _Counting(lu.backstore)
    ini = await ready(lu)
    n = (3 * STEP + 5 * bs) // bs          # not a whole number of steps
    lba = 3
    payload = os.urandom(n * bs)
    await ini.ok(write16(lba, n), payload)
    r = await ini.ok(read16(lba, n))
    assert bytes(r.data) == payload
    writes = [size for op, size in counting.calls if op == "write"]
    reads = [size for op, size in counting.calls if op == "read"]
    assert writes == [STEP, STEP, STEP, 5 * bs]
    assert reads == [STEP, STEP, STEP, 5 * bs]
    # Neighbours untouched.
    before = await ini.ok(read16(lba - 1, 1))
    after = await ini.ok(read16(lba + n, 1))
    assert bytes(before.data) == bytes(after.data) == bytes(bs)


async def test_large_read_lets_other_tasks_run_between_steps(tmp_path, small_step):
    """A maximum-length READ must not hold the event loop for its whole copy: another
    session's command runs while it is in progress."""
    import asyncio

    lu = make_lu("file", tmp_path, size=4 << 20)
    lu.backstore = counting = _Counting(lu.backstore)
    ini = await ready(lu)
    counting.calls.clear()
    ticks: list[int] = []

    async def other_session():
        for _ in range(50):
            ticks.append(len(counting.calls))
            await asyncio.sleep(0)

    other = asyncio.ensure_future(other_session())
    r = await ini.ok(read16(0, (4 << 20) // 512))
    await other
    steps = (4 << 20) // STEP
    assert len(r.data) == 4 << 20
    assert len(counting.calls) == steps
    assert any(0 < t < steps for t in ticks)


async def test_large_write_with_fua_is_flushed_after_the_last_step(tmp_path, small_step):
    lu = make_lu("ram", size=2 << 20)
    ini = await ready(lu)
    flushes = lu.backstore.flushes
    payload = os.urandom(4 * STEP)
    await ini.ok(write16(0, len(payload) // 512, flags=0x08), payload)   # FUA
    assert lu.backstore.flushes > flushes
    assert bytes((await ini.ok(read16(0, len(payload) // 512))).data) == payload


async def test_write_atomic_is_never_split(tmp_path, small_step):
    """WRITE ATOMIC(16) stays one pwrite whatever its length (SBC-4 §4.29: no other command
    may see part of it)."""
    import struct

    lu = make_lu("ram", size=2 << 20)
    lu.backstore = counting = _Counting(lu.backstore)
    ini = await ready(lu)
    n = 4 * STEP // 512
    cdb = struct.pack(">BBQHHBB", 0x9C, 0, 0, 0, n, 0, 0)
    payload = os.urandom(n * 512)
    await ini.ok(cdb, payload)
    assert [c for c in counting.calls if c[0] == "write"] == [("write", n * 512)]
    assert bytes((await ini.ok(read16(0, n))).data) == payload
