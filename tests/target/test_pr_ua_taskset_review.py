"""Review of persistent reservations, unit attentions and the task set across several sessions.

The cases are those a Windows cluster validation, an ESXi host or Pacemaker's fence_scsi
produce: one logical unit reached through several I_T nexuses (two initiators, two ISIDs
each, two target ports), driven in-process through :class:`LogicalUnit`.  Each test pins
one rule of SPC-4 / SAM-5 that the target broke before.
"""
from __future__ import annotations

import asyncio
import struct

from iscsi.scsi.taskset import TaskSet
from iscsi.scsi.types import ITNexus, ScsiResult, Status, TaskAttr
from tests.unit.test_scsi_support import Initiator, make_lu, parse_sense

TARGET = "iqn.2026-01.org.example:cluster-disk"
RESERVATION_CONFLICT = Status.RESERVATION_CONFLICT

# PERSISTENT RESERVE OUT service actions and types (SPC-4 §6.16.2)
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT, REGISTER_IGNORE = range(7)
WE, EA, WE_RO, EA_RO, WE_AR, EA_AR = 1, 3, 5, 6, 7, 8
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES, READ_FULL_STATUS = range(4)


def nexus(host: str, isid: int = 1, port: int = 1) -> ITNexus:
    """An I_T nexus of initiator ``host`` (ISID ``isid``) through target port ``port``."""
    return ITNexus(f"iqn.1991-05.com.microsoft:{host},i,0x4000013700{isid:02x}",
                   f"{TARGET},t,0x{port:04x}", port, port)


def prout(sa: int, pr_type: int = 0, key: int = 0, sa_key: int = 0, flags: int = 0) -> tuple[bytes, bytes]:
    params = struct.pack(">QQ4xBxH", key, sa_key, flags, 0)
    return bytes((0x5F, sa, pr_type, 0, 0)) + len(params).to_bytes(4, "big") + b"\x00", params


def prin(sa: int, alloc: int = 1024) -> bytes:
    return bytes((0x5E, sa, 0, 0, 0, 0, 0)) + alloc.to_bytes(2, "big") + b"\x00"


RESERVE6 = bytes((0x16, 0, 0, 0, 0, 0))
RELEASE6 = bytes((0x17, 0, 0, 0, 0, 0))


async def ready(lu, *nexuses: ITNexus) -> list[Initiator]:
    out = []
    for nx in nexuses:
        ini = Initiator(lu, nx)
        await ini.clear_ua()
        out.append(ini)
    return out


async def status(ini: Initiator, cdb: bytes, data: bytes = b"") -> int:
    return (await ini.cmd(cdb, data)).status



# -- Task set (SAM-5 §8.6, §8.7) ---------------------------------------------------------------

def recorder(done: list[str], gate: asyncio.Event):
    """``command(name, wait)``: a task body that records its name when it runs, after ``gate``
    opens if ``wait``."""
    def command(name: str, wait: bool = False):
        async def run() -> ScsiResult:
            if wait:
                await gate.wait()
            done.append(name)
            return ScsiResult()
        return run
    return command


async def _slow_simple_then_two_ordered():
    """S1 (SIMPLE, held until ``gate`` opens), then O1 and O2 (ORDERED), in that order."""
    tasks = TaskSet()
    done: list[str] = []
    gate = asyncio.Event()
    command = recorder(done, gate)
    started = []
    for attr, name, wait in ((TaskAttr.SIMPLE, "S1", True), (TaskAttr.ORDERED, "O1", False),
                             (TaskAttr.ORDERED, "O2", False)):
        started.append(asyncio.create_task(tasks.run(attr, command(name, wait=wait))))
        await asyncio.sleep(0)
    return tasks, done, gate, command, started


async def test_ordered_task_waits_for_older_tasks_when_the_ordered_task_between_is_aborted():
    """SAM-5 §8.7.3: an ORDERED task runs only once every task received before it has completed.
    S1 (SIMPLE, slow), O1 (ORDERED), O2 (ORDERED); ABORT TASK of O1 while it waits for S1.
    O2 ran at once, before S1, because only O1 had remembered S1."""
    tasks, done, gate, command, (s1, o1, o2) = await _slow_simple_then_two_ordered()
    o1.cancel()  # ABORT TASK
    await asyncio.sleep(0.01)
    assert done == []
    # A SIMPLE task received after the aborted O1 need not wait for S1 (only for ORDERED
    # tasks received before it), but O2 waits for it as well.
    s2 = asyncio.create_task(tasks.run(TaskAttr.SIMPLE, command("S2")))
    await asyncio.sleep(0.01)
    assert done == []  # S2 came after O2
    gate.set()
    await asyncio.wait_for(asyncio.gather(s1, o2, s2), 5)
    assert done == ["S1", "O2", "S2"]
    assert o1.cancelled() and not tasks.blocked and len(tasks) == 0


async def test_simple_task_waits_for_an_older_ordered_task_when_a_newer_one_is_aborted():
    """SAM-5 §8.7.2: a SIMPLE task runs only once every ORDERED task received before it has
    completed.  O1 (ORDERED, waiting for the slow S1), O2 (ORDERED), ABORT TASK of O2, then S3:
    S3 ran at once, while O1 had not even started."""
    tasks, done, gate, command, (s1, o1, o2) = await _slow_simple_then_two_ordered()
    o2.cancel()  # ABORT TASK
    await asyncio.sleep(0.01)
    s3 = asyncio.create_task(tasks.run(TaskAttr.SIMPLE, command("S3")))
    await asyncio.sleep(0.01)
    assert done == []
    assert tasks.blocked  # a SIMPLE task arriving now must queue (the LU's fast path asks this)
    gate.set()
    await asyncio.wait_for(asyncio.gather(s1, o1, s3), 5)
    assert done == ["S1", "O1", "S3"]
    assert o2.cancelled() and not tasks.blocked and len(tasks) == 0

# -- Unit attentions of persistent reservations (SPC-4 §5.13.11) -------------------------------

def pending(lu, ini: Initiator) -> list[tuple[int, int]]:
    return list(lu.ua.get(ini.nexus) or [])


RESERVATIONS_PREEMPTED = (0x2A, 0x03)
RESERVATIONS_RELEASED = (0x2A, 0x04)


async def _all_tg_pt_cluster():
    """node1 registered once with ALL_TG_PT=1 and seen through both target ports; node2 on port 1;
    node1 holds a Write Exclusive - Registrants Only reservation."""
    lu = make_lu("ram", size=1 << 20)
    n1p1, n1p2, n2 = await ready(lu, nexus("node1", port=1), nexus("node1", port=2), nexus("node2"))
    assert await status(n1p1, *prout(REGISTER_IGNORE, sa_key=0x11, flags=0x04)) == Status.GOOD
    assert await status(n2, *prout(REGISTER_IGNORE, sa_key=0x22)) == Status.GOOD
    assert await status(n1p1, *prout(RESERVE, WE_RO, key=0x11)) == Status.GOOD
    assert await status(n1p2, bytes((0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0)), bytes(512)) == Status.GOOD
    return lu, n1p1, n1p2, n2


async def test_clear_tells_the_senders_other_target_port_of_an_all_tg_pt_registration():
    """SPC-4 §5.13.11.3: CLEAR establishes RESERVATIONS PREEMPTED for every registered I_T nexus
    but the one it came through.  node1's registration made with ALL_TG_PT=1 also registered its
    I_T nexus through target port 2, which was left without the unit attention."""
    lu, n1p1, n1p2, n2 = await _all_tg_pt_cluster()
    assert await status(n1p1, *prout(CLEAR, key=0x11)) == Status.GOOD
    assert pending(lu, n1p1) == []
    assert pending(lu, n1p2) == [RESERVATIONS_PREEMPTED]
    assert pending(lu, n2) == [RESERVATIONS_PREEMPTED]


async def test_preempt_changing_type_tells_the_senders_other_target_port():
    """SPC-4 §5.13.11.4.3: a PREEMPT that changes the reservation's type establishes RESERVATIONS
    RELEASED for every I_T nexus still registered but the sender: node1 through port 2 too."""
    lu, n1p1, n1p2, n2 = await _all_tg_pt_cluster()
    assert await status(n1p1, *prout(PREEMPT, EA_RO, key=0x11, sa_key=0x11)) == Status.GOOD
    assert pending(lu, n1p1) == []
    assert pending(lu, n1p2) == [RESERVATIONS_RELEASED]
    assert pending(lu, n2) == [RESERVATIONS_RELEASED]


# -- PERSISTENT RESERVE IN data (SPC-4 §6.15) -------------------------------------------------

async def test_prgeneration_wraps_at_32_bits():
    """SPC-4 §6.15.2: PRGENERATION is a four-byte wrapping counter.  A logical unit whose
    counter was at 0xFFFFFFFF answered every PERSISTENT RESERVE IN after the next REGISTER
    with HARDWARE ERROR: the counter had grown to 2**32 and no longer packed."""
    saved: list[dict] = []
    state = {"version": 1, "aptpl": True, "generation": 0x1234,
             "registrations": [{"initiator_port": nexus("node1").initiator_port,
                                "target_port": nexus("node1").target_port,
                                "relative_port_id": 1, "key": 0x11}],
             "reservation": None}
    lu = make_lu("ram", size=1 << 20, pr_state=state, pr_persist=saved.append)
    assert lu.pr.generation == 0   # a restart is the LU's power on: PRgeneration starts again
    lu.pr.generation = 0xFFFFFFFF  # (after 2**32 - 1 changes)
    node1, = await ready(lu, nexus("node1"))
    assert await status(node1, *prout(REGISTER, key=0x11, sa_key=0x12, flags=0x01)) == Status.GOOD
    for sa in (READ_KEYS, READ_RESERVATION, READ_FULL_STATUS):
        r = await node1.cmd(prin(sa))
        assert r.status == Status.GOOD, parse_sense(r.sense)
        assert struct.unpack_from(">I", bytes(r.data))[0] == 0
    assert saved[-1]["generation"] == 0


# -- APTPL (SPC-4 §5.13.5) ---------------------------------------------------------------------

async def test_a_failed_aptpl_save_leaves_the_reservation_state_unchanged():
    """With APTPL active every change is saved before it is answered.  When the save failed (a
    full disk) the initiator was told the command failed, yet the change stayed in memory and
    its unit attentions were established: the preempted node lost its registration while the
    saved copy still had it, and the fencing node's retry got RESERVATION CONFLICT."""
    disk_full = False
    saved: list[dict] = []

    def persist(state: dict) -> None:
        if disk_full:
            raise OSError(28, "No space left on device")
        saved.append(state)

    lu = make_lu("ram", size=1 << 20, pr_persist=persist)
    node1, node2 = await ready(lu, nexus("node1"), nexus("node2"))
    assert await status(node1, *prout(REGISTER_IGNORE, sa_key=0x11, flags=0x01)) == Status.GOOD
    assert await status(node2, *prout(REGISTER_IGNORE, sa_key=0x22, flags=0x01)) == Status.GOOD
    assert await status(node1, *prout(RESERVE, WE_RO, key=0x11)) == Status.GOOD
    before = lu.pr.state()
    assert saved[-1] == before

    disk_full = True
    for cdb, params in (prout(PREEMPT_AND_ABORT, WE_RO, key=0x22, sa_key=0x11),  # fence node1
                        prout(REGISTER, key=0x22, sa_key=0x23, flags=0x01),      # change own key
                        prout(CLEAR, key=0x22)):
        r = await node2.cmd(cdb, params)
        assert r.status == Status.CHECK_CONDITION
        assert lu.pr.state() == before
        assert not r.extra  # nothing to abort either
    assert pending(lu, node1) == [] and pending(lu, node2) == []

    disk_full = False
    r = await node2.cmd(*prout(PREEMPT_AND_ABORT, WE_RO, key=0x22, sa_key=0x11))
    assert r.status == Status.GOOD and r.extra["abort_nexuses"]
    assert pending(lu, node1) == [(0x2A, 0x05)]  # REGISTRATIONS PREEMPTED
    assert saved[-1] == lu.pr.state() and saved[-1]["generation"] == before["generation"] + 1


# -- SPC-2 RESERVE / RELEASE and persistent reservations (SPC-2 §5.5.1, SPC-4 §5.13.3) -------

async def test_persistent_reserve_commands_conflict_even_for_the_reserve6_holder():
    """SPC-2 §5.5.1, which SPC-4 §5.13.3 keeps: while a RESERVE reservation exists every
    PERSISTENT RESERVE IN/OUT conflicts "regardless of initiator or service action" (LIO does
    the same).  The holder used to be able to REGISTER, leaving SPC-2 and SPC-3 state mixed."""
    lu = make_lu("ram", size=1 << 20)
    holder, other = await ready(lu, nexus("node1"), nexus("node2"))
    assert (await holder.cmd(RESERVE6)).status == Status.GOOD
    for ini in (holder, other):
        assert await status(ini, *prout(REGISTER_IGNORE, sa_key=0x11)) == RESERVATION_CONFLICT
        assert await status(ini, prin(READ_KEYS)) == RESERVATION_CONFLICT
        assert await status(ini, prin(REPORT_CAPABILITIES)) == RESERVATION_CONFLICT
    assert lu.pr.registrations() == []
    # Once released, persistent reservations work again.
    assert (await holder.cmd(RELEASE6)).status == Status.GOOD
    assert await status(holder, *prout(REGISTER_IGNORE, sa_key=0x11)) == Status.GOOD
    assert await status(other, prin(READ_KEYS)) == Status.GOOD


async def test_register_and_move_reaches_a_port_that_never_sent_a_reservation_command():
    """SPC-4 §6.16.4: the destination's RELATIVE TARGET PORT IDENTIFIER names any target port
    of the LU.  A node logged in through port 2 that has only sent TEST UNIT READY used to
    be unknown to the reservation module (INVALID FIELD IN PARAMETER LIST, byte 18)."""
    lu = make_lu("ram", size=1 << 20)
    src, dst = nexus("node1", port=1), nexus("node2", port=2)
    a, b = await ready(lu, src, dst)
    assert await status(a, *prout(REGISTER_IGNORE, sa_key=0x11)) == Status.GOOD
    assert await status(a, *prout(RESERVE, WE, key=0x11)) == Status.GOOD
    name = dst.initiator_port.encode()
    name += bytes(-len(name) % 4 or 4)
    tid = bytes((0x45, 0)) + struct.pack(">H", len(name)) + name
    params = struct.pack(">QQxBHI", 0x11, 0x22, 0, 2, len(tid)) + tid
    cdb = bytes((0x5F, 0x07, WE, 0, 0)) + len(params).to_bytes(4, "big") + b"\x00"
    assert await status(a, cdb, params) == Status.GOOD
    write10 = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)
    assert await status(b, write10, b"\1" * 512) == Status.GOOD, "node2 holds the reservation"
    assert await status(a, write10, b"\2" * 512) == RESERVATION_CONFLICT
