"""Review: one logical unit shared by several sessions at once, as a cluster uses it.

Several initiators on one LUN (VMFS-style datastores, multipath): versioned writes checked
by a model (no torn block, no lost write, a READ issued after a WRITE's status sees it),
COMPARE AND WRITE lock words contended by every session (exactly one winner per value),
ORDERED tasks, ABORT TASK / LOGICAL UNIT RESET from another session and sessions killed
mid-I/O in the middle of that load -- and afterwards nothing left behind in the LU (zero-copy
holds, the writers counter, the task set's barriers, the COMPARE AND WRITE lock).

The target runs in-process (the test's event loop, a write-gathering file backstore as the
daemon uses), so its state can be looked at; the initiators are raw sessions in threads,
each with its own socket.  Every loop is bounded in iterations and time.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time

import pytest

from iscsi import pdu as P
from iscsi.backstore.file import FileBackstore
from iscsi.scsi.lu import LogicalUnit
from iscsi.scsi.target import LunMap
from iscsi.target.server import IscsiServer

from ..target.fakes import FakeRegistry, FakeTarget
from .raw import RawSession

IQN = "iqn.2026-11.org.sanstack:concurrency"
BS = 512
LU_BYTES = 16 << 20
#: Bound on any one wait of a client thread for the target (loopback answers in ms).
WAIT = 8.0

GOOD, CHECK_CONDITION = 0x00, 0x02
MISCOMPARE, UNIT_ATTENTION, ABORTED_COMMAND = 0x0E, 0x06, 0x0B

# Block stamp: magic, owner, lba, version -- repeated over the whole block, so a torn
# block (pieces of two versions, or of a version and zeroes) cannot pass for a whole one.
_STAMP = struct.Struct(">IIII")
MAGIC = 0x5A4E5354


def stamp(owner: int, lba: int, version: int) -> bytes:
    return _STAMP.pack(MAGIC, owner, lba, version) * (BS // _STAMP.size)


def parse_block(block: bytes) -> tuple[int, int, int] | None:
    """(owner, lba, version) of a whole stamped block; None for a never-written (zero) block.
    Raises AssertionError for anything else: a torn or foreign block."""
    if not any(block):
        return None
    head = block[:_STAMP.size]
    assert head * (BS // _STAMP.size) == block, f"torn block: {block[:48].hex()}..."
    magic, owner, lba, version = _STAMP.unpack(head)
    assert magic == MAGIC, f"foreign block {head.hex()}"
    return owner, lba, version


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0).ljust(16, b"\0")


def write10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0x08 if fua else 0, lba, 0, blocks, 0).ljust(16, b"\0")


def caw(lba: int, blocks: int = 1) -> bytes:
    """COMPARE AND WRITE (SBC-4 §5.3): Data-Out = compare blocks then write blocks."""
    return struct.pack(">BBQ3xBBB", 0x89, 0, lba, blocks, 0, 0)


def write_same16(lba: int, blocks: int, unmap: bool = False) -> bytes:
    return struct.pack(">BBQIBB", 0x93, 0x08 if unmap else 0, lba, blocks, 0, 0)


def unmap_cdb(param_len: int) -> bytes:
    return struct.pack(">BB4xBHB", 0x42, 0, 0, param_len, 0).ljust(16, b"\0")


def unmap_params(ranges: list[tuple[int, int]]) -> bytes:
    desc = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(desc), len(desc)) + desc


def sense_key(resp) -> int | None:
    data = bytes(getattr(resp, "data", b""))
    if len(data) < 5:
        return None
    sense = data[2:2 + struct.unpack(">H", data[:2])[0]]
    if not sense:
        return None
    if sense[0] & 0x7F in (0x72, 0x73):
        return sense[1] & 0x0F
    return sense[2] & 0x0F


class Client(RawSession):
    """A raw session with task attributes, pipelining and task management."""

    def __init__(self, port: int, name: str, isid: int, iqn: str = IQN) -> None:
        super().__init__("127.0.0.1", port, timeout=WAIT)
        try:
            resp = self.login(iqn, initiator=f"iqn.2026-11.org.sanstack.test:{name}", isid=isid)
            assert resp.status_class == 0, resp
        except BaseException:
            self.close()
            raise
        self.pending_write = b""
        self.writes: dict[int, bytes] = {}  # itt -> Data-Out still to send on R2T
        self.answers: dict[int, tuple[P.Pdu, bytes]] = {}
        self.data: dict[int, bytearray] = {}

    def submit(self, cdb: bytes, *, read_len: int = 0, data: bytes = b"", attr: int = 1) -> int:
        """Send one command (immediate data up to FirstBurstLength); answers come via collect."""
        itt = self.next_itt()
        first = data[:min(len(data), self.max_send, 65536)] if data else b""
        self.writes[itt] = data
        self.data[itt] = bytearray()
        self.send(P.ScsiCommandPdu(read=bool(read_len), write=bool(data), edtl=read_len or len(data),
                                   cmdsn=self.cmdsn, expstatsn=self.expstatsn, cdb=cdb, itt=itt,
                                   final=True, data=first, attr=attr))
        self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
        return itt

    def pump(self, timeout: float = WAIT) -> P.Pdu:
        """Handle one PDU: Data-In collected, R2Ts answered, a final answer stored and returned."""
        pdu = self.recv(timeout)
        if isinstance(pdu, P.DataIn):
            buf = self.data.setdefault(pdu.itt, bytearray())
            buf[pdu.offset:pdu.offset + len(pdu.data)] = pdu.data
            if pdu.has_status:
                self.answers[pdu.itt] = (pdu, bytes(buf))
        elif isinstance(pdu, P.R2T):
            payload = self.writes.get(pdu.itt, b"")[pdu.offset:pdu.offset + pdu.length]
            for i, off in enumerate(range(0, len(payload), self.max_send)):
                chunk = payload[off:off + self.max_send]
                self.send(P.DataOut(itt=pdu.itt, ttt=pdu.ttt, datasn=i, offset=pdu.offset + off,
                                    final=off + len(chunk) >= len(payload), expstatsn=self.expstatsn,
                                    data=chunk))
        elif isinstance(pdu, (P.ScsiResponse, P.TaskMgmtResponse)):
            self.answers[pdu.itt] = (pdu, bytes(self.data.get(pdu.itt, b"")))
        return pdu

    def result(self, itt: int, timeout: float = WAIT) -> tuple[P.Pdu, bytes]:
        deadline = time.monotonic() + timeout
        while itt not in self.answers:
            self.pump(max(0.01, deadline - time.monotonic()))
        self.writes.pop(itt, None)
        self.data.pop(itt, None)
        return self.answers.pop(itt)

    def run(self, cdb: bytes, *, read_len: int = 0, data: bytes = b"", attr: int = 1) -> tuple[P.Pdu, bytes]:
        return self.result(self.submit(cdb, read_len=read_len, data=data, attr=attr))

    def tmf(self, function: int, rtt: int = P.RESERVED_TAG, refcmdsn: int = 0) -> int:
        itt = self.next_itt()
        self.send(P.TaskMgmtRequest(function=function, rtt=rtt, itt=itt, cmdsn=self.cmdsn,
                                    expstatsn=self.expstatsn, refcmdsn=refcmdsn, immediate=True))
        return itt

    def kill(self) -> None:
        """Drop the connection the way a crashed host does (RST, nothing more sent)."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()


@pytest.fixture
async def shared(tmp_path):
    backstore = FileBackstore(tmp_path / "shared.img", size=LU_BYTES, block_size=BS, gather_writes=True)
    lu = LogicalUnit(backstore, serial="conc0001", lun_id=0)
    reg = FakeRegistry({IQN: FakeTarget(IQN, luns=LunMap({0: lu}))})
    srv = IscsiServer(reg, nop_interval=60, nop_timeout=60)
    _, srv.port = await srv.add_portal("127.0.0.1", 0)
    srv.lu = lu
    yield srv
    await srv.shutdown(drain_timeout=1)
    backstore.close()


async def in_threads(*fns, timeout: float = 30.0) -> list:
    """Run blocking client functions in threads while the target runs on this loop."""
    return await asyncio.wait_for(asyncio.gather(*(asyncio.to_thread(f) for f in fns)), timeout)


async def settled(lu: LogicalUnit, timeout: float = 6.0) -> None:
    """Wait until the LU has nothing in flight; fail naming what stayed behind.  (No garbage
    collection first: a command aborted in the loop turn it arrived in is closed at once
    since eager.finish_later, see test_a_command_task_cancelled_before_its_first_step_...)"""
    deadline = time.monotonic() + timeout
    while True:
        left = {
            "holds": len(lu.fence.holds),
            "writers": lu.fence.writers,
            "tasks": len(lu.tasks),
            "ordered barrier": lu.tasks._ordered is not None,
            "caw lock": lu._caw_lock.locked(),
        }
        if not any(left.values()):
            return
        assert time.monotonic() < deadline, f"state left behind in the LU: {left}"
        await asyncio.sleep(0.02)


class Model:
    """Every stamped WRITE and when it was issued and acknowledged, on one logical clock shared
    by the threads: the check is linearizability of each block as a register.

    A READ issued at S and answered at E may return version v of a block only if v's WRITE
    was sent before E, and no WRITE w of that block was acknowledged before S after having
    been sent once v was acknowledged (w then certainly replaced v before the READ).  A
    never-written block reads as version 0, acknowledged at the beginning of time.
    """

    NEVER = 1 << 62

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.clock = 0
        self.version = 0
        self.sent: dict[int, int] = {0: -1}  # version -> clock when sent
        self.done: dict[int, int] = {0: -1}  # version -> clock when acknowledged
        self.history: dict[int, list[int]] = {}  # lba -> versions written to it
        self.events: list[tuple[int, str]] = []  # (clock, what) for failure reports

    def note(self, what: str) -> None:
        with self.lock:
            self.events.append((self._tick(), what))

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def issue(self, owner: int, lba: int, n: int) -> int:
        with self.lock:
            self.version += 1
            v = self.version
            self.sent[v] = self._tick()
            self.done[v] = self.NEVER
            for b in range(lba, lba + n):
                self.history.setdefault(b, []).append(v)
            return v

    def ack(self, lba: int, n: int, v: int) -> None:
        with self.lock:
            self.done[v] = self._tick()

    def floor(self, lba: int, n: int) -> int:
        """The clock when a READ of [lba, lba + n) is sent."""
        with self.lock:
            return self._tick()

    def check(self, lba: int, data: bytes, start: int) -> None:
        """Every block whole, its own, and a version the READ (sent at ``start``) may see."""
        with self.lock:
            end = self._tick()
            for i in range(len(data) // BS):
                got = parse_block(data[i * BS:(i + 1) * BS])
                v = 0 if got is None else got[2]
                if got is not None:
                    assert got[1] == lba + i, f"block {lba + i} holds the data of block {got[1]}"
                    assert v in self.sent and self.sent[v] < end, f"block {lba + i}: version {v} was never sent"
                    assert v in self.history.get(lba + i, ()), f"block {lba + i}: version {v} was not written there"
                acked = self.done[v]
                for w in self.history.get(lba + i, ()):
                    assert not (self.done[w] < start and acked < self.sent[w]), \
                        f"block {lba + i}: read version {v}, replaced by version {w} before the READ was sent"

    def last_acknowledged(self) -> dict[int, int]:
        with self.lock:
            return {b: max((v for v in vs if self.done[v] < self.NEVER), default=0) for b, vs in self.history.items()}


# Layout of the shared LU (blocks): lock words, then one region per session, then a
# scratch range WRITE SAME / UNMAP clear while others read it.
LOCKS = 8  # blocks 8.. hold the contended ATS lock words
REGION = 2048
REGION_BLOCKS = 512  # 256 KiB per session
SCRATCH = 16384
SCRATCH_BLOCKS = 256


def region(i: int) -> int:
    return REGION + i * REGION_BLOCKS


def _scratch_fill(owner: int, version: int) -> bytes:
    return _STAMP.pack(MAGIC, owner, 0xFFFFFFFF, version) * (BS // _STAMP.size)


def _check_scratch(data: bytes) -> None:
    for i in range(0, len(data), BS):
        block = data[i:i + BS]
        if any(block):
            got = parse_block(block)
            assert got is not None and got[1] == 0xFFFFFFFF, f"scratch block torn or foreign: {block[:32].hex()}"


class Worker:
    """One session's share of the mixed load; counts what it did for the final checks."""

    def __init__(self, port: int, i: int, model: Model, stop_at: float, rng_seed: int, iqn: str = IQN) -> None:
        self.port, self.i, self.model, self.stop_at, self.iqn = port, i, model, stop_at, iqn
        self.rng = random.Random(rng_seed)
        self.wins: dict[int, int] = {}
        self.ops: dict[str, int] = {}

    def good(self, resp) -> bool:
        """True for GOOD; anything else fails the test (the chaos worker allows resets)."""
        assert resp.status == GOOD, (resp, sense_key(resp))
        return True

    def _count(self, what: str) -> None:
        self.ops[what] = self.ops.get(what, 0) + 1

    def write_own(self, c: Client) -> None:
        rng = self.rng
        n = rng.choice((1, 8, 64, 256))
        lba = region(self.i) + rng.randrange(REGION_BLOCKS - n + 1)
        v = self.model.issue(self.i, lba, n)
        payload = b"".join(stamp(self.i, lba + k, v) for k in range(n))
        attr = rng.choice((1, 1, 1, 2))  # mostly SIMPLE, sometimes ORDERED
        resp, _ = c.run(write10(lba, n, fua=rng.random() < 0.2), data=payload, attr=attr)
        assert resp.status == GOOD, (resp, sense_key(resp))
        self.model.ack(lba, n, v)
        self._count("write")

    def read_any(self, c: Client) -> None:
        rng = self.rng
        n = rng.choice((1, 8, 128, 256))
        lba = region(rng.randrange(4)) + rng.randrange(REGION_BLOCKS - n + 1)
        floor = self.model.floor(lba, n)
        resp, data = c.run(read10(lba, n), read_len=n * BS)
        assert resp.status == GOOD and len(data) == n * BS, resp
        self.model.check(lba, data, floor)
        self._count("read")

    def write_then_ordered_read(self, c: Client) -> None:
        """WRITE, ORDERED READ, SIMPLE READ pipelined: both READs see the WRITE (SAM-5 §8.7)."""
        n = 8
        lba = region(self.i) + self.rng.randrange(REGION_BLOCKS - n + 1)
        v = self.model.issue(self.i, lba, n)
        payload = b"".join(stamp(self.i, lba + k, v) for k in range(n))
        w = c.submit(write10(lba, n), data=payload)
        r1 = c.submit(read10(lba, n), read_len=n * BS, attr=2)
        r2 = c.submit(read10(lba, n), read_len=n * BS)
        written = self.good(c.result(w)[0])
        if written:
            self.model.ack(lba, n, v)
        for itt in (r1, r2):
            resp, data = c.result(itt)
            if self.good(resp) and written and data != payload:
                got = parse_block(data[:BS])
                m = self.model
                hist = [(w, m.sent[w], m.done[w]) for w in m.history.get(lba, [])][-8:]
                raise AssertionError(f"a READ behind an ORDERED task did not see the WRITE before it: "
                                     f"wrote {v} at {lba}, read {got}; history {hist}; "
                                     f"events {m.events[-12:]} now {m.clock}")
        self._count("ordered")

    def ats(self, c: Client) -> None:
        """One attempt at the lock word: read it, COMPARE AND WRITE it one higher."""
        lock = LOCKS + self.rng.randrange(2)
        resp, cur = c.run(read10(lock, 1), read_len=BS)
        assert resp.status == GOOD
        got = parse_block(cur)
        count = 0 if got is None else got[2]
        resp, _ = c.run(caw(lock), data=cur + stamp(self.i, lock, count + 1))
        if resp.status == GOOD:
            self.wins[lock] = self.wins.get(lock, 0) + 1
            self._count("ats win")
        else:
            assert resp.status == CHECK_CONDITION and sense_key(resp) == MISCOMPARE, (resp, sense_key(resp))
            self._count("ats lost")

    def scratch(self, c: Client) -> None:
        """WRITE SAME / UNMAP of a scratch range others read: each block whole or zero."""
        rng = self.rng
        n = rng.choice((8, 64, 256))
        lba = SCRATCH + rng.randrange(SCRATCH_BLOCKS - n + 1)
        kind = rng.randrange(4)
        if kind == 0:
            resp, _ = c.run(write_same16(lba, n), data=_scratch_fill(self.i, rng.randrange(1 << 30)))
        elif kind == 1:
            resp, _ = c.run(write_same16(lba, n, unmap=True), data=bytes(BS))
        elif kind == 2:
            params = unmap_params([(lba, n)])
            resp, _ = c.run(unmap_cdb(len(params)), data=params)
        else:
            resp, data = c.run(read10(lba, n), read_len=n * BS)
            if self.good(resp):
                _check_scratch(data)
            self._count("scratch read")
            return
        self.good(resp)
        self._count("scratch write")

    def __call__(self) -> None:
        c = Client(self.port, f"host{self.i}", 0x400000c00000 + self.i, self.iqn)
        ops = (self.write_own, self.read_any, self.read_any, self.write_then_ordered_read, self.ats, self.ats,
               self.scratch)
        try:
            for _ in range(20000):
                if time.monotonic() > self.stop_at:
                    break
                self.rng.choice(ops)(c)
            c.logout()
        finally:
            c.close()


async def test_mixed_load_from_four_hosts_keeps_every_block_whole_and_every_ats_atomic(shared):
    """Four hosts on one LUN: versioned writes, reads of each other's regions, ORDERED
    tasks, ATS lock words and WRITE SAME / UNMAP on a range others read, for a few seconds."""
    lu = shared.lu
    model = Model()
    stop_at = time.monotonic() + 4.0
    workers = [Worker(shared.port, i, model, stop_at, 1000 + i) for i in range(4)]
    await in_threads(*workers)
    total: dict[str, int] = {}
    for w in workers:
        for k, v in w.ops.items():
            total[k] = total.get(k, 0) + v
    assert total.get("ats win", 0) > 10 and total.get("ats lost", 0) > 0, total  # it was contended
    assert total.get("read", 0) > 50 and total.get("ordered", 0) > 5, total
    for lock in (LOCKS, LOCKS + 1):
        got = parse_block(lu.backstore.read(lock * BS, BS))
        wins = sum(w.wins.get(lock, 0) for w in workers)
        assert (0 if got is None else got[2]) == wins, "an ATS increment was lost or doubled"
    # the final image holds, for every block, the last acknowledged version (one writer each)
    for lba, v in model.last_acknowledged().items():
        got = parse_block(lu.backstore.read(lba * BS, BS))
        assert (0 if got is None else got[2]) == v and (got is None or got[1] == lba)
    await settled(lu)


class Lost(Exception):
    """A command got no answer in time (aborted by a reset, or its session was dropped)."""


class ChaosClient(Client):
    """A client whose commands may be aborted: no answer within ``patience`` raises Lost,
    a unit attention (the reset) is reported as such; the caller reconnects on Lost."""

    # A task of this session aborted by another host's LOGICAL UNIT RESET ends without a
    # response (TAS=0, SAM-5 §5.6): the host notices by its timeout, like this one.
    patience = 2.5

    def result(self, itt: int, timeout: float | None = None) -> tuple[P.Pdu, bytes]:
        try:
            return super().result(itt, self.patience if timeout is None else timeout)
        except Exception as err:  # a timeout, Closed, a parse error of a cut stream
            raise Lost(repr(err)) from err


class ChaosWorker(Worker):
    """Mixed load on a LUN that is reset and whose sessions are killed meanwhile."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.caw_wins: list[tuple[int, int]] = []  # (lock, value) of every GOOD COMPARE AND WRITE
        self.reconnects = 0
        self.stalls: list = []
        self.c: ChaosClient | None = None

    def connect(self) -> ChaosClient:
        for _ in range(20):
            try:
                c = ChaosClient(self.port, f"host{self.i}", 0x400000c20000 + self.i, self.iqn)
                return c
            except Exception:  # noqa: BLE001 - the old session being reinstated, a reset racing the login
                time.sleep(0.05)
        raise AssertionError("could not log in again")

    def good(self, resp) -> bool:
        """GOOD, or False for the UNIT ATTENTION of a reset (the command did not run)."""
        if resp.status == GOOD:
            return True
        assert resp.status == CHECK_CONDITION and sense_key(resp) == UNIT_ATTENTION, (resp, sense_key(resp))
        return False

    def write_own(self, c) -> None:
        rng = self.rng
        n = rng.choice((1, 8, 64, 256))
        lba = region(self.i) + rng.randrange(REGION_BLOCKS - n + 1)
        v = self.model.issue(self.i, lba, n)
        payload = b"".join(stamp(self.i, lba + k, v) for k in range(n))
        resp, _ = c.run(write10(lba, n, fua=rng.random() < 0.2), data=payload, attr=rng.choice((1, 1, 2)))
        if resp.status == GOOD:
            self.model.ack(lba, n, v)
        else:
            assert sense_key(resp) == UNIT_ATTENTION, (resp, sense_key(resp))
        self._count("write")

    def read_any(self, c) -> None:
        rng = self.rng
        n = rng.choice((1, 8, 128, 256))
        lba = region(rng.randrange(4)) + rng.randrange(REGION_BLOCKS - n + 1)
        floor = self.model.floor(lba, n)
        resp, data = c.run(read10(lba, n), read_len=n * BS)
        if resp.status == GOOD:
            self.model.check(lba, data, floor)
        else:
            assert sense_key(resp) == UNIT_ATTENTION, (resp, sense_key(resp))
        self._count("read")

    def ats(self, c) -> None:
        lock = LOCKS + self.rng.randrange(2)
        resp, cur = c.run(read10(lock, 1), read_len=BS)
        if resp.status != GOOD:
            return
        got = parse_block(cur)
        count = 0 if got is None else got[2]
        resp, _ = c.run(caw(lock), data=cur + stamp(self.i, lock, count + 1))
        if resp.status == GOOD:
            self.caw_wins.append((lock, count + 1))
            self._count("ats win")
        else:
            assert sense_key(resp) in (MISCOMPARE, UNIT_ATTENTION), (resp, sense_key(resp))

    def abort_own(self, c) -> None:
        """A FUA WRITE (it suspends for its flush) and ABORT TASK for it in the same segment."""
        n = 64
        lba = region(self.i) + self.rng.randrange(REGION_BLOCKS - n + 1)
        v = self.model.issue(self.i, lba, n)
        payload = b"".join(stamp(self.i, lba + k, v) for k in range(n))
        from iscsi.framing import encode_bytes

        itt = c.next_itt()
        c.writes[itt] = payload
        cmd = P.ScsiCommandPdu(write=True, edtl=len(payload), cmdsn=c.cmdsn, expstatsn=c.expstatsn,
                               cdb=write10(lba, n, fua=True), itt=itt, final=True, data=payload[:c.max_send])
        c.cmdsn = (c.cmdsn + 1) & 0xFFFFFFFF
        t = c.next_itt()
        tmf = P.TaskMgmtRequest(function=1, rtt=itt, itt=t, cmdsn=c.cmdsn, expstatsn=c.expstatsn,
                                refcmdsn=(c.cmdsn - 1) & 0xFFFFFFFF, immediate=True)
        c.send_raw(encode_bytes(cmd) + encode_bytes(tmf))
        resp, _ = c.result(t)
        assert resp.response in (0, 1), resp  # complete, or the task was already done
        if itt in c.answers:
            status = c.answers.pop(itt)[0]
            if status.status == GOOD:
                self.model.ack(lba, n, v)
        self._count("abort")

    def kill_mid_io(self, c) -> None:
        """Crash this host with a large WRITE waiting for its R2T data and a READ in flight."""
        n = 512  # 256 KiB: beyond the immediate data, so the rest waits for Data-Out
        lba = region(self.i)
        self.model.issue(self.i, lba, n)  # never executed: its Data-Out is never complete
        c.submit(write10(lba, n), data=b"".join(stamp(self.i, lba + k, 0) for k in range(n)))
        c.writes.clear()  # the R2T will never be answered
        c.submit(read10(region((self.i + 1) % 4), 256), read_len=256 * BS)
        time.sleep(0.002)
        c.kill()
        self._count("killed")
        raise Lost("killed on purpose")

    def __call__(self) -> None:
        ops = (self.write_own, self.read_any, self.read_any, self.write_then_ordered_read, self.ats, self.ats,
               self.scratch, self.abort_own, self.kill_mid_io)
        weights = (4, 4, 4, 2, 4, 4, 2, 2, 1)
        c = self.connect()
        try:
            for _ in range(20000):
                if time.monotonic() > self.stop_at:
                    break
                op = self.rng.choices(ops, weights)[0]
                t0 = time.monotonic()
                try:
                    op(c)
                except Lost as err:
                    self.model.note(f"host {self.i} lost in {op.__name__}: {err}")
                    if op != self.kill_mid_io:
                        self.stalls.append((op.__name__, round(time.monotonic() - t0, 2), str(err)))
                    c.kill()
                    self.reconnects += 1
                    c = self.connect()
            with contextlib.suppress(Exception):  # a reset may have dropped it just now
                c.logout()
        finally:
            c.close()


#: What the other host sends in turn: LOGICAL UNIT RESET, CLEAR TASK SET, ABORT TASK SET
#: (its own tasks only), and TARGET WARM RESET (every session is dropped, RFC 7143 §11.5.1).
RESET_FUNCTIONS = (5, 4, 5, 2, 5, 6)


def resetter(port: int, stop_at: float, period: float = 0.5, model: Model | None = None) -> int:
    """Another host sending resets now and then; returns how many it sent."""
    sent = 0
    c = Client(port, "resetter", 0x400000c30000)
    try:
        for k in range(100):
            if time.monotonic() > stop_at:
                break
            time.sleep(period)
            function = RESET_FUNCTIONS[k % len(RESET_FUNCTIONS)]
            if model is not None:
                model.note(f"tmf {function}")
            itt = c.tmf(function)
            resp, _ = c.result(itt)
            assert resp.response == 0, (function, resp)
            sent += 1
            if function == 6:  # the target drops every session, this one too
                c.close()
                c = Client(port, "resetter", 0x400000c30000)
            for _ in range(3):  # its own unit attention
                if c.run(bytes(16))[0].status == GOOD:
                    break
        c.logout()
    finally:
        c.close()
    return sent


async def test_resets_aborts_and_killed_hosts_under_load_leave_nothing_behind(shared):
    """As the mixed load above, while one more host resets the LU twice a second and the
    four hosts abort their own FUA writes and crash mid-I/O now and then: every block stays
    whole and never goes back, no two ATS attempts win the same value, and afterwards the LU
    holds no zero-copy hold, writer, task, barrier or lock, and zero-copy works again."""
    lu = shared.lu
    model = Model()
    # the first host alone reads large ranges first: zero-copy holds exist when the others arrive
    def early() -> Client:
        c = Client(shared.port, "early", 0x400000c40000)
        for _ in range(4):
            assert c.run(read10(region(0), 256), read_len=256 * BS)[0].status == GOOD
        return c

    [first] = await in_threads(early)
    assert lu.fence.holds  # its last READ is held: nothing acknowledged it yet
    stop_at = time.monotonic() + 6.0
    workers = [ChaosWorker(shared.port, i, model, stop_at, 2000 + i) for i in range(4)]
    results = await in_threads(*workers, lambda: resetter(shared.port, stop_at, model=model), lambda: first.kill(),
                               timeout=45)
    assert results[4] >= 5
    total: dict[str, int] = {}
    for w in workers:
        for k, v in w.ops.items():
            total[k] = total.get(k, 0) + v
    assert total.get("killed", 0) >= 2 and total.get("abort", 0) >= 4 and total.get("ats win", 0) >= 5, total
    wins = [win for w in workers for win in w.caw_wins]
    assert len(wins) == len(set(wins)), "two COMPARE AND WRITEs won the same lock value"
    await settled(lu)
    # a host alone on the LU again: its large READ is held (the writers counter is back to
    # zero), and it reads back what the model says
    def alone() -> int:
        c = Client(shared.port, "after", 0x400000c50000)
        try:
            for i in range(4):
                n = 256
                for lba in range(region(i), region(i) + REGION_BLOCKS, n):
                    floor = model.floor(lba, n)
                    resp, data = c.run(read10(lba, n), read_len=n * BS)
                    assert resp.status == GOOD
                    model.check(lba, data, floor)
            return 0
        finally:
            c.close()

    await in_threads(alone)
    # every session is gone, killed or not: the LU keeps none of them as a user (a stale one
    # would keep zero-copy off for the next host alone on it: sole_user)
    deadline = time.monotonic() + 5
    while lu._users:
        assert time.monotonic() < deadline, f"{len(lu._users)} I_T nexuses outlived their sessions"
        await asyncio.sleep(0.05)


async def test_a_command_task_cancelled_before_its_first_step_releases_what_the_command_holds(tmp_path):
    """What TargetConnection._run_now does with a command that suspends (a FUA WRITE waits
    for its flush): step it once, hand the rest to a Task running eager.resume().  A reset
    or CLEAR TASK SET from another connection handled before that Task's first step cancels
    it; the command must then end as if it had been cancelled while waiting: no longer a
    writer, no longer a task an ORDERED task waits for.  (In the daemon the suspended
    command, its Task and the connection's task record form a reference cycle: only the
    cyclic collector ends it.  Here the test keeps the Task, as that cycle does.)"""
    from iscsi import eager
    from iscsi.scsi.types import ITNexus, ScsiCommand, ScsiResult, TaskAttr

    backstore = FileBackstore(tmp_path / "x.img", size=1 << 20, block_size=BS)
    lu = LogicalUnit(backstore, serial="conc0002", lun_id=0)
    nexus = ITNexus("iqn.2026-11.org.sanstack.test:i,i,0x400000000001", f"{IQN},t,0x0001")
    lu.ua.pop(nexus)  # the power-on condition, seen
    data = stamp(0, 8, 1)
    cmd = ScsiCommand(write10(8, 1, fua=True), 0, nexus, data, len(data), TaskAttr.SIMPLE, 1)
    coro = lu.start(cmd)
    assert asyncio.iscoroutine(coro) and lu.fence.writers == 1  # it waits for its flush
    yielded = coro.send(None)
    task = eager.finish_later(coro, yielded, asyncio.get_running_loop())  # as _run_now and eager.start do
    task.cancel()  # before the Task ever ran
    await asyncio.sleep(0.3)  # the flush ends meanwhile
    try:
        assert task.cancelled()
        ordered = lu.start(ScsiCommand(read10(8, 1), 0, nexus, b"", BS, TaskAttr.ORDERED, 2))
        if not isinstance(ordered, ScsiResult):
            ordered = await asyncio.wait_for(ordered, 2)  # TimeoutError: it waits for the dead one
        assert ordered.status == 0
        assert lu.fence.writers == 0, "the cancelled command still counts as a writer"
    finally:
        del task
        coro.close()
        backstore.close()


def pipelined_host(port: int, model: Model, owner: int, lba0: int, nblocks: int, stop_at: float, seed: int,
                   isid: int, depth: int = 16) -> dict[str, int]:
    """One host at queue depth ``depth``: a batch of READs (64 KiB to 1 MiB: zero-copy while it
    is alone on the LU) and WRITEs of one range, sent at once, its answers read only then.
    Every READ's blocks are whole, no older than what was acknowledged before it was sent
    and no newer than what was sent before its answer was read."""
    rng = random.Random(seed)
    c = Client(port, f"pipe{owner}", isid)
    done = {"read": 0, "write": 0}
    try:
        for _ in range(2000):
            if time.monotonic() > stop_at:
                break
            batch = []
            for _ in range(depth):
                if rng.random() < 0.5:
                    n = rng.choice((128, 256, 1024, 2048))
                    lba = lba0 + rng.randrange(nblocks - n + 1)
                    # The clock before the READ leaves: taken after it, a WRITE acknowledged
                    # while this thread waited between the two looked older than the READ.
                    floor = model.floor(lba, n)
                    itt = c.submit(read10(lba, n), read_len=n * BS, attr=rng.choice((1, 1, 1, 2)))
                    batch.append(("r", itt, lba, n, floor))
                else:
                    n = rng.choice((8, 64, 256, 512))
                    lba = lba0 + rng.randrange(nblocks - n + 1)
                    v = model.issue(owner, lba, n)
                    payload = b"".join(stamp(owner, lba + k, v) for k in range(n))
                    itt = c.submit(write10(lba, n, fua=rng.random() < 0.1), data=payload, attr=rng.choice((1, 1, 1, 2)))
                    batch.append(("w", itt, lba, n, v))
            for kind, itt, lba, n, extra in batch:
                resp, data = c.result(itt)
                assert resp.status == GOOD, (resp, sense_key(resp))
                if kind == "w":
                    model.ack(lba, n, extra)
                    done["write"] += 1
                else:
                    assert len(data) == n * BS
                    model.check(lba, data, extra)
                    done["read"] += 1
        c.logout()
    finally:
        c.close()
    return done


async def test_pipelined_zero_copy_reads_and_writes_then_a_second_host_joins(shared):
    """A host alone on the LU at queue depth 16 reads (zero-copy, held) and writes one range;
    half-way a second host joins and does the same on the same range.  No READ ever returns a
    torn block or a version outside what was written around it, and nothing stays held."""
    lu = shared.lu
    model = Model()
    most_holds = 0

    async def watch() -> None:
        nonlocal most_holds
        while True:
            most_holds = max(most_holds, len(lu.fence.holds))
            await asyncio.sleep(0.005)

    watcher = asyncio.get_running_loop().create_task(watch())
    t0 = time.monotonic()
    lba0, nblocks = 4096, 8192  # 4 MiB shared by both hosts
    first = asyncio.create_task(asyncio.to_thread(pipelined_host, shared.port, model, 1, lba0, nblocks,
                                                  t0 + 4.0, 11, 0x400000c60001))
    await asyncio.sleep(1.5)
    holds_alone = most_holds
    second = asyncio.create_task(asyncio.to_thread(pipelined_host, shared.port, model, 2, lba0, nblocks,
                                                   t0 + 4.0, 12, 0x400000c60002))
    try:
        done = await asyncio.wait_for(asyncio.gather(first, second), 30)
    finally:
        watcher.cancel()
    assert holds_alone >= 2, "the host alone on the LU never had zero-copy READs in flight"
    assert all(d["read"] > 20 and d["write"] > 20 for d in done), done
    await settled(lu)


def _atomic16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQHHBB", 0x9C, 0, lba, 0, blocks, 0, 0)


def _read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


async def _lu_alone(tmp_path, size: int = 32 << 20):
    from iscsi.scsi.types import ITNexus

    backstore = FileBackstore(tmp_path / "atomic.img", size=size, block_size=BS, gather_writes=True)
    lu = LogicalUnit(backstore, serial="conc0003", lun_id=0)
    a = ITNexus("iqn.2026-11.org.sanstack.test:a,i,0x400000000001", f"{IQN},t,0x0001")
    b = ITNexus("iqn.2026-11.org.sanstack.test:b,i,0x400000000002", f"{IQN},t,0x0001")
    for n in (a, b):
        lu.ua.pop(n)
    return lu, a, b


def _caw16(lba: int, blocks: int) -> bytes:
    return caw(lba, blocks)


@pytest.mark.parametrize("kind,attr", [("atomic", 1), ("atomic", 2), ("caw", 1)])  # SIMPLE / ORDERED READ
async def test_a_large_read_never_sees_half_of_an_atomic_write(tmp_path, kind, attr):
    """SBC-4 §4.29.3 (atomic writes) and §5.3 (COMPARE AND WRITE): a read overlapping an
    atomic write returns its blocks either all as before it or all as after it.  A READ over
    4 MiB is read in steps with a loop turn between them (sbc._read_in_steps); a WRITE
    ATOMIC(16) of the same range from another host, or a COMPARE AND WRITE across a step's
    end, executed in such a turn left the READ with part old and part new blocks."""
    from iscsi.scsi.types import ScsiCommand, ScsiResult, TaskAttr

    lu, a, b = await _lu_alone(tmp_path)
    n = (12 << 20) // BS  # 12 MiB: three steps
    lu.backstore.write(0, b"\x11" * (n * BS))
    if kind == "atomic":
        first, count = 0, n
        cdb, data = _atomic16(0, n), b"\x22" * (n * BS)
    else:  # 200 blocks across the end of the first 4 MiB step
        first, count = (4 << 20) // BS - 100, 200
        cdb, data = _caw16(first, count), b"\x11" * (count * BS) + b"\x22" * (count * BS)
    read = lu.start(ScsiCommand(_read16(0, n), 0, a, b"", n * BS, TaskAttr(attr), 1))
    assert asyncio.iscoroutine(read)
    reading = asyncio.ensure_future(read)
    await asyncio.sleep(0)  # the READ has read its first step
    w = lu.start(ScsiCommand(cdb, 0, b, data, len(data), TaskAttr.SIMPLE, 2))
    if not isinstance(w, ScsiResult):
        w = await w
    assert w.status == 0
    result = await asyncio.wait_for(reading, 5)
    assert result.status == 0
    got = bytes(result.data)[first * BS:(first + count) * BS]
    seen = got.count(0x22) // BS
    assert seen in (0, count), f"the READ saw {seen} of the {count} blocks of the atomic write"
    lu.close()


async def test_a_large_read_overtaken_by_atomic_writes_at_every_step_still_ends_whole(tmp_path):
    """Atomic writes landing in every loop turn of the READ (and of its re-reads): it still
    completes, with every atomic write's blocks whole."""
    from iscsi.scsi.types import ScsiCommand, ScsiResult, TaskAttr

    lu, a, b = await _lu_alone(tmp_path)
    n = (12 << 20) // BS
    count = 2048  # 1 MiB atomic writes, each across the end of a 4 MiB step
    first = (4 << 20) // BS - count // 2
    reading = asyncio.ensure_future(lu.start(ScsiCommand(_read16(0, n), 0, a, b"", n * BS, TaskAttr.SIMPLE, 1)))
    for k in range(1, 40):
        await asyncio.sleep(0)
        if reading.done():
            break
        w = lu.start(ScsiCommand(_atomic16(first, count), 0, b, bytes([k]) * (count * BS), count * BS,
                                 TaskAttr.SIMPLE, 1 + k))
        if not isinstance(w, ScsiResult):
            w = await w
        assert w.status == 0
    result = await asyncio.wait_for(reading, 5)
    got = bytes(result.data)[first * BS:(first + count) * BS]
    assert got == got[:1] * len(got), "the READ saw pieces of two atomic writes"
    lu.close()


def test_mixed_load_against_the_daemon(tmp_path):
    """The same four hosts against the real daemon process (its event loop and image
    settings); the ATS counters and every block's last version read back at the end."""
    from .conftest import running_daemon

    model = Model()
    with running_daemon(tmp_path, size=LU_BYTES) as peer:
        port = peer.portals[0].port
        stop_at = time.monotonic() + 3.0
        workers = [Worker(port, i, model, stop_at, 3000 + i, peer.iqn) for i in range(4)]
        errors: list[BaseException] = []

        def guarded(w: Worker) -> None:
            try:
                w()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=guarded, args=(w,), daemon=True) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a host never finished"
        if errors:
            raise errors[0]
        assert peer.alive(), peer.log_text()[-3000:]
        wins = {lock: sum(w.wins.get(lock, 0) for w in workers) for lock in (LOCKS, LOCKS + 1)}
        assert sum(wins.values()) > 10
        c = Client(port, "checker", 0x400000c70000, peer.iqn)
        try:
            for lock, n in wins.items():
                _, block = c.run(read10(lock, 1), read_len=BS)
                got = parse_block(block)
                assert (0 if got is None else got[2]) == n, "an ATS increment was lost or doubled"
            for lba, v in model.last_acknowledged().items():  # one writer per block
                _, block = c.run(read10(lba, 1), read_len=BS)
                got = parse_block(block)
                assert (0 if got is None else got[2]) == v
        finally:
            c.close()


@pytest.mark.parametrize("reader", ["read", "drain_all"])
def test_a_gathered_write_being_written_by_a_flush_is_seen_by_reads_and_acknowledgements(tmp_path, monkeypatch, reader):
    """A FUA write or SYNCHRONIZE CACHE of one host flushes in a worker thread, and that
    drain writes out the pending gathered run of every host's small writes.  While its
    pwritev runs, the event loop must not read past that run (a READ of another host, a
    COMPARE AND WRITE comparing) nor acknowledge the writes in it (drain_all before the
    responses): it found the run already taken out of the buffer list and read the old
    blocks -- a READ issued after a WRITE's GOOD status missed that write."""
    import os as _os

    from iscsi.backstore import gather

    backstore = FileBackstore(tmp_path / "g.img", size=1 << 20, block_size=BS, gather_writes=True)
    new = stamp(1, 0, 1) * 8
    backstore.write(0, new)  # gathered: pending, not yet in the file
    assert backstore._gather is not None and backstore._gather.buffers
    real = _os.pwritev
    in_write = threading.Event()

    def slow_pwritev(fd, buffers, offset):
        in_write.set()
        time.sleep(0.3)  # a pwritev that takes a while (a page fault, a busy disk)
        return real(fd, buffers, offset)

    monkeypatch.setattr(gather.os, "pwritev", slow_pwritev)
    flusher = threading.Thread(target=backstore.flush)  # as LogicalUnit._flush runs it
    flusher.start()
    try:
        assert in_write.wait(2)
        if reader == "read":
            assert backstore.read(0, len(new)) == new, "a READ missed a write the flush was writing"
        else:
            gather.drain_all()  # what the transport calls before sending GOOD for the write
            assert _os.pread(backstore.fileno, len(new), 0) == new, "GOOD was sent before the data was in the file"
    finally:
        flusher.join(5)
        backstore.close()


async def test_an_extended_copy_write_is_not_starved_by_a_host_reading_its_range(tmp_path):
    """EXTENDED COPY writes its destination through LogicalUnit.write_blocks, which waits for
    the zero-copy holds on the range.  A host alone on the LU that keeps reading that range
    (a new READ as soon as it acknowledges one, as a queue does) renewed the holds forever:
    the copy waited ACK_TIMEOUT (5 s) and then dropped that host's connection.  A waiting
    copy write counts as a writer, like WRITE commands: new READs are copied meanwhile."""
    from iscsi.scsi.zerocopy import FileExtent

    lu, a, _b = await _lu_alone(tmp_path, size=4 << 20)
    loop = asyncio.get_running_loop()
    n = 256  # 128 KiB READs: zero-copy
    cdb = read10(0, n)

    class QueuedReader:
        """The host's connection: acknowledges at once and has the next READ in flight."""

        def __init__(self) -> None:
            self.drops = 0
            self.held: list[FileExtent] = []
            self.read()

        def read(self) -> None:
            h = lu.read_now(cdb, a, True)
            if h.__class__ is FileExtent:
                h.owner = self
                self.held.append(h)

        def solicit_ack(self) -> None:
            loop.call_soon(self.acknowledge)

        def acknowledge(self) -> None:
            for h in self.held:
                h.release()
            self.held.clear()
            self.read()

        def ack_timed_out(self) -> None:
            self.drops += 1

        def held_range_removed(self) -> None:
            self.drops += 1

    reader = QueuedReader()
    assert lu.fence.holds, "the READ was not held (zero-copy)"
    t0 = loop.time()
    await asyncio.wait_for(lu.write_blocks(8, stamp(0, 8, 1) * 8), 3)
    assert loop.time() - t0 < 1.0 and reader.drops == 0
    assert lu.backstore.read(8 * BS, 8 * BS) == stamp(0, 8, 1) * 8
    for h in reader.held:
        h.release()
    lu.close()
