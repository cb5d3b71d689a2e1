"""Task attributes (SIMPLE / ORDERED / HEAD OF QUEUE) and COMPARE AND WRITE atomicity."""
from __future__ import annotations

import asyncio
import threading

from iscsi.scsi.types import Status, TaskAttr

from .test_scsi_support import NEXUS_A, NEXUS_B, Initiator, compare_and_write, make_lu, read10, rw10, write10

SYNC10 = rw10(0x35, 0, 0)


class GatedFlush:
    """Make the LU's flush block (in its worker thread) until released."""

    def __init__(self, lu) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self._real = lu.backstore.flush
        lu.backstore.flush = self

    def __call__(self) -> None:
        self.entered.set()
        assert self.gate.wait(10), "flush gate never opened"
        self._real()


async def wait_thread_event(ev: threading.Event) -> None:
    for _ in range(500):
        if ev.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("event not set")


async def test_ordered_waits_for_earlier_and_blocks_later():
    lu = make_lu("ram")
    ini = Initiator(lu)
    await ini.clear_ua()
    gate = GatedFlush(lu)
    done: list[str] = []

    async def run(name, cdb, data=b"", attr=TaskAttr.SIMPLE):
        r = await ini.cmd(cdb, data, attr=attr)
        assert r.status == Status.GOOD
        done.append(name)

    t_sync = asyncio.create_task(run("sync", SYNC10))
    await wait_thread_event(gate.entered)
    t_ord = asyncio.create_task(run("ordered-write", write10(0, 1), b"o" * 512, TaskAttr.ORDERED))
    t_simple = asyncio.create_task(run("simple-read", read10(0, 1)))
    t_hoq = asyncio.create_task(run("hoq-read", read10(0, 1), attr=TaskAttr.HEAD_OF_QUEUE))
    await asyncio.sleep(0.05)
    assert done == ["hoq-read"]  # HEAD OF QUEUE overtakes everything; the rest wait
    gate.gate.set()
    await asyncio.wait_for(asyncio.gather(t_sync, t_ord, t_simple, t_hoq), 10)
    assert done == ["hoq-read", "sync", "ordered-write", "simple-read"]
    assert (await ini.ok(read10(0, 1))).data == b"o" * 512


async def test_simple_tasks_run_concurrently_without_ordering():
    lu = make_lu("ram")
    ini = Initiator(lu)
    await ini.clear_ua()
    gate = GatedFlush(lu)
    t_sync = asyncio.create_task(ini.cmd(SYNC10))
    await wait_thread_event(gate.entered)
    # a SIMPLE read completes while the earlier SIMPLE flush is still in flight
    r = await asyncio.wait_for(ini.cmd(read10(0, 1)), 5)
    assert r.status == Status.GOOD and not t_sync.done()
    gate.gate.set()
    assert (await asyncio.wait_for(t_sync, 10)).status == Status.GOOD


async def test_lun_reset_releases_waiting_tasks():
    lu = make_lu("ram")
    ini = Initiator(lu)
    await ini.clear_ua()
    gate = GatedFlush(lu)
    t_sync = asyncio.create_task(ini.cmd(SYNC10))
    await wait_thread_event(gate.entered)
    t_ord = asyncio.create_task(ini.cmd(read10(0, 1), attr=TaskAttr.ORDERED))
    await asyncio.sleep(0.02)
    assert not t_ord.done()
    t_sync.cancel()  # the transport aborts the task set ...
    lu.lun_reset()  # ... and resets the LU
    r = await asyncio.wait_for(t_ord, 5)
    assert r.status in (Status.GOOD, Status.CHECK_CONDITION)
    gate.gate.set()


async def test_compare_and_write_is_atomic_under_concurrency():
    """Many CAWs racing on one block from two nexuses, all expecting the same old data: one wins."""
    lu = make_lu("ram")
    a, b = Initiator(lu, NEXUS_A), Initiator(lu, NEXUS_B)
    await a.clear_ua()
    await b.clear_ua()
    await a.ok(write10(7, 1), bytes(512))
    tasks = []
    for i in range(1, 41):
        ini = a if i % 2 else b
        payload = bytes(512) + bytes((i,)) * 512
        tasks.append(ini.cmd(compare_and_write(7, 1, flags=0x08 if i % 3 == 0 else 0), payload))
    results = await asyncio.gather(*tasks)
    winners = [i + 1 for i, r in enumerate(results) if r.status == Status.GOOD]
    assert len(winners) == 1
    final = (await a.ok(read10(7, 1))).data
    assert final == bytes((winners[0],)) * 512
    from .test_scsi_support import parse_sense
    for r in results:
        if r.status != Status.GOOD:
            assert parse_sense(r.sense).code == (0xE, 0x1D, 0x00)


async def test_compare_and_write_ping_pong_across_paths():
    """libiscsi MultipathIO.CompareAndWrite: alternate 0->1, 1->0 through two nexuses."""
    lu = make_lu("ram")
    paths = [Initiator(lu, NEXUS_A), Initiator(lu, NEXUS_B)]
    for p in paths:
        await p.clear_ua()
    await paths[0].ok(write10(0, 1), bytes(512))
    for i in range(20):
        p = paths[i % 2]
        old, new = bytes((i % 2,)) * 512, bytes(((i + 1) % 2,)) * 512
        await p.ok(compare_and_write(0, 1), old + new)
        s = await p.fails(compare_and_write(0, 1), old + new)
        assert s.code == (0xE, 0x1D, 0x00)


async def test_concurrent_fua_writes_share_flushes():
    """Group commit: a burst of FUA writes costs at most two fdatasyncs, each write still waits for one."""
    lu = make_lu("ram")
    ini = Initiator(lu)
    await ini.clear_ua()
    gate = GatedFlush(lu)
    first = asyncio.create_task(ini.cmd(write10(0, 1, 0x08), b"0" * 512))
    await wait_thread_event(gate.entered)  # flush #1 is running and blocked
    rest = [asyncio.create_task(ini.cmd(write10(i, 1, 0x08), bytes((i,)) * 512)) for i in range(1, 11)]
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in rest)  # their writes came after flush #1 started: they wait
    before = lu.backstore.flushes
    gate.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
    assert all(r.status == Status.GOOD for r in results)
    assert lu.backstore.flushes - before == 2  # flush #1 and one shared flush #2
