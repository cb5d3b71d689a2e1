"""Crash consistency of the target: kill -9 at random moments during verified writes.

    python -m tools.crashtest                    # 100 trials against our daemon
    python -m tools.crashtest --trials 5 --seed 3

Each trial starts the daemon (same image file, same ports), opens ``sessions`` sessions that
keep ``depth`` writes in flight each -- half WRITE(16) with FUA=1, half plain WRITE(10) -- plus
a SYNCHRONIZE CACHE(10) on each session every few dozen milliseconds, and SIGKILLs the daemon
at a random moment between 30 ms and 1 s into the writing.  A write is **acknowledged
durable** when (SBC-4 §5.22, §4.2.2 FUA):
- it was a FUA write and its GOOD status arrived, or
- its GOOD status arrived before a SYNCHRONIZE CACHE was sent on that session, and that
  SYNCHRONIZE CACHE then returned GOOD.
Every write goes to blocks no other write of the trial touches, with data unique to the trial,
so after the kill each durable write must be found whole -- in the image file right away (the
data left the daemon for the kernel before GOOD) and through the restarted daemon.  The tool
prints per-trial counts and a total: trials, writes acknowledged, durable, lost (must be 0).

Loopback only; every wait is bounded; the daemon is stopped at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import random
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tools.peers.sanstack import SanstackPeer
from tools.soak import COMMAND_TIMEOUT, Conn, SoakError

BLOCK = 512
WRITE_BLOCKS = 8                      # 4 KiB writes: one page, the unit a torn write would show
LUN_SIZE = 512 << 20
REGION = 64 << 20                     # each trial writes into a fresh 64 MiB region (rotating)
KILL_WINDOW = (0.03, 1.0)             # seconds after the writers start
SYNC_INTERVAL = (0.01, 0.08)          # between SYNCHRONIZE CACHE commands on one session
INITIATOR = "iqn.2026-11.org.sanstack.crashtest"


@dataclass
class Trial:
    index: int
    sent: int = 0
    acked: int = 0
    fua_acked: int = 0
    synced: int = 0
    lost: list[int] = field(default_factory=list)   # LBAs of durable writes not found
    lost_after_restart: list[int] = field(default_factory=list)
    killed_at: float = 0.0

    @property
    def durable(self) -> int:
        return self.fua_acked + self.synced


def payload(trial: int, lba: int, seed: int) -> bytes:
    """Data unique to (seed, trial, lba): a header then a pattern, 4 KiB."""
    head = struct.pack(">QQQ", seed, trial, lba)
    rng = random.Random(hash((seed, trial, lba)))
    return (head + rng.randbytes(WRITE_BLOCKS * BLOCK - len(head)))


class Writer:
    """One session's writes and syncs; records what became durable."""

    def __init__(self, conn: Conn, trial: Trial, lbas: list[int], seed: int, depth: int) -> None:
        self.conn, self.trial, self.lbas, self.seed, self.depth = conn, trial, lbas, seed, depth
        self.acked_plain: list[int] = []   # plain writes acknowledged, not yet covered by a sync
        self.durable: list[int] = []
        self.stop = False

    async def _write_loop(self, rng: random.Random) -> None:
        while not self.stop and self.lbas:
            lba = self.lbas.pop()
            data = payload(self.trial.index, lba, self.seed)
            fua = rng.random() < 0.5
            if fua:
                cdb = struct.pack(">BBQIBB", 0x8A, 0x08, lba, WRITE_BLOCKS, 0, 0)  # WRITE(16), FUA=1
            else:
                cdb = struct.pack(">BBIBHB", 0x2A, 0, lba, 0, WRITE_BLOCKS, 0)      # WRITE(10)
            self.trial.sent += 1
            status, _ = await self.conn.command(cdb, data=data)
            if status != 0:
                raise SoakError(f"write at LBA {lba}: status {status:#x}")
            self.trial.acked += 1
            if fua:
                self.trial.fua_acked += 1
                self.durable.append(lba)
            else:
                self.acked_plain.append(lba)

    async def _sync_loop(self, rng: random.Random) -> None:
        while not self.stop:
            await asyncio.sleep(rng.uniform(*SYNC_INTERVAL))
            covered, self.acked_plain = self.acked_plain, []
            status, _ = await self.conn.command(struct.pack(">BBIBHB", 0x35, 0, 0, 0, 0, 0))
            if status != 0:
                raise SoakError(f"SYNCHRONIZE CACHE status {status:#x}")
            self.trial.synced += len(covered)
            self.durable += covered

    async def run(self, rng: random.Random) -> None:
        jobs = [self._write_loop(random.Random(rng.random())) for _ in range(self.depth)]
        jobs.append(self._sync_loop(random.Random(rng.random())))
        # The kill ends every job with a connection error: that is the expected way out.
        await asyncio.gather(*jobs, return_exceptions=True)


async def _trial_io(peer: SanstackPeer, trial: Trial, seed: int, sessions: int, depth: int,
                    rng: random.Random) -> list[int]:
    host, port = peer.portals[0].host, peer.portals[0].port
    base = (trial.index % (LUN_SIZE // REGION)) * (REGION // BLOCK)
    all_lbas = list(range(base, base + REGION // BLOCK, WRITE_BLOCKS))
    rng.shuffle(all_lbas)
    share = len(all_lbas) // sessions
    writers = []
    for i in range(sessions):
        conn = await Conn.open(host, port, peer.iqn, f"{INITIATOR}:w{i}")
        writers.append(Writer(conn, trial, all_lbas[i * share:(i + 1) * share], seed, depth))
    kill_after = rng.uniform(*KILL_WINDOW)
    tasks = [asyncio.get_running_loop().create_task(w.run(random.Random(rng.random()))) for w in writers]
    await asyncio.sleep(kill_after)
    trial.killed_at = kill_after
    peer.kill()  # SIGKILL, now, with writes and syncs in flight
    await asyncio.wait_for(asyncio.gather(*tasks), COMMAND_TIMEOUT)
    for w in writers:
        await w.conn.close()
    return [lba for w in writers for lba in w.durable]


def _missing_in_image(image: Path, durable: list[int], trial: Trial, seed: int) -> list[int]:
    bad = []
    with open(image, "rb") as f:
        for lba in durable:
            f.seek(lba * BLOCK)
            if f.read(WRITE_BLOCKS * BLOCK) != payload(trial.index, lba, seed):
                bad.append(lba)
    return bad


async def _missing_via_target(peer: SanstackPeer, durable: list[int], trial: Trial, seed: int) -> list[int]:
    conn = await Conn.open(peer.portals[0].host, peer.portals[0].port, peer.iqn, f"{INITIATOR}:verify")
    bad = []
    try:
        for lba in durable:
            status, data = await conn.command(struct.pack(">BBIBHB", 0x28, 0, lba, 0, WRITE_BLOCKS, 0),
                                              read=WRITE_BLOCKS * BLOCK)
            if status != 0 or data != payload(trial.index, lba, seed):
                bad.append(lba)
    finally:
        await conn.logout()
    return bad


def run_trials(workdir: Path, trials: int, *, seed: int = 1, sessions: int = 4, depth: int = 8,
               verbose: bool = True) -> list[Trial]:
    """Run ``trials`` kill -9 trials against our daemon in ``workdir``; returns their records."""
    peer = SanstackPeer.create(workdir, size=LUN_SIZE)
    rng = random.Random(seed)
    results = []
    try:
        peer.start()
        for n in range(trials):
            trial = Trial(n)
            if not peer.alive():
                peer.restart()
            durable = asyncio.run(_trial_io(peer, trial, seed, sessions, depth, rng))
            assert not peer.alive()
            trial.lost = _missing_in_image(peer.luns[0].path, durable, trial, seed)
            peer.restart()
            trial.lost_after_restart = asyncio.run(_missing_via_target(peer, durable, trial, seed))
            results.append(trial)
            if verbose:
                print(f"trial {n:3d}: killed at {trial.killed_at * 1000:6.0f} ms; writes sent {trial.sent:5d}, "
                      f"acked {trial.acked:5d}, durable {trial.durable:5d} (FUA {trial.fua_acked}, "
                      f"synced {trial.synced}); lost {len(trial.lost)} in image, "
                      f"{len(trial.lost_after_restart)} after restart", flush=True)
    finally:
        if peer.alive():
            peer.stop()
        peer.cleanup()
    return results


def summary(results: list[Trial]) -> str:
    lost = sum(len(t.lost) for t in results)
    lost_restart = sum(len(t.lost_after_restart) for t in results)
    return (f"crash test: {len(results)} trials (kill -9 at random moments, "
            f"{KILL_WINDOW[0] * 1000:.0f}-{KILL_WINDOW[1] * 1000:.0f} ms into the writes); "
            f"writes sent {sum(t.sent for t in results)}, acknowledged {sum(t.acked for t in results)}, "
            f"acknowledged durable {sum(t.durable for t in results)} "
            f"(FUA {sum(t.fua_acked for t in results)}, SYNCHRONIZE CACHE {sum(t.synced for t in results)}); "
            f"lost: {lost} in the image, {lost_restart} through the restarted target")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="kill -9 crash-consistency test of our target (loopback).")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--depth", type=int, default=8, help="writes in flight per session")
    ap.add_argument("--dir", type=Path, help="work directory (default: a temp dir)")
    args = ap.parse_args(argv)
    # Writes still queued when the daemon dies fail in asyncio's transport: expected, not news.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    work = args.dir or Path(tempfile.mkdtemp(prefix="crashtest-"))
    t0 = time.monotonic()
    results = run_trials(work, args.trials, seed=args.seed, sessions=args.sessions, depth=args.depth)
    print(summary(results) + f"; {time.monotonic() - t0:.0f} s")
    lost = sum(len(t.lost) + len(t.lost_after_restart) for t in results)
    return 0 if lost == 0 and all(t.durable for t in results) else 1


if __name__ == "__main__":
    sys.exit(main())
