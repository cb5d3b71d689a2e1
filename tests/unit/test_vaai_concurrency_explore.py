"""ABORT TASK (cancellation) of a COMPARE AND WRITE in flight, and ATS from two nexuses, in-process.

A task management function aborts a command by cancelling its task (connection.abort_tasks).
A COMPARE AND WRITE can be suspended in two places: waiting for a zero-copy READ's hold on its
range (before it compares: aborted there it must not write), or waiting for the flush of a
FUA / WCE=0 write (after it wrote: the LU's lock, writer count and task set must be left clean,
or the next ATS of every other host stalls -- ESXi drops the datastore after ~8 s).
"""
from __future__ import annotations

import asyncio
import time

from iscsi.scsi.types import TaskAttr

from .test_scsi_support import (CHECK, GOOD, NEXUS_A, NEXUS_B, Initiator, compare_and_write, make_lu,
                                parse_sense, read16)

BS = 512


def _lu(tmp_path):
    return make_lu("file", tmp_path, size=1 << 20)


async def _ready(*inits: Initiator) -> None:
    for i in inits:
        await i.clear_ua()


def test_caw_aborted_while_waiting_for_a_held_read_does_not_write(tmp_path):
    async def run():
        lu = _lu(tmp_path)
        a, b = Initiator(lu, NEXUS_A), Initiator(lu, NEXUS_B)
        await _ready(a, b)
        lock = 10
        hold = lu.fence.hold(lu.backstore, lock * BS, 128 * BS)  # a zero-copy READ still unacknowledged
        old, mine = bytes(BS), b"\x01" * BS
        task = asyncio.ensure_future(a.cmd(compare_and_write(lock, 1), old + mine))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done() and lu.fence.writers == 1  # waiting for the hold
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        hold.release()
        assert lu.fence.writers == 0
        assert bytes((await a.ok(read16(lock, 1))).data) == old, "an aborted CAW wrote"
        # the lock is free for the other host at once
        t = time.monotonic()
        await b.ok(compare_and_write(lock, 1), old + mine)
        assert time.monotonic() - t < 1.0
        lu.close()
    asyncio.run(run())


def test_caw_aborted_during_its_flush_leaves_lock_and_task_set_clean(tmp_path):
    async def run():
        lu = _lu(tmp_path)
        lu.mode.wce = False  # every write waits for its flush (SBC-4 §6.5.5)
        real_flush = lu.backstore.flush

        def slow_flush():
            time.sleep(0.05)
            real_flush()
        lu.backstore.flush = slow_flush
        a, b = Initiator(lu, NEXUS_A), Initiator(lu, NEXUS_B)
        await _ready(a, b)
        lock = 20
        free, mine, theirs = bytes(BS), b"\x0a" * BS, b"\x0b" * BS
        task = asyncio.ensure_future(a.cmd(compare_and_write(lock, 1), free + mine))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done()  # compared and wrote, now waiting for the flush
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert lu.fence.writers == 0
        # B sees A's record (the write happened before the abort) and loses with the offset
        sense = await b.fails(compare_and_write(lock, 1), free + theirs)
        assert sense.code[:2] == (0x0E, 0x1D) and sense.info == 0
        # an ORDERED command after the aborted CAW is not held back by it
        r = await asyncio.wait_for(b.cmd(read16(lock, 1), attr=TaskAttr.ORDERED), 2.0)
        assert r.status == GOOD and bytes(r.data) == mine
        # A releases; B acquires
        await a.ok(compare_and_write(lock, 1), mine + free)
        await b.ok(compare_and_write(lock, 1), free + theirs)
        assert len(lu.tasks) == 0
        lu.close()
    asyncio.run(run())


def test_caw_from_many_nexuses_one_winner_per_round(tmp_path):
    """Eight nexuses send CAW free->mine for the same block in the same loop turn: exactly one
    GOOD per round, the others MISCOMPARE with INFORMATION at the winner's first byte."""
    from iscsi.scsi.types import ITNexus

    async def run():
        lu = _lu(tmp_path)
        inits = [Initiator(lu, ITNexus(f"iqn.x:i{i},i,0x{i:012x}", "iqn.x:t,t,0x1", 1, 1)) for i in range(8)]
        await _ready(*inits)
        lock = 30
        free = bytes(BS)

        def rec(i):
            b = bytearray(BS)
            b[5 * i + 1] = 0x80 | i
            return bytes(b)
        for rnd in range(50):
            results = await asyncio.gather(*(x.cmd(compare_and_write(lock, 1), free + rec(i))
                                             for i, x in enumerate(inits)))
            winners = [i for i, r in enumerate(results) if r.status == GOOD]
            assert len(winners) == 1, (rnd, winners)
            w = winners[0]
            for i, r in enumerate(results):
                if i != w:
                    assert r.status == CHECK
                    s = parse_sense(r.sense)
                    assert s.code[:2] == (0x0E, 0x1D) and s.info == 5 * w + 1
            await inits[w].ok(compare_and_write(lock, 1), rec(w) + free)
        lu.close()
    asyncio.run(run())
