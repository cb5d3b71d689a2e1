"""LogicalUnit.read_now, the per-I/O shortcut for READ(10)/(16), held to LogicalUnit.start.

Each case runs the same command on two logical units in the same state: on one through
``read_now`` (and, when it declines, through ``execute`` as the transport does), on the twin
through ``execute`` alone.  The shortcut must answer exactly what the full path answers, or
decline without any side effect; and it must really be taken for an ordinary READ.
"""
from __future__ import annotations

import asyncio
import os

import pytest

from iscsi.backstore.file import FileBackstore
from iscsi.scsi.lu import LogicalUnit
from iscsi.scsi.types import ScsiCommand, ScsiResult, Status, TaskAttr
from iscsi.scsi.zerocopy import FileExtent

from .test_pr import basic_params, prout_cdb
from .test_scsi_support import NEXUS_A, NEXUS_B, Initiator, make_lu, read10, read16, rw10, rw16

BS = 512
SIZE = 1 << 20
NB = SIZE // BS


def read10c(lba: int, n: int, flags: int = 0, control: int = 0) -> bytes:
    """READ(10) as the transport hands it on: in the 16-byte CDB field."""
    return rw10(0x28, lba, n, flags, control).ljust(16, b"\0")


def read16c(lba: int, n: int, flags: int = 0, control: int = 0) -> bytes:
    return rw16(0x88, lba, n, flags, control)


CDBS = [
    read10(0, 1), read10(5, 8), read16(NB - 8, 8), read10(NB - 1, 1),
    read10(0, 0), read16(0, 0),                           # nothing to transfer
    read10(NB, 1), read16(NB - 1, 2), read16(2**64 - 1, 2),  # out of range, wrapping
    read16(0, 0xFFFFFFFF),                                # above MAXIMUM TRANSFER LENGTH
    read10(3, 2, flags=0x20), read16(3, 2, flags=0xE0),   # RDPROTECT
    read10(3, 2, flags=0x18), read16(3, 2, flags=0x08),   # DPO / FUA: read as usual
    read10c(4, 1, control=0x04), read16c(4, 1, control=0x04),  # NACA
    read10c(4, 1, control=0x01),                          # obsolete LINK bit: ignored by both
    rw10(0xA8, 0, 1), rw16(0x8A, 0, 1),                   # not READ(10)/(16)
]


def twins(tmp_path, kind: str = "file", gather: bool = False):
    """Two LUs with the same pattern on the medium (``gather``: file backstores that gather
    writes, as the daemon's do)."""
    lus = []
    pattern = os.urandom(SIZE)
    for i in range(2):
        d = tmp_path / f"lu{i}"
        d.mkdir()
        if gather:
            lu = LogicalUnit(FileBackstore(d / "lu.img", size=SIZE, gather_writes=True), serial=f"gather{i}")
        else:
            lu = make_lu(kind, d, size=SIZE)
        lu.backstore.write(0, pattern)
        lus.append(lu)
    return lus


async def same_answer(a, b, cdb: bytes, nexus=NEXUS_A, zero_copy: bool = False) -> bool:
    """Run ``cdb`` on ``a`` the transport's way and on ``b`` the full way; assert they agree.
    Returns whether the shortcut answered."""
    data = a.read_now(cdb, nexus, zero_copy)
    full = await b.execute(ScsiCommand(cdb, 0, nexus, b"", 1 << 20, TaskAttr.SIMPLE, zero_copy=zero_copy))
    try:
        return await _same_answer(a, b, cdb, nexus, zero_copy, data, full)
    finally:
        # The shortcut counts what it serves as start() would count it (iscsi-target stats --luns).
        assert io_counters(a) == io_counters(b), cdb.hex()


def io_counters(lu) -> tuple[int, ...]:
    return (lu.reads, lu.read_bytes, lu.writes, lu.written_bytes, lu.other_commands)


async def _same_answer(a, b, cdb: bytes, nexus, zero_copy: bool, data, full) -> bool:
    if data is None:
        mine = await a.execute(ScsiCommand(cdb, 0, nexus, b"", 1 << 20, TaskAttr.SIMPLE, zero_copy=zero_copy))
        assert (mine.status, bytes(as_bytes(mine.data)), bytes(mine.sense)) == \
            (full.status, bytes(as_bytes(full.data)), bytes(full.sense)), cdb.hex()
        release(mine.data, full.data)
        return False
    if isinstance(data, ScsiResult):  # a read that failed once started: start()'s answer
        assert (data.status, bytes(data.sense)) == (full.status, bytes(full.sense)), cdb.hex()
        return True
    assert full.status == Status.GOOD and not full.sense, f"shortcut answered where start() did not: {cdb.hex()}"
    assert as_bytes(data) == as_bytes(full.data), cdb.hex()
    release(data, full.data)
    return True


def as_bytes(data) -> bytes:
    return data.read() if isinstance(data, FileExtent) else bytes(data)


def release(*datas) -> None:
    for d in datas:
        if isinstance(d, FileExtent):
            d.release()


async def clear_ua(*lus, nexus=NEXUS_A) -> None:
    for lu in lus:
        await Initiator(lu, nexus).clear_ua()


async def test_first_contact_and_pending_ua_go_the_full_way(tmp_path):
    a, b = twins(tmp_path)
    # A first contact: the power-on unit attention must be reported, by start().
    assert not await same_answer(a, b, read10(0, 1))
    assert await same_answer(a, b, read10(0, 1))  # reported once; then the shortcut serves
    a.establish_ua((0x2A, 0x09))  # CAPACITY DATA HAS CHANGED
    b.establish_ua((0x2A, 0x09))
    assert not await same_answer(a, b, read16(1, 1))
    assert await same_answer(a, b, read16(1, 1))


@pytest.mark.parametrize("kind", ["ram", "file"])
async def test_every_cdb_agrees_with_start(tmp_path, kind):
    a, b = twins(tmp_path, kind)
    await clear_ua(a, b)
    taken = [await same_answer(a, b, cdb) for cdb in CDBS]
    # The ordinary READs (the first four, and DPO/FUA) are served by the shortcut.
    assert taken[:4] == [True] * 4 and taken[12] and taken[13]
    # Errors, nothing to read, NACA, other opcodes are left to start().
    assert not any(taken[4:12]) and not any(taken[14:16]) and not any(taken[17:])


@pytest.mark.parametrize("pr_type,reads_allowed", [(1, True), (3, False)])  # WE, EA
async def test_persistent_reservation_of_another_nexus(tmp_path, pr_type, reads_allowed):
    a, b = twins(tmp_path)
    for lu in (a, b):
        holder = Initiator(lu, NEXUS_B)
        await holder.clear_ua()
        await holder.ok(prout_cdb(0x00), basic_params(sa_key=0xB))          # REGISTER
        await holder.ok(prout_cdb(0x01, pr_type=pr_type), basic_params(key=0xB))  # RESERVE
    await clear_ua(a, b)
    assert await same_answer(a, b, read10(2, 2)) is reads_allowed


async def test_spc2_reservation_of_another_nexus(tmp_path):
    a, b = twins(tmp_path)
    await clear_ua(a, b)  # before the reservation: TEST UNIT READY would conflict after it
    for lu in (a, b):
        holder = Initiator(lu, NEXUS_B)
        await holder.clear_ua()
        await holder.ok(bytes([0x16, 0, 0, 0, 0, 0]))  # RESERVE(6)
    assert not await same_answer(a, b, read10(2, 2))
    assert await same_answer(a, b, read10(2, 2), nexus=NEXUS_B)


async def test_no_medium_goes_the_full_way(tmp_path):
    a, b = twins(tmp_path)
    await clear_ua(a, b)
    for lu in (a, b):
        lu.medium_present = False
        lu._update_state()
    assert not await same_answer(a, b, read10(0, 1))


async def test_zero_copy_extent_and_its_conditions(tmp_path):
    a, b = twins(tmp_path)
    await clear_ua(a, b)
    cdb = read16(64, 256)  # 128 KiB
    data = a.read_now(cdb, NEXUS_A, True)
    assert isinstance(data, FileExtent) and data in a.fence.holds
    assert data.read() == bytes(b.backstore.read(64 * BS, 256 * BS))
    data.release()
    assert not a.fence.holds
    # A writer past its gate: the READ is copied, not held.
    a.fence.writers = 1
    copied = a.read_now(cdb, NEXUS_A, True)
    assert isinstance(copied, bytes) and not a.fence.holds
    a.fence.writers = 0
    # A shared LU (a second nexus): copied too (only a sole user's READs are held).
    await clear_ua(a, nexus=NEXUS_B)
    shared = a.read_now(cdb, NEXUS_A, True)
    assert isinstance(shared, bytes) and not a.fence.holds


async def test_an_ordered_barrier_goes_the_full_way(tmp_path):
    a, b = twins(tmp_path)
    await clear_ua(a, b)
    # A write stuck behind a zero-copy hold, sent ORDERED: a barrier stands in the task set.
    hold = a.read_now(read16(0, 256), NEXUS_A, True)
    assert isinstance(hold, FileExtent)
    cdb = rw10(0x2A, 0, 1)
    started = a.start(ScsiCommand(cdb.ljust(16, b"\0"), 0, NEXUS_A, b"\1" * BS, BS, TaskAttr.ORDERED))
    assert not isinstance(started, ScsiResult)
    pending = asyncio.ensure_future(started)
    await asyncio.sleep(0)
    assert a.tasks._ordered is not None and not pending.done()
    assert a.read_now(read10(300, 1), NEXUS_A, False) is None
    hold.release()
    assert (await pending).status == Status.GOOD
    assert a.read_now(read10(0, 1), NEXUS_A, False) == b"\1" * BS


async def test_a_failing_medium_is_reported_by_start(tmp_path):
    a, b = twins(tmp_path)
    await clear_ua(a, b)

    def broken(offset, length):
        raise OSError(5, "Input/output error")

    a.backstore.read = broken
    r = a.read_now(read10(0, 1), NEXUS_A, False)
    assert isinstance(r, ScsiResult)
    assert r.status == Status.CHECK_CONDITION and r.sense[2] & 0x0F == 0x03  # MEDIUM ERROR
    b.backstore.read = broken
    full = await b.execute(ScsiCommand(read10(0, 1), 0, NEXUS_A, b"", BS))
    assert (full.status, bytes(full.sense)) == (r.status, bytes(r.sense))


@pytest.mark.parametrize("zero_copy", [False, True])
async def test_a_deferred_write_error_is_reported_by_the_next_read_once(tmp_path, zero_copy):
    """A gathered write that failed after its GOOD is reported to the LU's next command
    (SPC-4 §4.5.4 deferred error).  The error is handed out once: a shortcut that swallowed
    it and let start() read again would answer GOOD and lose it."""
    a, b = twins(tmp_path, gather=True)
    await clear_ua(a, b)
    for lu in (a, b):
        gather = lu.backstore._gather
        assert gather is not None, "the file backstore gathers writes"
        gather.error = OSError(5, "Input/output error")
    cdb = read16(64, 256) if zero_copy else read10(0, 1)
    assert await same_answer(a, b, cdb, zero_copy=zero_copy)  # answered by the shortcut...
    r = await b.execute(ScsiCommand(cdb, 0, NEXUS_A, b"", 1 << 20, zero_copy=zero_copy))
    assert r.status == Status.GOOD  # ...and once: the next READ is GOOD again
    first = await Initiator(a).cmd(cdb)
    assert first.status == Status.GOOD


async def test_a_deferred_write_error_reaches_the_initiator_through_the_shortcut(tmp_path):
    a, b = twins(tmp_path, gather=True)
    await clear_ua(a, b)
    a.backstore._gather.error = OSError(5, "Input/output error")
    r = a.read_now(read10(0, 1), NEXUS_A, False)
    assert isinstance(r, ScsiResult) and r.status == Status.CHECK_CONDITION
    assert r.sense[0] & 0x7F == 0x71  # deferred error, fixed format (SPC-4 §4.5.4)
