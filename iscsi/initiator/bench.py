"""I/O benchmark engine behind ``iscsi-initiator bench`` (fio-like, callback driven).

A coroutine per I/O costs more than the I/O itself at 4 KiB, so the queue is kept full
with :meth:`Session.submit` callbacks: each slot owns one :class:`Task` that is reset and
sent again as soon as its status arrives — the shape of libiscsi's iscsi-perf, so the two
can be compared fairly.
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field

from . import scsi
from .errors import ScsiError, scsi_error
from .session import Session, Task

#: Latency samples kept (reservoir) so a long run does not grow memory without bound.
MAX_LATENCY_SAMPLES = 2_000_000
#: Pre-drawn random slots (a power of two); 64 K offsets repeat only after 64 K I/Os.
RANDOM_TABLE = 1 << 16


@dataclass
class BenchResult:
    ios: int
    reads: int
    writes: int
    bytes: int
    seconds: float
    errors: int
    latencies_us: list[float] = field(repr=False, default_factory=list)

    @property
    def iops(self) -> float:
        return self.ios / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        lat = self.latencies_us
        if not lat:
            return 0.0
        k = min(len(lat) - 1, max(0, int(round(p / 100.0 * (len(lat) - 1)))))
        return lat[k]

    def summary(self) -> dict:
        return {
            "ios": self.ios, "reads": self.reads, "writes": self.writes, "errors": self.errors,
            "seconds": round(self.seconds, 3), "iops": round(self.iops, 1),
            "MB/s": round(self.mb_per_s, 2),
            "lat_us": {f"p{p:g}": round(self.percentile(p), 1) for p in (50, 90, 99, 99.9)}
            | {"mean": round(sum(self.latencies_us) / len(self.latencies_us), 1) if self.latencies_us else 0.0},
        }


async def run(session: Session, lun: int, *, block_size: int, blocks: int, bs: int = 4096, qd: int = 32,
              duration: float = 10.0, pattern: str = "random", read_pct: int = 100,
              region_blocks: int | None = None, max_ios: int | None = None, seed: int | None = None) -> BenchResult:
    """Keep ``qd`` commands of ``bs`` bytes in flight for ``duration`` seconds."""
    if bs % block_size:
        raise ValueError(f"bs {bs} is not a multiple of the block size {block_size}")
    nblk = bs // block_size
    span = min(blocks, region_blocks or blocks)
    if span < nblk:
        raise ValueError("LUN smaller than one I/O")
    slots_max = span // nblk
    rnd = random.Random(seed)
    randrange = rnd.randrange
    rand = rnd.random
    loop = asyncio.get_running_loop()
    done_fut = loop.create_future()
    wbuf = memoryview(os.urandom(bs))
    rpct = read_pct / 100.0
    sequential = pattern.startswith("seq")
    clock = time.perf_counter_ns
    state = {"pos": 0}
    lat: list[int] = []
    lat_append = lat.append
    end_ns = clock() + int(duration * 1e9)
    limit = max_ios if max_ios is not None else 1 << 62
    first_error: list[BaseException] = []
    read16, write16 = scsi.read16, scsi.write16

    # Random offsets are drawn up front (like fio's random map) so the hot loop only indexes.
    table = [] if sequential else [randrange(slots_max) * nblk for _ in range(RANDOM_TABLE)]
    tmask = RANDOM_TABLE - 1

    def next_lba() -> int:
        p = state["pos"]
        if sequential:
            state["pos"] = p + 1 if p + 1 < slots_max else 0
            return p * nblk
        state["pos"] = (p + 1) & tmask
        return table[p]

    counts = [0, 0, 0, 0]   # ios, reads, writes, errors (a list: cheaper than a dict per I/O)
    inflight = [0]

    def issue(task: Task, now: int) -> None:
        lba = next_lba()
        if rpct >= 1.0 or (rpct > 0.0 and rand() < rpct):
            task.cdb = read16(lba, nblk)
            task.read_len = bs
            task.out = None
        else:
            task.cdb = write16(lba, nblk)
            task.read_len = 0
            task.out = wbuf
        task.done = False
        task.status = -1
        task.next_datasn = 0
        if task.underflow or task.overflow or task.sense_data or task.exc:
            task.underflow = task.overflow = False
            task.residual = 0
            task.sense_data = b""
            task.exc = None
        task.sent = now
        inflight[0] += 1
        submit(task)

    def completed(task: Task) -> None:
        now = clock()
        inflight[0] -= 1
        if task.exc is not None or task.status != 0:
            counts[3] += 1
            if not first_error:
                first_error.append(task.exc or scsi_error(task.status, task.sense_data, task.cdb))
        else:
            counts[0] += 1
            counts[1 if task.out is None else 2] += 1
            if len(lat) < MAX_LATENCY_SAMPLES:
                lat_append(now - task.sent)
        if now < end_ns and counts[0] + inflight[0] < limit and not first_error:
            issue(task, now)
        elif inflight[0] == 0 and not done_fut.done():
            done_fut.set_result(now)

    submit = session.submit
    t0 = clock()
    for _ in range(qd):
        t = Task(lun, b"", bs, None, bytearray(bs), 1, completed)
        issue(t, clock())
    end = await done_fut
    seconds = (end - t0) / 1e9
    if first_error and counts[0] == 0:
        raise first_error[0]
    lat.sort()
    return BenchResult(counts[0], counts[1], counts[2], counts[0] * bs, seconds, counts[3],
                       [x / 1000.0 for x in lat])
