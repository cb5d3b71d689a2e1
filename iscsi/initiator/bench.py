"""I/O benchmark engine behind ``iscsi-initiator bench`` (fio-like, callback driven).

A coroutine per I/O costs more than the I/O itself at 4 KiB, so the queue is kept full
with :meth:`Session.submit` callbacks: each slot owns one :class:`Task` that is reset and
sent again as soon as its status arrives — the shape of libiscsi's iscsi-perf, so the two
can be compared fairly.  Like iscsi-perf, the driver keeps its own work per I/O small:

* CDBs are built before the run (a table of random slots, or every slot in turn);
* reads land in one shared buffer (iscsi-perf does the same; ``shared_buffer=False`` gives
  each slot its own), with RX_ROOM spare bytes so a read can also take the next header;
* one slot in LATENCY_SLOT_EVERY reads the clock and samples latency; the end of the run
  is a loop timer, not a clock read per I/O;
* the garbage collector is off during the run (the hot path makes no reference cycles;
  objects made before it are frozen out of the collector's generations).
"""
from __future__ import annotations

import asyncio
import gc
import itertools
import os
import random
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from . import scsi
from .connection import RX_ROOM
from .errors import scsi_error
from .session import ATTR_SIMPLE, Session, Task

#: Latency samples kept (reservoir) so a long run does not grow memory without bound.
MAX_LATENCY_SAMPLES = 2_000_000
#: Pre-drawn random slots; 64 K offsets repeat only after 64 K I/Os.
RANDOM_TABLE = 1 << 16
#: Sequential CDBs are built up front up to this many slots (about 50 bytes each: 3 MiB).
CDB_TABLE = 1 << 16
#: One queue slot in this many samples latency (a clock read per I/O costs more than the
#: percentiles gain from all samples; at QD 1..8 that is every I/O).
LATENCY_SLOT_EVERY = 8
#: Task.status of a slot not yet started (a real status is 0..0xFF, -1 while in flight).
NOT_STARTED = -2


@dataclass
class BenchResult:
    ios: int
    reads: int
    writes: int
    bytes: int
    seconds: float
    errors: int
    latencies_us: list[float] = field(repr=False, default_factory=list)
    #: CPU time of this process while the I/O ran (user, system), seconds.
    cpu_user: float = 0.0
    cpu_sys: float = 0.0
    #: The error that stopped the run (the run stops at the first failed I/O), if any.
    first_error: str | None = None

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
            "cpu_us_per_io": {"user": round(self.cpu_user / self.ios * 1e6, 2) if self.ios else 0.0,
                              "sys": round(self.cpu_sys / self.ios * 1e6, 2) if self.ios else 0.0},
        } | ({"first_error": self.first_error} if self.first_error else {})


def _slot_order(slots: int, sequential: bool, rnd: random.Random) -> Iterator[int]:
    """Endless slot numbers: every slot in turn, or a pre-drawn random table over and over."""
    if sequential:
        return itertools.cycle(range(slots))
    return itertools.cycle([rnd.randrange(slots) for _ in range(RANDOM_TABLE)])


def _cdb_stream(build: Callable[[int, int], bytes], slots: int, nblk: int, sequential: bool,
                rnd: random.Random) -> Iterator[bytes]:
    """Endless CDBs for one direction, built up front when they fit :data:`CDB_TABLE`."""
    if sequential and slots > CDB_TABLE:
        return (build(p * nblk, nblk) for p in itertools.cycle(range(slots)))
    order = range(slots) if sequential else [rnd.randrange(slots) for _ in range(RANDOM_TABLE)]
    return itertools.cycle([build(p * nblk, nblk) for p in order])


async def run(session: Session, lun: int, *, block_size: int, blocks: int, bs: int = 4096, qd: int = 32,
              duration: float = 10.0, pattern: str = "random", read_pct: int = 100,
              region_blocks: int | None = None, max_ios: int | None = None, seed: int | None = None,
              shared_buffer: bool = True) -> BenchResult:
    """Keep ``qd`` commands of ``bs`` bytes in flight for ``duration`` seconds.

    ``shared_buffer``: every slot reads into one buffer, as iscsi-perf does (the data is not
    looked at); False gives each slot its own.
    """
    if bs % block_size:
        raise ValueError(f"bs {bs} is not a multiple of the block size {block_size}")
    nblk = bs // block_size
    span = min(blocks, region_blocks or blocks)
    if span < nblk:
        raise ValueError("LUN smaller than one I/O")
    slots = span // nblk
    rnd = random.Random(seed)
    loop = asyncio.get_running_loop()
    done_fut = loop.create_future()
    wbuf = memoryview(os.urandom(bs))
    rpct = read_pct / 100.0
    reading = rpct > 0.0
    mixed = 0.0 < rpct < 1.0
    sequential = pattern.startswith("seq")
    clock = time.perf_counter_ns
    lat: list[int] = []
    lat_append = lat.append
    limit = max_ios if max_ios is not None else 1 << 62
    first_error: list[BaseException] = []
    submit = session.submit
    read16, write16 = scsi.read16, scsi.write16
    rand = rnd.random
    # The CDBs are made up front (like fio's random map) so the hot path only takes the next.
    next_cdb = _cdb_stream(read16 if reading else write16, slots, nblk, sequential, rnd).__next__
    next_slot = _slot_order(slots, sequential, rnd).__next__ if mixed else None
    ios = writes = errors = 0
    inflight = qd
    stop = False                   # set by the end-of-run timer or the first error

    def completed(task: Task) -> None:
        """Count the finished I/O and send the slot's next one at once (no coroutine, no Future)."""
        nonlocal ios, writes, errors, inflight, stop
        if task.status == 0 and task.exc is None:
            ios += 1
            if mixed and task.out is not None:
                writes += 1
        elif task.status != NOT_STARTED:
            errors += 1
            if not first_error:
                first_error.append(task.exc or scsi_error(task.status, task.sense_data, task.cdb))
                stop = True        # stop issuing; the slots drain
        if stop or ios + inflight > limit:
            inflight -= 1
            if inflight == 0 and not done_fut.done():
                done_fut.set_result(clock())
            return
        if mixed:
            lba = next_slot() * nblk
            if rand() < rpct:
                task.cdb = read16(lba, nblk)
                task.read_len = bs
                task.out = None
            else:
                task.cdb = write16(lba, nblk)
                task.read_len = 0
                task.out = wbuf
        else:
            task.cdb = next_cdb()
        task.done = False
        task.status = -1
        task.next_datasn = 0
        task.received = 0
        if task.underflow or task.overflow:
            task.underflow = task.overflow = False
            task.residual = 0
        if task.solicited:
            # A write larger than the unsolicited burst was asked for by R2Ts: their count
            # starts again from 0 for the next command (RFC 7143 §11.8.2).
            task.next_r2tsn = task.solicited = 0
        submit(task)

    def completed_timed(task: Task) -> None:
        """:func:`completed` for the slots that sample latency (completion to completion)."""
        now = clock()
        if task.status == 0 and task.exc is None and len(lat) < MAX_LATENCY_SAMPLES:
            lat_append(now - task.sent)
        task.sent = now
        completed(task)

    def time_up() -> None:
        nonlocal stop
        stop = True

    # RX_ROOM spare bytes: the read that completes a payload may take the next header too.
    shared = bytearray(bs + RX_ROOM) if shared_buffer and reading else None
    tasks = []
    for i in range(qd):
        cb = completed_timed if i % LATENCY_SLOT_EVERY == 0 else completed
        if reading:
            buf = shared if shared is not None else bytearray(bs + RX_ROOM)
            t = Task(lun, b"", bs, None, buf, ATTR_SIMPLE, cb)
        else:
            t = Task(lun, b"", 0, wbuf, None, ATTR_SIMPLE, cb)
        t.status = NOT_STARTED
        tasks.append(t)
    # Each slot starts through its completion path (status NOT_STARTED counts nothing), so the
    # first and every later command of a slot are issued by one code path.
    gc_was = gc.isenabled()
    gc.freeze()       # the long-lived setup objects leave the collector's generations
    gc.disable()      # per-I/O objects are freed by reference counting; the hot path makes no cycles
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = clock()
    timer = loop.call_later(duration, time_up)
    try:
        for t in tasks:
            t.sent = t0
            t.cb(t)
        end = await done_fut
    finally:
        timer.cancel()
        gc.unfreeze()
        if gc_was:
            gc.enable()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    seconds = (end - t0) / 1e9
    if first_error and ios == 0:
        raise first_error[0]
    lat.sort()
    return BenchResult(ios, ios - writes if reading else 0, writes if mixed else (0 if reading else ios),
                       ios * bs, seconds, errors, [x / 1000.0 for x in lat],
                       ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime,
                       str(first_error[0]) if first_error else None)
