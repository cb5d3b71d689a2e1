"""The benchmark engine (iscsi.initiator.bench) against an in-process disk: counts, offsets,
mixes, limits, errors, timing.  The session is real; its transport hands every command to a
responder that answers through the connection's read path, as a target would."""
from __future__ import annotations

import asyncio
import struct

import pytest

from iscsi import framing
from iscsi import pdu as P
from iscsi.initiator import bench
from iscsi.initiator.errors import ScsiError
from tests.unit.test_initiator_fastpath import STATSN0, feed, logged_in

BLOCK = 512


class Disk:
    """Answers READ(16)/WRITE(16) like a target with Immediate Data; records what it saw."""

    def __init__(self, conn, *, sense_after: int | None = None) -> None:
        self.conn = conn
        self.reader = framing.PduReader(allowed=P.INITIATOR_OPCODES, max_data_segment=1 << 24)
        self.statsn = STATSN0
        self.ops: list[tuple[int, int, int]] = []      # (opcode, lba, blocks)
        self.written = bytearray()
        self.sense_after = sense_after
        self.pending: list[bytes] = []
        self.scheduled = False

    def take(self, data: bytes) -> None:
        for pdu in self.reader.feed(data):
            assert isinstance(pdu, P.ScsiCommandPdu), pdu
            op = pdu.cdb[0]
            lba, n = struct.unpack_from(">QI", pdu.cdb, 2)
            self.ops.append((op, lba, n))
            win = dict(statsn=self.statsn, expcmdsn=pdu.cmdsn + 1, maxcmdsn=pdu.cmdsn + 64)
            self.statsn += 1
            if self.sense_after is not None and len(self.ops) > self.sense_after:
                sense = bytes([0x70, 0, 3, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x11, 0, 0, 0, 0, 0])  # read error
                out = P.ScsiResponse(itt=pdu.itt, status=2, data=P.ScsiResponse.sense_segment(sense), **win)
            elif op == 0x88:
                out = P.DataIn(itt=pdu.itt, data=bytes(n * BLOCK), final=True, has_status=True, **win)
            else:
                assert len(pdu.data) == pdu.edtl == n * BLOCK, "the whole write as immediate data"
                self.written += pdu.data
                out = P.ScsiResponse(itt=pdu.itt, status=0, **win)
            self.pending.append(framing.encode_bytes(out))
        if self.pending and not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.answer)

    def answer(self) -> None:
        self.scheduled = False
        data, self.pending = b"".join(self.pending), []
        if not self.conn.closed:
            feed(self.conn, data, [65536])


def wired(**disk):
    s, conn, wire = logged_in()
    d = Disk(conn, **disk)
    wire.writelines = lambda parts: d.take(b"".join(bytes(p) for p in parts))
    return s, d


async def run(s, **kw):
    kw.setdefault("duration", 30.0)
    return await bench.run(s, 0, block_size=BLOCK, blocks=1 << 16, **kw)


@pytest.mark.parametrize("qd,limit", [(32, 1000), (32, 10), (1, 50), (7, 100)])
async def test_exactly_max_ios_with_latency_samples(qd, limit):
    s, d = wired()
    r = await run(s, bs=4096, qd=qd, max_ios=limit, seed=1)
    assert (r.ios, r.reads, r.writes, r.errors) == (limit, limit, 0, 0)
    assert len(d.ops) == limit and r.bytes == limit * 4096
    # One slot in LATENCY_SLOT_EVERY samples latency (at least one slot).
    slots = min(qd, limit)
    timed = len(range(0, slots, bench.LATENCY_SLOT_EVERY))
    assert 0 < len(r.latencies_us) <= limit and len(r.latencies_us) >= limit * timed // slots - timed
    assert r.latencies_us == sorted(r.latencies_us) and r.summary()["lat_us"]["p50"] > 0


async def test_sequential_walks_the_region_and_wraps():
    s, d = wired()
    r = await run(s, bs=8192, qd=4, max_ios=40, pattern="sequential", region_blocks=16 * 10)
    assert r.ios == 40
    assert [lba for _, lba, _ in d.ops] == [(i % 10) * 16 for i in range(40)]
    assert {n for _, _, n in d.ops} == {16}


async def test_random_offsets_are_aligned_and_inside_the_region():
    s, d = wired()
    await run(s, bs=4096, qd=16, max_ios=2000, region_blocks=8 * 1000, seed=7)
    lbas = [lba for _, lba, _ in d.ops]
    assert all(lba % 8 == 0 and 0 <= lba < 8000 for lba in lbas)
    assert len(set(lbas)) > 750           # 2000 draws of 1000 slots: ~865 distinct expected


async def test_mixed_reads_and_writes():
    s, d = wired()
    r = await run(s, bs=4096, qd=8, max_ios=2000, read_pct=70, seed=3)
    reads = sum(op == 0x88 for op, _, _ in d.ops)
    writes = sum(op == 0x8A for op, _, _ in d.ops)
    assert (r.reads, r.writes) == (reads, writes) and reads + writes == 2000
    assert 0.6 < reads / 2000 < 0.8
    assert len(d.written) == writes * 4096


async def test_write_only():
    s, d = wired()
    r = await run(s, bs=4096, qd=4, max_ios=100, read_pct=0, pattern="sequential")
    assert (r.reads, r.writes) == (0, 100) and {op for op, _, _ in d.ops} == {0x8A}


async def test_first_error_stops_the_run():
    s, d = wired(sense_after=100)
    r = await run(s, bs=4096, qd=8, max_ios=10_000)
    assert r.ios == 100 and r.errors == 8          # the slots in flight when the errors began
    assert len(d.ops) == 108
    assert r.first_error and "MEDIUM" in r.first_error.upper()   # what stopped it, for the CLI
    assert r.summary()["first_error"] == r.first_error


async def test_nothing_succeeded_raises_the_scsi_error():
    s, d = wired(sense_after=0)
    with pytest.raises(ScsiError) as err:
        await run(s, bs=4096, qd=4, max_ios=100)
    assert err.value.sense.key == 3


async def test_stops_when_the_time_is_up():
    s, d = wired()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = await run(s, bs=4096, qd=4, duration=0.2)
    assert 0.2 <= loop.time() - t0 < 2.0 and r.ios > 100 and 0.2 <= r.seconds < 2.0


async def test_gc_is_back_on_after_the_run():
    import gc
    s, d = wired()
    assert gc.isenabled()
    await run(s, bs=4096, qd=4, max_ios=10)
    assert gc.isenabled()
