"""LogicalUnit.write_now, the per-I/O shortcut for WRITE(10)/(16), held to LogicalUnit.start.

As for read_now (test_read_now.py): each case runs on two logical units in the same state,
one the transport's way (write_now, then execute when it declines), its twin through execute
alone.  Both must answer the same, and both media must hold the same bytes afterwards; the
shortcut must decline without any side effect, and must really be taken for a plain WRITE.
"""
from __future__ import annotations

import asyncio
import os

import pytest

from iscsi.scsi.types import ScsiCommand, ScsiResult, Status, TaskAttr
from iscsi.scsi.zerocopy import FileExtent

from .test_pr import basic_params, prout_cdb
from .test_read_now import clear_ua, twins
from .test_scsi_support import NEXUS_A, NEXUS_B, Initiator, read16, rw10, rw16

BS = 512
SIZE = 1 << 20
NB = SIZE // BS


def write10c(lba: int, n: int, flags: int = 0, control: int = 0) -> bytes:
    return rw10(0x2A, lba, n, flags, control).ljust(16, b"\0")


def write16c(lba: int, n: int, flags: int = 0, control: int = 0) -> bytes:
    return rw16(0x8A, lba, n, flags, control)


async def same_answer(a, b, cdb: bytes, data: bytes, nexus=NEXUS_A) -> bool:
    """``cdb`` with ``data`` on ``a`` the transport's way and on ``b`` the full way: the same
    answer and the same medium afterwards.  Returns whether the shortcut answered."""
    mine = a.write_now(cdb, nexus, data)
    taken = mine is not None
    if mine is None:
        mine = await a.execute(ScsiCommand(cdb, 0, nexus, data, len(data), TaskAttr.SIMPLE))
    full = await b.execute(ScsiCommand(cdb, 0, nexus, data, len(data), TaskAttr.SIMPLE))
    assert (mine.status, bytes(mine.sense)) == (full.status, bytes(full.sense)), cdb.hex()
    assert bytes(a.backstore.read(0, SIZE)) == bytes(b.backstore.read(0, SIZE)), f"media differ after {cdb.hex()}"
    # The shortcut counts what it serves as start() would count it (iscsi-target stats --luns).
    assert io_counters(a) == io_counters(b), cdb.hex()
    return taken


def io_counters(lu) -> tuple[int, ...]:
    return (lu.reads, lu.read_bytes, lu.writes, lu.written_bytes, lu.other_commands)


def blocks(n: int) -> bytes:
    return os.urandom(n * BS)


CASES = [
    (write10c(0, 8), blocks(8)), (write16c(100, 16), blocks(16)), (write10c(NB - 1, 1), blocks(1)),
    (write10c(0, 8, flags=0x10), blocks(8)),                  # DPO: written as usual
    (write16c(5, 2, flags=0x08), blocks(2)),                  # FUA: waits for a flush
    (write10c(5, 2, flags=0x20), blocks(2)),                  # WRPROTECT
    (write10c(5, 0), b""), (write16c(5, 0), b""),             # nothing to write
    (write10c(NB, 1), blocks(1)), (write16c(2**64 - 1, 2), blocks(2)),  # out of range, wrapping
    (write16c(0, 0xFFFFFFFF), blocks(1)),                     # above MAXIMUM TRANSFER LENGTH
    (write10c(9, 4), blocks(3)), (write10c(9, 4), blocks(5)),  # data shorter / longer than the CDB
    (write10c(4, 1, control=0x04), blocks(1)),                # NACA
    (rw10(0xAA, 0, 1).ljust(16, b"\0"), blocks(1)),           # WRITE(12): not for the shortcut
]


@pytest.mark.parametrize("kind", ["ram", "file"])
async def test_every_case_agrees_with_start(tmp_path, kind):
    a, b = twins(tmp_path, kind)
    await clear_ua(a, b)
    taken = [await same_answer(a, b, cdb, data) for cdb, data in CASES]
    assert taken[:4] == [True] * 4
    assert not any(taken[4:])


async def test_first_contact_and_unit_attention_go_the_full_way(tmp_path):
    a, b = twins(tmp_path)
    assert not await same_answer(a, b, write10c(0, 1), blocks(1))  # power-on UA reported
    assert await same_answer(a, b, write10c(0, 1), blocks(1))


async def test_write_cache_off_software_write_protect_and_read_only(tmp_path):
    a, b = twins(tmp_path)
    await clear_ua(a, b)
    for lu in (a, b):
        lu.mode.wce = False
    assert not await same_answer(a, b, write10c(3, 1), blocks(1))  # written, then flushed: start()
    for lu in (a, b):
        lu.mode.wce = True
        lu.mode.swp = True
    assert not await same_answer(a, b, write10c(3, 1), blocks(1))  # DATA PROTECT from start()


@pytest.mark.parametrize("pr_type,writes_allowed", [(1, False), (5, False)])  # WE, WE registrants only
async def test_reservation_of_another_nexus(tmp_path, pr_type, writes_allowed):
    a, b = twins(tmp_path)
    for lu in (a, b):
        holder = Initiator(lu, NEXUS_B)
        await holder.clear_ua()
        await holder.ok(prout_cdb(0x00), basic_params(sa_key=0xB))
        await holder.ok(prout_cdb(0x01, pr_type=pr_type), basic_params(key=0xB))
    await clear_ua(a, b)
    assert await same_answer(a, b, write10c(2, 2), blocks(2)) is writes_allowed


async def test_a_zero_copy_hold_on_the_range_makes_it_wait(tmp_path):
    a, b = twins(tmp_path)
    await clear_ua(a, b)
    hold = a.read_now(read16(0, 256), NEXUS_A, True)
    assert isinstance(hold, FileExtent)
    assert a.write_now(write10c(8, 1), NEXUS_A, blocks(1)) is None  # inside the held range
    assert a.write_now(write10c(1000, 1), NEXUS_A, blocks(1)) is not None  # elsewhere: at once
    hold.release()


async def test_an_ordered_barrier_goes_the_full_way(tmp_path):
    a, b = twins(tmp_path)
    await clear_ua(a, b)
    hold = a.read_now(read16(0, 256), NEXUS_A, True)
    started = a.start(ScsiCommand(rw10(0x2A, 0, 1).ljust(16, b"\0"), 0, NEXUS_A, b"\1" * BS, BS, TaskAttr.ORDERED))
    pending = asyncio.ensure_future(started)
    await asyncio.sleep(0)
    assert a.tasks._ordered is not None
    assert a.write_now(write10c(900, 1), NEXUS_A, blocks(1)) is None
    hold.release()
    assert (await pending).status == Status.GOOD


@pytest.mark.parametrize("errno_, key", [(5, 0x03), (28, 0x07)])  # EIO: MEDIUM ERROR; ENOSPC: DATA PROTECT
async def test_a_failing_write_is_answered_as_start_answers_it(tmp_path, errno_, key):
    a, b = twins(tmp_path)
    await clear_ua(a, b)

    def broken(offset, data, fua=False):
        raise OSError(errno_, os.strerror(errno_))

    for lu in (a, b):
        lu.backstore.write = broken
    r = a.write_now(write10c(0, 1), NEXUS_A, blocks(1))
    assert isinstance(r, ScsiResult) and r.status == Status.CHECK_CONDITION and r.sense[2] & 0x0F == key
    full = await b.execute(ScsiCommand(write10c(0, 1), 0, NEXUS_A, blocks(1), BS))
    assert (full.status, bytes(full.sense)) == (r.status, bytes(r.sense))


async def test_a_deferred_error_of_a_gathered_write_is_reported_once(tmp_path):
    a, b = twins(tmp_path, gather=True)
    await clear_ua(a, b)
    for lu in (a, b):
        lu.backstore._gather.error = OSError(5, "Input/output error")
    data = blocks(8)
    assert await same_answer(a, b, write16c(64, 8), data)  # the deferred CHECK CONDITION, from the shortcut
    assert await same_answer(a, b, write16c(64, 8), data)  # then writes go on
    assert bytes(a.backstore.read(64 * BS, 8 * BS)) == data


async def test_writes_gathered_through_the_shortcut_are_read_back(tmp_path):
    a, _ = twins(tmp_path, gather=True)
    await clear_ua(a)
    pieces = [blocks(8) for _ in range(20)]
    for i, p in enumerate(pieces):  # back to back: one gathered run
        assert a.write_now(write10c(200 + 8 * i, 8), NEXUS_A, p) is not None
    got = a.read_now(rw16(0x88, 200, 160), NEXUS_A, False)
    assert bytes(got) == b"".join(pieces)
