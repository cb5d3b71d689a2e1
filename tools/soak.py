"""Load and soak test of an iSCSI target, with figures (issue 7).

    python -m tools.soak                          # spawn our daemon, 64 x 32 for 60 s, 1000 logins
    python -m tools.soak --seconds 600 --sessions 64 --depth 32 --cycles 1000
    python -m tools.soak --portal 127.0.0.1:3260 --target IQN --pid PID   # an existing target

Three phases, each printed with its figures:
1. **I/O soak**: ``sessions`` sessions, each keeping ``depth`` commands in flight for
   ``seconds``: random-size (4-64 KiB) WRITE(10)s with immediate data and READ(10)s, every read
   compared with what this tool last wrote there (each command slot owns its blocks, so the
   expected data is never ambiguous).  Errors = any non-GOOD status, wrong data, Reject, lost
   connection or a command without an answer in COMMAND_TIMEOUT.  The target's RSS is sampled
   every second: "flat" means the end of the run is within FLAT_SLACK of the level after warm-up.
2. **NOP-Out latency under load**: during phase 1, every session pings the target once a second
   (NOP-Out, immediate, ITT set: §11.18) and a dedicated session does too; open-iscsi drops a
   connection whose ping is not answered in 5 s, so every answer must take < 1 s.
3. **Login/logout cycles**: ``cycles`` full login + TEST UNIT READY + logout on fresh connections;
   the target's RSS and open file descriptors must come back to where they were.

Traffic goes only to the given portal (loopback by default); every loop is bounded in time.
Exit status 0 when all three hold, 1 otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from iscsi import keys as K
from iscsi import pdu as P
from iscsi.framing import PduReader, encode_bytes
from tools.peers.base import process_cpu_seconds

BLOCK = 512
#: A command without an answer after this long counts as an error (initiators use 30 s).
COMMAND_TIMEOUT = 30.0
#: open-iscsi's noop_out_timeout is 5 s; we want a wide margin: every NOP-In within 1 s.
NOP_LIMIT = 1.0
OPEN_ISCSI_NOP_TIMEOUT = 5.0
#: I/O sizes: 4 KiB to 64 KiB in 4 KiB steps, all sent as immediate data (FirstBurstLength 64 KiB).
IO_SIZES = tuple(range(4096, 65536 + 1, 4096))
#: Blocks each command slot owns (a slot never overlaps another, so reads are verifiable).
SLOT_BYTES = 256 << 10
#: RSS "flat": end of run at most this much above the post-warm-up level (allocator noise,
#: socket buffers); a leak of one buffer per command would exceed it in seconds.
FLAT_SLACK = 32 << 20
INITIATOR = "iqn.2026-11.org.sanstack.soak"
OPERATIONAL = [
    ("HeaderDigest", "None"), ("DataDigest", "None"), ("ErrorRecoveryLevel", "0"), ("InitialR2T", "No"),
    ("ImmediateData", "Yes"), ("MaxBurstLength", "262144"), ("FirstBurstLength", "65536"),
    ("MaxOutstandingR2T", "1"), ("MaxConnections", "1"), ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"), ("MaxRecvDataSegmentLength", "262144"), ("DefaultTime2Wait", "0"),
    ("DefaultTime2Retain", "0"),
]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class SoakError(Exception):
    pass


class Conn:
    """One pipelined session: commands by ITT, answers matched as they come."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer
        self.parser = PduReader(allowed=P.TARGET_OPCODES, max_data_segment=1 << 24)
        self.itt = 0
        self.cmdsn = 1
        self.expstatsn = 0
        self.maxcmdsn = 1
        self.pending: dict[int, asyncio.Future] = {}
        self.data: dict[int, bytearray] = {}
        self.window = asyncio.Condition()
        self.rx: asyncio.Task | None = None
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int, target: str, name: str) -> "Conn":
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        sock = w.get_extra_info("socket")
        if sock is not None:  # as every initiator does: no Nagle delay on 48-byte commands
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = cls(r, w)
        isid = 0x400000000000 | int.from_bytes(os.urandom(3), "big")
        keys = [("InitiatorName", name), ("TargetName", target), ("SessionType", "Normal")] + OPERATIONAL
        c._send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=isid, itt=0, cmdsn=1, data=K.encode_text(keys)))
        resp = await c._read_one()
        if not isinstance(resp, P.LoginResponse) or resp.status_class != 0:
            raise SoakError(f"login refused: {resp}")
        c.expstatsn = (resp.statsn + 1) & 0xFFFFFFFF
        c.cmdsn, c.maxcmdsn = resp.expcmdsn, resp.maxcmdsn
        c.rx = asyncio.get_running_loop().create_task(c._receiver())
        # A new I_T nexus sees a unit attention first (SPC-4): clear it.
        for _ in range(5):
            status, _ = await c.command(bytes(16))
            if status == 0:
                break
        return c

    def _send(self, pdu: P.Pdu) -> None:
        self.w.write(encode_bytes(pdu))

    async def _read_one(self) -> P.Pdu:
        while True:
            data = await asyncio.wait_for(self.r.read(1 << 20), COMMAND_TIMEOUT)
            if not data:
                raise SoakError("target closed the connection")
            out = self.parser.feed(data)
            if out:
                return out[0]

    async def _receiver(self) -> None:
        try:
            while True:
                data = await self.r.read(1 << 20)
                if not data:
                    raise SoakError("target closed the connection")
                for pdu in self.parser.feed(data):
                    await self._dispatch(getattr(pdu, "pdu", pdu))
        except BaseException as exc:  # noqa: BLE001 - wake every waiter with the cause
            self.closed = True
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else SoakError("receiver stopped"))
            async with self.window:
                self.window.notify_all()

    async def _dispatch(self, pdu: P.Pdu) -> None:
        if hasattr(pdu, "maxcmdsn") and pdu.maxcmdsn != self.maxcmdsn:
            self.maxcmdsn = pdu.maxcmdsn
            async with self.window:
                self.window.notify_all()
        if isinstance(pdu, P.DataIn):
            buf = self.data.setdefault(pdu.itt, bytearray())
            buf[pdu.offset:pdu.offset + len(pdu.data)] = pdu.data
            if pdu.has_status:
                self.expstatsn = (pdu.statsn + 1) & 0xFFFFFFFF
                self._done(pdu.itt, pdu.status)
        elif isinstance(pdu, P.ScsiResponse):
            self.expstatsn = (pdu.statsn + 1) & 0xFFFFFFFF
            self._done(pdu.itt, pdu.status)
        elif isinstance(pdu, P.NopIn):
            if pdu.itt != P.RESERVED_TAG:
                self.expstatsn = (pdu.statsn + 1) & 0xFFFFFFFF
                self._done(pdu.itt, 0)
            elif pdu.ttt != P.RESERVED_TAG:  # the target pings us: answer (§11.18)
                self._send(P.NopOut(itt=P.RESERVED_TAG, ttt=pdu.ttt, lun=pdu.lun, cmdsn=self.cmdsn,
                                    expstatsn=self.expstatsn, immediate=True))
        elif isinstance(pdu, P.LogoutResponse):
            self._done(pdu.itt, pdu.response)
        elif isinstance(pdu, P.Reject):
            itt = struct.unpack_from(">I", bytes(pdu.data), 16)[0] if len(pdu.data) >= 20 else None
            fut = self.pending.get(itt)
            err = SoakError(f"Reject reason {pdu.reason:#x}")
            if fut is not None and not fut.done():
                fut.set_exception(err)
            else:
                raise err
        elif isinstance(pdu, P.R2T):
            raise SoakError("unexpected R2T: every write fits in immediate data")

    def _done(self, itt: int, status: int) -> None:
        fut = self.pending.pop(itt, None)
        if fut is not None and not fut.done():
            fut.set_result(status)

    def _new(self) -> tuple[int, asyncio.Future]:
        self.itt = (self.itt + 1) & 0x7FFFFFFF
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.itt] = fut
        return self.itt, fut

    async def _window_open(self) -> None:
        async with self.window:
            while not self.closed and ((self.maxcmdsn - self.cmdsn) & 0xFFFFFFFF) >= 0x80000000:
                await asyncio.wait_for(self.window.wait(), COMMAND_TIMEOUT)
        if self.closed:
            raise SoakError("connection lost")

    async def command(self, cdb: bytes, *, read: int = 0, data: bytes = b"") -> tuple[int, bytes]:
        await self._window_open()
        itt, fut = self._new()
        pdu = P.ScsiCommandPdu(read=bool(read), write=bool(data), edtl=read or len(data), cmdsn=self.cmdsn,
                               expstatsn=self.expstatsn, cdb=cdb.ljust(16, b"\0"), itt=itt, data=data)
        self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
        self._send(pdu)
        status = await asyncio.wait_for(fut, COMMAND_TIMEOUT)
        return status, bytes(self.data.pop(itt, b""))

    async def ping(self) -> float:
        itt, fut = self._new()
        t0 = time.monotonic()
        self._send(P.NopOut(itt=itt, ttt=P.RESERVED_TAG, cmdsn=self.cmdsn, expstatsn=self.expstatsn,
                            immediate=True, data=b"soak"))
        await asyncio.wait_for(fut, COMMAND_TIMEOUT)
        return time.monotonic() - t0

    async def logout(self) -> None:
        itt, fut = self._new()
        self._send(P.LogoutRequest(reason=0, itt=itt, cmdsn=self.cmdsn, expstatsn=self.expstatsn, immediate=True))
        await asyncio.wait_for(fut, COMMAND_TIMEOUT)
        await self.close()

    async def close(self) -> None:
        if self.rx is not None:
            self.rx.cancel()
        self.w.close()
        try:
            await asyncio.wait_for(self.w.wait_closed(), 5)
        except (OSError, asyncio.TimeoutError):
            pass


@dataclass
class Figures:
    sessions: int = 0
    depth: int = 0
    seconds: float = 0.0
    reads: int = 0
    writes: int = 0
    bytes_moved: int = 0
    verified: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    nop_loaded: list[float] = field(default_factory=list)
    nop_dedicated: list[float] = field(default_factory=list)
    nop_loaded_sep: list[float] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    cpu_target: float = 0.0
    cpu_client: float = 0.0
    cycles: int = 0
    cycle_seconds: float = 0.0
    cycle_errors: list[str] = field(default_factory=list)
    rss_cycles: tuple[int, int] = (0, 0)
    fds_cycles: tuple[int, int] = (0, 0)

    @property
    def rss_flat(self) -> tuple[bool, int, int]:
        if len(self.rss) < 4:
            return True, 0, 0
        warm = self.rss[len(self.rss) // 4][1]
        end = max(r for _, r in self.rss[-max(1, len(self.rss) // 4):])
        return end <= warm + FLAT_SLACK, warm, end

    def ok(self) -> bool:
        # The target's own answer time: pings from a process that is not itself saturated.
        nops = self.nop_dedicated + self.nop_loaded_sep
        return (not self.errors and not self.cycle_errors and self.rss_flat[0]
                and (not nops or max(nops) < NOP_LIMIT)
                and max(self.nop_loaded, default=0) < OPEN_ISCSI_NOP_TIMEOUT
                and self.rss_cycles[1] <= self.rss_cycles[0] + FLAT_SLACK
                and self.fds_cycles[1] <= self.fds_cycles[0] + 2)

    def report(self) -> str:
        def pct(xs: list[float], p: float) -> float:
            return sorted(xs)[min(len(xs) - 1, int(len(xs) * p))] * 1000 if xs else 0.0

        ios = self.reads + self.writes
        flat, warm, end = self.rss_flat
        lines = [
            f"I/O soak: {self.sessions} sessions x {self.depth} in flight for {self.seconds:.0f} s",
            f"  commands: {ios} ({self.writes} writes, {self.reads} reads verified {self.verified}), "
            f"{ios / self.seconds if self.seconds else 0:.0f} IOPS, "
            f"{self.bytes_moved / self.seconds / 1e6 if self.seconds else 0:.1f} MB/s",
            f"  latency ms: p50 {pct(self.latencies, .5):.1f}  p99 {pct(self.latencies, .99):.1f}  "
            f"max {max(self.latencies, default=0) * 1000:.1f}",
            f"  errors: {len(self.errors)}" + (f" (first: {self.errors[0]})" if self.errors else ""),
            f"  target RSS MiB: start {self.rss[0][1] / 2**20 if self.rss else 0:.1f}, after warm-up {warm / 2**20:.1f}, "
            f"end {end / 2**20:.1f} -> {'flat' if flat else 'GROWING'} (slack {FLAT_SLACK >> 20} MiB)",
            f"NOP-Out under load (limit {NOP_LIMIT * 1000:.0f} ms): from a separate process, idle session: "
            f"{len(self.nop_dedicated)} pings, max {max(self.nop_dedicated, default=0) * 1000:.1f} ms; "
            f"loaded session ({self.depth} in flight): {len(self.nop_loaded_sep)} pings, max "
            f"{max(self.nop_loaded_sep, default=0) * 1000:.1f} ms, p99 {pct(self.nop_loaded_sep, .99):.1f} ms",
            f"  from the soak process itself (its own event loop saturated, limit "
            f"{OPEN_ISCSI_NOP_TIMEOUT:.0f} s): {len(self.nop_loaded)} pings, max "
            f"{max(self.nop_loaded, default=0) * 1000:.1f} ms, p99 {pct(self.nop_loaded, .99):.1f} ms",
            f"  CPU seconds: target {self.cpu_target:.1f}, soak client {self.cpu_client:.1f}",
            f"Login/logout: {self.cycles} cycles in {self.cycle_seconds:.1f} s "
            f"({self.cycles / self.cycle_seconds if self.cycle_seconds else 0:.0f}/s), errors {len(self.cycle_errors)}"
            + (f" (first: {self.cycle_errors[0]})" if self.cycle_errors else "")
            + f"; RSS MiB {self.rss_cycles[0] / 2**20:.1f} -> {self.rss_cycles[1] / 2**20:.1f}; "
            f"fds {self.fds_cycles[0]} -> {self.fds_cycles[1]}",
            f"RESULT: {'PASS' if self.ok() else 'FAIL'}",
        ]
        return "\n".join(lines)


async def _slot(conn: Conn, base_lba: int, rng: random.Random, fig: Figures, stop: float) -> None:
    model: dict[int, bytes] = {}  # offset in slot -> bytes last written (non-overlapping extents)
    slot_blocks = SLOT_BYTES // BLOCK
    while time.monotonic() < stop and not conn.closed:
        size = rng.choice(IO_SIZES)
        nblocks = size // BLOCK
        start = rng.randrange(0, slot_blocks - nblocks + 1, 8)
        lba = base_lba + start
        t0 = time.monotonic()
        try:
            if rng.random() < 0.5 or not model:
                payload = rng.randbytes(size)
                status, _ = await conn.command(struct.pack(">BBIBHB", 0x2A, 0, lba, 0, nblocks, 0), data=payload)
                if status != 0:
                    raise SoakError(f"WRITE lba {lba} status {status:#x}")
                for b in range(nblocks):
                    model[start + b] = payload[b * BLOCK:(b + 1) * BLOCK]
                fig.writes += 1
            else:
                status, data = await conn.command(struct.pack(">BBIBHB", 0x28, 0, lba, 0, nblocks, 0), read=size)
                if status != 0 or len(data) != size:
                    raise SoakError(f"READ lba {lba} status {status:#x} {len(data)} bytes")
                for b in range(nblocks):
                    want = model.get(start + b)
                    if want is not None:
                        if data[b * BLOCK:(b + 1) * BLOCK] != want:
                            raise SoakError(f"data mismatch at LBA {lba + b}")
                        fig.verified += 1
                fig.reads += 1
            fig.bytes_moved += size
            fig.latencies.append(time.monotonic() - t0)
        except (SoakError, asyncio.TimeoutError, OSError) as exc:
            fig.errors.append(f"{type(exc).__name__}: {exc}")
            return


async def _pinger(conn: Conn, out: list[float], stop: float, fig: Figures) -> None:
    while time.monotonic() < stop and not conn.closed:
        try:
            out.append(await conn.ping())
        except (SoakError, asyncio.TimeoutError, OSError) as exc:
            fig.errors.append(f"NOP-Out: {type(exc).__name__}: {exc}")
            return
        await asyncio.sleep(1.0)


async def _ping_process(host: str, port: int, target: str, seconds: float, depth: int, base_lba: int,
                        interval: float = 0.5) -> list[float]:
    """Ping from a separate process: its round-trip times owe nothing to this process's load.

    With ``depth`` > 0 that process also keeps ``depth`` verified commands in flight on the same
    session, so the pings measure a loaded session as the target sees it.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tools.soak", "--ping-only", "--portal", f"{host}:{port}", "--target", target,
        "--seconds", str(seconds), "--interval", str(interval), "--depth", str(depth),
        "--base-lba", str(base_lba),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                       os.environ.get("PYTHONPATH")]))})
    out, err = await asyncio.wait_for(proc.communicate(), seconds + COMMAND_TIMEOUT + 20)
    if proc.returncode != 0:
        raise SoakError(f"ping process failed: {err.decode(errors='replace')[-500:]}")
    return [float(x) for x in out.split()]


async def ping_only(host: str, port: int, target: str, seconds: float, interval: float, depth: int,
                    base_lba: int) -> list[float]:
    conn = await Conn.open(host, port, target, f"{INITIATOR}:pinger{depth}")
    rtts: list[float] = []
    fig = Figures()
    stop = time.monotonic() + seconds
    load = [asyncio.get_running_loop().create_task(
        _slot(conn, base_lba + j * (SLOT_BYTES // BLOCK), random.Random(j), fig, stop)) for j in range(depth)]
    while time.monotonic() < stop:
        rtts.append(await conn.ping())
        await asyncio.sleep(interval)
    await asyncio.gather(*load)
    await conn.logout()
    if fig.errors:
        raise SoakError(f"pinger's own I/O failed: {fig.errors[0]}")
    return rtts


async def _sampler(pid: int | None, fig: Figures, stop: float) -> None:
    t0 = time.monotonic()
    while pid and time.monotonic() < stop:
        fig.rss.append((time.monotonic() - t0, rss_bytes(pid)))
        await asyncio.sleep(1.0)


async def io_soak(host: str, port: int, target: str, pid: int | None, *, sessions: int, depth: int,
                  seconds: float, seed: int = 1) -> Figures:
    fig = Figures(sessions=sessions, depth=depth)
    conns = []
    for i in range(sessions):
        conns.append(await Conn.open(host, port, target, f"{INITIATOR}:s{i}"))
    t0 = time.monotonic()
    cpu0_t, cpu0_c = (process_cpu_seconds(pid) if pid else 0.0), sum(os.times()[:2])
    stop = t0 + seconds
    extra_base = sessions * depth * (SLOT_BYTES // BLOCK)
    pingers = [asyncio.get_running_loop().create_task(
        _ping_process(host, port, target, max(1.0, seconds - 2), d, extra_base + k * depth * (SLOT_BYTES // BLOCK)))
        for k, d in enumerate((0, depth))]
    jobs = [_sampler(pid, fig, stop)]
    for i, conn in enumerate(conns):
        jobs.append(_pinger(conn, fig.nop_loaded, stop, fig))
        for j in range(depth):
            base = (i * depth + j) * (SLOT_BYTES // BLOCK)
            jobs.append(_slot(conn, base, random.Random(seed * 1_000_003 + i * 1000 + j), fig, stop))
    await asyncio.wait_for(asyncio.gather(*jobs), seconds + COMMAND_TIMEOUT + 10)
    fig.seconds = time.monotonic() - t0
    fig.cpu_target = (process_cpu_seconds(pid) - cpu0_t) if pid else 0.0
    fig.cpu_client = sum(os.times()[:2]) - cpu0_c
    try:
        fig.nop_dedicated, fig.nop_loaded_sep = await asyncio.gather(*pingers)
    except SoakError as exc:
        fig.errors.append(str(exc))
    for conn in conns:
        try:
            await conn.logout()
        except (SoakError, asyncio.TimeoutError, OSError) as exc:
            fig.errors.append(f"logout: {exc}")
    return fig


async def login_cycles(host: str, port: int, target: str, pid: int | None, cycles: int, fig: Figures,
                       budget: float) -> None:
    await asyncio.sleep(0.5)  # let the soak's connections finish closing
    before = (rss_bytes(pid), open_fds(pid)) if pid else (0, 0)
    t0 = time.monotonic()
    for n in range(cycles):
        if time.monotonic() - t0 > budget:
            fig.cycle_errors.append(f"time budget of {budget:.0f} s spent after {n} cycles")
            break
        try:
            conn = await Conn.open(host, port, target, f"{INITIATOR}:cycle")
            await conn.logout()
            fig.cycles += 1
        except (SoakError, asyncio.TimeoutError, OSError) as exc:
            fig.cycle_errors.append(f"cycle {n}: {type(exc).__name__}: {exc}")
            if len(fig.cycle_errors) > 10:
                break
    fig.cycle_seconds = time.monotonic() - t0
    await asyncio.sleep(0.5)
    after = (rss_bytes(pid), open_fds(pid)) if pid else (0, 0)
    fig.rss_cycles, fig.fds_cycles = (before[0], after[0]), (before[1], after[1])


async def soak(host: str, port: int, target: str, pid: int | None, *, sessions: int, depth: int,
               seconds: float, cycles: int, seed: int = 1) -> Figures:
    fig = await io_soak(host, port, target, pid, sessions=sessions, depth=depth, seconds=seconds, seed=seed)
    await login_cycles(host, port, target, pid, cycles, fig, budget=max(60.0, cycles * 0.5))
    return fig


def lun_bytes_needed(sessions: int, depth: int) -> int:
    """LUN size for ``sessions`` sessions of ``depth`` slots (add 2 for the ping processes)."""
    return sessions * depth * SLOT_BYTES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Load/soak test of an iSCSI target (loopback).")
    ap.add_argument("--portal", help="HOST:PORT of a running target (default: spawn our daemon)")
    ap.add_argument("--target", help="target IQN (with --portal)")
    ap.add_argument("--pid", type=int, help="target process id, for RSS/fd figures (with --portal)")
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ping-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--interval", type=float, default=0.5, help=argparse.SUPPRESS)
    ap.add_argument("--base-lba", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ping_only:  # the separate pinger process: prints one round-trip time a line
        host, _, port = args.portal.rpartition(":")
        rtts = asyncio.run(ping_only(host.strip("[]"), int(port), args.target, args.seconds, args.interval,
                                     args.depth, args.base_lba))
        print("\n".join(f"{r:.6f}" for r in rtts))
        return 0
    try:
        import uvloop  # noqa: F401 - the client must not be the bottleneck when it can help it
        uvloop.install()
    except ImportError:
        pass
    peer = None
    if args.portal:
        host, _, port = args.portal.rpartition(":")
        host, port, target, pid = host.strip("[]"), int(port), args.target, args.pid
        if not target:
            ap.error("--target is required with --portal")
    else:
        from tools.peers.sanstack import SanstackPeer

        work = Path(tempfile.mkdtemp(prefix="soak-"))
        peer = SanstackPeer.create(work, size=max(64 << 20, lun_bytes_needed(args.sessions + 2, args.depth)))
        peer.start()
        host, port, target, pid = peer.portals[0].host, peer.portals[0].port, peer.iqn, peer.proc.pid
        print(f"spawned target pid {pid} on {host}:{port} ({work})")
    try:
        fig = asyncio.run(soak(host, port, target, pid, sessions=args.sessions, depth=args.depth,
                               seconds=args.seconds, cycles=args.cycles, seed=args.seed))
        print(fig.report())
        if peer is not None and not peer.alive():
            print("target died during the soak")
            return 1
        return 0 if fig.ok() else 1
    finally:
        if peer is not None:
            peer.stop()
            peer.cleanup()


if __name__ == "__main__":
    sys.exit(main())
